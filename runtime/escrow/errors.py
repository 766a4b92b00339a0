"""Revert and transport errors from any chain, normalised to clawnode's stable codes.

The in-process chain raises ``eth_tester`` ``TransactionFailed``, JSON-RPC chains (anvil, hardhat,
geth) raise web3's ``ContractLogicError`` or ``Web3RPCError``, and a chain that is down raises a
transport error. The contract reverts with short reasons ("not_found", "disputed", ...); each maps
to one ``ErrorCode`` here. Messages never carry the exception text of a transport error, which
would name the RPC endpoint.
"""

from __future__ import annotations

import logging
import re

from runtime.errors import ClawnodeError, ErrorCode

log = logging.getLogger(__name__)

REASON_CODES: dict[str, ErrorCode] = {
    "exists": ErrorCode.CONFLICT,
    "bad_amount": ErrorCode.INVALID_ARGUMENT,
    "bad_party": ErrorCode.INVALID_ARGUMENT,
    "bad_deadline": ErrorCode.INVALID_ARGUMENT,
    "not_found": ErrorCode.NOT_FOUND,
    "disputed": ErrorCode.CONFLICT,
    "closed": ErrorCode.CONFLICT,
    "not_disputed": ErrorCode.CONFLICT,
    "already_released": ErrorCode.CONFLICT,
    "too_early": ErrorCode.CONFLICT,
    "window_closed": ErrorCode.EXPIRED,
    "exceeds_locked": ErrorCode.INSUFFICIENT_FUNDS,
    "bad_signature": ErrorCode.FORBIDDEN,
    "forbidden": ErrorCode.FORBIDDEN,
    "nothing_to_withdraw": ErrorCode.CONFLICT,
    "bad_panel": ErrorCode.INVALID_ARGUMENT,
    "bad_token": ErrorCode.INVALID_ARGUMENT,
    "no_panel": ErrorCode.CONFLICT,
    "duplicate_vote": ErrorCode.CONFLICT,
    "too_few_votes": ErrorCode.FORBIDDEN,
    # Not contract reasons: what the client itself concludes.
    "insufficient_funds": ErrorCode.INSUFFICIENT_FUNDS,
    "gas_share": ErrorCode.INVALID_ARGUMENT,
    "chain_unavailable": ErrorCode.UNAVAILABLE,
    "no_escrow_contract": ErrorCode.UNAVAILABLE,
    "wrong_chain": ErrorCode.UNAVAILABLE,
    "receipt_timeout": ErrorCode.TIMEOUT,
    "unconfirmed": ErrorCode.TIMEOUT,
    "fee_cap": ErrorCode.UNAVAILABLE,
    "bad_reply": ErrorCode.UNAVAILABLE,
    "reverted": ErrorCode.INTERNAL,
    "rejected": ErrorCode.INTERNAL,
}

MESSAGES: dict[str, str] = {
    "exists": "an escrow with this id already exists for this payer",
    "bad_amount": "the amount must be positive",
    "bad_party": "payee and arbiter must be set and differ from each other and from the payer",
    "bad_deadline": "the deadline must lie in the future",
    "not_found": "no such escrow",
    "disputed": "the escrow is disputed; only the arbiter can move its funds",
    "closed": "the escrow is closed",
    "not_disputed": "the escrow is not disputed",
    "already_released": "the payee has already been paid at least this cumulative amount",
    "too_early": "a refund is possible only after deadline + dispute window",
    "window_closed": "the dispute window has closed",
    "exceeds_locked": "the amount exceeds what is locked",
    "bad_signature": "the payer's voucher signature does not verify",
    "forbidden": "the caller is not allowed to do this",
    "nothing_to_withdraw": "nothing is credited to this address",
    "bad_panel": "a panel has 1 to 5 distinct arbiters, neither payer nor payee, and a threshold of 1 to their number",
    "bad_token": "the token did not move exactly the amount asked (a fee-on-transfer token, or no token there)",
    "no_panel": "the escrow has no arbiter panel",
    "duplicate_vote": "two votes of the same panel arbiter",
    "too_few_votes": "fewer panel arbiters than the escrow's threshold voted for this split",
    "insufficient_funds": "the wallet cannot pay for value and gas",
    "gas_share": "the lease's gas would take more of its value than escrow.max_gas_share allows",
    "chain_unavailable": "the chain is unreachable",
    "no_escrow_contract": "escrow.contract holds no escrow contract on this chain",
    "wrong_chain": "the escrow RPC serves another chain than escrow.chain_id",
    "receipt_timeout": "the transaction was not mined in time",
    "unconfirmed": "the transaction was mined but not confirmed by escrow.confirmations blocks in time",
    "fee_cap": "the chain's base fee is above escrow.max_fee_gwei",
    "bad_reply": "the chain's RPC sent a reply that is too large or not JSON-RPC",
    "reverted": "the transaction reverted",
    "rejected": "the chain refused the transaction",
}

RETRYABLE = frozenset({"chain_unavailable", "receipt_timeout", "unconfirmed", "fee_cap", "bad_reply"})

_REVERT = re.compile(r"execution reverted:?\s*([a-z_]+)")


# A URL's userinfo, path and query can carry an API key (``https://host/v2/<key>``, ``/?key=…``,
# ``user:key@host``): only its scheme, host and port survive redaction.
_URL = re.compile(r"""(?i)\b([a-z][a-z0-9+.-]*)://(?:[^\s/?#@'"]*@)?([^\s/?#'"@]+)([^\s'"<>)]*)""")
_URL_PATH = re.compile(r"(?i)\b(url:\s*)/[^\s'\"<>)]*")  # requests: "... with url: /v3/<key> (Caused by ...)"
_SECRET_PARAM = re.compile(r"""(?i)\b(key|api[_-]?key|apikey|token|secret|password|auth)=[^\s&'"<>)]+""")


def _cut_url(match: re.Match[str]) -> str:
    rest = match.group(3)
    return f"{match.group(1)}://{match.group(2)}{'/…' if rest not in ('', '/') else rest}"


def redact(text: str) -> str:
    """``text`` with every URL cut to ``scheme://host:port/…`` and ``key=…``-like values hidden.

    For anything that may quote an RPC or upstream URL: exception texts, transport errors, log lines.
    """
    text = _URL_PATH.sub(lambda m: f"{m.group(1)}/…", _URL.sub(_cut_url, text))
    return _SECRET_PARAM.sub(lambda m: f"{m.group(1)}=…", text)


def describe(error: BaseException) -> str:
    """The exception's type and its redacted message: safe for a log line or a reply."""
    message = redact(str(error))
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def is_chain_error(error: BaseException) -> bool:
    """An exception raised by web3 or its HTTP transport (their texts may name the RPC URL)."""
    from web3.exceptions import Web3Exception

    return isinstance(error, Web3Exception) or _is_transport_error(error)


class EscrowError(ClawnodeError):
    """A failed escrow operation: ``reason`` is the contract's (or client's) stable reason."""

    reason: str

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(
            REASON_CODES.get(reason, ErrorCode.INTERNAL),
            message or MESSAGES.get(reason, "escrow operation failed"),
            reason,
        )

    @property
    def retryable(self) -> bool:
        """True when trying again later can succeed (the chain was down or slow)."""
        return self.reason in RETRYABLE


def _is_transport_error(error: BaseException) -> bool:
    import requests
    from web3.exceptions import ProviderConnectionError, TimeExhausted

    if isinstance(error, TimeExhausted):
        return False
    return isinstance(error, ConnectionError | OSError | requests.RequestException | ProviderConnectionError)


def normalise(error: BaseException) -> EscrowError:
    """Map any exception raised while talking to a chain to an ``EscrowError``."""
    from web3.exceptions import TimeExhausted

    if isinstance(error, EscrowError):
        return error
    # What the chain said, for whoever debugs: its type and its text with any URL cut to the host.
    log.debug("chain error: %s", describe(error))
    if isinstance(error, TimeExhausted):
        return EscrowError("receipt_timeout")
    if _is_transport_error(error):
        return EscrowError("chain_unavailable")
    text = " ".join(str(part) for part in (getattr(error, "message", None), *error.args) if part)
    match = _REVERT.search(text)
    if match and match.group(1) in REASON_CODES:
        return EscrowError(match.group(1))
    lowered = text.lower()
    if "insufficient funds" in lowered or "not have enough balance" in lowered:
        return EscrowError("insufficient_funds")
    if "revert" in lowered:
        return EscrowError("reverted")
    return EscrowError("rejected")
