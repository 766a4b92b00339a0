"""Stable error codes shared by every surface (API, CLI, wire)."""

from __future__ import annotations

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


class ClawnodeError(Exception):
    """An error whose code and message are safe to show to a user or a peer."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
