"""Which model features a request needs, and whether a provider's model serves them.

A chat request may ask for more than free text: tool calls, output constrained to a JSON Schema,
log probabilities, several choices. A provider's capability record says, per model, which of these
its engine honours (``ModelFacts.features``). The router asks :func:`serves` before it sends a
request to a provider (a provider that lacks a feature is skipped, never sent the request to drop it
silently), and the provider asks it again before it generates (a stranger may send anything).

Pure: :func:`required_features` reads a request body (a stranger's, so it never raises) and
:func:`serves` compares two sets of names; both take plain data.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Final

from protocols.machines.verdict import Refusal
from runtime.errors import ErrorCode
from runtime.model_ids import MODEL_FEATURES, ModelFeature

Feature = ModelFeature
# In the order a refusal names them.
FEATURES: Final = MODEL_FEATURES
# The request field a client set to need each feature: a refusal names it as OpenAI's ``param``.
FEATURE_PARAMS: Final[dict[str, str]] = {
    "tools": "tools",
    "json_schema": "response_format",
    "logprobs": "logprobs",
    "n": "n",
}
FEATURE_NOT_SERVED: Final = "feature_not_served"


def _int_at_least(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def required_features(body: object) -> frozenset[str]:
    """The features a chat or completion request body needs (a subset of :data:`FEATURES`).

    - ``tools``: a non-empty ``tools`` list (whatever ``tool_choice`` says: the tools are part of
      the prompt);
    - ``json_schema``: ``response_format`` of type ``json_object`` or ``json_schema`` (both are
      grammar-constrained decoding);
    - ``logprobs``: ``logprobs`` true (chat) or a number (completions), or ``top_logprobs`` > 0;
    - ``n``: ``n`` > 1.

    Never raises: a malformed field needs nothing here (the engine refuses it with a 400 naming it).
    """
    if not isinstance(body, Mapping):
        return frozenset()
    needed: set[str] = set()
    tools = body.get("tools")
    if isinstance(tools, list | tuple) and tools:
        needed.add("tools")
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") in ("json_object", "json_schema"):
        needed.add("json_schema")
    logprobs, top_logprobs, n = body.get("logprobs"), body.get("top_logprobs"), body.get("n")
    if logprobs is True or _int_at_least(logprobs, 0) or _int_at_least(top_logprobs, 1):
        needed.add("logprobs")
    if _int_at_least(n, 2):
        needed.add("n")
    return frozenset(needed)


def served_features(descriptor: Any) -> frozenset[str]:
    """The features a capability descriptor (``dht.records.CapabilityDescriptor``), its model facts
    (``ModelFacts``) or either as JSON say the provider serves; none for anything else (not a model,
    a record from before features were published)."""
    if isinstance(descriptor, Mapping):  # the same, as JSON
        facts = descriptor.get("model", descriptor)
        features = facts.get("features") if isinstance(facts, Mapping) else None
    else:
        facts = getattr(descriptor, "model", descriptor)
        features = getattr(facts, "features", None)
    if not isinstance(features, list | tuple | set | frozenset):
        return frozenset()
    return frozenset(name for name in features if isinstance(name, str))


def serves(required: Collection[str], descriptor: Any, *, capability: str = "this model") -> Refusal | None:
    """``None`` when the provider's model serves every feature in ``required``; otherwise a refusal
    ``E_INVALID_ARGUMENT`` / ``feature_not_served`` naming the missing features and the request
    field (``param``) of the first one.

    ``descriptor``: the model's capability descriptor from a record, its ``ModelFacts``, or
    ``None`` (a capability without model facts serves no feature).
    """
    missing = sorted(set(required) - served_features(descriptor), key=_feature_order)
    if not missing:
        return None
    param = FEATURE_PARAMS.get(missing[0], missing[0])
    return Refusal(
        ErrorCode.INVALID_ARGUMENT,
        FEATURE_NOT_SERVED,
        f"{capability} is not served with {', '.join(missing)} by this provider (param: {param})",
    )


def _feature_order(name: str) -> tuple[int, str]:
    return (FEATURES.index(name), name) if name in FEATURES else (len(FEATURES), name)  # type: ignore[arg-type]


def parse_features(names: Collection[str]) -> frozenset[str]:
    """Feature names a user typed (``clawnode find --feature``, a discovery query), checked.

    ``ValueError`` names the unknown one and the known ones.
    """
    unknown = [name for name in names if name not in FEATURES]
    if unknown:
        raise ValueError(f"unknown feature {unknown[0]!r} (known: {', '.join(FEATURES)})")
    return frozenset(names)
