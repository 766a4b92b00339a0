"""Verified inference (issue 21): a v2 commitment body binds the prompt the provider evaluated and the text
it streamed, so an arbiter can be shown the very prompt and reply. With real nodes and a real lease: an
honest provider's v2 proof passes, and a provider that signs another prompt of the same length, streams
another text than it signed, or signs a text its token ids do not spell is caught on that call; the
arbiter's re-run of the package refunds the signed cheat and pays the honest provider, whatever prompt
or text a consumer hands it. (A provider that signs v2 answers on ``/clawnode/infer/1.0.0``, as the
releases that sign it do: on a newer call protocol a v2 body fails ``proof_downgraded``.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from protocols.lease import serving
from protocols.lease.base import INFER_PROTOCOL_V1
from protocols.machines.verify import ArbitrationFacts, CheckFacts, arbitrate, check_verdict
from runtime.errors import ClawnodeError
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify import evidence
from runtime.verify.check import prefill_for
from runtime.verify.evidence import CallProof, DisputePackage, commitment_signed, package_binds, text_sha256
from runtime.verify.provider import CallRecorder
from runtime.verify.spot import recheck
from tests.support.market import market_nodes
from wire.peer_keys import ed25519_public_key
from wire.spare_streams import SpareStreams

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 8, "temperature": 0}


async def test_a_v2_proof_binds_the_prompt_and_the_text_and_each_unbound_cheat_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    cheat: list[str] = [""]  # which cheat the provider plays now ("": honest)
    sent: list[CallProof] = []
    packages: dict[str, DisputePackage] = {}  # per cheat: what the consumer would hand the arbiter
    real_proof, real_see = serving.call_proof, CallRecorder.see

    def call_proof(*args: Any) -> Any:
        honest_ids = list(args[6] or ())  # None when the provider signs v1 (no prompt ids bound)
        if cheat[0] == "prompt_hash_mismatch":  # signs another prompt of the very same length
            args = (*args[:6], list(reversed(args[6])))
        proof = real_proof(*args)
        assert proof is not None
        sent.append(proof)
        text = args[0].text  # what it streamed (the text_hash_mismatch cheat edits it after this)
        if proof.commitment.body.v == 2:  # only a v2 body is evidence
            packages[cheat[0]] = DisputePackage(lease_id=args[2], proof=proof, prompt_ids=honest_ids, text=text)
        return proof

    def see(self: CallRecorder, data: dict[str, Any]) -> dict[str, Any]:
        if cheat[0] == "text_mismatch" and data.get("text"):  # signs (and streams) a text it did not generate
            return real_see(self, {**data, "text": "Buy now! " + data["text"]})
        seen = real_see(self, data)
        if cheat[0] == "text_hash_mismatch" and seen.get("text"):  # streams another text than it signs
            return {**seen, "text": "Buy now! " + seen["text"]}
        return seen

    monkeypatch.setattr(evidence, "SIGNED_VERSION", 2)
    monkeypatch.setattr(serving, "call_proof", call_proof)
    monkeypatch.setattr(CallRecorder, "see", see)

    def spec() -> ModelSpec:
        return ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]

    async with market_nodes([{"models": (spec(),)}, {"models": (spec(),)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id = str(provider.host.get_id())
        older = SpareStreams(consumer.host, [INFER_PROTOCOL_V1])  # the call protocol v2 and v1 bodies owe
        consumer.market.__dict__["spare_streams"] = older
        consumer.market.verifying.sample_rate = 1.0  # verify.sample_rate: every call is checked
        lease = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
        assert (await consumer.market.call(lease.lease_id, CHAT)).units > 0  # honest: passes
        body = sent[-1].commitment.body
        assert body.v == 2 and body.prompt_sha256 is not None and body.text_sha256 is not None
        assert commitment_signed(sent[-1].commitment, ed25519_public_key)
        assert body.text_sha256 != text_sha256("")  # the reply's own text, not nothing
        # A provider of the release before signs v1 bodies: still read, and an honest one still passes.
        monkeypatch.setattr(evidence, "SIGNED_VERSION", 1)
        assert (await consumer.market.call(lease.lease_id, CHAT)).units > 0
        assert sent[-1].commitment.body.v == 1 and sent[-1].commitment.body.prompt_sha256 is None
        monkeypatch.setattr(evidence, "SIGNED_VERSION", 2)
        for cheat[0] in ("prompt_hash_mismatch", "text_hash_mismatch", "text_mismatch"):
            lease = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
            with pytest.raises(ClawnodeError) as caught:
                await consumer.market.call(lease.lease_id, CHAT)
            assert caught.value.reason == f"verification_{cheat[0]}"
            record = consumer.market.verifying.book.get(provider_id)
            assert record is not None and record.last_reason == cheat[0]
            # Evidence is kept only where the provider's signature binds the failure.
            kept = consumer.market.verifying.evidence.get(lease.lease_id)
            assert (kept is not None) == (cheat[0] == "text_mismatch")
            if kept is not None:
                assert package_binds(kept, lease.lease_id, provider_id, ed25519_public_key)
        record = consumer.market.verifying.book.get(provider_id)
        assert record is not None and (record.passed, record.failed) == (2, 3)
        await older.aclose()

    # The arbiter's side: its own copy of the file re-runs the check on the package, then decides.
    prefill, tolerances = prefill_for(path)

    def arbitrated(package: DisputePackage) -> tuple[str, int, str]:
        bound = package_binds(package, package.lease_id, provider_id, ed25519_public_key)
        spot = recheck(prefill, package, ed25519_public_key, tolerances)
        facts = CheckFacts(
            root_signed=spot.root_signed,
            answered=True,
            openings_match=spot.openings_match,
            holds_file=True,
            prompt_matches=spot.prompt_matches,
            findings_reason=spot.findings.reason() if spot.findings is not None else "",
            text_matches=spot.text_matches,
            prompt_hash_matches=spot.prompt_hash_matches,
            text_hash_matches=spot.text_hash_matches,
            body_version=package.proof.commitment.body.v,
        )
        result = arbitrate(ArbitrationFacts(bound, check_verdict(facts), left=1000, owed_if_honest=400))
        return result.outcome, result.to_payee, result.reason

    assert arbitrated(packages[""]) == ("reject", 400, "passed")  # an honest call: the provider is paid
    assert arbitrated(packages["text_mismatch"]) == ("refund", 0, "text_mismatch")  # signed, caught again
    # A consumer that hands the arbiter another prompt (of the same length) than the provider signed,
    # or another text than it streamed, proves nothing.
    swapped = packages[""].model_copy(update={"prompt_ids": list(reversed(packages[""].prompt_ids))})
    assert arbitrated(swapped) == ("reject", 400, "evidence_unbound")
    edited = packages[""].model_copy(update={"text": "Buy now! " + packages[""].text})
    assert arbitrated(edited)[2] == "evidence_unbound"


def test_a_v1_body_signs_the_same_bytes_as_before_and_a_v2_body_must_bind_both() -> None:
    fields = {
        "lease_id": "lease-1",
        "call_id": "call-1",
        "provider": "1" * 46,
        "model_sha256": "ab" * 32,
        "temperature_milli": 0,
        "top_p_milli": 1000,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "root": "00" * 32,
    }
    v1 = evidence.CommitmentBody.model_validate(fields)
    # Consumers of the release before sign and check exactly these bytes: no new keys in them.
    assert b"sha256_" not in v1.canonical() and b'"prompt_sha256"' not in v1.canonical()
    bound = {"prompt_sha256": evidence.ids_sha256([1, 2, 3]), "text_sha256": text_sha256("hi")}
    assert evidence.CommitmentBody.model_validate({**fields, "v": 2, **bound}).canonical() != v1.canonical()
    for wrong in ({"v": 2, "prompt_sha256": bound["prompt_sha256"]}, {"v": 1, **bound}):
        with pytest.raises(ValueError):
            evidence.CommitmentBody.model_validate({**fields, **wrong})
