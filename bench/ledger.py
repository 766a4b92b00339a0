"""Ledger and escrow benchmark: durable countersigned receipts per second, and gas per contract call.

Usage::

    python bench/ledger.py [--receipts 300] [--inserts 1000] [--dir DIR] [--rpc URL]

Receipts: the whole path of one usage receipt between two ledgers on disk, through the async
``Ledger`` the daemon uses (worker thread, limiter of one): the provider records usage and issues
a signed receipt, the consumer verifies and countersigns it, the provider verifies both
signatures and stores the countersignature: four transactions, each fsynced (WAL,
``synchronous=FULL``). The baseline, measured in the same run on the same disk: plain
single-row INSERTs into a one-table SQLite file with the same pragmas, one transaction each.
The ratio of the two is the figure to watch; absolute numbers depend on the disk.

Gas: every contract call once on a fresh in-process chain (``--rpc`` adds a column for a JSON-RPC
chain such as anvil, whose dev accounts must be funded).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from pathlib import Path

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from runtime.escrow import GAS_LIMITS, Chain, EscrowClient
from runtime.ledger import LeaseOpen, Ledger
from wire.peer_keys import ed25519_public_key, peer_id_of, receipt_key


def plain_inserts_per_s(directory: Path, count: int) -> float:
    directory.mkdir()
    conn = sqlite3.connect(directory / "plain.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
    payload = "x" * 300  # about the size of a stored receipt body
    start = time.perf_counter()
    for i in range(count):
        conn.execute("INSERT INTO t (id, payload) VALUES (?, ?)", (i, payload))
    elapsed = time.perf_counter() - start
    conn.close()
    return count / elapsed


async def receipts_per_s(directory: Path, count: int) -> float:
    provider_key, consumer_key = create_new_key_pair(b"p" * 32), create_new_key_pair(b"c" * 32)
    provider_id, consumer_id = peer_id_of(provider_key.private_key), peer_id_of(consumer_key.private_key)
    provider = await Ledger.open(directory / "provider.db", peer_keys=ed25519_public_key)
    consumer = await Ledger.open(directory / "consumer.db", peer_keys=ed25519_public_key)
    for ledger, role in ((provider, "provider"), (consumer, "consumer")):
        lease = LeaseOpen(
            lease_id="bench",
            role=role,  # type: ignore[arg-type]
            provider=provider_id,
            consumer=consumer_id,
            price_per_unit=10**9,
            budget=10**30,
        )
        await ledger.open_lease(lease, idempotency_key="open")
    start = time.perf_counter()
    for i in range(count):
        await provider.record_usage("bench", writer=provider_id, units=50, idempotency_key=f"u{i}")
        receipt = await provider.issue_receipt("bench", receipt_key(provider_key.private_key))
        signed = await consumer.countersign_receipt(receipt, receipt_key(consumer_key.private_key))
        await provider.record_countersigned(signed)
    elapsed = time.perf_counter() - start
    assert (await provider.countersigned_amount("bench")) == count * 50 * 10**9
    await provider.aclose()
    await consumer.aclose()
    return count / elapsed


def gas_table(chain: Chain) -> dict[str, int]:
    payer, payee, arbiter, deployer = chain.dev_accounts()[:4]
    w3 = chain.w3
    deployer_nonce = w3.eth.get_transaction_count(deployer.address)
    escrow = EscrowClient.deploy(chain, deployer)
    deploy_tx = w3.eth.get_transaction_by_block(w3.eth.block_number, 0)
    assert deploy_tx["nonce"] == deployer_nonce
    gas = {"deploy": int(w3.eth.get_transaction_receipt(deploy_tx["hash"])["gasUsed"])}
    as_payer, as_payee, as_arbiter = escrow.for_account(payer), escrow.for_account(payee), escrow.for_account(arbiter)

    def lock(escrow_id: bytes, window: int = 30) -> int:
        deadline = chain.next_timestamp() + 60
        return as_payer.lock(
            escrow_id, payee=payee.address, arbiter=arbiter.address, amount=10**18, deadline=deadline, window=window
        ).gas_used

    first, second = os.urandom(32), os.urandom(32)
    gas["lock"] = lock(first)
    gas["release (payer, partial)"] = as_payer.release(first, 10**17).gas_used
    voucher = as_payer.sign_voucher(first, 3 * 10**17)
    gas["claim (payee, voucher)"] = as_payee.claim(payer.address, first, 3 * 10**17, voucher).gas_used
    chain.time_travel(200)
    gas["refund"] = escrow.refund(payer.address, first).gas_used
    lock(second)
    gas["dispute"] = as_payee.dispute(payer.address, second).gas_used
    gas["resolve"] = as_arbiter.resolve(payer.address, second, 4 * 10**17).gas_used
    gas["withdraw"] = as_payee.withdraw().gas_used
    return gas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receipts", type=int, default=300)
    parser.add_argument("--inserts", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=None, help="where the SQLite files go (default: a temp dir)")
    parser.add_argument("--rpc", default=None, help="also measure gas on this JSON-RPC chain (e.g. anvil)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        # Plain inserts before and after the receipts, averaged: fsync speed drifts with load.
        before = plain_inserts_per_s(directory / "a", args.inserts)
        receipts = trio.run(receipts_per_s, directory, args.receipts)
        after = plain_inserts_per_s(directory / "b", args.inserts)
        plain = (before + after) / 2
    print(
        f"ledger: {receipts:.0f} countersigned receipts/s durable (4 fsynced transactions each, both ledgers) / "
        f"{plain:.0f} plain SQLite inserts/s (WAL, synchronous=FULL, one per transaction) = {receipts / plain:.3f}"
    )

    columns = {"embedded": gas_table(Chain.embedded())}
    if args.rpc:
        columns["rpc"] = gas_table(Chain.rpc(args.rpc))
    names = list(columns)
    print()
    print("| call | " + " | ".join(f"gas ({name})" for name in names) + " | gas limit sent |")
    print("| --- | " + " | ".join("---:" for _ in names) + " | ---: |")
    for call in columns["embedded"]:
        limit = GAS_LIMITS[call.split(" ")[0]]
        print(f"| {call} | " + " | ".join(str(columns[name][call]) for name in names) + f" | {limit} |")


if __name__ == "__main__":
    main()
