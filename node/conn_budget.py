"""A connection budget: a node keeps about ``node.connection_budget`` connections, not a full mesh.

py-libp2p keeps every connection it ever opened until the peer closes it or ``max_connections``
(300) is reached, and a Kademlia lookup opens one to each peer it asks: at N = 200 on loopback every
node ended up connected to nearly every other (issue 23). A home node cannot hold that at internet
scale, and a full mesh hid how routing really behaves (every lookup took "one hop").

``ConnBudget`` watches one host's swarm and, whenever a connection opens or a request stream on one
closes while more than ``budget`` are open, closes the ones idle longest first. A connection is *never* closed by
the budget when

* it carries an open stream other than a long-lived background one (GossipSub's): a DHT query, a
  lease call or its metering, a relay circuit (the hop stream on the relay's connection);
* it is younger than ``grace_s`` and has not yet carried a request stream (one other than identify
  and ping) to its end: a connection just dialed is about to carry the stream it was dialed for;
* ``protected(peer)`` says so: the daemon protects peers with a live lease, relays holding our
  reservation and peers reached by a hole punch (``node.daemon``);
* a DHT lookup has a query to that peer in flight (``busy``: dialing it, or about to open its
  stream): closing it there failed the query, which counted as an answer naming nobody;
* the peer is one of the ``KEEP_CLOSEST`` (at most ``budget // 8``) peers of our routing table closest to our own id
  (``keep``): those peers are the ones whose tables must hold us for lookups of us to end there,
  and a peer connected to us is kept in (or taken back into) their table each second.

So what the budget closes are idle DHT connections (queries done) and idle connections of other
protocols, longest idle first; the routing table keeps those peers, and their addresses are kept in
the peer store for ``KEEP_ADDRS_S`` so a later query dials them again. ``max_connections`` stays the
hard cap py-libp2p enforces (a dial is never refused or delayed by the budget); between connections
opening and the trim after them the count can go over the budget by those that opened at the same
time, and it stays over while every connection is busy, young or protected.

The choice itself is a pure function (:func:`to_close`) over plain facts.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork
from libp2p.peer.id import ID

from dht.service import DhtService
from nat.notifee import QuietNotifee

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 64
DEFAULT_GRACE_S = 5.0
# Seconds a peer whose idle connection the budget closed stays dialable from the peer store: the
# routing table keeps it, so a later lookup asks it again (py-libp2p's own TTL from a connect is 120 s).
KEEP_ADDRS_S = 3600
# Streams that stay open for as long as the connection does and carry no request: they do not make
# a connection busy.
BACKGROUND_PROTOCOLS = ("/meshsub/", "/floodsub/")
# Streams every connection carries as it opens (identify, ping): a connection that carried only
# these has not yet served the request it was opened for.
SETUP_PROTOCOLS = ("/ipfs/id/", "/ipfs/ping/", "/libp2p/autonat/")
# Connections to this many of the routing table's peers closest to our own id are never closed; at
# most an eighth of the budget (a budget of 64 keeps 8, one under 8 keeps none).
KEEP_CLOSEST = 8


@dataclass(frozen=True)
class ConnFacts:
    """What the budget knows about one open connection."""

    key: int  # an index into the caller's list
    busy_streams: int  # open streams that are not background ones
    age_s: float
    used: bool  # a request stream (not identify or ping) on it has closed
    idle_s: float  # since the last stream on it opened or closed (its age if it never had one)
    protected: bool


def to_close(conns: Sequence[ConnFacts], budget: int, *, grace_s: float) -> list[int]:
    """The keys of the connections to close so that at most ``budget`` stay open, idle longest first;
    fewer (or none) when too few are idle, old enough and unprotected."""
    excess = len(conns) - budget
    if excess <= 0:
        return []
    closable = [c for c in conns if c.busy_streams == 0 and not c.protected and (c.used or c.age_s >= grace_s)]
    closable.sort(key=lambda c: -c.idle_s)
    return [c.key for c in closable[:excess]]


def _in_grace(conn: ConnFacts, grace_s: float) -> bool:
    """Kept only for its grace: young, unused, idle and unprotected (``to_close`` will take it later)."""
    return conn.busy_streams == 0 and not conn.protected and not conn.used and conn.age_s < grace_s


def _protocol(stream: INetStream) -> str:
    try:
        return str(stream.get_protocol() or "")
    except Exception:  # noqa: BLE001 - a stream still negotiating has none yet
        return ""


def _is_background(stream: INetStream) -> bool:
    return _protocol(stream).startswith(BACKGROUND_PROTOCOLS)


class _Activity(QuietNotifee):
    def __init__(self, budget: ConnBudget) -> None:
        self.budget = budget

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self.budget.note_active(conn)
        await self.budget.trim()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        self.budget.note_active(stream.muxed_conn)

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        self.budget.note_active(stream.muxed_conn)
        if _protocol(stream).startswith(SETUP_PROTOCOLS):
            return
        # A request done: the connection has served what it was opened for, and may be idle now.
        self.budget.note_used(stream.muxed_conn)
        await self.budget.trim()


class ConnBudget:
    """Keeps one host at about ``budget`` connections; ``install`` once, before the host runs."""

    def __init__(
        self,
        host: IHost,
        budget: int = DEFAULT_BUDGET,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        protected: Callable[[ID], bool] = lambda peer_id: False,
    ) -> None:
        self.host = host
        self.budget = budget
        self.grace_s = grace_s
        self.protected = protected
        # A peer with a DHT query in flight (``keep_in_routing_table`` asks the lookup).
        self.busy: Callable[[ID], bool] = lambda peer_id: False
        # Peers whose connections are kept whatever their idleness (our closest table peers).
        self.keep: Callable[[], Collection[ID]] = frozenset
        self.closed = 0  # connections the budget closed, ever
        self._trim_pending = False  # a trim is due when young connections' grace ends
        # Awaited with the peer before its connection is closed (``keep_in_routing_table``).
        self.before_close: Callable[[ID], Awaitable[object]] | None = None
        self._closing: weakref.WeakSet[Any] = weakref.WeakSet()
        # Keyed by the muxed connection (streams name it; the swarm's connection wraps it).
        self._last_active: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._opened: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._used: weakref.WeakSet[Any] = weakref.WeakSet()

    def install(self) -> None:
        self.host.get_network().register_notifee(_Activity(self))

    def note_active(self, conn: Any) -> None:
        muxed = getattr(conn, "muxed_conn", conn)
        now = time.monotonic()
        self._opened.setdefault(muxed, now)
        self._last_active[muxed] = now

    def note_used(self, conn: Any) -> None:
        self._used.add(getattr(conn, "muxed_conn", conn))

    def open_connections(self) -> list[INetConn]:
        """Open connections, less those a trim is closing already."""
        return [
            conn
            for conn in self.host.get_network().get_connections()
            if not conn.is_closed and conn not in self._closing
        ]

    def facts(self, conns: Sequence[INetConn]) -> list[ConnFacts]:
        now = time.monotonic()
        found = []
        try:
            kept = set(self.keep())
        except Exception:  # noqa: BLE001 - a table being rebuilt: nothing extra kept this time
            kept = set()
        for index, conn in enumerate(conns):
            muxed = conn.muxed_conn
            opened = self._opened.setdefault(muxed, now)
            try:
                streams = conn.get_streams()
            except Exception:  # noqa: BLE001 - a connection closing under us
                streams = ()
            busy = sum(1 for stream in streams if not _is_background(stream))
            if self._querying(muxed.peer_id):
                busy += 1
            if busy:
                self._last_active[muxed] = now
            try:
                protected = muxed.peer_id in kept or self.protected(muxed.peer_id)
            except Exception:  # noqa: BLE001 - a failing predicate keeps the connection
                protected = True
            found.append(
                ConnFacts(
                    key=index,
                    busy_streams=busy,
                    age_s=now - opened,
                    used=muxed in self._used,
                    idle_s=now - self._last_active.get(muxed, opened),
                    protected=protected,
                )
            )
        return found

    def _querying(self, peer_id: ID) -> bool:
        try:
            return self.busy(peer_id)
        except Exception:  # noqa: BLE001 - a failing predicate keeps the connection
            return True

    def _in_use_since(self, conn: INetConn, moment: float) -> bool:
        """Whether ``conn`` carries a request stream now, or one opened or closed on it after ``moment``,
        or a DHT query to its peer is in flight."""
        muxed = conn.muxed_conn
        if self._querying(muxed.peer_id):
            return True
        try:
            streams = conn.get_streams()
        except Exception:  # noqa: BLE001 - a connection closing under us
            return False
        if any(not _is_background(stream) for stream in streams):
            return True
        return self._last_active.get(muxed, 0.0) > moment

    async def trim(self) -> int:
        """Close idle connections until at most ``budget`` are open (or none is left to close); returns
        how many it closed. The closes run at once: py-libp2p takes ~0.2 s to close one connection."""
        conns = self.open_connections()
        if len(conns) <= self.budget:
            return 0
        facts = self.facts(conns)
        chosen = [conns[key] for key in to_close(facts, self.budget, grace_s=self.grace_s)]
        if len(conns) - len(chosen) > self.budget and any(_in_grace(c, self.grace_s) for c in facts):
            # Still over only because of connections in their grace: nothing else may come along to
            # trim again (a peer's auto-connector dialing back to an otherwise quiet node), so look
            # once more when their grace is over.
            self._trim_after_grace()
        self._closing.update(chosen)
        async with trio.open_nursery() as nursery:
            for conn in chosen:
                nursery.start_soon(self._close, conn)
        return len(chosen)

    def _trim_after_grace(self) -> None:
        if self._trim_pending:
            return
        self._trim_pending = True

        async def later() -> None:
            await trio.sleep(self.grace_s)
            self._trim_pending = False
            try:
                await self.trim()
            except Exception as error:  # noqa: BLE001 - the next connection's trim tries again
                log.debug("trimming after the grace failed: %s", type(error).__name__)

        trio.lowlevel.spawn_system_task(later)

    async def _close(self, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id
        chosen_at = time.monotonic()
        if self.before_close is not None:
            with trio.move_on_after(1):
                try:
                    await self.before_close(peer_id)
                except Exception as error:  # noqa: BLE001 - the close goes on
                    log.debug("before closing %s: %s", peer_id, type(error).__name__)
        if self._in_use_since(conn, chosen_at):
            # A stream opened on it while ``before_close`` ran (a lookup asking this peer again):
            # closing now would reset that query mid-way. The next trim looks at it again.
            self._closing.discard(conn)
            return
        peerstore = self.host.get_peerstore()
        try:
            addrs = peerstore.addrs(peer_id)
        except Exception:  # noqa: BLE001 - expired or unknown: nothing to keep
            addrs = []
        self.closed += 1
        # Shielded and never cut short: py-libp2p's own add_conn notes that a connection's cleanup
        # cancelled half way leaks its slots (and the close sleeps twice 0.1 s, longer on a busy machine).
        with trio.CancelScope(shield=True):
            try:
                await conn.close()
            except Exception as error:  # noqa: BLE001 - already closing
                log.debug("closing an idle connection failed: %s", type(error).__name__)
        if addrs:
            peerstore.add_addrs(peer_id, addrs, KEEP_ADDRS_S)


_BUDGETS: weakref.WeakKeyDictionary[Any, ConnBudget] = weakref.WeakKeyDictionary()


def keep_connection_budget(
    host: IHost, budget: int, *, grace_s: float = DEFAULT_GRACE_S, protected: Callable[[ID], bool] | None = None
) -> ConnBudget:
    kept = ConnBudget(host, budget, grace_s=grace_s, protected=protected or (lambda peer_id: False))
    kept.install()
    _BUDGETS[host.get_network()] = kept
    return kept


def budget_of(host: IHost) -> ConnBudget | None:
    return _BUDGETS.get(host.get_network())


def protect_connections(host: IHost, protected: Callable[[ID], bool]) -> None:
    """The budget of ``host`` (if it has one) never closes a connection to a peer ``protected`` names."""
    budget = budget_of(host)
    if budget is not None:
        budget.protected = protected


def keep_in_routing_table(host: IHost, dht: DhtService) -> None:
    """A DHT peer whose idle connection the budget closes is put in the routing table first; the
    budget closes no connection a lookup of ``dht`` is querying, nor those to the ``KEEP_CLOSEST``
    table peers closest to us.

    py-libp2p adds a peer that queries us only if identify already gave its addresses, and
    ``DhtService`` adopts the connected rest each second: a connection closed by the budget right
    after its first query (a node joining through us) left that peer out of every table, and at
    N = 10 with a budget of 3 half the lookups failed. ``add_peer`` still refuses a peer that does
    not serve the DHT (``DhtService``'s guard).
    """
    budget = budget_of(host)
    if budget is None:
        return

    def querying(peer_id: ID) -> bool:
        return dht.lookup is not None and dht.lookup.asking(peer_id)

    def closest() -> list[ID]:
        count = min(KEEP_CLOSEST, budget.budget // 8)
        if dht.kad is None or count <= 0:
            return []
        return dht.kad.routing_table.find_local_closest_peers(host.get_id().to_bytes(), count)

    budget.busy = querying
    budget.keep = closest

    async def adopt(peer_id: ID) -> None:
        if dht.kad is not None and peer_id not in dht.kad.routing_table.get_peer_ids():
            await dht.kad.add_peer(peer_id)

    budget.before_close = adopt
