"""Capability records: what a node sells, at what price, on what hardware.

A record is a pydantic model signed into a libp2p envelope by the node's key. The
checks a received record must pass live in :func:`verify_record`, the one place
both the DHT validator and the query path call.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from enum import StrEnum
from typing import Any, Literal

from eth_account import Account
from eth_account.messages import encode_defunct
from libp2p.crypto.keys import PrivateKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from dht.schema_safety import SchemaBudgetExceeded, instance_problems, schema_problem, validation_budget
from runtime.errors import ClawnodeError
from runtime.jsonsafe import loads_bounded
from runtime.model_ids import CAPABILITY_NAME_PATTERN, MODEL_FEATURES, CapabilityName, ModelFeature
from wire.signed import SignatureError, canonical_json, open_sealed, seal

RECORD_DOMAIN = "clawnode-capability-record"
RECORD_PAYLOAD_TYPE = b"/clawnode/capability-record/1"
MAX_RECORD_BYTES = 8 * 1024
MAX_CAPABILITIES = 16
# What one verification may spend evaluating the record's schemas against its examples.
# CPU seconds: the DHT validator runs on the event loop's thread. The examples of an honest full
# record take well under a millisecond to check (the whole verification about 2 ms).
RECORD_BUDGET_S = 0.05

# The most a price per unit can be: a quote carries ``price_per_unit`` and ``expected_units``
# (at most 2**62) and the escrow locks their product as a uint256, so the product must fit in
# 2**256 - 1. 10**30 wei (10**12 ETH) per unit keeps it below 2**163, far inside; any larger price
# is refused where an offer is written and in a received record.
UINT256_MAX = 2**256 - 1
MAX_QUOTE_UNITS = 2**62
MAX_PRICE_PER_UNIT = 10**30
assert MAX_PRICE_PER_UNIT * MAX_QUOTE_UNITS <= UINT256_MAX

Kind = Literal["model", "embedding", "search", "storage", "verify", "layers"]
PriceUnit = Literal["token", "request", "second"]
Risk = Literal["low", "medium", "high"]
Reachability = Literal["public", "private", "unknown"]

# ``<kind>:<id>``, the id as the ecosystem writes it (``model:Qwen/Qwen2.5-0.5B-Instruct``,
# ``model:llama3.2:1b``): runtime.model_ids says what it allows and refuses (URLs, local paths).
CAPABILITY_NAME = CAPABILITY_NAME_PATTERN


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pricing(_Strict):
    unit: PriceUnit
    price_per_unit: int = Field(
        ge=0, le=MAX_PRICE_PER_UNIT, description="in the smallest unit of the asset (wei for ETH), at most 10**30"
    )
    asset: str = Field(
        "ETH",
        pattern=r"^([A-Za-z0-9]{1,16}|erc20:0x[0-9a-fA-F]{40})$",
        description="what the price is paid in on `chain`: the coin's symbol, or erc20:<token address>",
    )
    chain: str = Field("eip155:31337", pattern=r"^[a-z0-9]{3,8}:[A-Za-z0-9-]{1,32}$", description="CAIP-2 chain id")
    minimum_lock: int = Field(0, ge=0, le=UINT256_MAX, description="smallest escrow lock accepted, in the same unit")


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
    features: list[ModelFeature] = Field(
        default_factory=list,
        max_length=len(MODEL_FEATURES),
        description="what the provider serves beyond free text: tools, json_schema, logprobs, n",
    )
    chat_format: str = Field(
        "", pattern=r"^([a-z0-9][a-z0-9._-]{0,47})?$", description="the chat template family, e.g. chatml, gemma"
    )
    # Capacity, so a router spreads load before anyone refuses: sequences generated at once, and
    # requests that may wait beyond them (more are refused E_RATE_LIMITED busy). 0: not said.
    parallel: int = Field(0, ge=0, le=1024, description="sequences the model generates at once")
    max_queue: int = Field(0, ge=0, le=10_000, description="requests that may wait beyond them")
    # The served GGUF file's sha256 (lowercase hex), so a verifier can load the very same file.
    sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$", description="sha256 of the served GGUF file, hex")

    @field_validator("features")
    @classmethod
    def _in_order(cls, features: list[ModelFeature]) -> list[ModelFeature]:
        # One way to write each set, so a record's canonical encoding is unique.
        if features != [name for name in MODEL_FEATURES if name in features]:
            raise ValueError(f"features are listed once each, in the order {', '.join(MODEL_FEATURES)}")
        return features

    @model_serializer(mode="wrap")
    def _without_empty_additions(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A record from before features were published has neither key; left out while empty, its
        # canonical encoding (which the signature covers) is still the one it was signed as.
        data: dict[str, Any] = handler(self)
        for key in ("features", "chat_format", "parallel", "max_queue", "sha256"):
            if not data.get(key):
                data.pop(key, None)
        return data


class CapabilityDescriptor(_Strict):
    name: CapabilityName
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
        problem = schema_problem(schema)
        if problem is not None:
            raise ValueError(f"not a usable JSON Schema ({problem})")
        return schema

    @model_validator(mode="after")
    def _consistent(self) -> CapabilityDescriptor:
        if self.name.split(":", 1)[0] != self.kind:
            raise ValueError(f"a {self.kind} capability is named {self.kind}:<name>")
        if self.kind in ("model", "embedding") and self.model is None:
            raise ValueError("a model capability states its model facts")
        # Checked again here: a descriptor built unchecked (model_construct) and then put in a record
        # gets only this validator re-run, and an unchecked schema is never evaluated.
        problem = schema_problem(self.params_schema)
        if problem is not None:
            raise ValueError(f"params_schema is not a usable JSON Schema ({problem})")
        # SchemaBudgetExceeded is not a ValueError: it passes through pydantic to the caller,
        # which refuses the record as an unsafe schema rather than an invalid one.
        for index, example in enumerate(self.examples):
            problems = instance_problems(self.params_schema, example, limit=1)
            if problems:
                raise ValueError(f"examples[{index}] does not satisfy params_schema: {problems[0]}")
        return self

    def request_problems(self, request: dict[str, Any]) -> list[str]:
        """Why ``request`` would be refused by this capability's ``params_schema`` (empty: accepted).

        Bounded in time: a request that takes the schema too long to evaluate is refused for that.
        """
        try:
            return instance_problems(self.params_schema, request)
        except SchemaBudgetExceeded:
            return ["the request took too long to check against params_schema"]


class Hardware(_Strict):
    gpu_model: str | None = Field(None, max_length=64)
    vram_mb: int = Field(0, ge=0)
    cores: int = Field(ge=1)
    ram_mb: int = Field(ge=0)


class WalletBinding(_Strict):
    """The payout address, bound to the peer id by the wallet's own EIP-191 signature."""

    address: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")


class SandboxOffer(_Strict):
    """The sandboxed task kinds this node runs for tasks it wins, and the most one run may ask for."""

    # ``inference``: prompt batches on this node's served models (a node before it refuses a record naming it).
    kinds: list[Literal["wasm", "native", "inference"]] = Field(max_length=3)
    max_fuel: int = Field(ge=1, le=10**13, description="wasm instructions (native: CPU-milliseconds)")
    max_memory_mb: int = Field(ge=1, le=4096)
    max_wall_s: int = Field(ge=1, le=3600, description="whole seconds (signed payloads carry no floats)")
    max_output_bytes: int = Field(ge=0, le=16 * 1024 * 1024)
    max_module_bytes: int = Field(ge=1, le=16 * 1024 * 1024)


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
    sandbox: SandboxOffer | None = None  # the task kinds it runs (runtime/sandbox), for sellers of tasks

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
    UNSAFE_SCHEMA = "unsafe_schema"  # a $ref outside the schema, a backtracking pattern, too big or too costly
    MALFORMED = "malformed"  # anything else the checks choked on (deep nesting, odd JSON): never an exception


class RecordRejected(ValueError):
    def __init__(self, reason: Rejection, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def seal_record(record: CapabilityRecord, private_key: PrivateKey) -> bytes:
    leaks = private_leaks(record.model_dump(mode="json"))
    if leaks:
        raise RecordRejected(Rejection.PRIVATE_DATA, "a record may not carry URLs or local paths")
    sealed = seal(record, private_key, domain=RECORD_DOMAIN, payload_type=RECORD_PAYLOAD_TYPE)
    if len(sealed) > MAX_RECORD_BYTES:
        raise RecordRejected(Rejection.OVERSIZED, f"{len(sealed)} bytes, the limit is {MAX_RECORD_BYTES}")
    return sealed


MAX_JSON_DEPTH = 64


def json_depth(value: Any) -> int:
    """How deeply ``value`` nests (a scalar: 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest


def unsafe_schema_in(payload: Any) -> str | None:
    """The first unsafe schema in a parsed record payload, as a reason (None: every schema is safe).

    Pure; runs before the model is built, so a hostile schema is never evaluated.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("capabilities"), list):
        return None
    for index, capability in enumerate(payload["capabilities"][:MAX_CAPABILITIES]):
        if not isinstance(capability, dict):
            continue
        for field in ("params_schema", "returns"):
            if field in capability:
                problem = schema_problem(capability[field])
                if problem is not None:
                    return f"capabilities[{index}].{field}: {problem}"
    return None


def verify_record(data: bytes, *, now: float, held_seq: int | None = None) -> CapabilityRecord:
    """Accept a sealed record only if every check passes; raise :class:`RecordRejected` otherwise.

    Nothing else ever escapes: whatever the checks themselves choke on is a ``malformed`` rejection.
    CPU-bound (a signature, JSON Schema checks): async callers run it on a worker thread. What
    depends on the bytes alone is remembered for the last :data:`VERDICT_CACHE_SIZE` records, so a
    record seen again (py-libp2p's ``select()`` re-validates every copy) costs a hash, and a
    costly hostile one costs its budget once.
    """
    if not isinstance(data, bytes | bytearray):
        raise RecordRejected(Rejection.MALFORMED, "not bytes")
    if len(data) > MAX_RECORD_BYTES:
        raise RecordRejected(Rejection.OVERSIZED, f"{len(data)} bytes")
    digest = hashlib.sha256(data).digest()
    with _verdicts_lock:
        verdict = _verdicts.get(digest)
        if verdict is not None:
            _verdicts.move_to_end(digest)
    if verdict is None:
        verdict = _content_verdict(bytes(data))
        with _verdicts_lock:
            _verdicts[digest] = verdict
            while len(_verdicts) > VERDICT_CACHE_SIZE:
                _verdicts.popitem(last=False)
    if isinstance(verdict, RecordRejected):
        raise RecordRejected(verdict.reason, verdict.detail)
    record = verdict
    if record.expires_at <= now:
        raise RecordRejected(Rejection.EXPIRED, "the record has expired")
    if held_seq is not None and record.seq <= held_seq:
        raise RecordRejected(Rejection.STALE_SEQUENCE, f"sequence {record.seq} is not newer than {held_seq}")
    return record


VERDICT_CACHE_SIZE = 512
_verdicts: OrderedDict[bytes, CapabilityRecord | RecordRejected] = OrderedDict()
_verdicts_lock = threading.Lock()  # verify_record runs on worker threads too


def _content_verdict(data: bytes) -> CapabilityRecord | RecordRejected:
    """The record if everything that depends on its bytes alone holds, else the rejection (never raises)."""
    try:
        with validation_budget(RECORD_BUDGET_S):
            return _check_content(data)
    except RecordRejected as rejected:
        return rejected
    except SchemaBudgetExceeded:
        return RecordRejected(Rejection.UNSAFE_SCHEMA, "evaluating its schemas took too long")
    except Exception as error:  # noqa: BLE001 - a stranger's bytes must never raise anything else
        return RecordRejected(Rejection.MALFORMED, type(error).__name__)


def _check_content(data: bytes) -> CapabilityRecord:
    try:
        signer, payload = open_sealed(data, domain=RECORD_DOMAIN, payload_type=RECORD_PAYLOAD_TYPE)
    except SignatureError as error:
        raise RecordRejected(Rejection.BAD_SIGNATURE, str(error)) from None
    try:
        parsed = loads_bounded(payload, what="the record", max_depth=MAX_JSON_DEPTH)
    except (ValueError, RecursionError, ClawnodeError) as error:
        raise RecordRejected(Rejection.SCHEMA, type(error).__name__) from None
    if json_depth(parsed) > MAX_JSON_DEPTH:
        raise RecordRejected(Rejection.SCHEMA, f"nested deeper than {MAX_JSON_DEPTH}")
    unsafe = unsafe_schema_in(parsed)
    if unsafe is not None:
        raise RecordRejected(Rejection.UNSAFE_SCHEMA, unsafe)
    try:
        record = CapabilityRecord.model_validate(parsed)
    except (ValueError, ValidationError) as error:
        raise RecordRejected(Rejection.SCHEMA, type(error).__name__) from None
    if record.peer_id != str(signer):
        raise RecordRejected(Rejection.WRONG_SIGNER, "signed by a peer other than the one it describes")
    if canonical_json(record) != payload:
        raise RecordRejected(Rejection.SCHEMA, "payload is not canonically encoded")
    if not wallet_binding_holds(record.wallet, record.peer_id):
        raise RecordRejected(Rejection.WALLET_BINDING, "the wallet did not sign this peer id")
    if private_leaks(record.model_dump(mode="json")):
        raise RecordRejected(Rejection.PRIVATE_DATA, "the record carries a URL or a local path")
    return record
