"""The ledger mounted in a real ``clawnode start``: CLI and API on a fresh node and on a ledger with money in it.

Receipts and settlements are written through the runtime API (``runtime.ledger.Ledger``) into the
node's ``ledger.db`` while the daemon is stopped, exactly as the lease protocol and the settlement
queue will write them; the daemon is then started and read through ``clawnode ledger``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import trio

from runtime.ledger import EscrowRef, LeaseOpen, Ledger
from tests.runtime.support import peer_id, peer_key, receipt_key_of
from tests.support.processes import LOOPBACK_ANY_PORT, DaemonProcess, run_cli
from wire.peer_keys import ed25519_public_key

PROVIDER, CONSUMER, SELLER = peer_key("ledger-provider"), peer_key("ledger-consumer"), peer_key("ledger-seller")
PRICE = 10**9
ESCROW = EscrowRef(contract="0x" + "11" * 20, payer="0x" + "22" * 20, escrow_id="0x" + "ab" * 32)
FORBIDDEN_IN_OUTPUT = ("api.token", "wallet.key", "identity.key", "ledger.db", "Bearer")


def _daemon(data_dir: Path, mode: str = "embedded") -> DaemonProcess:
    return DaemonProcess(
        data_dir,
        LOOPBACK_ANY_PORT,
        env={"CLAWNODE_BOOTSTRAP_USE_DEFAULTS": "false", "CLAWNODE_ESCROW_MODE": mode},
    )


def _cli(data_dir: Path, *args: str) -> tuple[int, str]:
    result = run_cli("ledger", *args, "--data-dir", str(data_dir))
    return result.returncode, result.stdout + result.stderr


def _assert_no_secrets(text: str, data_dir: Path) -> None:
    assert str(data_dir) not in text
    assert str(data_dir.parent) not in text
    for word in FORBIDDEN_IN_OUTPUT:
        assert word not in text
    token = (data_dir / "api.token").read_text().strip()
    assert token not in text
    wallet = (data_dir / "wallet.key").read_text().strip().removeprefix("0x")
    assert wallet not in text


async def _write_money(data_dir: Path, scratch: Path) -> None:
    """Provider lease: 3 countersigned receipts, 2 of them settled; consumer lease: one release landed."""
    ours = await Ledger.open(data_dir / "ledger.db", peer_keys=ed25519_public_key)
    theirs = await Ledger.open(scratch / "consumer.db", peer_keys=ed25519_public_key)
    try:
        sold = LeaseOpen(
            lease_id="lease-sold",
            role="provider",
            provider=peer_id(PROVIDER),
            consumer=peer_id(CONSUMER),
            price_per_unit=PRICE,
            budget=10**18,
            escrow=ESCROW,
        )
        await ours.open_lease(sold, idempotency_key="open-sold")
        await theirs.open_lease(sold.model_copy(update={"role": "consumer"}), idempotency_key="open-sold")
        for i, units in enumerate((100, 250, 50)):
            await ours.record_usage("lease-sold", writer=peer_id(PROVIDER), units=units, idempotency_key=f"u{i}")
            receipt = await ours.issue_receipt("lease-sold", receipt_key_of(PROVIDER))
            signed = await theirs.countersign_receipt(receipt, receipt_key_of(CONSUMER), voucher="0x" + "cd" * 65)
            await ours.record_countersigned(signed)
            if i == 1:
                claim = await ours.enqueue_claim("lease-sold")
                # What the settlement queue records once the claim lands on chain.
                await ours.mark_landed(claim.settlement_id, tx_hash="0x" + "ee" * 32, released_total=350 * PRICE)
        bought = LeaseOpen(
            lease_id="lease-bought",
            role="consumer",
            provider=peer_id(SELLER),
            consumer=peer_id(PROVIDER),
            price_per_unit=PRICE,
            budget=10**18,
            escrow=ESCROW.model_copy(update={"escrow_id": "0x" + "cd" * 32}),
        )
        await ours.open_lease(bought, idempotency_key="open-bought")
        release = await ours.enqueue_release("lease-bought", 120 * PRICE)
        await ours.mark_landed(release.settlement_id, tx_hash="0x" + "ff" * 32, released_total=120 * PRICE)
    finally:
        await ours.aclose()
        await theirs.aclose()


def test_fresh_node_shows_an_empty_ledger_that_verifies(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    data_dir = tmp_path / "node"
    daemons.append(_daemon(data_dir).start())
    assert (data_dir / "ledger.db").exists()

    code, out = _cli(data_dir, "--json")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["total"] == {"income": 0, "spend": 0, "net": 0}
    assert summary["by_day"] == [] and summary["by_peer"] == []
    assert summary["leases"] == 0 and summary["receipts"] == 0
    assert summary["settlement_queue"] == {"length": 0, "oldest_age_s": None}
    assert summary["escrow"]["mode"] == "embedded"

    for flag, key in (("--leases", "leases"), ("--receipts", "receipts"), ("--settlements", "settlements")):
        code, out = _cli(data_dir, flag, "--json")
        assert code == 0, out
        assert json.loads(out) == {key: []}
        code, text = _cli(data_dir, flag)
        assert code == 0 and f"no {key}" in text

    code, out = _cli(data_dir, "verify")
    assert code == 0, out
    assert out.startswith("ok: 0 audit entries")
    code, out = _cli(data_dir, "verify", "--json")
    assert code == 0 and json.loads(out)["ok"] is True

    code, text = _cli(data_dir)
    assert code == 0 and "escrow embedded" in text
    _assert_no_secrets(text + out + daemons[0].log(), data_dir)


def test_summary_reflects_receipts_and_settlements_in_the_ledger(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    data_dir = tmp_path / "node"
    daemon = _daemon(data_dir, mode="off").start()
    daemons.append(daemon)
    daemon.stop()
    trio.run(_write_money, data_dir, tmp_path)
    daemons.append(_daemon(data_dir, mode="off").start())

    code, out = _cli(data_dir, "--json")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["total"] == {"income": 350 * PRICE, "spend": 120 * PRICE, "net": 230 * PRICE}
    by_peer = {row["key"]: row for row in summary["by_peer"]}
    assert by_peer[peer_id(CONSUMER)] == {
        "key": peer_id(CONSUMER),
        "income": 350 * PRICE,
        "spend": 0,
        "net": 350 * PRICE,
    }
    assert by_peer[peer_id(SELLER)]["spend"] == 120 * PRICE
    assert len(summary["by_day"]) == 1 and summary["by_day"][0]["net"] == 230 * PRICE
    assert summary["leases"] == 2 and summary["receipts"] == 3
    assert summary["escrow"] == {"mode": "off", "state": "off", "chain_id": None, "contract": None, "wallet": None}

    code, out = _cli(data_dir, "--receipts", "--json")
    receipts = json.loads(out)["receipts"]
    assert sorted((r["seq"], r["amount"], r["countersigned"], r["settled"]) for r in receipts) == [
        (1, 100 * PRICE, True, True),
        (2, 350 * PRICE, True, True),
        (3, 400 * PRICE, True, False),
    ]
    code, out = _cli(data_dir, "--leases", "--json")
    leases = {lease["lease_id"]: lease for lease in json.loads(out)["leases"]}
    assert leases["lease-sold"]["settled_amount"] == 350 * PRICE
    assert leases["lease-bought"]["settled_amount"] == 120 * PRICE
    code, out = _cli(data_dir, "--settlements", "--json")
    # Leases left open in the ledger with no stored grant are what a crash leaves behind: the
    # restarted daemon ends them and queues their settlement (the chain is off here, so they wait).
    assert {s["settlement_id"]: s["state"] for s in json.loads(out)["settlements"]} == {
        "lease-sold/claim/2": "landed",
        "lease-bought/release/120000000000": "landed",
        "lease-sold/claim/3": "pending",
        "lease-bought/refund": "pending",
    }
    code, text = _cli(data_dir)
    assert code == 0 and "net 0.000000230 ETH" in text and peer_id(SELLER) in text

    code, out = _cli(data_dir, "verify", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["ok"] is True and report["entries"] > 5
    _assert_no_secrets(text + out + daemons[-1].log(), data_dir)


def test_verify_exits_non_zero_on_a_tampered_audit_chain(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    data_dir = tmp_path / "node"
    daemon = _daemon(data_dir, mode="off").start()
    daemons.append(daemon)
    daemon.stop()
    trio.run(_write_money, data_dir, tmp_path)
    conn = sqlite3.connect(data_dir / "ledger.db")
    # The audit table refuses UPDATE through triggers; a tamperer drops them first.
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f'DROP TRIGGER "{name}"')
    conn.execute("UPDATE audit SET data = '{\"forged\":1}' WHERE seq = 2")
    conn.commit()
    conn.close()
    daemons.append(_daemon(data_dir, mode="off").start())

    code, out = _cli(data_dir, "verify")
    assert code == 1
    assert "BROKEN at entry 2" in out
    code, out = _cli(data_dir, "verify", "--json")
    assert code == 1 and json.loads(out)["first_bad_seq"] == 2


def test_api_ledger_endpoints_reject_bad_queries(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    data_dir = tmp_path / "node"
    daemon = _daemon(data_dir, mode="off").start()
    daemons.append(daemon)
    assert daemon.api("/api/ledger/leases?limit=5&offset=0") == {"leases": []}
    assert daemon.api("/api/ledger/summary?since=2026-01-01")["total"]["net"] == 0
    code, out = _cli(data_dir, "--leases", "--limit", "0")
    assert code == 1 and "E_INVALID_ARGUMENT" in out
