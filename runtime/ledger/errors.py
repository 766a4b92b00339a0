"""Ledger errors: a stable ``ErrorCode`` plus a finer stable ``reason`` (e.g. ``receipt_forged``)."""

from __future__ import annotations

from runtime.errors import ClawnodeError, ErrorCode
from runtime.files import DISK_FULL_MESSAGE, DISK_FULL_REASON


class LedgerError(ClawnodeError):
    def __init__(self, code: ErrorCode, reason: str, message: str) -> None:
        super().__init__(code, message)
        self.reason = reason


def forged(message: str) -> LedgerError:
    return LedgerError(ErrorCode.UNAUTHENTICATED, "receipt_forged", message)


def replayed(message: str) -> LedgerError:
    return LedgerError(ErrorCode.CONFLICT, "receipt_replayed", message)


def forbidden(reason: str, message: str) -> LedgerError:
    return LedgerError(ErrorCode.FORBIDDEN, reason, message)


def conflict(reason: str, message: str) -> LedgerError:
    return LedgerError(ErrorCode.CONFLICT, reason, message)


def not_found(reason: str, message: str) -> LedgerError:
    return LedgerError(ErrorCode.NOT_FOUND, reason, message)


def invalid(reason: str, message: str) -> LedgerError:
    return LedgerError(ErrorCode.INVALID_ARGUMENT, reason, message)


def invariant(reason: str, message: str) -> LedgerError:
    """A money invariant the write would break (``invariant_*``): refused, nothing stored. Only a bug
    in this node (or a chain that contradicts itself) gets here, so it is ``E_INTERNAL``."""
    return LedgerError(ErrorCode.INTERNAL, f"invariant_{reason}", message)


def disk_full() -> LedgerError:
    """SQLite could not write (SQLITE_FULL, SQLITE_IOERR): the node is read-only until space returns."""
    return LedgerError(ErrorCode.UNAVAILABLE, DISK_FULL_REASON, DISK_FULL_MESSAGE)
