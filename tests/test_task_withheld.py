"""The burden of producing a disputed sandboxed task's program, end to end: real nodes, task streams and
the embedded chain.

The creator published the program and keeps it until the task closes; the arbiter asks the parties
for it until ``module_deadline_s``. A creator that serves it late still gets its re-run (a wrong
result refunded); one that never serves it (nor the seller) forfeits the dispute: the seller is
paid without a person (``module_withheld``).
"""

from __future__ import annotations

import dataclasses

import pytest
import trio

from protocols.gossip import task_topic
from protocols.machines.task import TaskState
from protocols.task_wire import RunUsage
from runtime.sandbox import Limits
from tests.support import wasm_modules as mods
from tests.support.market import SharedChain, market_nodes, wait_for

CAPABILITY = "model:wasm-withheld"
ETH = 10**18
PRICE = ETH // 2
LIMITS = Limits(fuel=1_000_000, memory_bytes=2 * 1024 * 1024, wall_s=5.0, output_bytes=4096)

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")


async def test_a_program_withheld_past_the_deadline_pays_the_seller_and_one_served_late_is_re_run() -> None:
    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [{"arbiter": 2}, {"arbiter": 2}, {"wallet_key": shared.arbiter.key.hex()}]  # escrow.arbiter_peer
    async with market_nodes(specs, chain=shared) as (nodes, _):
        creator, seller, arbiter = nodes
        await seller.tasks.watch(CAPABILITY)
        topic = task_topic(CAPABILITY)
        subscribed = creator.announcements.pubsub.peer_topics
        await wait_for(lambda: seller.host.get_id() in subscribed.get(topic, ()), 30, "sub")

        async def publish(text: bytes) -> str:
            view = await creator.tasks.publish_run(
                CAPABILITY,
                ETH,
                120,
                kind="wasm",
                module=mods.UPPER,
                input=text,
                limits=LIMITS,
                arbiter_peer=str(arbiter.host.get_id()),
                arbiter_wallet=shared.arbiter.address,
                review_timeout_s=60,
            )
            await wait_for(lambda: view.task_id in seller.tasks.book.tasks, 30, "announcement")
            bid = await seller.tasks.bid(view.task_id, PRICE)
            await creator.tasks.award(view.task_id, bid.bid_id)
            return view.task_id

        async def closed_with(task_id: str, to_bidder: int) -> None:
            for node in (creator, seller):
                await wait_for(lambda: str(node.tasks.book.get(task_id).state) == TaskState.CLOSED, 30, "closed")  # noqa: B023
                assert node.tasks.view(task_id).to_bidder == to_bidder

        # 1. A wrong result by hand (the seller never fetched the program); the creator serves the program
        # only after the arbiter's first asks: the arbiter asks again, re-runs it and refunds the buyer.
        arbiter.tasks.module_deadline_s, arbiter.tasks.module_retry_s = 30.0, 0.2
        seller.sandbox.policy = dataclasses.replace(seller.sandbox.policy, auto_run=False)
        task_id = await publish(b"pay me")
        await seller.tasks.submit(task_id, b"PAY ME NOW", RunUsage(fuel_used=700, outcome="exited", exit_code=0))
        await wait_for(lambda: creator.tasks.view(task_id).result_state == "result_submitted", 20, "result")
        program, creator.tasks.local[task_id].module = creator.tasks.local[task_id].module, None
        await creator.tasks.review(task_id, False, "not the program's output")
        await creator.tasks.dispute(task_id, "not the program's output")
        await wait_for(lambda: task_id in arbiter.tasks.local and arbiter.tasks.local[task_id].rerunning, 20, "asking")
        await trio.sleep(0.6)  # a few asks answered module_unknown
        assert arbiter.tasks.view(task_id).run_verdict is None  # still asking, not decided
        creator.tasks.local[task_id].module = program
        await closed_with(task_id, 0)
        assert arbiter.tasks.view(task_id).run_verdict == "output_differs"

        # 2. An honest result rejected, and neither party serves the program: past the deadline the
        # creator is held to have withheld it and the seller is paid, with the arbiter's signed record.
        arbiter.tasks.module_deadline_s = 1.0
        seller.sandbox.policy = dataclasses.replace(seller.sandbox.policy, auto_run=True)
        task_id = await publish(b"pay me")
        await wait_for(lambda: creator.tasks.view(task_id).result_state == "result_submitted", 20, "result")
        for node in (creator, seller):
            node.tasks.local[task_id].module = None
        await creator.tasks.review(task_id, False, "I do not like it")
        await creator.tasks.dispute(task_id, "wrong, surely")
        await closed_with(task_id, PRICE)
        assert arbiter.tasks.view(task_id).run_verdict == "module_withheld"
        (piece,) = await creator.ledger.list_evidence(task_id)
        assert piece.submitted_by == str(arbiter.host.get_id()) and "module_withheld" in piece.note
