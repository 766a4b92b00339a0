"""Published addresses ranked by reachability (``nat.addresses.rank_addrs``) and where they are used:
identify answers per asking peer, the signed record, AutoNAT's questions."""

from __future__ import annotations

import socket

import multiaddr
import psutil
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.peer.peerinfo import PeerInfo

from nat.addresses import (
    DHT_CLIENT_BEFORE_VERDICT_S,
    AddressInputs,
    candidate_addrs,
    classify,
    looks_private,
    rank_addrs,
    record_addrs,
    serves_dht,
    sources_for,
    wants_relays,
)
from node.host import build_host

LAN = "/ip4/192.168.1.10/tcp/4021"
LOOP = "/ip4/127.0.0.1/tcp/4021"
PUBLIC = "/ip4/198.18.0.1/tcp/4021"  # not global, so "private" by is_public_ip; see below
WAN = "/ip4/203.0.113.7/tcp/4021"  # the harness' "internet" (documentation range): public
MAPPED = "/ip4/203.0.113.99/tcp/4021"
CIRCUIT = "/ip4/203.0.113.2/tcp/4021/p2p/12D3KooWRelay/p2p-circuit"


def test_a_private_node_on_0_0_0_0_publishes_relays_then_lan_and_no_loopback() -> None:
    ranked = rank_addrs(AddressInputs(listen=(LOOP, LAN), relayed=(CIRCUIT,), reachability="private"))
    assert ranked == [CIRCUIT, LAN]


def test_confirmed_first_and_an_unconfirmed_mapping_is_left_out() -> None:
    inputs = AddressInputs(listen=(LOOP, LAN), mapped=(MAPPED,), reachability="private", relayed=(CIRCUIT,))
    assert MAPPED not in rank_addrs(inputs)  # double NAT: the router's "external" address is unreachable
    confirmed = AddressInputs(listen=(LOOP, LAN), mapped=(), confirmed=(MAPPED,), reachability="public")
    assert rank_addrs(confirmed) == [MAPPED, LAN]


def test_loopback_for_a_loopback_asker_or_a_loopback_only_node() -> None:
    assert rank_addrs(AddressInputs(listen=(LOOP, LAN), asker_on_loopback=True)) == [LAN, LOOP]
    assert rank_addrs(AddressInputs(listen=(LOOP,))) == [LOOP]
    # A loopback-only node holding relays (tests): its loopback address stays with its circuits.
    assert rank_addrs(AddressInputs(listen=(LOOP,), relayed=(CIRCUIT,), reachability="private")) == [CIRCUIT, LOOP]


def test_a_node_with_no_public_address_reserves_relays_before_the_verdict() -> None:
    """A home node (0.0.0.0: loopback and a LAN or CGNAT address) takes relays at once; a node with a
    public address, a loopback-only one, or one AutoNAT found public waits; private always reserves."""
    cgnat = "/ip4/100.64.3.4/tcp/4021"
    for home in ((LOOP, LAN), (LAN,), (LOOP, cgnat), (LOOP, LAN, CIRCUIT)):
        assert looks_private(home) and wants_relays("unknown", home), home
    for other in ((LOOP, LAN, WAN), (WAN,), (LOOP,), (), ("/dns4/node.example/tcp/4021", LAN)):
        assert not wants_relays("unknown", other), other
    assert not wants_relays("public", (LOOP, LAN)), "dropped once AutoNAT says public"
    assert wants_relays("private", (LOOP, LAN, WAN)) and wants_relays("private", ())
    # Until the verdict, the relayed addresses come after every direct one.
    ranked = rank_addrs(AddressInputs(listen=(LOOP, LAN), relayed=(CIRCUIT,), reachability="unknown"))
    assert ranked == [LAN, CIRCUIT]


def test_a_home_node_queries_the_dht_without_serving_it_until_autonat_says_public() -> None:
    """Before the verdict a node with no public address of its own stays out of others' routing
    tables (they would dial its LAN address), for DHT_CLIENT_BEFORE_VERDICT_S at most."""
    home, public, loopback = (LOOP, LAN), (LOOP, LAN, WAN), (LOOP,)
    assert not serves_dht("unknown", home, waited_s=0.0)
    assert not serves_dht("unknown", home, waited_s=DHT_CLIENT_BEFORE_VERDICT_S - 0.1)
    assert serves_dht("unknown", home, waited_s=DHT_CLIENT_BEFORE_VERDICT_S)  # a LAN with no AutoNAT server
    assert serves_dht("unknown", public, waited_s=0.0) and serves_dht("unknown", loopback, waited_s=0.0)
    assert serves_dht("public", home, waited_s=0.0)  # a working UPnP mapping, confirmed
    assert not serves_dht("private", public, waited_s=3600.0)


def test_public_listen_before_lan_and_relayed_last_unless_private() -> None:
    assert rank_addrs(AddressInputs(listen=(LAN, WAN), relayed=(CIRCUIT,))) == [WAN, LAN, CIRCUIT]
    assert classify(PUBLIC) == "private" and classify(WAN) == "public" and classify(CIRCUIT) == "relayed"


_octet = st.integers(0, 255)
_ip4 = st.one_of(
    st.tuples(st.just(127), _octet, _octet, _octet),
    st.tuples(st.just(192), st.just(168), _octet, _octet),
    st.tuples(st.just(203), st.just(0), st.just(113), _octet),
    st.tuples(st.integers(1, 223), _octet, _octet, _octet),
).map(lambda t: ".".join(map(str, t)))
_tcp = st.builds(lambda ip, port: f"/ip4/{ip}/tcp/{port}", _ip4, st.integers(1, 65535))
_circuit = _tcp.map(lambda a: f"{a}/p2p/12D3KooWRelay/p2p-circuit")
_inputs = st.builds(
    AddressInputs,
    listen=st.lists(_tcp, max_size=6).map(tuple),
    mapped=st.lists(_tcp, max_size=2).map(tuple),
    confirmed=st.lists(_tcp, max_size=2).map(tuple),
    relayed=st.lists(_circuit, max_size=3).map(tuple),
    reachability=st.sampled_from(["public", "private", "unknown"]),
    asker_on_loopback=st.booleans(),
)


@given(_inputs)
def test_ranking_properties(inputs: AddressInputs) -> None:
    ranked = rank_addrs(inputs)
    assert len(ranked) == len(set(ranked))
    allowed = set(inputs.listen) | set(inputs.confirmed) | set(inputs.relayed)
    assert set(ranked) <= allowed  # an unconfirmed mapping is never published
    assert not set(inputs.mapped) - set(inputs.listen) - set(inputs.confirmed) & set(ranked)
    direct = [a for a in ranked if classify(a) not in ("loopback", "relayed")]
    if any(classify(a) == "loopback" for a in ranked):
        assert inputs.asker_on_loopback or not direct
        first = next(i for i, a in enumerate(ranked) if classify(a) == "loopback")
        assert all(classify(a) == "loopback" for a in ranked[first:])  # after everything else
    # Confirmed addresses (non-loopback) lead, in their order.
    lead = [a for a in dict.fromkeys(inputs.confirmed) if classify(a) in ("public", "private")]
    assert ranked[: len(lead)] == lead
    if inputs.reachability == "private":  # relayed right after confirmed, before any listen address
        relayed = list(dict.fromkeys(inputs.relayed))
        assert ranked[len(lead) : len(lead) + len(relayed)] == relayed
    # Every non-loopback listen address is published.
    assert {a for a in inputs.listen if classify(a) != "loopback"} <= set(ranked)


def _non_loopback_ipv4() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return str(addr.address)
    return None


async def test_identify_names_loopback_only_to_a_peer_on_loopback() -> None:
    """A node on 0.0.0.0 (the default): a peer that reached it over 127.0.0.1 learns 127.0.0.1 too, a
    peer that reached it on its interface address does not (it would dial itself there)."""
    own_ip = _non_loopback_ipv4()
    if own_ip is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    server = build_host(create_new_key_pair())
    near, far = build_host(create_new_key_pair()), build_host(create_new_key_pair())
    loopback = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with server.run([multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/0")]), near.run(loopback), far.run(loopback):
        port = int(str(server.get_transport_addrs()[0]).split("/tcp/")[1])
        assert not any("/127." in str(a) for a in server.get_addrs())
        assert record_addrs(server, []) == [str(a).split("/p2p/")[0] for a in server.get_addrs()]
        sid = server.get_id()
        await near.connect(PeerInfo(sid, [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")]))
        await far.connect(PeerInfo(sid, [multiaddr.Multiaddr(f"/ip4/{own_ip}/tcp/{port}")]))
        with trio.fail_after(10):  # identify's answer: the near peer learns our loopback address
            while not any("/127." in str(a) for a in near.get_peerstore().addrs(sid)):
                await trio.sleep(0.05)
        with trio.fail_after(10):  # the far peer's identify has been answered too
            while not far.get_peerstore().get_protocols(sid):
                await trio.sleep(0.05)
        far_addrs = [str(a) for a in far.get_peerstore().addrs(sid)]
        assert any(a.startswith(f"/ip4/{own_ip}/") for a in far_addrs)
        assert not any("/127." in a for a in far_addrs), far_addrs


async def test_autonat_asks_about_an_unconfirmed_mapping_that_is_not_published() -> None:
    mapped = "/ip4/203.0.113.99/tcp/4021"
    host = build_host(create_new_key_pair(), extra_addrs=lambda: [mapped])
    sources_for(host).confirmed = list  # AutoNAT runs and has confirmed nothing yet
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        assert not any(mapped in str(a) for a in host.get_addrs())
        assert mapped in candidate_addrs(host)
        sources_for(host).confirmed = lambda: [mapped]  # confirmed by two servers
        assert str(host.get_addrs()[0]).startswith(mapped)


async def test_a_dial_to_another_lans_address_is_one_bounded_attempt(autojump_clock: trio.testing.MockClock) -> None:
    """A peer known only by a private address outside our subnets (another home's LAN, where SYNs go
    unanswered) costs one dial of at most ``FOREIGN_LAN_DIAL_S``, not py-libp2p's four unbounded ones;
    the swarm's other dials (a relayed address beside it) are not held up."""
    from libp2p.network.exceptions import SwarmException

    from node.dial_order import FOREIGN_LAN_DIAL_S

    host = build_host(create_new_key_pair())
    network = host.get_network()
    attempts: list[str] = []

    async def unanswered(addr: multiaddr.Multiaddr, peer_id: object, source: object = None) -> object:
        attempts.append(str(addr))
        await trio.sleep_forever()

    network._dial_addr_single_attempt = unanswered  # type: ignore[attr-defined]
    peer = build_host(create_new_key_pair()).get_id()
    foreign = multiaddr.Multiaddr("/ip4/10.254.254.254/tcp/4021")  # in no subnet of this machine
    started = trio.current_time()
    with pytest.raises(SwarmException):
        await network._dial_with_retry(foreign, peer)  # type: ignore[attr-defined]
    assert attempts == [str(foreign)]
    assert trio.current_time() - started < FOREIGN_LAN_DIAL_S + 1
