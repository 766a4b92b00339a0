"""Replay protection for capability records: the highest sequence number seen per peer.

A record is signed by its peer, so nobody can forge a newer one; but anyone holding an older,
still unexpired record can serve it again (an offline provider's earlier price, say) to a node
that only asks the DHT. Every record this node accepts, from any path (a live answer from the peer,
the DHT, a PUT_VALUE), raises the peer's mark here; a record older than the mark is refused and
counted as ``stale_sequence``. The marks are kept in ``record_seqs.json`` in the data dir, so a
node that restarts still knows them (newest :data:`MAX_PEERS_KEPT` peers).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from pydantic import BaseModel, Field, ValidationError

from dht.records import Rejection
from runtime.files import save_quietly

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

SEQ_BOOK_FILE = "record_seqs.json"
MAX_PEERS_KEPT = 10_000
SAVE_INTERVAL_S = 5.0


def replay_verdict(seq: int, highest_seen: int | None) -> Rejection | None:
    """Refuse a record older than the newest one seen from its peer (the same one again is fine)."""
    if highest_seen is not None and seq < highest_seen:
        return Rejection.STALE_SEQUENCE
    return None


class SeqMark(BaseModel):
    seq: int = Field(ge=0)
    seen_at: float


class SeqBookFile(BaseModel):
    version: int = 1
    peers: dict[str, SeqMark] = {}


class SeqBook:
    """Peer id → the highest record sequence accepted from it. ``path`` None: kept in memory only."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._marks: dict[str, SeqMark] = {}
        self._dirty = False
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> SeqBook:
        return cls(data_dir / SEQ_BOOK_FILE)

    def highest(self, peer_id: str) -> int | None:
        mark = self._marks.get(peer_id)
        return mark.seq if mark is not None else None

    def verdict(self, peer_id: str, seq: int) -> Rejection | None:
        return replay_verdict(seq, self.highest(peer_id))

    def note(self, peer_id: str, seq: int) -> None:
        """Raise the peer's mark to ``seq`` (an older ``seq`` changes nothing)."""
        mark = self._marks.get(peer_id)
        if mark is None or seq > mark.seq:
            self._marks[peer_id] = SeqMark(seq=seq, seen_at=time.time())
            self._dirty = True
            if len(self._marks) > 2 * MAX_PEERS_KEPT:
                # Bounded in memory too (a book with no file is never saved, so never trimmed there).
                self._marks = self._newest()

    def _newest(self) -> dict[str, SeqMark]:
        """The marks of the :data:`MAX_PEERS_KEPT` peers seen most recently."""
        return dict(sorted(self._marks.items(), key=lambda item: item[1].seen_at, reverse=True)[:MAX_PEERS_KEPT])

    def __len__(self) -> int:
        return len(self._marks)

    def _load_blocking(self) -> None:
        if self.path is None:
            return
        try:
            data = SeqBookFile.model_validate(json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return
        except (ValueError, ValidationError):
            log.warning("%s is damaged; record sequence marks start empty", SEQ_BOOK_FILE)
            return
        for peer_id, mark in data.peers.items():
            self.note(peer_id, mark.seq)
        self._dirty = False

    def _save_blocking(self, text: str) -> None:
        if self.path is not None:
            save_quietly(self.path, text)

    async def load(self) -> None:
        await trio.to_thread.run_sync(self._load_blocking, limiter=self._limiter)

    async def save(self) -> None:
        if not self._dirty or self.path is None:
            return
        kept = self._newest()
        self._marks, self._dirty = kept, False
        await trio.to_thread.run_sync(
            self._save_blocking, SeqBookFile(peers=kept).model_dump_json(), limiter=self._limiter
        )

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write the marks every few seconds while they change, and once more on the way out."""
        task_status.started()
        try:
            while True:
                await trio.sleep(SAVE_INTERVAL_S)
                await self.save()
        finally:
            with trio.CancelScope(shield=True):
                await self.save()
