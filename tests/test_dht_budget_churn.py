"""A node under a connection budget does not dial peers only for its budget to close them again (issue 23).

py-libp2p's auto-connector aimed at 158 connections and ran again on every disconnect, so a node with
a budget that knew more peers than its budget (every DHT node does) dialed them, closed them as over
budget, and dialed the next ones: an idle 200-node swarm spent most of its CPU on handshakes and DHT
lookups ran out of time (bench/dht_swarm.py). Real hosts over loopback.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost, INetConn, INetwork
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from nat.notifee import QuietNotifee
from node.conn_budget import budget_of
from node.host import build_host

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


def _connected(host: IHost) -> set[ID]:
    return {conn.muxed_conn.peer_id for conn in host.get_network().get_connections() if not conn.is_closed}


class _Met(QuietNotifee):
    def __init__(self) -> None:
        self.peers: list[ID] = []

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self.peers.append(conn.muxed_conn.peer_id)


async def test_a_node_at_its_budget_does_not_dial_the_peers_it_knows_only_to_close_them() -> None:
    node = build_host(generate_new_ed25519_identity(), connection_budget=3)
    peers = [build_host(generate_new_ed25519_identity()) for _ in range(10)]
    budget = budget_of(node)
    assert budget is not None
    budget.grace_s = 0.5
    met = _Met()
    node.get_network().register_notifee(met)
    async with AsyncExitStack() as stack:
        for host in [node, *peers]:
            await stack.enter_async_context(host.run(LOOPBACK))
        peerstore = node.get_peerstore()
        for peer in peers:  # known, as a DHT lookup leaves the peers it met
            peerstore.add_addrs(peer.get_id(), peer.get_addrs(), 3600)
        first = peers[:4]
        for peer in first:  # one more than the budget: a close, and the disconnect it causes
            await node.connect(PeerInfo(peer.get_id(), peer.get_addrs()))
        # The auto-connector's round after that disconnect, its dials' grace, the trims after them.
        await trio.sleep(3.0)
        closed, held = budget.closed, len(_connected(node))
    asked = {peer.get_id() for peer in first}
    unasked = [peer_id for peer_id in met.peers if peer_id not in asked]
    assert not unasked, f"dialed {len(unasked)} peers nobody asked for; the budget closed {closed}"
    assert closed == 1
    assert held == 3
