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
    """How many inbound DHT streams each peer holds open at once, at most ``per_peer`` each.

    py-libp2p serves at most 12 inbound DHT streams at once, shared by every peer, and read each with
    no time limit: one stranger that opened 12 and wrote nothing held them all, and every honest
    peer's query was reset while it stayed connected (``bench/fuzz.py``'s idle-stream check)."""

    def __init__(self, per_peer: int) -> None:
        self.per_peer = per_peer
        self._open: dict[PeerT, int] = {}

    def __len__(self) -> int:
        return len(self._open)

    def held(self, peer: PeerT) -> int:
        return self._open.get(peer, 0)

    def take(self, peer: PeerT) -> bool:
        """One more stream for ``peer``, or False: it holds ``per_peer`` already."""
        held = self._open.get(peer, 0)
        if held >= self.per_peer:
            return False
        self._open[peer] = held + 1
        return True

    def give_back(self, peer: PeerT) -> None:
        held = self._open.get(peer, 0) - 1
        if held > 0:
            self._open[peer] = held
        else:
            self._open.pop(peer, None)
