"""A provider and a consumer settling a stream of receipts; tests/runtime/test_crash.py SIGKILLs it.

Run: ``python -m tests.runtime.crash_worker DIR COUNT [RPC_URL CONTRACT ESCROW_ID]``, or forked by
``tests.runtime.forkserver`` (``run(args)``, what tests/runtime/test_crash.py does). The stream is
deterministic (receipt i meters ``units(i)`` tokens), so a restarted worker replays it from the
start: every step is idempotent or detected as already done, which is exactly what the test checks.
With an RPC chain the provider also claims from escrow every few receipts. Prints ``ready`` once
its ledgers are open and ``done`` at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from runtime.escrow.chain import Chain  # imported here, so the fork server pays for web3 once
from runtime.escrow.client import EscrowClient
from runtime.ledger import EscrowRef, Ledger, LedgerError
from runtime.settlement import EscrowSettler, SettlementQueue
from tests.runtime.support import lease_for, peer_id, peer_key, receipt_key_of
from wire.peer_keys import ed25519_public_key

PROVIDER, CONSUMER = peer_key("provider"), peer_key("consumer")
LEASE = "lease-crash"
PRICE = 10**9
BUDGET = 10**18
CLAIM_EVERY = 5


def units(i: int) -> int:
    return 1 + (i * 7) % 13


async def main(directory: Path, count: int, rpc: tuple[str, str, str] | None) -> None:
    provider = await Ledger.open(directory / "provider.db", peer_keys=ed25519_public_key)
    consumer = await Ledger.open(directory / "consumer.db", peer_keys=ed25519_public_key)
    queue = voucher_signer = None
    escrow_ref = None
    if rpc is not None:
        url, contract, escrow_id = rpc
        chain = Chain.rpc(url)
        payer, payee = chain.dev_accounts()[:2]
        escrow_ref = EscrowRef(contract=contract, payer=payer.address, escrow_id=escrow_id)
        queue = SettlementQueue(provider, chain, EscrowSettler(EscrowClient(chain, payee, contract)))
        voucher_signer = EscrowClient(chain, payer, contract)
    for ledger, role in ((provider, "provider"), (consumer, "consumer")):
        lease = lease_for(role, LEASE, PROVIDER, CONSUMER, price_per_unit=PRICE, budget=BUDGET, escrow=escrow_ref)
        await ledger.open_lease(lease, idempotency_key="open")
    print("ready", flush=True)

    # Resume where the ledger says the stream got to (re-doing the last step, which may be half done).
    metered = (await provider.get_lease(LEASE)).metered_units
    start = 0
    while metered > 0 and start < count:
        metered -= units(start)
        start += 1
    for i in range(max(0, start - 1), count):
        await provider.record_usage(LEASE, writer=peer_id(PROVIDER), units=units(i), idempotency_key=f"u{i}")
        receipt = await provider.issue_receipt(LEASE, receipt_key_of(PROVIDER))
        voucher = None
        if voucher_signer is not None:
            voucher = "0x" + voucher_signer.sign_voucher(bytes.fromhex(escrow_id[2:]), receipt.body.amount).hex()
        try:
            signed = await consumer.countersign_receipt(receipt, receipt_key_of(CONSUMER), voucher=voucher)
        except LedgerError as error:
            if error.reason != "receipt_replayed":
                raise
            signed = (await consumer.get_receipt(LEASE, receipt.body.seq)).receipt
        try:
            await provider.record_countersigned(signed)
        except LedgerError as error:
            if error.reason != "receipt_replayed":
                raise
        if queue is not None and (i % CLAIM_EVERY == CLAIM_EVERY - 1 or i == count - 1):
            await provider.enqueue_claim(LEASE)
            await queue.flush()
    print("done", flush=True)


def run(args: list[str]) -> None:
    """The entry point the fork server calls (tests/runtime/forkserver.py): ``DIR COUNT [RPC CONTRACT ESCROW_ID]``."""
    global escrow_id
    escrow_id = args[4] if len(args) == 5 else ""
    trio.run(main, Path(args[0]), int(args[1]), (args[2], args[3], args[4]) if len(args) == 5 else None)


escrow_id = ""

if __name__ == "__main__":
    run(sys.argv[1:])
