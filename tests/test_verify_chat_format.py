"""Verified inference (issue 21): a node may serve a file with a chat format other than the file's own
template (``[[models]] chat_format``), and a v4 commitment body signs the format the provider rendered
with, so the consumer's check and the arbiter render the signed request the way the provider did.

With real nodes on the tiny model (its own template is ``gguf-template``): an honest provider set to
``llama-2`` passes every check of a consumer that renders with the file's template, and an arbiter on the
file's template asked to refund that call (a consumer crying wolf) pays the provider instead; before the
format was signed, the consumer failed that provider `prompt_mismatch` and the arbiter refunded it. A
provider that signs a format other than the one it rendered with is caught, and so is one set to a
format that leaves the request out (``open-orca`` renders one fixed prompt whatever the messages): a
format is signed, and taken, only spelt exactly as one of ``signable_chat_formats`` (those that render
every message and add no text: tests/inference/test_chat_formats.py), else the verifier renders in its
own format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from protocols.lease import serving
from protocols.lease.arbiter import _facts, rerun_package
from protocols.lease.verifying import prompt_ids
from protocols.machines.verify import ArbitrationFacts, arbitrate, check_verdict
from runtime.errors import ClawnodeError
from runtime.inference.engine import LlamaModel, signable_chat_formats
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify.check import prefill_for
from runtime.verify.evidence import CallProof, DisputePackage, package_binds
from runtime.verify.identity import file_sha256
from runtime.verify.spot import recheck
from tests.support.market import market_nodes
from wire.peer_keys import ed25519_public_key

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which model are you?"}]
CHAT = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}


async def test_a_provider_serving_another_chat_format_passes_and_the_arbiter_pays_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    proofs: list[CallProof] = []
    signs_format = [""]  # a provider that signs a format other than the one it rendered with
    real_proof = serving.call_proof

    def call_proof(*args: Any) -> Any:
        if signs_format[0]:
            args = (*args[:9], signs_format[0])
        proof = real_proof(*args)
        if proof is not None:
            proofs.append(proof)
        return proof

    monkeypatch.setattr(serving, "call_proof", call_proof)

    def spec(chat_format: str = "", n_ctx: int = 256) -> ModelSpec:
        return ModelSpec(  # type: ignore[call-arg]
            name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=n_ctx, chat_format=chat_format
        )

    specs = [
        {"models": (spec(),)},
        {"models": (spec("llama-2"),)},
        {"models": (spec(),)},
        {"models": (spec("open-orca", n_ctx=2048),)},  # its one fixed prompt is 728 tokens
    ]
    async with market_nodes(specs) as (nodes, _):
        consumer, provider, plain, fixed = nodes
        provider_id = str(provider.host.get_id())
        verifying = consumer.market.verifying
        verifying.sample_rate = 1.0  # every call checked on the consumer's own copy of the file
        assert verifying.local_model is not None
        model = verifying.local_model(file_sha256(path))
        assert model.chat_format == "gguf-template"
        other = await model.format_chat(MESSAGES, chat_format="llama-2")
        assert other != await model.format_chat(MESSAGES)  # the two renderings differ

        lease = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
        for _ in range(3):
            result = await consumer.market.call(lease.lease_id, CHAT)
            assert result.units > 0
        assert lease.lease_id not in verifying.evidence
        record = verifying.book.get(provider_id)
        assert record is not None and (record.passed, record.failed) == (3, 0)
        proof = proofs[-1]
        assert (proof.commitment.body.v, proof.commitment.body.chat_format) == (4, "llama-2")

        # A consumer that disputes that honest call anyway: the arbiter, on the file's own template,
        # renders the signed request in the signed format, and pays the provider.
        text = "".join(chunk.get("text", "") for chunk in result.chunks)
        ours = await model.tokenize(await model.format_chat(MESSAGES), add_bos=False, special=True)
        package = DisputePackage(lease_id=lease.lease_id, proof=proof, prompt_ids=list(ours), text=text, request=CHAT)
        assert package_binds(package, lease.lease_id, provider_id, ed25519_public_key)
        rendered = await rerun_package(model, package)
        assert rendered is not None and rendered.prompt_ids != list(ours)
        prefill, tolerances = prefill_for(path)
        spot = recheck(prefill, rendered, ed25519_public_key, tolerances)
        verdict = check_verdict(_facts(spot, proof.commitment.body))
        decided = arbitrate(ArbitrationFacts(True, verdict, left=1000, owed_if_honest=400))
        assert (decided.outcome, decided.to_payee) == ("reject", 400), decided

        # A provider whose format renders one fixed prompt whatever the request: caught on its first
        # call (rendered in the consumer's own format, the signed prompt is not the request's).
        orca = await consumer.market.open_lease(str(fixed.host.get_id()), "model:tiny", budget=10**9, duration_s=60)
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.call(orca.lease_id, CHAT)
        assert caught.value.reason in ("verification_prompt_mismatch", "verification_prompt_hash_mismatch")
        assert proofs[-1].commitment.body.chat_format is None  # not a format a proof may name

        # A provider rendering with the file's template that signs llama-2: caught on its first call.
        signs_format[0] = "llama-2"
        cheat = await consumer.market.open_lease(str(plain.host.get_id()), "model:tiny", budget=10**9, duration_s=60)
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.call(cheat.lease_id, CHAT)
        assert caught.value.reason in ("verification_prompt_mismatch", "verification_prompt_hash_mismatch")


async def test_a_signed_format_is_taken_only_exactly_named_and_rendering_every_message(tmp_path: Path) -> None:
    model = LlamaModel(write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0), n_ctx=256)
    await model.load()
    try:
        claimed = len(await prompt_ids(model, CHAT, 0) or [])
        own = await prompt_ids(model, CHAT, claimed)
        assert own is not None and await prompt_ids(model, CHAT, claimed, "llama-2") != own
        assert "gemma" in signable_chat_formats() and "gem-ma" not in signable_chat_formats()
        for name in ("open-orca", "openbuddy", "mistral-instruct", "gem-ma", "no-such-format"):
            # Leaves the request out, adds prose, drops the system message, misspelt, unknown: own format.
            assert await prompt_ids(model, CHAT, claimed, name) == own, name
        with pytest.raises(ClawnodeError):
            await model.format_chat(MESSAGES, chat_format="gem-ma")
    finally:
        await model.aclose()
