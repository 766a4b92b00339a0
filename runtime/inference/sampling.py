"""Token sampling in the engine's own loop: logit bias, OpenAI penalties, grammar, logprobs.

Each step the engine hands :meth:`TokenPicker.pick` the model's logits for the next token. The
picker builds the *adjusted logits*: the raw logits plus ``logit_bias``, minus OpenAI's penalties
(``frequency_penalty`` × how often a token was produced so far in this choice, plus
``presence_penalty`` if it was produced at all), with every token the grammar refuses at -inf.

**Logprobs** are the log-softmax of the adjusted logits at temperature 1, before any truncation:
that is the distribution the token is drawn from before ``temperature``, ``top_k`` (40),
``top_p`` and ``min_p`` reshape it (at temperature 0 the token taken is its most likely one, so it
is always the first of ``top_logprobs``). The chosen token's logprob and the ``top_logprobs``
alternatives come from that same distribution.

Under a grammar that distribution is restricted to what the grammar allows, and, as masking a
whole vocabulary costs milliseconds (10 ms for 49k tokens, about 50 ms for Gemma's 262k), to the
allowed ones among the ``SHORTLIST`` (64) most likely tokens; only when none of those is allowed
is the whole vocabulary masked. Every token left out is less likely than every token kept.

Sampling: temperature 0 takes the most likely token. Otherwise the 40 most likely tokens are kept,
then the smallest set of them whose probability reaches ``top_p``, then those at least ``min_p``
times as likely as the best, and one is drawn at ``temperature`` with a ``numpy`` generator seeded
by the request's ``seed`` (one generator per request: the choices of ``n`` > 1 differ, the same
seed repeats them all).

The grammar is consulted lazily when no logprobs are asked for: the token picked from the
unconstrained distribution is checked alone, and only if the grammar refuses it is the pick drawn
again from the constrained distribution above. At temperature 0 either way gives exactly the
constrained argmax.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runtime.errors import ClawnodeError, ErrorCode

if TYPE_CHECKING:  # numpy loads with the first TokenPicker (a generation), not at the node's start
    import numpy as np

    from runtime.inference.grammar import GrammarConstraint

TOP_K = 40
MIN_P = 0.05
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries in logit_bias
SHORTLIST = 64  # tokens checked against the grammar before masking the whole vocabulary


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 0.95
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class Pick:
    token: int
    logprob: float | None = None  # with Sampling.logprobs
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


class TokenPicker:
    """Picks tokens for one request (all its choices); ``counts`` is per choice."""

    def __init__(self, sampling: Sampling, n_vocab: int, seed: int | None) -> None:
        import numpy as np

        self.sampling = sampling
        self.n_vocab = n_vocab
        self.rng = np.random.default_rng(seed)
        bias = {t: b for t, b in sampling.logit_bias.items() if 0 <= t < n_vocab}
        if len(bias) != len(sampling.logit_bias):
            raise ClawnodeError(
                ErrorCode.INVALID_ARGUMENT,
                f"logit_bias names a token outside the vocabulary of {n_vocab} (param: logit_bias)",
            )
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self._bias_values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def adjust(self, logits: np.ndarray, counts: Counter[int]) -> np.ndarray:
        import numpy as np

        x = np.array(logits, dtype=np.float32)  # a copy: the caller's logits stay as they are
        if self._bias_ids.size:
            x[self._bias_ids] += self._bias_values
        s = self.sampling
        if counts and (s.frequency_penalty or s.presence_penalty):
            ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
            seen = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
            x[ids] -= seen * s.frequency_penalty + s.presence_penalty
        return x

    def _draw(self, x: np.ndarray) -> int:
        import numpy as np

        s = self.sampling
        if s.temperature <= 0:
            return int(x.argmax())
        k = min(TOP_K, x.size)
        ids = np.argpartition(-x, k - 1)[:k]
        ids = ids[np.argsort(-x[ids], kind="stable")]
        values = x[ids]
        finite = np.isfinite(values)
        ids, values = ids[finite], values[finite]
        if ids.size == 0:
            return int(np.argmax(x))
        probs = np.exp(values - values[0])
        probs /= probs.sum()
        keep = int(np.searchsorted(np.cumsum(probs), s.top_p) + 1)
        keep = max(1, min(keep, ids.size))
        ids, values, probs = ids[:keep], values[:keep], probs[:keep]
        strong = probs >= MIN_P * probs[0]
        ids, values = ids[strong], values[strong]
        scaled = np.exp((values - values[0]) / s.temperature)
        return int(ids[self.rng.choice(ids.size, p=scaled / scaled.sum())])

    @staticmethod
    def _constrain(x: np.ndarray, grammar: GrammarConstraint) -> np.ndarray:
        """``x`` with the tokens the grammar refuses at -inf: first among the SHORTLIST most likely
        tokens only (masking a whole vocabulary costs milliseconds); if none of them is allowed,
        over the whole vocabulary. Either way the most likely allowed token stays the most likely."""
        import numpy as np

        k = min(SHORTLIST, x.size)
        ids = np.argpartition(-x, k - 1)[:k]
        allowed = grammar.allowed_among(ids)
        if not allowed.any():
            return grammar.mask(x)
        shortlisted = np.full_like(x, -np.inf)
        shortlisted[ids[allowed]] = x[ids[allowed]]
        return shortlisted

    def pick(self, logits: np.ndarray, counts: Counter[int], grammar: GrammarConstraint | None) -> Pick:
        import numpy as np

        x = self.adjust(logits, counts)
        want_logprobs = self.sampling.logprobs
        if grammar is not None and want_logprobs:
            x = self._constrain(x, grammar)
        token = self._draw(x)
        if grammar is not None and not want_logprobs and not grammar.allows(token):
            x = self._constrain(x, grammar)
            token = self._draw(x)
        if not math.isfinite(x[token]):
            raise ClawnodeError(ErrorCode.INTERNAL, "constrained decoding reached a dead end")
        if not want_logprobs:
            return Pick(token)
        # Verified inference asks this of every token (top 4): whole-array operations only, no
        # per-element numpy scalars (each costs about a microsecond); the same float32 (float64 under
        # a grammar mask) arithmetic element by element as one at a time, so the figures are identical.
        # At temperature 0 the token is the first maximum: its logit is the maximum.
        top = x[token] if self.sampling.temperature <= 0 else x.max()
        logz = top + np.log(np.exp(x - top).sum())
        n_top = self.sampling.top_logprobs
        alternatives: tuple[tuple[int, float], ...] = ()
        if n_top:
            ids = np.argpartition(-x, n_top - 1)[:n_top]
            values = x[ids]
            logprobs = (values - logz).tolist()
            ids_, raw = ids.tolist(), values.tolist()
            if any(value != value for value in raw):  # NaN: numpy's own order (NaN last)
                order = np.argsort(-values, kind="stable").tolist()
            else:  # a stable sort of a handful, as numpy's stable argsort of the negated values orders them
                order = sorted(range(len(raw)), key=lambda i: -raw[i])
            alternatives = tuple((ids_[i], logprobs[i]) for i in order if math.isfinite(raw[i]))
        return Pick(token, float(x[token] - logz), alternatives)
