"""Signed objects in the libp2p signed-envelope format, with canonical JSON payloads.

A payload is a pydantic model encoded as JSON with sorted keys, no spaces and no
floats, so the same object always signs to the same bytes on every node. The
envelope's domain separates kinds of object: a signature on a capability record
can never be replayed as a signature on a usage receipt.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from libp2p.crypto.keys import PrivateKey, PublicKey
from libp2p.peer.envelope import Envelope, make_unsigned, unmarshal_envelope
from libp2p.peer.id import ID
from pydantic import BaseModel

from runtime.errors import ClawnodeError, ErrorCode


class SignatureError(ValueError):
    """The envelope does not verify, or is not the kind of object expected."""


def _reject_floats(value: Any, path: str = "$") -> None:
    if isinstance(value, float):
        raise ValueError(f"floats are not allowed in signed payloads ({path})")
    if isinstance(value, dict):
        for key, item in value.items():
            _reject_floats(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _reject_floats(item, f"{path}[{index}]")


def canonical_json(model: BaseModel) -> bytes:
    data = model.model_dump(mode="json")
    _reject_floats(data)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal(model: BaseModel, private_key: PrivateKey, *, domain: str, payload_type: bytes) -> bytes:
    """Sign ``model`` and return the marshalled envelope."""
    payload = canonical_json(model)
    signature = private_key.sign(make_unsigned(domain, payload_type, payload))
    envelope = Envelope(private_key.get_public_key(), payload_type, payload, signature)
    return envelope.marshal_envelope()


def open_sealed(data: bytes, *, domain: str, payload_type: bytes) -> tuple[ID, bytes]:
    """Verify an envelope and return (signer's peer id, payload bytes)."""
    try:
        envelope = unmarshal_envelope(data)
    except Exception as error:  # noqa: BLE001 - protobuf and key decoding raise many types
        raise SignatureError(f"not a signed envelope ({type(error).__name__})") from None
    if envelope.payload_type != payload_type:
        raise SignatureError("envelope carries another kind of object")
    try:
        envelope.validate(domain)
    except Exception:  # noqa: BLE001 - a bad key or signature, same verdict
        raise SignatureError("envelope signature does not verify") from None
    return signer_peer_id(envelope.public_key), envelope.raw_payload


def signer_peer_id(public_key: PublicKey) -> ID:
    return ID.from_pubkey(public_key)


# Envelopes travel in JSON frames as base64 text; these are the one way in and out.


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def from_base64(text: str) -> bytes:
    """Decode base64 from a peer; anything else is ``E_INVALID_ARGUMENT``."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "not base64") from None


def open_base64(text: str, *, domain: str, payload_type: bytes) -> tuple[str, bytes]:
    """Verify a base64 envelope from a peer: (signer's peer id, payload), or ``E_FORBIDDEN``."""
    try:
        signer, payload = open_sealed(from_base64(text), domain=domain, payload_type=payload_type)
    except SignatureError as error:
        raise ClawnodeError(ErrorCode.FORBIDDEN, str(error)) from None
    return str(signer), payload
