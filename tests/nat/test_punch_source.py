"""Hole-punch dials leave from the listen port on the interface that routes to the peer, never from
loopback (py-libp2p bound them to the first advertised address: 127.0.0.1 with ``0.0.0.0``)."""

from __future__ import annotations

import socket

import multiaddr
import psutil
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

from nat.holepunch import _OneSidedDCUtR, punch_source, route_source_ip, tcp_listeners
from node.host import build_host


def test_a_wildcard_listener_binds_the_route_address() -> None:
    assert punch_source("203.0.113.5", "192.168.1.10", [("0.0.0.0", 4021)]) == ("192.168.1.10", 4021)


def test_never_loopback_for_a_peer_off_loopback() -> None:
    assert punch_source("203.0.113.5", "127.0.0.1", [("0.0.0.0", 4021)]) is None
    assert punch_source("203.0.113.5", "127.0.0.1", [("127.0.0.1", 4021)]) is None


def test_loopback_peers_get_loopback() -> None:
    assert punch_source("127.0.0.1", "127.0.0.1", [("0.0.0.0", 4021)]) == ("127.0.0.1", 4021)


def test_a_listener_on_the_route_address_wins_and_others_are_never_bound() -> None:
    listeners = [("10.0.0.2", 5000), ("192.168.1.10", 4021)]
    assert punch_source("203.0.113.5", "192.168.1.10", listeners) == ("192.168.1.10", 4021)
    # No listener covers the route address: an ephemeral port (the bind would fail).
    assert punch_source("203.0.113.5", "172.16.0.1", listeners) is None


def test_ipv6_wildcard() -> None:
    assert punch_source("2001:db8::1", "2001:db8::2", [("0.0.0.0", 4021), ("::", 4022)]) == ("2001:db8::2", 4022)
    assert punch_source("2001:db8::1", None, [("::", 4022)]) is None


_IP4 = st.ip_addresses(v=4).map(str)


@given(target=_IP4, route=st.one_of(st.none(), _IP4), port=st.integers(1, 65535), wildcard=st.booleans())
def test_the_source_is_the_route_address_or_nothing(target: str, route: str | None, port: int, wildcard: bool) -> None:
    listeners = [("0.0.0.0" if wildcard else (route or "10.9.9.9"), port)]
    source = punch_source(target, route, listeners)
    if source is not None:
        assert source == (route, port)
        assert not (route or "").startswith("127.") or target.startswith("127.")


def _non_loopback_ipv4() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return str(addr.address)
    return None


async def test_a_node_on_0_0_0_0_binds_its_listen_port_on_a_non_loopback_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both ends listen on 0.0.0.0 (the shipped default): the punch dial to the other's interface
    address is bound to our own non-loopback address and our real listen port, and connects."""
    own_ip = _non_loopback_ipv4()
    if own_ip is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    any_port = [multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/0")]
    a, b = build_host(create_new_key_pair()), build_host(create_new_key_pair())
    bound: list[tuple[str, int] | None] = []
    original = DCUtRProtocol._dial_peer

    async def spy(
        self: DCUtRProtocol,
        peer_id: ID,
        addr: multiaddr.Multiaddr,
        source: tuple[str, int] | None = None,
        as_responder: bool = False,
    ) -> None:
        bound.append(source)
        await original(self, peer_id, addr, source, as_responder)

    monkeypatch.setattr(DCUtRProtocol, "_dial_peer", spy)
    async with a.run(any_port), b.run(any_port):
        assert [ip for ip, _ in tcp_listeners(a)] == ["0.0.0.0"]
        a_port = tcp_listeners(a)[0][1]
        b_port = tcp_listeners(b)[0][1]
        assert not any("/127." in str(addr) for addr in a.get_addrs())  # nat.addresses: none for a non-loopback peer
        assert route_source_ip(own_ip) == own_ip
        protocol = _OneSidedDCUtR(a)
        target = multiaddr.Multiaddr(f"/ip4/{own_ip}/tcp/{b_port}")
        with trio.fail_after(10):
            await protocol._dial_peer(b.get_id(), target, ("127.0.0.1", a_port), False)
        assert bound == [(own_ip, a_port)]
        assert not bound[0][0].startswith("127.")  # type: ignore[index]
        with trio.fail_after(5):
            while not a.get_network().get_connections(b.get_id()):
                await trio.sleep(0.05)
