"""A LAN stranger flooding mDNS answers cannot make a node dial without bound: every answer named
up to a dozen fresh peer ids, each dialed at once (to addresses the stranger picked), so a few
packets a second kept hundreds of dials in flight. At most ``MAX_DIALS_IN_FLIGHT`` run at once; a
peer heard while they are busy is dialed when heard of again."""

from __future__ import annotations

import trio
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from zeroconf import DNSOutgoing, DNSText, const

from node.mdns import MAX_DIALS_IN_FLIGHT, SERVICE, MdnsDiscovery, parse_packet


def _peer() -> ID:
    return ID.from_pubkey(create_new_key_pair().public_key)


def _flood_packet(n: int) -> bytes:
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA, multicast=True)
    for i in range(n):
        item = f"dnsaddr=/ip4/203.0.113.{i % 250}/tcp/443/p2p/{_peer()}".encode()
        out.add_answer_at_time(
            DNSText(f"x{i}.{SERVICE}", const._TYPE_TXT, const._CLASS_IN, 120, bytes([len(item)]) + item), 0
        )
    return bytes(out.packets()[0])


async def test_a_flood_of_announced_peers_keeps_few_dials_in_flight() -> None:
    in_flight = peak = dialed = 0
    release = trio.Event()

    async def found(info: PeerInfo) -> None:
        nonlocal in_flight, peak, dialed
        in_flight += 1
        dialed += 1
        peak = max(peak, in_flight)
        try:
            await release.wait()  # a dial to an address that never answers
        finally:
            in_flight -= 1

    mdns = MdnsDiscovery(_peer(), lambda: ["/ip4/192.168.1.2/tcp/4001"], found)
    packets = [_flood_packet(12) for _ in range(20)]
    assert all(len(parse_packet(packet).peers) == 12 for packet in packets)
    async with trio.open_nursery() as nursery:
        for packet in packets:
            await mdns._heard(packet, nursery)
        await trio.sleep(0.1)
        assert peak == dialed == MAX_DIALS_IN_FLIGHT
        release.set()
    # Once the dials ended, a peer heard of again is dialed.
    release = trio.Event()
    release.set()
    async with trio.open_nursery() as nursery:
        await mdns._heard(packets[-1], nursery)
    assert dialed > MAX_DIALS_IN_FLIGHT
