"""The DHT validator for signed capability records under ``record_key(peer id)`` (and the legacy
``/clawnode/<peer-id>``).

py-libp2p keeps the value it already holds unless ``select()`` prefers the new
one, so ``select()`` picks the highest sequence number, and ``validate()``
refuses a value that is not newer than the one this node holds (a replay), or
older than the newest record this node has seen from that peer by any path
(:mod:`dht.seq_book`).

py-libp2p calls the validator synchronously on the trio thread (PUT_VALUE,
GET_VALUE answers, ``select()``): every schema a record carries is checked
for safety before anything is evaluated, patterns run on RE2 and evaluation
has a time budget (:mod:`dht.schema_safety`), so a hostile record costs
milliseconds at most. Nothing but :class:`RecordRejected` ever leaves it.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections import Counter
from collections.abc import Callable

from libp2p.records.validator import Validator

from dht.records import (
    RECORD_DOMAIN,
    RECORD_PAYLOAD_TYPE,
    CapabilityRecord,
    RecordRejected,
    Rejection,
    verify_record,
)
from dht.seq_book import SeqBook
from runtime.errors import ClawnodeError
from runtime.jsonsafe import loads_bounded
from wire.signed import SignatureError, open_sealed

RECORD_NAMESPACE = "clawnode"


# The part of a record key after the namespace: a base32 SHA-256 prefix of the peer id, so the whole
# key is 49 bytes. py-libp2p's DHT server resets a FIND_NODE whose key is over 50 bytes and not a
# multihash, and every other implementation's put/get starts with a FIND_NODE for the record key:
# ``/clawnode/<peer id>`` (62 bytes) never reached a clawnode node from js (issue 23), nor from
# clawnode itself (its own lookups for the key were refused by every peer).
_RECORD_DIGEST_BYTES = 24


def record_key(peer_id: str) -> str:
    """The DHT key of a peer's capability record: ``/clawnode/<base32 of sha256("clawnode-record:" +
    peer id)[:24]>`` (49 bytes). Anyone can compute it from the peer id (js: the same three steps)."""
    digest = hashlib.sha256(f"clawnode-record:{peer_id}".encode()).digest()[:_RECORD_DIGEST_BYTES]
    return f"/{RECORD_NAMESPACE}/{base64.b32encode(digest).decode().lower().rstrip('=')}"


def legacy_record_key(peer_id: str) -> str:
    """``/clawnode/<peer id>``: where releases before issue 23 stored the record. Still accepted and
    read, so records of peers running an older release are found until they upgrade."""
    return f"/{RECORD_NAMESPACE}/{peer_id}"


def is_key_of(key: str, peer_id: str) -> bool:
    """Whether ``key`` is where ``peer_id``'s record belongs (the key of now or the legacy one)."""
    return key in (record_key(peer_id), legacy_record_key(peer_id))


class RejectionCounter:
    """Counts dropped records by reason, for ``/api/status`` and the metrics."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def count(self, reason: Rejection) -> None:
        self._counts[reason.value] += 1

    def snapshot(self) -> dict[str, int]:
        return dict(self._counts)

    def total(self) -> int:
        return sum(self._counts.values())


def sequence_of(value: bytes) -> int | None:
    """The sequence number inside a sealed record, after checking only its envelope signature."""
    try:
        _, payload = open_sealed(value, domain=RECORD_DOMAIN, payload_type=RECORD_PAYLOAD_TYPE)
        seq = loads_bounded(payload, what="the record").get("seq")
    except (SignatureError, ValueError, AttributeError, RecursionError, TypeError, ClawnodeError):
        return None
    return seq if isinstance(seq, int) else None


class CapabilityRecordValidator(Validator):
    def __init__(
        self,
        rejections: RejectionCounter,
        held_value: Callable[[str], bytes | None] = lambda key: None,
        clock: Callable[[], float] = time.time,
        seq_book: SeqBook | None = None,
    ) -> None:
        self.rejections = rejections
        self._held_value = held_value
        self._clock = clock
        self.seq_book = seq_book if seq_book is not None else SeqBook()

    def check(self, key: str, value: bytes) -> CapabilityRecord:
        try:
            held = self._held_value(key)
            held_seq = sequence_of(held) if held is not None and held != value else None
            record = verify_record(value, now=self._clock(), held_seq=held_seq)
            if not is_key_of(key, record.peer_id):
                raise RecordRejected(Rejection.WRONG_SIGNER, "stored under another peer's key")
            stale = self.seq_book.verdict(record.peer_id, record.seq)
            if stale is not None:
                raise RecordRejected(stale, f"sequence {record.seq} is older than one already seen")
        except RecordRejected as rejected:
            self.rejections.count(rejected.reason)
            raise
        self.seq_book.note(record.peer_id, record.seq)
        return record

    def validate(self, key: str, value: bytes) -> None:
        self.check(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        """The index of the valid record with the highest sequence number."""

        def rank(index: int) -> int:
            try:
                record = verify_record(values[index], now=self._clock())
            except RecordRejected:
                return -1
            return record.seq if is_key_of(key, record.peer_id) else -1

        return max(range(len(values)), key=rank)
