"""The order in which a peer's addresses are tried: py-libp2p dials only the first TCP one."""

from __future__ import annotations

import ipaddress

import multiaddr
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.peer.id import ID

from node.dial_order import in_dial_order, order_dials
from node.host import build_host

RELAY = "/ip4/203.0.113.2/tcp/4021/p2p/12D3KooWMYQ7di2VjiCnBbWg5jskqCseuuzTn6PCxp5WwfbWTqjb/p2p-circuit"
STORED = [  # the order a DHT answer and an identify might bring them
    "/ip4/192.168.7.10/tcp/4021",  # another home's LAN
    "/ip4/127.0.0.1/tcp/4021",
    RELAY,
    "/ip4/203.0.113.140/tcp/4021",  # its router, mapped (the harness's internet is a documentation range)
    "/ip4/192.168.1.20/tcp/4021",  # our own LAN
    "/ip4/81.2.69.5/tcp/4021",
    "/ip4/100.64.3.4/tcp/4021",  # carrier-grade NAT
]
EXPECTED = [
    "/ip4/192.168.1.20/tcp/4021",
    "/ip4/203.0.113.140/tcp/4021",
    "/ip4/81.2.69.5/tcp/4021",
    "/ip4/192.168.7.10/tcp/4021",
    "/ip4/100.64.3.4/tcp/4021",
    "/ip4/127.0.0.1/tcp/4021",
    RELAY,
]
OUR_LAN = [ipaddress.ip_network("192.168.1.0/24")]


def test_same_lan_then_public_then_other_lans_then_loopback_then_relays() -> None:
    ordered = in_dial_order([multiaddr.Multiaddr(a) for a in STORED], OUR_LAN)
    assert [str(a) for a in ordered] == EXPECTED


def test_the_host_peer_store_answers_in_dial_order() -> None:
    host = build_host(create_new_key_pair())
    order_dials(host, networks=lambda: list(OUR_LAN))  # as if this machine sat on 192.168.1.0/24
    peer = ID.from_base58("12D3KooWMYQ7di2VjiCnBbWg5jskqCseuuzTn6PCxp5WwfbWTqjb")
    host.get_peerstore().add_addrs(peer, [multiaddr.Multiaddr(a) for a in STORED], 60)
    assert [str(a) for a in host.get_peerstore().addrs(peer)] == EXPECTED


def test_an_ipv4_mapped_address_is_ranked_as_its_ipv4_address() -> None:
    """A dual-stack socket reports an IPv4 peer as ``::ffff:a.b.c.d``: on our LAN it is tried first, and a
    mapped loopback address after every other home's, not as another LAN's private address."""
    stored = ["/ip6/::ffff:127.0.0.1/tcp/4021", "/ip4/192.168.7.10/tcp/4021", "/ip6/::ffff:192.168.1.20/tcp/4021"]
    ordered = in_dial_order([multiaddr.Multiaddr(a) for a in stored], OUR_LAN)
    assert [str(a) for a in ordered] == [stored[2], stored[1], stored[0]]
