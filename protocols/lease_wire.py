"""The messages of ``/clawnode/lease/1.0.0`` and ``/clawnode/infer/1.2.0`` (``1.1.0``, ``1.0.0``: the same messages).

Signed objects (a provider's quote and grant, a consumer's lease open) travel as libp2p signed
envelopes (``wire.signed``), base64 in a JSON frame, each kind under its own domain so a
signature on one can never be replayed as another. Everything else rides on the Noise-secured
stream, whose remote peer id already says who is speaking.

The access token of a grant travels beside the signed grant, never inside it: the grant names
only the token's sha256, so a grant can be stored, shown and audited without the secret.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from dht.records import CAPABILITY_NAME, WalletBinding
from runtime.ledger.receipts import LEASE_ID_PATTERN, MAX_AMOUNT, PEER_ID_PATTERN, SignedReceipt
from runtime.verify.evidence import CallProof
from wire.rpc import ErrorReply

ADDRESS = r"^0x[0-9a-fA-F]{40}$"
HEX32 = r"^0x[0-9a-f]{64}$"
SHA256_HEX = r"^[0-9a-f]{64}$"
ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
MAX_DURATION_S = 30 * 24 * 3600

QUOTE_DOMAIN = "clawnode-lease-quote"
QUOTE_TYPE = b"/clawnode/lease-quote/1"
OPEN_DOMAIN = "clawnode-lease-open"
OPEN_TYPE = b"/clawnode/lease-open/1"
GRANT_DOMAIN = "clawnode-lease-grant"
GRANT_TYPE = b"/clawnode/lease-grant/1"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- signed payloads --


class EscrowTerms(_Msg):
    """How the provider wants to be paid: lock the budget in this contract, for this payee."""

    chain_id: int = Field(ge=1)
    contract: str = Field(pattern=ADDRESS)
    payee: str = Field(pattern=ADDRESS, description="the provider's wallet")
    arbiter: str = Field(pattern=ADDRESS)
    dispute_window_s: int = Field(ge=0, le=MAX_DURATION_S)
    token: str | None = Field(None, pattern=ADDRESS, description="the ERC-20 to lock in; None: the chain's coin")

    @model_serializer(mode="wrap")
    def _without_coin(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A coin quote signs the same bytes as before tokens existed (older peers forbid extra fields)."""
        data: dict[str, Any] = handler(self)
        if data.get("token") is None:
            data.pop("token", None)
        return data


class LeasePolicy(_Msg):
    max_requests: int = Field(ge=1, le=10**9)
    budget_cap: int = Field(ge=0, le=MAX_AMOUNT, description="wei; the lease never meters beyond it")
    rate_per_minute: int = Field(ge=1, le=10**6)


class Quote(_Msg):
    quote_id: str = Field(pattern=ID_PATTERN)
    provider: str = Field(pattern=PEER_ID_PATTERN)
    consumer: str = Field(pattern=PEER_ID_PATTERN, description="only this peer may open a lease on the quote")
    capability: str = Field(pattern=CAPABILITY_NAME)
    price_per_unit: int = Field(ge=0, le=MAX_AMOUNT)
    expected_units: int = Field(ge=1, le=2**62)
    duration_s: int = Field(ge=1, le=MAX_DURATION_S)
    valid_until: int = Field(ge=0, description="unix seconds; the quote cannot be opened after this")
    escrow: EscrowTerms | None = Field(None, description="None: post-paid, for trusted peers only")
    postpaid_cap: int = Field(0, ge=0, le=MAX_AMOUNT, description="the most a post-paid lease may owe")


class EscrowLock(_Msg):
    payer: str = Field(pattern=ADDRESS)
    escrow_id: str = Field(pattern=HEX32)
    tx_hash: str | None = Field(None, pattern=HEX32)


class LeaseOpen(_Msg):
    """The consumer's signed request to open a lease on a quote it received."""

    quote: str = Field(max_length=8192, description="base64 of the provider's signed quote envelope")
    lease_id: str = Field(pattern=LEASE_ID_PATTERN)
    budget: int = Field(ge=0, le=MAX_AMOUNT)
    mode: Literal["escrow", "postpaid"]
    lock: EscrowLock | None = None
    wallet: WalletBinding | None = Field(
        None, description="escrow mode: the payer wallet, bound to the consumer's peer id by the wallet's signature"
    )
    salt: str | None = Field(
        None, pattern=SHA256_HEX, description="the lease id is sha256(domain, the consumer's peer id, this salt)"
    )
    channel_base: int | None = Field(
        None,
        ge=0,
        le=MAX_AMOUNT,
        description="a payment channel: the lock is the pair's channel (its id bound by salt), and this lease's"
        " vouchers are for channel_base + the receipt's amount (protocols/machines/channel.py)",
    )


class LeaseGrant(_Msg):
    lease_id: str = Field(pattern=LEASE_ID_PATTERN)
    quote_id: str = Field(pattern=ID_PATTERN)
    provider: str = Field(pattern=PEER_ID_PATTERN)
    consumer: str = Field(pattern=PEER_ID_PATTERN)
    capability: str = Field(pattern=CAPABILITY_NAME)
    price_per_unit: int = Field(ge=0, le=MAX_AMOUNT)
    budget: int = Field(ge=0, le=MAX_AMOUNT)
    expires_at: int = Field(ge=0)
    token_sha256: str = Field(pattern=SHA256_HEX)
    policy: LeasePolicy
    mode: Literal["escrow", "postpaid"]


# -- requests --


class QuoteRequest(_Msg):
    type: Literal["quote_request"] = "quote_request"
    capability: str = Field(pattern=CAPABILITY_NAME)
    expected_units: int = Field(ge=1, le=2**62)
    duration_s: int = Field(ge=1, le=MAX_DURATION_S)


class OpenRequest(_Msg):
    type: Literal["open"] = "open"
    envelope: str = Field(max_length=16384, description="base64 of the consumer's signed LeaseOpen")


class RevokeRequest(_Msg):
    """Either side ends the lease; the stream's remote peer must be the lease's other party."""

    type: Literal["revoke"] = "revoke"
    lease_id: str = Field(pattern=LEASE_ID_PATTERN)
    reason: str = Field("revoked", max_length=64)


class RenewRequest(_Msg):
    type: Literal["renew"] = "renew"
    lease_id: str = Field(pattern=LEASE_ID_PATTERN)
    expires_at: int = Field(ge=0)


class ReceiptPush(_Msg):
    """Provider → consumer: countersign this usage receipt."""

    type: Literal["receipt"] = "receipt"
    receipt: SignedReceipt


LeaseRequest = Annotated[
    QuoteRequest | OpenRequest | RevokeRequest | RenewRequest | ReceiptPush, Field(discriminator="type")
]


# -- replies --


class QuoteReply(_Msg):
    type: Literal["quote"] = "quote"
    envelope: str = Field(max_length=8192)


class GrantReply(_Msg):
    type: Literal["grant"] = "grant"
    envelope: str = Field(max_length=8192)
    token: str = Field(min_length=32, max_length=128)


class Ack(_Msg):
    type: Literal["ack"] = "ack"
    expires_at: int | None = None


class Countersigned(_Msg):
    type: Literal["countersigned"] = "countersigned"
    receipt: SignedReceipt


# -- /clawnode/infer/1.2.0, 1.1.0 and 1.0.0 (the same frames; the id names the proof body read) --


class CallRequest(_Msg):
    type: Literal["call"] = "call"
    lease_id: str = Field(pattern=LEASE_ID_PATTERN)
    token: str = Field(min_length=1, max_length=128)
    body: dict[str, Any]


class Chunk(_Msg):
    type: Literal["chunk"] = "chunk"
    data: dict[str, Any]


class CallEnd(_Msg):
    type: Literal["end"] = "end"
    units: int = Field(ge=0, le=2**62, description="exactly what the engine counted for this call")
    usage: dict[str, int] = Field(default_factory=dict)
    served_by: str = Field(pattern=PEER_ID_PATTERN)
    # Verified inference (docs/verified-inference.md): the call's signed commitment and its chunks.
    verify: CallProof | None = None


class CallAck(_Msg):
    """Consumer → provider after the end frame: the units are counted.

    The provider meters a call once its end frame is written, ack or not: a consumer that reads the
    answer and never acknowledges pays for it all the same.
    """

    type: Literal["ack"] = "ack"


class CallError(ErrorReply):
    """Provider → consumer: the call failed (``wire.rpc.ErrorReply``'s code, message and reason), and
    what it is billed (``units``): the tokens of the chunks written before it and the prompt tokens
    the engine had decoded when it failed (a request the engine refuses only after its prompt, e.g. a
    JSON Schema whose grammar llama.cpp cannot parse), within the call's reservation. Added later, as
    ``ErrorReply`` fields are: an older consumer ignores it (and counts the chunks alone), an older
    provider sends none (and bills the chunks alone).

    ``verify``: verified inference's signed proof of the text chunks written before it, as an end
    frame carries (docs/verified-inference.md), sent when the call failed after streaming a reply it
    recorded: the consumer spot-checks such a call as it does one that ended, so a reply cut short by
    an error frame is not paid unchecked. Also added later: ``ErrorReply`` ignores fields it does not
    know (pydantic's default, not ``extra="forbid"``), so an older consumer reads the frame's code,
    message and reason as before and drops the proof; an older provider sends none."""

    units: int | None = Field(None, ge=0, le=2**62)
    verify: CallProof | None = None


class Cancel(_Msg):
    """Consumer → provider mid-stream: stop. The provider ends the call with an end frame billing the
    chunks it wrote (no prompt); the consumer reads on to that frame, so both count the same."""

    type: Literal["cancel"] = "cancel"


# -- what the API and CLI show --


class LeaseView(BaseModel):
    """A lease as the API and CLI show it: never the token."""

    lease_id: str
    role: str
    provider: str
    consumer: str
    capability: str
    price_per_unit: int
    budget: int
    expires_at: int
    mode: str
    state: str
    units: int


class CallResult(BaseModel):
    chunks: list[dict[str, Any]]
    units: int
    usage: dict[str, int]
    served_by: str
