"""One address cannot take every reservation a relay offers.

A relay keeps ``relay.max_reservations`` (16) reservations, each held while its holder stays connected.
A stranger connecting from one address with as many fresh identities, each reserving, left the relay
refusing every private node that needed it (RESOURCE_LIMIT_EXCEEDED) for as long as it held them.
One IP (or IPv6 /64) now holds at most ``max_reservations_per_ip``; loopback is exempt by default
(a swarm on one machine), so this test turns the exemption off.
"""

from __future__ import annotations

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.peer.peerinfo import PeerInfo

from nat.relay import RelayRefused, RelayService, RelaySettings, reserve
from node.host import build_host

IPV4 = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
IPV6 = multiaddr.Multiaddr("/ip6/::1/tcp/0")


async def test_one_address_cannot_take_every_reservation() -> None:
    settings = RelaySettings(max_reservations=4, max_reservations_per_ip=2, reservations_loopback_exempt=False)
    relay = build_host(generate_new_ed25519_identity())
    strangers = [build_host(generate_new_ed25519_identity()) for _ in range(4)]
    peer = build_host(generate_new_ed25519_identity())
    async with (
        relay.run([IPV4, IPV6]),
        strangers[0].run([IPV4]),
        strangers[1].run([IPV4]),
        strangers[2].run([IPV4]),
        strangers[3].run([IPV4]),
        peer.run([IPV6]),
        trio.open_nursery() as nursery,
    ):
        await nursery.start(RelayService(relay, settings, serve_hop=True).run)
        ipv4 = [addr for addr in relay.get_addrs() if str(addr).startswith("/ip4/")]
        ipv6 = [addr for addr in relay.get_addrs() if str(addr).startswith("/ip6/")]
        held = 0
        with trio.fail_after(8):
            for stranger in strangers:
                await stranger.connect(PeerInfo(relay.get_id(), ipv4))
                try:
                    await reserve(stranger, relay.get_id())
                    held += 1
                except RelayRefused:
                    pass
            print(f"the strangers hold {held} of 4 reservations")
            await peer.connect(PeerInfo(relay.get_id(), ipv6))
            reservation = await reserve(peer, relay.get_id())  # a private node from another address
        assert held == 2
        assert reservation.relay_id == str(relay.get_id())
        nursery.cancel_scope.cancel()
