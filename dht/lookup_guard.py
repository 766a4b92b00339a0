"""Which peers a DHT lookup asks, and which ones it stops asking.

py-libp2p 0.8.1 asks whoever is in the routing table (or, while the table is small, every
peer it has heard of) and gives each one ``QUERY_TIMEOUT`` (10 s). A home node that turned
DHT client stays in other tables until someone notices, and behind its NAT a dial to it
hangs: every lookup that met it waited those 10 s. The rules here are pure; ``DhtService``
applies them around py-libp2p's per-peer steps.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from typing import Generic, TypeVar

# A peer that let one query time out is neither asked nor taken back into the routing table
# for this long, unless it shows it is alive (it queries us, or holds a connection to us).
SILENT_HOLD_S = 60.0
# Silent peers remembered at once (the oldest is forgotten first).
MAX_SILENT_PEERS = 4096

PeerT = TypeVar("PeerT")


def serves_dht(protocols: Collection[str] | None, kad_protocol: str) -> bool | None:
    """Whether a peer's protocol list (from identify) says it serves the DHT; None if unknown."""
    if not protocols:
        return None
    return kad_protocol in protocols


def may_ask(protocols: Collection[str] | None, kad_protocol: str, *, silent: bool) -> bool:
    """Whether a lookup asks this peer (and whether it may sit in the routing table).

    Not a peer whose identify lists no DHT protocol (it turned client, or never served), and
    not one that let a query time out lately. A peer identify has not told us about yet is
    asked: peers learnt from routing answers are servers as far as anyone knows.
    """
    return serves_dht(protocols, kad_protocol) is not False and not silent


class SilentPeers(Generic[PeerT]):
    """Peers that let a DHT query time out, each until ``hold_s`` after it did; bounded."""

    def __init__(self, hold_s: float = SILENT_HOLD_S, limit: int = MAX_SILENT_PEERS) -> None:
        self.hold_s = hold_s
        self.limit = limit
        self._until: OrderedDict[PeerT, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def note(self, peer: PeerT, now: float) -> None:
        self._until.pop(peer, None)
        self._until[peer] = now + self.hold_s
        while len(self._until) > self.limit:
            self._until.popitem(last=False)

    def clear(self, peer: PeerT) -> None:
        self._until.pop(peer, None)

    def is_silent(self, peer: PeerT, now: float) -> bool:
        until = self._until.get(peer)
        if until is None:
            return False
        if now >= until:
            del self._until[peer]
            return False
        return True


class InboundSlots(Generic[PeerT]):
    """How many inbound DHT streams each peer holds open at once: at most ``per_peer`` each, and at
    most ``per_bucket`` for all the peers behind one remote IP (an IPv6 /64) together.

    py-libp2p serves at most 12 inbound DHT streams at once, shared by every peer, and read each with
    no time limit: one stranger that opened 12 and wrote nothing held them all, and every honest
    peer's query was reset while it stayed connected (``bench/fuzz.py``'s idle-stream check). Peer
    ids cost nothing, so the per-peer share alone let four identities from one host hold every slot
    again; an IP costs something. A stream with no bucket (loopback, a relayed stream) counts only
    against its peer."""

    def __init__(self, per_peer: int, per_bucket: int | None = None) -> None:
        self.per_peer = per_peer
        self.per_bucket = per_bucket
        self._open: dict[PeerT, int] = {}
        self._bucket_open: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._open)

    def held(self, peer: PeerT) -> int:
        return self._open.get(peer, 0)

    def held_by_bucket(self, bucket: str) -> int:
        return self._bucket_open.get(bucket, 0)

    def take(self, peer: PeerT, bucket: str | None = None) -> bool:
        """One more stream for ``peer`` (behind ``bucket``), or False: it, or its bucket, holds its share already."""
        held = self._open.get(peer, 0)
        if held >= self.per_peer:
            return False
        if bucket is not None and self.per_bucket is not None:
            in_bucket = self._bucket_open.get(bucket, 0)
            if in_bucket >= self.per_bucket:
                return False
            self._bucket_open[bucket] = in_bucket + 1
        self._open[peer] = held + 1
        return True

    def give_back(self, peer: PeerT, bucket: str | None = None) -> None:
        """Give back a stream taken with ``take(peer, bucket)`` (the same bucket)."""
        held = self._open.get(peer, 0) - 1
        if held > 0:
            self._open[peer] = held
        else:
            self._open.pop(peer, None)
        if bucket is not None and self.per_bucket is not None:
            in_bucket = self._bucket_open.get(bucket, 0) - 1
            if in_bucket > 0:
                self._bucket_open[bucket] = in_bucket
            else:
                self._bucket_open.pop(bucket, None)
