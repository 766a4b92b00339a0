"""`clawnode task publish --panel … --threshold M` and `clawnode task vote` against a running node.

The CLI reaches the node's API from its data dir like any command; a panel is named at publication and
shown with its threshold, a vote outside a dispute is refused with the API's stable code, and the
flags that cannot go together are refused before any call.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import httpx
import pytest
import trio
from click.testing import CliRunner, Result
from eth_account import Account
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.peer.id import ID

from node.cli import main
from node.datadir import read_api_token
from protocols import task_wire as w
from protocols.gossip import task_topic
from protocols.machines.task import TaskState
from protocols.task import dispute as task_dispute
from runtime.errors import ClawnodeError, ErrorCode
from runtime.sandbox import Limits
from runtime.sandbox.native import bwrap_available
from tests.support import native_programs
from tests.support.market import market_nodes, metric_samples, wait_for

CAPABILITY = "model:native-upper"
LIMITS = Limits(fuel=2000, memory_bytes=64 * 1024 * 1024, wall_s=5.0, output_bytes=4096, pids=8)


def _member() -> tuple[str, str]:
    return str(ID.from_pubkey(create_new_key_pair().public_key)), Account.create().address


async def test_a_panel_task_is_published_and_voted_on_through_the_cli(tmp_path: Path) -> None:
    program = tmp_path / "upper.sh"
    program.write_bytes(native_programs.UPPER)
    members = [_member() for _ in range(3)]
    async with market_nodes([{}]) as ((node,), _):

        def cli(*args: str) -> Result:
            return CliRunner().invoke(main, [*args, "--data-dir", str(node.data_dir)], catch_exceptions=False)

        panel = ",".join(f"{peer}:{wallet}" for peer, wallet in members)
        publish = ["task", "publish", CAPABILITY, "--budget", "1000", "--native", str(program)]
        published = await trio.to_thread.run_sync(cli, *publish, "--panel", panel, "--json")
        assert published.exit_code == 0, published.output
        view = json.loads(published.output)
        assert view["panel"]["threshold"] == 2  # a strict majority of three when --threshold is left out
        assert [(m["peer"], m["wallet"]) for m in view["panel"]["members"]] == members
        assert node.tasks.view(view["task_id"]).panel is not None

        shown = await trio.to_thread.run_sync(cli, "task", "list")
        assert "panel 2 of 3: no dispute" in shown.output and shown.output.count("not voted") == 3

        # A threshold that is not a strict majority is the node's refusal, with its stable code.
        weak = await trio.to_thread.run_sync(cli, *publish, "--panel", panel, "--threshold", "1")
        assert weak.exit_code == 1 and "E_INVALID_ARGUMENT" in weak.output

        voted = await trio.to_thread.run_sync(cli, "task", "vote", view["task_id"], "--to-bidder", "500")
        assert voted.exit_code == 1 and "E_CONFLICT: the task has no dispute" in voted.output

        for bad in (
            ["task", "vote", view["task_id"]],
            ["task", "vote", view["task_id"], "--abstain", "--to-bidder", "5"],
            [*publish, "--panel", "no-wallet-here"],
            [*publish[:-2], "--panel", panel],  # a panel decides sandboxed tasks only
            [*publish, "--threshold", "2"],
        ):
            refused = await trio.to_thread.run_sync(cli, *bad)
            assert refused.exit_code == 2, (bad, refused.output)
        assert len((await trio.to_thread.run_sync(cli, "task", "list", "--json")).output.split('"task_id"')) == 2


async def test_a_panel_that_does_not_answer_is_shown_as_undecided_with_the_escrow_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A native task disputed before a panel whose members never answer (peers no node reaches): the
    escrow stays locked, and the parties' nodes say so in /metrics (what TaskPanelUnanswered reads) and
    in `clawnode task list`."""
    if not bwrap_available():
        pytest.skip("bubblewrap is not installed")
    # No member is ever reached: the case's retries (1 s, then 2 s) would only delay the UNAVAILABLE.
    monkeypatch.setattr(task_dispute, "PUSH_ATTEMPTS", 1)
    members = [_member() for _ in range(3)]
    panel = w.PanelTerms(members=[w.PanelMember(peer=p, wallet=a) for p, a in members], threshold=2)
    # An honest panel, whose members the seller trusts (escrow.trusted_arbiters: PEER:WALLET), that cannot be
    # reached.
    async with market_nodes([{}, {"trusted_arbiters": tuple(f"{p}:{a}" for p, a in members)}]) as (
        (creator, seller),
        _,
    ):
        seller.sandbox.policy = dataclasses.replace(seller.sandbox.policy, kinds=frozenset({"wasm", "native"}))
        await seller.tasks.watch(CAPABILITY)
        topic = task_topic(CAPABILITY)
        await wait_for(lambda: seller.host.get_id() in creator.announcements.pubsub.peer_topics.get(topic, ()), 30)
        view = await creator.tasks.publish_run(
            CAPABILITY, 10**18, 120, kind="native", module=native_programs.UPPER, input=b"x", limits=LIMITS, panel=panel
        )
        task_id = view.task_id
        await wait_for(lambda: task_id in seller.tasks.book.tasks, 30, "announcement")
        bid = await seller.tasks.bid(task_id, 10**17)
        await creator.tasks.award(task_id, bid.bid_id)
        await wait_for(lambda: creator.tasks.view(task_id).result_state == "result_submitted", 20, "result")
        assert creator.tasks.undecided_panels()["open"] == 0  # no dispute yet
        await creator.tasks.review(task_id, False, "wrong")
        with pytest.raises(ClawnodeError) as unreachable:  # opened on chain; no member can be told
            await creator.tasks.dispute(task_id, "wrong")
        assert unreachable.value.code == ErrorCode.UNAVAILABLE

        token = await trio.to_thread.run_sync(read_api_token, creator.data_dir)
        async with httpx.AsyncClient(timeout=5.0) as client:
            reply = await client.get(f"{creator.api_url}/metrics", headers={"authorization": f"Bearer {token}"})
        samples = metric_samples(reply.text)
        assert samples['clawnode_task_panels_undecided{state="open"}'] == 1
        assert samples['clawnode_task_panels_undecided{state="deadlocked"}'] == 0

        def listed() -> str:
            args = ["task", "list", "--data-dir", str(creator.data_dir)]
            return CliRunner().invoke(main, args, catch_exceptions=False).output

        shown = await trio.to_thread.run_sync(listed)
        assert "panel 2 of 3: open" in shown and shown.count("not voted") == 3
        assert str(creator.tasks.book.get(task_id).state) != TaskState.CLOSED
