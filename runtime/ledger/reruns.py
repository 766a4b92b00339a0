"""An arbiter's re-runs of lease dispute cases (``protocols.machines.dispute.lease_rerun_verdict``).

Each re-run it grants is written here before it runs: the lease's count of re-runs, and the asking
peer's re-run with its time, so an arbiter that restarts does not grant each lease (nor each peer) its
re-runs again (``protocols.lease.arbiter.DisputeRole``, which keeps them in memory too and reads them
back at its first case). Bounded as the arbiter's memory is: the ``max_leases`` leases re-run most
recently, and of the ``max_peers`` peers that asked most recently, at most ``per_peer`` re-runs each
within the window. The rule is ``protocols/machines/dispute.py``; this is storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.ledger.store import LedgerStore


@dataclass(frozen=True)
class Bounds:
    window_s: int  # a peer's re-runs older than this are forgotten
    max_leases: int
    max_peers: int
    per_peer: int


@dataclass(frozen=True)
class Reruns:
    leases: list[tuple[str, int]]  # (lease id, re-runs), the least recently re-run first
    peers: list[tuple[str, int]]  # (peer, seconds ago) of each re-run within the window, the oldest first


def count(store: LedgerStore, lease_id: str, peer: str, reruns: int, bounds: Bounds) -> None:
    """Write a re-run granted (blocking): the lease's count is now ``reruns``, the peer asked one now;
    what is past the bounds goes."""
    now = store._clock()
    with store._tx() as conn:
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM dispute_reruns").fetchone()[0]
        conn.execute(
            "INSERT INTO dispute_reruns (lease_id, reruns, seq) VALUES (?, ?, ?)"
            " ON CONFLICT (lease_id) DO UPDATE SET reruns = excluded.reruns, seq = excluded.seq",
            (lease_id, reruns, seq),
        )
        conn.execute(
            "DELETE FROM dispute_reruns WHERE lease_id NOT IN"
            " (SELECT lease_id FROM dispute_reruns ORDER BY seq DESC LIMIT ?)",
            (bounds.max_leases,),
        )
        conn.execute("INSERT INTO dispute_rerun_peers (peer, at) VALUES (?, ?)", (peer, now))
        conn.execute("DELETE FROM dispute_rerun_peers WHERE at <= ?", (now - bounds.window_s,))
        conn.execute(
            "DELETE FROM dispute_rerun_peers WHERE peer = ? AND rowid NOT IN"
            " (SELECT rowid FROM dispute_rerun_peers WHERE peer = ? ORDER BY rowid DESC LIMIT ?)",
            (peer, peer, bounds.per_peer),
        )
        conn.execute(
            "DELETE FROM dispute_rerun_peers WHERE peer NOT IN (SELECT peer FROM dispute_rerun_peers"
            " GROUP BY peer ORDER BY MAX(rowid) DESC LIMIT ?)",
            (bounds.max_peers,),
        )


def load(store: LedgerStore, bounds: Bounds) -> Reruns:
    """The kept re-runs (blocking): each lease's count, each peer's re-runs within the window."""
    now = store._clock()
    with store._read() as conn:
        leases = conn.execute(
            "SELECT lease_id, reruns FROM (SELECT lease_id, reruns, seq FROM dispute_reruns"
            " ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            (bounds.max_leases,),
        ).fetchall()
        peers = conn.execute(
            "SELECT peer, ? - at FROM dispute_rerun_peers WHERE at > ? ORDER BY rowid LIMIT ?",
            (now, now - bounds.window_s, bounds.max_peers * bounds.per_peer),
        ).fetchall()
    return Reruns([(lease_id, int(n)) for lease_id, n in leases], [(peer, max(0, int(ago))) for peer, ago in peers])
