"""What a cheating creator (or a bidding stranger) might do: real nodes, gossip, task streams, the dev chain.

An award: a panel task announces the zero address as its arbiter wallet (no single arbiter: the panel's lock
names none either). A creator that announced so could lock the price with ``lock_panel`` under
wallets of its own while the award's params name no panel: every check of the seller passed (payee,
amount, window, the zero arbiter), the seller did the work, and the creator's own wallets then
split the disputed escrow back to the creator.

Silence: a creator that never reviews a delivered result gets its lock back at the lock's deadline +
window (anyone may call ``refund`` on an escrow no dispute froze) unless the seller disputes first, and a
sandboxed seller's node delivers by itself, with nobody watching for the review timeout. The same for a
rejection: it is refunded once its dispute window ends, so a creator that rejected every sandboxed
result got the work unpaid; the arbiter's re-run pays an honest one, so the seller disputes it itself.

Bids: a stranger could place 30 bids a minute on one task, for as long as the task stays open (up to
30 days), each kept in the creator's memory and listed in every view of the task.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import pytest
import trio
from eth_account import Account
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from pydantic import TypeAdapter

from protocols import task_wire as w
from protocols.lease_wire import EscrowLock
from protocols.machines.task_checks import REVOKE_RETRY_MIN_S
from protocols.machines.task_model import RevokeAward
from protocols.settings import MarketSection
from protocols.task import TASK_PROTOCOL
from protocols.task import creator as task_creator
from protocols.task.panel import ZERO_WALLET
from runtime.errors import ClawnodeError, ErrorCode
from runtime.sandbox import Limits
from tests.support import wasm_modules as mods
from tests.support.market import (
    WORD_OFFER,
    WORD_PRICE,
    WORDS,
    SharedChain,
    discovered,
    market_nodes,
    wait_for,
    watching,
)
from wire.rpc import request
from wire.signed import seal, to_base64

CAPABILITY = "model:words"
ETH = 10**18

_ACK = TypeAdapter(w.Ack)

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")


def _fresh_peer() -> str:
    return str(ID.from_pubkey(create_new_key_pair().public_key))


# The arbiter a seller trusts by peer id (escrow.arbiter_peer) with the chain's arbiter wallet (escrow.arbiter):
# a single-arbiter award is taken only when the announcement names that pair. No node runs it here.
ARBITER_PEER = _fresh_peer()
SELLER = {"arbiter_peer": ARBITER_PEER}


async def _award_refusal(creator: Any, seller: Any, envelope: str) -> ClawnodeError:
    """The creator sends the seller a sealed award by hand; the seller's refusal."""
    with pytest.raises(ClawnodeError) as refused:
        await request(creator.host, seller.host.get_id(), TASK_PROTOCOL, w.AwardRequest(envelope=envelope), _ACK)
    return refused.value


async def _award_refused(creator: Any, seller: Any, envelope: str) -> tuple[ErrorCode, str | None]:
    """The code and reason of the seller's refusal of an award sent by hand."""
    refused = await _award_refusal(creator, seller, envelope)
    return refused.code, refused.reason


async def _task_bid_on(creator: Any, seller: Any, arbiter_wallet: str) -> tuple[Any, Any]:
    """The creator publishes a task under the seller's trusted arbiter; the seller, watching, bids half its price."""
    await watching(creator, seller, CAPABILITY)
    view = await creator.tasks.publish(
        CAPABILITY, ETH, 120, params="{}", arbiter_peer=ARBITER_PEER, arbiter_wallet=arbiter_wallet
    )
    await wait_for(lambda: view.task_id in seller.tasks.book.tasks, 30, "announcement")
    return view, await seller.tasks.bid(view.task_id, ETH // 2)


async def _bid_refused(seller: Any, task_id: str) -> tuple[ErrorCode, str | None]:
    """The seller's bid refused before anything is sent (``bid_arbiter_verdict``); the code and reason."""
    with pytest.raises(ClawnodeError) as refused:
        await seller.tasks.bid(task_id, ETH // 2)
    assert not seller.tasks.book.get(task_id).bids  # nothing placed
    return refused.value.code, refused.value.reason


async def _bid_while_trusting(seller: Any, task_id: str, pair: tuple[str, str]) -> Any:
    """The seller bids while it trusts ``pair`` (as an escrow.trusted_arbiters entry), then stops trusting it,
    as when its operator drops the entry: its bid-time check passed, so only the award's check stands."""
    seller.tasks.trusted_arbiters = (*seller.tasks.trusted_arbiters, pair)
    try:
        return await seller.tasks.bid(task_id, ETH // 2)
    finally:
        seller.tasks.trusted_arbiters = tuple(held for held in seller.tasks.trusted_arbiters if held != pair)


async def _two_tasks_bid_on(creator: Any, seller: Any, arbiter_wallet: str) -> tuple[str, str, list[Any]]:
    """The creator publishes two tasks under one arbiter; the seller, watching, bids half the price on each."""
    await watching(creator, seller, CAPABILITY)
    arbiter = ARBITER_PEER
    first, second = [
        (
            await creator.tasks.publish(
                CAPABILITY, ETH, 120, params="{}", arbiter_peer=arbiter, arbiter_wallet=arbiter_wallet
            )
        ).task_id
        for _ in range(2)
    ]
    await wait_for(lambda: {first, second} <= set(seller.tasks.book.tasks), 30, "announcements")
    bids = [await seller.tasks.bid(task_id, ETH // 2) for task_id in (first, second)]
    return first, second, bids


async def test_a_seller_refuses_an_award_locked_under_a_panel_its_params_do_not_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with market_nodes([{}, {}]) as (nodes, _):
        creator, seller = nodes
        await watching(creator, seller, CAPABILITY)
        # Announced as a panel task is: the first "member" takes evidence, no arbiter wallet.
        view = await creator.tasks.publish(
            CAPABILITY, ETH, 120, params="{}", arbiter_peer=_fresh_peer(), arbiter_wallet=ZERO_WALLET
        )
        task_id = view.task_id
        await wait_for(lambda: task_id in seller.tasks.book.tasks, 30, "announcement")
        bid = await seller.tasks.bid(task_id, ETH // 2)

        # The creator's own wallets as the panel of the lock, while the signed params stay "{}".
        sock_wallets = [Account.create().address, Account.create().address]
        sock = w.PanelTerms(
            members=[w.PanelMember(peer=_fresh_peer(), wallet=wallet) for wallet in sock_wallets], threshold=2
        )
        monkeypatch.setattr(creator.tasks, "_panel_of", lambda local: sock)
        awarded = await creator.tasks.award(task_id, bid.bid_id)
        client = creator.escrow_client
        assert client is not None and awarded.escrow_id is not None
        escrow_id = bytes.fromhex(awarded.escrow_id[2:])
        state = await client.chain.run(client.get, client.account.address, escrow_id)
        assert (int(state.arbiter, 16), state.threshold) == (0, 2)
        on_chain = await client.chain.run(client.panel_of, client.account.address, escrow_id)
        assert [a.lower() for a in on_chain] == [a.lower() for a in sock_wallets]

        # The seller did not take it: nothing to deliver, no lease row to serve it under.
        assert seller.tasks.view(task_id).state == "task_open"
        assert seller.tasks.view(task_id).role == "bidder"
        with pytest.raises(ClawnodeError) as unknown:
            await seller.ledger.get_lease(awarded.escrow_id[2:])
        assert unknown.value.code == ErrorCode.NOT_FOUND

        # Sent again by hand, the refusal says why.
        envelope = creator.tasks.local[task_id].award_env
        assert envelope is not None
        assert await _award_refused(creator, seller, envelope) == (ErrorCode.FORBIDDEN, "lock_panel_unnamed")


async def test_a_seller_disputes_a_result_left_unreviewed_past_the_review_timeout() -> None:
    async with market_nodes([{}, SELLER]) as (nodes, shared):
        creator, seller = nodes
        await watching(creator, seller, CAPABILITY)
        view = await creator.tasks.publish(
            CAPABILITY,
            ETH,
            120,
            params="{}",
            arbiter_peer=ARBITER_PEER,
            arbiter_wallet=shared.arbiter.address,
            review_timeout_s=1,
        )
        task_id = view.task_id
        await wait_for(lambda: task_id in seller.tasks.book.tasks, 30, "announcement")
        bid = await seller.tasks.bid(task_id, ETH // 2)
        awarded = await creator.tasks.award(task_id, bid.bid_id)
        assert awarded.escrow_id is not None
        await seller.tasks.submit(task_id, b"the work")
        client = creator.escrow_client
        assert client is not None
        payer, escrow_id = client.account.address, bytes.fromhex(awarded.escrow_id[2:])

        # The creator says nothing. Past the review timeout the seller freezes the lock for the arbiter,
        # so the creator cannot take it back at the lock's deadline + window.
        async def frozen() -> bool:
            state = await client.chain.run(client.get, payer, escrow_id)
            return bool(state.phase == "disputed")

        with trio.fail_after(8):
            while not await frozen():
                await trio.sleep(0.2)
        assert seller.tasks.view(task_id).dispute_state == "dispute_open"


async def test_a_seller_disputes_a_rejection_of_a_sandboxed_result_a_re_run_decides() -> None:
    async with market_nodes([{}, SELLER]) as (nodes, shared):
        creator, seller = nodes
        await watching(creator, seller, "model:wasm-upper")
        view = await creator.tasks.publish_run(
            "model:wasm-upper",
            ETH,
            120,
            kind="wasm",
            module=mods.UPPER,
            input=b"pay me",
            limits=Limits(fuel=1_000_000, memory_bytes=2 * 1024 * 1024, wall_s=5.0, output_bytes=4096),
            arbiter_peer=ARBITER_PEER,
            arbiter_wallet=shared.arbiter.address,
            review_timeout_s=60,
        )
        task_id = view.task_id
        await wait_for(lambda: task_id in seller.tasks.book.tasks, 30, "announcement")
        bid = await seller.tasks.bid(task_id, ETH // 2)
        awarded = await creator.tasks.award(task_id, bid.bid_id)
        assert awarded.escrow_id is not None
        await wait_for(lambda: creator.tasks.view(task_id).result_state == "result_submitted", 20, "result")
        assert creator.tasks.artifact(task_id) == b"PAY ME!\x06"  # the program's own output

        # The creator rejects it and stays quiet: the refund would land once the window ends.
        await creator.tasks.review(task_id, False, "not what I wanted")
        client = creator.escrow_client
        assert client is not None
        payer, escrow_id = client.account.address, bytes.fromhex(awarded.escrow_id[2:])

        async def frozen() -> bool:
            state = await client.chain.run(client.get, payer, escrow_id)
            return bool(state.phase == "disputed")

        with trio.fail_after(6):
            while not await frozen():
                await trio.sleep(0.2)
        assert seller.tasks.view(task_id).dispute_state == "dispute_open"


async def test_one_stranger_places_a_few_bids_on_a_task_not_one_every_two_seconds_for_its_lifetime() -> None:
    async with market_nodes([{}, {}]) as (nodes, _):
        creator, stranger = nodes
        view = await creator.tasks.publish(
            CAPABILITY, ETH, 3600, params="{}", arbiter_peer=_fresh_peer(), arbiter_wallet=ZERO_WALLET[:-1] + "1"
        )
        payee = Account.create().address

        async def bid(index: int) -> None:
            message = w.BidRequest(task_id=view.task_id, bid_id=f"b{index}", price=ETH // 2, payee=payee)
            await request(stranger.host, creator.host.get_id(), TASK_PROTOCOL, message, _ACK)

        limit = creator.tasks.limits.max_bids_per_bidder
        for index in range(limit):
            await bid(index)
        with pytest.raises(ClawnodeError) as refused:
            await bid(limit)
        assert (refused.value.code, refused.value.reason) == (ErrorCode.RATE_LIMITED, "too_many_bids_on_task")
        assert len(creator.tasks.view(view.task_id).bids) == limit
        # Withdrawing frees nothing: a withdrawn bid stays in the task's record.
        await request(
            stranger.host,
            creator.host.get_id(),
            TASK_PROTOCOL,
            w.WithdrawBidRequest(task_id=view.task_id, bid_id="b0"),
            _ACK,
        )
        with pytest.raises(ClawnodeError):
            await bid(limit + 1)


async def test_a_seller_refuses_an_award_that_names_the_lock_of_another_of_its_tasks() -> None:
    async with market_nodes([{}, SELLER]) as (nodes, shared):
        creator, seller = nodes
        first, second, bids = await _two_tasks_bid_on(creator, seller, shared.arbiter.address)
        await creator.tasks.award(first, bids[0].bid_id)
        assert seller.tasks.view(first).role == "awarded_bidder"

        # The second task's award names the first one's lock: one price locked, two tasks' work.
        award = creator.tasks.local[first].award
        assert award is not None
        reused = award.model_copy(
            update={
                "task_id": second,
                "bid_id": bids[1].bid_id,
                "announcement": creator.tasks.local[second].announcement_env,
            }
        )
        envelope = to_base64(seal(reused, creator.tasks.key, domain=w.AWARD_DOMAIN, payload_type=w.AWARD_TYPE))
        assert await _award_refused(creator, seller, envelope) == (ErrorCode.CONFLICT, "lock_of_another_task")
        assert seller.tasks.view(second).state == "task_open"


async def test_a_seller_refuses_an_award_that_names_a_payment_channel_of_its_leases() -> None:
    market = MarketSection(channel_duration_s=600, channel_idle_close_s=3600, channel_margin_s=0)  # type: ignore[call-arg]
    async with market_nodes([{"market": market}, {"offers": (WORD_OFFER,), "market": market, **SELLER}]) as (nodes, _):
        creator, seller = nodes
        await discovered(creator, seller)
        lease = await creator.market.open_lease(
            str(seller.host.get_id()), WORDS, budget=50 * WORD_PRICE, duration_s=60, channel=True
        )
        await creator.market.revoke(lease.lease_id)
        channel = (await creator.market.channels.list(role="consumer"))[0]
        client = creator.escrow_client
        assert client is not None
        state = await client.chain.run(client.get, client.account.address, bytes.fromhex(channel.channel_id[2:]))

        # A task under the channel's arbiter, awarded on the channel's escrow: its vouchers and the task's
        # price would draw on one lock.
        await watching(creator, seller, CAPABILITY)
        view = await creator.tasks.publish(
            CAPABILITY,
            10 * WORD_PRICE,
            120,
            params="{}",
            arbiter_peer=ARBITER_PEER,
            arbiter_wallet=state.arbiter,
            review_timeout_s=60,
        )
        await wait_for(lambda: view.task_id in seller.tasks.book.tasks, 30, "announcement")
        bid = await seller.tasks.bid(view.task_id, 10 * WORD_PRICE)
        notice = w.AwardNotice(
            task_id=view.task_id,
            bid_id=bid.bid_id,
            creator=str(creator.host.get_id()),
            bidder=str(seller.host.get_id()),
            price=10 * WORD_PRICE,
            payee=state.payee,
            arbiter_wallet=state.arbiter,
            chain_id=client.chain.chain_id,
            contract=client.address,
            lock=EscrowLock(payer=client.account.address, escrow_id=channel.channel_id),
            salt=channel.salt,  # the channel's id is bound to the creator's peer id, as an award's lock is
            awarded_at=int(time.time()),
            announcement=creator.tasks.local[view.task_id].announcement_env or "",
            params="{}",
        )
        envelope = to_base64(seal(notice, creator.tasks.key, domain=w.AWARD_DOMAIN, payload_type=w.AWARD_TYPE))
        assert await _award_refused(creator, seller, envelope) == (ErrorCode.CONFLICT, "lock_of_another_task")
        assert seller.tasks.view(view.task_id).state == "task_open"


async def test_a_creator_takes_its_lock_back_from_a_seller_that_delivers_nothing_by_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with market_nodes([{}, SELLER]) as (nodes, shared):
        creator, seller = nodes
        view, bid = await _task_bid_on(creator, seller, shared.arbiter.address)
        awarded = await creator.tasks.award(view.task_id, bid.bid_id)
        assert awarded.escrow_id is not None
        lease_id = awarded.escrow_id[2:]

        # The seller won and goes silent; the task's deadline passes (the creator's clock, moved on).
        monkeypatch.setattr(creator.tasks, "clock", lambda: time.time() + 130)

        async def refund_queued() -> bool:
            rows = await creator.ledger.list_settlements()
            return any(row.lease_id == lease_id and row.kind == "refund" for row in rows)

        with trio.fail_after(5):
            while not await refund_queued():
                await trio.sleep(0.2)
        assert creator.tasks.view(view.task_id).to_creator == ETH // 2
        with pytest.raises(ClawnodeError) as late:  # and a delivery after it counts for nothing
            await seller.tasks.submit(view.task_id, b"late")
        assert late.value.code in (ErrorCode.CONFLICT, ErrorCode.FORBIDDEN)


async def test_a_refused_no_show_revoke_is_tried_again_after_a_wait_not_on_every_sweep(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with market_nodes([{}, SELLER]) as (nodes, shared):
        creator, seller = nodes
        view, bid = await _task_bid_on(creator, seller, shared.arbiter.address)
        awarded = await creator.tasks.award(view.task_id, bid.bid_id)
        assert awarded.escrow_id is not None

        # The creator's book refuses the revoke (as it would a state the sweep did not foresee), every time.
        book, tries, refusing = creator.tasks.book, [], [True]
        apply = book.apply

        def refusing_apply(event: Any, actor: str, now: float) -> Any:
            if isinstance(event, RevokeAward):
                tries.append(now)
                if refusing[0]:
                    raise ClawnodeError(ErrorCode.CONFLICT, "not now", "wrong_state")
            return apply(event, actor, now)

        monkeypatch.setattr(book, "apply", refusing_apply)
        caplog.set_level(logging.INFO, logger="protocols.task")
        skew = [130.0]  # the seller went silent; the task's deadline passes (the creator's clock, moved on)
        monkeypatch.setattr(creator.tasks, "clock", lambda: time.time() + skew[0])
        await wait_for(lambda: bool(tries), 5, "a first try")
        await trio.sleep(3.5)  # three more sweeps
        assert len(tries) == 1
        assert sum("could not be revoked" in record.getMessage() for record in caplog.records) == 1

        # Once its wait has passed, the revoke is tried again and the lock's refund queued.
        refusing[0] = False
        skew[0] += REVOKE_RETRY_MIN_S
        lease_id = awarded.escrow_id[2:]

        async def refund_queued() -> bool:
            rows = await creator.ledger.list_settlements()
            return any(row.lease_id == lease_id and row.kind == "refund" for row in rows)

        with trio.fail_after(5):
            while not await refund_queued():
                await trio.sleep(0.2)
        assert len(tries) == 2


async def test_a_seller_refuses_an_award_whose_arbiter_is_a_wallet_its_node_does_not_trust() -> None:
    async with market_nodes([{}, {}]) as (nodes, _):
        creator, seller = nodes
        await watching(creator, seller, "model:wasm-upper")
        # The creator names a second wallet of its own as the arbiter: it could reject the result, dispute
        # and resolve the whole lock back to itself from that wallet, with nobody watching the seller's node.
        sock, sock_peer = Account.create().address, _fresh_peer()
        view = await creator.tasks.publish_run(
            "model:wasm-upper",
            ETH,
            120,
            kind="wasm",
            module=mods.UPPER,
            input=b"pay me",
            limits=Limits(fuel=1_000_000, memory_bytes=2 * 1024 * 1024, wall_s=5.0, output_bytes=4096),
            arbiter_peer=sock_peer,
            arbiter_wallet=sock,
            review_timeout_s=60,
        )
        task_id = view.task_id
        await wait_for(lambda: task_id in seller.tasks.book.tasks, 30, "announcement")
        # Refused up front, with the award's verdict: no bid reaches the creator.
        assert await _bid_refused(seller, task_id) == (ErrorCode.FORBIDDEN, "award_untrusted_arbiter")
        assert not creator.tasks.view(task_id).bids

        # A bid placed while the seller trusted that arbiter: the award is refused all the same.
        bid = await _bid_while_trusting(seller, task_id, (sock_peer, sock))
        awarded = await creator.tasks.award(task_id, bid.bid_id)
        assert awarded.escrow_id is not None

        # The seller did not take it: no lease row to serve it under, nothing run, nothing delivered.
        assert seller.tasks.view(task_id).state == "task_open"
        with pytest.raises(ClawnodeError) as unknown:
            await seller.ledger.get_lease(awarded.escrow_id[2:])
        assert unknown.value.code == ErrorCode.NOT_FOUND
        await trio.sleep(1.0)
        assert creator.tasks.view(task_id).result_state != "result_submitted"
        assert seller.tasks.local[task_id].result_env is None

        # Sent again by hand, the refusal says why.
        envelope = creator.tasks.local[task_id].award_env
        assert envelope is not None
        assert await _award_refused(creator, seller, envelope) == (ErrorCode.FORBIDDEN, "award_untrusted_arbiter")


async def test_a_seller_refuses_an_award_pairing_its_arbiters_wallet_with_another_peer_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The unset node refuses its award as UNAVAILABLE (no_trusted_arbiter), which the creator's push
    # retries after 1 s and 2 s: the refusal is checked, not the retries.
    monkeypatch.setattr(task_creator, "PUSH_ATTEMPTS", 1)
    # The seller knows its arbiter by peer id (escrow.arbiter_peer); the third node does not (unset).
    async with market_nodes([{}, SELLER, {}]) as (nodes, shared):
        creator, seller, unset = nodes
        await watching(creator, seller, CAPABILITY)
        await watching(creator, unset, CAPABILITY)
        # The trusted wallet under a peer id the creator holds (a fresh one): the seller's dispute would go
        # there, the real arbiter would never hear of it, and the disputed price (no timeout refunds it) stays
        # frozen.
        tasks = [
            (
                await creator.tasks.publish(
                    CAPABILITY, ETH, 120, params="{}", arbiter_peer=peer, arbiter_wallet=shared.arbiter.address
                )
            ).task_id
            for peer in (_fresh_peer(), ARBITER_PEER)
        ]
        await wait_for(lambda: set(tasks) <= set(seller.tasks.book.tasks) & set(unset.tasks.book.tasks), 30)
        # Refused up front with the award's verdicts (below); then bid on while each trusted the pair, as the
        # award is still checked on its own.
        assert await _bid_refused(seller, tasks[0]) == (ErrorCode.FORBIDDEN, "award_untrusted_arbiter")
        assert await _bid_refused(unset, tasks[1]) == (ErrorCode.UNAVAILABLE, "no_trusted_arbiter")
        announced = [(creator.tasks.book.get(task_id).arbiter, shared.arbiter.address) for task_id in tasks]
        bid = await _bid_while_trusting(seller, tasks[0], announced[0])
        awarded = await creator.tasks.award(tasks[0], bid.bid_id)
        refusal = await _took_nothing(creator, seller, tasks[0], awarded.escrow_id)
        assert refusal == (ErrorCode.FORBIDDEN, "award_untrusted_arbiter")
        envelope = creator.tasks.local[tasks[0]].award_env
        assert envelope is not None
        assert "another peer id" in (await _award_refusal(creator, seller, envelope)).message

        # The honest pair, to a node that does not know its arbiter's peer id: it says what to set.
        bid = await _bid_while_trusting(unset, tasks[1], announced[1])
        awarded = await creator.tasks.award(tasks[1], bid.bid_id)
        refusal = await _took_nothing(creator, unset, tasks[1], awarded.escrow_id)
        assert refusal == (ErrorCode.UNAVAILABLE, "no_trusted_arbiter")
        envelope = creator.tasks.local[tasks[1]].award_env
        assert envelope is not None
        assert "escrow.arbiter_peer" in (await _award_refusal(creator, unset, envelope)).message


async def _publish_panel_tasks(creator: Any, panels: list[w.PanelTerms]) -> list[str]:
    """The creator publishes one wasm task per panel."""
    tasks = []
    for panel in panels:
        view = await creator.tasks.publish_run(
            "model:wasm-upper",
            ETH,
            120,
            kind="wasm",
            module=mods.UPPER,
            input=b"pay me",
            limits=Limits(fuel=1_000_000, memory_bytes=2 * 1024 * 1024, wall_s=5.0, output_bytes=4096),
            review_timeout_s=60,
            panel=panel,
        )
        tasks.append(view.task_id)
    return tasks


async def _took_nothing(creator: Any, seller: Any, task_id: str, escrow_id: str | None) -> tuple[ErrorCode, str | None]:
    """The seller did not take the award (no lease row, nothing run or delivered); the reason it gives."""
    assert escrow_id is not None
    assert seller.tasks.view(task_id).state == "task_open"
    with pytest.raises(ClawnodeError) as unknown:
        await seller.ledger.get_lease(escrow_id[2:])
    assert unknown.value.code == ErrorCode.NOT_FOUND
    assert seller.sandbox.stats.runs.get("wasm", 0) == 0
    assert seller.tasks.local[task_id].result_env is None
    envelope = creator.tasks.local[task_id].award_env
    assert envelope is not None
    return await _award_refused(creator, seller, envelope)


async def test_a_seller_refuses_an_award_whose_panel_the_creators_own_wallets_could_decide() -> None:
    # Both sellers trust their own arbiter (the shared chain's) at the peer id escrow.arbiter_peer names; the
    # third node trusts one more arbiter (escrow.trusted_arbiters, PEER:WALLET).
    sock = [(_fresh_peer(), Account.create().address) for _ in range(2)]
    arbiter_peer = _fresh_peer()
    shared = await trio.to_thread.run_sync(SharedChain.start)
    ours: dict[str, Any] = {"arbiter_peer": arbiter_peer}
    specs = [{}, ours, {**ours, "trusted_arbiters": (f"{sock[0][0]}:{sock[0][1]}",)}]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        creator, seller, trusting = nodes
        await watching(creator, seller, "model:wasm-upper")
        await watching(creator, trusting, "model:wasm-upper")
        # The panel seats the arbiter the sellers trust, beside two wallets of the creator's own under fresh
        # peer ids: those two agree, reach the threshold without it and split the disputed price back.
        members = [(arbiter_peer, shared.arbiter.address), *sock]
        panel = w.PanelTerms(members=[w.PanelMember(peer=p, wallet=a) for p, a in members], threshold=2)
        tasks = await _publish_panel_tasks(creator, [panel, panel])
        await wait_for(lambda: set(tasks) <= set(seller.tasks.book.tasks) & set(trusting.tasks.book.tasks), 30)
        bid = await seller.tasks.bid(tasks[0], ETH // 2)
        awarded = await creator.tasks.award(tasks[0], bid.bid_id)
        refusal = await _took_nothing(creator, seller, tasks[0], awarded.escrow_id)
        assert refusal == (ErrorCode.FORBIDDEN, "panel_untrusted")

        # A seller that trusts one of the two as well (two trusted of three, m = 2): the others cannot decide.
        bid = await trusting.tasks.bid(tasks[1], ETH // 2)
        await creator.tasks.award(tasks[1], bid.bid_id)
        assert trusting.tasks.view(tasks[1]).role == "awarded_bidder"


async def test_a_seller_refuses_a_panel_seating_a_trusted_wallet_under_another_peer_or_too_few_it_trusts() -> None:
    # The seller trusts its own arbiter (at escrow.arbiter_peer) and one more arbiter, each as PEER:WALLET.
    trusted = (_fresh_peer(), Account.create().address)
    arbiter_peer, creators_peer = _fresh_peer(), _fresh_peer()  # the second: a peer id the creator holds
    shared = await trio.to_thread.run_sync(SharedChain.start)
    seller_spec = {"arbiter_peer": arbiter_peer, "trusted_arbiters": (f"{trusted[0]}:{trusted[1]}",)}
    async with market_nodes([{}, seller_spec], chain=shared) as ((creator, seller), _):
        await watching(creator, seller, "model:wasm-upper")
        sock = (_fresh_peer(), Account.create().address)
        panels = [
            # Both trusted wallets, one under the creator's peer id: the case goes there, the trusted arbiter
            # never hears of it, and the creator's two members decide.
            [(creators_peer, shared.arbiter.address), trusted, sock],
            # One trusted arbiter and the creator's member, m = 2: the creator's member cannot decide alone, but
            # its silence keeps any split from m votes, and the disputed lock (no timeout refunds it) stays frozen.
            [(arbiter_peer, shared.arbiter.address), sock],
            # The two trusted arbiters, each under its own peer id, beside the creator's member: taken.
            [(arbiter_peer, shared.arbiter.address), trusted, sock],
        ]
        terms = [
            w.PanelTerms(members=[w.PanelMember(peer=p, wallet=a) for p, a in seats], threshold=2) for seats in panels
        ]
        tasks = await _publish_panel_tasks(creator, terms)
        await wait_for(lambda: set(tasks) <= set(seller.tasks.book.tasks), 30)
        for task_id in tasks[:2]:
            bid = await seller.tasks.bid(task_id, ETH // 2)
            awarded = await creator.tasks.award(task_id, bid.bid_id)
            refusal = await _took_nothing(creator, seller, task_id, awarded.escrow_id)
            assert refusal == (ErrorCode.FORBIDDEN, "panel_untrusted")
        bid = await seller.tasks.bid(tasks[2], ETH // 2)
        await creator.tasks.award(tasks[2], bid.bid_id)
        assert seller.tasks.view(tasks[2]).role == "awarded_bidder"


async def test_two_awards_naming_one_lock_at_once_pay_one_task_only() -> None:
    async with market_nodes([{}, SELLER]) as (nodes, shared):
        creator, seller = nodes
        first, second, bids = await _two_tasks_bid_on(creator, seller, shared.arbiter.address)

        async def hold(peer: str, message: object, *, attempts: int = 1) -> None:
            return None  # the lock is made and the award sealed; the creator sends it below, twice at once

        creator.tasks._push = hold  # type: ignore[method-assign]
        await creator.tasks.award(first, bids[0].bid_id)
        award = creator.tasks.local[first].award
        assert award is not None
        reused = award.model_copy(
            update={
                "task_id": second,
                "bid_id": bids[1].bid_id,
                "announcement": creator.tasks.local[second].announcement_env,
            }
        )
        envelopes = [
            to_base64(seal(notice, creator.tasks.key, domain=w.AWARD_DOMAIN, payload_type=w.AWARD_TYPE))
            for notice in (award, reused)
        ]
        refusals: list[ClawnodeError] = []

        async def send(envelope: str) -> None:
            try:
                message = w.AwardRequest(envelope=envelope)
                await request(creator.host, seller.host.get_id(), TASK_PROTOCOL, message, _ACK)
            except ClawnodeError as error:
                refusals.append(error)

        async with trio.open_nursery() as nursery:
            for envelope in envelopes:
                nursery.start_soon(send, envelope)
        assert [(error.code, error.reason) for error in refusals] == [(ErrorCode.CONFLICT, "lock_of_another_task")]
        roles = [seller.tasks.view(task_id).role for task_id in (first, second)]
        assert roles.count("awarded_bidder") == 1


async def test_a_seller_refuses_an_award_whose_parameters_are_not_those_of_the_task_it_bid_on() -> None:
    """The creator announces one set of parameters, takes a bid, then awards other ones (here arbitration
    by a person, which no arbiter decides by itself): the seller refuses before it runs anything."""
    async with market_nodes([{}, SELLER]) as (nodes, shared):
        creator, seller = nodes
        view, bid = await _task_bid_on(creator, seller, shared.arbiter.address)
        creator.tasks.local[view.task_id].params = '{"arbitration": "person"}'
        with contextlib.suppress(ClawnodeError):
            await creator.tasks.award(view.task_id, bid.bid_id)
        await trio.sleep(0.5)
        assert seller.tasks.view(view.task_id).state == "task_open"
