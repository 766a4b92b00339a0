"""Capability records: what a node sells, at what price, on what hardware.

A record is a pydantic model signed into a libp2p envelope by the node's key. The
checks a received record must pass live in :func:`verify_record`, the one place
both the DHT validator and the query path call.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Any, Literal

from eth_account import Account
from eth_account.messages import encode_defunct
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from libp2p.crypto.keys import PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocols.signed import SignatureError, canonical_json, open_sealed, seal

RECORD_DOMAIN = "clawnode-capability-record"
RECORD_PAYLOAD_TYPE = b"/clawnode/capability-record/1"
MAX_RECORD_BYTES = 8 * 1024
MAX_CAPABILITIES = 16

Kind = Literal["model", "embedding", "search", "storage"]
PriceUnit = Literal["token", "request", "second"]
Risk = Literal["low", "medium", "high"]
Reachability = Literal["public", "private", "unknown"]

CAPABILITY_NAME = r"^(model|embedding|search|storage):[a-z0-9][a-z0-9._-]{0,95}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pricing(_Strict):
    unit: PriceUnit
    price_per_unit: int = Field(ge=0, description="in the smallest unit of the asset (wei for ETH)")
    asset: str = Field("ETH", pattern=r"^[A-Za-z0-9]{1,16}$")
    chain: str = Field("eip155:31337", pattern=r"^[a-z0-9]{3,8}:[A-Za-z0-9-]{1,32}$", description="CAIP-2 chain id")
    minimum_lock: int = Field(0, ge=0, description="smallest escrow lock accepted, in the same unit")


class Prerequisites(_Strict):
    lease_required: bool = True
    escrow_chain: str | None = Field(None, pattern=r"^[a-z0-9]{3,8}:[A-Za-z0-9-]{1,32}$")
    escrow_contract: str | None = Field(None, pattern=r"^0x[0-9a-fA-F]{40}$")
    trusted_postpaid_allowed: bool = False


class ModelFacts(_Strict):
    family: str = Field(max_length=64)
    parameters: int = Field(ge=0)
    quantisation: str = Field(max_length=32)
    context_length: int = Field(ge=1)


class CapabilityDescriptor(_Strict):
    name: str = Field(pattern=CAPABILITY_NAME)
    kind: Kind
    summary: str = Field(max_length=280)
    params_schema: dict[str, Any]
    returns: dict[str, Any]
    pricing: Pricing
    prerequisites: Prerequisites = Field(default_factory=lambda: Prerequisites())
    permissions: list[str] = Field(default_factory=list, max_length=16)
    risk: Risk = "low"
    examples: list[dict[str, Any]] = Field(default_factory=list, max_length=4)
    model: ModelFacts | None = None

    @field_validator("params_schema", "returns")
    @classmethod
    def _is_a_json_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as error:
            raise ValueError(f"not a JSON Schema: {error.message}") from None
        return schema

    @model_validator(mode="after")
    def _consistent(self) -> CapabilityDescriptor:
        if self.name.split(":", 1)[0] != self.kind:
            raise ValueError(f"a {self.kind} capability is named {self.kind}:<name>")
        if self.kind in ("model", "embedding") and self.model is None:
            raise ValueError("a model capability states its model facts")
        validator = Draft202012Validator(self.params_schema)
        for index, example in enumerate(self.examples):
            problem = next(iter(validator.iter_errors(example)), None)
            if problem is not None:
                raise ValueError(f"examples[{index}] does not satisfy params_schema: {problem.message}")
        return self

    def request_problems(self, request: dict[str, Any]) -> list[str]:
        """Why ``request`` would be refused by this capability's ``params_schema`` (empty: accepted)."""
        return [error.message for error in Draft202012Validator(self.params_schema).iter_errors(request)]


class Hardware(_Strict):
    gpu_model: str | None = Field(None, max_length=64)
    vram_mb: int = Field(0, ge=0)
    cores: int = Field(ge=1)
    ram_mb: int = Field(ge=0)


class WalletBinding(_Strict):
    """The payout address, bound to the peer id by the wallet's own EIP-191 signature."""

    address: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")


class CapabilityRecord(_Strict):
    peer_id: str
    seq: int = Field(ge=1)
    issued_at: int = Field(ge=0)
    expires_at: int = Field(ge=0)
    reachability: Reachability = "unknown"
    addrs: list[str] = Field(default_factory=list, max_length=16)
    hardware: Hardware
    capabilities: list[CapabilityDescriptor] = Field(default_factory=list, max_length=MAX_CAPABILITIES)
    wallet: WalletBinding

    @model_validator(mode="after")
    def _consistent(self) -> CapabilityRecord:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        names = [capability.name for capability in self.capabilities]
        if len(names) != len(set(names)):
            raise ValueError("capability names repeat")
        return self

    def capability(self, name: str) -> CapabilityDescriptor | None:
        return next((c for c in self.capabilities if c.name == name), None)


# Private things a record must never carry (the launch gates): endpoints and local paths.
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
_LOCAL_PATH = re.compile(
    r"(?:^|[\s\"'=(,])(?:~[/\\]|/(?:home|root|Users|tmp|var|etc|opt|mnt|srv|usr|data|media|private)(?:/|$)|[A-Za-z]:\\)"
)


def private_leaks(value: Any) -> list[str]:
    """Strings inside ``value`` that look like an endpoint URL or a local file path."""
    found: list[str] = []
    if isinstance(value, str):
        if _URL.search(value) or _LOCAL_PATH.search(value):
            found.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            found.extend(private_leaks(key))
            found.extend(private_leaks(item))
    elif isinstance(value, list | tuple):
        for item in value:
            found.extend(private_leaks(item))
    return found


def wallet_message(peer_id: str) -> str:
    return f"clawnode payout address for peer {peer_id}"


def bind_wallet(wallet_private_key: bytes, peer_id: str) -> WalletBinding:
    account = Account.from_key(wallet_private_key)
    signed = account.sign_message(encode_defunct(text=wallet_message(peer_id)))
    return WalletBinding(address=account.address, signature="0x" + signed.signature.hex().removeprefix("0x"))


def wallet_binding_holds(binding: WalletBinding, peer_id: str) -> bool:
    try:
        signer = Account.recover_message(
            encode_defunct(text=wallet_message(peer_id)), signature=bytes.fromhex(binding.signature[2:])
        )
    except Exception:  # noqa: BLE001 - a malformed signature is simply not a binding
        return False
    return bool(signer.lower() == binding.address.lower())


class Rejection(StrEnum):
    """Why a received record was dropped; each is counted."""

    OVERSIZED = "oversized"
    BAD_SIGNATURE = "bad_signature"
    WRONG_SIGNER = "wrong_signer"
    SCHEMA = "schema_invalid"
    EXPIRED = "expired"
    STALE_SEQUENCE = "stale_sequence"
    WALLET_BINDING = "bad_wallet_binding"
    PRIVATE_DATA = "private_data"


class RecordRejected(ValueError):
    def __init__(self, reason: Rejection, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


def seal_record(record: CapabilityRecord, private_key: PrivateKey) -> bytes:
    leaks = private_leaks(record.model_dump(mode="json"))
    if leaks:
        raise RecordRejected(Rejection.PRIVATE_DATA, "a record may not carry URLs or local paths")
    sealed = seal(record, private_key, domain=RECORD_DOMAIN, payload_type=RECORD_PAYLOAD_TYPE)
    if len(sealed) > MAX_RECORD_BYTES:
        raise RecordRejected(Rejection.OVERSIZED, f"{len(sealed)} bytes, the limit is {MAX_RECORD_BYTES}")
    return sealed


def verify_record(data: bytes, *, now: float, held_seq: int | None = None) -> CapabilityRecord:
    """Accept a sealed record only if every check passes; raise :class:`RecordRejected` otherwise."""
    if len(data) > MAX_RECORD_BYTES:
        raise RecordRejected(Rejection.OVERSIZED, f"{len(data)} bytes")
    try:
        signer, payload = open_sealed(data, domain=RECORD_DOMAIN, payload_type=RECORD_PAYLOAD_TYPE)
    except SignatureError as error:
        raise RecordRejected(Rejection.BAD_SIGNATURE, str(error)) from None
    try:
        record = CapabilityRecord.model_validate(json.loads(payload))
    except (ValueError, ValidationError) as error:
        raise RecordRejected(Rejection.SCHEMA, type(error).__name__) from None
    if record.peer_id != str(signer):
        raise RecordRejected(Rejection.WRONG_SIGNER, "signed by a peer other than the one it describes")
    if canonical_json(record) != payload:
        raise RecordRejected(Rejection.SCHEMA, "payload is not canonically encoded")
    if record.expires_at <= now:
        raise RecordRejected(Rejection.EXPIRED, "the record has expired")
    if held_seq is not None and record.seq <= held_seq:
        raise RecordRejected(Rejection.STALE_SEQUENCE, f"sequence {record.seq} is not newer than {held_seq}")
    if not wallet_binding_holds(record.wallet, record.peer_id):
        raise RecordRejected(Rejection.WALLET_BINDING, "the wallet did not sign this peer id")
    if private_leaks(record.model_dump(mode="json")):
        raise RecordRejected(Rejection.PRIVATE_DATA, "the record carries a URL or a local path")
    return record
