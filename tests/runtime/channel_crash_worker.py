"""A consumer and a provider running a payment channel; tests/test_channel_crash.py SIGKILLs it.

Run through ``tests.runtime.forkserver`` with ``run([DIR, LEASES, RPC_URL, CONTRACT, CHANNEL_ID])``. The
consumer writes its channel down, locks it (journaled, as the daemon does), and then ``LEASES`` leases
draw on it one after the other, each from where the last voucher ended (``channel_attach`` before the
lease row), with a few receipts each, countersigned with vouchers for ``base + amount``. At the end
the provider closes the channel with its highest voucher and the consumer gets the rest back. The
stream is deterministic, so a restarted worker replays it: every step is idempotent or detected as
done, which is what the test checks. Prints ``ready`` once its ledgers are open and ``done`` at the end.
"""

from __future__ import annotations

from pathlib import Path

import trio

from runtime.errors import ClawnodeError
from runtime.escrow.chain import Chain  # imported here, so the fork server pays for web3 once
from runtime.escrow.client import EscrowClient
from runtime.ledger import EscrowRef, Ledger, LedgerError
from runtime.ledger.channels import ChannelLedger
from runtime.settlement import EscrowSettler, SettlementQueue
from tests.runtime.support import lease_for, peer_id, peer_key, receipt_key_of
from wire.peer_keys import ed25519_public_key

PROVIDER, CONSUMER = peer_key("provider"), peer_key("consumer")
PRICE = 10**9
BUDGET = 60 * PRICE  # a lease's budget
CHANNEL_AMOUNT = 100 * BUDGET
STEPS = 3  # receipts per lease


def units(lease: int, step: int) -> int:
    return 1 + (lease * 7 + step * 5) % 13


async def main(directory: Path, leases: int, url: str, contract: str, channel_id: str) -> None:
    provider = await Ledger.open(directory / "provider.db", peer_keys=ed25519_public_key)
    consumer = await Ledger.open(directory / "consumer.db", peer_keys=ed25519_public_key)
    chain = Chain.rpc(url)
    payer, payee, arbiter = chain.dev_accounts()[:3]
    payer_client = EscrowClient(chain, payer, contract)
    payer_client.lock_journal = consumer.lock_journal()
    provider_queue = SettlementQueue(provider, chain, EscrowSettler(EscrowClient(chain, payee, contract)))
    consumer_queue = SettlementQueue(consumer, chain, EscrowSettler(payer_client))
    ours, theirs = ChannelLedger(consumer), ChannelLedger(provider)
    escrow_id = bytes.fromhex(channel_id[2:])
    print("ready", flush=True)

    # The channel: written down before its lock; a lock that landed before a crash is not sent again
    # (the contract refuses a second lock under one key, and the chain is read first).
    channel = dict(
        channel_id=channel_id,
        contract=payer_client.address,
        payer=payer.address,
        payee=payee.address,
        salt=None,
        amount=CHANNEL_AMOUNT,
        window=0,
    )
    deadline = chain.now() + 10**6
    row = await ours.record(
        **channel, role="consumer", peer=peer_id(PROVIDER), deadline=deadline, state="channel_opening"
    )
    if row.state == "channel_opening":
        if payer_client.get(payer.address, escrow_id).phase == "none":
            payer_client.lock(
                escrow_id,
                payee=payee.address,
                arbiter=arbiter.address,
                amount=CHANNEL_AMOUNT,
                deadline=deadline,
                window=0,
            )
        await ours.move(channel_id, "channel_open")
    state = payer_client.get(payer.address, escrow_id)
    await theirs.record(
        **channel, role="provider", peer=peer_id(CONSUMER), deadline=state.deadline, state="channel_open"
    )
    ref = EscrowRef(contract=payer_client.address, payer=payer.address, escrow_id=channel_id)

    for i in range(leases):
        lease_id = f"lease-{i}"
        drawn = await ours.of_lease(lease_id)
        if drawn is None:  # where the channel's last voucher ended: the next lease starts there
            base = (await ours.get(channel_id)).committed
            await ours.attach(lease_id, channel_id, base)
        else:
            base = drawn[1]
        await theirs.attach(lease_id, channel_id, base)
        for ledger, role in ((consumer, "consumer"), (provider, "provider")):
            lease = lease_for(role, lease_id, PROVIDER, CONSUMER, price_per_unit=PRICE, budget=BUDGET, escrow=ref)
            await ledger.open_lease(lease, idempotency_key=f"open/{lease_id}")
        for step in range(STEPS):
            await provider.record_usage(
                lease_id, writer=peer_id(PROVIDER), units=units(i, step), idempotency_key=f"{lease_id}/u{step}"
            )
            receipt = await provider.issue_receipt(lease_id, receipt_key_of(PROVIDER))
            voucher = "0x" + payer_client.sign_voucher(escrow_id, base + receipt.body.amount).hex()
            try:
                signed = await consumer.countersign_receipt(receipt, receipt_key_of(CONSUMER), voucher=voucher)
            except LedgerError as error:
                if error.reason != "receipt_replayed":
                    raise
                signed = (await consumer.get_receipt(lease_id, receipt.body.seq)).receipt
            try:
                await provider.record_countersigned(signed)
            except LedgerError as error:
                if error.reason != "receipt_replayed":
                    raise
        for ledger in (consumer, provider):
            await ledger.end_lease(lease_id, idempotency_key=f"end/{lease_id}")

    # The close: the provider's highest voucher paid (and, with settle, the rest back at once); the
    # consumer's refund lands when the escrow is closed, or after deadline + window.
    await theirs.enqueue_claim(channel_id, close=True)
    await ours.enqueue_refund(channel_id)
    while (await theirs.get(channel_id)).state != "channel_closed":
        await provider_queue.flush()
        await _due_now(provider)
    if payer_client.get(payer.address, escrow_id).phase == "active":
        chain.time_travel(10**6 + 10)
    while (await ours.get(channel_id)).state != "channel_closed":
        await consumer_queue.flush()
        await _due_now(consumer)
    print("done", flush=True)


async def _due_now(ledger: Ledger) -> None:
    """Retry at once (the test has no time for backoff): every pending settlement due now."""
    with ledger.store._tx() as conn:
        conn.execute("UPDATE settlements SET next_attempt_at = 0 WHERE state = 'pending'")
    await trio.sleep(0.05)


def run(argv: list[str]) -> None:
    directory, leases, url, contract, channel_id = argv
    try:
        trio.run(main, Path(directory), int(leases), url, contract, channel_id)
    except ClawnodeError as error:
        raise SystemExit(f"{error.code}: {error}") from None
