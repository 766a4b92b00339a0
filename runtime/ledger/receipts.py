"""Usage receipts: what the provider metered, signed by it and countersigned by the consumer.

A receipt is cumulative: ``units`` and ``amount`` are totals for the lease so far, and ``seq``
grows by one per receipt, so the newest countersigned receipt alone says what is owed and an old
one can never be cashed twice. Both signatures are Ed25519 (PyNaCl, over raw key bytes) by the
peers' libp2p keys; the peer ids in the body embed the public keys, so a receipt verifies without
any other lookup. This module knows no peer-id format: the layer above hands in the signing key as
a ``ReceiptKey`` (raw seed + its peer id) and reading a peer id's public key as ``PeerKeys``
(``wire.peer_keys`` builds both from libp2p keys):

- provider: ``PROVIDER_DOMAIN || canonical(body)``
- consumer: ``CONSUMER_DOMAIN || canonical({"body", "provider_sig", "voucher"})``: the consumer
  countersigns exactly what the provider signed, plus (when the lease is escrowed on chain) the
  EIP-191 voucher that lets the provider claim ``amount`` from the escrow.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey
from pydantic import BaseModel, ConfigDict, Field

from runtime.ledger import errors
from runtime.ledger.canonical import canonical_bytes, sha256_hex

PROVIDER_DOMAIN = b"clawnode/usage-receipt/provider/v1\x00"
CONSUMER_DOMAIN = b"clawnode/usage-receipt/consumer/v1\x00"

MAX_AMOUNT = 2**256 - 1
LEASE_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
PEER_ID_PATTERN = r"^[1-9A-HJ-NP-Za-km-z]{32,128}$"
ED25519_KEY_BYTES = 32

PeerKeys = Callable[[str], bytes | None]
"""A peer id -> the raw 32-byte Ed25519 public key it embeds, or None when it embeds none."""


@dataclass(frozen=True)
class ReceiptKey:
    """The node's receipt-signing key: the raw 32-byte Ed25519 seed of its peer key and its peer id."""

    seed: bytes = field(repr=False)
    peer_id: str
    _signing: SigningKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.seed) != ED25519_KEY_BYTES:
            raise ValueError("an Ed25519 seed is 32 bytes")
        object.__setattr__(self, "_signing", SigningKey(self.seed))

    def sign(self, data: bytes) -> bytes:
        return self._signing.sign(data).signature


class ReceiptBody(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    lease_id: str = Field(pattern=LEASE_ID_PATTERN)
    seq: int = Field(ge=1, le=2**62)
    provider: str = Field(pattern=PEER_ID_PATTERN)
    consumer: str = Field(pattern=PEER_ID_PATTERN)
    units: int = Field(ge=0, le=2**62, description="metered units (tokens) so far, cumulative")
    amount: int = Field(ge=0, le=MAX_AMOUNT, description="owed so far in wei, cumulative")
    issued_at: int = Field(ge=0, le=2**40, description="unix seconds")

    def canonical(self) -> bytes:
        return canonical_bytes(self.model_dump())

    def digest(self) -> str:
        """The receipt's identity: sha256 of the canonical body, hex."""
        return sha256_hex(self.canonical())


class SignedReceipt(BaseModel):
    """A receipt as it travels between peers; signatures and voucher are base64 / 0x-hex text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    body: ReceiptBody
    provider_sig: str = Field(max_length=200)
    consumer_sig: str | None = Field(None, max_length=200)
    voucher: str | None = Field(None, pattern=r"^0x[0-9a-fA-F]{130}$", description="payer's EIP-191 escrow voucher")

    @property
    def countersigned(self) -> bool:
        return self.consumer_sig is not None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise errors.forged("a receipt signature is not valid base64") from None


def consumer_payload(body: ReceiptBody, provider_sig: str, voucher: str | None) -> bytes:
    return CONSUMER_DOMAIN + canonical_bytes(
        {"body": body.model_dump(), "provider_sig": provider_sig, "voucher": voucher}
    )


def _verify(peer_id: str, data: bytes, signature: str, peer_keys: PeerKeys) -> bool:
    try:
        public_key = peer_keys(peer_id)
    except Exception:  # noqa: BLE001 - any malformed peer id means "cannot verify"
        return False
    if public_key is None or len(public_key) != ED25519_KEY_BYTES:
        return False
    try:
        VerifyKey(public_key).verify(data, _unb64(signature))
    except (errors.LedgerError, CryptoError, ValueError, TypeError):
        return False
    return True


def sign_as_provider(body: ReceiptBody, key: ReceiptKey) -> SignedReceipt:
    if key.peer_id != body.provider:
        raise errors.forbidden("not_provider", "only the lease's provider can sign its usage receipts")
    return SignedReceipt(body=body, provider_sig=_b64(key.sign(PROVIDER_DOMAIN + body.canonical())))


def countersign(
    receipt: SignedReceipt, key: ReceiptKey, peer_keys: PeerKeys, voucher: str | None = None
) -> SignedReceipt:
    """As the consumer: check the provider's signature, then countersign (with an optional voucher)."""
    verify_provider(receipt, peer_keys)
    if key.peer_id != receipt.body.consumer:
        raise errors.forbidden("not_consumer", "only the lease's consumer can countersign its receipts")
    signature = key.sign(consumer_payload(receipt.body, receipt.provider_sig, voucher))
    return receipt.model_copy(update={"consumer_sig": _b64(signature), "voucher": voucher})


def verify_provider(receipt: SignedReceipt, peer_keys: PeerKeys) -> None:
    if not _verify(receipt.body.provider, PROVIDER_DOMAIN + receipt.body.canonical(), receipt.provider_sig, peer_keys):
        raise errors.forged("the provider's signature on the receipt does not verify")


def verify_countersigned(receipt: SignedReceipt, peer_keys: PeerKeys) -> None:
    """Both signatures verify, or ``LedgerError`` (``receipt_forged`` / ``receipt_not_countersigned``)."""
    verify_provider(receipt, peer_keys)
    if receipt.consumer_sig is None:
        raise errors.forbidden("receipt_not_countersigned", "the receipt lacks the consumer's countersignature")
    payload = consumer_payload(receipt.body, receipt.provider_sig, receipt.voucher)
    if not _verify(receipt.body.consumer, payload, receipt.consumer_sig, peer_keys):
        raise errors.forged("the consumer's countersignature on the receipt does not verify")
