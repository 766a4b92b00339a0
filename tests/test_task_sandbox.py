"""``wasm`` (and ``native``) tasks end to end: real nodes, gossip, task streams, ledgers and the embedded chain.

The seller's node fetches the module from the buyer, runs it in its sandbox and submits the output
with its metered fuel; a dispute is decided by the arbiter re-running the module and resolving on
chain with no person: a correct result rejected goes to the seller, a wrong one back to the buyer.
"""

from __future__ import annotations

import base64
import dataclasses

import httpx
import pytest
import trio
from pydantic import TypeAdapter

from node.daemon import Node
from node.datadir import read_api_token
from protocols import task_wire as w
from protocols.gossip import task_topic
from protocols.machines.task import TaskState
from protocols.task import TASK_PROTOCOL
from protocols.task_wire import RunUsage
from runtime.errors import ClawnodeError, ErrorCode
from runtime.sandbox import Limits, WasmSandbox, sha256_hex
from runtime.sandbox.native import bwrap_available
from tests.support import native_programs
from tests.support import wasm_modules as mods
from tests.support.market import SharedChain, market_nodes, wait_for
from wire.rpc import request

CAPABILITY = "model:wasm-upper"
ETH = 10**18
PRICE = ETH // 2
LIMITS = Limits(fuel=1_000_000, memory_bytes=2 * 1024 * 1024, wall_s=5.0, output_bytes=4096)
NATIVE_LIMITS = Limits(fuel=2000, memory_bytes=64 * 1024 * 1024, wall_s=5.0, output_bytes=4096, pids=8)

_REPLY = TypeAdapter(w.ModuleReply)

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")


def _peer(node: Node) -> str:
    return str(node.host.get_id())


async def _publish(
    creator: Node,
    seller: Node,
    arbiter: Node,
    shared: SharedChain,
    text: bytes,
    *,
    via_api: bool = False,
    native: bytes | None = None,
) -> str:
    topic = task_topic(CAPABILITY)
    await wait_for(lambda: seller.host.get_id() in creator.announcements.pubsub.peer_topics.get(topic, ()), 30, "sub")
    if via_api:  # what `clawnode task publish --wasm FILE --input FILE` sends
        token = await trio.to_thread.run_sync(read_api_token, creator.data_dir)
        body = {
            "capability": CAPABILITY,
            "budget": ETH,
            "deadline_s": 120,
            "summary": "upper-case the input",
            "arbiter_peer": _peer(arbiter),
            "arbiter_wallet": shared.arbiter.address,
            "review_timeout_s": 60,
            "kind": "wasm",
            "module_b64": base64.b64encode(mods.UPPER).decode(),
            "input_b64": base64.b64encode(text).decode(),
            "limits": LIMITS.model_dump(),
        }
        async with httpx.AsyncClient(timeout=30) as client:
            reply = await client.post(
                f"{creator.api_url}/api/tasks", json=body, headers={"authorization": f"Bearer {token}"}
            )
        assert reply.status_code == 200, reply.text
        view = w.TaskView.model_validate(reply.json())
    else:
        view = await creator.tasks.publish_run(
            CAPABILITY,
            ETH,
            120,
            kind="native" if native else "wasm",
            module=native or mods.UPPER,
            input=text,
            limits=NATIVE_LIMITS if native else LIMITS,
            summary="upper-case the input",
            arbiter_peer=_peer(arbiter),
            arbiter_wallet=shared.arbiter.address,
            review_timeout_s=60,
        )
    assert view.kind == ("native" if native else "wasm")
    await wait_for(lambda: view.task_id in seller.tasks.book.tasks, 30, "announcement")
    bid = await seller.tasks.bid(view.task_id, PRICE)
    await creator.tasks.award(view.task_id, bid.bid_id)
    return view.task_id


async def _closed_with(node: Node, task_id: str, to_bidder: int) -> None:
    await wait_for(lambda: str(node.tasks.book.get(task_id).state) == TaskState.CLOSED, 30, "task closed")
    view = node.tasks.view(task_id)
    assert (view.to_bidder, view.to_creator) == (to_bidder, PRICE - to_bidder)


async def test_sandboxed_tasks_run_by_the_seller_and_disputes_decided_by_re_execution() -> None:
    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [{"arbiter": 3}, {"arbiter": 3}, {"arbiter": 3}, {"wallet_key": shared.arbiter.key.hex()}]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        creator, seller, cheat, arbiter = nodes
        cheat.sandbox.policy = dataclasses.replace(cheat.sandbox.policy, auto_run=False)  # delivers by hand
        for node in (seller, cheat):
            await node.tasks.watch(CAPABILITY)
        # Sellers state the kinds they run and their caps in their capability record.
        offer = seller.publisher.build_record().sandbox
        assert offer is not None and offer.kinds == ["wasm"] and offer.max_module_bytes == 256 * 1024
        expected = WasmSandbox()
        honest = expected.run(expected.load(mods.UPPER), b"pay me", LIMITS)

        # 1. Accepted: the seller ran it by itself; the output and fuel are what anyone gets.
        task_id = await _publish(creator, seller, arbiter, shared, b"pay me", via_api=True)
        await wait_for(lambda: creator.tasks.view(task_id).result_state == "result_submitted", 20, "result")
        view = creator.tasks.view(task_id)
        assert creator.tasks.artifact(task_id) == honest.output == b"PAY ME!\x06"
        assert view.result_hash == honest.output_sha256
        assert view.run == RunUsage(fuel_used=honest.fuel_used, outcome="exited", exit_code=0)
        assert view.kind == "wasm" and view.limits == LIMITS
        assert seller.sandbox.stats.runs["wasm"] == 1
        await creator.tasks.review(task_id, True)
        await _closed_with(seller, task_id, PRICE)

        # 2. The buyer rejects a correct result and disputes: the re-run pays the seller.
        task_id = await _publish(creator, seller, arbiter, shared, b"pay me")
        # A node that would not run the task does not bid on it: it asked the creator for the terms.
        await wait_for(lambda: task_id in cheat.tasks.book.tasks, 30, "announcement")
        manual = cheat.sandbox.policy
        for policy, reason in (
            (dataclasses.replace(manual, auto_run=True, kinds=frozenset({"native"})), "kind_not_accepted"),
            (dataclasses.replace(manual, auto_run=True, cap=LIMITS.model_copy(update={"fuel": 10})), "limits_too_high"),
        ):
            cheat.sandbox.policy = policy
            with pytest.raises(ClawnodeError) as refused:
                await cheat.tasks.bid(task_id, PRICE)
            assert refused.value.reason == reason
        cheat.sandbox.policy = manual
        await wait_for(lambda: creator.tasks.view(task_id).result_state == "result_submitted", 20, "result")
        await creator.tasks.review(task_id, False, "I do not like it")
        await creator.tasks.dispute(task_id, "wrong, surely")
        for node in (creator, seller):
            await _closed_with(node, task_id, PRICE)
        assert arbiter.tasks.view(task_id).run_verdict == "rerun_matches"
        assert creator.tasks.view(task_id).run_verdict == "rerun_matches"
        assert arbiter.tasks.view(task_id).dispute_state == "dispute_resolved"
        # The arbiter's signed re-run record, with the output it got, is in all three ledgers.
        for node in (arbiter, creator, seller):
            (piece,) = [e for e in await node.ledger.list_evidence(task_id) if e.submitted_by == _peer(arbiter)]
            assert "rerun_matches" in piece.note and honest.output_sha256 in piece.note
            assert await node.ledger.evidence_attachment(task_id, piece.evidence_id) == honest.output
            assert piece.evidence_id in {e.evidence_id for e in node.tasks.view(task_id).evidence}

        # 3. A seller submits a wrong output (claiming the honest fuel): the re-run refunds the buyer.
        await wait_for(
            lambda: cheat.host.get_id() in creator.announcements.pubsub.peer_topics.get(task_topic(CAPABILITY), ()),
            30,
            "sub",
        )
        task_id = await _publish(creator, cheat, arbiter, shared, b"pay me")
        # The module is served to the awarded seller and the arbiter only.
        ask = w.ModuleRequest(task_id=task_id, sha256=sha256_hex(mods.UPPER))
        with pytest.raises(ClawnodeError) as refused:
            await request(seller.host, creator.host.get_id(), TASK_PROTOCOL, ask, _REPLY, max_frame=w.MAX_TASK_FRAME)
        assert (refused.value.code, refused.value.reason) == (ErrorCode.FORBIDDEN, "not_a_party")
        usage = RunUsage(fuel_used=honest.fuel_used, outcome="exited", exit_code=0)
        token = await trio.to_thread.run_sync(read_api_token, cheat.data_dir)
        async with httpx.AsyncClient(timeout=30) as client:  # by hand, through the API, with a usage claim
            reply = await client.post(
                f"{cheat.api_url}/api/tasks/{task_id}/result",
                json={"artifact_b64": base64.b64encode(b"PAY ME NOW!\x06").decode(), "usage": usage.model_dump()},
                headers={"authorization": f"Bearer {token}"},
            )
        assert reply.status_code == 200, reply.text
        assert creator.tasks.view(task_id).run == usage
        await creator.tasks.review(task_id, False, "not the program's output")
        await creator.tasks.dispute(task_id, "the output is not what the module writes")
        for node in (creator, cheat):
            await _closed_with(node, task_id, 0)
        assert arbiter.tasks.view(task_id).run_verdict == "output_differs"
        (piece,) = await creator.ledger.list_evidence(task_id)
        assert piece.submitted_by == _peer(arbiter) and "output_differs" in piece.note
        assert arbiter.sandbox.stats.runs["wasm"] == 2

        # 4. A native program (sellers and arbiters that opt in): run under bubblewrap, disputed,
        # decided by the arbiter's re-run on output and outcome (CPU time is not compared).
        if not bwrap_available():
            return
        for node in (seller, arbiter):
            node.sandbox.policy = dataclasses.replace(node.sandbox.policy, kinds=frozenset({"wasm", "native"}))
        task_id = await _publish(creator, seller, arbiter, shared, b"shout this", native=native_programs.UPPER)
        await wait_for(lambda: creator.tasks.view(task_id).result_state == "result_submitted", 20, "result")
        assert creator.tasks.artifact(task_id) == b"SHOUT THIS"
        assert creator.tasks.view(task_id).run.outcome == "exited"  # type: ignore[union-attr]
        await creator.tasks.review(task_id, False, "too loud")
        await creator.tasks.dispute(task_id, "too loud")
        for node in (creator, seller):
            await _closed_with(node, task_id, PRICE)
        assert arbiter.tasks.view(task_id).run_verdict == "rerun_matches"
        assert arbiter.sandbox.stats.runs["native"] == 1
