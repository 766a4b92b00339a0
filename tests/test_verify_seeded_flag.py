"""Verified inference (issue 21): the provider signs whether the request it served named a ``seed``
(a v3 commitment body's ``seeded``), so ``too_greedy`` is disputable where the draws were the
provider's own. Before, ``too_greedy`` was the consumer's word only: a provider that served an unseeded
0.8 request greedily was refused but kept its escrow at the arbiter. Now the arbiter applies
``too_greedy`` exactly when the body signs ``seeded: false`` and refunds; a seeded reply (the framing
seed of tests/test_verify_seeded_greedy.py) still never fails an honest provider, at the consumer or
at the arbiter; and a signed flag that is not the request's is ``sampling_mismatch``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import runtime.verify.evidence as evidence
from protocols.lease import arbiter
from protocols.lease.verifying import Verifying, prompt_ids
from protocols.machines.verify import (
    ArbitrationFacts,
    CheckVerdict,
    FailReason,
    arbitrate,
    check_verdict,
    greedy_disputable,
    rechecked_findings,
    seeded_matches,
)
from runtime.verify import check
from runtime.verify.evidence import (
    CallProof,
    CommitmentBody,
    DisputePackage,
    call_proof,
    sign_commitment,
    text_sha256,
)
from tests.test_verify_seeded_greedy import BODY as FRAMED
from tests.test_verify_seeded_greedy import FRAMING_SEED

PROMPT = "Verify me: the quick brown fox jumps over the lazy dog."
UNSEEDED = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0.8}
LEASE = "lease-seeded-flag"
SHA = "ab" * 32
HASH = "cd" * 32
REASONS: list[str] = list(FailReason.__args__)  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "_prefills", {})


@pytest.fixture(scope="module")
def key() -> Any:
    from libp2p import generate_new_ed25519_identity

    from wire.peer_keys import receipt_key

    return receipt_key(generate_new_ed25519_identity().private_key)


def _fields(key: Any, **extra: Any) -> dict[str, Any]:
    return {
        "lease_id": LEASE,
        "call_id": "call-1",
        "provider": key.peer_id,
        "model_sha256": SHA,
        "temperature_milli": 800,
        "top_p_milli": 950,
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "root": "ef" * 32,
        **extra,
    }


def test_a_v3_body_signs_the_flag_and_v1_v2_bodies_sign_the_same_bytes_as_before(key: Any) -> None:
    bound = {"prompt_sha256": HASH, "text_sha256": HASH}
    v3 = CommitmentBody.model_validate(_fields(key, v=3, seeded=False, **bound))
    assert b'"seeded":false' in v3.canonical() and b'"v":3' in v3.canonical()  # False is signed, not dropped
    flipped = CommitmentBody.model_validate(_fields(key, v=3, seeded=True, **bound))
    signed = sign_commitment(v3, key)
    from wire.peer_keys import ed25519_public_key

    assert evidence.commitment_signed(signed, ed25519_public_key)
    assert not evidence.commitment_signed(signed.model_copy(update={"body": flipped}), ed25519_public_key)
    v2 = CommitmentBody.model_validate(_fields(key, v=2, **bound))
    assert b'"seeded"' not in v2.canonical() and v2.seeded is None
    # Relayed (to a leased verifier, in a dispute package), a v2 body is written without the key, which
    # nodes of the release before would refuse even as null.
    proof = CallProof(commitment=sign_commitment(v2, key), tokens=[1], chunks=[])
    assert "seeded" not in proof.model_dump(mode="json")["commitment"]["body"]
    assert '"seeded"' not in proof.model_dump_json()
    for wrong in ({"v": 3, **bound}, {"v": 2, "seeded": False, **bound}, {"v": 1, "seeded": True}):
        with pytest.raises(ValueError):
            CommitmentBody.model_validate(_fields(key, **wrong))


@given(st.sampled_from(REASONS), st.integers(1, 3), st.sampled_from([None, True, False]))
def test_too_greedy_is_disputed_exactly_where_the_provider_signed_its_own_draws(
    reason: str, version: int, flag: bool | None
) -> None:
    verdict = CheckVerdict("failed", reason, version, flag)
    flagless = CheckVerdict("failed", reason, version, None)
    if reason == "too_greedy":
        assert verdict.dispute is (flag is False) is greedy_disputable(flag)
    else:  # the flag changes nothing for any other reason
        assert verdict.dispute == flagless.dispute
    # The arbiter counts the finding the same way: too_greedy only on a body signed unseeded.
    assert rechecked_findings(reason, flag) == ("" if reason == "too_greedy" and flag is not False else reason)
    # A refund follows the rule, whatever the flag, wherever the evidence binds.
    decided = arbitrate(ArbitrationFacts(True, verdict, left=1000, owed_if_honest=400))
    assert (decided.outcome == "refund") is verdict.dispute


@given(st.sampled_from([None, True, False]), st.booleans())
def test_a_signed_flag_must_be_the_requests(flag: bool | None, requested: bool) -> None:
    assert seeded_matches(flag, requested) is (flag is None or flag == requested)


@pytest.mark.parametrize(
    ("request_body", "flag", "expected"),
    [
        (UNSEEDED, True, "failed:sampling_mismatch"),  # signed seeded: would escape a too_greedy dispute
        (FRAMED, False, "failed:sampling_mismatch"),  # signed unseeded for a seeded request
        (UNSEEDED, None, "unverifiable"),  # a v2 body signs no flag: nothing to contradict
        (FRAMED, None, "unverifiable"),
    ],
)
async def test_a_signed_flag_that_contradicts_the_request_is_a_sampling_mismatch(
    key: Any, request_body: dict[str, Any], flag: bool | None, expected: str
) -> None:
    temperature = round(float(request_body["temperature"]) * 1000)
    version = {"v": 2} if flag is None else {"v": 3, "seeded": flag}
    body = CommitmentBody.model_validate(
        _fields(key, temperature_milli=temperature, prompt_sha256=HASH, text_sha256=text_sha256("abc"), **version)
    )
    proof = CallProof(commitment=sign_commitment(body, key), tokens=[1, 2, 3], chunks=[])
    verifying = Verifying(local_model=lambda sha256: None)  # holds no file: only the file-free checks run
    assert await verifying.check(key.peer_id, LEASE, request_body, proof, text="abc") == expected
    record = verifying.book.get(key.peer_id)
    assert record is not None and (record.failed == 1) is expected.startswith("failed:")
    assert LEASE not in verifying.evidence  # the consumer's word: never disputed


async def test_an_unseeded_greedy_reply_is_refunded_and_the_framing_seed_still_passes_at_the_arbiter(
    key: Any, tmp_path: Path
) -> None:
    """With the tiny model, served through the provider's own service and recorder, proved by
    ``call_proof``, checked by the consumer's ``Verifying`` and re-run by the arbiter's ``_facts``."""
    import trio

    from runtime.inference.engine import LlamaModel
    from runtime.inference.service import ChatService
    from runtime.inference.tiny_model import write_tiny_llama_gguf
    from runtime.verify.check import TokenIndex, prefill_for
    from runtime.verify.commitment import K
    from runtime.verify.identity import file_sha256
    from runtime.verify.provider import CallRecorder
    from runtime.verify.spot import recheck
    from wire.peer_keys import ed25519_public_key

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    sha256 = file_sha256(path)
    model = LlamaModel(path, name="tiny", n_ctx=512, n_threads=1)
    await model.load()
    service, index = ChatService(model), TokenIndex(path)

    async def served(request: dict[str, Any], served_as: dict[str, Any], call_id: str) -> tuple[CallProof, str]:
        """The provider's proof of ``request`` served as ``served_as`` (a cheat's greedy one, or itself)."""
        recorder = CallRecorder(request, index)

        async def emit(data: dict[str, Any]) -> None:
            recorder.see(data)

        usage = await service.run(served_as, emit, commit=K)
        ids = await prompt_ids(model, request, int(usage.detail["prompt_tokens"]))
        proof = call_proof(recorder, key, LEASE, call_id, sha256, usage.detail, ids)
        assert proof is not None
        return proof, recorder.text

    def arbitrated(package: DisputePackage) -> tuple[str, int, str]:
        prefill, tolerances = prefill_for(path)
        bound = evidence.package_binds(package, LEASE, key.peer_id, ed25519_public_key)
        spot = recheck(prefill, package, ed25519_public_key, tolerances)
        verdict = check_verdict(arbiter._facts(spot, package.proof.commitment.body))
        decided = arbitrate(ArbitrationFacts(bound, verdict, left=1000, owed_if_honest=400))
        return decided.outcome, decided.to_payee, decided.reason

    try:
        verifying = Verifying(local_model=lambda sha: model if sha == sha256 else None)
        # A cheat serves an unseeded 0.8 request greedily and signs, truthfully, that it named no seed.
        proof, text = await served(UNSEEDED, {**UNSEEDED, "temperature": 0.0}, "call-greedy")
        body = proof.commitment.body
        assert (body.v, body.seeded, body.temperature_milli, body.completion_tokens) == (3, False, 800, 200)
        outcome = await verifying.check(key.peer_id, LEASE, UNSEEDED, proof, text=text, usage={})
        assert outcome == "failed:too_greedy"
        package = verifying.evidence.get(LEASE)
        assert package is not None  # disputed: the provider's own signature says the draws were its own
        assert await trio.to_thread.run_sync(arbitrated, package) == ("refund", 0, "too_greedy")

        # An honest provider serves the reviewer's framing request: the consumer's seed makes the
        # temperature-2 reply the model's greedy one. The body signs it seeded: the consumer passes it,
        # and an arbiter handed it (a consumer disputing anyway) pays the provider.
        proof, text = await served(FRAMED, FRAMED, "call-framed")
        body = proof.commitment.body
        assert (body.v, body.seeded) == (3, True) and FRAMED["seed"] == FRAMING_SEED
        assert await verifying.check(key.peer_id, LEASE, FRAMED, proof, text=text, usage={}) == "passed"
        prompt = await prompt_ids(model, FRAMED, body.prompt_tokens)
        assert prompt is not None
        framed = DisputePackage(lease_id=LEASE, proof=proof, prompt_ids=prompt, text=text)
        assert await trio.to_thread.run_sync(arbitrated, framed) == ("reject", 400, "passed")
        # The reply really is the framing one: held to too_greedy (as if unseeded), it would fail.
        prefill, tolerances = prefill_for(path)
        spot = await trio.to_thread.run_sync(recheck, prefill, framed, ed25519_public_key, tolerances)
        assert spot.findings is not None and spot.findings.reason() == "too_greedy"
    finally:
        await model.aclose()
