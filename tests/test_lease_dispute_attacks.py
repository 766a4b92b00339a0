"""A hostile party against the lease arbiter (/clawnode/lease-dispute/1.0.0), on real nodes and a real
escrow: the escrow's payee can freeze it as well as its payer, so a provider that freezes its own
honest lease and sends the arbiter a case of its own (its honest call's package, which it signed, and
"the consumer owes everything locked") must not be paid a wei more than the consumer owes: the arbiter
takes a case only with the payer's signature over it. A peer that opens dispute streams and trickles
16 MiB frames into them is answered busy past a bound instead of read (the escrows' arbiter never is).
And a task's seller that sits on the task's panel is never awarded it (it would vote on its own dispute)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import trio

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from protocols.lease.arbiter import (
    DISPUTE_PROTOCOL,
    MAX_DISPUTE_FRAME,
    MAX_DISPUTE_STREAMS_PER_PEER,
    OUTCOME,
    RECEIPT_ANSWER,
    LeaseDisputeCase,
    LeaseReceiptAsk,
)
from protocols.machines.verify import CheckFacts
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.market import SharedChain, market_nodes
from wire.framing import encode_uvarint
from wire.rpc import request
from wire.streams import open_stream

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 8, "temperature": 0}


def _spec(path: Path) -> ModelSpec:
    return ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]


async def test_a_provider_that_freezes_its_own_lease_cannot_name_what_it_is_owed(tmp_path: Path) -> None:
    files = [write_tiny_llama_gguf(tmp_path / f"{name}.gguf", seed=0) for name in ("c", "p", "a")]
    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [
        {"models": (_spec(files[0]),)},
        {"models": (_spec(files[1]),)},
        {"wallet_key": shared.arbiter.key.hex(), "models": (_spec(files[2]),)},
        {},
    ]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        consumer, provider, arbiter, elsewhere = nodes
        consumer.market.arbiter_peer = str(arbiter.host.get_id())
        provider.market.arbiter_peer = str(arbiter.host.get_id())  # it shows its receipts to that peer only
        kept: dict[str, Any] = {}  # the honest call's package: the provider holds the same (it signed it)
        verifying = consumer.market.verifying
        real_failed = verifying._failed

        async def failed(peer: str, facts: Any, package: Any = None) -> str:
            if package is not None:
                kept[package.lease_id] = package
            return await real_failed(peer, facts, package)

        verifying._failed = failed  # type: ignore[method-assign,assignment]
        verifying.sample_rate = 1.0
        lease = await consumer.market.open_lease(str(provider.host.get_id()), "model:tiny", budget=10**9, duration_s=60)
        await consumer.market.call(lease.lease_id, CHAT)
        package = kept[lease.lease_id]

        payer_client, payee_client = consumer.escrow_client, provider.escrow_client
        assert payer_client is not None and payee_client is not None
        payer, escrow_id = payer_client.account.address, bytes.fromhex(lease.lease_id)
        await trio.to_thread.run_sync(payee_client.dispute, payer, escrow_id)  # the payee may freeze it
        before = await trio.to_thread.run_sync(payer_client.get, payer, escrow_id)
        assert before.phase == "disputed" and before.amount - before.released > 0

        # Its own signature in place of the payer's, then none at all.
        forged = "0x" + (await trio.to_thread.run_sync(payee_client.sign_dispute_case, escrow_id, 10**30)).hex()
        for sig in (forged, "0x" + "11" * 65):
            case = LeaseDisputeCase(
                lease_id=lease.lease_id, payer=payer, package=package, owed_if_honest=10**30, payer_sig=sig
            )
            with pytest.raises(ClawnodeError) as refused:
                await request(
                    provider.host, arbiter.host.get_id(), DISPUTE_PROTOCOL, case, OUTCOME, max_frame=MAX_DISPUTE_FRAME
                )
            assert (refused.value.code, refused.value.reason) == (ErrorCode.FORBIDDEN, "case_not_payer")
        after = await trio.to_thread.run_sync(payer_client.get, payer, escrow_id)
        assert (after.phase, after.released) == ("disputed", before.released)  # nothing paid out
        assert lease.lease_id not in arbiter.market.lease_disputes

        # The payer's own case, saying it owes nothing, sent from another peer id than the lease's
        # consumer (whose countersigned receipts the arbiter would otherwise not match): the provider
        # is still paid what the newest receipt with the payer's voucher says.
        with trio.fail_after(20):
            while not await provider.ledger.countersigned_amount(lease.lease_id):
                await trio.sleep(0.1)
        countersigned = await provider.ledger.countersigned_amount(lease.lease_id)
        signed = "0x" + (await trio.to_thread.run_sync(payer_client.sign_dispute_case, escrow_id, 0)).hex()
        case = LeaseDisputeCase(
            lease_id=lease.lease_id, payer=payer, package=package, owed_if_honest=0, payer_sig=signed
        )
        outcome = await request(
            elsewhere.host, arbiter.host.get_id(), DISPUTE_PROTOCOL, case, OUTCOME, max_frame=MAX_DISPUTE_FRAME
        )
        assert outcome.outcome == "reject" and outcome.reason == "passed"
        closed = await trio.to_thread.run_sync(payer_client.get, payer, escrow_id)
        assert closed.phase == "closed" and closed.released == countersigned > 0

        # A check that fails an honest call wrongly (a leased verifier that lies): the provider is out of
        # the ranking (standing 0) until the arbiter's re-run finds it not at fault; then it is back.
        provider_id = str(provider.host.get_id())
        second = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
        await consumer.market.call(second.lease_id, CHAT)
        lie = CheckFacts(True, True, False, True, body_version=2)  # "the openings do not match"
        assert (await real_failed(provider_id, lie, kept[second.lease_id])).startswith("failed:")
        assert verifying.standing(provider_id) == 0
        overruled = await consumer.market.dispute_lease(second.lease_id, 0)
        assert overruled is not None and overruled.outcome == "reject"
        assert verifying.standing(provider_id) > 0
        record = {row.provider: row for row in await consumer.ledger.verification_rows()}[provider_id]
        assert (record.failed, record.last_reason) == (0, "overruled")  # kept across a restart too


async def test_a_peer_that_opens_dispute_streams_and_trickles_frames_is_answered_busy() -> None:
    # Each dispute stream may hold a frame of up to 16 MiB before anything is checked: a stranger that
    # keeps opening them and sending a frame slowly is answered busy past two at once, not read.
    async with market_nodes([{}, {}]) as (nodes, _):
        arbiter, stranger = nodes
        target = arbiter.host.get_id()
        held = []
        for _ in range(MAX_DISPUTE_STREAMS_PER_PEER):
            stream = await open_stream(stranger.host, target, [DISPUTE_PROTOCOL])
            await stream.write(encode_uvarint(MAX_DISPUTE_FRAME) + b"{" * 1024)  # 16 MiB announced, 1 KiB sent
            held.append(stream)
        await trio.sleep(0.2)  # both are being read by now
        ask = LeaseReceiptAsk(lease_id="ab" * 32)
        with trio.fail_after(5), pytest.raises(ClawnodeError) as busy:  # unbounded: read until its timeout
            await request(stranger.host, target, DISPUTE_PROTOCOL, ask, RECEIPT_ANSWER, timeout_s=5)
        assert (busy.value.code, busy.value.reason) == (ErrorCode.RATE_LIMITED, "busy")
        for stream in held:
            await stream.reset()
        await trio.sleep(0.2)
        with pytest.raises(ClawnodeError) as answered:  # the next one is read and answered again
            await request(stranger.host, target, DISPUTE_PROTOCOL, ask, RECEIPT_ANSWER, timeout_s=5)
        assert answered.value.code == ErrorCode.NOT_FOUND

        # The escrows' arbiter is never turned away (it asks for receipts while it decides a case).
        arbiter.market.arbiter_peer = str(stranger.host.get_id())
        for _ in range(MAX_DISPUTE_STREAMS_PER_PEER):
            stream = await open_stream(stranger.host, target, [DISPUTE_PROTOCOL])
            await stream.write(encode_uvarint(MAX_DISPUTE_FRAME) + b"{" * 1024)
            held.append(stream)
        await trio.sleep(0.2)
        with trio.fail_after(5), pytest.raises(ClawnodeError) as answered:
            await request(stranger.host, target, DISPUTE_PROTOCOL, ask, RECEIPT_ANSWER, timeout_s=5)
        assert answered.value.code == ErrorCode.NOT_FOUND
        for stream in held:
            await stream.reset()


async def test_a_creator_never_awards_its_task_to_a_member_of_the_task_s_panel() -> None:
    # A seller that sits on the panel (not first: the first member is the task's arbiter, who may not
    # bid) would vote on its own dispute: one more agreeing vote and it pays itself. It skips its own
    # check of the panel; the creator refuses the award before anything is locked.
    from protocols import task_wire as tw
    from protocols.gossip import task_topic
    from runtime.sandbox import Limits
    from tests.support import native_programs
    from tests.support.market import wait_for

    capability = "model:native-upper"
    shared = await trio.to_thread.run_sync(SharedChain.start)
    async with market_nodes([{}, {}, {}, {}], chain=shared) as (nodes, _):
        creator, seller, first, third = nodes
        for node in (creator, seller):
            node.sandbox.policy = dataclasses.replace(node.sandbox.policy, kinds=frozenset({"wasm", "native"}))
        await seller.tasks.watch(capability)
        topic = task_topic(capability)
        await wait_for(lambda: seller.host.get_id() in creator.announcements.pubsub.peer_topics.get(topic, ()), 30)
        seats = [
            tw.PanelMember(peer=str(node.host.get_id()), wallet=node.escrow_client.account.address)  # type: ignore[union-attr]
            for node in (first, third)
        ]
        # The seller's seat names a wallet other than its payee's (the chain refuses only payee == member).
        seats.insert(1, tw.PanelMember(peer=str(seller.host.get_id()), wallet="0x" + "5" * 40))
        limits = Limits(fuel=2000, memory_bytes=64 * 1024 * 1024, wall_s=5.0, output_bytes=4096, pids=8)
        view = await creator.tasks.publish_run(
            capability,
            10**18,
            120,
            kind="native",
            module=native_programs.UPPER,
            limits=limits,
            panel=tw.PanelTerms(members=seats, threshold=2),
        )
        await wait_for(lambda: view.task_id in seller.tasks.book.tasks, 30, "announcement")

        async def no_check(*args: Any) -> None:
            return None

        seller.tasks._check_panel_lock = no_check  # type: ignore[method-assign,assignment]
        bid = await seller.tasks.bid(view.task_id, 10**17)
        with pytest.raises(ClawnodeError) as refused:
            await creator.tasks.award(view.task_id, bid.bid_id)
        assert (refused.value.code, refused.value.reason) == (ErrorCode.FORBIDDEN, "panel_party")
        assert creator.tasks.view(view.task_id).escrow_id is None  # nothing locked
