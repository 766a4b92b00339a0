"""Who may open a layer tunnel: the pure rule behind ``/clawnode/layers/1.0.0``.

A tunnel carries a lease holder's ggml-rpc bytes to the RPC server the seller starts for that
lease (the client reconnects now and then: each connection is a tunnel of its own). It opens only
for the lease's own consumer, with the lease's access token, while the lease serves, within a bound
of tunnels per lease, and starts a server only within the seller's bound on live layer servers.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from protocols.machines.verdict import Refusal, Verdict
from runtime.errors import ErrorCode, Reason

TUNNEL_BUSY = "tunnel_busy"  # the lease has as many tunnels open as it may
LAYERS_BUSY = "layers_busy"  # the seller runs as many layer servers as it allows


@dataclass(frozen=True)
class LayerLeaseFacts:
    """What the seller knows of the lease a tunnel names."""

    consumer: str  # peer id
    token_sha256: str
    ends_at: float
    ended: bool = False
    tunnels: int = 0  # open now
    has_server: bool = False  # its RPC server runs


def tunnel_verdict(
    lease: LayerLeaseFacts | None,
    *,
    remote: str,
    token_sha256: str,
    now: float,
    max_tunnels: int,
    servers: int,
    max_servers: int,
) -> Verdict:
    """Admit a tunnel for ``remote`` presenting a token whose sha256 is ``token_sha256``, or say why not."""
    if (
        lease is None
        or lease.consumer != remote
        or not hmac.compare_digest(lease.token_sha256.encode(), token_sha256.encode())
    ):
        return Refusal(ErrorCode.NOT_FOUND, Reason.UNKNOWN_LEASE, "no such layer lease for this peer")
    if lease.ended:
        return Refusal(ErrorCode.FORBIDDEN, Reason.ENDED, "the layer lease has ended")
    if now >= lease.ends_at:
        return Refusal(ErrorCode.EXPIRED, Reason.EXPIRED, "the layer lease has expired")
    if lease.tunnels >= max_tunnels:
        return Refusal(ErrorCode.CONFLICT, TUNNEL_BUSY, "the layer lease has as many tunnels open as it may")
    if not lease.has_server and servers >= max_servers:
        return Refusal(ErrorCode.UNAVAILABLE, LAYERS_BUSY, "this node runs as many layer servers as it allows")
    return None


NO_LAYER_SELLERS = "no_layer_sellers"  # the sellers left cannot hold the file's layers between them


@dataclass(frozen=True)
class SellerFacts:
    """A seller of a file's layers as the consumer sees it: found by discovery, or holding our lease.
    ``layers`` and ``memory_mb`` are the capacity its record states (``layer_capacity``); None where
    the record states none: such a seller is passed over, never placed on."""

    peer: str
    price_per_token: int
    rtt_ms: float = 0.0
    held: bool = False  # we hold a live layer lease with it (its weights may be reused, no new lock)
    layers: int | None = None
    memory_mb: int | None = None


@dataclass(frozen=True)
class Seating:
    """One seller's part of a placement: the layers ``[start, end)`` it holds."""

    peer: str
    start: int
    end: int

    @property
    def count(self) -> int:
        return self.end - self.start


def seller_capacity(seller: SellerFacts, *, n_layers: int, layer_mb: float) -> int:
    """How many of the file's ``n_layers`` layers a seller can hold: at most the layers its record
    states, and as many layers of ``layer_mb`` each as its stated memory holds (``layer_mb`` 0: memory
    is not weighed). 0 where its record states no capacity."""
    if seller.layers is None or seller.memory_mb is None or seller.layers < 1 or seller.memory_mb < 0:
        return 0
    by_memory = n_layers if layer_mb <= 0 else int(seller.memory_mb // layer_mb)
    return max(0, min(seller.layers, by_memory, n_layers))


def place_sellers(
    sellers: list[SellerFacts],
    *,
    lost: frozenset[str] | set[str],
    wanted: int,
    n_layers: int,
    layer_mb: float = 0.0,
) -> list[Seating] | Refusal:
    """Which sellers a split model's ``n_layers`` layers go on and which layers each holds, in layer
    order: up to ``wanted`` sellers, never one that was lost under this model (its server died or
    stopped answering) or whose record states no usable capacity (``seller_capacity``); those we
    already hold a lease with first, then cheaper, then nearer, so long as the sellers taken can
    still hold every layer. Layers are given in proportion to each seller's capacity and never
    beyond it (a seller that holds 8 of 26 layers gets at most 8); one seller that holds them all
    is enough. Refused ``no_layer_sellers`` when the sellers left cannot hold the model."""
    if n_layers < 1 or wanted < 1:
        return Refusal(ErrorCode.UNAVAILABLE, NO_LAYER_SELLERS, "no seller of this model's layers is left")
    usable: dict[str, tuple[SellerFacts, int]] = {}
    for seller in sellers:
        capacity = seller_capacity(seller, n_layers=n_layers, layer_mb=layer_mb)
        if seller.peer in lost or capacity < 1:
            continue
        if seller.peer not in usable or capacity > usable[seller.peer][1]:
            usable[seller.peer] = (seller, capacity)
    ranked = sorted(usable.values(), key=lambda sc: (not sc[0].held, sc[0].price_per_token, sc[0].rtt_ms, sc[0].peer))
    taken: list[tuple[str, int]] = []
    held = 0
    for index, (seller, capacity) in enumerate(ranked):
        slots = wanted - len(taken)
        if slots < 1:
            break
        # Taken only if the slots left after it can still be filled to hold every layer.
        best_rest = sorted((c for _, c in ranked[index + 1 :]), reverse=True)[: slots - 1]
        if held + capacity + sum(best_rest) >= n_layers:
            taken.append((seller.peer, capacity))
            held += capacity
    if held < n_layers:
        return Refusal(
            ErrorCode.UNAVAILABLE, NO_LAYER_SELLERS, "the sellers of this model's layers left cannot hold it"
        )
    return _seated(taken, n_layers)


def _seated(taken: list[tuple[str, int]], n_layers: int) -> list[Seating]:
    """``n_layers`` in proportion to each capacity (largest remainders, ties to the better ranked),
    never beyond one: ``n * c / total <= c`` since the total holds every layer."""
    total = sum(capacity for _, capacity in taken)
    counts = [n_layers * capacity // total for _, capacity in taken]
    remainders = sorted(range(len(taken)), key=lambda i: (-(n_layers * taken[i][1] % total), i))
    for i in remainders[: n_layers - sum(counts)]:
        counts[i] += 1
    seats: list[Seating] = []
    start = 0
    for (peer, _), count in zip(taken, counts, strict=True):
        if count > 0:
            seats.append(Seating(peer, start, start + count))
            start += count
    return seats
