"""A hostile stranger against lease disputes and their arbiter (docs/security.md), on real nodes over
loopback, real SQLite ledgers and the embedded chain. Each test failed on the code before its fix:

- a push of an outcome for a lease that closed without a dispute wrote a dispute, with the chain's
  split, into its provider's ledger: now an outcome counts only from the arbiter, for an escrow the
  transaction it names resolved (``told_outcome_verdict``);
- a kept case whose resumption raised stopped ``resume_cases``: the cases after it waited for the
  next start (``resume_case_action``, ``resume_retry_delay``);
- a case the arbiter could not decide was re-run as often as it was sent (``lease_rerun_verdict``), and
  again after each restart of the arbiter (the counts are in its ledger now, ``runtime/ledger/reruns.py``);
- the arbiter's signature checks of a case (a few ms of crypto each) ran on the trio loop;
- a provider's sweep for claims a silent freeze holds up read only the newest settlements: any newer
  ones (its own claims and withdrawals, a stranger's many small leases) hid the held claim for good;
- kept cases were bounded by count only, though each may be MiBs (``dispute_cases.MAX_CASE_BYTES``);
- a case saved again kept its first ``created_at``, so the byte bound dropped the very case just saved;
- a provider showed its newest countersigned receipt of a lease (its amounts) to anyone who asked with
  the lease id, which is the escrow's id and so on chain (``receipt_ask_verdict``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from libp2p.peer.peerinfo import PeerInfo

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from node.config import MarketSection
from node.daemon import Node
from protocols.lease import arbiter as arbiter_module
from protocols.lease.arbiter import (
    DISPUTE_PROTOCOL,
    MAX_DISPUTE_FRAME,
    OUTCOME,
    RECEIPT_ANSWER,
    LeaseDisputeCase,
    LeaseDisputeOutcome,
    LeaseReceiptAsk,
)
from protocols.lease.base import ACK
from protocols.machines import dispute as rules
from runtime.errors import ClawnodeError, ErrorCode
from runtime.escrow import client as escrow_client
from runtime.ledger import dispute_cases
from runtime.ledger.dispute_cases import CaseRow
from runtime.ledger.store import LedgerStore
from runtime.verify.evidence import (
    CallProof,
    CommitmentBody,
    DisputePackage,
    SignedCommitment,
    ids_sha256,
    sign_commitment,
    text_sha256,
)
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, SharedChain, market_nodes
from wire.rpc import request


def _peer(node: Node) -> str:
    return str(node.host.get_id())


def _client(node: Node) -> Any:
    client = node.escrow_client
    assert client is not None
    return client


def test_kept_cases_are_bounded_by_bytes_as_well_as_by_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = dispute_cases.MAX_CASE_BYTES  # below what 64 cases of a full frame came to (1 GiB), above one case
    assert MAX_DISPUTE_FRAME <= real < dispute_cases.MAX_CASES * MAX_DISPUTE_FRAME
    monkeypatch.setattr(dispute_cases, "MAX_CASE_BYTES", 3 * 1000)
    store = LedgerStore.open(tmp_path / "ledger.sqlite")
    for n in range(5):  # five cases of 1000 bytes each (a real one may be MiBs: tokens, chunks, text)
        dispute_cases.save(store, CaseRow(f"{n:064x}", "p", "a", "é" * 500))
    assert [row.lease_id for row in dispute_cases.load(store)] == [f"{n:064x}" for n in (2, 3, 4)]  # the newest
    dispute_cases.save(store, CaseRow("f" * 64, "p", "a", "x" * 5000))  # larger than the bound on its own
    assert [row.lease_id for row in dispute_cases.load(store)] == ["f" * 64]  # the newest is always kept


def test_a_re_saved_case_is_never_the_one_the_bound_drops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispute_cases, "MAX_CASE_BYTES", 3 * 1000)
    ticks = iter(range(1000, 2000))
    store = LedgerStore.open(tmp_path / "ledger.sqlite", clock=lambda: next(ticks))
    first, second, third = (f"{n:064x}" for n in range(3))
    for lease_id in (first, second, third):  # 1000 bytes each: all three fit
        dispute_cases.save(store, CaseRow(lease_id, "p", "a", "x" * 1000))
    # The first lease's case is saved again, larger (a freeze sent again with more evidence): the bound
    # now drops the oldest of the others, not the case the consumer has just written.
    dispute_cases.save(store, CaseRow(first, "p", "a", "y" * 1500))
    kept = {row.lease_id: row.case_json for row in dispute_cases.load(store)}
    assert kept == {third: "x" * 1000, first: "y" * 1500}
    assert [row.lease_id for row in dispute_cases.load(store)] == [third, first]  # oldest first: it is newest
    # A clock that stepped back (NTP) does not rank the case just saved behind the others either.
    back = LedgerStore.open(tmp_path / "back.sqlite", clock=lambda: 5)
    for lease_id in (first, second):
        dispute_cases.save(back, CaseRow(lease_id, "p", "a", "x" * 1000))
    back._clock = lambda: 1
    dispute_cases.save(back, CaseRow(third, "p", "a", "z" * 2500))
    assert [row.lease_id for row in dispute_cases.load(back)] == [third]


def _package(lease_id: str, provider: str, *, text: str = "x", key: Any = None) -> DisputePackage:
    """Evidence as a consumer keeps it: signed by ``key`` (the provider's receipt key) when given, which
    makes it bind the escrow (``package_binds``); else with a signature nobody checks before the re-run."""
    body = CommitmentBody(
        v=2,
        lease_id=lease_id,
        call_id="c1",
        provider=provider,
        model_sha256="00" * 32,
        temperature_milli=0,
        top_p_milli=1000,
        prompt_tokens=1,
        completion_tokens=1,
        root="00" * 32,
        prompt_sha256=ids_sha256([1]),
        text_sha256=text_sha256(text),
    )
    signed = sign_commitment(body, key) if key is not None else SignedCommitment(body=body, sig="AA==")
    proof = CallProof(commitment=signed, tokens=[1], chunks=[])
    return DisputePackage(lease_id=lease_id, proof=proof, prompt_ids=[1], text=text)


def test_the_rules_refuse_with_stable_reasons() -> None:
    facts = rules.ToldOutcomeFacts(
        known=True,
        role="provider",
        sender="A",
        arbiter_peer="A",
        dispute_open=False,
        phase="closed",
        escrow_arbiter="0xAb",
        threshold=0,
        resolved_by="0xab",
    )

    def told(**kw: Any) -> str | None:
        refusal = rules.told_outcome_verdict(dataclasses.replace(facts, **kw))
        return None if refusal is None else refusal.reason

    assert told() is None
    assert told(arbiter_peer="") is None  # no arbiter peer known: the chain alone decides
    assert told(role="consumer", dispute_open=True) is None
    assert [
        told(known=False),
        told(sender="B"),
        told(role="consumer"),
        told(phase="disputed"),
        told(resolved_by=None),
        told(resolved_by="0xcd"),
        told(threshold=2),
    ] == [
        "unknown_lease",
        "not_arbiter",
        "unknown_lease",
        "not_resolved",
        "no_resolution",
        "not_arbiter",
        "not_arbiter",
    ]
    assert [
        rules.resume_case_action(ours=o, phase=p, dispute_open=d)
        for o, p, d in [
            (False, "disputed", True),
            (True, "closed", True),
            (True, "closed", False),
            (True, "active", False),
            (True, "disputed", False),
            (True, "none", False),
        ]
    ] == ["drop", "record", "drop", "freeze_and_send", "send", "drop"]
    lease_limit, peer_limit = rules.MAX_RERUNS_PER_LEASE, rules.MAX_RERUNS_PER_PEER
    assert rules.lease_rerun_verdict(lease_reruns=lease_limit - 1, peer_reruns=peer_limit - 1) is None
    assert [
        (r.code, r.reason) if (r := rules.lease_rerun_verdict(lease_reruns=lease, peer_reruns=peer)) else None
        for lease, peer in [(lease_limit, 0), (0, peer_limit)]
    ] == [(ErrorCode.CONFLICT, "rerun_limit"), (ErrorCode.RATE_LIMITED, "peer_rerun_limit")]
    assert rules.lease_rerun_verdict(lease_reruns=0, peer_reruns=0, holds_file=False).reason == "arbiter_no_file"  # type: ignore[union-attr]
    assert told(chain=False) == "chain_unavailable"

    def intake(**kw: Any) -> str | None:
        facts = {"chain": True, "lease_escrow": True, "in_progress": False, "deciding": 0, "limit": 4} | kw
        refusal = rules.case_intake_verdict(**facts)
        return None if refusal is None else refusal.reason

    assert [
        intake(),
        intake(chain=False),
        intake(lease_escrow=False),
        intake(in_progress=True),
        intake(in_progress=True, stale=True),  # decided by stale_freeze_verdict on the chain's facts
        intake(deciding=4),
    ] == [None, "chain_unavailable", "escrow_not_lease", "case_in_progress", None, "busy"]
    asks = [
        rules.stale_ask_verdict(served=False, arbiter_known=True, vouched=True),
        rules.stale_ask_verdict(served=True, arbiter_known=False, vouched=True),
        rules.stale_ask_verdict(served=True, arbiter_known=True, vouched=False),
        rules.receipt_ask_verdict(served=False, sender="A", arbiter_peer="A"),
        rules.receipt_ask_verdict(served=True, sender="B", arbiter_peer="A"),  # refused as an unknown lease
        rules.receipt_ask_verdict(served=True, sender="B", arbiter_peer=""),  # no arbiter known: nobody
    ]
    assert [r.reason if r else None for r in asks] == [
        "unknown_lease",
        "no_arbiter",
        "no_voucher",
        "unknown_lease",
        "unknown_lease",
        "unknown_lease",
    ]
    assert rules.receipt_ask_verdict(served=True, sender="A", arbiter_peer="A") is None
    assert [rules.resume_retry_delay(n) for n in range(4)] == [None, *rules.RESUME_RETRY_S, None]


async def test_an_outcome_for_a_lease_that_closed_without_a_dispute_writes_nothing() -> None:
    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [{"offers": (WORD_OFFER,)}, {}, {"wallet_key": shared.arbiter.key.hex()}]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        provider, consumer, arbiter = nodes
        stranger = consumer  # any peer but the arbiter: the lease's own consumer will do
        lease = await consumer.market.open_lease(_peer(provider), WORDS, budget=WORD_PRICE * 20, duration_s=60)
        await consumer.market.call(lease.lease_id, {"prompt": "one two three"})
        payer, escrow_id = _client(consumer).account.address, bytes.fromhex(lease.lease_id)
        # The lease ends and its provider closes the escrow: paid out, the rest back, no dispute ever.
        settled = await trio.to_thread.run_sync(_client(provider).settle, payer, escrow_id, 0, b"")
        state = await trio.to_thread.run_sync(_client(provider).get, payer, escrow_id)
        assert state.phase == "closed"

        told = LeaseDisputeOutcome(
            lease_id=lease.lease_id, payer=payer, outcome="refund", reason="x", to_payee=0, tx_hash=settled.tx_hash
        )
        # A peer who knows the lease id (the provider knows no arbiter peer: the chain alone decides).
        with pytest.raises(ClawnodeError) as refused:
            await request(stranger.host, provider.host.get_id(), DISPUTE_PROTOCOL, told, ACK)
        assert (refused.value.code, refused.value.reason) == (ErrorCode.CONFLICT, "no_resolution")
        for no_tx in (told.model_copy(update={"tx_hash": None}), told.model_copy(update={"tx_hash": "0x" + "ab" * 32})):
            with pytest.raises(ClawnodeError) as refused:
                await request(stranger.host, provider.host.get_id(), DISPUTE_PROTOCOL, no_tx, ACK)
            assert refused.value.reason == "no_resolution"
        # Where the provider knows its arbiter's peer, nobody else is heard at all; the arbiter itself
        # is not believed either when the chain shows no resolution.
        provider.market.arbiter_peer = _peer(arbiter)
        reads: list[Any] = []
        escrow_get = _client(provider).get

        def counted_get(*args: Any) -> Any:
            reads.append(args)
            return escrow_get(*args)

        _client(provider).get = counted_get
        with pytest.raises(ClawnodeError) as refused:
            await request(stranger.host, provider.host.get_id(), DISPUTE_PROTOCOL, told, ACK)
        assert (refused.value.code, refused.value.reason) == (ErrorCode.FORBIDDEN, "not_arbiter")
        assert reads == []  # refused before any chain read: a stranger's push costs the node nothing
        with pytest.raises(ClawnodeError) as refused:
            await request(arbiter.host, provider.host.get_id(), DISPUTE_PROTOCOL, told, ACK)
        assert refused.value.reason == "no_resolution"
        assert await provider.ledger.list_disputes(limit=10) == []
        assert await consumer.ledger.list_disputes(limit=10) == []

        # A real resolution by the escrow's arbiter, told by the arbiter: recorded as the chain shows it.
        second = await consumer.market.open_lease(_peer(provider), WORDS, budget=WORD_PRICE * 20, duration_s=60)
        await consumer.market.call(second.lease_id, {"prompt": "four five"})
        second_id = bytes.fromhex(second.lease_id)
        await trio.to_thread.run_sync(_client(consumer).dispute, payer, second_id)
        resolved = await trio.to_thread.run_sync(_client(arbiter).resolve, payer, second_id, 7)
        real = told.model_copy(update={"lease_id": second.lease_id, "tx_hash": resolved.tx_hash})
        with pytest.raises(ClawnodeError) as refused:  # the right transaction, the wrong messenger
            await request(stranger.host, provider.host.get_id(), DISPUTE_PROTOCOL, real, ACK)
        assert refused.value.reason == "not_arbiter"
        with pytest.raises(ClawnodeError) as refused:  # another escrow's resolution, named for the first lease
            await request(
                arbiter.host,
                provider.host.get_id(),
                DISPUTE_PROTOCOL,
                real.model_copy(update={"lease_id": lease.lease_id}),
                ACK,
            )
        assert refused.value.reason == "no_resolution"
        await request(arbiter.host, provider.host.get_id(), DISPUTE_PROTOCOL, real, ACK)
        disputes = await provider.ledger.list_disputes(limit=10)
        done = await trio.to_thread.run_sync(_client(provider).get, payer, second_id)
        assert [(d.lease_id, d.state, d.to_payee) for d in disputes] == [
            (second.lease_id, "dispute_resolved", done.released)
        ]


async def test_a_kept_case_that_fails_to_resume_does_not_hold_up_the_others(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(rules, "RESUME_RETRY_S", (0.05, 0.05))
    shared = await trio.to_thread.run_sync(SharedChain.start)
    async with market_nodes([{}, {"wallet_key": shared.arbiter.key.hex()}], chain=shared) as (nodes, _):
        consumer, arbiter = nodes
        payer_client = _client(consumer).for_account(_client(consumer).account)
        payer, now = payer_client.account.address, shared.chain.now()
        stuck, frozen = secrets.token_bytes(32), secrets.token_bytes(32)
        for escrow_id in (stuck, frozen):
            await trio.to_thread.run_sync(
                lambda e=escrow_id: payer_client.lock(
                    e,
                    payee="0x" + "12" * 20,
                    arbiter=shared.arbiter.address,
                    amount=10**15,
                    deadline=now + 60,
                    window=60,
                )
            )
        await trio.to_thread.run_sync(payer_client.dispute, payer, frozen)
        # Past the first escrow's deadline + window: its freeze (it had not landed before the stop) is
        # refused by the chain now, at every try. It was kept first.
        await trio.to_thread.run_sync(shared.chain.time_travel, 200)
        for escrow_id in (stuck, frozen):
            signed = await trio.to_thread.run_sync(payer_client.sign_dispute_case, escrow_id, 0)
            case = LeaseDisputeCase(
                lease_id=escrow_id.hex(),
                payer=payer,
                package=_package(escrow_id.hex(), _peer(consumer)),
                owed_if_honest=0,
                payer_sig="0x" + signed.hex(),
            )
            await consumer.ledger.save_dispute_case(
                CaseRow(case.lease_id, _peer(consumer), _peer(arbiter), case.model_dump_json())
            )

        with caplog.at_level(logging.WARNING, logger="protocols.lease"):
            await consumer.market.resume_cases()
            # The frozen escrow's case reached the arbiter all the same, which answered it (it holds no copy
            # of the file: the escrow stays frozen for a person) and so the consumer forgot it.
            with trio.fail_after(10):
                while len(await consumer.ledger.dispute_cases()) > 1:
                    await trio.sleep(0.05)
        assert [row.lease_id for row in await consumer.ledger.dispute_cases()] == [stuck.hex()]  # for the next start
        tries = [r.getMessage() for r in caplog.records if "was not resumed" in r.getMessage()]
        assert len(tries) == 1 + len(rules.RESUME_RETRY_S)  # tried again a bounded number of times, then left
        assert all(stuck.hex()[:12] in line and "E_" in line for line in tries)  # logged with a stable code
        assert any("left for the next start" in r.getMessage() for r in caplog.records)


async def _frozen_case(consumer: Node, arbiter_wallet: str, provider: Node) -> LeaseDisputeCase:
    """A lease escrow of the consumer's wallet, frozen by it, and its signed case with evidence that
    ``provider`` signed."""
    payer_client = _client(consumer).for_account(_client(consumer).account)
    escrow_id, payer = secrets.token_bytes(32), payer_client.account.address
    deadline = payer_client.chain.now() + 60
    await trio.to_thread.run_sync(
        lambda: payer_client.lock(
            escrow_id, payee="0x" + "12" * 20, arbiter=arbiter_wallet, amount=10**15, deadline=deadline, window=60
        )
    )
    await trio.to_thread.run_sync(payer_client.dispute, payer, escrow_id)
    signed = await trio.to_thread.run_sync(payer_client.sign_dispute_case, escrow_id, 0)
    return LeaseDisputeCase(
        lease_id=escrow_id.hex(),
        payer=payer,
        package=_package(escrow_id.hex(), _peer(provider), key=provider.market.receipt_key),
        owed_if_honest=0,
        payer_sig="0x" + signed.hex(),
    )


async def test_a_case_the_arbiter_cannot_decide_is_not_re_run_without_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rules, "MAX_RERUNS_PER_PEER", rules.MAX_RERUNS_PER_LEASE + 1)
    on_loop: list[bool] = []  # for each signature check of a case: whether it ran on the trio loop's thread

    def watched(check: Any) -> Any:
        def run(*args: Any) -> Any:
            on_loop.append(threading.current_thread() is threading.main_thread())
            return check(*args)

        return run

    monkeypatch.setattr(escrow_client, "dispute_case_signer", watched(escrow_client.dispute_case_signer))
    monkeypatch.setattr(arbiter_module, "package_binds", watched(arbiter_module.package_binds))
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(b"GGUF" + bytes(60))  # the arbiter's copy of the file, which it cannot load: undecided
    shared = await trio.to_thread.run_sync(SharedChain.start)
    async with market_nodes([{}, {"wallet_key": shared.arbiter.key.hex()}], chain=shared) as (nodes, _):
        consumer, arbiter = nodes
        arbiter.market.verifying.local_model = lambda sha256: SimpleNamespace(path=copy)
        first, second = [await _frozen_case(consumer, shared.arbiter.address, consumer) for _ in range(2)]

        async def send(case: LeaseDisputeCase) -> LeaseDisputeOutcome:
            return await request(
                consumer.host, arbiter.host.get_id(), DISPUTE_PROTOCOL, case, OUTCOME, max_frame=MAX_DISPUTE_FRAME
            )

        for _ in range(rules.MAX_RERUNS_PER_LEASE):
            assert (await send(first)).outcome == "undecided"  # re-run, and nothing resolved
        with pytest.raises(ClawnodeError) as refused:  # sent again for a fresh re-run
            await send(first)
        assert (refused.value.code, refused.value.reason) == (ErrorCode.CONFLICT, "rerun_limit")
        state = await trio.to_thread.run_sync(_client(consumer).get, first.payer, bytes.fromhex(first.lease_id))
        assert state.phase == "disputed"  # frozen for a person, as before
        assert (await send(second)).outcome == "undecided"
        with pytest.raises(ClawnodeError) as refused:  # the same peer, another lease, past its rate
            await send(second)
        assert (refused.value.code, refused.value.reason) == (ErrorCode.RATE_LIMITED, "peer_rerun_limit")
    assert on_loop and not any(on_loop)


async def test_an_arbiter_that_restarts_does_not_grant_the_re_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rules, "MAX_RERUNS_PER_PEER", rules.MAX_RERUNS_PER_LEASE + 1)
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(b"GGUF" + bytes(60))  # the arbiter's copy of the file, which it cannot load: undecided
    shared = await trio.to_thread.run_sync(SharedChain.start)
    async with market_nodes([{}], chain=shared) as ((consumer,), _):
        first, second = [await _frozen_case(consumer, shared.arbiter.address, consumer) for _ in range(2)]
        arbiter_spec = [{"wallet_key": shared.arbiter.key.hex()}]
        joined, root = [consumer.listen_addrs()[0]], tmp_path / "arbiter"

        async def send(arbiter: Node, case: LeaseDisputeCase) -> LeaseDisputeOutcome:
            arbiter.market.verifying.local_model = lambda sha256: SimpleNamespace(path=copy)
            await consumer.host.connect(PeerInfo(arbiter.host.get_id(), arbiter.host.get_addrs()))
            return await request(
                consumer.host, arbiter.host.get_id(), DISPUTE_PROTOCOL, case, OUTCOME, max_frame=MAX_DISPUTE_FRAME
            )

        async def refused(arbiter: Node, case: LeaseDisputeCase) -> tuple[str, str]:
            with pytest.raises(ClawnodeError) as refusal:
                await send(arbiter, case)
            return str(refusal.value.code), str(refusal.value.reason)

        async with market_nodes(arbiter_spec, chain=shared, bootstrap=joined, root=root) as ((arbiter,), _):
            for _ in range(rules.MAX_RERUNS_PER_LEASE):
                assert (await send(arbiter, first)).outcome == "undecided"
            assert await refused(arbiter, first) == (ErrorCode.CONFLICT, "rerun_limit")
            await consumer.host.disconnect(arbiter.host.get_id())
        # The arbiter stops and starts again on its data dir: the lease's re-runs, and the peer's, still count.
        async with market_nodes(arbiter_spec, chain=shared, bootstrap=joined, root=root) as ((arbiter,), _):
            assert await refused(arbiter, first) == (ErrorCode.CONFLICT, "rerun_limit")
            assert (await send(arbiter, second)).outcome == "undecided"
            assert await refused(arbiter, second) == (ErrorCode.RATE_LIMITED, "peer_rerun_limit")
        state = await trio.to_thread.run_sync(_client(consumer).get, first.payer, bytes.fromhex(first.lease_id))
        assert state.phase == "disputed"  # frozen for a person, as before


async def test_a_claim_held_by_a_silent_freeze_is_found_however_many_settlements_came_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The sweep took the newest STALE_SCAN (200) settlements; here one newer settlement stands for them.
    monkeypatch.setattr(arbiter_module, "STALE_SCAN", 1)
    fast = MarketSection(receipt_every_units=1, receipt_every_s=1, countersign_timeout_s=2)  # type: ignore[call-arg]
    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [{"offers": (WORD_OFFER,), "market": fast}, {}, {"wallet_key": shared.arbiter.key.hex()}]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        provider, consumer, arbiter = nodes
        provider.market.arbiter_peer = _peer(arbiter)
        lease = await consumer.market.open_lease(_peer(provider), WORDS, budget=WORD_PRICE * 20, duration_s=60)
        await consumer.market.call(lease.lease_id, {"prompt": "one two three"})
        with trio.fail_after(10):
            while not (owed := await provider.ledger.countersigned_amount(lease.lease_id)):
                await trio.sleep(0.05)
        payer, escrow_id = _client(consumer).account.address, bytes.fromhex(lease.lease_id)
        await trio.to_thread.run_sync(_client(consumer).dispute, payer, escrow_id)  # frozen, no case ever sent
        state = await trio.to_thread.run_sync(_client(consumer).get, payer, escrow_id)
        await trio.to_thread.run_sync(shared.chain.time_travel, state.deadline + state.window - shared.chain.now() + 5)
        await provider.ledger.enqueue_claim(lease.lease_id)
        provider.market.wake_settlement()
        with trio.fail_after(10):  # the settler finds the escrow frozen: the claim waits
            while not any(
                r.lease_id == lease.lease_id and r.last_error == "disputed"
                for r in await provider.ledger.list_settlements(limit=10)
            ):
                await trio.sleep(0.05)
        await trio.sleep(1.1)  # the ledger's clock counts seconds: the next settlement is newer
        await provider.ledger.enqueue_withdraw(idempotency_key="later")

        with trio.fail_after(10):
            while not await provider.market.stale_freeze_pass():
                await trio.sleep(0.1)
        closed = await trio.to_thread.run_sync(_client(consumer).get, payer, escrow_id)
        assert (closed.phase, closed.released) == ("closed", owed)  # paid what the payer vouched


async def test_a_provider_shows_its_receipts_to_the_escrows_arbiter_only() -> None:
    fast = MarketSection(receipt_every_units=1, receipt_every_s=1, countersign_timeout_s=2)  # type: ignore[call-arg]
    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [{"offers": (WORD_OFFER,), "market": fast}, {}, {"wallet_key": shared.arbiter.key.hex()}]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        provider, consumer, arbiter = nodes
        stranger = consumer  # any peer but the arbiter, that read the lease id off the chain
        lease = await consumer.market.open_lease(_peer(provider), WORDS, budget=WORD_PRICE * 20, duration_s=60)
        await consumer.market.call(lease.lease_id, {"prompt": "one two three"})
        with trio.fail_after(10):
            while not (owed := await provider.ledger.countersigned_amount(lease.lease_id)):
                await trio.sleep(0.05)

        async def ask(asker: Node, lease_id: str) -> Any:
            ask = LeaseReceiptAsk(lease_id=lease_id)
            return await request(asker.host, provider.host.get_id(), DISPUTE_PROTOCOL, ask, RECEIPT_ANSWER)

        async def refusal(asker: Node, lease_id: str) -> tuple[str, str]:
            with pytest.raises(ClawnodeError) as refused:
                await ask(asker, lease_id)
            return str(refused.value.code), str(refused.value.reason)

        unknown = secrets.token_hex(32)
        # No arbiter peer known: nobody is shown the amounts, the arbiter wallet's node included.
        for asker in (stranger, arbiter):
            assert await refusal(asker, lease.lease_id) == (ErrorCode.NOT_FOUND, "unknown_lease")
        provider.market.arbiter_peer = _peer(arbiter)
        # A stranger is answered as for a lease the provider never served: it cannot tell the two apart.
        assert await refusal(stranger, lease.lease_id) == await refusal(stranger, unknown)
        assert await refusal(stranger, lease.lease_id) == (ErrorCode.NOT_FOUND, "unknown_lease")
        answer = await ask(arbiter, lease.lease_id)  # the escrows' arbiter gets the countersigned receipt
        assert answer.receipt is not None and answer.receipt.body.amount == owed > 0
        assert await refusal(arbiter, unknown) == (ErrorCode.NOT_FOUND, "unknown_lease")
