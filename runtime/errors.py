"""Stable error codes shared by every surface (API, CLI, wire), and the finer stable reasons beside them.

A code says what kind of failure it is (``E_CONFLICT``); a ``reason`` says which one, for a program
that must act on it: a lease ``paused`` waits for a countersignature and serves again after it, one
``ended`` or ``expired`` never will. Reasons travel on the wire (error frames) and in API replies,
next to the code; a reason once published keeps its meaning. ``None`` where no finer reason exists.
"""

from __future__ import annotations

import re
from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_ARGUMENT = "E_INVALID_ARGUMENT"
    FORBIDDEN = "E_FORBIDDEN"
    NOT_FOUND = "E_NOT_FOUND"
    CONFLICT = "E_CONFLICT"
    INTERNAL = "E_INTERNAL"
    UNAVAILABLE = "E_UNAVAILABLE"
    RATE_LIMITED = "E_RATE_LIMITED"
    INSUFFICIENT_FUNDS = "E_INSUFFICIENT_FUNDS"
    EXPIRED = "E_EXPIRED"
    TIMEOUT = "E_TIMEOUT"
    UNAUTHENTICATED = "E_UNAUTHENTICATED"


class Reason(StrEnum):
    """The reasons of the lease market's refusals (the ledger and the escrow add their own strings)."""

    PAUSED = "paused"  # a usage receipt waits for the consumer's countersignature; serves again after it
    ENDED = "ended"  # revoked, abandoned, or its escrow disputed or closed: it never serves again
    EXPIRED = "expired"  # past its expiry
    OVER_BUDGET = "over_budget"  # the budget cannot cover the call
    BUDGET_BUSY = "budget_busy"  # the budget is held by calls in flight; retry when they are metered
    REQUEST_LIMIT = "request_limit"  # the lease's request count is used up
    RATE_LIMIT = "rate_limit"  # too many requests per minute on the lease
    UNKNOWN_LEASE = "unknown_lease"  # no such lease with this peer, or a wrong access token
    DISK_FULL = "disk_full"  # the node's disk refuses writes: read-only until space returns
    BUSY = "busy"  # the model's queue is full: retry after the error's ``retry_after_s``


# A reason is a short token: lower-case letters, digits and underscores.
REASON_PATTERN = r"^[a-z0-9_]{1,64}$"


def clean_reason(reason: object) -> str | None:
    """A reason as it may travel (wire, API): a short snake_case token, else none at all."""
    return reason if isinstance(reason, str) and re.fullmatch(REASON_PATTERN, reason) else None


class ClawnodeError(Exception):
    """An error whose code, message and reason are safe to show to a user or a peer."""

    def __init__(
        self, code: ErrorCode, message: str, reason: str | None = None, *, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        # A busy refusal's hint: how many seconds until a retry may be taken (HTTP ``Retry-After``).
        self.retry_after_s = retry_after_s
