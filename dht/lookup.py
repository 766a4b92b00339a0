"""The iterative Kademlia lookup the node runs, in place of py-libp2p 0.8.1's.

Why not py-libp2p's ``PeerRouting.find_closest_peers_network``: it asks peers in rounds of
``ALPHA = 10`` and waits for the slowest of each round, each with ``QUERY_TIMEOUT = 10`` s; it
goes on until the 20 closest peers stop changing (so a lookup asks most of a small network); its
``find_peer`` does not stop when an answer names the target; and it checks the signature of every
signed peer record in every answer (20 per answer, a few ms each in Python) and adds every peer an
answer names to the routing table. On loopback at N = 200 that was a p50 of 0.44 s and a p95 of
2.4 s (issue 23).

Here (the libp2p Kademlia spec, as go-libp2p-kad-dht runs it):

* ``alpha`` (3) queries in flight; a new one starts as soon as one ends. A query slower than
  ``patience_s`` stops holding its slot, so one slow or dead peer never stalls the lookup; one
  slower than ``query_timeout_s`` is given up as late (it no longer holds the lookup's end), and
  its answer is still read and used until ``answer_timeout_s``. Both are counted from the
  connection: a dial holds its slot until it connects or fails (the DHT's dial timeout), so at most
  ``alpha`` dials run at once;
* while a query to a peer is in flight (``Lookup.asking``) a connection budget does not close its
  connection (``node.conn_budget``), and a query whose connection closed under it anyway is sent
  once more on a fresh one instead of counting as an answer naming nobody;
* a lookup ends when the ``beta`` closest peers it knows of have all answered (the closest set is
  stable: nobody closer is left to ask), or at once when ``stop_at`` is named (``find_peer``, beta
  3). Until ``beta`` peers have answered, a peer given up as late neither settles that set nor
  takes a place among the peers to ask, and a walk with no answer yet waits for a late one: when a
  late peer always settled, a loaded machine's lookups ended as soon as the three closest were late
  and cut short the queries out to the next closest, which would have named the target
  (``bench/dht_swarm.py --trace``); when it never did, store lookups took 10-20 s there. A lookup
  for the peers to store at or read from (``put_value``, ``provide``, ``get_value``, provider
  lists) takes beta ``STORE_BETA`` (8): with beta 3 a provider and a reader, each ending on a
  slightly different closest set, met on too few peers (at N = 60 a query found 1 of 3-4
  providers);
* one FIND_NODE is one stream: written, read, parsed here; a query cut short (timeout, the lookup
  ended) resets its stream, so no half-open stream keeps a connection busy;
* only the sender's signed record is checked (answers name addresses as go's do); an answered
  peer goes into the routing table, and so do the closest peers the walk ends with (py-libp2p put
  every peer an answer named there; the routing table checks each against the DHT guard);
* hops are honest: a peer named by a peer at hop ``h`` is at hop ``h + 1`` (the local table is hop 0);
  ``LookupStats`` reports the hop at which the target was first named.

The rules of the walk (which peer next, when to stop) are pure: :class:`Walk`. ``DhtService``
installs :class:`Lookup` on its own ``KadDHT`` instance (never on the class), so py-libp2p's
``get_value``, ``put_value``, ``provide`` and ``find_providers`` run on it too.
``LookupStats.trace`` (``bench/dht_swarm.py --trace``) records each step of one lookup.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import multiaddr
import trio
import varint
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.utils import maybe_consume_signed_record
from libp2p.peer.id import ID
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

log = logging.getLogger(__name__)

ALPHA = 3
BETA = 3
STORE_BETA = 8
K = 20
# A connected peer that has not answered FIND_NODE in this long is given up by this lookup: it no
# longer keeps the walk from ending (the lookup itself moved on after ``PATIENCE_S``) ...
QUERY_TIMEOUT_S = 5.0
# ... but its answer is still read, and used, until this long (py-libp2p's query timeout).
ANSWER_TIMEOUT_S = 10.0
# After this long a query no longer holds one of the ``alpha`` slots: the next peer is asked.
PATIENCE_S = 0.5
# Addresses learnt from answers are kept this long (py-libp2p's own TTL for them).
ADDR_TTL_S = 3600
# At most this many peers are remembered by one lookup (answers name up to 20 each).
MAX_CANDIDATES = 400
MAX_QUERIES = 60
# How long a query whose connection closed under it waits for the swarm to drop that connection
# before it dials the peer again.
RECONNECT_WAIT_S = 1.0
MAX_TRACE = 400


def _short(peer: ID) -> str:
    return str(peer)[-6:]


def key_of(data: bytes) -> int:
    """A point in the DHT's key space: SHA-256 of a key or of a peer id's bytes (py-libp2p's metric)."""
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


def far_keys(me: int, buckets: int, rng: random.Random) -> list[bytes]:
    """One random key for each of the ``buckets`` farthest buckets from ``me`` (a point of the key
    space, ``key_of``): the ``i``-th key's point first differs from ``me`` at bit ``i`` (0: the half
    of the key space that does not hold ``me``). Keys are hashed into the space, so each is drawn
    until its point falls in its bucket (``2 ** (i + 1)`` draws on average)."""
    keys: list[bytes] = []
    for bucket in range(buckets):
        shift = 255 - bucket
        while True:
            key = rng.randbytes(32)
            if (key_of(key) ^ me) >> shift == 1:
                keys.append(key)
                break
    return keys


@dataclass
class LookupStats:
    """What one lookup did; set ``CURRENT_STATS`` to have it filled (the benches do)."""

    queries: int = 0
    answered: int = 0
    failed: int = 0
    target_hop: int | None = None  # the hop at which an answer first named ``stop_at``
    max_hop: int = 0
    # Set to a list to have what the lookup did written into it, one line an event (bounded).
    trace: list[str] | None = None

    def note(self, text: str) -> None:
        if self.trace is not None and len(self.trace) < MAX_TRACE:
            self.trace.append(f"{trio.current_time():.3f} {text}")


# What ``Lookup._query`` returns for a peer that was reached but did not answer in time.
_SLOW: list[ID] = []

CURRENT_STATS: contextvars.ContextVar[LookupStats | None] = contextvars.ContextVar("dht_lookup_stats", default=None)

# LATE: asked, no answer within the query timeout: it no longer holds the walk's end, but its answer
# is still taken if it comes. SLOW: reached, but no answer within the answer timeout either (busy,
# not gone): still one of the closest for a put or a get, not asked again by this lookup. FAILED:
# not reached at all: out of the result.
WAITING, ASKING, LATE, ANSWERED, SLOW, FAILED = "waiting", "asking", "late", "answered", "slow", "failed"


@dataclass
class Walk:
    """The state of one iterative lookup; pure (no I/O, no clock)."""

    target: int
    me: ID
    beta: int = BETA
    # Whether a late peer among the closest settles the set once ``beta`` peers answered. Not for
    # ``find_peer``: a walk that had its three answers from farther peers ended while the queries to
    # the closest, late on a loaded machine, were still out and would have named the target
    # (bench/dht_swarm.py --trace: "end running=12 done=True", 12 of the 15 peers asked held it).
    late_settles: bool = True
    states: dict[ID, str] = field(default_factory=dict)
    hops: dict[ID, int] = field(default_factory=dict)
    distances: dict[ID, int] = field(default_factory=dict)

    def add(self, peer: ID, hop: int) -> bool:
        """Note a peer named at ``hop``; True if it is new."""
        if peer == self.me or peer in self.states or len(self.states) >= MAX_CANDIDATES:
            return False
        self.states[peer] = WAITING
        self.hops[peer] = hop
        self.distances[peer] = key_of(peer.to_bytes()) ^ self.target
        return True

    def ordered(self) -> list[ID]:
        """Known peers that have not failed, closest first."""
        alive = [peer for peer, state in self.states.items() if state != FAILED]
        alive.sort(key=self.distances.__getitem__)
        return alive

    def among_closest(self, peer: ID, count: int) -> bool:
        """Whether ``peer`` is one of the ``count`` closest known peers that have not failed (``ordered``'s
        first ``count``, without sorting them all)."""
        mine = self.distances[peer]
        closer = sum(1 for other, state in self.states.items() if state != FAILED and self.distances[other] < mine)
        return closer < count

    def responsive(self) -> list[ID]:
        """Known peers that have neither failed nor been given up as late or slow, closest first."""
        return [peer for peer in self.ordered() if self.states[peer] not in (LATE, SLOW)]

    def next_peer(self, window: int) -> ID | None:
        """The closest peer not asked yet among the ``window`` closest that have neither failed nor
        been given up as slow (a slow peer does not take the place of one that may answer)."""
        for peer in self.responsive()[:window]:
            if self.states[peer] == WAITING:
                return peer
        return None

    def done(self) -> bool:
        """Until ``beta`` peers have answered: the ``beta`` closest peers that have neither failed
        nor been given up as late or slow have all answered (nobody closer is left to ask, and
        nobody closer is still being asked), and never before anyone answered while a late answer
        may still come. From then on: the ``beta`` closest that have not failed have answered or
        were given up.

        A late peer does not settle the set: on a loaded machine the closest three often answered
        later than the query timeout, and a walk that counted them as settled ended at once and
        cut short the queries still out to the next closest (bench/dht_swarm.py --trace: "end
        running=17", no answer yet, the target unfound).
        """
        if not self.late_settles:
            # A late peer among the closest may still name the target: it settles nothing until it
            # answers or turns slow (``answer_timeout_s``); the walk asks past it meanwhile.
            settled = [peer for peer in self.ordered() if self.states[peer] != SLOW]
            return all(self.states[peer] == ANSWERED for peer in settled[: self.beta])
        states = list(self.states.values())
        answered = states.count(ANSWERED)
        if answered >= self.beta:
            # Enough was learnt: a late or slow peer among the closest settles, as it did before
            # (waiting for it too made every store lookup of a loaded one-process swarm take 10-20 s).
            return all(self.states[peer] in (ANSWERED, LATE, SLOW) for peer in self.ordered()[: self.beta])
        if LATE in states and answered == 0:
            return False  # nobody answered yet, and a late answer may still come
        return all(self.states[peer] == ANSWERED for peer in self.responsive()[: self.beta])

    def closest(self, count: int) -> list[ID]:
        return self.ordered()[:count]


class Lookup:
    """Iterative FIND_NODE lookups for one host (see the module docstring)."""

    def __init__(
        self,
        host: IHost,
        protocol_id: str,
        *,
        local_closest: Callable[[bytes, int], list[ID]],
        may_ask: Callable[[ID], bool],
        reach: Callable[[ID], Awaitable[bool]],
        answered: Callable[[ID], Awaitable[object]],
        alpha: int = ALPHA,
        beta: int = BETA,
        query_timeout_s: float = QUERY_TIMEOUT_S,
        patience_s: float = PATIENCE_S,
        answer_timeout_s: float = ANSWER_TIMEOUT_S,
        offer_later: Callable[[list[ID]], None] | None = None,
    ) -> None:
        self.host = host
        self.protocol_id = TProtocol(protocol_id)
        self.local_closest = local_closest
        self.may_ask = may_ask
        self.reach = reach
        self.answered = answered
        self.alpha = alpha
        self.beta = beta
        self.query_timeout_s = query_timeout_s
        self.patience_s = patience_s
        self.answer_timeout_s = max(answer_timeout_s, query_timeout_s)
        self.offer_later = offer_later
        self._asking: dict[ID, int] = {}  # peers with a query in flight, and how many

    def _seeds(self, key: bytes, count: int) -> list[ID]:
        seeds = list(self.local_closest(key, count))
        if len(seeds) < BETA:
            # A node just joined: its table is near empty, its connections are not.
            seeds.extend(self.host.get_connected_peers())
        return [peer for peer in dict.fromkeys(seeds) if self.may_ask(peer)]

    async def closest_peers(
        self,
        key: bytes,
        count: int = K,
        *,
        stop_at: ID | None = None,
        near: Callable[[ID], None] | None = None,
    ) -> list[ID]:
        """The ``count`` closest peers to ``key`` that the walk met and that did not fail.

        ``near(peer)``: called while the walk runs for each peer that answered while it was among
        the ``count`` closest of at least ``2 * count`` the walk knew of (``provide`` tells it at
        once instead of after the walk's last answers and patience)."""
        beta = self.beta if stop_at is not None else max(self.beta, STORE_BETA)
        walk = Walk(key_of(key), self.host.get_id(), beta=beta, late_settles=stop_at is None)
        for seed in self._seeds(key, count):
            if seed != stop_at:  # connected to it or in the table, but its addresses are what we lack
                walk.add(seed, 0)
        stats = CURRENT_STATS.get()
        if stats is not None:
            stats.note(f"start beta={beta} seeds={len(walk.states)} connected={len(self.host.get_connected_peers())}")
        found = trio.Event()
        raw_addrs: dict[ID, list[bytes]] = {}
        wake = trio.Event()
        holding = 0  # queries holding one of the alpha slots
        running = 0
        queries = 0

        async def ask(peer: ID) -> None:
            nonlocal holding, running, wake
            released = False

            async def release_after_patience() -> None:
                nonlocal holding, released, wake
                await trio.sleep(self.patience_s)
                if not released:
                    released = True
                    holding -= 1
                    wake.set()
                    if stats is not None:
                        stats.note(f"patience {_short(peer)}")
                # Given up as slow: it no longer keeps the walk from ending, but its answer, if it
                # still comes (until ``answer_timeout_s``), is taken.
                await trio.sleep(max(0.0, self.query_timeout_s - self.patience_s))
                if walk.states[peer] == ASKING:
                    walk.states[peer] = LATE
                    wake.set()
                    if stats is not None:
                        stats.note(f"given-up {_short(peer)}")

            hop = walk.hops[peer]
            self._asking[peer] = self._asking.get(peer, 0) + 1
            try:
                # The dial holds the slot, with no patience: at most ``alpha`` dials (Noise handshakes)
                # run at once. Patience counted from the dial let a walk whose seeds were all
                # unconnected start a new dial every 0.5 s, and on a loaded machine twenty handshakes
                # piled up and none answered within the query timeout (bench/dht_swarm.py --trace).
                answer: list[ID] | None = None
                if await self._reach(peer, raw_addrs):
                    async with trio.open_nursery() as patience:
                        patience.start_soon(release_after_patience)
                        answer = await self._query(peer, key, raw_addrs)
                        patience.cancel_scope.cancel()
            finally:
                if not released:
                    released = True
                    holding -= 1
                running -= 1
                left = self._asking.pop(peer, 1) - 1
                if left > 0:
                    self._asking[peer] = left
                wake.set()
            if answer is None or answer is _SLOW:
                walk.states[peer] = FAILED if answer is None else SLOW
                if stats is not None:
                    stats.failed += 1
                    stats.note(f"{walk.states[peer]} {_short(peer)}")
                return
            walk.states[peer] = ANSWERED
            if stats is not None:
                stats.answered += 1
                rank = walk.ordered().index(peer)
                stats.note(
                    f"answer {_short(peer)} hop={hop} rank={rank} named={len(answer)} "
                    f"target={'addrs' if stop_at in raw_addrs else 'no-addrs' if stop_at in answer else 'no'}"
                )
            for named in answer:
                if walk.add(named, hop + 1) and stats is not None:
                    stats.max_hop = max(stats.max_hop, hop + 1)
                if stop_at is not None and named == stop_at and named in raw_addrs and not found.is_set():
                    if stats is not None:
                        stats.target_hop = hop + 1
                    found.set()
            # Still among the closest with the peers its own answer named, and the walk knows twice as
            # many: before that, whoever answered first would be (a seed half the key space away).
            if near is not None and len(walk.states) >= 2 * count and walk.among_closest(peer, count):
                near(peer)
            try:
                await self.answered(peer)
            except Exception as error:  # noqa: BLE001 - the table refused it: the answer still counts
                log.debug("could not note %s as alive: %s", peer, type(error).__name__)

        async with trio.open_nursery() as nursery:
            while not found.is_set():
                following = walk.next_peer(count) if holding < self.alpha and queries < MAX_QUERIES else None
                if following is not None:
                    walk.states[following] = ASKING
                    holding += 1
                    running += 1
                    queries += 1
                    if stats is not None:
                        stats.queries += 1
                        stats.note(
                            f"ask {_short(following)} hop={walk.hops[following]} "
                            f"rank={walk.ordered().index(following)} "
                            f"connected={following in self.host.get_connected_peers()}"
                        )
                    nursery.start_soon(ask, following)
                    continue
                if running == 0 or walk.done():
                    if stats is not None:
                        stats.note(f"end running={running} done={walk.done()} queries={queries}")
                    break
                wake = trio.Event()
                await wake.wait()
            nursery.cancel_scope.cancel()  # the lookup is over: queries still out are cut short
        result = walk.closest(count)
        if stop_at is not None and stop_at in walk.states and stop_at not in result:
            result.insert(0, stop_at)
        self._remember_addrs(result, raw_addrs)
        # The closest peers met (with their addresses now) are offered to the routing table, as
        # py-libp2p offered every peer an answer named: without it tables stayed at the few peers
        # that answered us, and in a small swarm with a connection budget lookups found nobody.
        # After the caller has its answer when ``offer_later`` takes them: adding a peer to a full
        # bucket pings its oldest peer first, and twenty of those one after another held a finished
        # lookup for seconds on a loaded machine.
        offered = [peer for peer in result if walk.states.get(peer) in (WAITING, ANSWERED)]
        if self.offer_later is not None:
            self.offer_later(offered)
            return result
        for peer in offered:
            try:
                await self.answered(peer)
            except Exception as error:  # noqa: BLE001 - the table refused it
                log.debug("could not add %s: %s", peer, type(error).__name__)
        return result

    def _remember_addrs(self, peers: Sequence[ID], raw_addrs: dict[ID, list[bytes]]) -> None:
        peerstore = self.host.get_peerstore()
        for peer in peers:
            parsed = []
            for raw in raw_addrs.pop(peer, ()):
                try:
                    parsed.append(multiaddr.Multiaddr(raw))
                except Exception:  # noqa: BLE001 - a malformed address in an answer is skipped
                    continue
            if parsed:
                peerstore.add_addrs(peer, parsed, ADDR_TTL_S)

    async def ask_once(self, peer: ID, key: bytes) -> list[ID]:
        """One FIND_NODE for ``key`` to ``peer`` (reached within the dial timeout), no walk: the peers
        its answer names, their addresses kept in the peer store; [] if it did not answer."""
        raw_addrs: dict[ID, list[bytes]] = {}
        self._asking[peer] = self._asking.get(peer, 0) + 1
        try:
            if not await self._reach(peer, raw_addrs):
                return []
            answer = await self._query(peer, key, raw_addrs)
        finally:
            left = self._asking.pop(peer, 1) - 1
            if left > 0:
                self._asking[peer] = left
        if not answer:  # None, [] or _SLOW
            return []
        named = [named_peer for named_peer in answer if named_peer != self.host.get_id()]
        self._remember_addrs(named, raw_addrs)
        return named

    def asking(self, peer: ID) -> bool:
        """Whether a lookup has a query to ``peer`` in flight (dialing, or waiting for its answer): a
        connection budget must not close that connection under it."""
        return peer in self._asking

    async def _reach(self, peer: ID, raw_addrs: dict[ID, list[bytes]]) -> bool:
        """Connect to ``peer`` for a query (bounded by the DHT's dial timeout; a peer not reached goes
        silent there); False for a peer not to be asked or not reached."""
        stats = CURRENT_STATS.get()
        if not self.may_ask(peer):
            if stats is not None:
                stats.note(f"may-not-ask {_short(peer)}")
            return False
        self._remember_addrs([peer], raw_addrs)  # what the answer that named it said
        if not await self.reach(peer):
            if stats is not None:
                stats.note(f"unreached {_short(peer)}")
            return False
        return True

    async def _query(self, peer: ID, key: bytes, raw_addrs: dict[ID, list[bytes]]) -> list[ID] | None:
        """One FIND_NODE to a connected ``peer``: the peers it names, ``_SLOW`` (reached, no answer in
        time), ``[]`` (it refused the query) or None (not reached, garbage).

        A query that fails because the connection closed under it (a connection budget, ours or the
        peer's, trimmed it) is sent once more on a fresh connection: counting it as an answer naming
        nobody settled the closest set without the peer's answer (bench/dht_swarm.py --trace)."""
        stats = CURRENT_STATS.get()
        deadline = trio.current_time() + self.answer_timeout_s
        for attempt in range(2):
            stream: INetStream | None = None
            ok = False
            try:
                with trio.move_on_at(deadline) as scope:
                    stream = await self.host.new_stream(peer, [self.protocol_id])
                    if stats is not None:
                        stats.note(f"stream {_short(peer)}")
                    request = Message()
                    request.type = Message.MessageType.FIND_NODE
                    request.key = key
                    request.senderRecord = env_to_send_in_RPC(self.host)[0]
                    payload = request.SerializeToString()
                    await stream.write(varint.encode(len(payload)) + payload)
                    reply = await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE)
                    ok = True
                if scope.cancelled_caught:
                    # Connected but slow: busy, not gone (a loaded machine takes seconds). Only this
                    # lookup gives up on it; a peer that cannot be reached at all went silent in ``reach``.
                    return _SLOW
            except Exception as error:  # noqa: BLE001 - a reset, a refused protocol, a closed connection
                closed = not self._live(peer)
                if stats is not None:
                    what = "closed" if closed else "refused"
                    stats.note(f"{what} {_short(peer)} {type(error).__name__}: {error}"[:200])
                if not closed:
                    # Reached, and it refused this query (a key it will not look up, too busy): alive,
                    # and still one of the closest peers for a put or a get, only it named nobody.
                    log.debug("FIND_NODE to %s refused: %s", peer, type(error).__name__)
                    return []
                if attempt > 0 or trio.current_time() >= deadline or not await self._reconnect(peer):
                    return None
                continue
            finally:
                if stream is not None:
                    await _finish(stream, ok)
            return self._parse(peer, reply, raw_addrs)
        return None

    def _live(self, peer: ID) -> bool:
        """Whether we hold a connection to ``peer`` that is neither closed nor shutting down."""
        for conn in self.host.get_network().get_connections(peer):
            shutting_down = getattr(conn.muxed_conn, "event_shutting_down", None)
            if not conn.is_closed and not (shutting_down is not None and shutting_down.is_set()):
                return True
        return False

    async def _reconnect(self, peer: ID) -> bool:
        """A fresh connection to ``peer`` once the one closing under a query is gone (py-libp2p drops
        a closing connection from the swarm a little after it failed its streams)."""
        with trio.move_on_after(RECONNECT_WAIT_S):
            while peer in self.host.get_connected_peers() and not self._live(peer):
                await trio.sleep(0.02)
        return await self.reach(peer)

    def _parse(self, peer: ID, reply: bytes, raw_addrs: dict[ID, list[bytes]]) -> list[ID] | None:
        response = Message()
        try:
            response.ParseFromString(reply)
        except Exception:  # noqa: BLE001 - garbage
            return None
        if response.type != Message.MessageType.FIND_NODE:
            return None
        if not maybe_consume_signed_record(response, self.host, peer):
            return None  # a forged sender record: nothing it says is taken
        named: list[ID] = []
        for entry in response.closerPeers[:K]:
            try:
                named_peer = ID(entry.id)
            except Exception:  # noqa: BLE001 - a malformed id
                continue
            named.append(named_peer)
            if entry.addrs and named_peer not in raw_addrs:
                raw_addrs[named_peer] = list(entry.addrs)[:8]
        return named


async def _finish(stream: INetStream, ok: bool) -> None:
    """Close a stream that served its query, reset one cut short; never longer than a second, even
    when the lookup that opened it is being cancelled."""
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + 1.0
        try:
            if ok:
                await stream.close()
            else:
                await stream.reset()
        except Exception:  # noqa: BLE001 - already gone
            pass
