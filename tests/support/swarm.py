"""N real libp2p hosts with the clawnode DHT and capability services, on loopback,
inside one trio run (``open_swarm``), or a share of them per process (``open_nodes``)."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.records.validator import Validator

from bootstrap.peer_book import PeerBook
from dht.discovery import Discovery
from dht.offers import Offer
from dht.protocol_id import use_kad_protocol_id
from dht.publisher import CapabilityPublisher
from dht.record_validator import RECORD_NAMESPACE, CapabilityRecordValidator, RejectionCounter
from dht.records import CapabilityRecord, Hardware, Reachability, bind_wallet
from dht.seq_book import SeqBook
from dht.service import DhtService
from node.host import build_host

if TYPE_CHECKING:
    from trio_typing import TaskStatus

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
DEFAULT_HARDWARE = Hardware(cores=2, ram_mb=4096)
# Generous: 30 joins on a loaded 2-core machine take up to a minute.
JOIN_DEADLINE_S = 180


class AnyValueValidator(Validator):
    """Accepts anything under its namespace: for tests that store plain values."""

    def validate(self, key: str, value: bytes) -> None:
        return None

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


@dataclass
class SwarmNode:
    key_pair: KeyPair
    host: IHost
    dht: DhtService
    publisher: CapabilityPublisher
    discovery: Discovery
    rejections: RejectionCounter
    seq_book: SeqBook

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())

    @property
    def addrs(self) -> list[str]:
        return [str(addr) for addr in self.host.get_addrs()]


@dataclass(frozen=True)
class NodeSpec:
    offers: tuple[Offer, ...] = ()
    hardware: Hardware = DEFAULT_HARDWARE
    reachability: Reachability = "public"


def _constant(reachability: Reachability) -> Callable[[], Reachability]:
    return lambda: reachability


def _record_of(publisher: CapabilityPublisher) -> Callable[[], CapabilityRecord | None]:
    return lambda: publisher.record


async def _run_node(
    spec: NodeSpec,
    bootstrap: list[str],
    peer_book_path: Path,
    refresh_interval_s: float,
    record_ttl_s: int,
    cache_ttl_s: float,
    connection_budget: int | None,
    *,
    task_status: TaskStatus[SwarmNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    key_pair = generate_new_ed25519_identity()
    host = build_host(key_pair, connection_budget=connection_budget)
    async with host.run(LOOPBACK), trio.open_nursery() as nursery:
        rejections = RejectionCounter()
        seq_book = SeqBook()  # shared by the validator and discovery, as in the daemon
        dht = DhtService(
            host,
            bootstrap_addrs=bootstrap,
            peer_book=PeerBook(peer_book_path),
            refresh_interval_s=refresh_interval_s,
            validators={"clawtest": AnyValueValidator()},
        )
        dht.add_validator(
            RECORD_NAMESPACE, CapabilityRecordValidator(rejections, held_value=dht.held_value, seq_book=seq_book)
        )
        await nursery.start(dht.run)
        publisher = CapabilityPublisher(
            host,
            dht,
            key_pair.private_key,
            wallet=bind_wallet(secrets.token_bytes(32), str(host.get_id())),
            hardware=spec.hardware,
            offers=list(spec.offers),
            record_ttl_s=record_ttl_s,
            reachability=_constant(spec.reachability),
        )
        await nursery.start(publisher.run)
        discovery = Discovery(host, dht, rejections, _record_of(publisher), cache_ttl_s=cache_ttl_s, seq_book=seq_book)
        task_status.started(SwarmNode(key_pair, host, dht, publisher, discovery, rejections, seq_book))
        await trio.sleep_forever()


@asynccontextmanager
async def open_swarm(
    size: int,
    *,
    bootstrap_count: int = 2,
    refresh_interval_s: float = 3600.0,
    specs: Mapping[int, NodeSpec] | None = None,
    record_ttl_s: int = 600,
    cache_ttl_s: float = 0.0,
    connection_budget: int | None = None,
) -> AsyncIterator[list[SwarmNode]]:
    """Start ``size`` nodes; the first ``bootstrap_count`` are the others' bootstrap peers.

    ``specs`` gives some nodes offers, hardware and reachability; the rest offer
    nothing. Every node has joined and published when the block starts. ``connection_budget``: each
    node keeps about that many connections (``node.conn_budget``).
    """
    with tempfile.TemporaryDirectory(prefix="clawnode-swarm-") as scratch:
        async with open_nodes(
            range(size),
            Path(scratch),
            bootstrap_count=bootstrap_count,
            refresh_interval_s=refresh_interval_s,
            specs=specs,
            record_ttl_s=record_ttl_s,
            cache_ttl_s=cache_ttl_s,
            connection_budget=connection_budget,
        ) as nodes:
            # Early joiners met only a few peers: once the whole swarm exists, every node runs its
            # periodic refresh once, then publishes once more so provider records reach the final
            # closest peers.
            await refresh_nodes(nodes)
            await publish_offers(nodes)
            yield nodes


@asynccontextmanager
async def open_nodes(
    indices: Iterable[int],
    scratch: Path,
    *,
    bootstrap: Sequence[str] = (),
    bootstrap_count: int = 0,
    refresh_interval_s: float = 3600.0,
    specs: Mapping[int, NodeSpec] | None = None,
    record_ttl_s: int = 600,
    cache_ttl_s: float = 0.0,
    connection_budget: int | None = None,
    join_deadline_s: float = JOIN_DEADLINE_S,
) -> AsyncIterator[list[SwarmNode]]:
    """Start the nodes numbered ``indices`` one after another, as ``open_swarm`` does, and yield
    them once every one has joined (no refresh, no extra publish: ``refresh_nodes`` and
    ``publish_offers`` do those, for swarms split over several processes).

    Each node bootstraps from ``bootstrap`` and the first address of each of the first
    ``bootstrap_count`` nodes started here before it. ``specs`` is keyed by index; peer books go
    to ``scratch``. ``trio.TooSlowError`` when the joins take over ``join_deadline_s``.
    """
    use_kad_protocol_id()
    specs = specs or {}
    async with trio.open_nursery() as nursery:
        nodes: list[SwarmNode] = []
        for index in indices:
            addrs = list(bootstrap) + [addr for node in nodes[:bootstrap_count] for addr in node.addrs[:1]]
            run_node = partial(
                _run_node,
                specs.get(index, NodeSpec()),
                addrs,
                scratch / f"peers-{index}.json",
                refresh_interval_s,
                record_ttl_s,
                cache_ttl_s,
                connection_budget,
            )
            node = await nursery.start(run_node)
            nodes.append(node)
        # Joins ran in the background while later nodes were added: wait for them.
        with trio.fail_after(join_deadline_s):
            for node in nodes:
                await node.dht.joined.wait()
        try:
            yield nodes
        finally:
            nursery.cancel_scope.cancel()


async def refresh_nodes(nodes: Sequence[SwarmNode]) -> None:
    """Every node's periodic refresh, all at once."""
    async with trio.open_nursery() as refreshes:
        for node in nodes:
            refreshes.start_soon(node.dht.refresh)


async def publish_offers(nodes: Sequence[SwarmNode]) -> None:
    """Every node with offers publishes its record and provider announcements, all at once."""
    async with trio.open_nursery() as publishes:
        for node in nodes:
            if node.publisher.offers:
                publishes.start_soon(node.publisher.publish)
