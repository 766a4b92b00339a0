"""A panel drawn from arbiters' capability records, end to end: real nodes, their own records, the
embedded chain.

The creator names the arbiters it found, in order of preference (``clawnode task publish --panel-from``;
its node fetches their records live and hands them to ``publish_run``); only
those whose record's ``sandbox`` runs the task's kind within caps that cover its limits sit on the
panel, so the dispute over a task whose limits exceed one arbiter's caps is decided by re-runs, not
by that arbiter's abstention and a person.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from node.cli import main
from protocols.gossip import task_topic
from protocols.machines.task import TaskState
from runtime.errors import ClawnodeError, ErrorCode
from runtime.sandbox import Limits
from tests.support import wasm_modules as mods
from tests.support.market import SharedChain, market_nodes, wait_for

CAPABILITY = "model:wasm-panel-draw"
ETH = 10**18
PRICE = ETH // 2
LIMITS = Limits(fuel=1_000_000, memory_bytes=2 * 1024 * 1024, wall_s=5.0, output_bytes=4096)

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")


async def test_a_panel_drawn_from_records_seats_only_arbiters_able_to_re_run_and_decides_by_their_votes(
    tmp_path: Path,
) -> None:
    shared = await trio.to_thread.run_sync(SharedChain.start)
    # The three able arbiters are ones the seller trusts (escrow.trusted_arbiters: their PEER:WALLET).
    specs = [{}, {"trusts": (3, 4, 5)}, {}, {}, {}, {}]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        creator, seller, low, *able = nodes
        # ``low`` runs wasm, but at most 1000 instructions a run: its record says so, and its sandbox enforces it.
        low.sandbox.policy = dataclasses.replace(low.sandbox.policy, cap=LIMITS.model_copy(update={"fuel": 1000}))
        assert low.publisher.sandbox is not None
        low.publisher.sandbox = low.publisher.sandbox.model_copy(update={"max_fuel": 1000})
        records = [node.publisher.build_record() for node in (low, *able, creator)]
        await seller.tasks.watch(CAPABILITY)
        topic = task_topic(CAPABILITY)
        subscribed = creator.announcements.pubsub.peer_topics
        await wait_for(lambda: seller.host.get_id() in subscribed.get(topic, ()), 30, "sub")

        async def publish(size: int) -> str:
            view = await creator.tasks.publish_run(
                CAPABILITY,
                ETH,
                120,
                kind="wasm",
                module=mods.UPPER,
                input=b"pay me",
                limits=LIMITS,
                review_timeout_s=60,
                panel_from=records,
                panel_size=size,
                panel_threshold=2,
            )
            return view.task_id

        # Four members asked for, three able (``low`` cannot, the creator may not judge its own task).
        with pytest.raises(ClawnodeError) as short:
            await publish(4)
        assert (short.value.code, short.value.reason) == (ErrorCode.NOT_FOUND, "panel_short")

        # Through the CLI: the creator's node fetches each named arbiter's record live and draws from them.
        low.publisher.republish()  # serve the record with its lowered cap
        program = tmp_path / "upper.wasm"
        program.write_bytes(mods.UPPER)
        peers = ",".join(str(node.host.get_id()) for node in (low, *able))
        args = ["task", "publish", CAPABILITY, "--budget", str(ETH), "--deadline", "120", "--wasm", str(program)]
        args += ["--fuel", str(LIMITS.fuel), "--memory-mb", "2", "--wall", "5", "--review-timeout", "60"]
        args += ["--panel-from", peers, "--json", "--data-dir", str(creator.data_dir)]
        published = await trio.to_thread.run_sync(lambda: CliRunner().invoke(main, args, catch_exceptions=False))
        assert published.exit_code == 0, published.output
        task_id = json.loads(published.output)["task_id"]
        view = creator.tasks.view(task_id)
        assert view.panel is not None and view.panel.threshold == 2
        assert view.panel is not None
        assert [m.peer for m in view.panel.members] == [str(n.host.get_id()) for n in able]
        assert [m.wallet for m in view.panel.members] == [n.escrow_client.account.address for n in able]  # type: ignore[union-attr]
        await wait_for(lambda: task_id in seller.tasks.book.tasks, 30, "announcement")
        bid = await seller.tasks.bid(task_id, PRICE)
        await creator.tasks.award(task_id, bid.bid_id)
        await wait_for(lambda: creator.tasks.view(task_id).result_state == "result_submitted", 20, "result")
        await creator.tasks.review(task_id, False, "I do not like it")
        await creator.tasks.dispute(task_id, "wrong, surely")
        for node in (creator, seller):
            await wait_for(lambda: str(node.tasks.book.get(task_id).state) == TaskState.CLOSED, 30, "closed")  # noqa: B023
            assert node.tasks.view(task_id).to_bidder == PRICE
        assert creator.tasks.view(task_id).panel_state == "decided"
        assert low.sandbox.stats.runs.get("wasm", 0) == 0  # never asked to re-run what it could not
