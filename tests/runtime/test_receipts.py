"""Usage receipts: only the provider writes usage; forged, replayed and one-signature receipts never count."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.peer.id import ID

from runtime.errors import ErrorCode
from runtime.ledger import Ledger, LedgerError, SignedReceipt
from runtime.ledger.receipts import (
    PROVIDER_DOMAIN,
    ReceiptBody,
    consumer_payload,
    countersign,
    sign_as_provider,
    verify_countersigned,
)
from tests.runtime.support import lease_for, peer_id, peer_key, receipt_key_of
from wire.peer_keys import ed25519_public_key

PROVIDER, CONSUMER, MALLORY = peer_key("provider"), peer_key("consumer"), peer_key("mallory")
PRICE = 10**12
LEASE = "lease-1"


async def _pair(tmp_path: Path) -> tuple[Ledger, Ledger]:
    provider = await Ledger.open(tmp_path / "provider.db", peer_keys=ed25519_public_key)
    consumer = await Ledger.open(tmp_path / "consumer.db", peer_keys=ed25519_public_key)
    for ledger, role in ((provider, "provider"), (consumer, "consumer")):
        lease = lease_for(role, LEASE, PROVIDER, CONSUMER, price_per_unit=PRICE, budget=1000 * PRICE)
        await ledger.open_lease(lease, idempotency_key=f"open-{LEASE}")
    return provider, consumer


async def _meter(provider: Ledger, units: int, key: str) -> SignedReceipt:
    await provider.record_usage(LEASE, writer=peer_id(PROVIDER), units=units, idempotency_key=key)
    return await provider.issue_receipt(LEASE, receipt_key_of(PROVIDER))


async def _reject(awaitable: object) -> LedgerError:
    with pytest.raises(LedgerError) as caught:
        await awaitable  # type: ignore[misc]
    return caught.value


async def test_countersigned_receipt_round_trip_counts_once(tmp_path: Path) -> None:
    provider, consumer = await _pair(tmp_path)
    receipt = await _meter(provider, 120, "u1")
    assert (receipt.body.seq, receipt.body.units, receipt.body.amount) == (1, 120, 120 * PRICE)
    signed = await consumer.countersign_receipt(receipt, receipt_key_of(CONSUMER))
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
    error = await _reject(consumer.countersign_receipt(fake, receipt_key_of(CONSUMER)))
    assert (error.code, error.reason) == (ErrorCode.UNAUTHENTICATED, "receipt_forged")
    # And the consumer cannot issue a provider-signed receipt with its key.
    with pytest.raises(LedgerError) as caught:
        sign_as_provider(body, receipt_key_of(CONSUMER))
    assert caught.value.code == ErrorCode.FORBIDDEN
    assert await provider.list_receipts() == [] and await consumer.list_receipts() == []
    assert (await provider.get_lease(LEASE)).metered_units == 0


async def test_forged_receipts_are_rejected(tmp_path: Path) -> None:
    provider, consumer = await _pair(tmp_path)
    receipt = await _meter(provider, 10, "u1")
    # The consumer's ledger refuses a receipt whose numbers were changed after signing.
    inflated = receipt.model_copy(update={"body": receipt.body.model_copy(update={"units": 11, "amount": 11 * PRICE})})
    error = await _reject(consumer.countersign_receipt(inflated, receipt_key_of(CONSUMER)))
    assert (error.code, error.reason) == (ErrorCode.UNAUTHENTICATED, "receipt_forged")
    # A third peer signing as the provider of a lease it is not part of.
    body = receipt.body.model_copy(update={"provider": peer_id(MALLORY)})
    error = await _reject(
        consumer.countersign_receipt(sign_as_provider(body, receipt_key_of(MALLORY)), receipt_key_of(CONSUMER))
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
    tampered = countersign(receipt, receipt_key_of(CONSUMER), ed25519_public_key).model_copy(
        update={"voucher": "0x" + "11" * 65}
    )
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
    first_signed = await consumer.countersign_receipt(first, receipt_key_of(CONSUMER))
    await provider.record_countersigned(first_signed)
    second = await _meter(provider, 5, "u2")
    await provider.record_countersigned(await consumer.countersign_receipt(second, receipt_key_of(CONSUMER)))

    error = await _reject(consumer.countersign_receipt(first, receipt_key_of(CONSUMER)))
    assert (error.code, error.reason) == (ErrorCode.CONFLICT, "receipt_replayed")
    error = await _reject(provider.record_countersigned(first_signed))
    assert (error.code, error.reason) == (ErrorCode.CONFLICT, "receipt_replayed")
    # An older receipt re-signed with a new timestamp is still older.
    stale = sign_as_provider(
        first.body.model_copy(update={"issued_at": first.body.issued_at + 7}), receipt_key_of(PROVIDER)
    )
    error = await _reject(consumer.countersign_receipt(stale, receipt_key_of(CONSUMER)))
    assert (error.code, error.reason) == (ErrorCode.CONFLICT, "receipt_stale")
    # A receipt replayed into another lease does not verify there.
    moved = first.model_copy(update={"body": first.body.model_copy(update={"lease_id": "lease-2"})})
    error = await _reject(consumer.countersign_receipt(moved, receipt_key_of(CONSUMER)))
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
        receipt_key_of(PROVIDER),
    )
    error = await _reject(consumer.countersign_receipt(cheap, receipt_key_of(CONSUMER)))
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
        receipt_key_of(PROVIDER),
    )
    error = await _reject(consumer.countersign_receipt(over, receipt_key_of(CONSUMER)))
    assert (error.code, error.reason) == (ErrorCode.INSUFFICIENT_FUNDS, "over_budget")
    error = await _reject(provider.record_usage(LEASE, writer=peer_id(PROVIDER), units=1001, idempotency_key="big"))
    assert (error.code, error.reason) == (ErrorCode.INSUFFICIENT_FUNDS, "over_budget")


def _libp2p_verifies(peer: str, data: bytes, signature: str) -> bool:
    """How receipts were verified before runtime/ dropped libp2p: the key the peer id embeds."""
    public_key = ID.from_base58(peer).extract_public_key()
    assert isinstance(public_key, Ed25519PublicKey)
    return bool(public_key.verify(data, base64.b64decode(signature)))


def test_receipt_signatures_are_unchanged_since_the_ledger_dropped_libp2p() -> None:
    """A receipt signed the old way (libp2p's key.sign) verifies the new way and vice versa, byte for byte:
    ledgers on disk and peers on the old version keep verifying each other's receipts."""
    voucher = "0x" + "ab" * 65
    body = ReceiptBody(
        lease_id=LEASE,
        seq=3,
        provider=peer_id(PROVIDER),
        consumer=peer_id(CONSUMER),
        units=7,
        amount=7 * PRICE,
        issued_at=9,
    )
    # Old way: the libp2p private keys sign the domain-separated payloads themselves.
    old_provider_sig = base64.b64encode(PROVIDER.private_key.sign(PROVIDER_DOMAIN + body.canonical())).decode()
    old_consumer_sig = base64.b64encode(
        CONSUMER.private_key.sign(consumer_payload(body, old_provider_sig, voucher))
    ).decode()
    old = SignedReceipt(body=body, provider_sig=old_provider_sig, consumer_sig=old_consumer_sig, voucher=voucher)
    verify_countersigned(old, ed25519_public_key)  # the new way accepts it
    # New way: raw Ed25519 over the seed gives the very same bytes, which the old way accepts.
    issued = sign_as_provider(body, receipt_key_of(PROVIDER))
    new = countersign(issued, receipt_key_of(CONSUMER), ed25519_public_key, voucher)
    assert new == old
    assert _libp2p_verifies(body.provider, PROVIDER_DOMAIN + body.canonical(), new.provider_sig)
    assert new.consumer_sig is not None
    assert _libp2p_verifies(body.consumer, consumer_payload(body, new.provider_sig, voucher), new.consumer_sig)
    # ...and a flipped byte still fails both ways.
    raw = base64.b64decode(new.provider_sig)
    flipped = base64.b64encode(bytes([raw[0] ^ 1]) + raw[1:])
    with pytest.raises(LedgerError) as caught:
        verify_countersigned(new.model_copy(update={"provider_sig": flipped.decode()}), ed25519_public_key)
    assert caught.value.reason == "receipt_forged"
    assert not _libp2p_verifies(body.provider, PROVIDER_DOMAIN + body.canonical(), flipped.decode())
