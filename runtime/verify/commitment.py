"""A provider's commitment to what its model computed, per produced position.

For every produced token the provider keeps the ``k`` most likely token ids and their logprobs (the
engine's ``top_logprobs``: log-softmax of the raw logits at temperature 1). Positions are grouped in
chunks of :data:`CHUNK` tokens; a chunk is encoded compactly (:func:`encode_chunk`) and hashed as a
leaf of a Merkle tree. The commitment is 32 bytes: sha256 of a header (version, k, scale, chunk size,
token count) and the tree's root. It goes into the usage receipt the provider signs; an *opening* of
a chunk (its bytes and the sibling hashes up to the root) later proves what the provider claimed
there, and a chunk that does not open against the signed root is evidence by itself.

Encoding of one position: its ``k`` ids, each as an unsigned LEB128 varint of ``0`` when it is the
token the provider produced at that position (the verifier knows it: it is in the reply) and of
``id + 1`` otherwise; then ``k`` bytes, each ``min(255, round(-logprob * SCALE))``. With ``SCALE`` 16
a logprob is kept to ±1/32 nat down to -15.9 (a byte of 255 means "at most that"). The figures that
chose ``k`` and ``SCALE`` are bench/verify.py's.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

VERSION = 1
K = 4  # top ids kept per position
SCALE = 16  # logprob quantisation steps per nat
CHUNK = 32  # positions per Merkle leaf
MAX_TOKENS = 1 << 16  # positions one commitment covers at most
MAX_DEPTH = 16  # tree height for MAX_TOKENS / 1 chunk
_HEADER = struct.Struct(">4sBBBBI")


@dataclass(frozen=True)
class Position:
    """One produced position: the token produced and the ``k`` most likely (id, logprob), best first."""

    token: int
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Opened:
    """A decoded position: ids best first, logprobs as the quantised values (-byte / scale)."""

    ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    clipped: tuple[bool, ...]


@dataclass(frozen=True)
class Opening:
    """A chunk's bytes and the sibling hashes from its leaf up to the root (bottom first); ``None``
    where a level had no sibling (an odd node promoted as it is)."""

    index: int
    data: bytes
    path: tuple[bytes | None, ...]


def _varint(value: int, out: bytearray) -> None:
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 35:
            raise ValueError("a truncated or overlong varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def quantise(logprob: float, scale: int = SCALE) -> int:
    return min(255, max(0, round(-logprob * scale)))


def encode_chunk(positions: Sequence[Position], k: int = K, scale: int = SCALE) -> bytes:
    # On the provider's trio thread for every verified call: one-byte varints and quantise inlined
    # (the same bytes, about half the time: 1.3 -> 0.6 ms for 256 positions).
    out = bytearray()
    append, extend = out.append, out.extend
    for position in positions:
        produced, top = position.token, position.top
        if len(top) != k:  # a vocabulary smaller than k, or -inf alternatives: padded with clipped entries
            top = top[:k] + ((produced, -1e9),) * (k - len(top)) if len(top) < k else top[:k]
        for token, _ in top:
            value = 0 if token == produced else token + 1
            if value < 0x80:
                append(value)
            else:
                _varint(value, out)
        extend([min(255, max(0, round(-logprob * scale))) for _, logprob in top])
    return bytes(out)


def decode_chunk(data: bytes, tokens: Sequence[int], k: int = K, scale: int = SCALE) -> list[Opened]:
    """The positions of a chunk, given the tokens produced there; ValueError if it does not parse."""
    at = 0
    opened: list[Opened] = []
    for token in tokens:
        ids = []
        for _ in range(k):
            value, at = _read_varint(data, at)
            ids.append(token if value == 0 else value - 1)
        raw = data[at : at + k]
        if len(raw) != k:
            raise ValueError("a truncated chunk")
        at += k
        opened.append(Opened(tuple(ids), tuple(-b / scale for b in raw), tuple(b == 255 for b in raw)))
    if at != len(data):
        raise ValueError("bytes after the chunk's last position")
    return opened


def _leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _levels(leaves: list[bytes]) -> list[list[bytes]]:
    levels = [leaves]
    while len(levels[-1]) > 1:
        below = levels[-1]
        levels.append(
            [_node(below[i], below[i + 1]) if i + 1 < len(below) else below[i] for i in range(0, len(below), 2)]
        )
    return levels


def _sealed(merkle_root: bytes, n_tokens: int, k: int, scale: int, chunk: int) -> bytes:
    header = _HEADER.pack(b"cnv1", VERSION, k, scale, chunk, n_tokens)
    return hashlib.sha256(header + merkle_root).digest()


@dataclass(frozen=True)
class Commitment:
    """What the provider keeps for a reply: every chunk's bytes, and the 32-byte root it signs."""

    chunks: tuple[bytes, ...]
    n_tokens: int
    k: int = K
    scale: int = SCALE
    chunk: int = CHUNK

    @property
    def root(self) -> bytes:
        return _sealed(_levels([_leaf(c) for c in self.chunks])[-1][0], self.n_tokens, self.k, self.scale, self.chunk)

    @property
    def encoded_bytes(self) -> int:
        return sum(len(c) for c in self.chunks)

    def open(self, index: int) -> Opening:
        return _open(_levels([_leaf(c) for c in self.chunks]), self.chunks, index)

    def open_all(self) -> list[Opening]:
        """Every chunk's opening, the tree built once (``open`` per chunk rebuilds it each time: quadratic)."""
        levels = _levels([_leaf(c) for c in self.chunks])
        return [_open(levels, self.chunks, index) for index in range(len(self.chunks))]


def _open(levels: list[list[bytes]], chunks: tuple[bytes, ...], index: int) -> Opening:
    path: list[bytes | None] = []
    at = index
    for level in levels[:-1]:
        sibling = at ^ 1
        path.append(level[sibling] if sibling < len(level) else None)
        at //= 2
    return Opening(index, chunks[index], tuple(path))


def commit(positions: Sequence[Position], k: int = K, scale: int = SCALE, chunk: int = CHUNK) -> Commitment:
    if not positions:
        raise ValueError("nothing to commit to")
    if len(positions) > MAX_TOKENS:
        raise ValueError(f"at most {MAX_TOKENS} positions per commitment")
    chunks = tuple(encode_chunk(positions[i : i + chunk], k, scale) for i in range(0, len(positions), chunk))
    return Commitment(chunks, len(positions), k, scale, chunk)


def opening_matches(
    root: bytes, opening: Opening, n_tokens: int, k: int = K, scale: int = SCALE, chunk: int = CHUNK
) -> bool:
    """Whether ``opening`` is chunk ``opening.index`` of the commitment ``root`` over ``n_tokens``."""
    n_chunks = -(-n_tokens // chunk)
    if not 0 <= opening.index < n_chunks or len(opening.path) > MAX_DEPTH:
        return False
    # The tree's shape is fixed by n_chunks: walk it, checking each level has a sibling exactly where it must.
    width, at, value = n_chunks, opening.index, _leaf(opening.data)
    steps = 0
    while width > 1:
        if steps >= len(opening.path):
            return False
        sibling = opening.path[steps]
        has_sibling = (at ^ 1) < width
        if has_sibling != (sibling is not None):
            return False
        if sibling is not None:
            value = _node(sibling, value) if at & 1 else _node(value, sibling)
        at //= 2
        width = -(-width // 2)
        steps += 1
    if steps != len(opening.path):
        return False
    return _sealed(value, n_tokens, k, scale, chunk) == root
