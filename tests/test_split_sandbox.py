"""The split model's processes and their sandbox (docs/split.md, "The seller's safety" and "The tensor
cache"): the seller's tensor cache stays within its bound in bytes."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.split.server import layer_cache_dir, prune_cache


def test_the_tensor_cache_keeps_within_its_bound_dropping_what_was_used_longest_ago(tmp_path: Path) -> None:
    # A seller's cache root: one folder per consumer, the bound over all of them.
    alice, bob = layer_cache_dir(tmp_path, "peerA"), layer_cache_dir(tmp_path, "peerB")
    assert alice != bob and alice.parent == bob.parent == tmp_path
    for folder in (alice, bob):
        folder.mkdir()
    files = {"newest": alice, "recent": bob, "old": alice, "oldest": bob}
    for age, (name, folder) in enumerate(files.items()):
        (folder / name).write_bytes(bytes(1000))
        os.utime(folder / name, (1_000_000 - age * 100, 1_000_000 - age * 100))

    def left() -> list[str]:
        return sorted(p.name for p in tmp_path.rglob("*") if p.is_file())

    assert prune_cache(tmp_path, 4000) == 4000
    assert left() == ["newest", "old", "oldest", "recent"]
    assert prune_cache(tmp_path, 2500) == 2000
    assert left() == ["newest", "recent"]
    assert prune_cache(alice, 0) == 0  # a running server keeps its own folder within the bound
    assert left() == ["recent"]
