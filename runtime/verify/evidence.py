"""Signed commitments and the evidence a failed check leaves.

The provider signs, per call, ``COMMITMENT_DOMAIN || canonical(body)`` where the body names the lease,
the call, the advertised file's sha256, the declared sampling, the token counts and the commitment's
32-byte root (hex), with the same Ed25519 key it signs usage receipts with (``ReceiptKey``). The
consumer keeps that signature with the reply: a chunk that does not open against the signed root, or
openings that the advertised file does not reproduce, are then evidence anyone holding that file can
re-check (an arbiter re-runs :func:`runtime.verify.spot.check_call`) without trusting the consumer.
"""

from __future__ import annotations

import base64

from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey
from pydantic import BaseModel, ConfigDict, Field

from runtime.ledger.canonical import canonical_bytes
from runtime.ledger.receipts import LEASE_ID_PATTERN, PEER_ID_PATTERN, PeerKeys, ReceiptKey

COMMITMENT_DOMAIN = b"clawnode/verify-commitment/v1\x00"


class CommitmentBody(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = Field(1, ge=1, le=1)
    lease_id: str = Field(pattern=LEASE_ID_PATTERN)
    call_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    provider: str = Field(pattern=PEER_ID_PATTERN)
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    temperature_milli: int = Field(ge=0, le=2000, description="declared temperature × 1000 (no floats signed)")
    top_p_milli: int = Field(ge=1, le=1000)
    prompt_tokens: int = Field(ge=1, le=1 << 20)
    completion_tokens: int = Field(ge=1, le=1 << 16)
    root: str = Field(pattern=r"^[0-9a-f]{64}$")

    def canonical(self) -> bytes:
        return canonical_bytes(self.model_dump())


class SignedCommitment(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    body: CommitmentBody
    sig: str = Field(max_length=200)


def sign_commitment(body: CommitmentBody, key: ReceiptKey) -> SignedCommitment:
    if key.peer_id != body.provider:
        raise ValueError("only the provider signs its commitments")
    return SignedCommitment(body=body, sig=base64.b64encode(key.sign(COMMITMENT_DOMAIN + body.canonical())).decode())


def commitment_signed(signed: SignedCommitment, peer_keys: PeerKeys) -> bool:
    """Whether the provider named in the body signed it."""
    try:
        public_key = peer_keys(signed.body.provider)
        if public_key is None:
            return False
        VerifyKey(public_key).verify(
            COMMITMENT_DOMAIN + signed.body.canonical(), base64.b64decode(signed.sig, validate=True)
        )
    except (CryptoError, ValueError, TypeError):
        return False
    return True
