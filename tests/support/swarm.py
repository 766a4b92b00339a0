"""N real libp2p hosts with the clawnode DHT, on loopback, inside one trio run."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost

from bootstrap.peer_book import PeerBook
from dht.protocol_id import use_kad_protocol_id
from dht.service import DhtService
from node.host import build_host

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


@dataclass
class SwarmNode:
    host: IHost
    dht: DhtService

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())

    @property
    def addrs(self) -> list[str]:
        return [str(addr) for addr in self.host.get_addrs()]


@asynccontextmanager
async def open_swarm(
    size: int, *, bootstrap_count: int = 2, refresh_interval_s: float = 3600.0
) -> AsyncIterator[list[SwarmNode]]:
    """Start ``size`` nodes; the first ``bootstrap_count`` are the others' bootstrap peers.

    Every node has joined (dialled its bootstrap peers and looked itself up) when
    the block starts.
    """
    use_kad_protocol_id()
    with tempfile.TemporaryDirectory(prefix="clawnode-swarm-") as scratch:
        async with AsyncExitStack() as stack:
            nodes: list[SwarmNode] = []
            for index in range(size):
                host = build_host(generate_new_ed25519_identity())
                await stack.enter_async_context(host.run(LOOPBACK))
                nursery = await stack.enter_async_context(trio.open_nursery())
                stack.callback(nursery.cancel_scope.cancel)
                bootstrap = [addr for node in nodes[:bootstrap_count] for addr in node.addrs[:1]]
                dht = DhtService(
                    host,
                    bootstrap_addrs=bootstrap,
                    peer_book=PeerBook(Path(scratch) / f"peers-{index}.json"),
                    refresh_interval_s=refresh_interval_s,
                )
                await nursery.start(dht.run)
                nodes.append(SwarmNode(host, dht))
            # Joins ran in the background while later nodes were added: wait for them
            # to settle, then let every node look itself up once more, now that the
            # whole swarm exists.
            async with trio.open_nursery() as refreshes:
                for node in nodes:
                    refreshes.start_soon(node.dht.refresh)
            yield nodes
