"""Split models this node runs itself: their layers leased from peers, the model in a worker (docs/split.md).

A split model is a GGUF file this node holds but does not load whole (config ``split.models``): the
token embeddings and the output head stay here, the transformer layers run on sellers of
``layers:<sha256>`` found through discovery. :class:`SplitRunner` places a model at its first
request: it asks ``protocols.machines.layers.place_sellers`` which sellers to use, opens (or reuses)
a layer lease with each, opens a tunnel per lease (``open_tunnel``, each tunnel's tokens counted for
the lease's receipts) and starts a :class:`runtime.split.worker.SplitWorker` over them. Later
requests reuse the placement.

When the worker ends under a request (``layer_seller_lost``) or stops hearing from its layers
(``layer_seller_stalled``), each seller is asked through its own tunnel whether its server still
answers (a ggml-rpc HELLO); those that do not are lost for this model: their lease is ended (the
seller claims what its receipts say, the rest is refunded) and the next request places the layers
anew without them, on the sellers left (one seller takes every layer) or new ones. The request
itself fails with a stable code; the router continues the answer from there (or falls back to a
whole-model provider).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from dht.discovery import DiscoveryQuery, ProviderResult
from protocols.lease.handler import LeaseMarket
from protocols.lease.layers import LocalTunnel, layer_capacity, layers_capability, market_counting, open_tunnel
from protocols.machines.layers import SellerFacts, place_sellers
from protocols.machines.lease import lease_fits
from protocols.machines.verdict import Refusal
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.models import ModelSpec
from runtime.split.layout import file_layers, shares_for
from runtime.split.meter import HELLO
from runtime.split.sandbox import bwrap_available
from runtime.split.worker import SELLER_LOST, SELLER_STALLED, SplitWorker
from runtime.verify.identity import file_sha256

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
LOST_FOR_S = 600.0  # a seller lost under a model is not placed on again for this long
MAX_LOST = 256
CLOSE_TIMEOUT_S = 10.0
RENEW_BEFORE_S = 30.0  # a layer lease is replaced when it would expire within this (or a tenth of its time)


@dataclass(frozen=True)
class SplitModel:
    """A model this node runs split: its name (``model:<name>``), its GGUF file and the file's sha256."""

    name: str
    path: Path
    sha256: str
    n_ctx: int = 2048
    n_threads: int | None = None
    n_layers: int = 0  # its transformer layers (0: unknown, the sellers' records say)
    layer_mb: float = 0.0  # its largest layer's weights, MB (0: memory is not weighed)


@dataclass
class Seat:
    """One seller's part of a placement: its lease, the layers it holds and its tunnel."""

    peer: str
    lease_id: str
    layers: tuple[int, int]  # [start, end)
    tunnel: LocalTunnel | None = None

    def tokens(self) -> int:
        """Tokens its layers ran through our tunnel so far (open connections included)."""
        return self.tunnel.tokens() if self.tunnel is not None else 0


@dataclass
class Placement:
    model: str
    seats: list[Seat]
    worker: SplitWorker | None = None
    done: trio.Event = field(default_factory=trio.Event)
    state: str = "loading"  # loading | running | lost | closed


def _resolved(spec: ModelSpec) -> SplitModel:
    """A [[models]] entry's file and its sha256 (blocking: a package may assemble its file, hashing reads it)."""
    path = spec.resolve_path()
    layers = file_layers(path)
    return SplitModel(
        spec.name,
        path,
        file_sha256(path),
        n_ctx=spec.n_ctx,
        n_threads=spec.n_threads,
        n_layers=layers.count if layers is not None else 0,
        layer_mb=layers.max_bytes / (1 << 20) if layers is not None else 0.0,
    )


async def answers(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Does the layer server behind a tunnel endpoint answer a ggml-rpc HELLO (a connection of its own)?"""
    host, port = endpoint.rsplit(":", 1)
    with trio.move_on_after(timeout_s):
        try:
            sock = await trio.open_tcp_stream(host, int(port))
        except OSError:
            return False
        try:
            await sock.send_all(struct.pack("<BQ", HELLO, 24) + bytes(24))
            got = 0
            while got < 8:
                chunk = await sock.receive_some(64)
                if not chunk:
                    return False
                got += len(chunk)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        finally:
            with trio.CancelScope(shield=True):
                await sock.aclose()
    return False


class SplitRunner:
    """Runs the node's split models over leased layers; the router asks it for ``model:<name>``."""

    def __init__(
        self,
        host: IHost,
        market: LeaseMarket,
        discover: Callable[[DiscoveryQuery], Awaitable[list[ProviderResult]]],
        models: list[SplitModel],
        *,
        specs: list[ModelSpec] | None = None,
        sellers: int = 2,
        prefer: bool = False,
        max_tries: int = 3,
        lease_units: int = 20_000,
        lease_duration_s: int = 3600,
        stall_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.market = market
        self.discover = discover
        self.models = {model.name: model for model in models}
        # [[models]] entries named in split.models: their file and its sha256 are found when it runs.
        self.specs = list(specs or [])
        self._ready = trio.Event()
        self.sellers = sellers
        self.prefer = prefer
        self.max_tries = max_tries
        self.lease_units = lease_units
        self.lease_duration_s = lease_duration_s
        self.stall_s = stall_s
        self.clock = clock
        self.placements: dict[str, Placement] = {}
        self._leases: dict[tuple[str, str], str] = {}  # (model, peer) -> our live layer lease
        self._lost: dict[tuple[str, str], float] = {}  # (model, peer) -> when it was lost
        self._locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None

    def holds(self, model: str) -> bool:
        return model in self.models or any(spec.name == model for spec in self.specs)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Holds the placements' tunnels and workers; they end with it, and its leases are ended."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                for spec in self.specs:
                    if spec.name not in self.models:
                        try:
                            self.models[spec.name] = await trio.to_thread.run_sync(_resolved, spec)
                        except (ClawnodeError, OSError) as error:
                            log.warning(
                                "split model %s cannot run: %s", spec.name, getattr(error, "message", "no file")
                            )
                self._ready.set()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.move_on_after(CLOSE_TIMEOUT_S) as cleanup:
                cleanup.shield = True
                await self._end_leases(list(self._leases.values()))
                self._leases.clear()

    def status(self) -> list[dict[str, Any]]:
        """Each split model's placement: which peer holds which layers, and the tokens each ran."""
        views = []
        for placement in self.placements.values():
            for seat in placement.seats:
                start, end = seat.layers
                views.append(
                    {
                        "model": placement.model,
                        "peer": seat.peer[-8:],
                        "lease_id": seat.lease_id[:12],
                        "layers": f"{start}-{end - 1}" if end > start else "none",
                        "tokens": seat.tokens(),
                        "state": placement.state,
                    }
                )
        return views

    async def chat(
        self, model: str, body: dict[str, Any], emit: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> dict[str, Any]:
        """Run a chat-completions body on the split model, its chunks to ``emit``; ``{"units", "detail"}``."""
        if not self.holds(model):
            raise ClawnodeError(ErrorCode.NOT_FOUND, f"this node runs no split model {model}")
        if self.specs:
            await self._ready.wait()
        spec = self.models.get(model)
        if spec is None:
            raise ClawnodeError(ErrorCode.NOT_FOUND, f"split model {model}: its file cannot be read")
        async with self._locks.setdefault(model, trio.Lock()):
            placement = await self._placed(spec)
        assert placement.worker is not None
        try:
            return await placement.worker.run(body, emit, stall_s=self.stall_s)
        except ClawnodeError as error:
            if error.reason in (SELLER_LOST, SELLER_STALLED):
                await self._blame(placement)
            raise

    async def _placed(self, spec: SplitModel) -> Placement:
        current = self.placements.get(spec.name)
        if current is not None and current.state == "running":
            if all(self._live_lease(spec.name, seat.peer) == seat.lease_id for seat in current.seats):
                return current
            # A lease runs out (budget or time): the model is placed again, on a new lease there.
            current.state = "closed"
            current.done.set()
        if self._nursery is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "the split runner is not running")
        capability = layers_capability(spec.sha256)
        found = [p for p in await self.discover(DiscoveryQuery(capability=capability)) if not p.is_self]  # type: ignore[call-arg]
        by_peer = {p.peer_id: p for p in found}
        facts = [self._seller_facts(spec, p) for p in by_peer.values()]
        # The model's layers from its file; a model known only by name takes what its sellers state.
        n_layers = spec.n_layers or min((f.layers for f in facts if f.layers), default=0)
        plan = place_sellers(
            facts, lost=self._lost_peers(spec.name), wanted=self.sellers, n_layers=n_layers, layer_mb=spec.layer_mb
        )
        if isinstance(plan, Refusal):
            raise plan.error()
        seats = []
        for seating in plan:
            lease_id = await self._lease(spec, by_peer[seating.peer])
            seats.append(Seat(seating.peer, lease_id, (seating.start, seating.end)))
        placement = Placement(spec.name, seats)
        self.placements[spec.name] = placement
        try:
            await self._nursery.start(self._hold, spec, placement)
        except ClawnodeError:
            placement.state = "lost"
            raise
        return placement

    async def _hold(
        self, spec: SplitModel, placement: Placement, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Opens the placement's tunnels and worker, and keeps them until the placement is done."""
        holder: list[SplitWorker] = []

        def clients() -> list[int]:
            return [holder[0].pid] if holder and holder[0].pid is not None else []

        tokens = []
        for seat in placement.seats:
            held = self.market.held.get(seat.lease_id)
            if held is None:
                raise ClawnodeError(ErrorCode.UNAVAILABLE, "a layer lease ended before its tunnel opened")
            tokens.append(held.token)
        shares = shares_for([seat.layers[1] - seat.layers[0] for seat in placement.seats])

        def make(endpoints: list[str] | None) -> SplitWorker:
            return SplitWorker(
                spec.path,
                endpoints=endpoints,
                listen=0 if endpoints else len(placement.seats),
                shares=shares,
                name=spec.name,
                n_ctx=spec.n_ctx,
                n_threads=spec.n_threads,
            )

        async with contextlib.AsyncExitStack() as stack:
            # Sandboxed, the worker listens in a network namespace of its own and hands the node its
            # listening sockets: each tunnel accepts on one, and the worker reaches nothing else.
            worker = make(None) if bwrap_available() else None
            listeners: list[trio.SocketListener | None] = [None] * len(placement.seats)
            if worker is not None:
                stack.push_async_callback(worker.aclose)
                holder.append(worker)
                listeners = list(await worker.start())
                for listener in listeners:
                    if listener is not None:
                        stack.push_async_callback(listener.aclose)
            for seat, token, listener in zip(placement.seats, tokens, listeners, strict=True):
                seat.tunnel = await stack.enter_async_context(
                    open_tunnel(
                        self.host,
                        ID.from_base58(seat.peer),
                        seat.lease_id,
                        token,
                        on_tokens=market_counting(self.market, seat.lease_id),
                        clients=clients,
                        listener=listener,
                    )
                )
            if worker is None:
                worker = make([seat.tunnel.endpoint for seat in placement.seats if seat.tunnel is not None])
                holder.append(worker)
            placement.worker = worker
            try:
                try:
                    await worker.load()
                except ClawnodeError:
                    await self._blame(placement)
                    raise
                placement.state = "running"
                log.info(
                    "split model %s placed: %s",
                    spec.name,
                    ", ".join(f"{s.peer[-8:]} layers {s.layers[0]}-{s.layers[1] - 1}" for s in placement.seats),
                )
                task_status.started()
                await placement.done.wait()
            finally:
                if placement.state in ("running", "loading"):
                    placement.state = "closed"
                await worker.aclose()

    async def _blame(self, placement: Placement) -> None:
        """After the worker was lost: the sellers whose server no longer answers through their tunnel
        are lost for this model and their leases ended; the placement is done. A placement already
        done (lost under another request, or closed to renew a lease: its tunnels are going) blames
        no one again."""
        if placement.state in ("lost", "closed"):
            placement.done.set()
            return
        placement.state = "lost"
        now = self.clock()
        # Each seller is asked at once: a silent one costs PROBE_TIMEOUT_S, once, not once per seller.
        answered: set[int] = set()

        async def probe(index: int, tunnel: LocalTunnel) -> None:
            if await answers(tunnel.endpoint):
                answered.add(index)

        async with trio.open_nursery() as nursery:
            for index, seat in enumerate(placement.seats):
                if seat.tunnel is not None:
                    nursery.start_soon(probe, index, seat.tunnel)
        lost: list[str] = []
        for index, seat in enumerate(placement.seats):
            if index in answered:
                continue
            log.info("layer seller %s of %s was lost", seat.peer[-8:], placement.model)
            self._lost[(placement.model, seat.peer)] = now
            while len(self._lost) > MAX_LOST:
                del self._lost[next(iter(self._lost))]
            if self._leases.get((placement.model, seat.peer)) == seat.lease_id:
                del self._leases[(placement.model, seat.peer)]
            lost.append(seat.lease_id)
        await self._end_leases(lost)
        placement.done.set()

    def _lost_peers(self, model: str) -> set[str]:
        now = self.clock()
        return {peer for (name, peer), at in self._lost.items() if name == model and now - at < LOST_FOR_S}

    def _live_lease(self, model: str, peer: str) -> str | None:
        """Our layer lease with ``peer`` for ``model`` while it can carry another request (by budget
        and by time, ``lease_fits``, as the router renews whole-model leases)."""
        lease_id = self._leases.get((model, peer))
        if lease_id is None:
            return None
        held = self.market.held.get(lease_id)
        if held is None or held.ended_reason is not None:
            return None
        fit = lease_fits(
            budget=held.grant.budget,
            price_per_unit=held.grant.price_per_unit,
            used_units=held.seen_units,
            reserved_units=0,
            need_units=max(1, self.lease_units // 8),
            expires_at=held.grant.expires_at,
            now=self.market.clock(),
            renew_before_s=min(RENEW_BEFORE_S, self.lease_duration_s / 10),
        )
        return lease_id if fit.ok else None

    async def _lease(self, spec: SplitModel, provider: ProviderResult) -> str:
        lease_id = self._live_lease(spec.name, provider.peer_id)
        if lease_id is not None:
            return lease_id
        spent = self._leases.pop((spec.name, provider.peer_id), None)
        if spent is not None:
            await self._end_lease(spent)  # its rest is refunded
        view = await self.market.open_lease(
            provider.peer_id,
            layers_capability(spec.sha256),
            budget=max(1, provider.price_per_unit) * self.lease_units,
            duration_s=self.lease_duration_s,
            expected_units=self.lease_units,
        )
        self._leases[(spec.name, provider.peer_id)] = view.lease_id
        return view.lease_id

    async def _end_leases(self, lease_ids: list[str]) -> None:
        """End each at once: a seller that does not answer holds its own revoke up to CLOSE_TIMEOUT_S,
        not the others' (and not past the shared deadline of ``run``'s cleanup)."""
        async with trio.open_nursery() as nursery:
            for lease_id in lease_ids:
                nursery.start_soon(self._end_lease, lease_id)

    async def _end_lease(self, lease_id: str) -> None:
        held = self.market.held.get(lease_id)
        if held is None or held.ended_reason is not None:
            return
        try:
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await self.market.revoke(lease_id)  # the seller claims what its receipts say; the rest is refunded
        except ClawnodeError as error:
            log.info("could not end the layer lease %s (%s)", lease_id[:12], error.code)

    def _seller_facts(self, spec: SplitModel, provider: ProviderResult) -> SellerFacts:
        """What ``place_sellers`` weighs of a seller: its price, distance, our lease and the capacity
        its record states (none stated: it is passed over)."""
        descriptor = provider.record.capability(provider.capability)
        capacity = layer_capacity(descriptor.params_schema) if descriptor is not None else None
        return SellerFacts(
            provider.peer_id,
            provider.price_per_unit,
            provider.rtt_ms,
            held=self._live_lease(spec.name, provider.peer_id) is not None,
            layers=capacity[0] if capacity is not None else None,
            memory_mb=capacity[1] if capacity is not None else None,
        )


__all__ = ["Placement", "Seat", "SplitModel", "SplitRunner", "answers"]
