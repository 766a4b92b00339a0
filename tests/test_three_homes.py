"""Separate ``clawnode start`` processes on the shipped defaults trade with each other (issue 20).

A bootstrap (``--role bootstrap``: it runs the network's development chain), a provider serving a
tiny llama.cpp model and a consumer, each its own process and data dir, every one on
``escrow.mode = "auto"``: the consumer's ``clawnode chat`` is served by the provider and paid
through the escrow on the bootstrap's chain; both ledgers and the chain agree on the amount.

A fourth process serves the same model cheaper on a private chain of its own
(``escrow.mode = "embedded"``): ``clawnode find`` lists it as unreachable for payment and the
router never asks it (its ledger holds no lease).
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from node.datadir import read_api_token, read_running
from runtime.escrow import Chain, EscrowClient
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.processes import FAST_DAEMON_ENV, LOOPBACK_ANY_PORT, DaemonProcess, run_cli

FAST = FAST_DAEMON_ENV


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _home(root: Path, name: str, config: str = "") -> Path:
    data_dir = root / name
    data_dir.mkdir(mode=0o700)
    (data_dir / "config.toml").write_text(config)
    return data_dir


def _api(daemon: DaemonProcess, method: str, path: str) -> Any:
    running = read_running(daemon.data_dir)
    assert running is not None
    headers = {"authorization": f"Bearer {read_api_token(daemon.data_dir)}"}
    reply = httpx.request(method, f"{running.api_url}{path}", headers=headers, timeout=30)
    reply.raise_for_status()
    return reply.json()


def _until(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def test_three_homes_on_the_defaults_trade_and_a_provider_on_another_chain_is_never_tried(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    serves = f'[[models]]\nname = "tiny"\npath = "{model}"\nn_threads = 1\n'
    lonely = f'[[models]]\nname = "lonely"\npath = "{model}"\nn_threads = 1\n'  # only the stranger serves it
    rpc_port = _free_port()
    boot_dir = _home(tmp_path, "bootstrap", f'[escrow]\ndev_rpc_listen = "127.0.0.1:{rpc_port}"\n')
    bootstrap = DaemonProcess(boot_dir, [*LOOPBACK_ANY_PORT, "--role", "bootstrap"], env=FAST).start()
    daemons.append(bootstrap)
    joins = [*LOOPBACK_ANY_PORT, "--bootstrap", bootstrap.identity()["listen_addrs"][0]]
    provider = DaemonProcess(_home(tmp_path, "provider", serves + "price_per_unit = 1000\n"), joins, env=FAST)
    stranger = DaemonProcess(
        _home(tmp_path, "stranger", '[escrow]\nmode = "embedded"\n' + serves + "price_per_unit = 1\n" + lonely),
        joins,
        env=FAST,
    )
    consumer = DaemonProcess(_home(tmp_path, "consumer"), joins, env=FAST)
    daemons.extend([provider, stranger, consumer])
    with ThreadPoolExecutor(3) as starting:  # three homes switched on at once
        list(starting.map(DaemonProcess.start, [provider, stranger, consumer]))
    ids = {name: d.identity()["peer_id"] for name, d in (("provider", provider), ("stranger", stranger))}

    # Everyone on "auto" but the stranger pays on the bootstrap's chain, each with a funded wallet.
    def escrow(daemon: DaemonProcess) -> dict[str, Any]:
        return dict(_api(daemon, "GET", "/api/ledger/summary")["escrow"])

    for daemon in (bootstrap, provider, stranger, consumer):
        _until(lambda d=daemon: escrow(d)["state"] == "connected", 30, f"{daemon.data_dir.name}'s escrow")
    network = escrow(bootstrap)
    assert escrow(provider)["chain_id"] == escrow(consumer)["chain_id"] == network["chain_id"]
    assert escrow(provider)["contract"] == escrow(consumer)["contract"] == network["contract"]
    assert escrow(stranger)["chain_id"] != network["chain_id"]  # a private chain of its own
    served = _api(bootstrap, "GET", "/api/network")
    assert served["state"] == "serving" and served["rpc_url"] == f"http://127.0.0.1:{rpc_port}" and served["faucet"]
    assert _api(stranger, "GET", "/api/network")["state"] == "private"
    shown = run_cli("network", "--data-dir", str(consumer.data_dir))
    assert shown.returncode == 0, shown.stderr
    boot_id = bootstrap.identity()["peer_id"]
    assert f"joined through {boot_id}" in shown.stdout and f"eip155:{network['chain_id']}" in shown.stdout
    assert f"(peer {boot_id})" in shown.stdout  # the network's arbiter: the bootstrap's wallet, under its peer id

    # find: the provider is listed, the cheaper stranger only as unreachable for payment.
    last: list[Any] = []

    def found() -> dict[str, Any] | None:
        body = dict(_api(consumer, "GET", "/api/discover?capability=model:tiny"))
        last[:] = [{k: v for k, v in body.items() if k != "providers"}, [p["peer_id"] for p in body["providers"]]]
        listed = {p["peer_id"] for p in body["providers"]}
        others = {u["provider"]["peer_id"]: u["reason"] for u in body["unpayable"]}
        return body if listed == {ids["provider"]} and others == {ids["stranger"]: "other_chain"} else None

    try:
        body = _until(found, 40, "find listing the provider and the stranger apart")
    except AssertionError:
        raise AssertionError(f"find listed {last}, expected {ids}") from None
    assert body["note"] == "1 provider on other chains"
    assert body["providers"][0]["chain"] == f"eip155:{network['chain_id']}"
    text = run_cli("find", "model:tiny", "--data-dir", str(consumer.data_dir), timeout=60).stdout  # as people read it
    assert f"{ids['stranger']}  eip155:" in text and "unreachable for payment (other_chain)" in text

    asked = ("chat", "tiny", "hello there", "--max-tokens", "8", "--data-dir", str(consumer.data_dir))
    chat = run_cli(*asked, timeout=120)
    assert chat.returncode == 0, chat.stderr + consumer.log()[-3000:]
    assert len(chat.stdout.rstrip("\n")) == 8
    assert f"[served by {ids['provider'][:16]}]" in chat.stderr
    # A model only the stranger serves: not found here, and the answer says why.
    lonely_chat = run_cli("chat", "lonely", "hi", "--data-dir", str(consumer.data_dir), timeout=120)
    assert lonely_chat.returncode == 1 and "E_NOT_FOUND" in lonely_chat.stderr
    assert "1 provider on other chains" in lonely_chat.stderr
    assert _api(stranger, "GET", "/api/ledger/leases")["leases"] == []  # never even quoted a lease

    # End the router's lease: the provider claims what was countersigned, from the escrow on the network chain.
    [lease] = _api(consumer, "GET", "/api/ledger/leases")["leases"]
    _api(consumer, "DELETE", f"/api/leases/{lease['lease_id']}")

    def settled() -> int | None:
        income = _api(provider, "GET", "/api/ledger/summary")["total"]["income"]
        spend = _api(consumer, "GET", "/api/ledger/summary")["total"]["spend"]
        return int(income) if income and income == spend else None

    income = _until(settled, 30, "both ledgers booking the claim (income = spend)")
    [sold] = _api(provider, "GET", "/api/ledger/leases")["leases"]
    [bought] = _api(consumer, "GET", "/api/ledger/leases")["leases"]
    assert sold["lease_id"] == bought["lease_id"] == lease["lease_id"]
    assert sold["metered_units"] > 0  # the provider meters; the consumer countersigned the same receipts
    assert income == sold["metered_units"] * 1000 == sold["settled_amount"] == bought["settled_amount"]
    receipts = _api(consumer, "GET", f"/api/ledger/receipts?lease_id={lease['lease_id']}")["receipts"]
    assert max(r["amount"] for r in receipts if r["countersigned"]) == income

    # The chain agrees: the escrow released exactly that to the provider, whose credit holds it.
    chain = Chain.rpc(f"http://127.0.0.1:{rpc_port}")
    reader = EscrowClient(chain, chain.dev_accounts()[0], network["contract"])
    state = reader.get(escrow(consumer)["wallet"], bytes.fromhex(lease["lease_id"]))
    assert state.released == income and state.payee.lower() == escrow(provider)["wallet"].lower()
    assert reader.credit_of(escrow(provider)["wallet"]) == income

    # clawnode wallet: the same credit, withdrawn into the provider's wallet.
    shown = run_cli("wallet", "--json", "--data-dir", str(provider.data_dir), timeout=60)
    assert shown.returncode == 0, shown.stderr
    wallet = json.loads(shown.stdout)
    assert wallet["escrow_credit"] == income and wallet["chain"] == f"eip155:{network['chain_id']}"
    withdrawn = run_cli("wallet", "withdraw", "--json", "--data-dir", str(provider.data_dir), timeout=150)
    assert withdrawn.returncode == 0, withdrawn.stderr
    paid_out = json.loads(withdrawn.stdout)
    assert paid_out["amount"] == income
    assert reader.credit_of(escrow(provider)["wallet"]) == 0
    receipt = chain.w3.eth.get_transaction_receipt(paid_out["tx_hash"])
    gas = int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])
    assert int(chain.w3.eth.get_balance(wallet["address"])) == wallet["balance"] + income - gas
