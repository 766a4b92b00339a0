"""The typed verdict of a market rule: ``None`` admits, a :class:`Refusal` refuses.

Rules in ``protocols.machines`` that check fetched facts return ``Refusal | None``; the adapter
raises :meth:`Refusal.error` (or calls :func:`enforce`). ``reason`` is stable and machine-readable
(``lock_wrong_parties``, ``lock_too_short``, ...): it travels with the error (wire error frames,
API replies) as ``ClawnodeError.reason``, and the machines' tests count refusals by it.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import ClawnodeError, ErrorCode


@dataclass(frozen=True)
class Refusal:
    """Why a rule refused: a stable error code, a stable reason and a message safe to show a peer."""

    code: ErrorCode
    reason: str
    message: str

    def error(self) -> ClawnodeError:
        return ClawnodeError(self.code, self.message, self.reason)


Verdict = Refusal | None


def enforce(verdict: Verdict) -> None:
    """Raise the refusal's error, if it is one."""
    if verdict is not None:
        raise verdict.error()
