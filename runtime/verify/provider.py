"""The provider's side: positions for a commitment, from the engine's own chunks (its public API).

A generation asked with ``Sampling(logprobs=True, top_logprobs=k)`` yields chunks whose
``logprobs`` entries give the produced token and its ``top_logprobs``; :func:`positions_from_chunks`
turns them into :class:`~runtime.verify.commitment.Position` values, token ids and all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from runtime.verify.commitment import CHUNK, MAX_TOKENS, SCALE, Commitment, K, Position, encode_chunk


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


class PositionBlock(Protocol):
    """A block of positions as arrays (``runtime.inference.sampling.CommitBlock``): ``tokens`` produced,
    ``ids`` and ``logprobs`` (n × k, best first), ``values`` the logits they came from; ``entries()``
    the same as ``(token, ((id, logprob), ...))`` tuples."""

    @property
    def tokens(self) -> list[int]: ...

    @property
    def ids(self) -> Any: ...

    @property
    def logprobs(self) -> Any: ...

    @property
    def values(self) -> Any: ...

    def __len__(self) -> int: ...

    def entries(self) -> list[tuple[int, tuple[tuple[int, float], ...]]]: ...


def encode_block(block: PositionBlock, start: int, stop: int, k: int = K, scale: int = SCALE) -> bytes | None:
    """``encode_chunk`` of the block's positions ``start:stop``, the same bytes, computed with numpy on
    the block's arrays (no Python tuple or loop a position); None when the arrays are not the plain
    case (fewer than ``k`` alternatives, one not finite: ``encode_chunk`` pads or refuses those)."""
    encoded = encode_rows(block, start, stop, k, scale)
    return encoded[0] if encoded is not None else None


def encode_rows(
    block: PositionBlock, start: int, stop: int, k: int = K, scale: int = SCALE
) -> tuple[bytes, Any] | None:
    """``encode_block``'s bytes and, for each position, the offset where its bytes end in them (so one
    call can encode many chunks' positions and cut them apart: a position's bytes are its own)."""
    import numpy as np

    ids, logprobs = block.ids[start:stop], block.logprobs[start:stop]
    n = stop - start
    if n <= 0 or ids.shape != (n, k):
        return None
    # encode_chunk's figures: -logprob (a float32 widened to a Python float) times scale, rounded half to
    # even (``round``, ``rint``), clipped to 0..255. A logprob not finite (an -inf or NaN alternative, left
    # out of ``entries()``) makes it not finite: encode_chunk's padding, or its refusal, then.
    quantised = np.rint(logprobs.astype(np.float64) * -scale)
    if not np.isfinite(quantised).all():
        return None
    produced = np.asarray(block.tokens[start:stop], dtype=np.int64)[:, None]
    values = np.where(ids == produced, 0, ids.astype(np.int64) + 1)
    if values.min() < 0:
        return None
    # Each value as an unsigned LEB128 varint: its 7-bit groups, low first, the high bit on every group
    # but the last; a group past the value's last is left out (``keep``).
    places = max(1, (int(values.max()).bit_length() + 6) // 7)
    data = np.empty((n, k * (places + 1)), dtype=np.uint8)
    keep = np.ones((n, k * (places + 1)), dtype=bool)
    groups = data[:, : k * places].reshape(n, k, places)
    present = keep[:, : k * places].reshape(n, k, places)
    rest = values
    for place in range(places):
        low = rest & 0x7F
        rest = rest >> 7
        more = rest > 0
        groups[:, :, place] = low | (more << 7)
        if place + 1 < places:
            present[:, :, place + 1] = more
    np.clip(quantised, 0, 255, out=quantised)
    data[:, k * places :] = quantised
    ends = keep.sum(axis=1).cumsum() if places > 1 else np.arange(1, n + 1) * (k * 2)
    return data[keep].tobytes(), ends


# The positions of one part of a reply: a list of them, or a block (``PositionBlock``) as it came.
_Part = list[Position] | PositionBlock


def _encode_parts(parts: Sequence[tuple[_Part, int, int]]) -> bytes:
    out = []
    for part, start, stop in parts:
        encoded = None if isinstance(part, list) else encode_block(part, start, stop)
        if encoded is None:
            positions = part[start:stop] if isinstance(part, list) else _block_positions(part)[start:stop]
            encoded = encode_chunk(positions)
        out.append(encoded)
    return b"".join(out)


def _block_positions(block: PositionBlock) -> list[Position]:
    return [Position(token, top) for token, top in block.entries()]


class CallRecorder:
    """Serves one call with top-``K`` logprobs asked of the engine, keeps them as positions, and hands
    the consumer only the logprobs it asked for (none, or fewer alternatives)."""

    def __init__(self, body: dict[str, Any], index: IdOf) -> None:
        self.asked = body.get("logprobs") is True
        self.asked_top = int(body.get("top_logprobs") or 0) if self.asked else 0
        self.body = {**body, "logprobs": True, "top_logprobs": max(K, self.asked_top)}
        self.index = index
        self._parts: list[_Part] = []  # the positions as they came, in order
        self._count = 0
        self._text: list[str] = []  # the reply text as streamed (bounded by the call's own bound)
        # The positions cut into CHUNKs as they arrive: each chunk the (part, start, stop) ranges that make it,
        # encoded only when the proof is built (``finish``, at the call's end), out of the streaming window
        # where the encoding competed with the engine for the GIL: the same bytes as commit(self.positions).
        self._chunks: list[list[tuple[_Part, int, int]]] = []
        self._tail: list[tuple[_Part, int, int]] = []
        self._tail_count = 0

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def tokens(self) -> list[int]:
        """The token ids recorded so far, in order (what the end frame's proof names: no Position made)."""
        tokens: list[int] = []
        for part in self._parts:
            tokens += [p.token for p in part] if isinstance(part, list) else part.tokens
        return tokens

    @property
    def positions(self) -> list[Position]:
        """Every position recorded so far, made anew when asked for: what the commitment stands for (the
        end frame reads ``tokens`` and ``finish``, which work from the parts as they came)."""
        positions: list[Position] = []
        for part in self._parts:
            positions += part if isinstance(part, list) else _block_positions(part)
        return positions

    def see(self, data: dict[str, Any]) -> dict[str, Any]:
        if isinstance(data.get("text"), str):
            self._text.append(data["text"])
        committed = data.get("commit")  # ChatService.run(..., commit=K): blocks of positions, not shown
        if committed is not None:
            loose: list[Position] = []
            for item in committed:
                if isinstance(item, tuple):  # (token, top), as Pick.top has it
                    loose.append(Position(item[0], item[1]))
                    continue
                if loose:
                    self._add(loose)
                    loose = []
                self._add(item)
            if loose:
                self._add(loose)
            data = {key: value for key, value in data.items() if key != "commit"}
        entries = data.get("logprobs")
        if not entries:
            return data
        self._add(positions_from_chunks([data], self.index))
        if not self.asked:
            return {key: value for key, value in data.items() if key != "logprobs"}
        if self.asked_top < K:
            trimmed = [{**entry, "top_logprobs": entry.get("top_logprobs", [])[: self.asked_top]} for entry in entries]
            return {**data, "logprobs": trimmed}
        return data

    def _add(self, part: _Part) -> None:
        size = len(part)
        if not size:
            return
        self._parts.append(part)
        self._count += size
        at = 0
        while at < size:
            take = min(CHUNK - self._tail_count, size - at)
            self._tail.append((part, at, at + take))
            self._tail_count += take
            at += take
            if self._tail_count == CHUNK:
                self._chunks.append(self._tail)
                self._tail, self._tail_count = [], 0

    def finish(self) -> Commitment | None:
        n = self._count
        if not n or n > MAX_TOKENS:
            return None
        chunks = [*self._chunks, self._tail] if self._tail_count else self._chunks
        return Commitment(tuple(_encode_chunks(chunks)), n)


def _encode_chunks(chunks: Sequence[Sequence[tuple[_Part, int, int]]]) -> list[bytes]:
    """Each chunk's bytes (``_encode_parts``); a run of chunks that are consecutive ranges of one block is
    encoded in one ``encode_rows`` call and cut at the chunks' ends (a 256-token block: one numpy pass, not
    eight), the same bytes."""
    out: list[bytes] = []
    at = 0
    while at < len(chunks):
        part, start, stop = chunks[at][0]
        run = at + 1
        if len(chunks[at]) == 1 and not isinstance(part, list):
            while run < len(chunks) and len(chunks[run]) == 1:
                after, begin, end = chunks[run][0]
                if after is not part or begin != stop:
                    break
                stop = end
                run += 1
        encoded = encode_rows(part, start, stop) if run - at > 1 and not isinstance(part, list) else None
        if encoded is None:
            out += [_encode_parts(chunk) for chunk in chunks[at:run]]
        else:
            data, ends = encoded
            cut = 0
            for chunk in chunks[at:run]:
                end = int(ends[chunk[0][2] - start - 1])
                out.append(data[cut:end])
                cut = end
        at = run
    return out
