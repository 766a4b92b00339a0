"""Which of a peer's addresses py-libp2p dials: the one most likely to answer from here.

py-libp2p 0.8.1's swarm dials **one** TCP address per peer, the first its peer store lists, and the
peer store keeps addresses in the order they arrived. The first one a DHT answer or an identify
brings is often the peer's LAN address (it listened there before it learned its public one), so a
node in another home waited out a dial timeout per peer: in the NAT matrix a `describe` after
twenty cases took over 60 s, most of it dials to other homes' 192.168.x.x. The peer store's
``addrs()`` now answers in this order, stable within each class:

0. an address in one of our own subnets (the same LAN: the shortest path),
1. a public address (or a DNS name; the documentation ranges count, as the NAT harness's internet),
2. any other private, CGNAT or link-local address (another LAN: rarely reachable),
3. loopback (only this machine),
4. a relayed ``/p2p-circuit`` address (the swarm dials those last anyway).

A dial to an address of class 2 (a private address in none of our subnets) gets one attempt of at
most ``FOREIGN_LAN_DIAL_S`` instead of py-libp2p's four attempts without a time limit: such an
address is usually another home's LAN, where a SYN is dropped without an answer, and a private node
is known by its LAN address (identify, DHT answers) before its relayed address is; the swarm's
parallel dial of a relayed address beside it then decides. On a routed private network (a VPN, an
office) a connect answers well within the bound.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence

import multiaddr
import psutil
import trio
from libp2p.abc import IHost
from libp2p.network.exceptions import SwarmException

from nat.addresses import is_public_ip, parse_ip
from nat.relay import is_circuit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
SAME_LAN, PUBLIC, OTHER_PRIVATE, LOOPBACK, RELAYED = range(5)
FOREIGN_LAN_DIAL_S = 2.0


def own_networks() -> list[Network]:
    """The subnets of this machine's interfaces (loopback left out: it is its own class)."""
    found: list[Network] = []
    for interface_addrs in psutil.net_if_addrs().values():
        for addr in interface_addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6) or not addr.netmask:
                continue
            try:
                network = ipaddress.ip_network(f"{addr.address.split('%')[0]}/{addr.netmask}", strict=False)
            except ValueError:
                continue
            if not network.network_address.is_loopback:
                found.append(network)
    return found


def dial_class(addr: multiaddr.Multiaddr | str, networks: Sequence[Network]) -> int:
    text = str(addr)
    if is_circuit(text):
        return RELAYED
    parts = text.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return PUBLIC  # dns4/dns6/dnsaddr: resolved by whoever published it for others to use
    ip = parse_ip(parts[2])  # an IPv4-mapped IPv6 address is judged as its IPv4 address
    if ip is None:
        return OTHER_PRIVATE
    if ip.is_loopback:
        return LOOPBACK
    if any(ip.version == network.version and ip in network for network in networks):
        return SAME_LAN
    if is_public_ip(str(ip)):
        return PUBLIC
    return OTHER_PRIVATE


def in_dial_order(addrs: Sequence[multiaddr.Multiaddr], networks: Sequence[Network]) -> list[multiaddr.Multiaddr]:
    return sorted(addrs, key=lambda addr: dial_class(addr, networks))


def order_dials(host: IHost, networks: Callable[[], list[Network]] = own_networks) -> None:
    """Make the host's peer store list every peer's addresses in dial order."""
    peerstore = host.get_peerstore()
    stored = peerstore.addrs
    subnets = networks()

    def addrs_in_dial_order(peer_id: object) -> list[multiaddr.Multiaddr]:
        return in_dial_order(stored(peer_id), subnets)  # type: ignore[arg-type]

    peerstore.addrs = addrs_in_dial_order  # type: ignore[method-assign, assignment]

    network = host.get_network()
    dial_with_retry = getattr(network, "_dial_with_retry", None)
    if dial_with_retry is None or not hasattr(network, "_dial_addr_single_attempt"):
        return  # another py-libp2p: left as it is

    async def dial_bounded(addr: multiaddr.Multiaddr, peer_id: object, source: object = None) -> object:
        if source is not None or dial_class(addr, subnets) != OTHER_PRIVATE:
            return await dial_with_retry(addr, peer_id, source)
        with trio.move_on_after(FOREIGN_LAN_DIAL_S):
            return await network._dial_addr_single_attempt(addr, peer_id)  # type: ignore[attr-defined]
        raise SwarmException(f"no answer from {addr} within {FOREIGN_LAN_DIAL_S:.0f} s (another LAN)")

    network._dial_with_retry = dial_bounded  # type: ignore[attr-defined]
