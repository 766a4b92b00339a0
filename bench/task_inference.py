"""Is exact text equality at temperature 0 a fair test for ``inference`` task disputes?

Usage::

    python bench/task_inference.py [--prompts 18] [--max-tokens 32]

Writes the suite's tiny model, runs one prompt batch at temperature 0 on it (1 thread, one sequence
at a time: the baseline), then again under other engine settings a seller and an arbiter may differ
in (2 threads; 4 sequences decoded at once with the prompts sent concurrently; both; the baseline
again), and counts the prompts whose text differs from the baseline's. Every count 0 means the
arbiter's re-run decides by exact equality without refunding an honest seller for its settings.
Ends with one line: ``task_inference: prompts=… threads2_differ=… parallel4_differ=… both_differ=… again_differ=…``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import trio

from runtime.inference.engine import LlamaModel
from runtime.inference.tiny_model import write_tiny_llama_gguf


async def _run(path: Path, prompts: list[str], max_tokens: int, **settings: Any) -> list[str]:
    model = LlamaModel(path, n_ctx=256, max_queue=64, **settings)
    await model.load()
    texts: dict[int, str] = {}
    try:

        async def one(index: int, prompt: str) -> None:
            texts[index] = (await model.complete(prompt, max_tokens=max_tokens, temperature=0.0)).text

        async with trio.open_nursery() as nursery:
            for index, prompt in enumerate(prompts):
                nursery.start_soon(one, index, prompt)
    finally:
        await model.aclose()
    return [texts[index] for index in range(len(prompts))]


async def main(count: int, max_tokens: int) -> None:
    prompts = [f"prompt {i}: the quick brown fox {i * 7}" for i in range(count)]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_llama_gguf(Path(tmp) / "tiny.gguf")
        base = await _run(path, prompts, max_tokens, n_threads=1, parallel=1)
        settings = {
            "threads2": {"n_threads": 2, "parallel": 1},
            "parallel4": {"n_threads": 1, "parallel": 4},
            "both": {"n_threads": 2, "parallel": 4},
            "again": {"n_threads": 1, "parallel": 1},
        }
        differ = {}
        for name, kw in settings.items():
            other = await _run(path, prompts, max_tokens, **kw)
            differ[name] = sum(a != b for a, b in zip(base, other, strict=True))
    print(f"task_inference: prompts={count} " + " ".join(f"{name}_differ={n}" for name, n in differ.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=18)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    trio.run(main, args.prompts, args.max_tokens)
