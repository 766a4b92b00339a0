"""QUIC hole punching (``nat.quic_punch``): two nodes listening for QUIC behind NATs end up directly
connected over QUIC after a DCUtR punch, in real network namespaces.

Three small processes (this file run as a module): a relay on the internet, B behind one NAT holding
a reservation on it, A behind another NAT dialing B through the relay. B starts DCUtR (the spec's
order); A dials QUIC from its QUIC listen port, B sprays from its listener. The NAT matrix
(``bench/nat_matrix.py --quic``) runs the same thing with whole daemons for every pair of NATs.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import sys
import time
from typing import Any

import multiaddr
import pytest
import trio

from nat.harness.netns import RELAY_IP, NatType, Topology, missing_requirements
from nat.quic_punch import quic_target, with_quic_predictions

_MISSING = missing_requirements()
needs_netns = pytest.mark.skipif(_MISSING is not None, reason=f"namespaces: {_MISSING}")

RELAY_PORT = 4001
LISTEN_PORT = 4021
PUNCH_WAIT_S = 25.0


def test_quic_predictions_sit_beside_each_tcp_prediction() -> None:
    tcp = [multiaddr.Multiaddr("/ip4/203.0.113.101/tcp/4021"), multiaddr.Multiaddr("/ip4/192.168.1.10/tcp/4021")]
    out = [str(a) for a in with_quic_predictions(tcp, [4021])]
    assert out == [
        "/ip4/203.0.113.101/udp/4021/quic-v1",
        "/ip4/192.168.1.10/udp/4021/quic-v1",
        "/ip4/203.0.113.101/tcp/4021",
        "/ip4/192.168.1.10/tcp/4021",
    ]
    # an address already there is not repeated; no QUIC listener: unchanged
    assert [str(a) for a in with_quic_predictions([*tcp, multiaddr.Multiaddr(out[0])], [])] == [*out[2:], out[0]]
    assert len(with_quic_predictions([multiaddr.Multiaddr(out[0]), *tcp], [4021])) == 4
    assert quic_target(out[0]) == ("203.0.113.101", 4021)
    assert quic_target("/ip4/203.0.113.2/udp/4001/quic-v1/p2p/QmRelay/p2p-circuit") is None
    assert quic_target(out[2]) is None


async def test_a_source_dial_leaves_from_the_quic_listen_port_and_the_listener_still_takes_others() -> None:
    """Loopback, no NAT: A dials B over QUIC from A's own QUIC listen port (B sees that port), and
    while that connection lives a third node still reaches A's listener on the same port."""
    from libp2p.crypto.secp256k1 import create_new_key_pair

    from nat.quic_punch import install, quic_listeners
    from node.host import build_host

    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/udp/0/quic-v1")]
    a, b, c = (build_host(create_new_key_pair(), listen_addrs=listen) for _ in range(3))
    async with a.run(listen), b.run(listen), c.run(listen):
        assert install(a) is not None and install(a) is install(a)  # idempotent
        (a_ip, a_port), (b_ip, b_port) = quic_listeners(a)[0], quic_listeners(b)[0]
        b_addr = multiaddr.Multiaddr(f"/ip4/{b_ip}/udp/{b_port}/quic-v1")
        with trio.fail_after(15):
            await a.get_network().dial_addr(b_addr, b.get_id(), (a_ip, a_port))  # type: ignore[call-arg]
            while not b.get_network().get_connections(a.get_id()):
                await trio.sleep(0.05)
        seen_by_b = b.get_network().get_connections(a.get_id())[0].muxed_conn.get_remote_address()  # type: ignore[attr-defined]
        assert tuple(seen_by_b) == (a_ip, a_port)
        # The listener on that port still takes new connections from anyone else.
        a_addr = multiaddr.Multiaddr(f"/ip4/{a_ip}/udp/{a_port}/quic-v1")
        with trio.fail_after(15):
            await c.get_network().dial_addr(a_addr, a.get_id())
            while not a.get_network().get_connections(c.get_id()):
                await trio.sleep(0.05)
        # and the dialed connection still carries streams both ways
        from libp2p.custom_types import TProtocol

        async def echo(stream: Any) -> None:
            await stream.write(await stream.read(16))
            await stream.close()

        b.set_stream_handler(TProtocol(ECHO), echo)
        with trio.fail_after(15):
            stream = await a.new_stream(b.get_id(), [TProtocol(ECHO)])
            await stream.write(b"ping")
            assert await stream.read(16) == b"ping"


def _read_json(proc: subprocess.Popen[str], deadline: float, what: str) -> dict[str, Any]:
    """The next JSON line ``proc`` prints, by ``deadline`` (other lines are skipped)."""
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                return dict(json.loads(line))
    finally:
        selector.close()
    raise AssertionError(f"{what}: no answer (exit code {proc.poll()})")


@needs_netns
@pytest.mark.parametrize("nat_a", [NatType.PORT_RESTRICTED])
def test_a_quic_pair_behind_nats_punches_to_a_direct_quic_connection(nat_a: NatType) -> None:
    with Topology({"r1": nat_a, "r2": NatType.PORT_RESTRICTED}) as topo:
        start = time.monotonic()

        def spawn(ns: str, *args: str) -> subprocess.Popen[str]:
            argv = [sys.executable, "-m", "tests.nat.test_quic_punch", *args]
            return topo.run_in(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

        relay = spawn(topo.relay.ns, "relay")
        relay_addr = f"/ip4/{RELAY_IP}/tcp/{RELAY_PORT}/p2p/{_read_json(relay, start + 30, 'relay')['id']}"
        home_b = spawn(topo.routers["r2"].hosts[0].ns, "home-b", relay_addr)
        b = _read_json(home_b, time.monotonic() + 30, "B's reservation")
        home_a = spawn(topo.routers["r1"].hosts[0].ns, "home-a", relay_addr, b["circuit"])
        a = _read_json(home_a, time.monotonic() + 30 + PUNCH_WAIT_S, "A's punch")
        print(f"A: {a} ({time.monotonic() - start:.1f} s since the relay started)")

        assert a["relayed_first"], a  # A reached B through the relay, nothing direct before the punch
        assert a["punched"] and a["path"] == "direct", a
        # Over QUIC: A's connection to B is a QUIC one to B's router address at B's QUIC listen port.
        assert a["transport"] == "quic", a
        b_quic = f"/ip4/{topo.routers['r2'].wan_ip}/udp/{LISTEN_PORT}/quic-v1"
        assert any(addr.startswith(b_quic) for addr in a["direct_addrs"]), a
        assert a["echo"] == "over quic", a  # a stream on it carries data


# ---------------------------------------------------------------------------------------------
# the three processes (``python -m tests.nat.test_quic_punch relay|home-b|home-a ...``)

ECHO = "/clawnode/test/quic-echo/1.0.0"


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def _peer(role: str, args: list[str]) -> None:
    from libp2p.crypto.secp256k1 import create_new_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from nat.holepunch import HolePunchService
    from nat.relay import RelayService, RelaySettings
    from node.host import build_host
    from wire.streams import connect_via_relay

    if role == "relay":
        listen = [multiaddr.Multiaddr(f"/ip4/0.0.0.0/tcp/{RELAY_PORT}")]
    else:
        listen = [
            multiaddr.Multiaddr(f"/ip4/0.0.0.0/tcp/{LISTEN_PORT}"),
            multiaddr.Multiaddr(f"/ip4/0.0.0.0/udp/{LISTEN_PORT}/quic-v1"),
        ]
    host = build_host(create_new_key_pair(), listen_addrs=listen)

    async def echo(stream: Any) -> None:
        data = await stream.read(64)
        await stream.write(data)
        await stream.close()

    host.set_stream_handler(TProtocol(ECHO), echo)
    async with host.run(listen), trio.open_nursery() as nursery:
        if role == "relay":
            await nursery.start(RelayService(host, RelaySettings(), serve_hop=True).run)
            _emit({"id": str(host.get_id())})
            await trio.sleep_forever()
        relay_info = info_from_p2p_addr(multiaddr.Multiaddr(args[0]))
        punch = await nursery.start(HolePunchService(host).run)
        if role == "home-b":
            settings = RelaySettings(static_relays=(args[0],), min_relays=1)
            relay = RelayService(host, settings, serve_hop=False, wants_reservations=lambda: True)
            await nursery.start(relay.run)
            with trio.fail_after(20):
                while not relay.relayed_addrs():
                    await trio.sleep(0.05)
            _emit({"id": str(host.get_id()), "circuit": f"{relay.relayed_addrs()[0]}/p2p/{host.get_id()}"})
            await trio.sleep_forever()
        # home-a: reach B through the relay, then wait for the punch (B starts it)
        relay = RelayService(host, RelaySettings(), serve_hop=False, on_relayed_dial=punch.relayed_dial)
        await nursery.start(relay.run)
        await host.connect(relay_info)
        circuit = multiaddr.Multiaddr(args[1])
        b_id = ID.from_base58(args[1].rsplit("/p2p/", 1)[1])
        await connect_via_relay(host, b_id, [circuit])
        relayed_first = punch.path_to(b_id) == "relayed"
        with trio.move_on_after(PUNCH_WAIT_S):
            while punch.counts["direct"] + punch.counts["failed"] < 1 or punch.direct_transport(b_id) is None:
                if punch.counts["failed"] and not punch.counts["direct"]:
                    break
                await trio.sleep(0.05)
        transport = punch.direct_transport(b_id)
        reply = ""
        if transport is not None:
            stream = await host.new_stream(b_id, [TProtocol(ECHO)])
            await stream.write(f"over {transport}".encode())
            reply = (await stream.read(64)).decode()
            await stream.close()
        _emit(
            {
                "relayed_first": relayed_first,
                "punched": punch.punched(b_id),
                "path": punch.path_to(b_id),
                "transport": transport,
                "direct_addrs": punch._direct_addrs(b_id) or [],
                "counts": punch.counts,
                "echo": reply,
            }
        )
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(_peer, sys.argv[1], sys.argv[2:])
