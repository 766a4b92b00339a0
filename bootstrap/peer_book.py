"""Peers this node has met, kept across restarts so it can rejoin the network when
every bootstrap peer is gone.

Only public facts are stored (peer id, dialable addresses, when last seen): no
keys, unlike py-libp2p's SQLite peer store, which writes the private key in clear
and blocks the event loop. The file is rewritten atomically in a worker thread.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import trio
from pydantic import BaseModel, ValidationError

from runtime.files import save_quietly

PEER_BOOK_FILE = "peers.json"
MAX_PEERS_KEPT = 500


class PeerEntry(BaseModel):
    addrs: list[str]
    last_seen: float


class PeerBookFile(BaseModel):
    version: int = 1
    peers: dict[str, PeerEntry] = {}


class PeerBook:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._peers: dict[str, PeerEntry] = {}
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> PeerBook:
        return cls(data_dir / PEER_BOOK_FILE)

    def remember(self, peer_id: str, addrs: list[str], seen_at: float | None = None) -> None:
        dialable = [addr for addr in addrs if "/p2p-circuit" not in addr]
        if not dialable:
            return
        self._peers[peer_id] = PeerEntry(addrs=dialable, last_seen=time.time() if seen_at is None else seen_at)

    def forget(self, peer_id: str) -> None:
        self._peers.pop(peer_id, None)

    def most_recent(self, limit: int = 50) -> list[tuple[str, list[str]]]:
        ordered = sorted(self._peers.items(), key=lambda item: item[1].last_seen, reverse=True)
        return [(peer_id, entry.addrs) for peer_id, entry in ordered[:limit]]

    def __len__(self) -> int:
        return len(self._peers)

    def _load_blocking(self) -> None:
        try:
            data = PeerBookFile.model_validate(json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return
        except (ValueError, ValidationError):
            # A damaged peer book only costs us a slower start; bootstrap peers remain.
            return
        self._peers.update(data.peers)

    def _save_blocking(self) -> None:
        kept = dict(sorted(self._peers.items(), key=lambda item: item[1].last_seen, reverse=True)[:MAX_PEERS_KEPT])
        save_quietly(self.path, PeerBookFile(peers=kept).model_dump_json(indent=1))

    async def load(self) -> None:
        await trio.to_thread.run_sync(self._load_blocking, limiter=self._limiter)

    async def save(self) -> None:
        await trio.to_thread.run_sync(self._save_blocking, limiter=self._limiter)
