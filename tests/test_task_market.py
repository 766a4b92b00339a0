"""The task market end to end: real nodes, gossip, ``/clawnode/task/1.0.0`` streams, ledgers, escrow.

publish → gossip → bids → award (price locked on chain) → result → accept → release; reject →
dispute → arbiter split; and the requests a careless or hostile peer might send.
"""

from __future__ import annotations

import hashlib
import time

import pytest
import trio
from eth_account import Account
from pydantic import TypeAdapter

from node.daemon import Node
from protocols import task_wire as w
from protocols.gossip import task_topic
from protocols.machines.task import TaskState
from protocols.task import TASK_PROTOCOL
from runtime.errors import ClawnodeError, ErrorCode
from tests.support.market import SharedChain, market_nodes, wait_for
from wire.rpc import request
from wire.signed import seal, to_base64

CAPABILITY = "model:words"
ETH = 10**18
BUDGET = ETH
_ACK = TypeAdapter(w.Ack)

# Every log line these tests produce is checked for local paths.
pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")


def _peer(node: Node) -> str:
    return str(node.host.get_id())


def _wallet(node: Node) -> str:
    return str(node.escrow_client.account.address)


async def _publish(creator: Node, bidders: list[Node], arbiter: Node, shared: SharedChain) -> str:
    """Bidders watch the capability; the creator announces once pubsub knows they listen."""
    for bidder in bidders:
        await bidder.tasks.watch(CAPABILITY)
    topic = task_topic(CAPABILITY)
    wanted = {bidder.host.get_id() for bidder in bidders}
    await wait_for(lambda: wanted <= set(creator.announcements.pubsub.peer_topics.get(topic, ())), 30, "subscriptions")
    view = await creator.tasks.publish(
        CAPABILITY,
        BUDGET,
        120,
        summary="count the words",
        params='{"prompt": "one two three"}',
        arbiter_peer=_peer(arbiter),
        arbiter_wallet=shared.arbiter.address,
        review_timeout_s=60,
    )
    assert view.role == "creator" and view.state == "task_open"
    for bidder in bidders:
        await wait_for(lambda b=bidder: view.task_id in b.tasks.book.tasks, 30, "announcement")  # type: ignore[misc]
    return view.task_id


def _state(node: Node, task_id: str) -> str:
    return str(node.tasks.book.get(task_id).state)


async def _wait_closed(nodes: list[Node], task_id: str) -> None:
    for node in nodes:
        await wait_for(lambda n=node: _state(n, task_id) == TaskState.CLOSED, 30, "task closed")  # type: ignore[misc]


async def _wait_landed(node: Node, lease_id: str, timeout_s: float = 30) -> None:
    with trio.fail_after(timeout_s):
        while True:
            pending = [s for s in await node.ledger.list_settlements() if s.lease_id == lease_id]
            if pending and all(s.state == "landed" for s in pending):
                return
            node._wake_settlement()
            await trio.sleep(0.2)


async def _task_row_closed(node: Node, task_id: str) -> bool:
    entries = await node.ledger.audit_entries(limit=1000)
    return any(e.kind == "task.state" and e.subject == task_id and e.data["to"] == "task_closed" for e in entries)


async def _chain_state(node: Node, payer: str, escrow_id: str) -> object:
    client = node.escrow_client
    return await client.chain.run(client.get, payer, bytes.fromhex(escrow_id[2:]))


async def test_publish_bid_award_deliver_accept_release() -> None:
    shared = await trio.to_thread.run_sync(SharedChain.start)
    # Each node knows its arbiter by peer id (escrow.arbiter_peer): a seller trusts the announced pair.
    specs = [{"arbiter": 3}, {"arbiter": 3}, {"arbiter": 3}, {"wallet_key": shared.arbiter.key.hex()}]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        creator, b1, b2, arbiter = nodes
        task_id = await _publish(creator, [b1, b2], arbiter, shared)

        price1, price2 = BUDGET // 2, BUDGET // 4
        bid1 = await b1.tasks.bid(task_id, price1)
        bid2 = await b2.tasks.bid(task_id, price2)
        assert {b.bid_id for b in creator.tasks.view(task_id).bids} == {bid1.bid_id, bid2.bid_id}

        view = await creator.tasks.award(task_id, bid1.bid_id)
        assert view.state == "task_awarded" and view.price == price1 and view.escrow_id
        state = await _chain_state(creator, _wallet(creator), view.escrow_id)
        assert state.phase == "active" and state.amount == price1  # type: ignore[attr-defined]
        assert state.payee == _wallet(b1) and state.arbiter == shared.arbiter.address  # type: ignore[attr-defined]
        assert b1.tasks.view(task_id).role == "awarded_bidder"
        assert b1.tasks.view(task_id).state == "task_awarded"

        # Only the awarded bidder may deliver: the creator's book refuses the other one.
        with pytest.raises(ClawnodeError) as refused:
            await b2.tasks.submit(task_id, b"me too")
        assert refused.value.code == ErrorCode.FORBIDDEN

        artifact = b"three words counted"
        await b1.tasks.submit(task_id, artifact)
        assert creator.tasks.artifact(task_id) == artifact
        assert creator.tasks.view(task_id).result_hash == hashlib.sha256(artifact).hexdigest()

        await creator.tasks.review(task_id, True, "thanks")
        await _wait_closed([creator, b1], task_id)
        lease_id = view.escrow_id[2:]
        await _wait_landed(creator, lease_id)
        await _wait_landed(b1, lease_id)

        state = await _chain_state(creator, _wallet(creator), view.escrow_id)
        assert state.phase == "closed" and state.released == price1  # type: ignore[attr-defined]
        client = creator.escrow_client
        assert await client.chain.run(client.credit_of, _wallet(b1)) == price1
        creator_lease = await creator.ledger.get_lease(lease_id)
        bidder_lease = await b1.ledger.get_lease(lease_id)
        assert creator_lease.role == "consumer" and bidder_lease.role == "provider"
        assert creator_lease.settled_amount == bidder_lease.settled_amount == price1
        assert creator_lease.refunded_amount == bidder_lease.refunded_amount == 0
        spend = {t.key: t.spend for t in await creator.ledger.totals_by_peer()}
        income = {t.key: t.income for t in await b1.ledger.totals_by_peer()}
        assert spend[_peer(b1)] == price1 and income[_peer(creator)] == price1
        for node in (creator, b1):
            assert await _task_row_closed(node, task_id)
            assert (await node.ledger.verify_audit()).ok
        # The losing bidder's book still shows its own bid; nothing was locked for it.
        assert b2.tasks.view(task_id).role == "bidder"


async def test_reject_dispute_and_arbiter_split() -> None:
    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [{"arbiter": 2}, {"arbiter": 2}, {"wallet_key": shared.arbiter.key.hex()}]  # escrow.arbiter_peer
    async with market_nodes(specs, chain=shared) as (nodes, _):
        creator, bidder, arbiter = nodes
        task_id = await _publish(creator, [bidder], arbiter, shared)
        price = BUDGET // 2
        bid = await bidder.tasks.bid(task_id, price)
        view = await creator.tasks.award(task_id, bid.bid_id)
        assert view.escrow_id is not None
        await bidder.tasks.submit(task_id, b"an honest answer")
        await creator.tasks.review(task_id, False, "not what I asked for")
        await wait_for(lambda: bidder.tasks.view(task_id).result_state == "result_rejected", 10, "review")

        await bidder.tasks.dispute(task_id, "it is exactly what was asked")
        state = await _chain_state(creator, _wallet(creator), view.escrow_id)
        assert state.phase == "disputed"  # type: ignore[attr-defined]
        await wait_for(lambda: creator.tasks.view(task_id).dispute_state == "dispute_open", 10, "creator told")
        assert arbiter.tasks.view(task_id).role == "arbiter"
        assert arbiter.tasks.view(task_id).dispute_state == "dispute_open"

        await _evidence_reaches_the_arbiter(creator, bidder, arbiter, task_id)

        to_bidder = price * 60 // 100
        to_creator = price - to_bidder
        with pytest.raises(ClawnodeError) as refused:
            await creator.tasks.resolve(task_id, price)
        assert refused.value.code == ErrorCode.FORBIDDEN

        resolved = await arbiter.tasks.resolve(task_id, to_bidder)
        assert resolved.dispute_state == "dispute_resolved"
        with pytest.raises(ClawnodeError) as refused:
            await bidder.tasks.add_evidence(task_id, "one more thing")
        assert refused.value.code == ErrorCode.CONFLICT  # the dispute is decided
        await _wait_closed([creator, bidder], task_id)
        lease_id = view.escrow_id[2:]
        await _wait_landed(bidder, lease_id)
        await _wait_landed(creator, lease_id)

        state = await _chain_state(creator, _wallet(creator), view.escrow_id)
        assert state.phase == "closed" and state.released == to_bidder  # type: ignore[attr-defined]
        client = creator.escrow_client
        assert await client.chain.run(client.credit_of, _wallet(bidder)) == to_bidder
        assert await client.chain.run(client.credit_of, _wallet(creator)) == to_creator
        for node in (creator, bidder):
            (dispute,) = await node.ledger.list_disputes()
            assert dispute.state == "dispute_resolved" and dispute.opened_by == _peer(bidder)
            assert (dispute.to_payee, dispute.to_payer) == (to_bidder, to_creator)
            lease = await node.ledger.get_lease(lease_id)
            assert lease.state == "lease_settled"
            assert (lease.settled_amount, lease.refunded_amount) == (to_bidder, to_creator)
            assert node.tasks.view(task_id).receipt_state == "receipt_settled"
            assert await _task_row_closed(node, task_id)
            assert (await node.ledger.verify_audit()).ok
        assert (creator.tasks.view(task_id).to_bidder, creator.tasks.view(task_id).to_creator) == (
            to_bidder,
            to_creator,
        )


async def _evidence_reaches_the_arbiter(creator: Node, bidder: Node, arbiter: Node, task_id: str) -> None:
    """Both parties add signed evidence to the open dispute; the arbiter (and the other party) keep it."""
    log_lines = b"step 1: counted 3 words\nstep 2: answered 3\n"
    view = await bidder.tasks.add_evidence(task_id, "the run's log: the answer matches the prompt", log_lines)
    (piece,) = view.evidence
    assert piece.submitted_by == _peer(bidder) and piece.size == len(log_lines)
    assert piece.content_hash == hashlib.sha256(log_lines).hexdigest()
    for node in (arbiter, creator):
        await wait_for(lambda n=node: len(n.tasks.view(task_id).evidence) == 1, 10, "evidence delivered")  # type: ignore[misc]
        assert node.tasks.view(task_id).evidence[0].note == piece.note
    assert await arbiter.tasks.evidence_attachment(task_id, piece.evidence_id) == log_lines
    (kept,) = await arbiter.ledger.list_evidence(task_id)
    assert kept.evidence_id == piece.evidence_id and kept.submitted_by == _peer(bidder)

    # The creator answers; the same piece sent again stays one piece.
    await creator.tasks.add_evidence(task_id, "the prompt asked for a sentence, not a count")
    again = await bidder.tasks.add_evidence(task_id, piece.note, log_lines)
    assert [e.evidence_id for e in again.evidence].count(piece.evidence_id) == 1
    await wait_for(lambda: len(arbiter.tasks.view(task_id).evidence) == 2, 10, "both parties heard")
    assert {e.submitted_by for e in arbiter.tasks.view(task_id).evidence} == {_peer(creator), _peer(bidder)}
    assert len(await arbiter.ledger.list_evidence(task_id)) == 2

    # What a careless or hostile party might send.
    for note, attachment, code in (
        ("", b"", ErrorCode.INVALID_ARGUMENT),
        ("x" * (w.MAX_EVIDENCE_NOTE + 1), b"", ErrorCode.INVALID_ARGUMENT),
        ("big", b"x" * (w.MAX_EVIDENCE_ATTACHMENT + 1), ErrorCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(ClawnodeError) as error:
            await bidder.tasks.add_evidence(task_id, note, attachment)
        assert error.value.code == code
    with pytest.raises(ClawnodeError) as error:
        await arbiter.tasks.add_evidence(task_id, "the arbiter judges, it does not testify")
    assert error.value.code == ErrorCode.FORBIDDEN

    async def send_to_arbiter(notice: w.EvidenceNotice, key: object, attachment: bytes) -> None:
        envelope = to_base64(seal(notice, key, domain=w.EVIDENCE_DOMAIN, payload_type=w.EVIDENCE_TYPE))  # type: ignore[arg-type]
        message = w.EvidenceRequest(envelope=envelope, attachment=to_base64(attachment))
        await request(bidder.host, arbiter.host.get_id(), TASK_PROTOCOL, message, _ACK, max_frame=w.MAX_TASK_FRAME)

    forged = w.EvidenceNotice(
        task_id=task_id,
        party=_peer(bidder),
        note="the attachment is not what the signature says",
        content_hash=hashlib.sha256(b"one thing").hexdigest(),
        size=9,
        submitted_at=int(time.time()),
    )
    with pytest.raises(ClawnodeError) as error:
        await send_to_arbiter(forged, bidder.tasks.key, b"another")
    assert (error.value.code, error.value.reason) == (ErrorCode.INVALID_ARGUMENT, "attachment_mismatch")
    as_creator = forged.model_copy(
        update={"party": _peer(creator), "content_hash": hashlib.sha256(b"").hexdigest(), "size": 0}
    )
    with pytest.raises(ClawnodeError) as error:
        await send_to_arbiter(as_creator, creator.tasks.key, b"")  # signed by the creator, sent by the bidder
    assert error.value.code == ErrorCode.FORBIDDEN
    assert len(arbiter.tasks.view(task_id).evidence) == 2


async def test_adversarial_requests_are_refused() -> None:
    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [{"arbiter": 2}, {"arbiter": 2}, {"wallet_key": shared.arbiter.key.hex()}]  # escrow.arbiter_peer
    async with market_nodes(specs, chain=shared) as (nodes, _):
        creator, bidder, arbiter = nodes
        task_id = await _publish(creator, [bidder], arbiter, shared)
        creator_id = creator.host.get_id()

        async def send(message: w.BaseModel) -> None:  # type: ignore[name-defined]
            await request(bidder.host, creator_id, TASK_PROTOCOL, message, _ACK, max_frame=w.MAX_TASK_FRAME)

        # Unknown task: refused locally and by the creator.
        with pytest.raises(ClawnodeError) as error:
            await bidder.tasks.bid("no-such-task", 1)
        assert error.value.code == ErrorCode.NOT_FOUND
        with pytest.raises(ClawnodeError) as error:
            await send(w.BidRequest(task_id="no-such-task", bid_id="b1", price=1, payee=_wallet(bidder)))
        assert error.value.code == ErrorCode.NOT_FOUND

        # Over budget: refused locally and by the creator.
        with pytest.raises(ClawnodeError) as error:
            await bidder.tasks.bid(task_id, BUDGET + 1)
        assert error.value.code == ErrorCode.CONFLICT
        with pytest.raises(ClawnodeError) as error:
            await send(w.BidRequest(task_id=task_id, bid_id="b1", price=BUDGET + 1, payee=_wallet(bidder)))
        assert error.value.code == ErrorCode.CONFLICT

        # No award without a lock: an unfunded wallet cannot lock, and the task stays open.
        price = BUDGET // 2
        bid = await bidder.tasks.bid(task_id, price)
        funded = creator.escrow_client
        creator.escrow_client = funded.for_account(Account.create())
        try:
            with pytest.raises(ClawnodeError) as error:
                await creator.tasks.award(task_id, bid.bid_id)
            assert error.value.code in (ErrorCode.INSUFFICIENT_FUNDS, ErrorCode.CONFLICT)
        finally:
            creator.escrow_client = funded
        assert _state(creator, task_id) == TaskState.OPEN
        assert all(lease.state == "lease_ended" for lease in await creator.ledger.list_leases())

        view = await creator.tasks.award(task_id, bid.bid_id)
        assert view.state == "task_awarded"

        # A result whose artifact does not match its signed hash.
        notice = w.ResultNotice(
            task_id=task_id,
            bidder=_peer(bidder),
            content_hash=hashlib.sha256(b"something else").hexdigest(),
            size=5,
            submitted_at=int(time.time()),
        )
        envelope = to_base64(seal(notice, bidder.tasks.key, domain=w.RESULT_DOMAIN, payload_type=w.RESULT_TYPE))
        with pytest.raises(ClawnodeError) as error:
            await send(w.ResultRequest(envelope=envelope, artifact=to_base64(b"abcde")))
        # The reason travels in the error frame: a program can tell a bad artifact from a bad signature.
        assert (error.value.code, error.value.reason) == (ErrorCode.INVALID_ARGUMENT, "artifact_mismatch")

        # An oversized artifact: refused before sending, and by the creator when sent anyway.
        big = b"x" * (w.MAX_ARTIFACT + 1)
        with pytest.raises(ClawnodeError) as error:
            await bidder.tasks.submit(task_id, big)
        assert error.value.code == ErrorCode.INVALID_ARGUMENT
        oversized = w.ResultNotice.model_construct(
            task_id=task_id,
            bidder=_peer(bidder),
            content_hash=hashlib.sha256(big).hexdigest(),
            size=len(big),
            submitted_at=int(time.time()),
        )
        envelope = to_base64(seal(oversized, bidder.tasks.key, domain=w.RESULT_DOMAIN, payload_type=w.RESULT_TYPE))
        with pytest.raises(ClawnodeError) as error:
            await send(w.ResultRequest.model_construct(type="result", envelope=envelope, artifact=to_base64(big)))
        assert error.value.code == ErrorCode.INVALID_ARGUMENT

        # Nobody but the arbiter resolves.
        for node in (creator, bidder):
            with pytest.raises(ClawnodeError) as error:
                await node.tasks.resolve(task_id, 1)
            assert error.value.code == ErrorCode.FORBIDDEN

        # None of that disturbed the task: the real result is still taken.
        await bidder.tasks.submit(task_id, b"fine")
        assert creator.tasks.view(task_id).result_state == "result_submitted"
