"""Signed commitments and the evidence a failed check leaves.

The provider signs, per call, ``COMMITMENT_DOMAIN || canonical(body)`` where the body names the lease,
the call, the advertised file's sha256, the declared sampling, the token counts and the commitment's
32-byte root (hex), with the same Ed25519 key it signs usage receipts with (``ReceiptKey``). The
consumer keeps that signature with the reply: a chunk that does not open against the signed root, or
openings that the advertised file does not reproduce, are then evidence anyone holding that file can
re-check (an arbiter re-runs :func:`runtime.verify.spot.check_call`) without trusting the consumer.

Body versions: ``v: 1`` binds the prompt only by its length and not the text streamed, so a consumer
could hand an arbiter another prompt of the same length. ``v: 2`` adds ``prompt_sha256`` (sha256 of the
prompt's token ids, :func:`ids_sha256`, as the provider rendered the request with its file) and
``text_sha256`` (sha256 of the UTF-8 reply text it streamed). ``v: 3`` adds ``seeded``: whether the
request the provider served named a ``seed`` (:func:`request_seeded`; without one the engine's draws are
the provider's own randomness), so an arbiter can hold an unseeded reply to ``too_greedy``. ``v: 4``
adds ``request_sha256``: the hash of the request the provider received (:func:`request_sha256`), and
``chat_format``: the chat format the provider's node renders chat requests with (a node may set one other
than the file's own template), so an arbiter handed that request renders the prompt itself with its copy
of the file and that format; a signed prompt that
the advertised file does not render from it (another tokenizer, a shortened prompt) is then the
provider's own signed words proved false, not the consumer's word against them. Consumers of this
release read all four (an absent field is left out of the signed bytes, so a v1, v2 or v3 signature
verifies as before; a body without ``seeded`` counts as seeded for ``too_greedy``); providers sign
:data:`SIGNED_VERSION` (4) to a consumer that reads it. A consumer older than the release that
introduced a version reads such a body as no proof (``extra="forbid"``, and ``v`` is bounded), so the
call protocol says which version its consumer reads (``protocols.lease.base.BODY_VERSION_READ``:
``/clawnode/infer/1.2.0`` v4, ``/clawnode/infer/1.1.0`` v3, ``/clawnode/infer/1.0.0`` v2) and
:func:`call_proof` signs no newer one (``reads``). A consumer of a release before v2 speaks 1.0.0 too
and reads that v2 body as no proof, as it did before v3.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator
from pydantic_core import to_json

from runtime.ledger.canonical import canonical_bytes
from runtime.ledger.receipts import LEASE_ID_PATTERN, PEER_ID_PATTERN, PeerKeys, ReceiptKey
from runtime.verify.provider import CallRecorder, declared_sampling

COMMITMENT_DOMAIN = b"clawnode/verify-commitment/v1\x00"
# The body version providers sign: 3 (prompt and text bound, so prompt_mismatch and text_mismatch are
# disputable with the provider's own signed words; and whether the request was seeded, so too_greedy is
# disputable on an unseeded one) and 4 (the request bound too, so a prompt the advertised file does not
# render from it is disputable), to a consumer that reads it (``call_proof``'s ``reads``: v3 or v2 to one
# that negotiated the call protocol of an earlier release). Consumers read v1 to v3 bodies as well.
SIGNED_VERSION = 4
LATEST_VERSION = 4  # the newest body version this release reads
# A dispute package's request, as JSON: at most what one call frame carries (``MAX_CALL_FRAME``), so an
# arbiter never renders a prompt larger than any provider could have been sent.
MAX_REQUEST_BYTES = 1 << 20
_SHA256 = r"^[0-9a-f]{64}$"
CHAT_FORMAT_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"


def ids_sha256(ids: Sequence[int]) -> str:
    """sha256 of token ids as the signed body binds them: each id as 4 big-endian bytes."""
    return hashlib.sha256(b"".join(int(i).to_bytes(4, "big") for i in ids)).hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def request_sha256(body: Mapping[str, Any]) -> str | None:
    """sha256 of a call's request as a v4 body binds it: the JSON object with sorted keys, no
    whitespace, ASCII escapes and Python's shortest round-trip floats (requests carry floats, so this
    is not ``canonical_bytes``). The consumer hashes the body it sent and the provider the body it
    parsed from the call frame: the same text, since a float read back from JSON is the float written.
    None for a body JSON cannot write exactly (a NaN or an infinity): no v4 body is signed for it."""
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def request_seeded(body: Mapping[str, Any]) -> bool:
    """Whether a request fixes the engine's draws: it names a ``seed`` (the engine draws from fresh
    randomness otherwise). What a v3 body signs as ``seeded``, and what the consumer holds it to."""
    return body.get("seed") is not None


class CommitmentBody(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = Field(1, ge=1, le=LATEST_VERSION)
    lease_id: str = Field(pattern=LEASE_ID_PATTERN)
    call_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    provider: str = Field(pattern=PEER_ID_PATTERN)
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    temperature_milli: int = Field(ge=0, le=2000, description="declared temperature × 1000 (no floats signed)")
    top_p_milli: int = Field(ge=1, le=1000)
    prompt_tokens: int = Field(ge=1, le=1 << 20)
    completion_tokens: int = Field(ge=1, le=1 << 16)
    root: str = Field(pattern=_SHA256)
    # v2 and v3 (None in a v1 body, and then not part of the signed bytes).
    prompt_sha256: str | None = Field(None, pattern=_SHA256)
    text_sha256: str | None = Field(None, pattern=_SHA256)
    # v3 and v4: whether the request named a ``seed`` (False: the draws were the provider's own).
    seeded: bool | None = None
    # v4 only: the request as the provider received it (:func:`request_sha256`), and the chat format it
    # rendered a chat request with (its node's ``chat_format``: ``gguf-template`` or a llama-cpp-python
    # format name; absent where it told none), which a verifier renders the request with in turn.
    request_sha256: str | None = Field(None, pattern=_SHA256)
    chat_format: str | None = Field(None, pattern=CHAT_FORMAT_PATTERN)

    @model_validator(mode="after")
    def _version_fields(self) -> CommitmentBody:
        bound = self.prompt_sha256 is not None and self.text_sha256 is not None
        unbound = self.prompt_sha256 is None and self.text_sha256 is None
        if (self.v >= 2 and not bound) or (self.v == 1 and not unbound):
            raise ValueError("v2 to v4 bodies bind prompt_sha256 and text_sha256, v1 bodies neither")
        if (self.v >= 3) != (self.seeded is not None):
            raise ValueError("v3 and v4 bodies sign seeded, v1 and v2 bodies do not")
        if (self.v >= 4) != (self.request_sha256 is not None):
            raise ValueError("v4 bodies sign request_sha256, earlier bodies do not")
        if self.v < 4 and self.chat_format is not None:
            raise ValueError("only v4 bodies sign chat_format")
        return self

    @model_serializer(mode="wrap")
    def _present_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Fields a version does not have are left out wherever the body is written, not only from the
        signed bytes: a v2 body this node relays (to a leased verifier, in a dispute package to an
        arbiter) stays readable by nodes that know no ``seeded`` (they forbid unknown keys, null or not)."""
        return {key: value for key, value in handler(self).items() if value is not None}

    def canonical(self) -> bytes:
        return canonical_bytes(self.model_dump())  # without the fields its version lacks (``_present_fields``)


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
    recorder: CallRecorder,
    key: ReceiptKey,
    lease_id: str,
    call_id: str,
    sha256: str,
    usage: dict[str, int],
    prompt_ids: Sequence[int] | None = None,
    reads: int | None = None,
    request: Mapping[str, Any] | None = None,
    chat_format: str | None = None,
) -> CallProof | None:
    """The end frame's proof of a recorded call, signed with the provider's receipt key; None when
    nothing was produced. ``prompt_ids``: the prompt as the provider rendered the request; with them the
    body is a :data:`SIGNED_VERSION` one: v2 binds them and the text streamed, v3 also whether the
    request it served named a seed (``recorder.body``: the request as served). ``reads``: the newest
    version the consumer reads (the call protocol it negotiated); the body signed is never newer, so a
    consumer of the release before v3 gets the v2 body that release signs (None: :data:`SIGNED_VERSION`).
    ``request``: the call's request as received, before this node adjusted it (a v4 body binds its
    :func:`request_sha256`; without it, or for one JSON cannot write exactly, the body is a v3 one).
    ``chat_format``: the format this node renders chat requests with, signed in a v4 body."""
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
    version = SIGNED_VERSION if reads is None else min(SIGNED_VERSION, reads)
    requested = request_sha256(request) if request is not None and version >= 4 else None
    if requested is None:
        version = min(version, 3)
    if version >= 2 and prompt_ids is not None and len(prompt_ids) == prompt_tokens:
        bound: dict[str, Any] = {"prompt_sha256": ids_sha256(prompt_ids), "text_sha256": text_sha256(recorder.text)}
        if version >= 3:
            bound["seeded"] = request_seeded(recorder.body)
        if version >= 4:
            bound["request_sha256"] = requested
            if chat_format:
                bound["chat_format"] = chat_format
        body = CommitmentBody.model_validate({**body.model_dump(), "v": version, **bound})
    return CallProof(
        commitment=sign_commitment(body, key),
        tokens=recorder.tokens,
        chunks=[base64.b64encode(c).decode() for c in committed.chunks],
    )


class DisputePackage(BaseModel):
    """What a consumer hands a lease's arbiter after a failed check (docs/verified-inference.md): the
    proof as received, the prompt ids it rendered, the text received and, for a v4 body, the request it
    sent. Only a v2 to v4 body makes it evidence: the text (and the ids, or for v4 the request) must hash
    to what the provider signed (:func:`package_binds`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lease_id: str = Field(pattern=LEASE_ID_PATTERN)
    proof: CallProof
    prompt_ids: list[int] = Field(max_length=1 << 20)
    text: str = Field(max_length=1 << 22)
    # v4 bodies: the request as sent (its hash signed as ``request_sha256``); the arbiter renders it.
    request: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _request_bounded(self) -> DisputePackage:
        # Measured as the call frame writes it (compact UTF-8), so a request that fit its frame fits here.
        if self.request is not None and len(to_json(self.request)) > MAX_REQUEST_BYTES:
            raise ValueError(f"a package's request is at most {MAX_REQUEST_BYTES} bytes of JSON")
        return self

    @model_serializer(mode="wrap")
    def _present_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A package without a request is written without the key, so an arbiter of the release before
        v4 (it forbids unknown keys) still reads the v2 and v3 packages it can decide."""
        written: dict[str, Any] = handler(self)
        if written.get("request") is None:
            written.pop("request", None)
        return written


def package_binds(package: DisputePackage, lease_id: str, provider: str, peer_keys: PeerKeys) -> bool:
    """Whether ``package`` is evidence about ``lease_id`` served by ``provider`` (the escrow's payee's
    node): a v2 to v4 body signed by that node for that lease, whose text hash the package's text gives;
    for a v4 body, whose request hash the package's request gives (the arbiter renders the prompt from
    it: :func:`prompt_binds` says whether the package's own ids are the signed prompt); for v2 and v3,
    whose prompt hash the package's prompt ids give."""
    body = package.proof.commitment.body
    if body.v >= 4:
        request = package.request
        binds_request = request is not None and request_sha256(request) == body.request_sha256
    else:
        binds_request = prompt_binds(package)
    return (
        body.v >= 2
        and body.lease_id == package.lease_id == lease_id
        and body.provider == provider
        and binds_request
        and body.text_sha256 == text_sha256(package.text)
        and commitment_signed(package.proof.commitment, peer_keys)
    )


def prompt_binds(package: DisputePackage, prompt_ids: Sequence[int] | None = None) -> bool:
    """Whether ``prompt_ids`` (the package's own when None) are the prompt the package's body signs."""
    ids = package.prompt_ids if prompt_ids is None else prompt_ids
    return package.proof.commitment.body.prompt_sha256 == ids_sha256(ids)
