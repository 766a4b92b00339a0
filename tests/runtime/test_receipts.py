"""Usage receipts: only the provider writes usage; forged, replayed and one-signature receipts never count."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from runtime.errors import ErrorCode
from runtime.ledger import Ledger, LedgerError, SignedReceipt
from runtime.ledger.receipts import ReceiptBody, consumer_payload, countersign, sign_as_provider
from tests.runtime.support import lease_for, peer_id, peer_key

PROVIDER, CONSUMER, MALLORY = peer_key("provider"), peer_key("consumer"), peer_key("mallory")
PRICE = 10**12
LEASE = "lease-1"


async def _pair(tmp_path: Path) -> tuple[Ledger, Ledger]:
    provider = await Ledger.open(tmp_path / "provider.db")
    consumer = await Ledger.open(tmp_path / "consumer.db")
    for ledger, role in ((provider, "provider"), (consumer, "consumer")):
        lease = lease_for(role, LEASE, PROVIDER, CONSUMER, price_per_unit=PRICE, budget=1000 * PRICE)
        await ledger.open_lease(lease, idempotency_key=f"open-{LEASE}")
    return provider, consumer


async def _meter(provider: Ledger, units: int, key: str) -> SignedReceipt:
    await provider.record_usage(LEASE, writer=peer_id(PROVIDER), units=units, idempotency_key=key)
    return await provider.issue_receipt(LEASE, PROVIDER.private_key)


async def _reject(awaitable: object) -> LedgerError:
    with pytest.raises(LedgerError) as caught:
        await awaitable  # type: ignore[misc]
    return caught.value


async def test_countersigned_receipt_round_trip_counts_once(tmp_path: Path) -> None:
    provider, consumer = await _pair(tmp_path)
    receipt = await _meter(provider, 120, "u1")
    assert (receipt.body.seq, receipt.body.units, receipt.body.amount) == (1, 120, 120 * PRICE)
    signed = await consumer.countersign_receipt(receipt, CONSUMER.private_key)
    record = await provider.record_countersigned(signed)
    assert record.countersigned and not record.settled
    assert await provider.countersigned_amount(LEASE) == 120 * PRICE
    assert await consumer.countersigned_amount(LEASE) == 120 * PRICE


async def test_consumer_cannot_write_usage(tmp_path: Path) -> None:
    provider, consumer = await _pair(tmp_path)
    # On its own ledger the consumer has no authority over usage...
    error = await _reject(consumer.record_usage(LEASE, writer=peer_id(CONSUMER), units=5, idempotency_key="c1"))
    assert (error.code, error.reason) == (ErrorCode.FORBIDDEN, "usage_not_provider")
    # ...nor can usage be written on the provider's ledger in the consumer's name.
    error = await _reject(provider.record_usage(LEASE, writer=peer_id(CONSUMER), units=5, idempotency_key="c2"))
    assert (error.code, error.reason) == (ErrorCode.FORBIDDEN, "usage_not_provider")
    # A "receipt" the consumer signed in the provider's place does not verify.
    body = ReceiptBody(
        lease_id=LEASE,
        seq=1,
        provider=peer_id(PROVIDER),
        consumer=peer_id(CONSUMER),
        units=1,
        amount=PRICE,
        issued_at=1,
    )
    fake = SignedReceipt(body=body, provider_sig=base64.b64encode(CONSUMER.private_key.sign(body.canonical())).decode())
    error = await _reject(consumer.countersign_receipt(fake, CONSUMER.private_key))
    assert (error.code, error.reason) == (ErrorCode.UNAUTHENTICATED, "receipt_forged")
    # And the consumer cannot issue a provider-signed receipt with its key.
    with pytest.raises(LedgerError) as caught:
        sign_as_provider(body, CONSUMER.private_key)
    assert caught.value.code == ErrorCode.FORBIDDEN
    assert await provider.list_receipts() == [] and await consumer.list_receipts() == []
    assert (await provider.get_lease(LEASE)).metered_units == 0


async def test_forged_receipts_are_rejected(tmp_path: Path) -> None:
    provider, consumer = await _pair(tmp_path)
    receipt = await _meter(provider, 10, "u1")
    # The consumer's ledger refuses a receipt whose numbers were changed after signing.
    inflated = receipt.model_copy(update={"body": receipt.body.model_copy(update={"units": 11, "amount": 11 * PRICE})})
    error = await _reject(consumer.countersign_receipt(inflated, CONSUMER.private_key))
    assert (error.code, error.reason) == (ErrorCode.UNAUTHENTICATED, "receipt_forged")
    # A third peer signing as the provider of a lease it is not part of.
    body = receipt.body.model_copy(update={"provider": peer_id(MALLORY)})
    error = await _reject(
        consumer.countersign_receipt(sign_as_provider(body, MALLORY.private_key), CONSUMER.private_key)
    )
    assert (error.code, error.reason) == (ErrorCode.FORBIDDEN, "receipt_wrong_parties")
    # The provider's ledger refuses a countersignature by anyone but the consumer...
    payload = consumer_payload(receipt.body, receipt.provider_sig, None)
    by_mallory = receipt.model_copy(
        update={"consumer_sig": base64.b64encode(MALLORY.private_key.sign(payload)).decode()}
    )
    error = await _reject(provider.record_countersigned(by_mallory))
    assert (error.code, error.reason) == (ErrorCode.UNAUTHENTICATED, "receipt_forged")
    # ...and a genuine countersignature whose voucher was swapped afterwards.
    tampered = countersign(receipt, CONSUMER.private_key).model_copy(update={"voucher": "0x" + "11" * 65})
    error = await _reject(provider.record_countersigned(tampered))
    assert (error.code, error.reason) == (ErrorCode.UNAUTHENTICATED, "receipt_forged")
    garbage = receipt.model_copy(update={"consumer_sig": "not base64!"})
    error = await _reject(provider.record_countersigned(garbage))
    assert error.reason == "receipt_forged"
    assert await provider.countersigned_amount(LEASE) == 0
    assert await consumer.list_receipts() == []


async def test_replayed_and_stale_receipts_are_rejected(tmp_path: Path) -> None:
    provider, consumer = await _pair(tmp_path)
    first = await _meter(provider, 10, "u1")
    first_signed = await consumer.countersign_receipt(first, CONSUMER.private_key)
    await provider.record_countersigned(first_signed)
    second = await _meter(provider, 5, "u2")
    await provider.record_countersigned(await consumer.countersign_receipt(second, CONSUMER.private_key))

    error = await _reject(consumer.countersign_receipt(first, CONSUMER.private_key))
    assert (error.code, error.reason) == (ErrorCode.CONFLICT, "receipt_replayed")
    error = await _reject(provider.record_countersigned(first_signed))
    assert (error.code, error.reason) == (ErrorCode.CONFLICT, "receipt_replayed")
    # An older receipt re-signed with a new timestamp is still older.
    stale = sign_as_provider(
        first.body.model_copy(update={"issued_at": first.body.issued_at + 7}), PROVIDER.private_key
    )
    error = await _reject(consumer.countersign_receipt(stale, CONSUMER.private_key))
    assert (error.code, error.reason) == (ErrorCode.CONFLICT, "receipt_stale")
    # A receipt replayed into another lease does not verify there.
    moved = first.model_copy(update={"body": first.body.model_copy(update={"lease_id": "lease-2"})})
    error = await _reject(consumer.countersign_receipt(moved, CONSUMER.private_key))
    assert error.reason == "receipt_forged"
    assert await consumer.countersigned_amount(LEASE) == 15 * PRICE
    assert len(await consumer.list_receipts(LEASE)) == 2


async def test_a_receipt_without_the_countersignature_never_counts_or_settles(tmp_path: Path) -> None:
    provider, _ = await _pair(tmp_path)
    await _meter(provider, 10, "u1")
    assert await provider.countersigned_amount(LEASE) == 0
    [record] = await provider.list_receipts(LEASE)
    assert not record.countersigned and not record.settled
    # The schema itself refuses to mark it settled.
    store = provider.store
    with pytest.raises(Exception, match="CHECK constraint failed"):
        store._conn.execute("UPDATE receipts SET settled = 1 WHERE lease_id = ?", (LEASE,))
    error = await _reject(provider.record_countersigned(record.receipt))
    assert (error.code, error.reason) == (ErrorCode.FORBIDDEN, "receipt_not_countersigned")


async def test_receipts_are_checked_against_the_lease_terms(tmp_path: Path) -> None:
    provider, consumer = await _pair(tmp_path)
    cheap = sign_as_provider(
        ReceiptBody(
            lease_id=LEASE,
            seq=1,
            provider=peer_id(PROVIDER),
            consumer=peer_id(CONSUMER),
            units=10,
            amount=PRICE,
            issued_at=1,
        ),
        PROVIDER.private_key,
    )
    error = await _reject(consumer.countersign_receipt(cheap, CONSUMER.private_key))
    assert error.reason == "receipt_amount_mismatch"
    over = sign_as_provider(
        ReceiptBody(
            lease_id=LEASE,
            seq=1,
            provider=peer_id(PROVIDER),
            consumer=peer_id(CONSUMER),
            units=2000,
            amount=2000 * PRICE,
            issued_at=1,
        ),
        PROVIDER.private_key,
    )
    error = await _reject(consumer.countersign_receipt(over, CONSUMER.private_key))
    assert (error.code, error.reason) == (ErrorCode.INSUFFICIENT_FUNDS, "over_budget")
    error = await _reject(provider.record_usage(LEASE, writer=peer_id(PROVIDER), units=1001, idempotency_key="big"))
    assert (error.code, error.reason) == (ErrorCode.INSUFFICIENT_FUNDS, "over_budget")
