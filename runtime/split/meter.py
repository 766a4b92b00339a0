"""What a lease's client asked of an RPC server, read from the bytes it sent (ggml-rpc protocol v7).

Every request is ``| command (1 byte) | size (8 bytes, little-endian) | payload (size bytes) |``. A
``GRAPH_COMPUTE`` payload is ``| device (4) | n_nodes (4) | node ids (8 each) | n_tensors (4) |
tensors (296 bytes each) |``; the first node's second dimension is the number of tokens the graph
runs through the server's layers (the hidden state is ``n_embd × n_tokens``). ``GRAPH_RECOMPUTE``
runs the device's last graph again: the same tokens. The meter never blocks the bytes it reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

GRAPH_COMPUTE = 10
GRAPH_RECOMPUTE = 16
HELLO = 14
COMMAND_COUNT = 19  # RPC_CMD_COUNT: a command byte at or above it is malformed
HEADER = 9
TENSOR_SIZE = 296  # packed struct rpc_tensor
TENSOR_NE_OFFSET = 8 + 4 + 8  # id, type, buffer, then ne[4] (uint32 each)
MAX_GRAPH_BYTES = 64 << 20  # a graph larger than this is passed on unparsed (counted, no tokens)


def graph_tokens(payload: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(device, tokens) of a GRAPH_COMPUTE payload, or None if it is malformed."""
    view = memoryview(payload)
    if len(view) < 12:
        return None
    device, n_nodes = struct.unpack_from("<II", view, 0)
    offset = 8 + 8 * n_nodes
    if n_nodes == 0 or len(view) < offset + 4:
        return None
    (first,) = struct.unpack_from("<Q", view, 8)
    (n_tensors,) = struct.unpack_from("<I", view, offset)
    offset += 4
    if len(view) < offset + n_tensors * TENSOR_SIZE:
        return None
    for index in range(n_tensors):
        at = offset + index * TENSOR_SIZE
        (tensor_id,) = struct.unpack_from("<Q", view, at)
        if tensor_id == first:
            (rows,) = struct.unpack_from("<I", view, at + TENSOR_NE_OFFSET + 4)
            return device, int(rows)
    return None


REQUEST_HEADER = HEADER  # | command (1) | size (8) |
REPLY_HEADER = 8  # | size (8) |: every reply of an RPC server (send_msg)


@dataclass
class MessageEdges:
    """Where the messages of one direction of a connection end, so a tunnel forwards each whole in one
    write: the client sends a request's command, size and payload as three writes, a server a reply's
    size and payload as two. ``header`` is ``REQUEST_HEADER`` or ``REPLY_HEADER``; its last 8 bytes are
    the payload's size."""

    header: int
    _head: bytearray = field(default_factory=bytearray)
    _left: int = 0  # payload bytes of the current message still to come

    @property
    def partial(self) -> bool:
        """Is a message begun and not yet whole?"""
        return bool(self._head) or self._left > 0

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk)
        while len(view):
            if self._left:
                take = min(self._left, len(view))
                self._left -= take
                view = view[take:]
                continue
            need = self.header - len(self._head)
            self._head += view[:need]
            view = view[need:]
            if len(self._head) == self.header:
                self.header_read(self._head)
                (self._left,) = struct.unpack_from("<Q", self._head, self.header - 8)
                self._head.clear()

    def header_read(self, head: bytearray) -> None:
        """A message's header is whole (``head``); a subclass may note what it says."""


@dataclass
class RpcMeter:
    """Counts one connection's client-to-server stream: fed every chunk in order."""

    bytes_up: int = 0  # client to server
    bytes_down: int = 0  # server to client
    graphs: int = 0  # GRAPH_COMPUTE + GRAPH_RECOMPUTE commands
    tokens: int = 0  # tokens those graphs ran through the server's layers
    commands: int = 0
    malformed: bool = False
    _header: bytearray = field(default_factory=bytearray)
    _command: int = -1
    _left: int = 0  # payload bytes of the current command still to come
    _payload: bytearray | None = None
    _last_tokens: dict[int, int] = field(default_factory=dict)

    def down(self, size: int) -> None:
        self.bytes_down += size

    def up(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk)
        self.bytes_up += len(view)
        while len(view) and not self.malformed:
            if self._command < 0:
                need = HEADER - len(self._header)
                self._header += view[:need]
                view = view[need:]
                if len(self._header) < HEADER:
                    return
                command, size = struct.unpack("<BQ", self._header)
                self._header.clear()
                if command >= COMMAND_COUNT:
                    self.malformed = True
                    return
                self._command, self._left = command, size
                self.commands += 1
                if command in (GRAPH_COMPUTE, GRAPH_RECOMPUTE) and size <= MAX_GRAPH_BYTES:
                    self._payload = bytearray()
            take = min(self._left, len(view))
            if self._payload is not None:
                self._payload += view[:take]
            view = view[take:]
            self._left -= take
            if self._left == 0:
                self._finish()

    def _finish(self) -> None:
        command, payload = self._command, self._payload
        self._command, self._payload = -1, None
        if command == GRAPH_COMPUTE:
            self.graphs += 1
            parsed = graph_tokens(payload) if payload is not None else None
            if parsed is not None:
                device, tokens = parsed
                self._last_tokens[device] = tokens
                self.tokens += tokens
        elif command == GRAPH_RECOMPUTE:
            self.graphs += 1
            # the request is | device (4) |: the device's last graph again
            if payload is not None and len(payload) >= 4:
                self.tokens += self._last_tokens.get(struct.unpack_from("<I", payload)[0], 0)
