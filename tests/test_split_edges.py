"""A layer tunnel forwards each ggml-rpc message whole, however the engine wrote it."""

from __future__ import annotations

import struct

import pytest
import trio

from protocols.lease import layers
from runtime.split.meter import REPLY_HEADER, REQUEST_HEADER, MessageEdges


def request(command: int, payload: bytes) -> list[bytes]:
    """A request as the engine writes it: command, size, payload, each a write of its own."""
    return [bytes([command]), struct.pack("<Q", len(payload)), payload]


def test_edges_follow_requests_and_replies_split_anywhere() -> None:
    wire = b"".join(request(6, b"x" * 300) + request(10, b"") + request(8, b"abc"))
    for cut in range(1, len(wire)):
        edges = MessageEdges(REQUEST_HEADER)
        edges.feed(wire[:cut])
        edges.feed(wire[cut:])
        assert not edges.partial
    edges = MessageEdges(REPLY_HEADER)
    edges.feed(struct.pack("<Q", 2560))
    assert edges.partial
    edges.feed(b"y" * 2559)
    assert edges.partial
    edges.feed(b"y")
    assert not edges.partial


async def test_a_request_written_in_three_parts_crosses_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bound far above the 1 ms between the engine's writes, so a loaded machine cannot split them
    # (at 10 ms a scheduling delay did, once, at load average 11).
    monkeypatch.setattr(layers, "COALESCE_S", 0.5)
    engine, tunnel_end = trio.socket.socketpair()
    near, far = trio.SocketStream(engine), trio.SocketStream(tunnel_end)
    written: list[bytes] = []
    counted: list[bytes] = []

    async def write(chunk: bytes) -> None:
        written.append(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            layers._pump, lambda n: layers._socket_read(far, n), write, counted.append, MessageEdges(REQUEST_HEADER)
        )
        first = request(10, b"g" * 1000)
        for part in first:
            await near.send_all(part)
            await trio.sleep(0.001)  # the engine's writes arrive apart
        await trio.sleep(0.05)
        monkeypatch.setattr(layers, "COALESCE_S", 0.01)
        half = request(8, b"h" * 10)
        await near.send_all(half[0])  # a message begun and never finished goes on after the bound
        await trio.sleep(layers.COALESCE_S * 5)
        await near.aclose()
    assert written[0] == b"".join(first)
    assert written[1] == half[0]
    assert b"".join(counted) == b"".join(written)  # metering sees every byte once
