"""Verified inference (issue 21): a v4 commitment body signs the hash of the request the provider
received, so an arbiter handed that request renders the prompt itself.

The hash is the same text on every side the request crosses (the consumer's dict, the call frame the
provider parses, the dispute package the arbiter parses), floats and escapes included. A signed prompt
that is not the arbiter's rendering of the signed request is disputed (a v3 body's is the consumer's word
only); a provider that signs another request's hash, or answers on the call protocol that owes a v4
body with an older one (which binds no request), is failed on that very call, drawn for a check or not.
With real nodes: an honest v4 call passes, and a provider that signs a prompt of the same length other
than the one the request renders is caught, keeps the consumer's evidence, and the arbiter's re-run,
rendering the request on its own copy of the file, refunds it. A chat template that asks for the date
renders a fixed one, so the rendering is the same in every time zone and on every day."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from libp2p import generate_new_ed25519_identity

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from protocols import lease_wire as w
from protocols.lease import serving
from protocols.lease.arbiter import _facts, rerun_package
from protocols.machines.verify import (
    ArbitrationFacts,
    CallFacts,
    CheckVerdict,
    arbitrate,
    check_verdict,
    every_call_facts,
    proof_version_met,
    signed_hash_matches,
)
from runtime.errors import ClawnodeError
from runtime.inference.engine import LlamaModel
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify.check import prefill_for
from runtime.verify.evidence import (
    CallProof,
    CommitmentBody,
    DisputePackage,
    package_binds,
    request_sha256,
    sign_commitment,
    text_sha256,
)
from runtime.verify.spot import recheck
from tests.support.market import market_nodes
from wire.peer_keys import ed25519_public_key, receipt_key

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 8, "temperature": 0}
# What a client may send: floats of every shape, escapes, nesting, keys in any order.
AWKWARD = {
    "top_p": 0.1,
    "temperature": 1e-7,
    "frequency_penalty": -0.0,
    "presence_penalty": 123456789.123456789,
    "logit_bias": {"42": 1e300, "7": -5.5},
    "messages": [{"role": "user", "content": 'é "quoted" \\ \u2028 \U0001f600'}],
    "stop": ["\n\n", "</s>"],
    "max_tokens": 2**40,
    "seed": None,
}


def test_the_request_hash_is_the_same_on_every_side_it_crosses() -> None:
    sent = request_sha256(AWKWARD)
    assert sent is not None and sent != request_sha256({**AWKWARD, "top_p": 0.1000001})
    # The provider parses the call frame the consumer wrote.
    frame = w.CallRequest(lease_id="ab" * 32, token="t", body=AWKWARD).model_dump_json()
    assert request_sha256(w.CallRequest.model_validate_json(frame).body) == sent
    assert request_sha256(json.loads(frame)["body"]) == sent
    assert request_sha256(dict(reversed(list(AWKWARD.items())))) == sent  # key order is not the request
    # What JSON cannot write exactly has no hash: such a call is signed v3 and binds no request.
    assert request_sha256({**CHAT, "temperature": float("nan")}) is None


def _signed(version: int, *, request: dict[str, Any] | None = None) -> tuple[CallProof, str]:
    key = receipt_key(generate_new_ed25519_identity().private_key)
    fields: dict[str, Any] = {
        "v": version,
        "lease_id": "cd" * 32,
        "call_id": "call-1",
        "provider": key.peer_id,
        "model_sha256": "ab" * 32,
        "temperature_milli": 0,
        "top_p_milli": 950,
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "root": "ef" * 32,
        "prompt_sha256": "12" * 32,  # not the hash of the ids a package carries below
        "text_sha256": text_sha256("hi"),
        "seeded": False,
    }
    if version >= 4:
        fields["request_sha256"] = request_sha256(request or CHAT)
    return CallProof(commitment=sign_commitment(CommitmentBody(**fields), key), tokens=[5, 6], chunks=[]), key.peer_id


def test_a_v4_package_binds_by_the_request_and_an_earlier_one_by_its_prompt_ids() -> None:
    proof, provider = _signed(4)
    lease = proof.commitment.body.lease_id
    package = DisputePackage(lease_id=lease, proof=proof, prompt_ids=[1, 2, 3], text="hi", request=dict(CHAT))
    # The ids are the consumer's rendering, not the signed prompt: the arbiter renders the request itself.
    assert package_binds(package, lease, provider, ed25519_public_key)
    edited = package.model_copy(update={"request": {**CHAT, "max_tokens": 9}})
    assert not package_binds(edited, lease, provider, ed25519_public_key)  # another request than signed
    assert not package_binds(package.model_copy(update={"request": None}), lease, provider, ed25519_public_key)
    assert DisputePackage.model_validate_json(package.model_dump_json()) == package
    with pytest.raises(ValueError):  # no larger than a call frame: what a provider could have been sent
        DisputePackage(lease_id=lease, proof=proof, prompt_ids=[], text="hi", request={"prompt": "x" * (1 << 20)})
    # Measured as the frame writes it: 300,000 "é" are 600 KB of UTF-8 (1.8 MB as JSON escapes).
    accented = {"prompt": "é" * 300_000}
    frame = w.CallRequest(lease_id=lease, token="t", body=accented).model_dump_json().encode()
    assert len(frame) < 1 << 20
    DisputePackage(lease_id=lease, proof=proof, prompt_ids=[], text="hi", request=accented)
    # A v3 body binds no request: its package is evidence only with the signed prompt's own ids, and is
    # written without a request key, so an arbiter of the release before v4 still reads it.
    proof, provider = _signed(3)
    v3 = DisputePackage(lease_id=lease, proof=proof, prompt_ids=[1, 2, 3], text="hi")
    assert not package_binds(v3, lease, provider, ed25519_public_key)
    assert "request" not in json.loads(v3.model_dump_json())
    with pytest.raises(ValueError):
        CommitmentBody(**{**proof.commitment.body.model_dump(), "request_sha256": "34" * 32})  # v3 signs none


def test_a_rendering_other_than_the_signed_prompt_is_disputed_only_where_the_request_is_signed() -> None:
    for version, disputed in ((2, False), (3, False), (4, True)):
        verdict = CheckVerdict("failed", "prompt_hash_mismatch", body_version=version)
        assert verdict.dispute is disputed
    assert not CheckVerdict("failed", "request_hash_mismatch", body_version=4).dispute  # the consumer's word
    # A signed request hash that is not the request sent fails the call whatever the draw.
    found = every_call_facts(CallFacts(True, request_hash_matches=False, body_version=4))
    assert found is not None and check_verdict(found).reason == "request_hash_mismatch"
    assert every_call_facts(CallFacts(True, body_version=4)) is None
    assert signed_hash_matches(None, "ab" * 32) and signed_hash_matches("ab" * 32, None)  # nothing to compare
    assert not signed_hash_matches("ab" * 32, "cd" * 32)
    # The body the call protocol owes: v4 on 1.2.0 (v3 for a request JSON cannot hash), v3 on 1.1.0.
    assert proof_version_met(4, 4, request_hashable=True) and proof_version_met(3, 4, request_hashable=False)
    assert not proof_version_met(3, 4, request_hashable=True) and not proof_version_met(2, 3, request_hashable=True)
    found = every_call_facts(CallFacts(True, version_met=False, body_version=3))
    assert found is not None and check_verdict(found).reason == "proof_downgraded"
    assert not check_verdict(found).dispute


async def test_a_v4_provider_signing_another_prompt_or_request_is_caught_and_the_arbiter_refunds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    cheat = [""]
    real_proof = serving.call_proof

    def call_proof(*args: Any) -> Any:
        if cheat[0] == "prompt":  # signs a prompt of the very same length the request does not render
            args = (*args[:6], list(reversed(args[6])), *args[7:])
        if cheat[0] == "request":  # signs for another request than the one it received
            args = (*args[:8], {**args[8], "max_tokens": 9})
        if cheat[0] == "downgrade":  # signs v3 on 1.2.0: a body that binds no request
            args = (*args[:7], 3, *args[8:])
        return real_proof(*args)

    monkeypatch.setattr(serving, "call_proof", call_proof)

    def spec() -> ModelSpec:
        return ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]

    async with market_nodes([{"models": (spec(),)}, {"models": (spec(),)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id = str(provider.host.get_id())
        verifying = consumer.market.verifying
        lease = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
        assert (await consumer.market.call(lease.lease_id, CHAT)).units > 0  # honest v4: passes

        # Another request's hash: failed on a call not drawn for a check (the sample rate is 0).
        verifying.sample_rate = 0.0
        cheat[0] = "request"
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.call(lease.lease_id, CHAT)
        assert caught.value.reason == "verification_request_hash_mismatch"
        assert lease.lease_id not in verifying.evidence  # nothing an arbiter could bind
        cheat[0] = "downgrade"
        third = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.call(third.lease_id, CHAT)
        assert caught.value.reason == "verification_proof_downgraded"

        # Another prompt than the request renders: caught, and the evidence is kept for the arbiter.
        verifying.sample_rate = 1.0
        cheat[0] = "prompt"
        second = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.call(second.lease_id, CHAT)
        assert caught.value.reason == "verification_prompt_hash_mismatch"
        package = verifying.evidence[second.lease_id]
        assert package.request == CHAT and package_binds(package, second.lease_id, provider_id, ed25519_public_key)

        # The arbiter's re-run: its own rendering of the signed request, on its own copy of the file.
        assert verifying.local_model is not None
        model = verifying.local_model(package.proof.commitment.body.model_sha256)
        rendered = await rerun_package(model, package)
        assert rendered is not None and rendered.prompt_ids == package.prompt_ids  # the request's rendering
        prefill, tolerances = prefill_for(path)
        spot = recheck(prefill, rendered, ed25519_public_key, tolerances)
        verdict = check_verdict(_facts(spot, package.proof.commitment.body))
        decided = arbitrate(ArbitrationFacts(True, verdict, left=1000, owed_if_honest=400))
        assert (decided.outcome, decided.to_payee, decided.reason) == ("refund", 0, "prompt_hash_mismatch")


DATED = (
    "{{ bos_token }}Today is {{ strftime_now('%d %b %Y') }}."
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
)


async def test_a_template_asking_for_the_date_renders_the_same_everywhere_and_every_day(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = LlamaModel(write_tiny_llama_gguf(tmp_path / "dated.gguf", chat_template=DATED), n_ctx=128)
    await model.load()
    try:
        rendered = set()
        for zone in ("UTC", "Asia/Tokyo", "Pacific/Pago_Pago"):
            monkeypatch.setenv("TZ", zone)
            time.tzset()
            rendered.add(await model.format_chat([{"role": "user", "content": "hi"}]))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
        await model.aclose()
    assert len(rendered) == 1 and "Today is 26 Jul 2024." in rendered.pop()


def test_a_verifier_whose_schema_takes_no_v4_proof_is_never_leased_for_one() -> None:
    """An older verifier refuses a v4 proof only after a lease was opened (and an escrow locked) for it:
    its offer's request schema, which bounds no body version, keeps it out of a v4 proof's draw."""
    import random

    from protocols.lease.verifier import VERIFY_REQUEST_SCHEMA, body_versions_read
    from protocols.machines.verify import VerifierOffer, choose_verifiers

    older_schema = {**VERIFY_REQUEST_SCHEMA, "properties": {"proof": {"type": "object"}, "request": {"type": "object"}}}
    assert body_versions_read(VERIFY_REQUEST_SCHEMA) == 4 and body_versions_read(older_schema) == 3
    offers = [VerifierOffer("older", 1, body_versions_read(older_schema)), VerifierOffer("newer", 1, 4)]
    rng = random.Random(0)
    assert choose_verifiers(offers, provider="p", self_id="me", rng=rng, body_version=4) == ["newer"]
    assert sorted(choose_verifiers(offers, provider="p", self_id="me", rng=rng, body_version=3)) == ["newer", "older"]
