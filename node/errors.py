"""Re-export of :mod:`runtime.errors` while code written against this path moves over."""

from runtime.errors import ClawnodeError, ErrorCode

__all__ = ["ClawnodeError", "ErrorCode"]
