"""Nothing a long-running provider keeps grows without bound (issue 17).

2,000 trusted post-paid leases (eight times the finished leases kept, 256) go through the real
``LeaseMarket`` quote, grant and end paths in process (no libp2p, no chain, a stand-in ledger): the
provider keeps the newest finished leases only, forgets used quotes once they expired, and each
session's history stays bounded. A lease it forgot answers ``E_NOT_FOUND`` like any lease it never knew.
"""

from __future__ import annotations

import copy
import itertools
from types import SimpleNamespace
from typing import Any

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from node.config import MarketSection
from protocols import lease_wire as w
from protocols.lease import HeldLease, LeaseMarket
from protocols.machines import task as m
from protocols.machines.history import History, finished_to_evict
from protocols.machines.lease import (
    FINISHED_KEEP,
    LEASE_HISTORY,
    LEASE_SALT_BYTES,
    LeasePolicy,
    LeaseSession,
    lease_id_for,
    quotes_to_forget,
)
from protocols.machines.task import TASK_FINISHED_KEEP, TASK_HISTORY, TaskBook
from runtime.errors import ClawnodeError, ErrorCode
from runtime.service import ServiceRegistry
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, WordService
from wire.signed import open_base64, seal, to_base64

CAPABILITY = WORDS
# Eight times FINISHED_KEEP (256) and far past the quotes' validity (a lease a second): each bound is
# reached and then held for thousands of leases (10,000 took about 8 s on a quiet core for the same checks).
LEASES = 2_000
_SALTS = itertools.count(1)


class _Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class _Ledger:
    """The few ledger calls the grant and end paths make, answered at once (the real one fsyncs)."""

    def __init__(self) -> None:
        self.opened = 0
        self.ended = 0

    async def open_lease(self, lease: Any, *, idempotency_key: str) -> None:
        self.opened += 1

    async def end_lease(self, lease_id: str, *, idempotency_key: str) -> None:
        self.ended += 1

    async def issue_receipt(self, lease_id: str, key: Any) -> Any:
        return SimpleNamespace(countersigned=True)

    async def enqueue_refund(self, lease_id: str) -> None:
        pass


class _Host:
    def __init__(self, peer: ID) -> None:
        self.peer = peer

    def get_id(self) -> ID:
        return self.peer


def _market(clock: _Clock, consumer: str) -> LeaseMarket:
    provider_keys = create_new_key_pair()
    services = ServiceRegistry()
    services.register(CAPABILITY, WordService())
    settings = MarketSection(trusted_peers=[consumer], postpaid_cap=10**30, quote_valid_s=60)
    return LeaseMarket(
        _Host(ID.from_pubkey(provider_keys.public_key)),  # type: ignore[arg-type]
        provider_keys.private_key,
        _Ledger(),  # type: ignore[arg-type]
        settings,
        offers=lambda: [WORD_OFFER],
        services=services,
        escrow=lambda: None,
        escrow_terms=lambda: None,
        clock=clock,
    )


async def _open_and_end(market: LeaseMarket, consumer_keys: Any, consumer: str, clock: _Clock) -> str:
    quote = await market._quote(w.QuoteRequest(capability=CAPABILITY, expected_units=10, duration_s=60), consumer)
    salt = next(_SALTS).to_bytes(LEASE_SALT_BYTES, "big")
    lease_id = lease_id_for(ID.from_base58(consumer).to_bytes(), salt).hex()
    opening = w.LeaseOpen(
        quote=quote.envelope, lease_id=lease_id, budget=WORD_PRICE * 100, mode="postpaid", salt=salt.hex()
    )
    envelope = seal(opening, consumer_keys.private_key, domain=w.OPEN_DOMAIN, payload_type=w.OPEN_TYPE)
    reply = await market._grant(w.OpenRequest(envelope=to_base64(envelope)), consumer)
    _, payload = open_base64(reply.envelope, domain=w.GRANT_DOMAIN, payload_type=w.GRANT_TYPE)
    assert w.LeaseGrant.model_validate_json(payload).lease_id == lease_id
    await market._revoked_by_peer(w.RevokeRequest(lease_id=lease_id), consumer)
    return lease_id


async def test_two_thousand_leases_keep_bounded_memory() -> None:
    clock = _Clock()
    consumer_keys = create_new_key_pair()
    consumer = str(ID.from_pubkey(consumer_keys.public_key))
    market = _market(clock, consumer)
    first = ""
    most_served = most_quotes = most_history = 0
    for i in range(LEASES):
        clock.now += 1.0
        lease_id = await _open_and_end(market, consumer_keys, consumer, clock)
        first = first or lease_id
        most_served = max(most_served, len(market.served))
        most_quotes = max(most_quotes, len(market._used_quotes))
        most_history = max(most_history, *(len(s.session.history) for s in market.served.values()))
        if i == 0:
            assert [v.lease_id for v in market.leases()] == [lease_id]  # a finished lease still shows
    ledger = market.ledger
    assert isinstance(ledger, _Ledger) and ledger.opened == ledger.ended == LEASES
    print(
        f"\n{LEASES} leases opened and ended: kept {len(market.served)} finished leases (most {most_served}),"
        f" {len(market._used_quotes)} used quotes (most {most_quotes}), session history at most {most_history}"
    )
    assert most_served <= FINISHED_KEEP
    assert most_quotes <= market.settings.quote_valid_s + 1
    assert most_history <= LEASE_HISTORY
    assert len(market.leases()) == len(market.served) <= FINISHED_KEEP

    # The first lease is forgotten: whatever still arrives about it is an unknown lease.
    assert first not in market.served
    for attempt in (
        market._revoked_by_peer(w.RevokeRequest(lease_id=first), consumer),
        market._renew(w.RenewRequest(lease_id=first, expires_at=int(clock.now) + 60), consumer),
        market.revoke(first),
    ):
        with pytest.raises(ClawnodeError) as refused:
            await attempt
        assert refused.value.code == ErrorCode.NOT_FOUND
    assert await market._push_receipt(first) is False

    # Ten minutes on, the rest goes too.
    clock.now += market.finished_keep_s + 1
    market._forget_finished()
    assert market.served == {} and market._finished == {}


async def test_a_used_quote_is_refused_until_it_expires_then_forgotten() -> None:
    clock = _Clock()
    consumer_keys = create_new_key_pair()
    consumer = str(ID.from_pubkey(consumer_keys.public_key))
    market = _market(clock, consumer)
    market.used_quotes_max = 3
    for _ in range(3):
        await _open_and_end(market, consumer_keys, consumer, clock)
        clock.now += 0.25
    with pytest.raises(ClawnodeError) as full:  # all three still valid: the set is full
        await _open_and_end(market, consumer_keys, consumer, clock)
    assert full.value.code == ErrorCode.UNAVAILABLE
    clock.now += 61
    await _open_and_end(market, consumer_keys, consumer, clock)
    assert len(market._used_quotes) == 1


async def test_a_consumer_keeps_a_finished_lease_until_the_providers_claim_is_booked() -> None:
    clock = _Clock()
    consumer_keys = create_new_key_pair()
    consumer = str(ID.from_pubkey(consumer_keys.public_key))
    market = _market(clock, consumer)
    market.finished_keep = 2
    grant = w.LeaseGrant(
        lease_id="ab" * 32,
        quote_id="q",
        provider=consumer,
        consumer=market.peer_id,
        capability=CAPABILITY,
        price_per_unit=10,
        budget=1000,
        expires_at=int(clock.now) + 60,
        token_sha256="0" * 64,
        policy=w.LeasePolicy(max_requests=10, budget_cap=1000, rate_per_minute=10),
        mode="escrow",
    )
    market.held[grant.lease_id] = HeldLease(grant, "token", b"\x01" * 32, committed=500, booked=0)
    market.wake_settlement = lambda: None
    await market._end_held(grant.lease_id, "done")
    clock.now += market.finished_keep_s + 1
    market._forget_finished()
    assert grant.lease_id in market.held  # the provider's claim is still to be booked as spend
    market.held[grant.lease_id].booked = 500
    market._forget_finished()
    assert grant.lease_id not in market.held


def test_finished_to_evict_keeps_the_newest_and_the_unsettled() -> None:
    finished = [(f"l{i}", float(i), i % 2 == 0) for i in range(10)]
    assert finished_to_evict(finished, 5.0, keep=4, keep_s=100) == ["l0", "l1", "l2", "l3", "l4", "l5"]
    assert finished_to_evict(finished, 200.0, keep=20, keep_s=100) == ["l0", "l2", "l4", "l6", "l8"]
    assert finished_to_evict([], 0.0, keep=1, keep_s=1) == []
    with pytest.raises(ClawnodeError):
        finished_to_evict(finished, 0.0, keep=-1, keep_s=1)
    assert quotes_to_forget({"a": 5, "b": 10}, 7) == ["a"]


def test_histories_are_bounded() -> None:
    session = LeaseSession(
        LeasePolicy(max_requests=10**9, budget_cap=10**9, rate_per_minute=10**9, expires_at=10**12),
        1,
        receipt_every_units=1,
        receipt_every_s=1,
        countersign_timeout_s=1,
        abandon_after_s=10**6,
    )
    session.grant(0)
    for i in range(LEASE_HISTORY * 2):
        session.renew(10**12 + i + 1, "consumer")
    assert len(session.history) == LEASE_HISTORY and session.history.total == LEASE_HISTORY * 2 + 1
    history: History[int] = History(3)
    for i in range(5):
        history.append(i)
    assert list(history) == [2, 3, 4] and history[1:] == [3, 4] and history.total == 5
    for twin in (copy.copy(history), copy.deepcopy(history)):  # the task adapter's dry runs copy the book
        assert list(twin) == [2, 3, 4] and twin.maxlen == 3 and twin.total == 5
    assert TaskBook().history.maxlen == TASK_HISTORY


def test_the_task_book_forgets_finished_tasks() -> None:
    """10,000 tasks published and cancelled: the book keeps the newest finished ones, a forgotten id
    stays taken until its deadline, and idle rate-limit entries go."""
    book = TaskBook()
    now = 1_000.0
    for i in range(10_000):
        now += 1.0
        task_id = f"t{i}"
        publish = m.Publish(
            task_id=task_id,
            budget=10,
            deadline=int(now) + 3600,
            allowed_assets=frozenset({"eth"}),
            arbiter="arbiter",
            review_timeout_s=60,
        )
        book.apply(publish, "creator", now)
        book.apply(m.PlaceBid(task_id=task_id, bid_id=f"b{i}", price=5, asset="eth"), f"bidder{i}", now)
        book.apply(m.Cancel(task_id=task_id), "creator", now)
        if i % 10 == 0:  # the adapter's sweep runs once a second
            book.forget_finished(now, frozenset({"t0"}))
            assert len(book.tasks) <= TASK_FINISHED_KEEP
    print(f"\n10000 tasks finished: the book keeps {len(book.tasks)}, history {len(book.history)}")
    assert len(book.history) == TASK_HISTORY
    assert len(book._bid_times) <= 70  # bidders seen in the last minute (and since the last sweep) only
    with pytest.raises(ClawnodeError) as taken:  # forgotten, but its deadline has not passed
        book.apply(publish.model_copy(update={"task_id": "t9000"}), "creator", now)
    assert taken.value.code == ErrorCode.CONFLICT
    with pytest.raises(ClawnodeError) as gone:
        book.get("t9000")
    assert gone.value.code == ErrorCode.NOT_FOUND
    book.forget_finished(now)  # stamps the last ones finished
    now += 3 * 3600
    book.forget_finished(now)
    assert book.tasks == {} and book._forgotten == {}
