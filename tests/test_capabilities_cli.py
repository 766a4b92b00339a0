"""Offers, discovery and describe through real ``clawnode`` processes and their CLI and
API, with a scan of every output for secrets, endpoints and local paths."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from dht.records import private_leaks
from node.datadir import read_api_token
from tests.support.processes import LOOPBACK_ANY_PORT, DaemonProcess, run_cli

# A model id as the ecosystem writes it: "/", ":" and upper case survive config, record, DHT key, find,
# describe and the offers API (whose path then holds a "/").
GEMMA = "model:unsloth/Gemma-3-270m-it-GGUF:Q4_K_M"
PROVIDER_CONFIG = """
[node]
reachability = "public"

[hardware]
gpu_model = "RTX 3060"
vram_mb = 12288

[[offers]]
name = "model:unsloth/Gemma-3-270m-it-GGUF:Q4_K_M"
summary = "Gemma 3 270M (Q4_K_M), chat"
price_per_unit = 2000000000
context_length = 8192
family = "gemma3"
parameters = 270000000
quantisation = "Q4_K_M"
features = ["json_schema", "tools"]
chat_format = "gemma"
"""


def cli_json(*args: str) -> Any:
    result = run_cli(*args, "--json", timeout=90)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"not true within {timeout_s} s")


def api(daemon: DaemonProcess, method: str, path: str, body: Any = None) -> httpx.Response:
    url = daemon.identity()["api_url"]
    headers = {"authorization": f"Bearer {read_api_token(daemon.data_dir)}"}
    return httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=30)


def test_offers_are_found_described_repriced_withdrawn_and_never_leak(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    outputs: list[str] = []
    boot = DaemonProcess(tmp_path / "boot", [*LOOPBACK_ANY_PORT, "--role", "bootstrap"]).start()
    daemons.append(boot)
    boot_addr = boot.identity()["listen_addrs"][0]
    (tmp_path / "seller").mkdir()
    (tmp_path / "seller" / "config.toml").write_text(PROVIDER_CONFIG)
    seller = DaemonProcess(tmp_path / "seller", [*LOOPBACK_ANY_PORT, "--bootstrap", boot_addr]).start()
    daemons.append(seller)
    buyer = DaemonProcess(tmp_path / "buyer", [*LOOPBACK_ANY_PORT, "--bootstrap", boot_addr]).start()
    daemons.append(buyer)
    seller_id = seller.identity()["peer_id"]

    def find(*filters: str) -> list[dict[str, Any]]:
        body = cli_json("find", GEMMA, "--data-dir", str(buyer.data_dir), *filters)
        outputs.append(json.dumps(body))
        return list(body["providers"])

    found = wait_for(lambda: find())
    assert [p["peer_id"] for p in found] == [seller_id]
    assert found[0]["price_per_unit"] == 2_000_000_000
    assert found[0]["context_length"] == 8192 and found[0]["gpu_model"] == "RTX 3060"
    assert found[0]["rtt_ms"] > 0
    assert find("--max-price", "1999999999") == []
    assert find("--min-ctx", "16384") == []
    assert [p["peer_id"] for p in find("--min-vram", "12", "--reachable")] == [seller_id]
    # What the model serves beyond free text is in the record, and find filters on it.
    assert found[0]["features"] == ["tools", "json_schema"] and found[0]["chat_format"] == "gemma"
    assert [p["peer_id"] for p in find("--feature", "tools", "--feature", "json_schema")] == [seller_id]
    assert find("--feature", "tools", "--feature", "logprobs") == []
    unknown = run_cli("find", GEMMA, "--data-dir", str(buyer.data_dir), "--feature", "grammar", timeout=90)
    assert unknown.returncode != 0 and "grammar" in unknown.stderr
    text = run_cli("find", GEMMA, "--data-dir", str(buyer.data_dir), timeout=90)
    assert text.returncode == 0 and seller_id in text.stdout and "2 gwei/token" in text.stdout
    assert "tools,json_schema" in text.stdout
    outputs.append(text.stdout)

    described = cli_json("describe", seller_id, "--data-dir", str(buyer.data_dir))
    outputs.append(json.dumps(described))
    assert described["reachable"] is True
    assert described["record"]["capabilities"][0]["name"] == GEMMA
    assert described["record"]["wallet"]["address"].startswith("0x")
    own = cli_json("capabilities", "--data-dir", str(seller.data_dir))
    outputs.append(json.dumps(own))
    assert [offer["name"] for offer in own["offers"]] == [GEMMA]

    # A price set through the API reaches the buyer and survives a restart.
    offer = {**own["offers"][0], "price_per_unit": 3_000_000_000}
    changed = api(seller, "PUT", f"/api/offers/{GEMMA}", offer)
    assert changed.status_code == 200, changed.text
    outputs.append(changed.text)
    wait_for(lambda: [p["price_per_unit"] for p in find()] == [3_000_000_000], timeout_s=15)
    mismatched = api(seller, "PUT", "/api/offers/model:other", offer)
    assert mismatched.status_code == 400 and mismatched.json()["error"]["code"] == "E_INVALID_ARGUMENT"

    seller.stop()
    seller = DaemonProcess(seller.data_dir, [*LOOPBACK_ANY_PORT, "--bootstrap", boot_addr]).start()
    daemons.append(seller)
    restarted = cli_json("capabilities", "--data-dir", str(seller.data_dir))
    assert restarted["offers"][0]["price_per_unit"] == 3_000_000_000

    withdrawn = api(seller, "DELETE", f"/api/offers/{GEMMA}")
    assert withdrawn.status_code == 200 and withdrawn.json()["offers"] == []
    again = api(seller, "DELETE", f"/api/offers/{GEMMA}")
    assert again.status_code == 404 and again.json()["error"]["code"] == "E_NOT_FOUND"
    wait_for(lambda: find() == [], timeout_s=15)

    for daemon in (boot, seller, buyer):
        daemon.stop()
        outputs.append(daemon.log())
    secrets_on_disk = [read_api_token(daemon.data_dir) for daemon in (boot, seller, buyer)] + [
        (daemon.data_dir / "wallet.key").read_text().strip() for daemon in (boot, seller, buyer)
    ]
    for output in outputs:
        for secret in secrets_on_disk:
            assert secret not in output
        assert str(tmp_path) not in output, "a local path leaked"
    for output in outputs[:-3]:  # the replies, not the logs
        assert "http://" not in output and "https://" not in output
    assert private_leaks(described["record"]) == []
