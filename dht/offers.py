"""What a node offers, as its owner writes it (config ``[[offers]]`` or the API), and the
capability descriptor it becomes. Model offers get a chat-completion request schema,
reply schema and example by default, so an agent can act on the record alone."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dht.records import (
    MAX_PRICE_PER_UNIT,
    UINT256_MAX,
    CapabilityDescriptor,
    Kind,
    ModelFacts,
    Prerequisites,
    PriceUnit,
    Pricing,
    Risk,
)
from runtime.model_ids import MODEL_FEATURES, CapabilityName, ModelFeature

CHAT_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                    "content": {"type": ["string", "array", "null"]},
                },
            },
        },
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "stream": {"type": "boolean"},
    },
}
CHAT_REPLY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["choices", "usage"],
    "properties": {
        "choices": {"type": "array"},
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "completion_tokens"],
            "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}},
        },
    },
}
CHAT_EXAMPLE: dict[str, Any] = {"messages": [{"role": "user", "content": "Say hello in five words."}], "max_tokens": 16}
EMBEDDING_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["input"],
    "properties": {"input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}},
}
EMBEDDING_REPLY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "array"}},
}


class Offer(BaseModel):
    """One thing this node sells. Prices are integers in the asset's smallest unit (wei for ETH).

    ``price_per_unit`` is at most 10**30 (``MAX_PRICE_PER_UNIT``): the most a quote can carry, since
    the escrow locks price × units (up to 2**62 units) as a uint256.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: CapabilityName = Field(description="kind:name, e.g. model:gemma3-270m-q4_k_m or model:Qwen/Qwen2.5-0.5B")
    summary: str = Field("", max_length=280)
    unit: PriceUnit = "token"
    price_per_unit: int = Field(ge=0, le=MAX_PRICE_PER_UNIT, description="wei per unit, at most 10**30")
    asset: str = "ETH"
    chain: str = "eip155:31337"
    minimum_lock: int = Field(0, ge=0, le=UINT256_MAX)
    context_length: int | None = Field(None, ge=1)
    features: list[ModelFeature] = Field(
        default_factory=list, description="what a model offer serves beyond free text: tools, json_schema, logprobs, n"
    )
    chat_format: str = Field(
        "", pattern=r"^([a-z0-9][a-z0-9._-]{0,47})?$", description="a model's chat template family (chatml, gemma...)"
    )
    parallel: int = Field(0, ge=0, le=1024, description="a model's sequences generated at once (0: not said)")
    max_queue: int = Field(0, ge=0, le=10_000, description="a model's requests that may wait beyond them")
    family: str = ""
    parameters: int = Field(0, ge=0)
    quantisation: str = ""
    sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$", description="a model's GGUF file sha256, hex")
    params_schema: dict[str, Any] | None = None
    returns: dict[str, Any] | None = None
    examples: list[dict[str, Any]] | None = None
    permissions: list[str] = Field(default_factory=list)
    risk: Risk = "low"
    lease_required: bool = True
    trusted_postpaid_allowed: bool = False
    escrow_contract: str | None = Field(None, pattern=r"^0x[0-9a-fA-F]{40}$")

    @field_validator("features")
    @classmethod
    def _each_once_in_order(cls, features: list[ModelFeature]) -> list[ModelFeature]:
        return [name for name in MODEL_FEATURES if name in features]

    @model_validator(mode="after")
    def _features_of_models_only(self) -> Offer:
        if self.features and self.kind != "model":
            raise ValueError("only a model offer serves features (tools, json_schema, logprobs, n)")
        return self

    @property
    def kind(self) -> Kind:
        return self.name.split(":", 1)[0]  # type: ignore[return-value]

    def model_facts(self) -> ModelFacts | None:
        """The model facts of a model or embedding offer, as its descriptor carries them; None otherwise."""
        if self.kind not in ("model", "embedding"):
            return None
        return ModelFacts(
            family=self.family or default_family(self.name),
            parameters=self.parameters,
            quantisation=self.quantisation or "unknown",
            context_length=self.context_length or 2048,
            features=self.features,
            chat_format=self.chat_format,
            parallel=self.parallel,
            max_queue=self.max_queue,
            sha256=self.sha256,
        )

    def descriptor(self) -> CapabilityDescriptor:
        kind = self.kind
        schema, reply, examples = self.params_schema, self.returns, self.examples
        if kind == "model":
            schema, reply = schema or CHAT_REQUEST_SCHEMA, reply or CHAT_REPLY_SCHEMA
            examples = examples if examples is not None else [CHAT_EXAMPLE]
        elif kind == "embedding":
            schema, reply = schema or EMBEDDING_REQUEST_SCHEMA, reply or EMBEDDING_REPLY_SCHEMA
            examples = examples if examples is not None else [{"input": "hello"}]
        if schema is None or reply is None:
            raise ValueError(f"a {kind} offer needs params_schema and returns")
        model = self.model_facts()
        return CapabilityDescriptor(
            name=self.name,
            kind=kind,
            summary=self.summary or self.name,
            params_schema=schema,
            returns=reply,
            pricing=Pricing(
                unit=self.unit,
                price_per_unit=self.price_per_unit,
                asset=self.asset,
                chain=self.chain,
                minimum_lock=self.minimum_lock,
            ),
            prerequisites=Prerequisites(
                lease_required=self.lease_required,
                escrow_chain=self.chain if self.escrow_contract else None,
                escrow_contract=self.escrow_contract,
                trusted_postpaid_allowed=self.trusted_postpaid_allowed,
            ),
            permissions=self.permissions,
            risk=self.risk,
            examples=examples or [],
            model=model,
        )


def default_family(capability: str) -> str:
    """A model's family guessed from its id: ``model:Qwen/Qwen2.5-0.5B-Instruct`` → ``Qwen2.5``,
    ``model:llama3.2:1b`` → ``llama3.2``, ``model:gemma3-270m`` → ``gemma3``."""
    model_id = capability.split(":", 1)[1]
    return model_id.rsplit("/", 1)[-1].split(":", 1)[0].split("-", 1)[0][:64]


def capability_key(name: str) -> str:
    """The SHA-256 of a capability name, hex: the raw 32-byte provider key of releases before issue 23
    (still read, see :func:`legacy_provider_key`); :func:`provider_key` wraps the same digest."""
    return hashlib.sha256(f"clawnode-capability:{name}".encode()).hexdigest()


# Multihash: sha2-256 (0x12), 32 bytes (0x20). CIDv1: version 1, codec raw (0x55).
_SHA256_MULTIHASH = b"\x12\x20"
_CIDV1_RAW = b"\x01\x55"


def provider_key(name: str) -> bytes:
    """The DHT provider key of a capability: the sha2-256 multihash of ``clawnode-capability:<name>``.

    What go and js DHT servers take as a provider key (the multihash of a CIDv1, here a raw one:
    :func:`capability_cid`); a bare 32-byte digest was refused by them (``Invalid CID``), so a
    mixed network lost clawnode's provider records on every non-Python node (issue 23).
    """
    return _SHA256_MULTIHASH + bytes.fromhex(capability_key(name))


def legacy_provider_key(name: str) -> bytes:
    """The provider key releases before issue 23 announced under (the bare digest): still read, so
    providers running an older release are found until they upgrade."""
    return bytes.fromhex(capability_key(name))


def capability_cid(name: str) -> str:
    """The capability's provider key as a CIDv1 (raw, sha2-256) in base32, as js and go take it
    (``bafkrei…``): ``findProviders(CID.parse(capability_cid(name)))`` finds its providers."""
    return "b" + base64.b32encode(_CIDV1_RAW + provider_key(name)).decode().lower().rstrip("=")
