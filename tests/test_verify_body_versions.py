"""Verified inference (issue 21): an upgraded provider keeps serving older consumers.

Providers sign v4 commitment bodies (the signed request hash); a consumer of a release before a
version cannot parse its body (it forbids unknown keys and bounds ``v``), reads the end frame's proof
as none, and fails its first check of the provider ``no_proof``. So the call protocol names the body
version its consumer reads: ``/clawnode/infer/1.2.0`` v4, ``/clawnode/infer/1.1.0`` v3,
``/clawnode/infer/1.0.0`` v2, and a provider signs, per stream, the newest body its consumer reads. An
older consumer (simulated by proposing only 1.0.0, and by parsing the end frame with that release's v2
schema, embedded below) gets the v2 body that release signs and passes its check; one proposing only
1.1.0 gets the v3 body (no request hash); a new consumer gets v4. A leased verifier of the release
before refusing a v3 proof leaves the call unverifiable, never a failure of the provider."""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol
from nacl.signing import VerifyKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from protocols.lease import consumer as consumer_module
from protocols.lease.verifier import RemoteVerifier
from protocols.lease.verifying import Verifying
from protocols.machines.verify import VerifierOffer
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.ledger.canonical import canonical_bytes
from runtime.verify.evidence import COMMITMENT_DOMAIN, CallProof, CommitmentBody, request_sha256, sign_commitment
from runtime.verify.evidence import text_sha256 as hash_of_text
from tests.support.market import market_nodes
from wire.peer_keys import ed25519_public_key
from wire.spare_streams import SpareStreams

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 8, "temperature": 0}
# The call protocol of the release before v3 bodies, spelled out: what an older consumer proposes.
OLD_INFER = TProtocol("/clawnode/infer/1.0.0")
V3_INFER = TProtocol("/clawnode/infer/1.1.0")  # the release before v4 bodies
_SHA256 = r"^[0-9a-f]{64}$"


# -- The release before v3 (``git show 4cd5f00^:runtime/verify/evidence.py``): its proof, as it parses one.


class V2Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = Field(1, ge=1, le=2)
    lease_id: str
    call_id: str
    provider: str
    model_sha256: str = Field(pattern=_SHA256)
    temperature_milli: int = Field(ge=0, le=2000)
    top_p_milli: int = Field(ge=1, le=1000)
    prompt_tokens: int = Field(ge=1)
    completion_tokens: int = Field(ge=1)
    root: str = Field(pattern=_SHA256)
    prompt_sha256: str | None = Field(None, pattern=_SHA256)
    text_sha256: str | None = Field(None, pattern=_SHA256)

    @model_validator(mode="after")
    def _version_fields(self) -> V2Body:
        bound = self.prompt_sha256 is not None and self.text_sha256 is not None
        unbound = self.prompt_sha256 is None and self.text_sha256 is None
        if (self.v == 2 and not bound) or (self.v == 1 and not unbound):
            raise ValueError("v2 bodies bind prompt_sha256 and text_sha256, v1 bodies neither")
        return self


class V2Signed(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    body: V2Body
    sig: str = Field(max_length=200)


class V2Proof(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    commitment: V2Signed
    tokens: list[int]
    chunks: list[str]


def _signed_as_that_release_checks(proof: V2Proof) -> bool:
    body = proof.commitment.body
    key = ed25519_public_key(body.provider)
    assert key is not None
    message = COMMITMENT_DOMAIN + canonical_bytes(body.model_dump(exclude_none=True))
    try:
        VerifyKey(key).verify(message, base64.b64decode(proof.commitment.sig))
    except Exception:  # noqa: BLE001 - any failure is "not signed"
        return False
    return True


def test_each_call_protocol_names_the_body_its_consumer_reads() -> None:
    from protocols.lease.base import INFER_PROTOCOL, INFER_PROTOCOLS, body_version_read
    from runtime.verify.evidence import LATEST_VERSION

    assert INFER_PROTOCOLS == (INFER_PROTOCOL, V3_INFER, OLD_INFER)  # newest first: older providers answer
    assert body_version_read(INFER_PROTOCOL) == LATEST_VERSION == 4  # a new body version needs a new id
    assert body_version_read(V3_INFER) == 3
    assert body_version_read(OLD_INFER) == 2
    assert body_version_read(None) == 2


async def test_an_older_consumer_gets_a_v2_proof_it_reads_and_passes_and_a_new_one_gets_v4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    frames: list[bytes] = []  # every call frame the consumer read, as it came off the wire
    real_frame = consumer_module.call_frame

    def call_frame(raw: bytes) -> Any:
        frames.append(raw)
        return real_frame(raw)

    monkeypatch.setattr(consumer_module, "call_frame", call_frame)

    def spec() -> ModelSpec:
        return ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]

    async with market_nodes([{"models": (spec(),)}, {"models": (spec(),)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id = str(provider.host.get_id())
        consumer.market.verifying.sample_rate = 1.0  # every call is checked (a first call always is)
        lease = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)

        # An older consumer: it proposes only the call protocol of the release before v3.
        older = SpareStreams(consumer.host, [OLD_INFER])
        consumer.market.__dict__["spare_streams"] = older
        assert (await consumer.market.call(lease.lease_id, CHAT)).units > 0
        end = json.loads(frames[-1])
        old_proof = V2Proof.model_validate(end["verify"])  # what that release parses: no proof before
        assert old_proof.commitment.body.v == 2 and old_proof.commitment.body.prompt_sha256 is not None
        assert _signed_as_that_release_checks(old_proof)
        record = consumer.market.verifying.book.get(provider_id)
        assert record is not None and (record.passed, record.failed) == (1, 0)  # its check passes
        await older.aclose()

        # A consumer of the release before v4 proposes only 1.1.0: a v3 body, with no request hash.
        v3 = SpareStreams(consumer.host, [V3_INFER])
        consumer.market.__dict__["spare_streams"] = v3
        assert (await consumer.market.call(lease.lease_id, CHAT)).units > 0
        v3_body = CallProof.model_validate(json.loads(frames[-1])["verify"]).commitment.body
        assert (v3_body.v, v3_body.seeded, v3_body.request_sha256) == (3, False, None)
        assert "request_sha256" not in json.loads(frames[-1])["verify"]["commitment"]["body"]
        await v3.aclose()

        # A consumer of this release proposes 1.2.0 first and gets the v4 body, which older ones refuse.
        del consumer.market.__dict__["spare_streams"]
        assert (await consumer.market.call(lease.lease_id, CHAT)).units > 0
        end = json.loads(frames[-1])
        new_proof = CallProof.model_validate(end["verify"])
        assert (new_proof.commitment.body.v, new_proof.commitment.body.seeded) == (4, False)
        assert new_proof.commitment.body.request_sha256 == request_sha256(CHAT)  # the request as sent
        with pytest.raises(ValidationError):
            V2Proof.model_validate(end["verify"])
        record = consumer.market.verifying.book.get(provider_id)
        assert record is not None and (record.passed, record.failed) == (3, 0)


class _OlderVerifierMarket:
    """A consumer's market whose leased verifier is of the release before v3: it parses the request's
    proof with the v2 schema and refuses it as that release's ``VerifierService`` does."""

    def __init__(self, verifying: Verifying) -> None:
        self.verifying = verifying
        self.held: dict[str, Any] = {}
        self.asked = 0

    def _spawn(self, fn: Any, *args: Any) -> None:
        raise AssertionError("the verifiers are known: nothing is looked up")

    async def open_lease(self, verifier: str, capability: str, **_: Any) -> Any:
        return type("Lease", (), {"lease_id": f"verify-lease-{self.asked}"})()

    async def call(self, lease_id: str, body: dict[str, Any], **_: Any) -> Any:
        self.asked += 1
        try:
            V2Proof.model_validate(body["proof"])
        except ValidationError:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "not a verification request") from None
        raise AssertionError("a v3 proof parsed under the v2 schema")

    async def revoke_held(self, lease_id: str) -> None:
        return None


async def test_an_older_verifier_refusing_a_v3_proof_leaves_the_call_unverifiable() -> None:
    from libp2p import generate_new_ed25519_identity

    from wire.peer_keys import receipt_key

    key = receipt_key(generate_new_ed25519_identity().private_key)
    verifiers = [str(receipt_key(generate_new_ed25519_identity().private_key).peer_id) for _ in range(2)]
    body = CommitmentBody(
        v=3,
        lease_id="lease-older-verifier",
        call_id="call-1",
        provider=key.peer_id,
        model_sha256="ab" * 32,
        temperature_milli=0,
        top_p_milli=950,  # what CHAT declares (the engine's default top_p)
        prompt_tokens=4,
        completion_tokens=2,
        root="cd" * 32,
        prompt_sha256="ef" * 32,
        text_sha256=hash_of_text("hi"),  # the text received: a signed hash of other text fails undrawn
        seeded=False,
    )
    proof = CallProof(commitment=sign_commitment(body, key), tokens=[5, 6], chunks=[])
    verifying = Verifying(local_model=lambda sha256: None, sample_rate=1.0)  # holds no copy of the file
    verifying.rng = random.Random(0)
    market = _OlderVerifierMarket(verifying)
    remote = RemoteVerifier(market, lambda sha256: trio.sleep(0), self_id="consumer")  # type: ignore[arg-type,return-value]
    remote._offers[body.model_sha256] = (trio.current_time(), [VerifierOffer(peer, 0) for peer in verifiers])
    verifying.remote = remote
    outcome = await verifying.check(key.peer_id, body.lease_id, dict(CHAT), proof, text="hi", usage={})
    assert outcome == "unverifiable" and market.asked == 2  # each older verifier refused; none failed it
    record = verifying.book.get(key.peer_id)
    assert record is not None and (record.passed, record.failed, record.unverifiable) == (0, 0, 1)
    assert body.lease_id not in verifying.evidence
