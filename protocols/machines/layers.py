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


NO_LAYER_SELLERS = "no_layer_sellers"  # no seller of the file's layers is left to place them on


@dataclass(frozen=True)
class SellerFacts:
    """A seller of a file's layers as the consumer sees it: found by discovery, or holding our lease."""

    peer: str
    price_per_token: int
    rtt_ms: float = 0.0
    held: bool = False  # we hold a live layer lease with it (its weights may be reused, no new lock)


def place_sellers(sellers: list[SellerFacts], *, lost: frozenset[str] | set[str], wanted: int) -> list[str] | Refusal:
    """The sellers a split model's layers go on, in layer order: up to ``wanted`` of them, never one
    that was lost under this model (its server died or stopped answering), those we already hold a
    lease with first, then cheaper, then nearer. One seller left is enough: it takes every layer."""
    usable = {s.peer: s for s in sellers if s.peer not in lost}
    if not usable or wanted < 1:
        return Refusal(ErrorCode.UNAVAILABLE, NO_LAYER_SELLERS, "no seller of this model's layers is left")
    ranked = sorted(usable.values(), key=lambda s: (not s.held, s.price_per_token, s.rtt_ms, s.peer))
    return [s.peer for s in ranked[:wanted]]
