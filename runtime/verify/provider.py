"""The provider's side: positions for a commitment, from the engine's own chunks (its public API).

A generation asked with ``Sampling(logprobs=True, top_logprobs=k)`` yields chunks whose
``logprobs`` entries give the produced token and its ``top_logprobs``; :func:`positions_from_chunks`
turns them into :class:`~runtime.verify.commitment.Position` values, token ids and all.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from runtime.verify.commitment import Position


class IdOf(Protocol):
    def id_of(self, entry: dict[str, Any]) -> int: ...


def positions_from_chunks(chunks: Iterable[dict[str, Any]], index: IdOf) -> list[Position]:
    positions = []
    for chunk in chunks:
        for entry in chunk.get("logprobs") or []:
            top = tuple((index.id_of(alt), float(alt["logprob"])) for alt in entry.get("top_logprobs") or [])
            positions.append(Position(index.id_of(entry), top))
    return positions
