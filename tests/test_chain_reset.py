"""A dev chain that resets under running nodes, and a lock whose receipt wait times out but lands.

- The pure rule (``runtime.escrow.reconcile.judge``): its table, and properties over every input.
- The ledger's moves: a flagged settlement is never due again; moves outside the tables are refused.
- On a real anvil chain with real daemons (a provider and a consumer):
  * ``anvil_reset`` after a lease's lock landed (the contract deployed again at the same address):
    the reconciliation flags what the chain does not know (status, /metrics, ``EscrowLedgerMismatch``),
    nothing is retried, and a new lease locks at once with a nonce re-read from the chain (it used to
    reuse the stale one and wait 120 s);
  * a lock mined only after its receipt wait gave up (the lease open failed ``E_TIMEOUT``): the
    reconciliation finds it on chain and queues its refund, which lands; no wei stays locked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from node.cli import _escrow_mismatch_lines
from node.daemon import Node
from node.datadir import read_api_token
from runtime.errors import ClawnodeError, ErrorCode
from runtime.escrow import Chain, EscrowClient
from runtime.escrow.reconcile import FLAG_REASONS, ChainEscrow, ChainPhase, LedgerRow, RowKind, RowState, judge
from runtime.escrow.settings import fund_from_dev_account
from runtime.ledger import EscrowRef, LedgerError, LedgerStore
from tests.runtime.support import anvil_popen, anvil_skip_reason, lease_for, peer_key
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, SharedChain, market_nodes, metric_samples

_skip = anvil_skip_reason()
needs_anvil = pytest.mark.skipif(_skip is not None, reason=_skip or "")

PROMPT = "the quick brown fox jumps over the lazy dog again"  # 10 words

# -- the pure rule --

rows = st.builds(
    LedgerRow,
    kind=st.sampled_from(get_args(RowKind)),
    state=st.sampled_from(get_args(RowState)),
    lease_open=st.booleans(),
    last_error=st.sampled_from([None, "not_found", "no_escrow_contract", "bad_signature", "too_early"]),
    lock_landed=st.sampled_from([None, True, False]),
    booked=st.integers(0, 10**18),
)
chains = st.builds(
    ChainEscrow,
    phase=st.sampled_from(get_args(ChainPhase)),
    amount=st.integers(0, 10**18),
    released=st.integers(0, 10**18),
)


@given(rows, chains)
def test_the_rule_never_refunds_what_the_chain_does_not_hold_and_flags_only_with_a_reason(
    row: LedgerRow, chain: ChainEscrow
) -> None:
    verdict = judge(row, chain)
    if verdict.action in ("refund", "resume"):
        assert chain.phase != "none"  # only an escrow the chain holds is refunded or settled again
        assert row.kind == "lock" if verdict.action == "refund" else row.state == "failed"
    if verdict.action == "flag":
        assert verdict.reason in FLAG_REASONS
    if chain.phase == "none":
        assert verdict.action in ("ok", "wait", "flag")
    if row.kind == "lock" and row.lease_open and row.state in ("intent", "sent", "unknown"):
        assert verdict.action == "wait"  # a lock in flight is never judged


def test_the_rule_on_a_reset_chain_and_on_a_late_lock() -> None:
    gone = ChainEscrow("none")
    active = ChainEscrow("active", amount=100, released=0)
    # After a reset: every claim the ledger queued, retried or booked is flagged.
    for state in ("pending", "landed"):
        assert judge(LedgerRow("claim", state), gone).action == "flag"  # type: ignore[arg-type]
    assert judge(LedgerRow("claim", "failed", last_error="not_found"), gone).action == "flag"
    assert judge(LedgerRow("claim", "failed", last_error="bad_signature"), gone).action == "ok"
    assert judge(LedgerRow("lock", "landed"), gone).action == "flag"
    assert judge(LedgerRow("refund", "failed", last_error="not_found", lock_landed=True), gone).action == "flag"
    # A refund of a lock that never landed fails harmlessly: nothing to flag.
    assert judge(LedgerRow("refund", "failed", last_error="not_found", lock_landed=False), gone).action == "ok"
    # A claim the chain paid less than the ledger booked (the chain went back to before it).
    assert judge(LedgerRow("claim", "landed", booked=50), active).reason == "claim_unknown"
    assert judge(LedgerRow("claim", "landed", booked=0), active).action == "ok"
    # A lock the ledger did not count as landed, on chain: refund it; a refund that gave up: resume it.
    assert judge(LedgerRow("lock", "unknown"), active).action == "refund"
    assert judge(LedgerRow("lock", "unknown", lease_open=True), active).action == "wait"
    assert judge(LedgerRow("refund", "failed", last_error="not_found"), active).action == "resume"
    # A claim that gave up while the escrow was not there (a wrong contract then) is tried again.
    assert judge(LedgerRow("claim", "failed", last_error="no_escrow_contract"), active).action == "resume"
    assert judge(LedgerRow("claim", "failed", last_error="bad_signature"), active).action == "ok"


# -- the ledger's moves --


def _store(tmp_path: Path) -> LedgerStore:
    store = LedgerStore.open(tmp_path / "ledger.sqlite")
    payer = "0x" + "ab" * 20
    ref = EscrowRef(contract="0x" + "cd" * 20, payer=payer, escrow_id="0x" + "01" * 32)
    store.open_lease(
        lease_for("consumer", "lease-1", peer_key("p"), peer_key("c"), price_per_unit=1, budget=100, escrow=ref),
        idempotency_key="open/lease-1",
    )
    store.end_lease("lease-1", idempotency_key="end/lease-1")
    return store


def test_a_flagged_settlement_is_never_retried_and_moves_are_checked(tmp_path: Path) -> None:
    store = _store(tmp_path)
    refund = store.enqueue_refund("lease-1")
    assert [s.settlement_id for s in store.due_settlements(2**40)] == [refund.settlement_id]
    flagged = store.flag_settlement(refund.settlement_id, reason="escrow_unknown")
    assert (flagged.state, flagged.last_error) == ("flagged", "escrow_unknown")
    assert store.due_settlements(2**40) == []  # retries stop
    assert store.mark_landed(refund.settlement_id, tx_hash=None, released_total=0).state == "flagged"
    with pytest.raises(LedgerError) as refused:
        store.resume_settlement(refund.settlement_id)
    assert refused.value.reason == "invariant_settlement_transition"
    assert store.escrow_mismatches().count == 1
    assert store.escrow_mismatches().escrow_ids == ["0x01010101…"]
    assert store.acknowledge_mismatches() == 1  # the operator looked: it stops counting, stays flagged
    assert store.escrow_mismatches().count == 0 and store.acknowledge_mismatches() == 0
    assert store.get_settlement(refund.settlement_id).state == "flagged"

    withdraw = store.enqueue_withdraw(idempotency_key="w1")
    store.mark_failed(withdraw.settlement_id, error="not_found")
    with pytest.raises(LedgerError) as not_resumable:
        store.resume_settlement(withdraw.settlement_id)  # only claims, releases and refunds come back
    assert not_resumable.value.reason == "invariant_settlement_transition"

    payer, escrow_id = "0x" + "ab" * 20, "0x" + "01" * 32
    store.lock_intent(contract="0x" + "cd" * 20, payer=payer, escrow_id=escrow_id, amount=100)
    store.lock_outcome(payer=payer, escrow_id=escrow_id, outcome="landed", tx_hash="0x" + "00" * 32)
    with pytest.raises(LedgerError) as back:
        store.lock_outcome(payer=payer, escrow_id=escrow_id, outcome="unknown", tx_hash=None)
    assert back.value.reason == "invariant_lock_transition"
    assert store.lock_state(payer, escrow_id) == "landed"
    assert store.verify_audit().ok


# -- real daemons on anvil --


@pytest.fixture
def anvil() -> Iterator[tuple[str, Any]]:
    with anvil_popen() as (url, proc):
        yield url, proc


def _rpc(chain: Chain, method: str, *params: Any) -> Any:
    with chain.lock:
        return chain.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]


async def _shared(url: str) -> SharedChain:
    chain = await trio.to_thread.run_sync(Chain.rpc, url)
    return SharedChain(chain, await trio.to_thread.run_sync(EscrowClient.deploy, chain, chain.dev_accounts()[0]))


async def _drain(node: Node) -> None:
    """Until the node's settlement queue holds nothing pending."""
    with trio.fail_after(20):
        while (await node.ledger.queue_stats()).length:
            node._wake_settlement()
            await trio.sleep(0.1)


async def _countersigned(provider: Node, lease_id: str, units: int) -> None:
    with trio.fail_after(20):
        while True:
            receipts = await provider.ledger.list_receipts(lease_id)
            if max((r.units for r in receipts if r.countersigned), default=0) >= units:
                return
            await trio.sleep(0.05)


@needs_anvil
async def test_a_chain_reset_is_flagged_not_retried_and_new_leases_lock_with_fresh_nonces(
    anvil: tuple[str, Any],
) -> None:
    url, _ = anvil
    shared = await _shared(url)
    chain = shared.chain
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}], chain=shared) as (nodes, _):
        provider, consumer = nodes
        peer = str(provider.host.get_id())
        lease = await consumer.market.open_lease(peer, WORDS, budget=WORD_PRICE * 100, duration_s=30)
        assert (await consumer.market.call(lease.lease_id, {"prompt": PROMPT})).units == 10
        await _countersigned(provider, lease.lease_id, 10)
        client = consumer.escrow_client
        assert await chain.run(client._nonces.pending_count) > 0  # the consumer's wallet has sent (funding is inbound)

        # The dev chain restarts: every account back at nonce 0, every escrow gone. The operator deploys
        # the escrow again (same deployer, same address) and funds the wallets again.
        def reset() -> None:
            _rpc(chain, "anvil_reset")
            assert EscrowClient.deploy(chain, chain.dev_accounts()[0]).address == shared.deployer.address
            for node in nodes:
                fund_from_dev_account(chain, node.escrow_client.account.address)

        await trio.to_thread.run_sync(reset)
        await consumer.market.revoke(lease.lease_id)  # the provider queues its claim, the consumer its refund
        await _drain(provider)
        await _drain(consumer)
        with trio.fail_after(15):  # the health watch re-checks the contract after the head went back
            while not chain.health.ok:
                await trio.sleep(0.1)

        for node in nodes:
            assert node.reconciler.passes >= 1  # a pass ran at connect, before the reset
            report = await node.reconciler.reconcile_once()
            assert report.flagged >= 1 and report.skipped is None, report
            assert report.full  # another genesis block: rows that landed are compared again
            status = node.status()
            assert status.escrow_mismatches is not None and status.escrow_mismatches.count == 1
            assert status.escrow_mismatches.escrow_ids == ["0x" + lease.lease_id[:8] + "…"]
            metrics = metric_samples((await _get(node, "/metrics")).text)
            assert metrics["clawnode_escrow_ledger_mismatches"] == 1
            await node.alerting.evaluate_once()
            firing = {a.name for a in node.alerting.reply().alerts if a.state == "firing"}
            assert "EscrowLedgerMismatch" in firing
        [claim] = [s for s in await provider.ledger.list_settlements() if s.kind == "claim"]
        assert claim.state == "flagged" and claim.last_error == "escrow_unknown"
        assert (await provider.ledger.queue_stats()).length == 0  # nothing left to retry
        attempts = claim.attempts
        provider._wake_settlement()
        await trio.sleep(0.3)
        assert (await provider.ledger.get_settlement(claim.settlement_id)).attempts == attempts
        # A second pass flags nothing new, and leaves rows that landed alone (the chain did not go back).
        again = await provider.reconciler.reconcile_once()
        assert again.flagged == 0 and not again.full

        # `clawnode status` says it in one line; the operator acknowledges and the alert resolves.
        assert _escrow_mismatch_lines(provider.status().model_dump()) == [
            f"escrow flagged 1 escrow(s) the chain does not know, not retried (0x{lease.lease_id[:8]}…)"
        ]
        acked = (await _post(provider, "/api/ledger/mismatches/ack")).json()
        assert acked == {"acknowledged": 1, "mismatches": {"count": 0, "escrow_ids": []}}
        assert (await provider.ledger.get_settlement(claim.settlement_id)).state == "flagged"  # kept as it was
        assert metric_samples((await _get(provider, "/metrics")).text)["clawnode_escrow_ledger_mismatches"] == 0
        await provider.alerting.evaluate_once()
        assert "EscrowLedgerMismatch" not in {a.name for a in provider.alerting.reply().alerts}
        assert _escrow_mismatch_lines(provider.status().model_dump()) == []

        # A new lease right after the reset: the lock goes out with the chain's nonce, and lands.
        resyncs = client.nonce_resyncs
        started = trio.current_time()
        with trio.fail_after(10):
            fresh = await consumer.market.open_lease(peer, WORDS, budget=WORD_PRICE * 50, duration_s=30)
        opened_s = trio.current_time() - started
        assert client.nonce_resyncs > resyncs
        state = await chain.run(client.get, client.account.address, bytes.fromhex(fresh.lease_id))
        assert state.phase == "active" and state.amount == WORD_PRICE * 50
        assert (await consumer.market.call(fresh.lease_id, {"prompt": "one two three"})).units == 3
        print(
            f"chain reset: the first lease after it opened (lock mined) in {opened_s:.2f} s,"
            f" nonce resyncs {client.nonce_resyncs}"
        )


@needs_anvil
async def test_a_lock_that_lands_after_its_receipt_wait_gave_up_is_refunded(anvil: tuple[str, Any]) -> None:
    url, _ = anvil
    shared = await _shared(url)
    chain = shared.chain
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}], chain=shared) as (nodes, _):
        provider, consumer = nodes
        client = consumer.escrow_client
        client.receipt_timeout_s, client.stall_check_s = 1.0, 0.5
        budget = WORD_PRICE * 40
        _rpc(chain, "evm_setAutomine", False)  # the lock waits in the mempool past its receipt wait
        try:
            with pytest.raises(ClawnodeError) as timed_out:
                await consumer.market.open_lease(str(provider.host.get_id()), WORDS, budget=budget, duration_s=5)
            assert timed_out.value.code == ErrorCode.TIMEOUT
            [lease] = await consumer.ledger.list_leases()
            assert lease.state == "lease_ended"
            assert (await consumer.ledger.queue_stats()).length == 0  # the open did not queue a refund
            escrow_id = "0x" + lease.lease_id
            assert consumer.ledger.store.lock_state(client.account.address, escrow_id) == "unknown"
            _rpc(chain, "evm_mine")  # ... and then it lands
        finally:
            _rpc(chain, "evm_setAutomine", True)
        state = await chain.run(client.get, client.account.address, bytes.fromhex(lease.lease_id))
        assert state.phase == "active" and state.amount == budget

        report = await consumer.reconciler.reconcile_once()
        assert report.refunds == 1 and report.flagged == 0, report
        assert consumer.ledger.store.lock_state(client.account.address, escrow_id) == "refunding"
        [refund] = await consumer.ledger.list_settlements()
        assert refund.kind == "refund" and refund.state == "pending"
        # The refund is due after deadline + dispute window: move chain time past both.
        await trio.to_thread.run_sync(chain.time_travel, 5 + 30 + 5 + 60)
        await _drain(consumer)
        refund = await consumer.ledger.get_settlement(refund.settlement_id)
        assert refund.state == "landed"
        assert (await consumer.ledger.get_lease(lease.lease_id)).refunded_amount == budget
        assert await chain.run(client.credit_of, client.account.address) == budget  # no lost wei
        assert (await consumer.reconciler.reconcile_once()).refunds == 0  # once


async def _get(node: Node, path: str, method: str = "GET") -> Any:
    token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
    async with httpx.AsyncClient() as http:
        return await http.request(method, f"{node.api_url}{path}", headers={"authorization": f"Bearer {token}"})


async def _post(node: Node, path: str) -> Any:
    return await _get(node, path, method="POST")
