"""Verification: one prefill pass of the same GGUF over prompt + completion, compared with openings.

:class:`Prefill` loads a model once (blocking: a worker thread's job) and evaluates a prompt and the
produced token ids in one ``llama_decode``, asking llama.cpp for logits at the produced positions
only (a whole vocabulary row per prompt token would cost as much as the model for small models with
large vocabularies). :meth:`Prefill.scores` reads those rows where llama.cpp left them, a block of
rows at a time, and keeps per position only what :func:`compare` needs (:class:`Scores`): no copy
of the positions × vocabulary matrix, no float64 one (for gemma's 262k vocabulary and a 200-token
reply that matrix is 210 MB, and its float64 log-softmax took longer than the prefill).

:func:`compare` puts the openings of a commitment beside those rows and counts what an honest
provider never shows, within ``tolerance`` nats (calibrated by bench/verify.py on other thread
counts and batch sizes):

- ``logprob``: a committed logprob differs from the verifier's for the same token (another model,
  another quantisation, another prompt);
- ``top``: a token the verifier ranks above the committed ones is missing from them;
- ``not_sampled``: the produced token could not come out of the declared sampling: at temperature 0
  it is not the most likely token; above 0 it is outside the engine's candidates (the 40 most
  likely, then those within ``top_p``, then those at least ``min_p`` as likely as the best);
- ``too_greedy`` (a declared temperature above 0 only): the reply takes the verifier's most likely
  token at more of the compared positions than honest sampling at that temperature plausibly does
  (:func:`greedy_bound` per position, :func:`greedy_tail` over the reply: a reply served greedily, or
  at a much lower temperature, than it declares).

A spot-check compares a sample of a reply's positions (:func:`check_positions`), not every one: the
output head (a row per vocabulary entry: 49k for SmolLM2, 262k for gemma) costs about as much as the
rest of the model per position on a CPU, and llama.cpp runs it only where a logits row is asked for.
The sample is drawn by the verifier after the provider signed its commitment, so the provider cannot
know which positions are compared; it always holds the reply's first positions (a truncated prompt
shows most there) and every position whose committed top-k already contradicts the declared
sampling (the produced token missing from it, or not its best at temperature 0).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import math
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.verify.commitment import Opened

if TYPE_CHECKING:  # numpy loads with the first check, not at the node's start
    import numpy as np

# Nats. Defaults for a model whose noise was not measured; Prefill.tolerances() measures a loaded model's.
TOLERANCE = 1.0  # any one committed logprob
MEAN_TOLERANCE = 0.15  # the mean over every committed logprob of a reply
NOISE_FACTOR_MAX = 5.0  # tolerance = factor × the noise measured between batch and token-by-token passes
NOISE_FACTOR_MEAN = 3.0
FLOOR_MAX = 0.25
TIE_FACTOR = 2.5
TIE_NOISE_FACTOR = 3.0
FLOOR_MEAN = 0.03
SAMPLING_TOP_K = 40  # runtime.inference.sampling's TOP_K and MIN_P: the engine's candidate set
SAMPLING_MIN_P = 0.05
MAX_POSITIONS = 4096
# A spot-check compares the reply's first ALWAYS_FIRST positions, every position the commitment itself
# flags (:func:`flagged`) and SAMPLED_POSITIONS more drawn at random; a reply no longer than that
# is compared everywhere. Chosen by bench/verify.py (docs/verified-inference.md, "Sampled positions").
SAMPLED_POSITIONS = 32
ALWAYS_FIRST = 8
# ``too_greedy``: a reply is flagged when the chance that honest sampling at the declared temperature
# takes the verifier's most likely token at least as often as the reply does is bounded below this
# (:func:`greedy_tail`). The bound holds for every honest reply to an unseeded request whatever the
# model's distributions (it is a test supermartingale's; where the noise stays within what compare
# assumes for it), so at most one honest unseeded check in a million is failed by it: a consumer
# checking 2 % of a provider's calls reaches that after 50 million calls; and a failure ends a lease.
# A request that names a ``seed`` fixes the draws, so its consumer could pick one that makes an honest
# reply all greedy: the consumer does not apply the rule to such a request, and the failure is disputed
# only where the provider signed that the request named none (a v3 body's ``seeded: false``), the one
# case the arbiter applies it to (``protocols.machines.verify.greedy_disputable``).
TOO_GREEDY_BOUND = 1e-6
# The Chernoff exponents mixed (equal weights) in :func:`greedy_tail`; inf: the likelihood ratio of an
# all-greedy reply (1 / the product of the bounds; 0 once a compared position is not the best). The
# mixture costs log(5) = 1.6 nats against the best single exponent chosen after the fact.
TOO_GREEDY_EXPONENTS = (1.0, 2.0, 4.0, 8.0, math.inf)


@dataclass
class Findings:
    """What :func:`compare` saw; ``failed`` when anything an honest provider never shows was seen."""

    positions: int = 0
    logprob: int = 0
    top: int = 0
    not_sampled: int = 0
    max_logprob_diff: float = 0.0
    mean_logprob_diff: float = 0.0
    logprob_mean: int = 0  # 1 when the mean difference over every compared entry is beyond its tolerance
    first_bad: int | None = None  # index of the first failing position (in the whole reply)
    notes: list[str] = field(default_factory=list)
    reply_positions: int = 0  # the reply's length: ``positions`` of them were compared
    greedy: int = 0  # compared positions whose token is the verifier's most likely (within the noise)
    greedy_tail: float = 1.0  # :func:`greedy_tail` of the compared positions (1 at temperature 0)
    too_greedy: int = 0  # 1 when greedy_tail is below TOO_GREEDY_BOUND

    @property
    def failed(self) -> bool:
        return bool(self.logprob or self.top or self.not_sampled or self.logprob_mean or self.too_greedy)

    def reason(self) -> str:
        for name in ("not_sampled", "logprob", "logprob_mean", "top", "too_greedy"):
            if getattr(self, name):
                return name
        return ""


BLOCK_VALUES = 1 << 22  # rows are scored this many values at a time (16 MB of float32 temporaries)


def log_softmax(rows: np.ndarray) -> np.ndarray:
    """The log-softmax of each row, as float32 (a new array; computed a block of rows at a time)."""
    import numpy as np

    out = np.array(rows, dtype=np.float32, copy=True)
    step = max(1, BLOCK_VALUES // max(1, out.shape[1]))
    for start in range(0, out.shape[0], step):
        block = out[start : start + step]
        block -= _normalisers(block)[:, None].astype(np.float32)
    return out


def _normalisers(block: np.ndarray, top: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
    """log Σ exp over each row of ``block`` (float64 per row; the exponentials in float32). ``top``:
    each row's maximum when already known; ``scratch``: a float32 array at least as large as ``block``
    for the exponentials (none allocated then)."""
    import numpy as np

    top = block.max(axis=1) if top is None else top
    shifted = np.subtract(block, top[:, None], out=None if scratch is None else scratch[: block.shape[0]])
    sums = np.exp(shifted, out=shifted).sum(axis=1, dtype=np.float64)
    return top.astype(np.float64) + np.log(sums)


# The k best values of a row are found among the values within this many logits of its best, when at
# least k are (widened up to TOP_WIDTHS' last, then the whole row): an exact prefilter that spares
# partitioning the whole vocabulary (262k values for gemma: most of a 40-position check's scoring).
TOP_WIDTHS = (16.0, 64.0)


def _best_values(row: np.ndarray, best: float, k: int) -> np.ndarray:
    """The ``k`` largest values of ``row`` (float32, any order), ``best`` being its largest. Exact:
    if at least k values are at least a threshold, the k-th largest is too, so all k are among them."""
    import numpy as np

    for width in TOP_WIDTHS:
        near = row[row >= best - width]
        if near.shape[0] >= k:
            return np.partition(near, near.shape[0] - k)[near.shape[0] - k :]
    return np.partition(row, row.shape[0] - k)[row.shape[0] - k :]


@dataclass(frozen=True)
class Scores:
    """The verifier's log-probabilities at each produced position, as much of them as :func:`compare`
    needs: the values of the ids it names (the committed ids and the produced token), the most likely
    id and its value, and (for a declared temperature above 0) the ``SAMPLING_TOP_K`` best values."""

    n_vocab: int
    named: list[dict[int, float]]
    best_ids: list[int]
    best: list[float]
    top: np.ndarray | None  # positions × min(SAMPLING_TOP_K, n_vocab), best first; None when not asked


def wanted_ids(tokens: Sequence[int], opened: Sequence[Opened]) -> list[list[int]]:
    """Per position, the ids :func:`compare` looks up: the committed ones and the produced token."""
    return [[*position.ids, token] for token, position in zip(tokens, opened, strict=True)]


def flagged(token: int, position: Opened, temperature: float) -> bool:
    """Whether the provider's own commitment at a position contradicts the declared sampling: the
    produced token is missing from the committed top-k, or (temperature 0) below the committed best,
    or (above 0) less than ``SAMPLING_MIN_P`` as likely as it. An honest provider's never does
    (its produced token is its own best at temperature 0), so such a position is always compared:
    either the commitment is true there and the token was not sampled as declared, or it is false."""
    if token not in position.ids:
        return True
    mine = position.logprobs[position.ids.index(token)]
    best = max(position.logprobs)
    if temperature <= 0:
        return mine < best
    return mine < best + math.log(SAMPLING_MIN_P) - 1.0  # 1 nat of slack for the commitment's rounding


def check_positions(
    tokens: Sequence[int],
    opened: Sequence[Opened],
    temperature: float,
    *,
    sample: int = SAMPLED_POSITIONS,
    first: int = ALWAYS_FIRST,
    rng: random.Random | None = None,
) -> list[int]:
    """The reply positions a spot-check compares, ascending: the first ``first``, every
    :func:`flagged` one, and ``sample`` more drawn at random (``rng``: the verifier's own randomness,
    a ``SystemRandom`` unless given: drawn after the provider signed, so it cannot aim a cheat at the
    positions left out). ``sample`` 0, or a reply no longer than ``first + sample``: every position."""
    n = len(tokens)
    if sample <= 0 or n <= first + sample:
        return list(range(n))
    chosen = set(range(first))
    pairs = enumerate(zip(tokens, opened, strict=True))
    chosen.update(i for i, (token, position) in pairs if flagged(token, position, temperature))
    rest = [i for i in range(n) if i not in chosen]
    chosen.update((rng or random.SystemRandom()).sample(rest, min(sample, len(rest))))
    return sorted(chosen)


def score(logits: np.ndarray, wanted: Sequence[Sequence[int]], *, with_top: bool) -> Scores:
    """:class:`Scores` of ``logits`` (positions × vocabulary; raw logits or log-probabilities), read a
    block of rows at a time: never a copy of the whole matrix."""
    import numpy as np

    positions, n_vocab = logits.shape
    k = min(SAMPLING_TOP_K, n_vocab)
    named: list[dict[int, float]] = []
    best_ids: list[int] = []
    best: list[float] = []
    top = np.empty((positions, k), dtype=np.float64) if with_top else None
    step = max(1, BLOCK_VALUES // max(1, n_vocab))
    scratch = np.empty((min(step, positions), n_vocab), dtype=np.float32)
    for start in range(0, positions, step):
        block = logits[start : start + step]
        ids = block.argmax(axis=1)
        maxima = block[np.arange(block.shape[0]), ids]
        norm = _normalisers(block, maxima, scratch)
        for j in range(block.shape[0]):
            row = block[j]
            named.append({t: float(row[t]) - norm[j] for t in wanted[start + j] if 0 <= t < n_vocab})
            best_ids.append(int(ids[j]))
            best.append(float(row[ids[j]]) - norm[j])
            if top is not None:
                part = _best_values(row, float(maxima[j]), k) if k < n_vocab else row
                top[start + j] = -np.sort(-part.astype(np.float64)) - norm[j]
    return Scores(n_vocab, named, best_ids, best, top)


def compare(
    rows: np.ndarray | Scores,
    tokens: Sequence[int],
    opened: Sequence[Opened],
    *,
    temperature: float,
    top_p: float = 0.95,
    tolerance: float = TOLERANCE,
    mean_tolerance: float = MEAN_TOLERANCE,
    scale: int = 16,
    at: Sequence[int] | None = None,
) -> Findings:
    """Compare the verifier's log-probabilities at each produced position (``rows``: a log-softmax
    row per position, or their :class:`Scores`) with the provider's openings of the same positions
    and the produced ``tokens``. ``at``: the reply positions ``rows`` stand for, ascending (a
    :func:`check_positions` sample); None: every position."""
    reply = len(tokens)
    index_of = list(range(reply)) if at is None else list(at)
    if at is not None:
        tokens, opened = [tokens[i] for i in index_of], [opened[i] for i in index_of]
    if not isinstance(rows, Scores):
        rows = score(rows, wanted_ids(tokens, opened), with_top=temperature > 0)
    found = Findings(reply_positions=reply)
    slack = tolerance + 0.5 / scale  # the commitment's rounding on top of the tolerance
    # How far below the best token a produced one may be and still count as tied with it (or at a
    # sampling bound): the per-entry tolerance bounds the worst single logprob, while a tie compares two
    # logprobs of one row, whose difference an honest provider gets much closer; 2.5 × the mean tolerance
    # (7.5 × the mean noise), at least the per-entry floor.
    # And at least three times the largest single-entry noise the tolerance was measured from (a tie is a
    # difference of two entries): a native-build provider's greedy token at a near-tie of a 200-token
    # SmolLM2 reply was 0.57 nats below the portable verifier's best (bench/verify.py --native-python).
    # Three times since the noise is measured over 256 positions: an honest 200-token gemma reply's greedy
    # token was 1.37 nats below a verifier's best where twice the measured noise gave 1.23.
    tie = min(tolerance, max(FLOOR_MAX, TIE_FACTOR * mean_tolerance, TIE_NOISE_FACTOR * tolerance / NOISE_FACTOR_MAX))
    # too_greedy: the noise assumed between two entries of a row at every position: the mean tolerance
    # (3 × the mean single-entry noise measured; SmolLM2's 0.23 nats is about the 90th percentile of
    # the gap noise between an honest provider's top 4 and a verifier's). Not the tie: a tie of 1.5
    # nats or more (SmolLM2's 1.55, gemma's 1.85) puts every other candidate either within it of the
    # best or, made that much less likely, under min_p, so the bound is 1 everywhere and nothing is
    # ever flagged. A position whose noise exceeds it is counted up to exp(excess / temperature) times
    # too unlikely to take the best; it fails no reply on its own, and honest replies at 0.2 to 0.8
    # stayed at a tail above 0.9 even with no noise allowed at all (docs/verified-inference.md).
    noise = mean_tolerance
    diffs: list[float] = []
    bounds: list[float] = []  # greedy_bound and whether the token took the best, per compared position
    took: list[bool] = []
    for index, (token, position) in enumerate(zip(tokens, opened, strict=True)):
        found.positions += 1
        bad = False
        named = rows.named[index]
        committed = {}
        for token_id, logprob, clipped in zip(position.ids, position.logprobs, position.clipped, strict=True):
            if token_id not in named:  # outside the vocabulary
                found.logprob += 1
                bad = True
                continue
            mine = named[token_id]
            diff = max(0.0, mine - logprob) if clipped else abs(mine - logprob)
            diffs.append(diff)
            found.max_logprob_diff = max(found.max_logprob_diff, diff)
            if diff > slack:
                found.logprob += 1
                bad = True
            committed[token_id] = logprob
        # The verifier's best token must be among the committed ones unless it ties with the last one.
        best, best_id = rows.best[index], rows.best_ids[index]
        if committed and best_id not in committed and best > min(committed.values()) + slack:
            found.top += 1
            bad = True
        top = rows.top[index] if rows.top is not None else None
        if token not in named or not _could_sample(named[token], best, top, temperature, top_p, tie):
            found.not_sampled += 1
            bad = True
        if bad and found.first_bad is None:
            found.first_bad = index_of[index]
        if temperature > 0 and top is not None:
            took_best = token in named and named[token] >= best - noise
            found.greedy += took_best
            bounds.append(greedy_bound(top, temperature, top_p, noise, whole_row=rows.n_vocab <= len(top)))
            took.append(took_best)
    found.mean_logprob_diff = sum(diffs) / len(diffs) if diffs else 0.0
    if found.mean_logprob_diff > mean_tolerance + 0.25 / scale:
        found.logprob_mean = 1
    found.greedy_tail = greedy_tail(bounds, took)
    found.too_greedy = int(too_greedy(bounds, took))
    return found


def greedy_bound(top: np.ndarray, temperature: float, top_p: float, noise: float, *, whole_row: bool = False) -> float:
    """An upper bound on the chance that the engine's sampling (runtime.inference.sampling: the
    ``SAMPLING_TOP_K`` most likely tokens, then ``top_p``, then ``SAMPLING_MIN_P``, then one drawn at
    ``temperature``) takes a token within ``noise`` of the most likely one, when the provider's
    log-probabilities differ from the verifier's ``top`` (the row's best values, best first) by at most
    ``noise`` between any two entries (the batch-vs-stepwise noise).

    The tokens within ``noise`` of the best (those a produced token counts as "the best" among) are
    weighed as they are; every other token by ``exp((value - noise) / temperature)``, and only if it
    surely survives the truncations whatever that noise: above the k-th value by more than ``noise``
    (``whole_row``: the row has no more than ``top``'s entries, every one is a candidate), at least
    ``min_p`` as likely as the best by a ``noise`` more, and with the tokens that could rank above it
    (at most ``noise`` below it, or higher), made ``noise`` more likely, short of ``top_p``. Fewer and
    less likely alternatives only raise the bound."""
    import numpy as np

    values = np.asarray(top, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 1.0
    v = values - values[0]
    near = v >= -noise
    if near.all():
        return 1.0
    kept = ~near
    if not whole_row:
        kept &= v > v[-1] + noise
    kept &= v - noise >= math.log(SAMPLING_MIN_P)
    # top_p: v is sorted, so the tokens at least v_j - noise are a prefix; j itself left out of it.
    weights = np.exp(v)
    prefix = np.concatenate(([0.0], np.cumsum(weights)))
    ends = np.searchsorted(-v, -(v - noise), side="right")  # how many values are >= v_j - noise
    above = prefix[ends] - weights
    raised = above * math.exp(noise)
    kept &= raised / (raised + prefix[-1] - above) < top_p - 1e-6
    best = float(np.exp(v[near] / temperature).sum())
    others = float(np.exp((v[kept] - noise) / temperature).sum())
    return best / (best + others)


def greedy_tail(bounds: Sequence[float], took_best: Sequence[bool]) -> float:
    """A bound on the chance that honest sampling takes the best token at least as often as a reply
    did: ``bounds`` are the compared positions' :func:`greedy_bound` (each an upper bound on that
    chance at its position, given the reply before it), ``took_best`` whether the reply took it there.

    Pure: numbers in, a number in [0, 1] out. It is 1 / the mean over :data:`TOO_GREEDY_EXPONENTS` λ of
    ``exp(λ·count) / Π (1 − b + b·e^λ)`` (λ = inf: ``Π 1/b`` when every position took the best, else 0).
    Each of those is a nonnegative supermartingale under honest sampling (every factor's expectation
    given the reply so far is at most 1 when the chance is at most b), so their mean exceeds 1/α with
    probability at most α (Ville's inequality) however each position's distribution depends on the
    tokens before it; and which positions are compared is drawn apart from the tokens. For fixed bounds
    each term is also a Chernoff bound on the Poisson-binomial tail, which this is therefore never
    below. A position with b = 1 that took the best changes nothing; one that did not takes weight off."""
    logs: list[float] = []
    for exponent in TOO_GREEDY_EXPONENTS:
        total = 0.0
        for bound, took in zip(bounds, took_best, strict=True):
            b = min(1.0, max(0.0, float(bound)))
            if math.isinf(exponent):
                if not took or b <= 0.0:
                    total = -math.inf
                    break
                total -= math.log(b)
            else:
                total += exponent * took - math.log1p(b * math.expm1(exponent))
        logs.append(total)
    top = max(logs)
    if top == -math.inf:
        return 1.0
    mean = top + math.log(sum(math.exp(x - top) for x in logs)) - math.log(len(logs))
    return 1.0 if mean <= 0 else math.exp(-mean)


def too_greedy(bounds: Sequence[float], took_best: Sequence[bool], bound: float = TOO_GREEDY_BOUND) -> bool:
    """Whether a reply takes the best token too often for its declared temperature: :func:`greedy_tail`
    below ``bound`` (:data:`TOO_GREEDY_BOUND`, the rule's false-positive rate at most)."""
    return greedy_tail(bounds, took_best) < bound


def _could_sample(
    mine: float, best: float, top: np.ndarray | None, temperature: float, top_p: float, tolerance: float
) -> bool:
    """Whether a token of log-probability ``mine`` could come out of the declared sampling, ``best``
    being the most likely token's and ``top`` the engine's top-40 candidates' (best first), when the
    provider's row differs from the verifier's by at most ``tolerance`` between any two entries: True for
    every token the engine keeps from some such row; False only where no such row lets it keep the token
    (past the 40th, under ``min_p`` or past ``top_p`` by more than that noise can explain)."""
    import numpy as np

    if temperature <= 0:
        return mine >= best - tolerance  # the most likely token, or one tied with it within the tolerance
    if top is None:
        raise ValueError("a temperature above 0 needs the top candidates' scores")
    # Candidates: the top 40, then top_p, then min_p; each bound widened by the tolerance (the most any
    # two entries of a row may differ between the provider's row and the verifier's).
    kth = float(top[-1])
    if mine < kth - tolerance:
        return False
    if mine < best + np.log(SAMPLING_MIN_P) - tolerance:
        return False
    # top_p: the tokens more likely than this one by more than the tolerance (ranked above it in the
    # provider's row too), made the tolerance less likely against the rest of the 40 (the provider's row
    # may weigh them so), must not already reach top_p. Unwidened, an honest gemma token the provider
    # kept at a best-token share of 0.946 failed where the verifier's share was 0.958: 0.24 nats of noise.
    weights = np.exp(top - best)
    above = float(weights[top > mine + tolerance].sum())
    lowered = above * math.exp(-tolerance)
    return bool(lowered / (lowered + float(weights.sum()) - above) < top_p + 1e-6)


class Prefill:
    """A model loaded for verification: one prefill per check, logits only where they are compared."""

    def __init__(self, path: Path, *, n_ctx: int = 2048, n_threads: int | None = None, n_ubatch: int = 512) -> None:
        import llama_cpp

        self.n_ctx = n_ctx
        self._lock = threading.Lock()
        self.llama: Any = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=min(n_ubatch, n_ctx),
            n_threads=n_threads,
            n_threads_batch=n_threads,  # the prefill is a batch: without it llama.cpp takes every core
            logits_all=False,
            verbose=False,
        )
        self.n_vocab = int(self.llama.n_vocab())

    def rows(self, prompt: Sequence[int], completion: Sequence[int]) -> np.ndarray:
        """Log-softmax rows for each completion position (blocking; a copy: :meth:`scores` is the cheap way)."""
        with self._lock:
            return log_softmax(self._logits(prompt, completion))

    def scores(
        self,
        prompt: Sequence[int],
        completion: Sequence[int],
        wanted: Sequence[Sequence[int]],
        *,
        with_top: bool,
        at: Sequence[int] | None = None,
    ) -> Scores:
        """:func:`score` of the logits at each completion position (``at``: only those, ascending;
        ``wanted`` then names ids per position of ``at``), read where llama.cpp left them (blocking)."""
        with self._lock:
            return score(self._logits(prompt, completion, at), wanted, with_top=with_top)

    def _logits(self, prompt: Sequence[int], completion: Sequence[int], at: Sequence[int] | None = None) -> np.ndarray:
        """One decode of prompt + completion with logits at the completion positions (``at``: only
        those, ascending: the output head runs only there); a view of them (positions × vocabulary)
        into llama.cpp's buffer, valid until the next decode: the caller holds the lock."""
        import llama_cpp
        import numpy as np

        total = len(prompt) + len(completion)
        if not prompt or not completion or total > self.n_ctx or len(completion) > MAX_POSITIONS:
            raise ValueError("the prompt and completion do not fit the verifier's context")
        first = len(prompt) - 1
        wanted = list(range(len(completion))) if at is None else list(at)
        if not wanted or wanted != sorted(set(wanted)) or not 0 <= wanted[0] <= wanted[-1] < len(completion):
            raise ValueError("the positions to compare are not ascending positions of the completion")
        # Tokens after the last compared position change nothing before it (causal attention): not evaluated.
        tokens = [*prompt, *completion[: wanted[-1]]]
        asked = bytearray(len(tokens))
        for j in wanted:
            asked[first + j] = 1
        ctx = self.llama._ctx
        ctx.kv_cache_clear()
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = asked[i]
            batch.n_tokens = len(tokens)
            if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
        finally:
            llama_cpp.llama_batch_free(batch)
        n = len(wanted)
        row = self.n_vocab * 4
        start = llama_cpp.llama_get_logits_ith(ctx.ctx, first + wanted[0])
        base = ctypes.addressof(start.contents)
        last = llama_cpp.llama_get_logits_ith(ctx.ctx, first + wanted[-1])
        if ctypes.addressof(last.contents) == base + (n - 1) * row:  # the rows lie in order, one after another
            return np.ctypeslib.as_array(start, shape=(n, self.n_vocab))
        out = np.empty((n, self.n_vocab), dtype=np.float32)  # otherwise copied row by row
        for j, position in enumerate(wanted):
            pointer = llama_cpp.llama_get_logits_ith(ctx.ctx, first + position)
            out[j] = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        return out

    def tolerances(self, prompt: Sequence[int], completion: Sequence[int] | int, k: int = 4) -> tuple[float, float]:
        """(per-entry, mean) tolerances from the noise between :meth:`rows` and the token-by-token pass
        over each position's ``k`` most likely tokens (blocking; once per model). ``completion``: the
        produced ids, or how many positions of the model's own greedy reply to ``prompt`` to measure
        over (how checked replies come about; end-of-generation tokens skipped so it runs that long)."""
        import numpy as np

        completion, top_ids, stepwise = self._stepwise_top(prompt, completion, k)
        with self._lock:
            logits = self._logits(prompt, completion)
            diffs = np.empty_like(stepwise)
            rows_per_block = max(1, BLOCK_VALUES // self.n_vocab)
            for start in range(0, len(completion), rows_per_block):
                block = log_softmax(logits[start : start + rows_per_block])
                ids = top_ids[start : start + rows_per_block]
                diffs[start : start + len(block)] = np.abs(
                    np.take_along_axis(block, ids, 1) - stepwise[start : start + len(block)]
                )
        return (
            max(FLOOR_MAX, NOISE_FACTOR_MAX * float(diffs.max())),
            max(FLOOR_MEAN, NOISE_FACTOR_MEAN * float(diffs.mean())),
        )

    def _stepwise_top(
        self, prompt: Sequence[int], completion: Sequence[int] | int, k: int
    ) -> tuple[list[int], np.ndarray, np.ndarray]:
        """The token-by-token pass (the prompt in one batch, then one token per decode, as a provider
        runs): the completion ids (greedy ones when ``completion`` is a count), and per position the
        ids and log-probabilities of the ``k`` most likely tokens (blocking)."""
        import llama_cpp
        import numpy as np

        greedy = isinstance(completion, int)
        n = int(completion) if isinstance(completion, int) else len(completion)
        n = min(n, self.n_ctx - len(prompt), MAX_POSITIONS)
        produced: list[int] = [] if greedy else list(completion)[:n]  # type: ignore[arg-type]
        top_ids = np.empty((n, k), dtype=np.int64)
        top_values = np.empty((n, k), dtype=np.float32)
        vocab = self.llama._model.vocab
        with self._lock:
            ctx = self.llama._ctx
            ctx.kv_cache_clear()
            batch = llama_cpp.llama_batch_init(len(prompt), 0, 1)
            try:
                chunk = list(prompt)
                for step in range(n):
                    for j, token in enumerate(chunk):
                        batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, len(prompt) + step - len(chunk) + j, 1
                        batch.seq_id[j][0] = 0
                        batch.logits[j] = j == len(chunk) - 1
                    batch.n_tokens = len(chunk)
                    if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
                        raise RuntimeError("llama_decode failed")
                    pointer = llama_cpp.llama_get_logits_ith(ctx.ctx, len(chunk) - 1)
                    row = log_softmax(np.ctypeslib.as_array(pointer, shape=(1, self.n_vocab)))[0]
                    ids = np.argpartition(-row, k)[:k] if k < self.n_vocab else np.arange(self.n_vocab)
                    top_ids[step], top_values[step] = ids, row[ids]
                    if greedy:
                        for token in [*np.argsort(-row[ids]).tolist(), -1]:
                            if token < 0:  # every one of the k is an end of generation: the best one then
                                produced.append(int(np.argmax(row)))
                                break
                            if not llama_cpp.llama_vocab_is_eog(vocab, int(ids[token])):
                                produced.append(int(ids[token]))
                                break
                    chunk = [produced[step]]
            finally:
                llama_cpp.llama_batch_free(batch)
        return produced, top_ids, top_values

    def text_of(self, tokens: Sequence[int]) -> str:
        """The text these ids spell, as the engine streams a reply's (special tokens left out; blocking)."""
        with self._lock:
            raw = b"".join(bytes(self.llama.detokenize([t], special=False)) for t in tokens)
        return raw.decode("utf-8", errors="replace")

    def close(self) -> None:
        self.llama.close()


class TokenIndex:
    """Token bytes → id for a model's vocabulary, for engines whose logprob entries carry bytes only.
    Where several ids share bytes, a normal token wins over a byte-fallback or control one."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        try:
            vocab = llama._model.vocab
            index: dict[bytes, int] = {}
            rank: dict[bytes, int] = {}
            for token in range(int(llama.n_vocab())):
                raw = bytes(llama.detokenize([token], special=True))
                attr = int(llama_cpp.llama_vocab_get_attr(vocab, token))
                score = 0 if attr & llama_cpp.LLAMA_TOKEN_ATTR_NORMAL else 1
                if raw not in index or score < rank[raw]:
                    index[raw], rank[raw] = token, score
            self._index = index
        finally:
            llama.close()

    def id_of(self, entry: dict[str, Any]) -> int:
        if isinstance(entry.get("id"), int):
            return int(entry["id"])
        return self._index[bytes(entry["bytes"])]


_indexes: dict[str, TokenIndex] = {}
_prefills: dict[str, tuple[Prefill, tuple[float, float]]] = {}
_cache_lock = threading.Lock()
MAX_CACHED_MODELS = 4


def _close_cached_prefills() -> None:
    """Free the cached verifiers while llama_cpp still works: left to the interpreter's teardown, each
    ``Llama`` is freed after llama_cpp's module is gone and prints a ``TypeError`` traceback on the way
    out of every process that ran a check (a node on shutdown, the test suite)."""
    with _cache_lock:
        cached = list(_prefills.values())
        _prefills.clear()
    for prefill, _ in cached:
        with contextlib.suppress(Exception):
            prefill.llama.close()


atexit.register(_close_cached_prefills)


def index_for(path: Path) -> TokenIndex:
    """The model's :class:`TokenIndex`, built once per file (blocking)."""
    key = str(path)
    with _cache_lock:
        known = _indexes.get(key)
    if known is None:
        known = TokenIndex(path)
        with _cache_lock:
            if len(_indexes) >= MAX_CACHED_MODELS:
                _indexes.pop(next(iter(_indexes)))
            _indexes[key] = known
    return known


def cached_index(path: Path) -> TokenIndex | None:
    """The model's :class:`TokenIndex` if :func:`index_for` built it already (never blocks: no thread needed)."""
    with _cache_lock:
        return _indexes.get(str(path))


CALIBRATION_TEXT = (
    "The lighthouse keeper climbed the stairs every evening, counting each step while the waves broke "
    "on the rocks below; he had done it for forty years and knew every sound the tower made."
)


# The tolerances are measured over this many positions of the model's greedy reply to the calibration
# text's first 16 tokens. The batch-vs-token-by-token noise grows with the reply: gemma3-270m's largest
# difference was 0.36 nats over the first 32 positions of such a reply and 0.62 over 200, and honest
# 200-token replies calibrated on 32 positions were flagged (docs/verified-inference.md, "Figures").
# Checked replies of agents are 100-300 tokens; a reply longer than this is checked with these
# tolerances too (what its later positions' noise is, is not measured).
CALIBRATION_PROMPT = 16
CALIBRATION_POSITIONS = 256


def prefill_for(path: Path, n_ctx: int = 2048) -> tuple[Prefill, tuple[float, float]]:
    """A verifier of the file and its tolerances (measured once, over :data:`CALIBRATION_POSITIONS`
    positions of the model's greedy reply to a fixed text), cached per file (blocking)."""
    key = str(path)
    with _cache_lock:
        known = _prefills.get(key)
    if known is None:
        prefill = Prefill(path, n_ctx=n_ctx)
        ids = list(prefill.llama.tokenize(CALIBRATION_TEXT.encode(), True, False))
        known = (prefill, prefill.tolerances(ids[:CALIBRATION_PROMPT], CALIBRATION_POSITIONS))
        with _cache_lock:
            if len(_prefills) >= MAX_CACHED_MODELS:
                # Not closed here: another check's worker thread may be running it right now (llama.cpp
                # would read freed memory). Its last reference going frees it (Llama.__del__).
                _prefills.pop(next(iter(_prefills)))
            _prefills[key] = known
    return known
