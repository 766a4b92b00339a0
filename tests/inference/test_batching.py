"""Continuous batching: requests decoded together in one batch say exactly what each says alone
(text, logprobs, finish reasons, usage), each with its own sampling, stop strings, grammar and
choices; one cancelled midway stops alone, and one joining a running batch is served at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from runtime.inference.engine import LlamaModel
from runtime.inference.sampling import Sampling

SCHEMA = {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}
REQUESTS: list[dict[str, Any]] = [
    {"prompt": "the sea is", "max_tokens": 40},
    {"prompt": "a long way", "max_tokens": 30, "stop": ["e", "a"]},
    {"prompt": "numbers", "max_tokens": 24, "sampling": Sampling(temperature=0.9, top_p=0.9), "seed": 7},
    {"prompt": "with logprobs", "max_tokens": 12, "sampling": Sampling(logprobs=True, top_logprobs=3)},
    {"messages": [{"role": "user", "content": "json please"}], "max_tokens": 40, "schema": SCHEMA},
    {"prompt": "two choices", "max_tokens": 10, "n": 2, "sampling": Sampling(temperature=1.0), "seed": 3},
]


async def _run(model: LlamaModel, request: dict[str, Any]) -> dict[str, Any]:
    texts: dict[int, str] = {}
    logprobs: list[Any] = []
    finishes: dict[int, str] = {}
    async with model.stream_generate(**request) as stream:
        async for chunk in stream:
            texts[chunk["index"]] = texts.get(chunk["index"], "") + chunk["text"]
            logprobs += chunk.get("logprobs", [])
            if chunk.get("finish_reason"):
                finishes[chunk["index"]] = chunk["finish_reason"]
    assert stream.completion is not None
    return {"texts": texts, "logprobs": logprobs, "finishes": finishes, "usage": stream.completion.usage}


async def test_a_batch_says_what_each_request_says_alone(tiny_path: Path) -> None:
    alone = LlamaModel(tiny_path, name="alone", n_ctx=512, n_threads=1, parallel=1)
    batched = LlamaModel(tiny_path, name="batched", n_ctx=512, n_threads=1, parallel=4)
    await alone.load()
    await batched.load()
    try:
        expected = [await _run(alone, request) for request in REQUESTS]
        got: dict[int, dict[str, Any]] = {}
        peak = 0

        async def one(index: int) -> None:
            got[index] = await _run(batched, REQUESTS[index])

        async with trio.open_nursery() as nursery:
            for index in range(len(REQUESTS)):  # six requests, four slots: two join a running batch
                nursery.start_soon(one, index)
            while len(got) < len(REQUESTS):
                peak = max(peak, batched.admission.active)
                await trio.sleep(0)
        assert peak > 1
        for index, want in enumerate(expected):
            assert got[index]["texts"] == want["texts"], index
            assert got[index]["finishes"] == want["finishes"], index
            assert got[index]["usage"] == want["usage"], index
            for a, b in zip(got[index]["logprobs"], want["logprobs"], strict=True):
                assert a["token"] == b["token"] and abs(a["logprob"] - b["logprob"]) < 1e-3
        assert expected[1]["finishes"] == {0: "stop"} and len(expected[5]["texts"]) == 2

        # One cancelled midway stops alone; the others finish whole.
        async def long(prompt: str) -> dict[str, Any]:
            return await _run(batched, {"prompt": prompt, "max_tokens": 300})

        results: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:

            async def keep(prompt: str) -> None:
                results[prompt] = await long(prompt)

            for prompt in ("first", "second"):
                nursery.start_soon(keep, prompt)
            async with batched.stream_generate(prompt="cancelled", max_tokens=300) as stream:
                async for chunk in stream:
                    if chunk["tokens"]:
                        break  # leaving the block cancels it
        assert stream.final is not None and stream.final.finish_reason == "cancelled"
        assert stream.final.usage.completion_tokens < 300
        assert all(result["usage"].completion_tokens == 300 for result in results.values())
    finally:
        await alone.aclose()
        await batched.aclose()
