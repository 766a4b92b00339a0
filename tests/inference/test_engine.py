"""The llama.cpp engine on the tiny random-weight model: determinism, streaming, exact usage, limits."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import trio

from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.engine import Completion, LlamaModel

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


async def test_load_reports_time_memory_and_the_gguf_chat_template(tiny_path: Path) -> None:
    model = LlamaModel(tiny_path, name="tiny", n_ctx=256, n_threads=1)
    progress: list[float] = []
    report = await model.load(progress=progress.append)
    try:
        # 0.0 and 1.0 from us, llama.cpp's own reports (from the loading thread) in between.
        assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)
        assert any(0.0 < value <= 1.0 for value in progress[1:-1]), progress
        assert 0 < report.seconds < 5
        assert report.rss_bytes > 0
        assert report.n_ctx == 256
        assert report.chat_format == "gguf-template"
        assert report.metadata["general.architecture"] == "llama"
        assert tiny_path.stat().st_size < 1_000_000
    finally:
        await model.aclose()


async def test_a_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ClawnodeError) as raised:
        await LlamaModel(tmp_path / "none.gguf").load()
    assert raised.value.code == ErrorCode.NOT_FOUND
    assert str(tmp_path) not in raised.value.message  # no local path in an error


async def test_greedy_and_seeded_output_is_deterministic(tiny: LlamaModel) -> None:
    first = await tiny.chat(MESSAGES, max_tokens=24, temperature=0)
    second = await tiny.chat(MESSAGES, max_tokens=24, temperature=0)
    assert first.text and first.text == second.text
    sampled = [await tiny.chat(MESSAGES, max_tokens=24, temperature=0.9, seed=7) for _ in range(2)]
    assert sampled[0].text == sampled[1].text


async def test_streamed_pieces_join_to_the_whole_reply(tiny: LlamaModel) -> None:
    whole = await tiny.chat(MESSAGES, max_tokens=32, temperature=0)
    pieces: list[str] = []
    stream = tiny.stream_chat(MESSAGES, max_tokens=32, temperature=0)
    async with stream:
        async for piece in stream:
            pieces.append(piece)
    assert len(pieces) > 1
    assert "".join(pieces) == whole.text
    assert stream.usage == whole.usage
    assert stream.completion is not None and stream.completion.first_token_s is not None


async def test_chunks_made_while_trio_is_busy_reach_it_joined(tiny: LlamaModel) -> None:
    """A chunk stream (the chat service's) hands trio the plain chunks the engine made meanwhile as one,
    ``tokens`` saying how many it holds: one item for trio to handle, not one a token. Text, token count
    and finish reason stay whole; chunks with logprobs stay one a token."""
    import time

    from runtime.inference.sampling import Sampling

    whole = await tiny.chat(MESSAGES, max_tokens=60, temperature=0)
    chunks = []
    async with tiny.stream_generate(messages=MESSAGES, max_tokens=60) as stream:
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 1:
                time.sleep(0.2)  # trio busy (the network's frames): the engine goes on meanwhile
    assert "".join(chunk["text"] for chunk in chunks) == whole.text
    assert sum(chunk["tokens"] for chunk in chunks) == 60 == whole.usage.completion_tokens
    assert max(chunk["tokens"] for chunk in chunks) > 10 and len(chunks) < 30
    assert chunks[-1]["finish_reason"] == "length"
    per_token = []
    sampling = Sampling(logprobs=True, top_logprobs=2)
    async with tiny.stream_generate(messages=MESSAGES, max_tokens=20, sampling=sampling) as stream:
        async for chunk in stream:
            per_token.append(chunk)
            if len(per_token) == 1:
                time.sleep(0.2)
    assert [chunk["tokens"] for chunk in per_token if "logprobs" in chunk] == [1] * 20


async def test_usage_is_counted_by_the_engine(tiny: LlamaModel) -> None:
    chat = await tiny.chat(MESSAGES, max_tokens=20, temperature=0)
    prompt_text = await tiny.format_chat(MESSAGES)
    assert "<|im_start|>assistant" in prompt_text
    # The template writes the BOS token itself; special tokens are parsed.
    assert chat.usage.prompt_tokens == len(await tiny.tokenize(prompt_text, special=True))
    # The tiny vocabulary is one character per token and never ends a reply early.
    assert chat.usage.completion_tokens == 20 == len(chat.text)
    assert chat.finish_reason == "length"

    plain = await tiny.complete("hello there", max_tokens=10, temperature=0)
    assert plain.usage.prompt_tokens == len(await tiny.tokenize("hello there", add_bos=True))
    assert plain.usage.completion_tokens == 10 == len(plain.text)


async def test_max_tokens_is_respected(tiny: LlamaModel) -> None:
    for limit in (1, 5, 33):
        reply = await tiny.chat(MESSAGES, max_tokens=limit, temperature=0)
        assert limit <= reply.usage.completion_tokens <= limit + 2
    nothing = await tiny.chat(MESSAGES, max_tokens=0)
    assert nothing.text == "" and nothing.usage.completion_tokens == 0 and nothing.usage.prompt_tokens > 0


async def test_a_stop_string_ends_the_reply_before_it(tiny: LlamaModel) -> None:
    reply = await tiny.complete("abc", max_tokens=40, temperature=0)
    stop = reply.text[10:12]
    stopped = await tiny.complete("abc", max_tokens=40, temperature=0, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == reply.text[: reply.text.find(stop)]
    assert stopped.usage.completion_tokens < 40


async def test_too_many_tokens_is_an_invalid_argument(tiny_path: Path) -> None:
    model = LlamaModel(tiny_path, name="small", n_ctx=64, n_threads=1)
    await model.load()
    try:
        for prompt, max_tokens in (("x" * 100, 1), ("x" * 30, 40)):
            with pytest.raises(ClawnodeError) as raised:
                await model.complete(prompt, max_tokens=max_tokens)
            assert raised.value.code == ErrorCode.INVALID_ARGUMENT
            assert "too many tokens" in raised.value.message
        # ... and the model still serves what fits.
        assert (await model.complete("x" * 10, max_tokens=8)).usage.completion_tokens == 8
    finally:
        await model.aclose()


async def test_bad_arguments_are_refused(tiny: LlamaModel) -> None:
    for call in (
        lambda: tiny.stream_chat([], max_tokens=4),
        lambda: tiny.stream_chat([{"role": "robot", "content": "x"}]),
        lambda: tiny.stream_chat(MESSAGES, max_tokens=-1),
        lambda: tiny.stream_chat(MESSAGES, temperature=3),
        lambda: tiny.stream_chat(MESSAGES, seed="1"),  # type: ignore[arg-type]
    ):
        with pytest.raises(ClawnodeError) as raised:
            call()
        assert raised.value.code == ErrorCode.INVALID_ARGUMENT


async def test_concurrent_requests_are_serialised(tiny: LlamaModel) -> None:
    prompts = [f"prompt number {i}" for i in range(4)]
    expected = [await tiny.complete(p, max_tokens=24, temperature=0) for p in prompts]
    results: dict[int, Completion] = {}

    async def one(index: int) -> None:
        results[index] = await tiny.complete(prompts[index], max_tokens=24, temperature=0)

    async with trio.open_nursery() as nursery:
        for index in range(4):
            nursery.start_soon(one, index)
    assert [results[i].text for i in range(4)] == [e.text for e in expected]
    assert [results[i].usage for i in range(4)] == [e.usage for e in expected]


async def test_leaving_a_stream_stops_generation(tiny_path: Path) -> None:
    model = LlamaModel(tiny_path, name="long", n_ctx=4096, n_threads=1)
    await model.load()
    try:
        stream = model.stream_complete("go", max_tokens=4000, temperature=0)
        async with stream:
            async for _ in stream:
                break
        assert stream.final is not None
        assert stream.final.finish_reason == "cancelled"
        assert stream.final.usage.completion_tokens < 4000

        # A consumer cancelled while it waits for pieces stops it too.
        stream = model.stream_complete("go", max_tokens=4000, temperature=0)
        with trio.move_on_after(0.001):
            async with stream:
                async for _ in stream:
                    await trio.sleep(1)
        assert stream.final is not None and stream.final.usage.completion_tokens < 4000

        # The model is free again afterwards.
        assert (await model.complete("go", max_tokens=5)).usage.completion_tokens == 5
    finally:
        await model.aclose()


@pytest.mark.parametrize("parallel", [1, 2])  # one request after another, and continuous batching
async def test_a_generation_left_before_its_prompt_is_decoded_counts_no_prompt(tiny_path: Path, parallel: int) -> None:
    """What a cut call's prompt cost the engine (a lease bills a cut call for it): nothing when it was
    left before the engine took it up, the whole prompt when left after its first piece. Before, a
    generation left before the engine took it up counted its whole prompt, never decoded."""
    model = LlamaModel(tiny_path, name="cut", n_ctx=512, n_threads=1, parallel=parallel)
    await model.load()
    try:
        prompt = "one two three four five six"
        assert model._worker is not None
        busy = threading.Event()

        def occupied() -> None:
            busy.wait()

        model._worker.submit(occupied)  # the engine's thread is busy: the next generation waits for it
        threading.Timer(0.3, busy.set).start()
        stream = model.stream_complete(prompt, max_tokens=8)
        async with stream:
            pass  # left at once, while it waits for the engine
        assert stream.final is not None and stream.final.finish_reason == "cancelled"
        assert stream.final.usage.prompt_tokens == 0

        stream = model.stream_complete(prompt, max_tokens=100)
        async with stream:
            async for _ in stream:
                break
        assert stream.final is not None and stream.final.finish_reason == "cancelled"
        assert stream.final.usage.prompt_tokens == len(await model.tokenize(prompt, add_bos=True))
    finally:
        await model.aclose()


async def test_a_full_queue_is_rate_limited(tiny_path: Path) -> None:
    model = LlamaModel(tiny_path, name="busy", n_ctx=256, n_threads=1, max_queue=1, parallel=1)
    await model.load()
    try:
        holder = model.stream_complete("a", max_tokens=8)
        served: list[Completion] = []
        async with holder:  # admitted: holds the model until it leaves
            async with trio.open_nursery() as nursery:

                async def waiter() -> None:
                    served.append(await model.complete("b", max_tokens=4))

                nursery.start_soon(waiter)
                with trio.fail_after(5):
                    while model.queued < 1:
                        await trio.sleep(0.001)
                with pytest.raises(ClawnodeError) as raised:
                    await model.complete("c", max_tokens=4)
                assert raised.value.code == ErrorCode.RATE_LIMITED
                assert raised.value.reason == "busy" and (raised.value.retry_after_s or 0) > 0
                await holder.collect()
                await holder.aclose()
        assert served and served[0].usage.completion_tokens == 4
    finally:
        await model.aclose()


async def test_embeddings_are_stable(tiny: LlamaModel) -> None:
    vectors, tokens = await tiny.embed_with_count(["hello world", "hello world", "something else entirely"])
    assert len(vectors) == 3 and {len(v) for v in vectors} == {64}
    assert tokens == sum([len(await tiny.tokenize(t, add_bos=True)) for t in ["hello world"] * 2]) + len(
        await tiny.tokenize("something else entirely", add_bos=True)
    )
    assert _cosine(vectors[0], vectors[1]) == pytest.approx(1.0, abs=1e-5)
    assert _cosine(vectors[0], vectors[2]) < 0.9999
    again = await tiny.embed(["hello world"])
    assert again[0] == pytest.approx(vectors[0], abs=1e-5)
    with pytest.raises(ClawnodeError) as raised:
        await tiny.embed([])
    assert raised.value.code == ErrorCode.INVALID_ARGUMENT
