"""An arbiter's re-runs kept in its ledger (runtime/ledger/reruns.py): read back after a restart, bounded
as the arbiter's memory is."""

from __future__ import annotations

from pathlib import Path

from runtime.ledger import reruns
from runtime.ledger.store import LedgerStore


def test_re_runs_are_read_back_after_a_reopen_and_bounded(tmp_path: Path) -> None:
    now = [1000]
    path = tmp_path / "ledger.sqlite"
    store = LedgerStore.open(path, clock=lambda: now[0])
    bounds = reruns.Bounds(window_s=100, max_leases=2, max_peers=2, per_peer=2)
    reruns.count(store, "l1", "p1", 1, bounds)
    reruns.count(store, "l1", "p1", 2, bounds)
    now[0] += 10
    reruns.count(store, "l2", "p2", 1, bounds)
    store.close()
    store = LedgerStore.open(path, clock=lambda: now[0])  # a restart: the counts are still there
    kept = reruns.load(store, bounds)
    assert kept.leases == [("l1", 2), ("l2", 1)]
    assert kept.peers == [("p1", 10), ("p1", 10), ("p2", 0)]
    reruns.count(store, "l3", "p3", 1, bounds)  # the least recently re-run lease and peer go
    reruns.count(store, "l2", "p2", 2, bounds)
    reruns.count(store, "l2", "p2", 3, bounds)  # at most per_peer of one peer's re-runs are kept
    kept = reruns.load(store, bounds)
    assert kept.leases == [("l3", 1), ("l2", 3)]
    assert kept.peers == [("p3", 0), ("p2", 0), ("p2", 0)]
    now[0] += 100  # past the window: a peer's re-runs no longer count, a lease's always do
    assert reruns.load(store, bounds) == reruns.Reruns([("l3", 1), ("l2", 3)], [])
    store.close()
