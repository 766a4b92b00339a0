"""What a lease's client asked of an RPC server, read from the bytes it sent (ggml-rpc protocol v7).

Every request is ``| command (1 byte) | size (8 bytes, little-endian) | payload (size bytes) |``. A
``GRAPH_COMPUTE`` payload is a graph; the tokens it runs through the server's layers are counted as
the server will compute it (``runtime.split.graph``). ``GRAPH_RECOMPUTE`` runs the device's last
graph again: the same tokens. The meter never holds back the bytes it reads, but it refuses a graph
it cannot count (over ``MAX_GRAPH_BYTES``, or one the server would not build as sent): ``up`` raises
:class:`GraphUnmetered` before the chunk that completes it is forwarded, so the server never has the
whole request, and the tunnel carrying it is cut.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NoReturn

from runtime.errors import ClawnodeError, ErrorCode
from runtime.split.graph import TENSOR_SIZE as TENSOR_SIZE  # the packed rpc_tensor, for callers
from runtime.split.graph import GraphRefused, graph_count

GRAPH_COMPUTE = 10
GRAPH_RECOMPUTE = 16
HELLO = 14
COMMAND_COUNT = 19  # RPC_CMD_COUNT: a command byte at or above it is malformed
HEADER = 9
MAX_GRAPH_BYTES = 64 << 20  # a graph larger than this is refused (GRAPH_TOO_LARGE), never passed on
GRAPH_TOO_LARGE = "graph_too_large"
RECOMPUTE_MALFORMED = "graph_recompute_malformed"
RECOMPUTE_SIZE = 4  # | device (4) |


class GraphUnmetered(ClawnodeError):
    """A graph the meter cannot count: the tunnel carrying it is cut before the server has it whole."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCode.INVALID_ARGUMENT, "a graph the layer meter cannot count is refused", reason)


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
    refused: str | None = None  # why a graph was refused (the connection is cut there), if one was
    _header: bytearray = field(default_factory=bytearray)
    _command: int = -1
    _left: int = 0  # payload bytes of the current command still to come
    _payload: bytearray | None = None
    _last_tokens: dict[int, int] = field(default_factory=dict)

    def down(self, size: int) -> None:
        self.bytes_down += size

    def up(self, chunk: bytes | bytearray | memoryview) -> None:
        """Counts ``chunk``; raises :class:`GraphUnmetered` (the chunk must not be forwarded) when it
        begins a graph over ``MAX_GRAPH_BYTES`` or completes one that cannot be counted."""
        if self.refused is not None:
            raise GraphUnmetered(self.refused)
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
                if command == GRAPH_COMPUTE:
                    if size > MAX_GRAPH_BYTES:
                        self._refuse(GRAPH_TOO_LARGE)
                    self._payload = bytearray()
                elif command == GRAPH_RECOMPUTE:
                    if size != RECOMPUTE_SIZE:
                        self._refuse(RECOMPUTE_MALFORMED)
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
            counted = graph_count(payload if payload is not None else b"")
            if isinstance(counted, GraphRefused):
                self._refuse(counted.reason)
            if counted.tokens:
                self._last_tokens[counted.device] = counted.tokens
            else:  # an empty graph: a RECOMPUTE of it counts 0 either way, and no device id is kept for it
                self._last_tokens.pop(counted.device, None)
            self.tokens += counted.tokens
        elif command == GRAPH_RECOMPUTE:
            self.graphs += 1
            # the request is | device (4) |: the device's last graph again (none yet: the server fails it)
            if payload is not None and len(payload) == RECOMPUTE_SIZE:
                self.tokens += self._last_tokens.get(struct.unpack_from("<I", payload)[0], 0)

    def _refuse(self, reason: str) -> NoReturn:
        self.refused = reason
        raise GraphUnmetered(reason)
