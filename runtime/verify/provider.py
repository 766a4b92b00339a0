"""The provider's side: positions for a commitment, from the engine's own chunks (its public API).

A generation asked with ``Sampling(logprobs=True, top_logprobs=k)`` yields chunks whose
``logprobs`` entries give the produced token and its ``top_logprobs``; :func:`positions_from_chunks`
turns them into :class:`~runtime.verify.commitment.Position` values, token ids and all.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from runtime.verify.commitment import CHUNK, MAX_TOKENS, Commitment, K, Position, encode_chunk


class IdOf(Protocol):
    def id_of(self, entry: dict[str, Any]) -> int: ...


def positions_from_chunks(chunks: Iterable[dict[str, Any]], index: IdOf) -> list[Position]:
    positions = []
    for chunk in chunks:
        for entry in chunk.get("logprobs") or []:
            top = tuple((index.id_of(alt), float(alt["logprob"])) for alt in entry.get("top_logprobs") or [])
            positions.append(Position(index.id_of(entry), top))
    return positions


# Requests whose logprobs an honest prefill reproduces: one choice, no grammar, no bias or penalties,
# no continuation of another provider's reply. Others are served without a commitment.
_UNVERIFIABLE_KEYS = ("tools", "response_format", "logit_bias", "continue_from")
_DEFAULT_TEMPERATURE = 0.8  # runtime.inference.service's


def verifiable(body: dict[str, Any]) -> bool:
    if (body.get("n") or 1) != 1:
        return False
    if any(body.get(key) for key in _UNVERIFIABLE_KEYS):
        return False
    return not (body.get("presence_penalty") or body.get("frequency_penalty"))


def declared_sampling(body: dict[str, Any]) -> tuple[int, int]:
    """(temperature, top_p) × 1000 as the request declares them (the engine's defaults otherwise)."""
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    t = _DEFAULT_TEMPERATURE if temperature is None else float(temperature)
    p = 0.95 if top_p is None else float(top_p)
    return round(t * 1000), max(1, round(p * 1000))


class CallRecorder:
    """Serves one call with top-``K`` logprobs asked of the engine, keeps them as positions, and hands
    the consumer only the logprobs it asked for (none, or fewer alternatives)."""

    def __init__(self, body: dict[str, Any], index: IdOf) -> None:
        self.asked = body.get("logprobs") is True
        self.asked_top = int(body.get("top_logprobs") or 0) if self.asked else 0
        self.body = {**body, "logprobs": True, "top_logprobs": max(K, self.asked_top)}
        self.index = index
        self.positions: list[Position] = []
        self._text: list[str] = []  # the reply text as streamed (bounded by the call's own bound)
        # Each full CHUNK of positions encoded as it arrives (while the engine makes the next ones), so the
        # end frame waits only for the last chunk's: the same bytes as commit(self.positions).
        self._chunks: list[bytes] = []

    @property
    def text(self) -> str:
        return "".join(self._text)

    def see(self, data: dict[str, Any]) -> dict[str, Any]:
        if isinstance(data.get("text"), str):
            self._text.append(data["text"])
        committed = data.get("commit")  # ChatService.run(..., commit=K): (token, top) of positions, not shown
        if committed is not None:
            self.positions += [Position(token, top) for token, top in committed]
            self._encode_full()
            data = {key: value for key, value in data.items() if key != "commit"}
        entries = data.get("logprobs")
        if not entries:
            return data
        self.positions += positions_from_chunks([data], self.index)
        self._encode_full()
        if not self.asked:
            return {key: value for key, value in data.items() if key != "logprobs"}
        if self.asked_top < K:
            trimmed = [{**entry, "top_logprobs": entry.get("top_logprobs", [])[: self.asked_top]} for entry in entries]
            return {**data, "logprobs": trimmed}
        return data

    def _encode_full(self) -> None:
        done = len(self._chunks) * CHUNK
        while done + CHUNK <= min(len(self.positions), MAX_TOKENS):
            self._chunks.append(encode_chunk(self.positions[done : done + CHUNK]))
            done += CHUNK

    def finish(self) -> Commitment | None:
        n = len(self.positions)
        if not n or n > MAX_TOKENS:
            return None
        self._encode_full()
        done = len(self._chunks) * CHUNK
        tail = [encode_chunk(self.positions[done:])] if done < n else []
        return Commitment((*self._chunks, *tail), n)
