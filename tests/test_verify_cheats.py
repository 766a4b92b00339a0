"""Verified inference (issue 21): the cheats a provider of the very file it advertises could still try,
each caught on the call it tries it with real nodes and a real lease: sending no proof (or one that does
not parse), signing for another file than its record names, and sending a text its proof's token ids
do not spell (nor its signed text hash: providers sign v2 bodies)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from protocols.lease import serving
from runtime.errors import ClawnodeError
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify.provider import CallRecorder
from tests.support.market import market_nodes

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 8, "temperature": 0}


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")  # the malformed proof, on purpose
async def test_a_missing_proof_another_files_signature_and_an_edited_text_each_fail_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    cheat: list[str] = [""]  # which cheat the provider plays now ("": honest)
    real_proof, real_see = serving.call_proof, CallRecorder.see

    def call_proof(*args: Any) -> Any:
        if cheat[0] == "no_proof":
            return None
        if cheat[0] == "malformed":  # a proof the consumer cannot parse counts as none
            proof = real_proof(*args)
            return proof.model_copy(update={"tokens": ["not", "ids"]}) if proof is not None else None
        if cheat[0] == "model_mismatch":  # signs, with its own key, for the file it really serves
            args = (*args[:4], "ab" * 32, *args[5:])
        return real_proof(*args)

    def see(self: CallRecorder, data: dict[str, Any]) -> dict[str, Any]:
        seen = real_see(self, data)
        if cheat[0] == "text_mismatch" and seen.get("text"):
            return {**seen, "text": "Buy now! " + seen["text"]}  # the reply edited after generation
        return seen

    monkeypatch.setattr(serving, "call_proof", call_proof)
    monkeypatch.setattr(CallRecorder, "see", see)

    def spec() -> ModelSpec:
        return ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]

    async with market_nodes([{"models": (spec(),)}, {"models": (spec(),)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id = str(provider.host.get_id())
        consumer.market.verifying.sample_rate = 1.0  # verify.sample_rate: every call is checked
        lease = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
        assert (await consumer.market.call(lease.lease_id, CHAT)).units > 0  # honest: passes
        for cheat[0], reason in (
            ("no_proof", "no_proof"),
            ("malformed", "no_proof"),
            ("model_mismatch", "model_mismatch"),
            # A v2 body signs the text streamed: a reply edited after that no longer hashes to it (a v1
            # body, signing no text, fails the same edit as text_mismatch).
            ("text_mismatch", "text_hash_mismatch"),
        ):
            lease = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
            with pytest.raises(ClawnodeError) as caught:
                await consumer.market.call(lease.lease_id, CHAT)
            assert caught.value.reason == f"verification_{reason}"
            held = consumer.market.held.get(lease.lease_id)
            assert held is None or held.seen_units == 0  # the cheat's call is not owed
            record = consumer.market.verifying.book.get(provider_id)
            assert record is not None and record.last_reason == reason
        record = consumer.market.verifying.book.get(provider_id)
        assert record is not None and (record.passed, record.failed) == (1, 4)
