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
from runtime.verify.provider import CallRecorder, declared_sampling

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


class CallProof(BaseModel):
    """What a provider's end frame carries for a committed call: the signed commitment, the produced
    token ids and every chunk of the commitment (base64), so the consumer can check any call later
    without asking again, and the provider never learns which calls are checked."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    commitment: SignedCommitment
    tokens: list[int] = Field(max_length=1 << 16)
    chunks: list[str] = Field(max_length=(1 << 16) // 32 + 1)


def call_proof(
    recorder: CallRecorder, key: ReceiptKey, lease_id: str, call_id: str, sha256: str, usage: dict[str, int]
) -> CallProof | None:
    """The end frame's proof of a recorded call, signed with the provider's receipt key; None when
    nothing was produced."""
    committed = recorder.finish()
    prompt_tokens = int(usage.get("prompt_tokens", 0))
    if committed is None or prompt_tokens < 1:
        return None
    temperature, top_p = declared_sampling(recorder.body)
    body = CommitmentBody(
        lease_id=lease_id,
        call_id=call_id,
        provider=key.peer_id,
        model_sha256=sha256,
        temperature_milli=min(2000, temperature),
        top_p_milli=min(1000, top_p),
        prompt_tokens=prompt_tokens,
        completion_tokens=committed.n_tokens,
        root=committed.root.hex(),
    )
    return CallProof(
        commitment=sign_commitment(body, key),
        tokens=[p.token for p in recorder.positions],
        chunks=[base64.b64encode(c).decode() for c in committed.chunks],
    )
