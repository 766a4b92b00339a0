"""Verified inference (issue 21): a reply served greedily (or much cooler) while a temperature above 0
is declared is failed ``too_greedy``; honest sampling at the declared temperature is not."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from runtime.inference.engine import LlamaModel
from runtime.inference.sampling import Sampling, TokenPicker
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify.check import (
    SAMPLING_TOP_K,
    TOO_GREEDY_BOUND,
    Prefill,
    TokenIndex,
    greedy_bound,
    greedy_tail,
    too_greedy,
)
from runtime.verify.provider import positions_from_chunks

PROMPT = "Verify me: the quick brown fox jumps over the lazy dog."


class _Probabilities:
    """Stands in for a TokenPicker's generator: records the engine's final candidates' probabilities."""

    def __init__(self) -> None:
        self.p: np.ndarray | None = None

    def choice(self, n: int, p: np.ndarray) -> int:
        self.p = p
        return 0


def _engine_candidates(x: np.ndarray, top_p: float) -> np.ndarray:
    """The ids _draw keeps, best first (its own steps, for pairing with the recorded probabilities)."""
    x = np.asarray(x, dtype=np.float32)
    k = min(SAMPLING_TOP_K, x.size)
    ids = np.argpartition(-x, k - 1)[:k]
    ids = ids[np.argsort(-x[ids], kind="stable")]
    values = x[ids]
    probs = np.exp(values - values[0])
    probs /= probs.sum()
    keep = max(1, min(int(np.searchsorted(np.cumsum(probs), top_p) + 1), ids.size))
    ids, probs = ids[:keep], probs[:keep]
    return ids[probs >= 0.05 * probs[0]]


def _top(logits: np.ndarray) -> np.ndarray:
    """The verifier's view of a row: its best log-probabilities, best first (as check.score keeps them)."""
    x = np.asarray(logits, dtype=np.float64)
    logprobs = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    return -np.sort(-logprobs)[: min(SAMPLING_TOP_K, x.size)]


rows = st.builds(
    lambda seed, n, scale: (seed, n, scale),
    st.integers(0, 2**32 - 1),
    st.integers(2, 120),
    st.floats(0.1, 8.0),
)


@settings(max_examples=150, deadline=None)
@given(
    rows,
    st.floats(0.1, 2.0),
    st.sampled_from([0.5, 0.8, 0.9, 0.95, 1.0]),
    st.floats(0.0, 1.5),
    st.floats(0.0, 1.0),
    st.booleans(),
)
def test_the_bound_is_never_below_the_engines_own_chance_under_the_noise_it_allows(
    row: tuple[int, int, float], temperature: float, top_p: float, noise: float, noise_share: float, worst: bool
) -> None:
    """Whatever the distribution and the noise between the provider's row and the verifier's (any two
    entries' difference off by at most ``noise``: each entry off by at most half of it), the chance that
    the engine's sampling from the provider's row takes a token the verifier counts as its best is at
    most greedy_bound of the verifier's row. ``worst``: the noise as unkind as it may be (every token
    counted as the best half the noise more likely, every other half the noise less)."""
    seed, n, scale = row
    rng = np.random.default_rng(seed)
    verifier = rng.normal(0.0, scale, n)
    bound = greedy_bound(_top(verifier), temperature, top_p, noise, whole_row=n <= SAMPLING_TOP_K)
    mask = verifier >= verifier.max() - noise  # what the check counts as the best
    if worst:
        provider = verifier + np.where(mask, 0.5, -0.5) * noise
    else:
        provider = verifier + rng.uniform(-0.5, 0.5, n) * noise * noise_share
    x = provider.astype(np.float32)
    picker = TokenPicker(Sampling(temperature=temperature, top_p=top_p), n, 0)
    recorder = _Probabilities()
    picker.rng = recorder  # type: ignore[assignment]
    picker._draw(x)
    ids = np.asarray(_engine_candidates(x, top_p))
    probs = np.asarray(recorder.p, dtype=np.float64)
    assert ids.size == probs.size
    chance = float(probs[mask[ids]].sum())
    assert 0.0 < bound <= 1.0
    # The engine draws in float32: its chances carry float32 rounding (exp of logits ÷ temperature up
    # to ~30: a few 1e-6 relative), which no bound computed in float64 from the rows has to cover.
    assert chance <= bound * (1 + 1e-5) + 1e-6


def _honest_cases() -> list[tuple[int, float, float, float]]:
    """(seed, temperature, scale, noise): 40 drawn over the whole range, and 40 where the bound leans
    most on the noise's direction (cool temperatures, noise near its largest): counting the other
    candidates the noise MORE likely there fails about half of these honest replies."""
    rng = np.random.default_rng(20261207)
    cases = [(i, rng.uniform(0.1, 1.5), rng.uniform(0.3, 6.0), rng.uniform(0.0, 0.5)) for i in range(40)]
    cases += [(40 + i, rng.uniform(0.1, 0.5), rng.uniform(1.0, 4.0), rng.uniform(0.3, 0.5)) for i in range(40)]
    return cases


def test_honest_draws_at_the_declared_temperature_are_not_flagged() -> None:
    """A 200-position reply drawn by the engine's own sampling at the declared temperature, from rows
    of random sharpness, its provider's rows off the verifier's by up to the noise: never too greedy.
    Fixed cases (:func:`_honest_cases`), so it fails every run when the noise is allowed for in the
    wrong direction, not only when a random draw happens on the cases that show it."""
    flagged = []
    for seed, temperature, scale, noise in _honest_cases():
        rng = np.random.default_rng(seed)
        picker = TokenPicker(Sampling(temperature=temperature, top_p=0.95), 100, seed)
        bounds, took = [], []
        for _ in range(200):
            verifier = rng.normal(0.0, scale * rng.uniform(0.2, 2.0), 100)
            provider = (verifier + rng.uniform(-0.5, 0.5, 100) * noise).astype(np.float32)
            token = picker._draw(provider)
            bounds.append(greedy_bound(_top(verifier), temperature, 0.95, noise))
            took.append(bool(verifier[token] >= verifier.max() - noise))
        if too_greedy(bounds, took):
            flagged.append((seed, round(temperature, 2), round(scale, 2), round(noise, 2)))
    assert flagged == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=0, max_size=300), st.integers(0, 2**32 - 1))
def test_more_positions_taking_the_best_never_make_a_reply_look_more_honest(bounds: list[float], seed: int) -> None:
    import random

    rng = random.Random(seed)
    took = [rng.random() < 0.5 for _ in bounds]
    tail = greedy_tail(bounds, took)
    assert 0.0 <= tail <= 1.0
    for i in range(len(bounds)):
        if not took[i]:
            more = [*took[:i], True, *took[i + 1 :]]
            assert greedy_tail(bounds, more) <= tail + 1e-12
    # A position with nothing else to take (bound 1) that took the best changes nothing.
    assert math.isclose(greedy_tail([*bounds, 1.0], [*took, True]), tail, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.99, 1.0), max_size=1000), st.integers(0, 2**32 - 1))
def test_near_deterministic_or_short_replies_are_never_flagged(bounds: list[float], seed: int) -> None:
    import random

    rng = random.Random(seed)
    # Positions where sampling almost surely takes the best carry no evidence, however many.
    assert not too_greedy(bounds, [True] * len(bounds))
    # A short reply cannot be too greedy, whatever its positions' bounds: 10 positions at most.
    short = [rng.uniform(0.05, 1.0) for _ in range(rng.randrange(0, 5))]
    assert not too_greedy(short, [True] * len(short))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.01, 0.8), min_size=70, max_size=300), st.data())
def test_an_all_greedy_reply_over_real_alternatives_is_flagged(bounds: list[float], data: st.DataObject) -> None:
    """70 positions where honest sampling takes the best at most 80 % of the time, each taken: flagged.
    A few positions off the best (a cooler temperature than declared, not quite greedy) still are."""
    assert too_greedy(bounds, [True] * len(bounds))
    off = data.draw(st.sets(st.integers(0, len(bounds) - 1), max_size=3))
    longer = [*bounds, *bounds, *bounds]
    took = [i not in off for i in range(len(longer))]
    assert too_greedy(longer, took)


def test_honest_sampling_at_the_bounds_exceeds_the_tail_no_more_often_than_it_says() -> None:
    """The tail is a valid bound: with each position's chance exactly its bound (the worst case an
    honest provider can be), replies whose tail is below α come at most α of the time (4,000 seeded
    replies of 60 positions of random bounds, each position's bound drawn from the reply so far)."""
    rng = np.random.default_rng(3)
    tails = []
    for _ in range(4000):
        bounds: list[float] = []
        took: list[bool] = []
        for _ in range(60):
            # The next position's distribution depends on what was taken so far (as a reply's does).
            b = float(rng.uniform(0.3, 1.0)) if (not took or took[-1]) else float(rng.uniform(0.05, 0.6))
            bounds.append(b)
            took.append(bool(rng.random() < b))
        tails.append(greedy_tail(bounds, took))
    array = np.array(tails)
    for alpha in (0.01, 0.05, 0.2):
        assert (array < alpha).mean() <= alpha
    assert TOO_GREEDY_BOUND <= 1e-6


def test_the_bound_of_a_row_without_real_alternatives_is_one() -> None:
    peaked = _top(np.array([10.0, -5.0, -6.0, -7.0]))
    assert greedy_bound(peaked, 0.8, 0.95, 0.25, whole_row=True) == 1.0  # every other one under min_p
    flat = _top(np.zeros(100))
    assert greedy_bound(flat, 0.8, 0.95, 0.25) == 1.0  # every token ties with the best
    two = _top(np.array([0.0, -0.5, -20.0]))
    bound = greedy_bound(two, 1.0, 1.0, 0.0, whole_row=True)
    assert math.isclose(bound, 1 / (1 + math.exp(-0.5)), rel_tol=1e-6)  # exactly the chance, no noise
    assert greedy_bound(two, 1.0, 1.0, 0.3, whole_row=True) > bound  # the noise only raises it


# --- the real model ---


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("greedy") / "served.gguf", seed=0)


async def _generate(path: Path, temperature: float, seed: int, max_tokens: int) -> tuple[list[int], list, list[int]]:
    model = LlamaModel(path, name="tiny", n_ctx=512, n_threads=1)
    await model.load()
    try:
        prompt = await model.tokenize(PROMPT, add_bos=True)
        sampling = Sampling(temperature=temperature, logprobs=True, top_logprobs=4)
        async with model.stream_generate(prompt=prompt, max_tokens=max_tokens, sampling=sampling, seed=seed) as stream:
            chunks = [chunk async for chunk in stream]
    finally:
        await model.aclose()
    positions = positions_from_chunks(chunks, TokenIndex(path))
    return prompt, positions, [p.token for p in positions]


async def test_a_reply_served_greedily_at_a_declared_temperature_of_0_8_fails_too_greedy(served: Path) -> None:
    """The tiny model's distributions are peaked (honest sampling at 0.8 takes the best token at about
    85 % of positions), so the reply is 200 tokens: a greedy one is flagged through the spot-check a
    consumer and an arbiter run, and is disputable; honest ones at 0.8 pass; at 40 tokens (a reply no
    longer than a sampled check) the same greedy reply carries too little evidence and passes."""
    from libp2p import generate_new_ed25519_identity

    from protocols.machines.verify import CheckFacts, check_verdict
    from runtime.verify.commitment import commit
    from runtime.verify.evidence import CommitmentBody, sign_commitment
    from runtime.verify.identity import file_sha256
    from runtime.verify.spot import check_call
    from wire.peer_keys import ed25519_public_key, receipt_key

    key = receipt_key(generate_new_ed25519_identity().private_key)
    verifier = Prefill(served, n_ctx=512, n_threads=2)
    tolerances = (0.25, 0.03)  # the tiny model's measured tolerances (its noise is below the floors)

    def checked(prompt: list[int], positions: list, tokens: list[int], declared: float, sample: int) -> tuple:
        sent = commit(positions)
        body = CommitmentBody(
            lease_id="lease-1",
            call_id="call-1",
            provider=key.peer_id,
            model_sha256=file_sha256(served),
            temperature_milli=round(declared * 1000),
            top_p_milli=950,
            prompt_tokens=len(prompt),
            completion_tokens=len(tokens),
            root=sent.root.hex(),
        )
        openings = [sent.open(i) for i in range(len(sent.chunks))]
        spot = check_call(
            verifier,
            prompt,
            tokens,
            sign_commitment(body, key),
            openings,
            ed25519_public_key,
            tolerances,
            sample=sample,
        )
        assert spot.findings is not None
        facts = CheckFacts(True, True, True, True, findings_reason=spot.findings.reason())
        return check_verdict(facts), spot.findings

    try:
        prompt, positions, tokens = await _generate(served, 0.0, 7, 200)
        assert len(tokens) == 200
        # Served greedily, declared 0.8: every position is the model's best, nothing else is off. Not
        # disputed: the consumer's word (an arbiter never sees whether the request named a seed).
        verdict, found = await trio.to_thread.run_sync(checked, prompt, positions, tokens, 0.8, 0)
        assert (verdict.outcome, verdict.reason, verdict.dispute) == ("failed", "too_greedy", False)
        assert found.greedy == 200 and found.greedy_tail < TOO_GREEDY_BOUND
        assert not (found.logprob or found.top or found.not_sampled or found.logprob_mean)
        # Declared 0 it is exactly what it says.
        verdict, _ = await trio.to_thread.run_sync(checked, prompt, positions, tokens, 0.0, 0)
        assert verdict.outcome == "passed"
        # A sampled check counts only the positions it compares: 40 of them carry too little evidence.
        verdict, found = await trio.to_thread.run_sync(checked, prompt, positions, tokens, 0.8, 32)
        assert verdict.outcome == "passed" and found.positions == found.greedy == 40
        # Honestly sampled at 0.8: passes, though most positions take the best.
        for seed in range(4):
            prompt, positions, tokens = await _generate(served, 0.8, seed, 200)
            verdict, found = await trio.to_thread.run_sync(checked, prompt, positions, tokens, 0.8, 0)
            assert verdict.outcome == "passed", found
            assert found.greedy > 100 and found.greedy_tail == 1.0
    finally:
        verifier.close()
