"""The peer book keeps peers across restarts, keeps no keys, and survives damage."""

from __future__ import annotations

from pathlib import Path

from bootstrap.peer_book import MAX_PEERS_KEPT, PeerBook


async def test_peers_survive_a_restart_newest_first(tmp_path: Path) -> None:
    book = PeerBook(tmp_path / "peers.json")
    book.remember("old", ["/ip4/127.0.0.1/tcp/1"], seen_at=1.0)
    book.remember("new", ["/ip4/127.0.0.1/tcp/2"], seen_at=2.0)
    book.remember("relayed-only", ["/ip4/127.0.0.1/tcp/3/p2p/x/p2p-circuit"], seen_at=3.0)
    await book.save()
    reloaded = PeerBook(tmp_path / "peers.json")
    await reloaded.load()
    assert reloaded.most_recent() == [("new", ["/ip4/127.0.0.1/tcp/2"]), ("old", ["/ip4/127.0.0.1/tcp/1"])]


async def test_a_damaged_file_costs_the_peers_not_the_start(tmp_path: Path) -> None:
    (tmp_path / "peers.json").write_text("{not json")
    book = PeerBook(tmp_path / "peers.json")
    await book.load()
    assert len(book) == 0


async def test_only_the_most_recent_peers_are_kept(tmp_path: Path) -> None:
    book = PeerBook(tmp_path / "peers.json")
    for index in range(MAX_PEERS_KEPT + 10):
        book.remember(f"peer-{index}", ["/ip4/127.0.0.1/tcp/1"], seen_at=float(index))
    await book.save()
    reloaded = PeerBook(tmp_path / "peers.json")
    await reloaded.load()
    assert len(reloaded) == MAX_PEERS_KEPT
    assert reloaded.most_recent(1)[0][0] == f"peer-{MAX_PEERS_KEPT + 9}"
