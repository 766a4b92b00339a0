"""Verified inference (issue 21): ``not_sampled`` above temperature 0 fails a token only when no provider
row within the noise could have let the engine's sampling (top 40, ``top_p``, ``min_p``) keep it.

An honest gemma3-270m reply (bench/verify.py, 200 tokens at 0.8, provider on 1 thread, the ubatch-7
verifier) was failed at its position 152: the provider's best token had 0.946 of the top 40's mass, so
``top_p`` 0.95 kept the second one, which it drew; the verifier's rows gave the best 0.958, and the
``top_p`` bound allowed no noise for a token so far (3.1 nats) below the best."""

from __future__ import annotations

import numpy as np

from runtime.inference.sampling import Sampling, TokenPicker
from runtime.verify.check import (
    FLOOR_MAX,
    NOISE_FACTOR_MAX,
    SAMPLING_MIN_P,
    SAMPLING_TOP_K,
    TIE_FACTOR,
    TIE_NOISE_FACTOR,
    Scores,
    _could_sample,
    compare,
)
from runtime.verify.commitment import Opened

# gemma3-270m Q4_K_M's tolerances as measured (per entry, mean), and the tie compare derives from them.
TOLERANCE, MEAN_TOLERANCE = 3.0763, 0.2856
TIE = min(TOLERANCE, max(FLOOR_MAX, TIE_FACTOR * MEAN_TOLERANCE, TIE_NOISE_FACTOR * TOLERANCE / NOISE_FACTOR_MAX))

# The verifier's 40 best log-probabilities at the failed position, best first (token 4086, then the
# produced 6745).
VERIFIER_TOP = np.array(
    [
        -0.0432472, -3.1666222, -10.7902069, -10.8368435, -11.1197891, -11.3803049, -11.5584412, -11.5704117,
        -11.7347660, -11.8114052, -11.9776020, -12.0484085, -12.0718899, -12.4667225, -12.4791222, -12.7740211,
        -12.8184280, -12.9511471, -13.1482525, -13.1932220, -13.1987801, -13.3661804, -13.4690933, -13.7032013,
        -13.8594456, -13.8752174, -13.9023228, -14.0177174, -14.0652771, -14.0815162, -14.1066856, -14.1282425,
        -14.1818352, -14.1966763, -14.2074013, -14.2468014, -14.2581997, -14.4434052, -14.4584961, -14.4924526,
    ]
)  # fmt: skip
BEST_ID, PRODUCED = 4086, 6745
# The provider's committed top 4 there (id, logprob as committed: sixteenths of a nat).
COMMITTED = ((4086, -0.0625), (6745, -2.9375), (981, -10.5), (2528, -10.75))
NAMED = {4086: -0.0432472, 6745: -3.1666222, 2528: -10.7902069, 981: -10.8368435}


def _position() -> tuple[Scores, Opened]:
    scores = Scores(
        n_vocab=262144, named=[dict(NAMED)], best_ids=[BEST_ID], best=[float(VERIFIER_TOP[0])], top=VERIFIER_TOP[None]
    )
    opened = Opened(ids=tuple(i for i, _ in COMMITTED), logprobs=tuple(lp for _, lp in COMMITTED), clipped=(False,) * 4)
    return scores, opened


def test_the_honest_gemma_token_kept_by_top_p_is_not_failed() -> None:
    """The position as the check saw it: the provider's own top 4 say top_p 0.95 keeps the token (the best
    has under 0.95 of the mass), the verifier's say it does not; within the noise that is no finding."""
    committed_share = np.exp(COMMITTED[0][1]) / np.exp([lp for _, lp in COMMITTED]).sum()
    verifier_share = np.exp(VERIFIER_TOP[0]) / np.exp(VERIFIER_TOP).sum()
    assert committed_share < 0.95 < verifier_share
    scores, opened = _position()
    found = compare(
        scores, [PRODUCED], [opened], temperature=0.8, top_p=0.95, tolerance=TOLERANCE, mean_tolerance=MEAN_TOLERANCE
    )
    assert found.not_sampled == 0
    assert not found.failed


def test_a_token_no_row_within_the_noise_keeps_still_fails() -> None:
    """The same row: under a declared top_p of 0.5 the best token alone (0.958 of the mass, 0.78 even made
    the tie less likely) is past top_p, so the second is outside the engine's candidates however the noise
    falls; a token under min_p by more than the tie, or ranked past the 40th by more than it, fails too."""
    mine, best = float(VERIFIER_TOP[1]), float(VERIFIER_TOP[0])
    assert _could_sample(mine, best, VERIFIER_TOP, 0.8, 0.95, TIE)
    assert not _could_sample(mine, best, VERIFIER_TOP, 0.8, 0.5, TIE)
    assert not _could_sample(best + np.log(SAMPLING_MIN_P) - TIE - 0.01, best, VERIFIER_TOP, 0.8, 0.95, TIE)
    assert not _could_sample(float(VERIFIER_TOP[-1]) - TIE - 0.01, best, VERIFIER_TOP, 0.8, 1.0, TIE)
    # A flat row where the tokens far above the produced one hold nearly all the mass: past top_p 0.95
    # even with those made the tie less likely.
    flat = np.concatenate(([0.0] * 30, [-4.0], [-30.0] * 9)) - 3.4
    assert not _could_sample(float(flat[30]), float(flat[0]), flat, 0.8, 0.95, TIE)


def _candidates(x: np.ndarray, top_p: float) -> np.ndarray:
    """The ids TokenPicker._draw keeps (its own steps)."""
    x = np.asarray(x, dtype=np.float32)
    k = min(SAMPLING_TOP_K, x.size)
    ids = np.argpartition(-x, k - 1)[:k]
    ids = ids[np.argsort(-x[ids], kind="stable")]
    probs = np.exp(x[ids] - x[ids][0])
    probs /= probs.sum()
    keep = max(1, min(int(np.searchsorted(np.cumsum(probs), top_p) + 1), ids.size))
    ids, probs = ids[:keep], probs[:keep]
    return ids[probs >= SAMPLING_MIN_P * probs[0]]


class _Recorder:
    """Stands in for a TokenPicker's generator: records how many candidates the draw was among."""

    def __init__(self) -> None:
        self.n = 0

    def choice(self, n: int, p: np.ndarray) -> int:
        self.n = n
        return 0


def test_every_token_the_engine_keeps_within_the_noise_passes() -> None:
    """Rows of random sharpness (a dominant best token half the time, as at the failed position), the
    provider's row off the verifier's by at most the tie between any two entries (each entry by at most
    half of it): at random, or (every other row) as unkind as may be to one of the verifier's 40 best,
    the tokens more than the tie above it made less likely and the rest more. Every token the engine's
    own sampling keeps from the provider's row passes the check on the verifier's."""
    rng = np.random.default_rng(20261207)
    failed = []
    for case in range(400):
        n = int(rng.integers(45, 400))
        verifier = rng.normal(0.0, rng.uniform(0.3, 4.0), n)
        if case % 4 < 2:
            verifier[int(rng.integers(n))] += rng.uniform(2.0, 8.0)
        logprobs = verifier - (verifier.max() + np.log(np.exp(verifier - verifier.max()).sum()))
        order = np.argsort(-logprobs)
        top = logprobs[order[:SAMPLING_TOP_K]]
        top_p = float(rng.choice([0.5, 0.8, 0.9, 0.95, 1.0]))
        if case % 2:
            target = logprobs[order[int(rng.integers(1, SAMPLING_TOP_K))]]
            shift = np.where(logprobs > target + TIE, -0.5, 0.5) * TIE
        else:
            shift = rng.uniform(-0.5, 0.5, n) * TIE
        provider = (logprobs + shift).astype(np.float32)
        picker = TokenPicker(Sampling(temperature=0.8, top_p=top_p), n, 0)
        recorder = _Recorder()
        picker.rng = recorder  # type: ignore[assignment]
        picker._draw(provider)
        kept = _candidates(provider, top_p)
        assert recorder.n == kept.size  # the same steps as the engine's
        for token in kept.tolist():
            if not _could_sample(float(logprobs[token]), float(top[0]), top, 0.8, top_p, TIE):
                failed.append((case, token))
    assert failed == []
