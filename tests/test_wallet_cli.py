"""`clawnode wallet export|import` and `clawnode escrow deploy` (issue 20), as a user runs them."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner, Result
from eth_account import Account
from libp2p.peer.id import ID

from node.cli import main
from node.datadir import load_or_create_identity
from runtime.escrow import Chain, EscrowClient
from runtime.escrow.devchain import DevChain
from tests.support.processes import prepare_data_dir

PASSPHRASE = {"CLAWNODE_WALLET_PASSPHRASE": "correct horse battery"}


def run_cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """The CLI in this process (no interpreter start per command: the tests stay fast)."""
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_a_wallet_travels_encrypted_between_data_dirs(tmp_path: Path) -> None:
    key = Account.create().key.hex()
    home = prepare_data_dir(tmp_path / "home", wallet_key=key)
    keystore = tmp_path / "wallet.json"
    exported = run_cli("wallet", "export", str(keystore), "--data-dir", str(home), env=PASSPHRASE)
    assert exported.exit_code == 0, exported.stderr
    address = Account.from_key(key).address
    assert address.lower()[2:] in exported.stdout.lower()
    text = keystore.read_text()
    assert key.removeprefix("0x") not in text and json.loads(text)["crypto"]["kdf"] == "scrypt"
    assert keystore.stat().st_mode & 0o077 == 0

    again = run_cli("wallet", "export", str(keystore), "--data-dir", str(home), env=PASSPHRASE)
    assert again.exit_code == 1 and "E_CONFLICT" in again.stderr  # never overwrites a keystore

    # scrypt at its standard cost (about a second a try): three tries in all.
    other = prepare_data_dir(tmp_path / "other")
    wrong = run_cli(
        "wallet", "import", str(keystore), "--data-dir", str(other), env={"CLAWNODE_WALLET_PASSPHRASE": "x" * 9}
    )
    assert wrong.exit_code == 1 and "E_INVALID_ARGUMENT" in wrong.stderr
    assert not (other / "wallet.key").exists()

    other_key = Account.create().key.hex()
    taken = prepare_data_dir(tmp_path / "taken", wallet_key=other_key)
    refused = run_cli("wallet", "import", str(keystore), "--data-dir", str(taken), env=PASSPHRASE)
    assert refused.exit_code == 1 and "--replace" in refused.stderr  # refused before the passphrase is asked
    imported = run_cli("wallet", "import", str(keystore), "--replace", "--data-dir", str(taken), env=PASSPHRASE)
    assert imported.exit_code == 0, imported.stderr
    assert address in imported.stdout and key.removeprefix("0x") not in imported.stdout + imported.stderr
    assert (taken / "wallet.key").read_text().strip() == key.removeprefix("0x")
    assert (taken / "wallet.key").stat().st_mode & 0o077 == 0
    [kept] = [p for p in taken.iterdir() if p.name.startswith("wallet.key.replaced-")]
    assert kept.read_text().strip() == other_key.removeprefix("0x")  # the old wallet is kept aside


@pytest.fixture
def served_chain() -> Iterator[tuple[DevChain, str]]:
    """A development chain served over JSON-RPC from a thread of its own (as a bootstrap serves it)."""
    dev = DevChain.start()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        with trio.CancelScope() as scope:
            state["scope"], state["token"] = scope, trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                state["url"] = await nursery.start(dev.serve, "127.0.0.1", 0)
                ready.set()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    assert ready.wait(30)
    yield dev, str(state["url"])
    trio.from_thread.run_sync(state["scope"].cancel, trio_token=state["token"])
    thread.join(10)


def test_escrow_deploy_prints_what_the_other_nodes_need(tmp_path: Path, served_chain: tuple[DevChain, str]) -> None:
    dev, url = served_chain
    deployer = Account.create()
    home = prepare_data_dir(tmp_path / "home", wallet_key=deployer.key.hex())

    broke = run_cli("escrow", "deploy", "--rpc-url", url, "--data-dir", str(home))
    assert broke.exit_code == 1 and "E_INSUFFICIENT_FUNDS" in broke.stderr and url not in broke.stderr

    dev.fund(deployer.address)
    deployed = run_cli("escrow", "deploy", "--rpc-url", url, "--data-dir", str(home))
    assert deployed.exit_code == 0, deployed.stderr
    assert f"chain_id = {dev.chain.chain_id}" in deployed.stdout and 'mode = "rpc"' in deployed.stdout
    assert url not in deployed.stdout  # the URL may carry a key: never printed
    body = json.loads(run_cli("escrow", "deploy", "--rpc-url", url, "--data-dir", str(home), "--json").stdout)
    assert body["chain"] == f"eip155:{dev.chain.chain_id}" and body["deployer"] == deployer.address
    # The arbiter as the pair a seller must trust: this node's wallet and peer id (the identity its daemon runs as).
    peer = str(ID.from_pubkey(load_or_create_identity(home)[0].public_key))
    assert (body["arbiter"], body["arbiter_peer"]) == (deployer.address, peer)
    assert f'arbiter = "{deployer.address}"' in deployed.stdout and f'arbiter_peer = "{peer}"' in deployed.stdout
    # A real escrow at the printed address, another one than the network's own.
    client = EscrowClient(Chain.rpc(url), deployer, body["contract"], expected_chain_id=dev.chain.chain_id)
    client.verify_contract()
    assert body["contract"] != dev.deployer.address

    down = run_cli("escrow", "deploy", "--rpc-url", "http://127.0.0.1:9/secret-key", "--data-dir", str(home))
    assert down.exit_code == 1 and "E_UNAVAILABLE" in down.stderr and "secret-key" not in down.stderr


def test_a_dead_rpc_url_is_passed_over_for_the_next(served_chain: tuple[DevChain, str]) -> None:
    from runtime.escrow import EscrowSettings, connect_escrow
    from runtime.escrow.errors import EscrowError

    dev, url = served_chain
    wallet = Account.create()
    settings = EscrowSettings(
        mode="rpc",
        rpc_url="http://127.0.0.1:9/down",  # nothing listens there
        fallback_urls=(url,),
        contract=dev.deployer.address,
        chain_id=dev.chain.chain_id,
        rpc_timeout_s=2,
        rpc_retries=0,
    )
    client = connect_escrow(settings, wallet)
    assert client is not None and client.chain.chain_id == dev.chain.chain_id
    # Another chain at a fallback URL is a configuration to fix, not an outage: refused, never used.
    wrong = settings.model_copy(update={"chain_id": dev.chain.chain_id + 1})
    with pytest.raises(EscrowError) as refused:
        connect_escrow(wrong, wallet)
    assert refused.value.reason == "wrong_chain"
