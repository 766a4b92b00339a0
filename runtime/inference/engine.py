"""The in-process llama.cpp engine: one loaded GGUF model, served to trio from one dedicated thread.

A ``llama_cpp.Llama`` instance is not thread-safe (two threads in one instance crash the process),
so every ``LlamaModel`` owns exactly one worker thread and runs everything that touches its
instances there: loading, tokenizing, generating, embedding. trio talks to it like this:

* admission: a :class:`~runtime.inference.admission.FairAdmission` per model; one request holds
  it while it generates and at most ``max_queue`` more wait for it, admitted round-robin between
  borrowers (leases), a request beyond that is refused with ``E_RATE_LIMITED`` (reason ``busy``, a
  ``retry_after_s`` hint); a waiting request that is cancelled simply leaves the queue;
* streaming: the worker hands each decoded piece to trio with ``TrioToken.run_sync_soon`` into an
  unbounded memory channel (bounded in practice by ``max_tokens``), so it never blocks on a slow
  consumer;
* cancellation: when the consumer goes away (the stream is closed, or its task cancelled), a flag is
  set that the worker checks between tokens: it stops generating within one token.

Usage is counted from the engine, never estimated: the prompt's tokens are the tokens actually
decoded (the chat template applied, then tokenized by the model's own tokenizer), completion tokens
are the tokens actually sampled (an end-of-generation token is not counted, as llama-cpp-python and
OpenAI do not count it).
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import functools
import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import trio

from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.admission import FairAdmission, current_borrower
from runtime.inference.chat_formats import TemplateSlots, check_messages, prepare_messages
from runtime.inference.grammar import GrammarConstraint, invalid, schema_grammar
from runtime.inference.sampling import CommitBlock, CommitRows, Pick, Sampling, TokenPicker
from runtime.inference.tools import ToolCallParser, ToolUse, tools_grammar

log = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[float], None]
Message = dict[str, Any]

DEFAULT_MAX_QUEUE = 8
DEFAULT_PREFIX_CACHE_MB = 256
DEFAULT_KV_TOKENS = 16_384  # the default parallel sequences' contexts fit in this many tokens
MAX_DEFAULT_PARALLEL = 8
MAX_PARALLEL = 64
# One KV buffer shared by all sequences (a prefix can then be copied between them with seq_cp) or
# one each: with one shared, attention spans every sequence's cells, and the tiny model decoded 2-6x
# slower once idle sequences held earlier conversations (4,200 vs 9,200 tok/s fresh, 1,300 vs 8,600
# after 8 conversations).
KV_UNIFIED = False
MAX_SAVED_PREFIXES = 8
MIN_SAVED_PREFIX = 32  # a sequence shorter than this is not worth a saved state
SHUTDOWN_WAIT_S = 10.0
# See _submit_generation: a fast engine's tokens reach trio in batches at most this far apart (the
# first at once). 2 ms made a frame of about 2 tokens at 1,000 tok/s; the network side's work per
# frame then slowed the engine itself (GIL and CPU): the tiny model's stream through the network
# went from about 0.5 of direct to about 0.65-0.7 at 10 ms on a loaded 2-core machine. At 20 ms (50
# frames a second at most, 40-50 tokens a frame at 2,000-3,000 tok/s) trio's CPU a streamed token fell
# from 37-52 to 23-35 us (thread clocks, same runs); a model slower than 50 tok/s is not delayed at all.
WAKE_GAP_S = 0.020
MAX_CHOICES = 8
MAX_EMBEDDING_TOKEN_ID_INPUTS = 256
# What every LlamaModel serves (the capability record's model features).
FEATURES = frozenset({"tools", "json_schema", "logprobs", "n"})
Chunk = dict[str, Any]
# Chunk keys a chunk joined on the worker never carries (``_join``): per-token entries.
_UNJOINED = frozenset(("logprobs", "tool_calls"))
# Tokens one joined chunk holds at most (``joinable``) where either chunk carries per-token entries
# (logprobs, tool-call deltas): a reply that piled up while the wire was slow still goes out in frames
# under the call frame bound (20 logprobs a token are about 1.3 KB of JSON).
MAX_JOINED_TOKENS = 64
# A plain chunk (text, tokens and verified inference's ``commit`` entries, which the provider keeps and
# never sends) joins up to this many tokens and while its text is shorter than MAX_JOINED_TEXT
# characters (JSON writes a character in at most 6 bytes: under 100 KiB of a 1 MiB call frame). At 64
# tokens a fast engine's 256-token reply left in 6-7 frames, 4-5 now (a first token, then one a wake-up
# of trio), each frame costing both nodes its framing, Noise and Yamux work (issue 19).
MAX_JOINED_PLAIN_TOKENS = 1024
MAX_JOINED_TEXT = 16_384


def joinable(before: Chunk, chunk: Chunk) -> bool:
    """Whether ``chunk`` may join the chunk ``before`` it: both of one choice, ``before`` not the last
    of its choice (no finish reason) and under the bounds: ``MAX_JOINED_PLAIN_TOKENS`` tokens and
    ``MAX_JOINED_TEXT`` characters when both are plain, else ``MAX_JOINED_TOKENS`` tokens. The one rule
    of the engine's join on its worker (``_join``) and of ``runtime.inference.service.merge_chunks``."""
    if before.get("index", 0) != chunk.get("index", 0) or "finish_reason" in before:
        return False
    if _UNJOINED.isdisjoint(before) and _UNJOINED.isdisjoint(chunk):
        return before.get("tokens", 0) < MAX_JOINED_PLAIN_TOKENS and len(before.get("text", "")) < MAX_JOINED_TEXT
    return before.get("tokens", 0) < MAX_JOINED_TOKENS


def _join(waiting: tuple[str, Any], chunk: Chunk) -> bool:
    """Join ``chunk`` to the waiting item before it when both are plain chunks (no per-token entries)
    and ``joinable``, as ``runtime.inference.service.merge_chunks`` joins them (text, tokens, ``commit``
    entries, a finish reason last); False when it must go as its own item."""
    kind, before = waiting
    plain = kind == "piece" and _UNJOINED.isdisjoint(before) and _UNJOINED.isdisjoint(chunk)
    if not (plain and joinable(before, chunk)):
        return False
    before["text"] = before.get("text", "") + chunk.get("text", "")
    before["tokens"] = before.get("tokens", 0) + chunk.get("tokens", 0)
    if "commit" in chunk:
        before.setdefault("commit", []).extend(chunk["commit"])
    if "finish_reason" in chunk:
        before["finish_reason"] = chunk["finish_reason"]
    return True


@dataclass(frozen=True)
class TokenUsage:
    # The prompt's tokens; of a generation cancelled before its prompt was decoded whole, those
    # processed by then (0 before it began): what a cut call's prompt cost the engine.
    prompt_tokens: int
    completion_tokens: int
    # Of the prompt tokens, those whose KV cache was reused from an earlier sequence (not decoded
    # again): OpenAI's ``prompt_tokens_details.cached_tokens``. Still prompt tokens: billed as such,
    # so two usages that bill the same compare equal whatever their cache did.
    cached_tokens: int = field(default=0, compare=False)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Completion:
    """A finished generation. ``finish_reason``: stop (end token or a stop string), length,
    tool_calls, cancelled; with ``n`` > 1 the last choice's, ``finish_reasons`` holds each one's.
    ``usage`` counts the prompt once and the completion tokens of every choice."""

    text: str
    usage: TokenUsage
    finish_reason: str
    first_token_s: float | None = None  # from admission to the first sampled token
    generation_s: float = 0.0  # from the first to the last sampled token
    finish_reasons: tuple[str, ...] = ()

    @property
    def tokens_per_s(self) -> float:
        if self.usage.completion_tokens < 2 or self.generation_s <= 0:
            return 0.0
        return (self.usage.completion_tokens - 1) / self.generation_s


@dataclass(frozen=True)
class LoadReport:
    seconds: float
    rss_bytes: int  # the process's resident memory after loading
    rss_delta_bytes: int  # how much loading added
    n_ctx: int
    chat_format: str
    metadata: dict[str, str] = field(default_factory=dict)


_DEFAULT_PARAMS_LOCK = threading.RLock()


@contextlib.contextmanager
def _load_progress(progress: Progress | None) -> Iterator[None]:
    """llama.cpp reports load progress to ``llama_model_params.progress_callback``, but
    llama-cpp-python's ``Llama()`` builds its params itself (from ``llama_model_default_params``)
    and takes no callback. For the length of one load, that function hands out params carrying
    ours; the lock keeps two loads from swapping it under each other."""
    if progress is None:
        yield
        return
    import llama_cpp.llama_cpp as bindings

    def report(value: float, _user_data: ctypes.c_void_p) -> bool:
        with contextlib.suppress(Exception):  # progress must never abort a load
            progress(float(value))
        return True

    callback = bindings.llama_progress_callback(report)  # kept referenced until the load returns
    original = bindings.llama_model_default_params

    def params_with_progress() -> Any:
        params = original()
        params.progress_callback = callback
        return params

    with _DEFAULT_PARAMS_LOCK:
        bindings.llama_model_default_params = params_with_progress
        try:
            yield
        finally:
            bindings.llama_model_default_params = original


def _default_parallel(model: Any, n_ctx: int) -> int:
    """How many sequences a model decodes at once unless configured: as many contexts as fit in
    ``DEFAULT_KV_TOKENS`` tokens and in a quarter of the memory available now (the KV cache of a
    context costs 2 × layers × KV heads × head size × 2 bytes a token), at most
    ``MAX_DEFAULT_PARALLEL``; 1 for a recurrent or hybrid model (its state is not split by
    position, so sequences cannot be trimmed or copied)."""
    import llama_cpp
    import psutil

    handle = model.model
    if _is_recurrent(model):
        return 1
    heads = max(1, int(llama_cpp.llama_model_n_head(handle)))
    head_size = int(llama_cpp.llama_model_n_embd(handle)) // heads
    kv_heads = int(llama_cpp.llama_model_n_head_kv(handle)) or heads
    per_token = 2 * int(llama_cpp.llama_model_n_layer(handle)) * head_size * kv_heads * 2
    by_memory = (psutil.virtual_memory().available // 4) // max(1, per_token * n_ctx)
    return max(1, min(MAX_DEFAULT_PARALLEL, DEFAULT_KV_TOKENS // max(1, n_ctx), int(by_memory)))


@contextlib.contextmanager
def _parallel_context(parallel: int | None, n_ctx: int) -> Iterator[list[int]]:
    """For the length of one load, the context ``Llama()`` creates (on this thread) gets room for
    ``parallel`` sequences (default: :func:`_default_parallel`) of ``n_ctx`` tokens each (a KV
    cache each, see ``KV_UNIFIED``): ``llama_context_params`` has ``n_seq_max`` and
    ``kv_unified``, which ``Llama()`` takes no argument for. Yields a one-item list that holds the
    number chosen."""
    import llama_cpp.llama as high

    internals = high.internals
    original = internals.LlamaContext
    loader = threading.current_thread()
    chosen = [1]

    def make(*, model: Any, params: Any, verbose: bool = True) -> Any:
        if threading.current_thread() is loader:
            count = parallel if parallel is not None else _default_parallel(model, n_ctx)
            count = 1 if _is_recurrent(model) else count
            chosen[0] = count
            if count > 1:
                params.n_ctx = n_ctx * count
                params.n_seq_max = count
                params.kv_unified = KV_UNIFIED
        return original(model=model, params=params, verbose=verbose)

    with _DEFAULT_PARAMS_LOCK:
        setattr(internals, "LlamaContext", make)  # noqa: B010 - a module's class, swapped for one load
        try:
            yield chosen
        finally:
            setattr(internals, "LlamaContext", original)  # noqa: B010


def _is_recurrent(model: Any) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_model_is_recurrent(model.model) or llama_cpp.llama_model_is_hybrid(model.model))


class _Worker:
    """One thread running submitted jobs in order; results come back to trio through its token.

    With ``background`` set (the batch of running sequences), the thread runs one of its steps
    whenever no job waits and it has work: jobs (a new sequence joining, tokenizing) run between
    two decode steps."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.background: _Batcher | None = None
        self._thread = threading.Thread(target=self._loop, name=f"llama:{name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            background = self.background
            if background is not None and background.busy:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    try:
                        background.step()
                    except Exception as error:  # the thread must live on: fail the batch instead
                        log.exception("a decode step failed")
                        background.fail_all(ClawnodeError(ErrorCode.INTERNAL, f"generation failed: {error}"))
                    continue
            else:
                job = self._jobs.get()
            if job is None:
                return
            job()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    async def run(self, fn: Callable[[], T], *, ended: Callable[[], None] | None = None) -> T:
        """Run ``fn`` on the worker thread and wait for it (a cancelled waiter does not stop it).
        ``ended``: called in trio once ``fn`` has returned or raised, whether or not anyone still waits."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: dict[str, Any] = {}

        def end() -> None:
            if ended is not None:
                ended()
            done.set()

        def job() -> None:
            try:
                box["value"] = fn()
            except BaseException as error:  # noqa: BLE001 - handed to the waiting task
                box["error"] = error
            try:
                token.run_sync_soon(end)
            except trio.RunFinishedError:
                pass

        self.submit(job)
        await done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        self._jobs.put(None)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


# What a chat template's ``strftime_now`` renders (Llama 3.2's writes "Today Date: …" with it): a fixed
# day, the one that template falls back to without it, never the clock. A prompt must be a pure
# function of the request and the file: a verifier in another time zone, or an arbiter re-rendering a
# disputed request days later, renders the very ids the provider signed (docs/verified-inference.md).
TEMPLATE_NOW = datetime(2024, 7, 26, tzinfo=UTC)


def template_strftime_now(f: str) -> str:
    return TEMPLATE_NOW.strftime(f)


@dataclass(frozen=True)
class _TemplateTokens:
    """What a file's own template is given besides the messages, read once at load (on the worker)."""

    template: str | None
    eos: int
    eos_text: str
    bos_text: str

    @classmethod
    def of(cls, llama: Any, template: str | None) -> _TemplateTokens:
        eos, bos = llama.token_eos(), llama.token_bos()
        return cls(
            template,
            eos,
            llama._model.token_get_text(eos) if eos != -1 else "",
            llama._model.token_get_text(bos) if bos != -1 else "",
        )


def _chat_formatter(
    chat_format: str, tokens: _TemplateTokens, file_name: str
) -> tuple[Callable[..., Any], TemplateSlots]:
    """The formatter and the template's slots of ``chat_format`` (``gguf-template``: the file's own
    template, its date fixed at ``TEMPLATE_NOW``; else a llama-cpp-python format name)."""
    from llama_cpp import llama_chat_format

    template = tokens.template
    if chat_format == "gguf-template":
        if not template:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"{file_name} has no chat template")
        formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=tokens.eos_text,
            bos_token=tokens.bos_text,
            stop_token_ids=[tokens.eos],
        )
        formatter.strftime_now = template_strftime_now  # type: ignore[method-assign]
        return formatter, TemplateSlots.of(chat_format, template)
    return _named_formatter(chat_format), TemplateSlots.of(chat_format, None)


# The chat formats a v4 commitment body may name: the file's own template, and llama-cpp-python's
# formats that render every message's text and add none of their own (markup only). Left out: those
# that drop a message (mistral-instruct and intel the system one, saiga the assistant turns, open-orca
# all of them: it renders one fixed prompt) or add prose the consumer never sent, and bills (open-orca,
# openbuddy, phind; qwen and snoozy when the request has no system message). tests/inference/
# test_chat_formats.py renders a probe conversation through each to hold this list to it.
FAITHFUL_CHAT_FORMATS = frozenset(
    {
        "gguf-template",
        "alpaca",
        "baichuan",
        "baichuan-2",
        "chatglm3",
        "chatml",
        "gemma",
        "llama-2",
        "llama-3",
        "mistrallite",
        "oasst_llama",
        "openchat",
        "pygmalion",
        "redpajama-incite",
        "zephyr",
    }
)


@functools.cache
def signable_chat_formats() -> frozenset[str]:
    """The chat formats a v4 commitment body may name and a verifier renders in, spelt exactly: those of
    ``FAITHFUL_CHAT_FORMATS`` this llama-cpp-python resolves. A spelling the engine would also take
    (``gem-ma`` for ``gemma``) is not one: a verifier builds at most these, and the template's slots
    are chosen by the exact name."""
    names = {"gguf-template"}
    for name in FAITHFUL_CHAT_FORMATS - names:
        with contextlib.suppress(ClawnodeError):
            _named_formatter(name)
            names.add(name)
    return frozenset(names)


def _named_formatter(name: str) -> Callable[..., Any]:
    from llama_cpp import llama_chat_format

    for candidate in (name.replace("-", "_").replace(".", "_"), name.replace("-", "").replace(".", "")):
        formatter = getattr(llama_chat_format, f"format_{candidate}", None)
        if callable(formatter):
            return formatter  # type: ignore[no-any-return]
    raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"unknown chat_format {name!r}")


class _StopScanner:
    """Finds stop strings in streamed text, holding back what could be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass(eq=False)
class _SavedPrefix:
    """The KV cache of one earlier sequence (its tokens), kept to resume from when a prompt starts
    with them again: another consumer's conversation, interleaved with this one's turns."""

    tokens: list[int]
    data: Any  # a ctypes byte array from llama_state_seq_get_data
    size: int
    used: float
    owner: str = ""  # the borrower whose sequence it was: only its own requests resume from it


def _common_prefix(cached: Sequence[int], tokens: Sequence[int]) -> int:
    n = 0
    for a, b in zip(cached, tokens, strict=False):
        if a != b:
            break
        n += 1
    return n


@dataclass
class _Request:
    """One generation: how to build its prompt tokens (on the worker) and how to sample."""

    prompt: Callable[[Any], tuple[list[int], list[str]]]  # llama → (tokens, extra stop strings)
    max_tokens: int
    sampling: Sampling
    seed: int | None
    stop: list[str]
    n: int = 1
    grammar: str | None = None  # GBNF every choice must follow
    grammar_param: str = "response_format"
    tools: ToolUse | None = None  # parse tool calls out of the reply
    # The borrower it runs for (``admission.current_borrower``): it reuses only that borrower's KV
    # cache. A stranger's prompt resuming another consumer's cache would show, in its exact
    # ``cached_tokens`` (and its speed), how much of its guess that consumer's prompt begins with.
    owner: str = ""


class _TokenTexts:
    """Per token, memoised: whether it ends a generation, and its text (with and without special
    tokens' text). Each is a ctypes call that drops and retakes the GIL: on a busy trio thread a
    retake waits up to the switch interval, several times a token, so the engine slowed to the
    network side's pace. At most two entries a vocabulary token."""

    def __init__(self, llama: Any) -> None:
        self.llama = llama
        self.vocab = llama._model.vocab
        self._eog: dict[int, bool] = {}
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._shown: dict[int, tuple[str, bytes]] = {}

    def is_eog(self, token: int) -> bool:
        found = self._eog.get(token)
        if found is None:
            import llama_cpp

            found = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
        return found

    def piece(self, token: int, special: bool) -> bytes:
        key = (token, special)
        found = self._pieces.get(key)
        if found is None:
            found = self._pieces[key] = bytes(self.llama.detokenize([token], special=special))
        return found

    def shown(self, token: int) -> tuple[str, bytes]:
        """A logprob entry's ``token`` text and its bytes (special tokens' text included), memoised:
        verified inference asks five entries of every token."""
        found = self._shown.get(token)
        if found is None:
            raw = self.piece(token, True)
            found = self._shown[token] = (raw.decode("utf-8", errors="replace"), raw)
        return found


class _Choice:
    """One choice's token loop, fed the logits of each step: sampling, grammar, stop strings, tool
    calls and logprobs, a chunk emitted per token. ``step`` returns the token to decode next, or
    None when the choice is over (``finish``: length, stop or cancelled); then call ``end``."""

    def __init__(
        self,
        llama: Any,
        request: _Request,
        index: int,
        picker: TokenPicker,
        grammar: GrammarConstraint | None,
        parser: ToolCallParser | None,
        stops: list[str],
        cancel: threading.Event,
        emit: Callable[[Chunk], None],
        texts: _TokenTexts | None = None,
    ) -> None:
        self.llama = llama
        self.texts = texts or _TokenTexts(llama)
        self.request = request
        self.index = index
        self.picker = picker
        self.grammar = grammar
        self.parser = parser
        self.cancel = cancel
        self.emit = emit
        self.vocab = llama._model.vocab
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.scanner = _StopScanner(stops)
        self.counts: Counter[int] = Counter()
        self.generated = 0
        self.finish = "length"
        self.first: float | None = None
        # Verified inference's top-k of every token, kept for the commitment alone (not asked as
        # logprobs): a block at a time, in chunks' ``commit`` entries. Under a grammar the chat
        # service asks for logprobs instead (its constrained distribution is the one committed to).
        commit_top = picker.sampling.commit_top
        self.rows = CommitRows(commit_top, picker.n_vocab) if commit_top and grammar is None else None

    def _send(self, text: str, tokens: int, pick: Pick | None, committed: list[CommitBlock] | None = None) -> None:
        chunk: Chunk = {"index": self.index, "tokens": tokens, "text": text}
        if self.parser is not None:
            chunk["text"], calls = self.parser.feed(text)
            if calls:
                chunk["tool_calls"] = calls
        if pick is not None and pick.logprob is not None:
            chunk["logprobs"] = [LlamaModel._logprob_entry(self.llama, pick, self.texts)]
        if committed:
            chunk["commit"] = committed
        self.emit(chunk)

    def step(self, logits: Any) -> int | None:
        if self.cancel.is_set():
            self.finish = "cancelled"
            return None
        if self.generated >= self.request.max_tokens:
            return None
        pick = self.picker.pick(logits, self.counts, self.grammar)
        token = pick.token
        if self.first is None:
            self.first = time.perf_counter()
        if self.texts.is_eog(token):
            self.finish = "stop"
            return None
        # Before counts changes: the row pick drew from (``logits`` itself or a copy), kept once the token's
        # text has left, so the rows held always cover exactly the tokens handed out (``abandon``).
        row = self.picker.adjusted(logits, self.counts) if self.rows is not None else None
        self.generated += 1
        self.counts[token] += 1
        if self.grammar is not None:
            self.grammar.accept(token)
        # Under a grammar, a special token's text counts (the grammar matched it, and a template's
        # tool-call marker may be one); free text leaves special tokens out, as before.
        piece = self.texts.piece(token, self.grammar is not None)
        text, stopped = self.scanner.feed(self.decoder.decode(piece))
        self._send(text, 1, pick)
        if row is not None and self.rows is not None and self.rows.put(row, token):
            # The block's top k after the token's text left: never delays it.
            self.emit({"index": self.index, "tokens": 0, "text": "", "commit": [self.rows.take()]})
        if stopped:
            self.finish = "stop"
            return None
        return token if self.generated < self.request.max_tokens else None

    def end(self) -> None:
        """Flush what the stop scanner held back (unless a stop string or a cancel ended it)."""
        block = self.rows.take() if self.rows is not None else None
        committed = [block] if block is not None else None
        if self.finish != "stop" and self.finish != "cancelled":
            tail, stopped = self.scanner.feed(self.decoder.decode(b"", final=True))
            tail += "" if stopped else self.scanner.flush()
            if tail:
                self._send(tail, 0, None, committed)
                committed = None
        if committed:
            self.emit({"index": self.index, "tokens": 0, "text": "", "commit": committed})

    def abandon(self) -> None:
        """The choice ends with an error instead (the engine's failure, or the request's own): hand out the
        positions of the block in progress, as ``end`` does, before the error is delivered, so verified
        inference's recorder holds the committed top k of every token whose text left (a failed call's
        error frame carries the proof of what it streamed). No text: what the stop scanner held back
        never left."""
        block = self.rows.take() if self.rows is not None else None
        self.rows = None
        if block is not None:
            self.emit({"index": self.index, "tokens": 0, "text": "", "commit": [block]})


@dataclass(eq=False)
class _Slot:
    """One of a batched model's sequence ids and the tokens whose KV cache it holds."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    used: float = 0.0
    busy: bool = False
    owner: str = ""  # the borrower whose tokens it holds


def _owned_prefix(owner: str, cached: Sequence[int], wanted_by: str, tokens: Sequence[int]) -> int:
    """The prefix of ``tokens`` a cache of ``cached`` held for ``owner`` gives ``wanted_by``: none
    unless it is the same borrower's."""
    return _common_prefix(cached, tokens) if owner == wanted_by else 0


Finish = Callable[[TokenUsage | None, list[str], float | None, float, BaseException | None], None]


@dataclass(eq=False)
class _Sequence:
    """One request in the batch: its prompt still to decode, then its choices one after another."""

    request: _Request
    cancel: threading.Event
    emit: Callable[[Chunk], None]
    finish: Finish
    slot: _Slot | None = None
    prompt: list[int] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # prompt tokens still to decode
    pos: int = 0  # the position of the next token decoded
    cached: int = 0
    picker: TokenPicker | None = None
    choice: _Choice | None = None
    index: int = 0
    total: int = 0
    reasons: list[str] = field(default_factory=list)
    first: float | None = None
    prompt_logits: Any = None
    next_token: int | None = None
    out: int = -1  # its row of logits in the last decoded batch


class _Batcher:
    """Continuous batching on the worker thread: every running sequence advances by one token per
    ``llama_decode`` (prompts decode in chunks within the same batch), sequences join between two
    steps and leave when done or cancelled, each with its own sampling, grammar, stop strings and
    logprobs. Each sequence has its own KV-cache sequence id (a slot); an idle slot keeps its
    tokens, so the next turn of a conversation decodes only what is new (as does a prompt sharing
    another slot's prefix, copied with ``llama_memory_seq_cp``, when the KV cache is unified)."""

    def __init__(self, model: LlamaModel, llama: Any, parallel: int) -> None:
        import llama_cpp

        self.model = model
        self.llama = llama
        self.ctx = llama._ctx.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = int(llama.n_batch)
        self.n_vocab = int(llama.n_vocab())
        self._logits_type = ctypes.c_float * self.n_vocab  # a row of llama.cpp's logits buffer
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.slots = [_Slot(i) for i in range(parallel)]
        # Copying another slot's prefix is exact only when attention sees every earlier position
        # (a sliding window may have dropped some of the source's).
        self.can_copy = KV_UNIFIED and int(llama_cpp.llama_model_n_swa(llama._model.model)) <= 0
        self.joining: list[_Sequence] = []
        self.running: list[_Sequence] = []

    @property
    def busy(self) -> bool:
        return bool(self.joining or self.running)

    @property
    def active(self) -> int:
        return len(self.joining) + len(self.running)

    def add(self, seq: _Sequence) -> None:
        self.joining.append(seq)

    def fail_all(self, error: ClawnodeError) -> None:
        """End every sequence with ``error`` and forget what their slots held."""
        import llama_cpp

        for seq in [*self.joining, *self.running]:
            if seq.slot is not None:
                llama_cpp.llama_memory_seq_rm(self.memory, seq.slot.seq_id, -1, -1)
                seq.slot.tokens = []
            if seq in self.joining:
                self.joining.remove(seq)
            self._end(seq, error)

    def close(self) -> None:
        import llama_cpp

        while self.busy:
            self.step()
        llama_cpp.llama_batch_free(self.batch)

    # joining

    def _start(self, seq: _Sequence) -> None:
        model, llama = self.model, self.llama
        request = seq.request
        prompt, template_stops = request.prompt(llama)
        n_ctx = model._context_length(llama)
        if len(prompt) + request.max_tokens > n_ctx:
            raise ClawnodeError(
                ErrorCode.INVALID_ARGUMENT,
                f"too many tokens: the prompt has {len(prompt)} and max_tokens is {request.max_tokens}, "
                f"but {model.name}'s context holds {n_ctx}",
            )
        if not prompt:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the prompt is empty")
        if request.max_tokens == 0 or seq.cancel.is_set():
            # Cancelled before its prompt was decoded: no prompt token was processed.
            cancelled = seq.cancel.is_set()
            usage = TokenUsage(0 if cancelled else len(prompt), 0)
            seq.finish(usage, ["cancelled" if cancelled else "length"] * request.n, None, 0.0, None)
            return
        seq.picker = TokenPicker(request.sampling, self.n_vocab, request.seed)
        seq.prompt, seq.stops = prompt, [*request.stop, *template_stops]
        slot = self._pick_slot(prompt, request.owner)
        slot.busy = True
        seq.slot = slot
        keep = self._reuse(slot, prompt, request.owner)
        seq.pending, seq.pos, seq.cached = prompt[keep:], keep, keep
        self.running.append(seq)

    def _pick_slot(self, tokens: list[int], owner: str) -> _Slot:
        """The idle slot holding most of a prefix of ``tokens`` for ``owner`` (the same conversation's
        last turn); else an empty one, else the least recently used. A sequence about to be
        overwritten is saved first when the prefix cache has room (its next turn resumes from it)."""
        free = [slot for slot in self.slots if not slot.busy]

        def held(slot: _Slot) -> int:
            return _owned_prefix(slot.owner, slot.tokens, owner, tokens)

        best = max(free, key=lambda slot: (held(slot), slot.used))
        common = held(best)
        if common >= MIN_SAVED_PREFIX // 4 and 2 * common >= len(best.tokens):
            slot = best
        else:
            slot = min(free, key=lambda slot: (bool(slot.tokens), slot.used))
            common = held(slot)
        if len(slot.tokens) - common >= MIN_SAVED_PREFIX and self.model.prefix_cache_bytes > 0:
            self.model._save_prefix_of(self.ctx, slot.seq_id, slot.tokens, slot.owner)
        return slot

    def _reuse(self, slot: _Slot, tokens: list[int], owner: str) -> int:
        """Make ``slot`` hold the longest prefix of ``tokens`` it can get from ``owner``'s caches (its
        own tokens, another slot's, a saved state); returns how many tokens it holds."""
        import llama_cpp

        model = self.model
        keep = _owned_prefix(slot.owner, slot.tokens, owner, tokens)
        slot.owner = owner
        donor, shared = None, keep
        if self.can_copy:
            for other in self.slots:
                common = _owned_prefix(other.owner, other.tokens, owner, tokens) if other is not slot else 0
                if common > shared + MIN_SAVED_PREFIX // 4:
                    donor, shared = other, common
        saved, from_saved = model._best_saved_prefix(tokens, owner)
        if saved is not None and from_saved > shared + MIN_SAVED_PREFIX // 4:
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            slot.tokens = []
            if model._restore_prefix_to(self.ctx, slot.seq_id, saved):
                slot.tokens, keep = list(saved.tokens), from_saved
        elif donor is not None:
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            llama_cpp.llama_memory_seq_cp(self.memory, donor.seq_id, slot.seq_id, 0, shared)
            slot.tokens, keep = tokens[:shared], shared
        keep = min(keep, len(tokens) - 1)  # at least one token decoded: fresh logits
        if keep <= 0 or not llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, keep, -1):
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            keep = 0
        slot.tokens = tokens[:keep]
        return keep

    # stepping

    def step(self) -> None:
        """Let sequences join, decode one batch, advance every sequence that got logits."""
        import llama_cpp
        import numpy as np

        joining, self.joining = self.joining, []
        for seq in joining:
            self._guard(seq, lambda seq=seq: self._start(seq))  # type: ignore[misc]
        for seq in list(self.running):
            if seq.cancel.is_set() and seq.next_token is None:  # still decoding its prompt
                self._guard(seq, lambda seq=seq: self._cancelled(seq))  # type: ignore[misc]
        batch = self.batch
        n = 0
        fed: list[tuple[_Sequence, list[int]]] = []

        def add(seq: _Sequence, tokens: list[int], logits_last: bool) -> None:
            nonlocal n
            assert seq.slot is not None
            for k, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = seq.pos + k
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.slot.seq_id
                batch.logits[n] = logits_last and k == len(tokens) - 1
                n += 1
            seq.out = n - 1 if logits_last else -1
            fed.append((seq, tokens))

        for seq in self.running:
            seq.out = -1
            if seq.next_token is not None and n < self.n_batch:
                add(seq, [seq.next_token], True)
                seq.next_token = None
        for seq in self.running:
            if seq.pending and n < self.n_batch:
                take = seq.pending[: self.n_batch - n]
                seq.pending = seq.pending[len(take) :]
                add(seq, take, not seq.pending)
        if n == 0:
            return
        batch.n_tokens = n
        code = int(llama_cpp.llama_decode(self.ctx, batch))
        if code != 0:
            error = ClawnodeError(ErrorCode.INTERNAL, f"generation failed: llama_decode returned {code}")
            for seq, _ in fed:
                assert seq.slot is not None
                llama_cpp.llama_memory_seq_rm(self.memory, seq.slot.seq_id, -1, -1)
                seq.slot.tokens = []
                self._end(seq, error)
            return
        for seq, tokens in fed:
            assert seq.slot is not None
            seq.slot.tokens.extend(tokens)
            seq.pos += len(tokens)
        for seq, _ in fed:
            if seq.out >= 0:
                # A view of llama.cpp's buffer, valid until the next decode: every use below is done
                # by then (n > 1 copies the prompt's logits it keeps); no copy a token.
                address = ctypes.addressof(llama_cpp.llama_get_logits_ith(self.ctx, seq.out).contents)
                row = self._logits_type.from_address(address)
                logits = np.frombuffer(row, dtype=np.float32)  # type: ignore[call-overload]  # a ctypes array is a buffer
                self._guard(seq, lambda seq=seq, logits=logits: self._advance(seq, logits))  # type: ignore[misc]

    def _guard(self, seq: _Sequence, fn: Callable[[], None]) -> None:
        try:
            fn()
        except ClawnodeError as error:  # the request's own (a grammar llama.cpp refuses, a dead end): its prompt counts
            self._end(seq, error, counted=True)
        except Exception as error:  # llama.cpp failures come as several types
            log.exception("generation on %s failed", self.model.name)
            self._end(seq, ClawnodeError(ErrorCode.INTERNAL, f"generation failed: {error}"))

    def _cancelled(self, seq: _Sequence) -> None:
        seq.reasons.append("cancelled")
        self._end(seq)

    def _advance(self, seq: _Sequence, logits: Any) -> None:
        """Feed the sequence the logits of its last token; start its next choice when one ends."""
        import llama_cpp

        request, slot = seq.request, seq.slot
        assert slot is not None and seq.picker is not None
        if request.n > 1 and seq.choice is None and seq.index == 0:
            seq.prompt_logits = logits.copy()
        while True:
            if seq.choice is None:
                grammar = (
                    GrammarConstraint(self.llama._model.vocab, self.n_vocab, request.grammar, request.grammar_param)
                    if request.grammar is not None
                    else None
                )
                parser = ToolCallParser(request.tools.forced) if request.tools is not None else None
                seq.choice = _Choice(
                    self.llama,
                    request,
                    seq.index,
                    seq.picker,
                    grammar,
                    parser,
                    seq.stops,
                    seq.cancel,
                    seq.emit,
                    self.model._texts,
                )
            choice = seq.choice
            try:
                token = choice.step(logits)
            except BaseException:
                choice.abandon()  # before ``_guard`` delivers the error
                if choice.grammar is not None:
                    choice.grammar.close()
                seq.choice = None
                raise
            if token is not None:
                seq.next_token = token
                return
            choice.end()
            if choice.grammar is not None:
                choice.grammar.close()
            seq.choice = None
            if seq.first is None:
                seq.first = choice.first
            seq.total += choice.generated
            finish = choice.finish
            if finish == "stop" and choice.parser is not None and choice.parser.called:
                finish = "tool_calls"
            seq.reasons.append(finish)
            if finish == "cancelled" or seq.index + 1 >= request.n:
                self._end(seq)
                return
            if finish != "cancelled":
                seq.emit({"index": seq.index, "tokens": 0, "text": "", "finish_reason": finish})
            seq.index += 1
            # The next choice starts from the prompt again: drop the last one's tokens.
            if llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, len(seq.prompt), -1):
                slot.tokens = slot.tokens[: len(seq.prompt)]
                seq.pos = len(seq.prompt)
                logits = seq.prompt_logits
                continue
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            slot.tokens, seq.pos, seq.pending = [], 0, list(seq.prompt)
            return

    def _end(self, seq: _Sequence, error: BaseException | None = None, *, counted: bool = False) -> None:
        """The sequence is done: finished, cancelled, or failed with ``error`` (``counted``: a failure
        of the request's own, after which the prompt tokens decoded so far are told with the error)."""
        if seq.choice is not None:  # ended mid-choice (a failed decode, ``fail_all``): its block first
            seq.choice.abandon()
            if seq.choice.grammar is not None:
                seq.choice.grammar.close()
        seq.choice = None
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            seq.slot.busy = False
            seq.slot.used = time.monotonic()
            seq.slot = None
        # A prompt is decoded a batch at a time: one cancelled while decoding counts what was decoded.
        decoded = len(seq.prompt) - (len(seq.pending) if seq.index == 0 else 0)
        if error is not None:
            seq.finish(TokenUsage(decoded, seq.total, seq.cached) if counted else None, [], None, 0.0, error)
            return
        reasons = seq.reasons
        if reasons and reasons[-1] != "cancelled":
            seq.emit({"index": seq.index, "tokens": 0, "text": "", "finish_reason": reasons[-1]})
        elapsed = time.perf_counter() - seq.first if seq.first is not None else 0.0
        usage = TokenUsage(decoded, seq.total, seq.cached)
        seq.finish(usage, reasons, seq.first, elapsed, None)


class EmbedProgress:
    """An embeddings job's progress, shared with the worker: :meth:`cut` stops it before its next
    input and tells the input tokens it had taken by then (those embedded and the one being embedded:
    what a cut embeddings call cost the engine)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cut = False
        self._tokens = 0

    def take(self, tokens: int) -> bool:
        """On the worker, before an input of ``tokens`` is embedded: False once cut (stop)."""
        with self._lock:
            if self._cut:
                return False
            self._tokens += tokens
            return True

    def cut(self) -> int:
        with self._lock:
            self._cut = True
            return self._tokens


class TokenStream:
    """A generation in progress: ``async with model.stream_chat(...) as stream: async for piece in stream``.

    Pieces are text (a multi-byte character split over tokens comes out whole). After the last piece,
    ``completion`` holds the exact usage. Leaving the ``async with`` early cancels the generation.

    A stream from :meth:`LlamaModel.stream_generate` yields chunk dicts instead (the chat service's
    chunk contract): ``{"index", "tokens", "text", "logprobs"?, "tool_calls"?, "finish_reason"?}``,
    one per sampled token (consecutive plain ones joined into one while trio has not taken them yet:
    ``tokens`` says how many it holds) and a last one per choice (``tokens`` 0) with its ``finish_reason``; with
    ``Sampling.commit_top``, also ``"commit"`` (verified inference's positions: a list of
    ``CommitBlock``, a block of tokens at a time).
    """

    def __init__(self, model: LlamaModel, request: _Request, *, chunks: bool = False) -> None:
        self._model = model
        # The prompt's token ids as the engine built them for this request (set on the worker before
        # its decode; None until then): what it decoded, known without tokenizing again (a tokenize
        # waits in the admission queue behind other generations). Verified inference's proof binds them.
        # Kept in a box the request's closure holds, not on ``self``: a closure over the stream would make
        # a cycle (stream -> request -> closure -> stream) that only the garbage collector frees.
        built: list[list[int]] = []
        self._prompt_built = built
        build = request.prompt

        def prompt(llama: Any) -> tuple[list[int], list[str]]:  # runs on the worker, before the decode
            tokens, stops = build(llama)
            built.append(list(tokens))
            return tokens, stops

        self._request = replace(request, prompt=prompt)
        self._chunks = chunks
        self._send, self._receive = trio.open_memory_channel[tuple[str, Any]](math.inf)
        self._cancel = threading.Event()
        self._done = trio.Event()
        self._admitted = False
        self._release_at_end = False  # left before its job ended: the job's end frees the admission
        self.completion: Completion | None = None
        self._pending: tuple[str, Any] | None = None  # an end or error read ahead by drain_ready
        self._ready: deque[Any] = deque()  # pieces received, not yet handed out
        # What the engine did, set when its job ends even if nobody read it (e.g. after a cancel):
        # ``final.usage.completion_tokens`` tells how far a cancelled generation got. No text.
        self.final: Completion | None = None
        # The prompt tokens the engine began to decode in one go (set on the worker as it begins, the
        # single-sequence path only): what a job still running when the stream was left has cost. After
        # a failure of the request's own (``failed``), the prompt tokens it had decoded, on either path.
        self.prefill_begun = 0
        # The generation ended with the engine's error (raised by the iteration), not by a cut.
        self.failed = False
        # Of a chunk stream left before its end (``aclose``), the chunks the engine produced that were
        # never handed out, collected once its job ended (``SHUTDOWN_WAIT_S`` at most): their text never
        # left, but their ``commit`` entries may hold the top k of tokens whose text did (a block ends
        # after its last token's text, and the block in progress is handed out as the cancel ends it).
        self.unread: list[Any] = []

    @property
    def prompt_ids(self) -> list[int] | None:
        """The prompt's token ids as the engine built them for this request (None until the worker built
        them, before its decode)."""
        return self._prompt_built[-1] if self._prompt_built else None

    @property
    def usage(self) -> TokenUsage | None:
        return self.completion.usage if self.completion is not None else None

    async def __aenter__(self) -> TokenStream:
        await self._model._admit(self)
        self._admitted = True
        try:
            self._model._submit_generation(
                self._request,
                self._send,
                self._cancel,
                self._job_ended,
                self._set_final,
                merge=self._chunks,
                began=self._began,
            )
        except BaseException:
            self._admitted = False
            self._model._release(self)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the generation and wait for its job, at most ``SHUTDOWN_WAIT_S``: a job that outlasts
        that (a long prompt decoded in one go does not look at the cancel) keeps the admission held
        until it ends, so the next request is not admitted while the worker is still busy with it."""
        self._cancel.set()
        if self._admitted:
            self._admitted = False
            try:
                with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_WAIT_S):
                    await self._done.wait()
            finally:
                if self._done.is_set():
                    self._model._release(self)
                else:
                    self._release_at_end = True
        if self._chunks and self.completion is None:
            self._keep_unread()
        self._receive.close()

    def _keep_unread(self) -> None:
        """``unread``: the pieces received or delivered by now and not handed out (the receiving side
        stays open until the job ended, so its last ones are among them)."""
        unread = list(self._ready)
        self._ready.clear()
        while True:
            try:
                kind, value = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if kind == "pieces":
                unread.extend(value)
        self.unread = unread

    def _job_ended(self) -> None:  # runs in trio, once the engine's job for this stream ended
        self._done.set()
        if self._release_at_end:
            self._release_at_end = False
            self._model._release(self)

    def _began(self, tokens: int) -> None:  # runs on the worker
        self.prefill_begun = tokens

    def _set_final(self, completion: Completion) -> None:
        self.final = completion

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> Any:
        """The next text piece (a chunk dict for ``stream_generate``)."""
        while True:
            if not self._admitted:
                raise StopAsyncIteration
            if self._ready:
                value = self._ready.popleft()
                if self._chunks:
                    return value
                if value.get("text"):
                    return value["text"]
                continue
            if self.completion is not None:
                raise StopAsyncIteration
            if self._pending is not None:
                (kind, value), self._pending = self._pending, None
            else:
                try:
                    kind, value = await self._receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    raise StopAsyncIteration from None
            if kind == "pieces":
                self._ready.extend(value)
                continue
            if kind == "end":
                self.completion = value
                raise StopAsyncIteration
            self.failed = True
            raise value  # kind == "error"

    def drain_ready(self) -> list[Any]:
        """The pieces (chunks) the engine has already produced, without waiting.

        Lets a streamer send what piled up as one frame: no delay while the engine is slower than
        the wire, far fewer frames when it is faster.
        """
        pieces: list[Any] = []
        while True:
            while self._ready:
                value = self._ready.popleft()
                if self._chunks:
                    pieces.append(value)
                elif value.get("text"):
                    pieces.append(value["text"])
            if self._pending is not None:
                break
            try:
                kind, value = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if kind == "pieces":
                self._ready.extend(value)
            else:
                self._pending = (kind, value)
        return pieces

    async def collect(self) -> Completion:
        pieces = [piece async for piece in self]
        if self.completion is None:
            raise ClawnodeError(ErrorCode.INTERNAL, "the generation ended without a result")
        text = "".join(p.get("text", "") for p in pieces) if self._chunks else "".join(pieces)
        return Completion(
            text=text,
            usage=self.completion.usage,
            finish_reason=self.completion.finish_reason,
            first_token_s=self.completion.first_token_s,
            generation_s=self.completion.generation_s,
            finish_reasons=self.completion.finish_reasons,
        )


class LlamaModel:
    """One GGUF model on its own worker thread. ``await load()`` before anything else."""

    def __init__(
        self,
        path: Path | str,
        *,
        name: str = "model",
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        chat_format: str | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB,
        parallel: int | None = None,
    ) -> None:
        if parallel is not None and not 1 <= parallel <= MAX_PARALLEL:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"parallel must be from 1 to {MAX_PARALLEL}")
        self.path = Path(path)
        self.name = name
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_gpu_layers = n_gpu_layers
        self.chat_format = chat_format or ""
        self.max_queue = max_queue
        # Saved KV caches of earlier sequences (the worker's alone), at most this many bytes in all.
        self.prefix_cache_bytes = max(0, prefix_cache_mb) << 20
        self._prefixes: list[_SavedPrefix] = []
        self._live_owner = ""  # the borrower whose tokens the single-sequence path's cache holds
        # Sequences decoded at once (continuous batching; None: chosen at load, see
        # _default_parallel); 1 runs the single-sequence path, one request after another.
        self.parallel = parallel
        self.admission = FairAdmission(name, slots=parallel or 1, max_queue=max_queue)
        self._batcher: _Batcher | None = None
        self._texts: _TokenTexts | None = None
        self._tickets: dict[int, int] = {}  # id(holder) -> its admission ticket
        self._worker: _Worker | None = None
        self._llama: Any = None
        self._embedder: Any = None
        self._grammar_checks = threading.Lock()  # ``check_grammar`` (worker threads) against the free
        self._formatter: Callable[..., Any] | None = None
        self.slots = TemplateSlots(family="")
        self._template_tokens: _TemplateTokens | None = None
        # Other formats this file is rendered with for a verifier (``format_chat``'s ``chat_format``).
        self._other_formatters: dict[str, tuple[Callable[..., Any], TemplateSlots]] = {}
        self.metadata: dict[str, str] = {}
        self.load_report: LoadReport | None = None

    # lifecycle

    @property
    def loaded(self) -> bool:
        return self._llama is not None

    def check_grammar(self, grammar: str, param: str) -> None:
        """Blocking (a worker thread's job, as building the grammar is): ``E_INVALID_ARGUMENT`` for a
        grammar llama.cpp's parser refuses (a JSON Schema ``pattern`` such as ``^[^\\s\\S]$`` or a
        backreference makes one), before the request is admitted or any of its prompt is decoded: the
        engine builds a choice's grammar only for its first token, after the prompt. Nothing to say while
        the model is not loaded (its engine refuses the call then)."""
        with self._grammar_checks:  # not while the model is freed (``aclose``)
            llama = self._llama
            if llama is None:
                return
            GrammarConstraint(llama._model.vocab, int(llama.n_vocab()), grammar, param).close()

    async def load(self, progress: Progress | None = None) -> LoadReport:
        """Load the model on its worker thread; ``progress`` gets 0.0 at the start, llama.cpp's own
        load progress in between (called on the worker thread) and 1.0 when done."""
        if self.load_report is not None:
            return self.load_report
        if not self.path.is_file():
            raise ClawnodeError(ErrorCode.NOT_FOUND, f"model {self.name}: its file was not found")
        if self._worker is None:
            self._worker = _Worker(self.name)
        if progress is not None:
            progress(0.0)
        try:
            report = await self._worker.run(lambda: self._load_blocking(progress))
        except BaseException:
            self._worker.stop()
            self._worker = None
            raise
        self.load_report = report
        if progress is not None:
            progress(1.0)
        log.info(
            "model %s loaded in %.2f s (%s, n_ctx %d, RSS +%d MiB)",
            self.name,
            report.seconds,
            report.chat_format,
            report.n_ctx,
            report.rss_delta_bytes >> 20,
        )
        return report

    def _llama_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model_path": str(self.path),
            "n_ctx": self.n_ctx,
            "n_gpu_layers": self.n_gpu_layers,
            "verbose": False,
        }
        if self.n_threads is not None:
            kwargs["n_threads"] = self.n_threads
            kwargs["n_threads_batch"] = self.n_threads
        return kwargs

    def _load_blocking(self, progress: Progress | None = None) -> LoadReport:
        from llama_cpp import Llama

        before = _rss()
        started = time.perf_counter()
        try:
            with _load_progress(progress), _parallel_context(self.parallel, self.n_ctx) as chosen:
                llama = Llama(**self._llama_kwargs())
        except (ValueError, RuntimeError) as error:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"cannot load {self.path.name}: {error}") from None
        seconds = time.perf_counter() - started
        self.metadata = dict(llama.metadata)
        template = self.metadata.get("tokenizer.chat_template")
        architecture = self.metadata.get("general.architecture", "")
        chat_format = self.chat_format
        if not chat_format:
            if template:
                chat_format = "gguf-template"
            elif architecture.startswith("gemma") or "gemma" in self.path.name.lower():
                chat_format = "gemma"
            else:
                chat_format = "llama-2"  # llama-cpp-python's own fallback
        self._template_tokens = _TemplateTokens.of(llama, template)
        self._formatter, self.slots = _chat_formatter(chat_format, self._template_tokens, self.path.name)
        if template and chat_format != "gguf-template":
            # Compiled here, on the worker: a verifier asked to render in the file's own template
            # (a provider of this file on its default) must not compile a large one on the trio loop.
            with contextlib.suppress(Exception):  # a template jinja refuses: such a request is not rendered
                self._other_formatters["gguf-template"] = _chat_formatter(
                    "gguf-template", self._template_tokens, self.path.name
                )
        self.chat_format = chat_format
        self._llama = llama
        self._texts = _TokenTexts(llama)
        self.admission.slots = chosen[0]
        if chosen[0] > 1:
            self._batcher = _Batcher(self, llama, chosen[0])
            assert self._worker is not None
            self._worker.background = self._batcher
        return LoadReport(
            seconds=seconds,
            rss_bytes=_rss(),
            rss_delta_bytes=max(0, _rss() - before),
            n_ctx=self._context_length(llama),
            chat_format=chat_format,
            metadata={k: v for k, v in self.metadata.items() if not k.startswith("tokenizer.chat_template")},
        )

    def features(self) -> frozenset[str]:
        """The request features this model serves (the capability record's ``features``):
        ``tools``, ``json_schema`` (also ``json_object``), ``logprobs``, ``n``; every loaded model
        serves them all (grammars, logprobs and choices are the engine's, not the model's)."""
        return FEATURES

    @property
    def context_length(self) -> int:
        """The tokens a prompt and its reply fit in (the configured ``n_ctx`` before loading)."""
        return self._context_length(self._llama) if self._llama is not None else self.n_ctx

    @property
    def signed_chat_format(self) -> str | None:
        """The chat format a commitment names for this model's calls: its own, where it is one of
        ``signable_chat_formats`` (another spelling, or a format that drops or adds text, signs none)."""
        family = self.chat_family
        return family if family in signable_chat_formats() else None

    @property
    def chat_family(self) -> str:
        """The chat template family: ``gguf-template`` (the GGUF's own Jinja template) or a
        llama-cpp-python format name such as ``gemma``; empty before loading."""
        return self.chat_format if self._llama is not None else ""

    def _context_length(self, llama: Any) -> int:
        # llama.cpp rounds the context up to a multiple of 256 and Llama.n_ctx() reports that, but
        # llama-cpp-python sizes its token buffer by the n_ctx asked for: going past it raises
        # ValueError in Llama.eval. The smaller of the two is what really fits.
        return min(self.n_ctx, int(llama.n_ctx()))

    async def aclose(self) -> None:
        """Free the instances and stop the worker thread (waits for a generation in progress)."""
        worker, self._worker = self._worker, None
        if worker is None:
            return

        def free() -> None:
            batcher, self._batcher = self._batcher, None
            if batcher is not None:
                batcher.close()  # the sequences in progress finish first
                worker.background = None
            with self._grammar_checks:  # a grammar being parsed on another thread reads the vocabulary
                for instance in (self._llama, self._embedder):
                    if instance is not None:
                        instance.close()
                self._llama = self._embedder = None

        with trio.CancelScope(shield=True):
            await worker.run(free)
            worker.stop()
        self.load_report = None

    # admission

    async def _admit(self, borrower: object) -> None:
        if self._llama is None or self._worker is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, f"model {self.name} is not loaded")
        self._tickets[id(borrower)] = await self.admission.acquire()

    def _release(self, borrower: object) -> None:
        ticket = self._tickets.pop(id(borrower), None)
        if ticket is not None:
            self.admission.release(ticket)

    async def _exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker as one admitted request: admitted until ``fn`` ends, also when its
        waiter was cancelled before (the worker is busy with it until then)."""
        borrower = object()
        await self._admit(borrower)
        worker = self._worker
        if worker is None:
            self._release(borrower)
            raise ClawnodeError(ErrorCode.UNAVAILABLE, f"model {self.name} is not loaded")
        return await worker.run(fn, ended=lambda: self._release(borrower))

    @property
    def queued(self) -> int:
        """Requests waiting for the model (not counting the one being served)."""
        return self.admission.waiting

    # tokens

    async def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        return await self._exclusive(lambda: list(self._llama.tokenize(text.encode(), add_bos, special)))

    async def format_chat(
        self, messages: list[Message], tools: ToolUse | None = None, *, chat_format: str | None = None
    ) -> str:
        """The prompt text the chat template makes of ``messages`` (rewritten for its slots).
        ``chat_format``: render as a node serving this file with that format would (a verifier renders
        what the provider signed it rendered with); an unknown name is ``E_INVALID_ARGUMENT``."""
        check_messages(messages)
        formatter, slots = self._formatter_of(chat_format)
        return str(self._format(messages, tools, formatter, slots).prompt)

    def _formatter_of(self, chat_format: str | None) -> tuple[Callable[..., Any], TemplateSlots]:
        assert self._formatter is not None and self._template_tokens is not None
        if not chat_format or chat_format == self.chat_format:
            return self._formatter, self.slots
        known = self._other_formatters.get(chat_format)
        if known is None:
            if chat_format not in signable_chat_formats():  # bounded: exact names only
                raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"unknown chat_format {chat_format!r}")
            known = _chat_formatter(chat_format, self._template_tokens, self.path.name)
            self._other_formatters[chat_format] = known
        return known

    def _format(
        self,
        messages: list[Message],
        tools: ToolUse | None = None,
        formatter: Callable[..., Any] | None = None,
        slots: TemplateSlots | None = None,
    ) -> Any:
        formatter, slots = formatter or self._formatter, slots or self.slots
        assert formatter is not None
        prepared = prepare_messages(messages, slots, tools)
        kwargs: dict[str, Any] = {}
        if tools is not None and tools.active and slots.tools:
            kwargs["tools"] = [tool.openai() for tool in tools.tools]
        try:
            return formatter(messages=prepared, **kwargs)
        except Exception as error:  # noqa: BLE001 - jinja2 raises many types for a bad conversation
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"the chat template refused: {error}") from None

    def _chat_prompt(
        self, messages: list[Message], assistant_prefix: str = "", tools: ToolUse | None = None
    ) -> Callable[[Any], tuple[list[int], list[str]]]:
        def build(llama: Any) -> tuple[list[int], list[str]]:
            result = self._format(messages, tools)
            # Continuing an answer: the reply so far follows the template's generation prompt.
            prompt = result.prompt + assistant_prefix
            tokens = llama.tokenize(prompt.encode(), not result.added_special, True)
            stops = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
            return list(tokens), [s for s in stops if s]

        return build

    @staticmethod
    def _text_prompt(prompt: str | list[int], suffix: str = "") -> Callable[[Any], tuple[list[int], list[str]]]:
        """A plain prompt: text (a BOS token added) or token ids as they are; ``suffix`` (the
        router's failover text so far) follows it."""

        def build(llama: Any) -> tuple[list[int], list[str]]:
            if isinstance(prompt, list):
                n_vocab = llama.n_vocab()
                if not all(0 <= token < n_vocab for token in prompt):
                    raise invalid(f"prompt holds a token id outside the vocabulary of {n_vocab}", "prompt")
                tail = list(llama.tokenize(suffix.encode(), False, False)) if suffix else []
                if tail and not suffix.startswith(" ") and llama.detokenize(tail[:1]) == b" ":
                    tail = tail[1:]  # a SentencePiece tokenizer's space prefix: not part of the text
                return [*prompt, *tail], []
            return list(llama.tokenize((prompt + suffix).encode(), True, False)), []

        return build

    # generation

    def stream_generate(
        self,
        *,
        messages: list[Message] | None = None,
        prompt: str | list[int] | None = None,
        max_tokens: int = 256,
        sampling: Sampling | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        n: int = 1,
        schema: dict[str, Any] | None = None,
        tools: ToolUse | None = None,
        assistant_prefix: str = "",
        grammar: str | None = None,
    ) -> TokenStream:
        """Stream chunk dicts (see :class:`TokenStream`) of a chat (``messages``) or a plain
        completion (``prompt``: text, or token ids taken as they are), with ``n`` choices one after
        another; ``assistant_prefix`` continues a reply begun elsewhere (after the generation
        prompt, or after the plain prompt). ``schema`` (already checked by ``grammar.check_schema``) or active ``tools``
        constrain every choice by a grammar; ``grammar``, when given, is the one already built from
        them (``schema_grammar``/``tools_grammar`` take seconds on large schemas: a worker thread's job)."""
        sampling = sampling or Sampling()
        if messages is not None:
            check_messages(messages)
            build = self._chat_prompt(messages, assistant_prefix, tools)
        elif isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            build = self._text_prompt(prompt, assistant_prefix)
        else:
            raise invalid("prompt must be a string or a non-empty list of token ids", "prompt")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
            raise invalid(f"n must be an integer from 1 to {MAX_CHOICES}", "n")
        request = _request(build, max_tokens, sampling, seed, stop)
        request.n = n
        if tools is not None and tools.active:
            if schema is not None:
                raise invalid("tools and a JSON response_format cannot be combined", "response_format")
            request.grammar, request.grammar_param, request.tools = grammar or tools_grammar(tools), "tools", tools
        elif schema is not None:
            request.grammar = grammar or schema_grammar(schema)
        return TokenStream(self, request, chunks=True)

    def stream_chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        top_p: float = 0.95,
        assistant_prefix: str = "",
    ) -> TokenStream:
        """Stream a chat reply: use as ``async with model.stream_chat(...) as stream``.

        ``assistant_prefix`` continues a reply another engine started (the router's failover).
        """
        check_messages(messages)
        build = self._chat_prompt(messages, assistant_prefix)
        return TokenStream(self, _request(build, max_tokens, _sampling(temperature, top_p), seed, stop))

    async def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        top_p: float = 0.95,
    ) -> Completion:
        stream = self.stream_chat(
            messages, max_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop, top_p=top_p
        )
        async with stream:
            return await stream.collect()

    def stream_complete(
        self,
        prompt: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        top_p: float = 0.95,
    ) -> TokenStream:
        """Stream a plain completion of ``prompt`` (a BOS token is added; no chat template)."""
        if not isinstance(prompt, str):
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "prompt must be a string")
        return TokenStream(
            self, _request(self._text_prompt(prompt), max_tokens, _sampling(temperature, top_p), seed, stop)
        )

    async def complete(
        self,
        prompt: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        top_p: float = 0.95,
    ) -> Completion:
        stream = self.stream_complete(
            prompt, max_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop, top_p=top_p
        )
        async with stream:
            return await stream.collect()

    def _submit_generation(
        self,
        request: _Request,
        send: trio.MemorySendChannel[tuple[str, Any]],
        cancel: threading.Event,
        done: Callable[[], None],
        set_final: Callable[[Completion], None],
        *,
        merge: bool = False,
        began: Callable[[int], None] | None = None,
    ) -> None:
        """``merge``: a chunk joins the one before it while trio has not taken that yet, as
        ``runtime.inference.service.merge_chunks`` would join them (plain text and ``commit`` entries of
        one choice): trio then handles one chunk a wake-up, not one a token. ``done``: called in trio
        when the job ended. ``began``: told on the worker how many prompt tokens the single-sequence
        path is about to decode (it does not look at ``cancel`` until they are), and, when a request
        fails with an error of its own after its prompt was decoded (a grammar llama.cpp refuses), the
        prompt tokens decoded by then (0 after the engine's own failure)."""
        assert self._worker is not None
        token = trio.lowlevel.current_trio_token()
        admitted = time.perf_counter()

        def deliver(item: tuple[str, Any]) -> None:  # runs in trio
            try:
                send.send_nowait(item)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                cancel.set()  # nobody listens any more

        def to_trio(fn: Callable[..., None], *args: Any) -> None:  # runs on the worker
            try:
                token.run_sync_soon(fn, *args)
            except trio.RunFinishedError:
                cancel.set()

        # Items wait here until trio takes them: one wake-up of trio per batch, not per token (each
        # wake-up costs a socket write and a GIL hand-over, about a millisecond on a busy machine).
        # Trio is woken at once unless it was woken less than WAKE_GAP_S ago; the last item of a
        # generation always wakes it, so an item waits at most one token's time.
        waiting: list[tuple[str, Any]] = []
        lock = threading.Lock()
        last_wake = [0.0]
        scheduled = [False]

        def take() -> None:  # runs in trio
            with lock:
                items = waiting.copy()
                waiting.clear()
                scheduled[0] = False
            # Consecutive pieces go as one item (one channel operation a wake-up, not one a token).
            pieces: list[Any] = []
            for kind, value in items:
                if kind == "piece":
                    pieces.append(value)
                    continue
                if pieces:
                    deliver(("pieces", pieces))
                    pieces = []
                deliver((kind, value))
            if pieces:
                deliver(("pieces", pieces))

        def push(item: tuple[str, Any], last: bool = False) -> None:  # runs on the worker
            now = time.perf_counter()
            with lock:
                if not (merge and item[0] == "piece" and waiting and _join(waiting[-1], item[1])):
                    waiting.append(item)
                if scheduled[0] or (not last and now - last_wake[0] < WAKE_GAP_S):
                    return
                scheduled[0] = True
                last_wake[0] = now
            to_trio(take)

        def finish(
            usage: TokenUsage | None,
            reasons: list[str],
            first: float | None,
            elapsed: float,
            error: BaseException | None,
        ) -> None:  # runs on the worker: a batched sequence ended
            try:
                if error is not None:
                    if usage is not None and began is not None:  # the request's own failure: its prompt as decoded
                        began(usage.prompt_tokens)
                    push(("error", error), last=True)
                    return
                assert usage is not None
                completion = Completion(
                    text="",
                    usage=usage,
                    finish_reason=reasons[-1],
                    first_token_s=None if first is None else first - admitted,
                    generation_s=elapsed,
                    finish_reasons=tuple(reasons),
                )
                to_trio(set_final, completion)
                push(("end", completion), last=True)
            finally:
                to_trio(send.close)
                to_trio(done)

        batcher = self._batcher
        if batcher is not None:
            sequence = _Sequence(request, cancel, lambda chunk: push(("piece", chunk)), finish)
            self._worker.submit(lambda: batcher.add(sequence))
            return

        def job() -> None:
            try:
                result = self._generate_blocking(request, cancel, lambda chunk: push(("piece", chunk)), began)
                completion = Completion(
                    text="",
                    usage=result[0],
                    finish_reason=result[1][-1],
                    first_token_s=None if result[2] is None else result[2] - admitted,
                    generation_s=result[3],
                    finish_reasons=tuple(result[1]),
                )
                to_trio(set_final, completion)
                push(("end", completion), last=True)
            except ClawnodeError as error:  # the request's own: the prompt told to ``began`` counts
                push(("error", error), last=True)
            except Exception as error:  # llama.cpp failures come as several types
                log.exception("generation on %s failed", self.name)
                if began is not None:
                    began(0)  # the engine's own failure: its prompt is not the request's to pay
                push(("error", ClawnodeError(ErrorCode.INTERNAL, f"generation failed: {error}")), last=True)
            finally:
                to_trio(send.close)
                to_trio(done)

        self._worker.submit(job)

    def _eval_prompt(self, llama: Any, tokens: list[int], owner: str) -> int:
        """Decode the prompt, reusing the cached prefix it shares with the last sequence, or with a
        saved earlier one when that shares more, both ``owner``'s only; returns how many tokens were
        reused (the next turn of a conversation, a common system prompt). A live sequence about to be
        overwritten is saved first (bounded: ``MAX_SAVED_PREFIXES`` states, ``prefix_cache_bytes`` in
        all, oldest out)."""
        keep = 0
        reusable = not (getattr(llama, "_is_recurrent", False) or getattr(llama, "_is_hybrid", False))
        if reusable:
            keep = _owned_prefix(self._live_owner, llama.input_ids[: llama.n_tokens].tolist(), owner, tokens)
            if self.prefix_cache_bytes > 0:
                best, shared = self._best_saved_prefix(tokens, owner)
                if llama.n_tokens - keep >= MIN_SAVED_PREFIX:
                    self._save_prefix(llama)  # the live sequence would be lost: keep it for its next turn
                if best is not None and shared > keep + MIN_SAVED_PREFIX // 4 and self._restore_prefix(llama, best):
                    keep = shared
            keep = min(keep, len(tokens) - 1)  # at least one token decoded: fresh logits
        if keep > 0 and not llama._ctx.kv_cache_seq_rm(-1, keep, -1):
            keep = 0  # this cache cannot drop a suffix: decode it all again
        if keep == 0:
            llama.reset()
        llama.n_tokens = keep
        self._live_owner = owner
        llama.eval(tokens[keep:])
        return keep

    def _best_saved_prefix(self, tokens: Sequence[int], owner: str) -> tuple[_SavedPrefix | None, int]:
        """The saved state of ``owner``'s that shares the longest prefix with ``tokens`` (the first
        of equals in the cache's list), and how many tokens it shares; (None, 0) when ``owner`` has none."""
        mine = [p for p in self._prefixes if p.owner == owner]
        best = max(mine, key=lambda p: _common_prefix(p.tokens, tokens), default=None)
        return best, _common_prefix(best.tokens, tokens) if best is not None else 0

    def _save_prefix(self, llama: Any) -> None:
        self._save_prefix_of(llama._ctx.ctx, 0, llama.input_ids[: llama.n_tokens].tolist(), self._live_owner)

    def _save_prefix_of(self, ctx: Any, seq_id: int, tokens: list[int], owner: str) -> None:
        """Keep the KV cache of sequence ``seq_id`` (holding ``tokens`` for ``owner``) as a saved state."""
        import llama_cpp

        size = int(llama_cpp.llama_state_seq_get_size(ctx, seq_id))
        if size <= 0 or size > self.prefix_cache_bytes:
            return
        data = (ctypes.c_uint8 * size)()
        if int(llama_cpp.llama_state_seq_get_data(ctx, data, size, seq_id)) != size:
            return
        # An older state of the same conversation (a prefix of this one) is superseded.
        self._prefixes = [
            p for p in self._prefixes if p.owner != owner or _common_prefix(p.tokens, tokens) < len(p.tokens)
        ]
        self._prefixes.append(_SavedPrefix(list(tokens), data, size, time.monotonic(), owner))
        self._prefixes.sort(key=lambda p: p.used)
        while len(self._prefixes) > MAX_SAVED_PREFIXES or sum(p.size for p in self._prefixes) > self.prefix_cache_bytes:
            self._prefixes.pop(0)  # the least recently used

    def _restore_prefix(self, llama: Any, saved: _SavedPrefix) -> bool:
        llama._ctx.kv_cache_clear()
        if not self._restore_prefix_to(llama._ctx.ctx, 0, saved):
            llama._ctx.kv_cache_clear()
            llama.n_tokens = 0
            return False
        llama.input_ids[: len(saved.tokens)] = saved.tokens
        llama.n_tokens = len(saved.tokens)
        return True

    def _restore_prefix_to(self, ctx: Any, seq_id: int, saved: _SavedPrefix) -> bool:
        """Load a saved state into the (empty) sequence ``seq_id``; a state that fails is dropped."""
        import llama_cpp

        if int(llama_cpp.llama_state_seq_set_data(ctx, saved.data, saved.size, seq_id)) != saved.size:
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), seq_id, -1, -1)
            self._prefixes.remove(saved)
            return False
        saved.used = time.monotonic()
        return True

    @property
    def saved_prefixes(self) -> int:
        """How many earlier sequences' KV caches are kept to resume from."""
        return len(self._prefixes)

    @staticmethod
    def _logits(llama: Any, n_vocab: int) -> Any:
        import numpy as np

        pointer = llama._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(pointer, shape=(n_vocab,)).copy()

    def _generate_blocking(
        self,
        request: _Request,
        cancel: threading.Event,
        emit: Callable[[Chunk], None],
        began: Callable[[int], None] | None = None,
    ) -> tuple[TokenUsage, list[str], float | None, float]:
        """On the worker: tokenize, check the context, then per choice sample token by token and
        emit a chunk per token and a last one with the choice's finish reason. ``began``: told the
        prompt's tokens as their decode (which does not look at ``cancel``) begins.

        Returns (usage, finish reason per choice, perf_counter of the first token or None,
        generation seconds).
        """
        import llama_cpp

        llama = self._llama
        if llama is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, f"model {self.name} is not loaded")
        prompt_tokens, template_stops = request.prompt(llama)
        n_ctx = self._context_length(llama)
        if len(prompt_tokens) + request.max_tokens > n_ctx:
            raise ClawnodeError(
                ErrorCode.INVALID_ARGUMENT,
                f"too many tokens: the prompt has {len(prompt_tokens)} and max_tokens is {request.max_tokens}, "
                f"but {self.name}'s context holds {n_ctx}",
            )
        if not prompt_tokens:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the prompt is empty")
        usage_prompt = len(prompt_tokens)
        if cancel.is_set():  # cancelled before its prompt was decoded: no prompt token was processed
            return TokenUsage(0, 0), ["cancelled"] * request.n, None, 0.0
        if request.max_tokens == 0:
            return TokenUsage(usage_prompt, 0), ["length"] * request.n, None, 0.0
        vocab = llama._model.vocab
        n_vocab = int(llama.n_vocab())
        picker = TokenPicker(request.sampling, n_vocab, request.seed)
        if began is not None:
            began(usage_prompt)
        cached = self._eval_prompt(llama, prompt_tokens, request.owner)
        prompt_logits = self._logits(llama, n_vocab)
        stops = [*request.stop, *template_stops]
        total = 0
        reasons: list[str] = []
        first: float | None = None
        for index in range(request.n):
            if index:  # the next choice starts from the prompt again: drop the last one's tokens
                if llama._ctx.kv_cache_seq_rm(-1, len(prompt_tokens), -1):
                    llama.n_tokens = len(prompt_tokens)
                else:
                    self._eval_prompt(llama, prompt_tokens, request.owner)
            grammar = (
                GrammarConstraint(vocab, n_vocab, request.grammar, request.grammar_param)
                if request.grammar is not None
                else None
            )
            parser = ToolCallParser(request.tools.forced) if request.tools is not None else None
            try:
                generated, finish, started = self._generate_choice(
                    llama, request, index, prompt_logits, picker, grammar, parser, stops, cancel, emit
                )
            finally:
                if grammar is not None:
                    grammar.close()
            if first is None:
                first = started
            total += generated
            if finish == "stop" and parser is not None and parser.called:
                finish = "tool_calls"
            reasons.append(finish)
            if finish != "cancelled":
                emit({"index": index, "tokens": 0, "text": "", "finish_reason": finish})
            else:
                break
        del llama_cpp
        elapsed = time.perf_counter() - first if first is not None else 0.0
        return TokenUsage(usage_prompt, total, cached), reasons, first, elapsed

    def _generate_choice(
        self,
        llama: Any,
        request: _Request,
        index: int,
        logits: Any,
        picker: TokenPicker,
        grammar: GrammarConstraint | None,
        parser: ToolCallParser | None,
        stops: list[str],
        cancel: threading.Event,
        emit: Callable[[Chunk], None],
    ) -> tuple[int, str, float | None]:
        """One choice; returns (tokens sampled, finish reason, perf_counter of its first token)."""
        n_vocab = logits.shape[0]
        choice = _Choice(llama, request, index, picker, grammar, parser, stops, cancel, emit, self._texts)
        try:
            while (token := choice.step(logits)) is not None:
                llama.eval([token])
                logits = self._logits(llama, n_vocab)
        except BaseException:
            choice.abandon()  # before the job delivers the error
            raise
        choice.end()
        return choice.generated, choice.finish, choice.first

    @staticmethod
    def _logprob_entry(llama: Any, pick: Pick, texts: _TokenTexts | None = None) -> dict[str, Any]:
        shown = (texts or _TokenTexts(llama)).shown
        assert pick.logprob is not None
        text, raw = shown(pick.token)
        tops = []
        for token, logprob in pick.top:
            top_text, top_raw = shown(token)
            tops.append({"token": top_text, "logprob": logprob, "bytes": list(top_raw)})
        return {"token": text, "logprob": pick.logprob, "bytes": list(raw), "top_logprobs": tops}

    # embeddings

    async def embed(self, texts: list[str] | list[list[int]]) -> list[list[float]]:
        vectors, _ = await self.embed_with_count(texts)
        return vectors

    async def embed_with_count(
        self, texts: list[str] | list[list[int]], *, progress: EmbedProgress | None = None
    ) -> tuple[list[list[float]], int]:
        """Mean-pooled embeddings, normalised to unit length (L2), of ``texts`` (strings, or
        lists of token ids taken as they are) and the number of tokens they took. ``progress``: how
        far the job got, and a way to stop it between inputs (a waiter cancelled does not stop it)."""
        if not isinstance(texts, list) or not texts:
            raise invalid("input must be a string or a non-empty list of strings or token lists", "input")
        if not all(isinstance(t, str) for t in texts) and not all(
            isinstance(t, list) and t and all(isinstance(x, int) and not isinstance(x, bool) for x in t) for t in texts
        ):
            raise invalid("input must be a string or a non-empty list of strings or token lists", "input")
        return await self._exclusive(lambda: self._embed_blocking(texts, progress))

    def _embed_blocking(
        self, texts: list[str] | list[list[int]], progress: EmbedProgress | None = None
    ) -> tuple[list[list[float]], int]:
        import llama_cpp
        import numpy as np

        if self._embedder is None:
            self._embedder = llama_cpp.Llama(
                **self._llama_kwargs(),
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                n_batch=self.n_ctx,  # an input is decoded in one batch: up to the whole context
                n_ubatch=self.n_ctx,
            )
        embedder = self._embedder
        limit = min(self._context_length(embedder), int(embedder.n_batch))
        n_vocab = int(embedder.n_vocab())
        tokenized: list[list[int]] = []
        for text in texts:
            tokens = list(embedder.tokenize(text.encode(), True, False)) if isinstance(text, str) else list(text)
            if not all(0 <= token < n_vocab for token in tokens):
                raise invalid(f"input holds a token id outside the vocabulary of {n_vocab}", "input")
            if len(tokens) > limit:
                raise ClawnodeError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"too many tokens: an input has {len(tokens)}, the context holds {limit}",
                )
            tokenized.append(tokens)
        vectors: list[list[float]] = []
        for tokens in tokenized:  # one sequence per decode: every token an output, mean-pooled
            if progress is not None and not progress.take(len(tokens)):
                break  # cut: nobody waits for the rest
            embedder._batch.reset()
            embedder._batch.add_sequence(tokens, 0, True)
            embedder._ctx.kv_cache_clear()
            embedder._ctx.decode(embedder._batch)
            pooled = llama_cpp.llama_get_embeddings_seq(embedder._ctx.ctx, 0)
            vector = np.ctypeslib.as_array(pooled, shape=(embedder.n_embd(),)).astype(np.float64)
            norm = float(np.linalg.norm(vector))
            vectors.append([float(x) for x in (vector / norm if norm > 0 else vector)])
        return vectors, sum(len(tokens) for tokens in tokenized)


def _sampling(temperature: float, top_p: float) -> Sampling:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "temperature must be a number from 0 to 2")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "top_p must be in (0, 1]")
    return Sampling(temperature=float(temperature), top_p=float(top_p))


def _request(
    prompt: Callable[[Any], tuple[list[int], list[str]]],
    max_tokens: int,
    sampling: Sampling,
    seed: int | None,
    stop: str | list[str] | None,
) -> _Request:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "max_tokens must be a non-negative integer")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "seed must be an integer")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "stop must be a string or a list of at most 4 strings")
    return _Request(prompt, max_tokens, sampling, seed, stops, owner=current_borrower())
