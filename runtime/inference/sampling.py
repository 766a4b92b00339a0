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
# Rows of logits CommitRows keeps before computing their top-k in one go: numpy's cost a call is paid once a
# block (a block of 32 rows of the tiny model's 356 logits took 1.8 us a row, one of 256 0.8 us), and the
# engine takes a full block only after the token that filled it has left (``_Choice.step``).
COMMIT_BLOCK = 256
COMMIT_BLOCK_BYTES = 1 << 20  # and at most this many bytes of them (a large vocabulary keeps fewer rows)
# From this vocabulary size CommitRows finds a row's top k among the entries at least the k-th best of
# every STRIDE-th one, instead of numpy's argpartition of the whole row (0.6 ms at 262k entries).
LARGE_VOCAB = 4096
STRIDE = 64
MAX_CANDIDATES = 4096


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 0.95
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    # Verified inference without logprobs asked: the top ``commit_top`` ids and logprobs of every
    # produced token, kept for the provider's commitment only (``CommitRows``), never shown as logprobs.
    commit_top: int = 0


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

    def adjusted(self, logits: np.ndarray, counts: Counter[int]) -> np.ndarray:
        """The logits ``pick`` draws from without a grammar: ``logits`` itself when no bias or
        penalty changes them (no copy), else ``adjust``'s copy."""
        s = self.sampling
        if self._bias_ids.size or (counts and (s.frequency_penalty or s.presence_penalty)):
            return self.adjust(logits, counts)
        return logits

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


# (token produced, ((id, logprob), ...) most likely first): what a commitment keeps of a position.
Committed = tuple[int, tuple[tuple[int, float], ...]]


class CommitRows:
    """The top ``k`` (id, logprob) of each produced token, as :meth:`TokenPicker.pick` with
    ``Sampling(logprobs=True, top_logprobs=k)`` gives them in ``Pick.top``, for verified inference's
    commitment: the logits rows are copied into a block and the block's top-k computed in one go
    (numpy's per-call cost, about 25 us a token with the top 4 one token at a time, is paid once a
    block). Element by element it is the same float32 arithmetic as ``pick``: the figures are
    identical (tests/inference/test_commit_rows.py)."""

    def __init__(self, k: int, n_vocab: int) -> None:
        import numpy as np

        self.k = min(k, n_vocab)
        rows = max(1, min(COMMIT_BLOCK, COMMIT_BLOCK_BYTES // (4 * n_vocab)))
        self._rows = np.empty((rows, n_vocab), dtype=np.float32)
        self._tokens: list[int] = []

    def add(self, x: np.ndarray, token: int) -> list[Committed] | None:
        """Keep ``x`` (the adjusted logits ``token`` was picked from); the block's positions once full."""
        block = self.push(x, token)
        return block.entries() if block is not None else None

    def push(self, x: np.ndarray, token: int) -> CommitBlock | None:
        """``add``, the block handed out as arrays (``CommitBlock``): no Python tuple a position."""
        return self.take() if self.put(x, token) else None

    def put(self, x: np.ndarray, token: int) -> bool:
        """Keep ``x`` and ``token`` only (a copy of the row); True when the block is full: ``take`` it then,
        before the next ``put`` (the engine does, after it has handed out the token's text)."""
        self._rows[len(self._tokens)] = x
        self._tokens.append(token)
        return len(self._tokens) == self._rows.shape[0]

    def _top_ids(self, row: np.ndarray) -> np.ndarray:
        """A large row's k best ids. The k-th best of every STRIDE-th entry is at most the row's k-th
        best, so the entries at least that hold the k best; among them, when no two of the k + 1 best
        values are equal the k best are one set whatever the method (argpartition's choice among equal
        values is its own: then, or with too many candidates, the row goes to argpartition)."""
        import numpy as np

        k = self.k
        sample = row[::STRIDE]
        if sample.size > k:
            threshold = np.partition(sample, sample.size - k)[sample.size - k]
            candidates = np.flatnonzero(row >= threshold)
            if k <= candidates.size <= MAX_CANDIDATES:
                values = row[candidates]
                order = np.argsort(-values, kind="stable")[: k + 1]
                best = values[order]
                if not (best[1:] == best[:-1]).any():
                    return candidates[order[:k]]
        return np.argpartition(-row, k - 1)[:k]

    def _small_top(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A block's k best ids and values a row, best first, and each row's maximum, for a vocabulary
        under LARGE_VOCAB: k + 1 rounds of a row-wise argmax (numpy's row-wise argpartition took about
        200 us for 32 rows of 356, the argmaxes about 30). Where no two of a row's k + 1 best values are
        equal (and no NaN) its k best are one set, in one order, whatever the method; the other rows go
        to argpartition and a stable sort as before (its choice among equal values is its own), so the
        figures are the same either way."""
        import numpy as np

        k = self.k
        n = x.shape[0]
        y = x.copy()
        at = np.arange(n)
        ids = np.empty((n, k + 1), dtype=np.intp)
        best = np.empty((n, k + 1), dtype=x.dtype)
        for j in range(k + 1):
            column = y.argmax(axis=1)
            ids[:, j] = column
            best[:, j] = y[at, column]
            y[at, column] = -np.inf
        top = best[:, 0].copy()  # x.max(axis=1): argmax takes a NaN first, as max gives NaN
        # A NaN is argmax's first pick: such rows, and rows with equal values among their k + 1 best
        # (an -inf taken twice included), go to argpartition.
        odd = (best[:, 1:] == best[:, :-1]).any(axis=1) | np.isnan(best[:, 0])
        ids, values = ids[:, :k], best[:, :k]
        if odd.any():
            ids[odd], values[odd] = self._sorted_top(x[odd])
        return ids, values, top

    def _sorted_top(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows' k best ids and values as pick orders them: argpartition, then a stable sort, NaN last."""
        import numpy as np

        if x.shape[1] >= LARGE_VOCAB:
            ids = np.stack([self._top_ids(row) for row in x])
        else:
            ids = np.argpartition(-x, self.k - 1, axis=1)[:, : self.k]
        values = np.take_along_axis(x, ids, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        return np.take_along_axis(ids, order, axis=1), np.take_along_axis(values, order, axis=1)

    def flush(self) -> list[Committed]:
        """The positions of the rows kept so far (none: an empty list); the block starts again."""
        block = self.take()
        return block.entries() if block is not None else []

    def take(self) -> CommitBlock | None:
        """``flush``'s positions as a ``CommitBlock`` (None when no row is kept)."""
        import numpy as np

        tokens, self._tokens = self._tokens, []
        if not tokens:
            return None
        if self.k <= 0:
            empty = np.empty((len(tokens), 0), dtype=np.float32)
            return CommitBlock(tokens, empty.astype(np.intp), empty, empty)
        x = self._rows[: len(tokens)]
        if x.shape[1] >= LARGE_VOCAB or self.k + 1 > x.shape[1]:
            top = x.max(axis=1)
            ids, values = self._sorted_top(x)
        else:
            ids, values, top = self._small_top(x)
        # pick's: top + log(sum(exp(x - top))), top the row's maximum (the greedy token's logit).
        logz = top + np.log(np.exp(x - top[:, None]).sum(axis=1))
        return CommitBlock(tokens, ids, values - logz[:, None], values)


@dataclass(frozen=True, eq=False)
class CommitBlock:
    """A block of ``CommitRows`` positions as arrays, each row best first: ``ids`` and ``logprobs``
    (float32, ``k`` a row), ``values`` the adjusted logits they came from. ``entries()`` gives them as
    ``Committed`` tuples, ``Pick.top``'s figures exactly; verified inference's recorder encodes the
    arrays as they are (``runtime.verify.provider``) instead of a Python tuple a position."""

    tokens: list[int]
    ids: np.ndarray
    logprobs: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def entries(self) -> list[Committed]:
        import numpy as np

        ids, logprobs = self.ids.tolist(), self.logprobs.tolist()
        if np.isfinite(self.values).all():  # the rule: -inf (a masked token) or NaN alternatives are left out
            return list(zip(self.tokens, map(tuple, map(zip, ids, logprobs)), strict=True))
        isfinite = math.isfinite
        rows = zip(self.tokens, ids, self.values.tolist(), logprobs, strict=True)
        return [
            (token, tuple((i, lp) for i, v, lp in zip(row_ids, row_values, row_logprobs, strict=True) if isfinite(v)))
            for token, row_ids, row_values, row_logprobs in rows
        ]
