"""The inference engine as metered services of the lease market (``/clawnode/infer/1.0.0``).

``ChatService`` takes an OpenAI chat-completions body (or a completions body with ``prompt``: a
string or a list of token ids), as the API layer normalised it, checks it again (it comes from
strangers) and streams chunks::

    {"text": str, "tokens": int, "index": int (only with n > 1),
     "logprobs": [{"token", "logprob", "bytes", "top_logprobs": [...]}],
     "tool_calls": [{"index", "id"?, "type"?, "function": {"name"?, "arguments"}}],
     "finish_reason": "stop" | "length" | "tool_calls"}

``tokens`` counts the sampled tokens a chunk stands for, also when its text is empty (a tool call's
tokens are metered like any others); each choice's last chunk carries its ``finish_reason``. Its
units are the prompt's tokens (once, whatever ``n``) plus every choice's completion tokens, all
counted by the engine. Honoured: ``max_tokens`` (or ``max_completion_tokens``), ``temperature``,
``top_p``, ``seed``, ``stop``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``n``,
``logprobs``, ``top_logprobs``, ``response_format`` (``text``, ``json_object``, ``json_schema``
with ``strict``: grammar-constrained), ``tools``, ``tool_choice``, ``parallel_tool_calls``,
``continue_from`` (a reply another provider began, the router's failover: only for plain text
replies). A value it cannot honour is refused with ``INVALID_ARGUMENT`` naming the param
(``... (param: <name>)``). Other keys (``model``, ``stream``, ``user``...) are the API layer's.

``EmbeddingService`` takes ``{"input": str | list[str] | list[int] | list[list[int]]}`` (token
ids taken as they are) and sends ``{"embeddings": [...]}``, unit-length (L2) vectors; its units
are the input's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import trio

from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.engine import MAX_CHOICES, EmbedProgress, LlamaModel, joinable
from runtime.inference.grammar import check_schema, invalid, schema_grammar
from runtime.inference.sampling import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, Sampling
from runtime.inference.tools import ToolUse, merge_deltas, parse_tools, tools_grammar
from runtime.service import Emit, Usage

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.8
MAX_EMBEDDING_INPUTS = 256
EMBEDDINGS_PER_CHUNK = 32  # a 1 MiB call frame holds ~70 640-d vectors as JSON
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


def _invalid(message: str) -> ClawnodeError:
    return ClawnodeError(ErrorCode.INVALID_ARGUMENT, message)


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise invalid(f"{key} must be a number from {low:g} to {high:g}", key)
    return float(value)


def _logit_bias(value: Any) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise invalid(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to biases", "logit_bias")
    bias: dict[int, float] = {}
    for key, amount in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise invalid("logit_bias keys must be token ids", "logit_bias") from None
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not -100 <= amount <= 100:
            raise invalid("logit_bias values must be numbers from -100 to 100", "logit_bias")
        bias[token] = float(amount)
    return bias


def _response_schema(value: Any) -> dict[str, Any] | None:
    """The JSON Schema a ``response_format`` constrains replies to (None for text)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid("response_format must be an object", "response_format")
    kind = value.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise invalid("response_format.json_schema must be an object with a schema", "response_format")
        if not isinstance(spec.get("strict", False), bool | None):
            raise invalid("response_format.json_schema.strict must be a boolean", "response_format")
        # strict or not, the grammar enforces the schema.
        return check_schema(spec.get("schema", {}), "response_format")
    raise invalid(f"response_format type {str(kind)[:40]!r} is not supported", "response_format")


def merge_chunks(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive chunks of one choice as one: text joined, tokens summed, logprobs in order,
    tool-call deltas of one call joined (a call's first delta keeps its id, type and name); a finish
    reason ends its run. A choice's text and its tool calls never share a reply, so nothing is
    reordered."""
    merged: list[dict[str, Any]] = []
    for chunk in chunks:
        last = merged[-1] if merged else None
        if last is not None and joinable(last, chunk):  # the engine's own rule for joining on its worker
            last["text"] += chunk.get("text", "")
            last["tokens"] += chunk["tokens"]
            if "logprobs" in chunk:
                last.setdefault("logprobs", []).extend(chunk["logprobs"])
            if "commit" in chunk:
                last.setdefault("commit", []).extend(chunk["commit"])
            if "tool_calls" in chunk:
                last["tool_calls"] = merge_deltas([*last.get("tool_calls", []), *chunk["tool_calls"]])
            if "finish_reason" in chunk:
                last["finish_reason"] = chunk["finish_reason"]
        else:
            copied = dict(chunk)
            if "logprobs" in copied:
                copied["logprobs"] = list(copied["logprobs"])
            if "commit" in copied:
                copied["commit"] = list(copied["commit"])
            if "tool_calls" in copied:
                copied["tool_calls"] = merge_deltas(copied["tool_calls"])
            merged.append(copied)
    return merged


def _schema_and_tools(body: dict[str, Any]) -> tuple[dict[str, Any] | None, ToolUse | None, str | None]:
    """Blocking (a worker thread's job): the request's checked response schema and tools, and the
    grammar they make (64 tools of 300 optional properties took 8 s to convert)."""
    schema = _response_schema(body.get("response_format"))
    tools = parse_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    if tools is not None and tools.active:
        if schema is None and isinstance(body.get("messages"), list):
            return schema, tools, tools_grammar(tools)
    elif schema is not None:
        return schema, tools, schema_grammar(schema)
    return schema, tools, None


class ChatService:
    """A chat model sold by the token: OpenAI chat-completions body in, chunks out."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model

    def _schema_tools_and_grammar(
        self, body: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, ToolUse | None, str | None]:
        """Blocking: :func:`_schema_and_tools`, and its grammar refused now when llama.cpp cannot parse it."""
        schema, tools, grammar = _schema_and_tools(body)
        if grammar is not None:
            self.model.check_grammar(grammar, "response_format" if schema is not None else "tools")
        return schema, tools, grammar

    async def run(
        self,
        body: dict[str, Any],
        emit: Emit,
        *,
        commit: int = 0,
        on_cut: Callable[[int], None] | None = None,
        on_prompt: Callable[[list[int]], None] | None = None,
        on_unsent: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> Usage:
        """Serve ``body``. ``on_cut``: told, when the call is cut (cancelled, or ``emit`` failed) after
        the engine took it, or fails there with an error of its own, how many prompt tokens it had
        decoded by then (0 when it had not begun; the lease bills them with the chunks written).
        ``on_prompt``: told, as the call ends whichever way, the prompt's token ids as the engine built
        them (``TokenStream.prompt_ids``; not told when it built none), so verified inference's proof
        binds them without tokenizing the request again behind other generations in the engine's
        queue. ``on_unsent``: told, when the call is cut or fails after the engine took it, the chunks
        the engine produced that were never handed to ``emit`` (``TokenStream.unread``, after its job
        ended): their text never left, but their ``commit`` entries may hold the top k of tokens whose
        text did (the provider's recorder takes those, never its consumer).
        ``commit``: verified inference's top-k of every produced token, for the provider's commitment
        (``runtime.verify.provider.CallRecorder``): chunks carry them as ``commit`` entries,
        ``runtime.inference.sampling.CommitBlock`` arrays (``entries()``: ``(token id, ((id, logprob),
        ...))`` as ``Pick.top`` has them), a block of tokens at a time
        (``runtime.inference.sampling.CommitRows``). Under a grammar, or with logprobs asked, the
        chunks' logprobs carry them instead (``top_logprobs`` at least k)."""
        if not isinstance(body, dict):
            raise _invalid("the body must be an object")
        messages = body.get("messages")
        prompt = body.get("prompt")
        if prompt is not None and messages is None:
            if not isinstance(prompt, str) and not (
                isinstance(prompt, list)
                and prompt
                and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
            ):
                raise invalid("prompt must be a string or a non-empty list of token ids", "prompt")
        elif not isinstance(messages, list) or not messages:
            raise invalid("messages must be a non-empty list", "messages")
        continue_from = body.get("continue_from", "")
        if not isinstance(continue_from, str):
            raise invalid("continue_from must be a string", "continue_from")
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise invalid("max_tokens must be a positive integer", "max_tokens")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise invalid("seed must be an integer", "seed")
        stop = body.get("stop")
        if stop is not None and not isinstance(stop, str | list):
            raise invalid("stop must be a string or a list of strings", "stop")
        n = body.get("n", 1)
        if n is None:
            n = 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
            raise invalid(f"n must be an integer from 1 to {MAX_CHOICES}", "n")
        logprobs = body.get("logprobs", False)
        if logprobs is None:
            logprobs = False
        if not isinstance(logprobs, bool):
            raise invalid("logprobs must be a boolean", "logprobs")
        top_logprobs = body.get("top_logprobs")
        if top_logprobs is not None:
            if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int):
                raise invalid(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", "top_logprobs")
            if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
                raise invalid(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", "top_logprobs")
            if not logprobs:
                raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
        sampling = Sampling(
            temperature=_number(body, "temperature", DEFAULT_TEMPERATURE, 0, 2),
            top_p=_number(body, "top_p", 0.95, 0, 1) or 1e-9,
            presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
            logit_bias=_logit_bias(body.get("logit_bias")),
            logprobs=logprobs,
            top_logprobs=top_logprobs or 0,
        )
        # jsonschema checks a 13 KB schema in about 0.5 s: never on the trio loop (64 tools held it 13 s).
        # Without a response_format or tools there is nothing to check: no thread hop before the first token.
        if body.get("response_format") is None and not body.get("tools"):
            schema, tools, grammar = _schema_and_tools(body)
        else:
            schema, tools, grammar = await trio.to_thread.run_sync(self._schema_tools_and_grammar, body)
        if tools is not None and messages is None:
            raise invalid("tools need messages", "tools")
        if continue_from and (n > 1 or schema is not None or (tools is not None and tools.active)):
            raise invalid("continue_from is only for plain text replies", "continue_from")
        if commit > 0:
            if grammar is None and not logprobs:
                sampling = replace(sampling, commit_top=commit)
            else:  # the per-token logprobs carry the commitment's figures (a grammar's constrained ones)
                sampling = replace(sampling, logprobs=True, top_logprobs=max(commit, sampling.top_logprobs))
        # body.stream is ignored: the infer protocol always streams.
        if messages is None:
            stream = self.model.stream_generate(
                prompt=prompt,
                max_tokens=max_tokens,
                sampling=sampling,
                seed=seed,
                stop=stop,
                n=n,
                schema=schema,
                assistant_prefix=continue_from,
                grammar=grammar,
            )
        else:
            stream = self.model.stream_generate(
                messages=messages,
                max_tokens=max_tokens,
                sampling=sampling,
                seed=seed,
                stop=stop,
                n=n,
                schema=schema,
                tools=tools,
                assistant_prefix=continue_from,
                grammar=grammar,
            )
        unsent: list[dict[str, Any]] = []  # read from the engine, not yet handed to ``emit``
        try:
            async with stream:
                async for chunk in stream:
                    # One frame carries every chunk ready by now; ``tokens`` says how many tokens it holds.
                    unsent = merge_chunks([chunk, *stream.drain_ready()])
                    unsent.reverse()
                    while unsent:
                        merged = unsent.pop()
                        if n == 1:
                            merged.pop("index", None)
                        await emit(merged)
        finally:
            if on_prompt is not None and stream.prompt_ids is not None:
                on_prompt(stream.prompt_ids)
            if on_unsent is not None and stream.completion is None:
                on_unsent([*reversed(unsent), *stream.unread])
            # Cut: the engine's own count, set when its job ended (leaving ``async with`` waits for it,
            # at most ``SHUTDOWN_WAIT_S``); of a job still decoding its prompt in one go after that, the
            # prompt it began to decode. Failed with an error of the request's own after its prompt was
            # decoded (a grammar llama.cpp refuses only once the prompt's logits are there): that prompt
            # (0 after the engine's own failure), which the call's error frame bills.
            if on_cut is not None and stream.completion is None:
                if stream.failed:
                    on_cut(stream.prefill_begun)
                else:
                    on_cut(stream.final.usage.prompt_tokens if stream.final is not None else stream.prefill_begun)
        usage = stream.usage
        if usage is None:
            raise ClawnodeError(ErrorCode.INTERNAL, "the generation ended without a usage count")
        detail = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
        if usage.cached_tokens:
            # Reused from the KV cache, not decoded again; billed like any prompt token (units above).
            detail["cached_tokens"] = usage.cached_tokens
        return Usage(units=usage.total_tokens, detail=detail)


def _embedding_inputs(raw: Any) -> list[str] | list[list[int]]:
    def token_list(value: Any) -> bool:
        return (
            isinstance(value, list)
            and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
        )

    if isinstance(raw, str):
        return [raw]
    if token_list(raw):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        return raw
    if isinstance(raw, list) and raw and all(token_list(t) for t in raw):
        return raw
    raise invalid("input must be a string, a list of strings, a list of token ids or a list of token id lists", "input")


class EmbeddingService:
    """Mean-pooled, unit-length embeddings sold by the input token."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model

    async def run(self, body: dict[str, Any], emit: Emit, *, on_cut: Callable[[int], None] | None = None) -> Usage:
        """Serve ``body``. ``on_cut``: told, when the call is cut (cancelled, or ``emit`` failed), the
        input tokens the engine had embedded or was embedding by then (it stops before the next
        input; the lease bills them with the chunks written)."""
        if not isinstance(body, dict):
            raise _invalid("the body must be an object")
        texts = _embedding_inputs(body.get("input"))
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise invalid(f"input holds at most {MAX_EMBEDDING_INPUTS} items", "input")
        progress = EmbedProgress()
        try:
            vectors, tokens = await self.model.embed_with_count(texts, progress=progress)
        except trio.Cancelled:
            taken = progress.cut()
            if on_cut is not None:
                on_cut(taken)
            raise
        try:
            for start in range(0, len(vectors), EMBEDDINGS_PER_CHUNK):
                chunk: dict[str, Any] = {"embeddings": vectors[start : start + EMBEDDINGS_PER_CHUNK]}
                if len(vectors) > EMBEDDINGS_PER_CHUNK:
                    chunk["index"] = start
                await emit(chunk)
        except BaseException:
            if on_cut is not None:
                on_cut(tokens)
            raise
        return Usage(units=tokens, detail={"prompt_tokens": tokens})
