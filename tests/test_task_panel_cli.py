"""`clawnode task publish --panel … --threshold M` and `clawnode task vote` against a running node.

The CLI reaches the node's API from its data dir like any command; a panel is named at publication and
shown with its threshold, a vote outside a dispute is refused with the API's stable code, and the
flags that cannot go together are refused before any call.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio
from click.testing import CliRunner, Result
from eth_account import Account
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.peer.id import ID

from node.cli import main
from tests.support import native_programs
from tests.support.market import market_nodes


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
        publish = ["task", "publish", "model:native-upper", "--budget", "1000", "--native", str(program)]
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
