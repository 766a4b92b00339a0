"""AutoNAT v2's messages (libp2p specs, ``autonat/autonat-v2.md``), proto3 by hand.

Six small messages, so a few dozen lines of encoder and decoder rather than generated code: every
decode is bounded by the frame it reads (``MAX_MESSAGE_BYTES``), refuses truncated or oversized
fields, skips unknown fields as proto3 does, and raises :class:`WireError` for anything else.

On ``/libp2p/autonat/2/dial-request`` every message is a ``Message`` (a oneof of DialRequest,
DialResponse, DialDataRequest, DialDataResponse); on ``/libp2p/autonat/2/dial-back`` a DialBack
goes one way and a DialBackResponse the other. Each is sent as a varint length and the bytes
(``wire.framing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from libp2p.custom_types import TProtocol

DIAL_REQUEST_PROTOCOL = TProtocol("/libp2p/autonat/2/dial-request")
DIAL_BACK_PROTOCOL = TProtocol("/libp2p/autonat/2/dial-back")

MAX_MESSAGE_BYTES = 8 * 1024  # js-libp2p's limit too
MAX_DIAL_BACK_BYTES = 64  # a DialBack is 9 bytes, a DialBackResponse 0 to 2
DIAL_DATA_CHUNK = 4096  # the most one DialDataResponse may carry (the spec's limit)
_MAX_VARINT_BYTES = 10
_UINT64 = (1 << 64) - 1


class WireError(ValueError):
    """Bytes that are not the message expected."""


class ResponseStatus(IntEnum):
    INTERNAL_ERROR = 0
    REQUEST_REJECTED = 100
    DIAL_REFUSED = 101
    OK = 200


class DialStatus(IntEnum):
    UNUSED = 0
    DIAL_ERROR = 100
    DIAL_BACK_ERROR = 101
    OK = 200


@dataclass(frozen=True)
class DialRequest:
    addrs: tuple[bytes, ...]  # multiaddrs in binary form, most wanted first
    nonce: int  # fixed64


@dataclass(frozen=True)
class DialResponse:
    # Plain ints: a status this implementation does not know must reach the client's rule, which
    # discards it (the spec: "MUST discard responses with status codes they do not understand").
    status: int
    addr_idx: int = 0
    dial_status: int = 0


@dataclass(frozen=True)
class DialDataRequest:
    addr_idx: int
    num_bytes: int


@dataclass(frozen=True)
class DialDataResponse:
    data: bytes


Message = DialRequest | DialResponse | DialDataRequest | DialDataResponse

# --- proto3 primitives


def _varint(value: int) -> bytes:
    if not 0 <= value <= _UINT64:
        raise WireError("a varint holds 0 to 2**64 - 1")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _uint_field(field: int, value: int) -> bytes:
    return b"" if value == 0 else _key(field, 0) + _varint(value)  # proto3 leaves defaults out


def _fixed64_field(field: int, value: int) -> bytes:
    if not 0 <= value <= _UINT64:
        raise WireError("a fixed64 holds 0 to 2**64 - 1")
    return b"" if value == 0 else _key(field, 1) + value.to_bytes(8, "little")


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for index in range(_MAX_VARINT_BYTES):
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            if value > _UINT64:
                raise WireError("varint over 64 bits")
            return value, pos
    raise WireError("varint longer than 10 bytes")


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs: an int for varint and fixed64 fields, bytes for length-delimited."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(f"message over {MAX_MESSAGE_BYTES} bytes")
    found: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        value: int | bytes
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
        elif wire_type == 1:
            if pos + 8 > len(data):
                raise WireError("truncated fixed64")
            value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise WireError("truncated field")
            value, pos = data[pos : pos + length], pos + length
        elif wire_type == 5:
            if pos + 4 > len(data):
                raise WireError("truncated fixed32")
            value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
        else:
            raise WireError(f"wire type {wire_type}")
        found.append((field, value))
    return found


def _int(value: int | bytes, what: str) -> int:
    if not isinstance(value, int):
        raise WireError(f"{what} is not a number")
    return value


def _blob(value: int | bytes, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise WireError(f"{what} is not bytes")
    return value


# --- messages


def encode_message(message: Message) -> bytes:
    if isinstance(message, DialRequest):
        body = b"".join(_bytes_field(1, addr) for addr in message.addrs) + _fixed64_field(2, message.nonce)
        return _bytes_field(1, body)
    if isinstance(message, DialResponse):
        body = _uint_field(1, message.status) + _uint_field(2, message.addr_idx) + _uint_field(3, message.dial_status)
        return _bytes_field(2, body)
    if isinstance(message, DialDataRequest):
        return _bytes_field(3, _uint_field(1, message.addr_idx) + _uint_field(2, message.num_bytes))
    return _bytes_field(4, _bytes_field(1, message.data) if message.data else b"")


def decode_message(data: bytes) -> Message:
    """The one message a ``Message`` carries (the last one set, as proto3 reads a oneof)."""
    found: Message | None = None
    for field, value in _fields(data):
        if field == 1:
            addrs: list[bytes] = []
            nonce = 0
            for inner, item in _fields(_blob(value, "dialRequest")):
                if inner == 1:
                    addrs.append(_blob(item, "addrs"))
                elif inner == 2:
                    nonce = _int(item, "nonce")
            found = DialRequest(tuple(addrs), nonce)
        elif field == 2:
            status = addr_idx = dial_status = 0
            for inner, item in _fields(_blob(value, "dialResponse")):
                if inner == 1:
                    status = _int(item, "status")
                elif inner == 2:
                    addr_idx = _int(item, "addrIdx")
                elif inner == 3:
                    dial_status = _int(item, "dialStatus")
            found = DialResponse(status, addr_idx, dial_status)
        elif field == 3:
            addr_idx = num_bytes = 0
            for inner, item in _fields(_blob(value, "dialDataRequest")):
                if inner == 1:
                    addr_idx = _int(item, "addrIdx")
                elif inner == 2:
                    num_bytes = _int(item, "numBytes")
            found = DialDataRequest(addr_idx, num_bytes)
        elif field == 4:
            chunk = b""
            for inner, item in _fields(_blob(value, "dialDataResponse")):
                if inner == 1:
                    chunk = _blob(item, "data")
            found = DialDataResponse(chunk)
    if found is None:
        raise WireError("a Message with no message in it")
    return found


def encode_dial_back(nonce: int) -> bytes:
    return _fixed64_field(1, nonce)


def decode_dial_back(data: bytes) -> int:
    nonce = 0
    for field, value in _fields(data):
        if field == 1:
            nonce = _int(value, "nonce")
    return nonce


DIAL_BACK_OK = 0


def encode_dial_back_response(status: int = DIAL_BACK_OK) -> bytes:
    return _uint_field(1, status)


def decode_dial_back_response(data: bytes) -> int:
    status = DIAL_BACK_OK
    for field, value in _fields(data):
        if field == 1:
            status = _int(value, "status")
    return status
