"""A stranger's DCUtR CONNECT cannot turn a node into a connection flood at an address it picks.

The CONNECT message may hold 4 KiB of addresses: about 370 of ``/ip4/a.b.c.d/tcp/p``. py-libp2p 0.8.1
dials every one of them at once, three rounds, each dial holding a socket until its timeout, and lets
one peer run any number of exchanges at a time. So one relayed connection and 4 KiB of bytes had a
node open hundreds of TCP connections to a third party (here 40 listeners that accept and stay
silent, as a host that is no libp2p node would) and hold as many descriptors. ``nat.holepunch``
dials at most ``MAX_PUNCH_DIALS`` of a peer's addresses at once.
"""

from __future__ import annotations

from functools import partial

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR
from libp2p.relay.circuit_v2.dcutr import read_dcutr_msg
from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch
from libp2p.relay.circuit_v2.utils import write_delimited_msg

from nat.holepunch import MAX_PREDICTED_ADDRS, MAX_PUNCH_DIALS, HolePunchService, HolePunchSettings
from nat.relay import RelayService, RelaySettings, reserve
from node.host import build_host
from wire.streams import connect_via_relay

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


async def _punch_with(
    nursery: trio.Nursery, relay: IHost, victim: IHost, stranger: IHost, addrs: list[str]
) -> HolePunch:
    """The stranger reaches the victim through the relay and starts a DCUtR exchange naming ``addrs``."""
    await nursery.start(RelayService(relay, RelaySettings(), serve_hop=True).run)
    await nursery.start(RelayService(victim, RelaySettings(), serve_hop=False).run)
    await nursery.start(RelayService(stranger, RelaySettings(), serve_hop=False).run)
    await nursery.start(HolePunchService(victim, HolePunchSettings(dial_timeout_s=5)).run)
    relay_info = PeerInfo(relay.get_id(), relay.get_addrs())
    await victim.connect(relay_info)
    await reserve(victim, relay.get_id())
    await stranger.connect(relay_info)
    circuit = multiaddr.Multiaddr(f"{relay.get_addrs()[0]}/p2p-circuit")
    assert await connect_via_relay(stranger, victim.get_id(), [circuit])
    stream = await stranger.new_stream(victim.get_id(), [DCUTR])
    connect = HolePunch(type=HolePunch.CONNECT)
    connect.ObsAddrs.extend(multiaddr.Multiaddr(addr).to_bytes() for addr in addrs)
    await write_delimited_msg(stream, connect)
    await read_dcutr_msg(stream, HolePunch)
    await write_delimited_msg(stream, HolePunch(type=HolePunch.SYNC))
    return connect


async def test_a_connect_full_of_addresses_opens_few_connections() -> None:
    relay = build_host(generate_new_ed25519_identity())
    victim = build_host(generate_new_ed25519_identity())
    stranger = build_host(generate_new_ed25519_identity())
    accepted: list[trio.SocketStream] = []
    most = 0

    async def third_party(conn: trio.SocketStream) -> None:
        nonlocal most
        accepted.append(conn)
        most = max(most, len(accepted))
        try:
            while await conn.receive_some(4096):  # silent: never answers the handshake
                pass
        except trio.BrokenResourceError:
            pass
        finally:
            accepted.remove(conn)

    async with (
        relay.run(LOOPBACK),
        victim.run(LOOPBACK),
        stranger.run(LOOPBACK),
        trio.open_nursery() as nursery,
    ):
        ports = []
        for _ in range(40):
            listeners = await nursery.start(partial(trio.serve_tcp, third_party, 0, host="127.0.0.1"))
            ports.append(listeners[0].socket.getsockname()[1])
        with trio.fail_after(8):
            connect = await _punch_with(nursery, relay, victim, stranger, [f"/ip4/127.0.0.1/tcp/{p}" for p in ports])
        await trio.sleep(3)  # the first round's dials are all out by now
        print(f"{len(connect.ObsAddrs)} addresses asked, at most {most} connections at once")
        assert 0 < most <= MAX_PUNCH_DIALS, most
        nursery.cancel_scope.cancel()


async def test_a_connect_full_of_addresses_is_not_kept_whole() -> None:
    """py-libp2p keeps every address of a CONNECT in the peer store for 10 minutes: a stranger running
    exchange after exchange, each naming about 370 fresh addresses, grew the node's peer store without
    bound. Only the first ``MAX_PREDICTED_ADDRS`` are read, as many as py-libp2p itself sends."""
    relay = build_host(generate_new_ed25519_identity())
    victim = build_host(generate_new_ed25519_identity())
    stranger = build_host(generate_new_ed25519_identity())
    async with relay.run(LOOPBACK), victim.run(LOOPBACK), stranger.run(LOOPBACK), trio.open_nursery() as nursery:
        addrs = [f"/ip4/127.0.0.2/tcp/{port}" for port in range(20000, 20300)]  # nothing listens there
        with trio.fail_after(8):
            await _punch_with(nursery, relay, victim, stranger, addrs)
        await trio.sleep(0.5)
        kept = [str(addr) for addr in victim.get_peerstore().addrs(stranger.get_id()) if "127.0.0.2" in str(addr)]
        print(f"{len(addrs)} addresses in the CONNECT, {len(kept)} kept")
        assert len(kept) <= MAX_PREDICTED_ADDRS, len(kept)
        nursery.cancel_scope.cancel()


async def test_peers_that_punched_and_left_are_not_remembered() -> None:
    """Each peer whose exchange ended direct was remembered for good: strangers punching from fresh
    identities (a relayed connection each) grew the node's memory for as long as it ran. Only peers
    still connected are kept."""
    relay = build_host(generate_new_ed25519_identity())
    victim = build_host(generate_new_ed25519_identity())
    async with relay.run(LOOPBACK), victim.run(LOOPBACK), trio.open_nursery() as nursery:
        await nursery.start(RelayService(relay, RelaySettings(), serve_hop=True).run)
        await nursery.start(RelayService(victim, RelaySettings(), serve_hop=False).run)
        service = await nursery.start(HolePunchService(victim, HolePunchSettings(dial_timeout_s=5)).run)
        relay_info = PeerInfo(relay.get_id(), relay.get_addrs())
        circuit = multiaddr.Multiaddr(f"{relay.get_addrs()[0]}/p2p-circuit")
        with trio.fail_after(9):
            await victim.connect(relay_info)
            await reserve(victim, relay.get_id())
            while service.counts["direct"] < 4:
                stranger = build_host(generate_new_ed25519_identity())
                try:
                    async with stranger.run(LOOPBACK), trio.open_nursery() as inner:
                        await inner.start(RelayService(stranger, RelaySettings(), serve_hop=False).run)
                        await stranger.connect(relay_info)
                        await connect_via_relay(stranger, victim.get_id(), [circuit])
                        stream = await stranger.new_stream(victim.get_id(), [DCUTR])
                        connect = HolePunch(type=HolePunch.CONNECT)
                        connect.ObsAddrs.extend(addr.to_bytes() for addr in stranger.get_addrs())
                        await write_delimited_msg(stream, connect)
                        await read_dcutr_msg(stream, HolePunch)
                        await write_delimited_msg(stream, HolePunch(type=HolePunch.SYNC))
                        while not service.punched(stranger.get_id()):
                            await trio.sleep(0.05)
                        await stranger.disconnect(victim.get_id())  # the stranger leaves
                        inner.cancel_scope.cancel()
                except* Exception:  # noqa: BLE001 - the stranger's own host failing as it leaves: another tries
                    pass
                while stranger.get_id() in victim.get_connected_peers():
                    await trio.sleep(0.05)
        print(f"{service.counts['direct']} punched, {len(service._punched)} remembered")
        assert service.counts["direct"] >= 4
        assert len(service._punched) <= 1
        nursery.cancel_scope.cancel()
