"""A layer lease's bill cannot be cut by how the consumer encodes its graphs.

The graphs here are built as llama.cpp's RPC client serialises them (``rpc_tensor``, 296 bytes), with
the shapes of a gemma3-270m layer (n_embd 640, q 1024, ffn 2048); the ops are ggml's own numbers.
"""

from __future__ import annotations

import struct

import pytest
import trio

from protocols.lease import layers
from runtime.errors import ErrorCode
from runtime.split.graph import OP_MUL_MAT, OP_NONE, UNKNOWN_TENSOR, GraphCount, GraphRefused, graph_count
from runtime.split.meter import (
    GRAPH_COMPUTE,
    GRAPH_RECOMPUTE,
    GRAPH_TOO_LARGE,
    MAX_GRAPH_BYTES,
    TENSOR_SIZE,
    GraphUnmetered,
    RpcMeter,
)

OP_RMS_NORM = 25
TOKENS = 512


def _tensor(tensor_id: int, ne: tuple[int, int, int, int], op: int = OP_NONE, src: tuple[int, ...] = ()) -> bytes:
    tensor = bytearray(TENSOR_SIZE)
    struct.pack_into("<QI", tensor, 0, tensor_id, 0)  # id, type F32
    struct.pack_into("<4I", tensor, 20, *ne)
    struct.pack_into("<I", tensor, 52, op)
    for i, source in enumerate(src):
        struct.pack_into("<Q", tensor, 124 + 8 * i, source)
    return bytes(tensor)


def _graph(nodes: list[int], tensors: list[bytes], device: int = 0) -> bytes:
    return (
        struct.pack("<II", device, len(nodes))
        + struct.pack(f"<{len(nodes)}Q", *nodes)
        + struct.pack("<I", len(tensors))
        + b"".join(tensors)
    )


# ids: 1 hidden state in, 2 its norm, 3 attn_q.weight (held by the server), 4 Qcur, 5 ffn_up.weight, 6 ffn_up
WEIGHTS = [_tensor(3, (640, 1024, 1, 1)), _tensor(5, (640, 2048, 1, 1))]


def _layer(tokens: int) -> tuple[list[int], list[bytes]]:
    """An honest graph: norm, then two products with held weights, ``tokens`` columns each."""
    tensors = [
        _tensor(2, (640, tokens, 1, 1), OP_RMS_NORM, (1,)),
        _tensor(1, (640, tokens, 1, 1)),
        _tensor(4, (1024, tokens, 1, 1), OP_MUL_MAT, (3, 2)),
        _tensor(6, (2048, tokens, 1, 1), OP_MUL_MAT, (5, 2)),
        *WEIGHTS,
    ]
    return [2, 4, 6], tensors


def _request(command: int, payload: bytes) -> bytes:
    return struct.pack("<BQ", command, len(payload)) + payload


def _billed(payload: bytes) -> int:
    meter = RpcMeter()
    meter.up(_request(GRAPH_COMPUTE, payload))
    meter.up(_request(GRAPH_RECOMPUTE, struct.pack("<I", 0)))  # the same graph again
    return meter.tokens


@pytest.mark.parametrize("tokens", [1, 17, TOKENS])
def test_an_honest_graph_bills_its_tokens_once_and_again_when_recomputed(tokens: int) -> None:
    assert graph_count(_graph(*_layer(tokens))) == GraphCount(device=0, tokens=tokens)
    assert graph_count(_graph([], [], device=1)) == GraphCount(device=1, tokens=0)  # computes nothing
    assert _billed(_graph(*_layer(tokens))) == 2 * tokens


def test_a_decoy_entry_for_the_first_node_bills_the_tokens_the_layer_multiplies() -> None:
    nodes, tensors = _layer(TOKENS)
    decoy = _tensor(2, (640, 1, 1, 1), OP_RMS_NORM, (1,))  # first entry of id 2: the one the server takes
    assert _billed(_graph(nodes, [decoy, *tensors])) == 2 * TOKENS


def test_a_one_row_node_placed_first_bills_the_tokens_the_layer_multiplies() -> None:
    nodes, tensors = _layer(TOKENS)
    dummy = _tensor(9, (1, 1, 1, 1), OP_RMS_NORM, (1,))
    assert _billed(_graph([9, *nodes], [dummy, *tensors])) == 2 * TOKENS


def test_tokens_stacked_past_the_second_dimension_of_a_held_weight_s_product_are_billed() -> None:
    stacked = [
        _tensor(2, (640, 1, TOKENS, 1), OP_RMS_NORM, (1,)),
        _tensor(1, (640, 1, TOKENS, 1)),
        _tensor(4, (1024, 1, TOKENS, 1), OP_MUL_MAT, (3, 2)),
        *WEIGHTS,
    ]
    assert _billed(_graph([2, 4], stacked)) == 2 * TOKENS


def test_a_graph_the_server_would_not_build_is_refused_not_billed_at_nothing() -> None:
    nodes, tensors = _layer(TOKENS)
    assert graph_count(_graph([*nodes, 77], tensors)) == GraphRefused(UNKNOWN_TENSOR)  # no entry for 77
    without_weight = [t for t in tensors if t != WEIGHTS[0]]
    assert graph_count(_graph(nodes, without_weight)) == GraphRefused(UNKNOWN_TENSOR)
    meter = RpcMeter()
    with pytest.raises(GraphUnmetered) as refused:
        meter.up(_request(GRAPH_COMPUTE, _graph([*nodes, 77], tensors)))
    assert (refused.value.code, refused.value.reason) == (ErrorCode.INVALID_ARGUMENT, UNKNOWN_TENSOR)
    assert meter.refused == UNKNOWN_TENSOR and meter.tokens == 0
    with pytest.raises(GraphUnmetered):  # nothing more passes on this connection
        meter.up(_request(GRAPH_RECOMPUTE, struct.pack("<I", 0)))


def test_a_graph_padded_past_the_meter_s_bound_is_refused_at_its_header() -> None:
    nodes, tensors = _layer(TOKENS)
    graph = _graph(nodes, tensors)
    padded = graph + bytes(MAX_GRAPH_BYTES + 1 - len(graph))  # the server ignores bytes past the tensors
    meter = RpcMeter()
    with pytest.raises(GraphUnmetered) as refused:
        meter.up(_request(GRAPH_COMPUTE, padded)[:4096])
    assert refused.value.reason == GRAPH_TOO_LARGE == meter.refused


async def test_a_refused_graph_never_reaches_the_server_whole() -> None:
    """The seller's pump counts each chunk before it forwards it: the chunk that would complete a
    graph the meter refuses is never written, so the server never computes it, and the pump ends."""
    nodes, tensors = _layer(TOKENS)
    honest = _request(GRAPH_COMPUTE, _graph(nodes, tensors))
    bad = _request(GRAPH_COMPUTE, _graph([*nodes, 77], tensors))
    chunks = [honest, bad[:1000], bad[1000:]]
    written: list[bytes] = []
    meter = RpcMeter()

    async def read(_: int) -> bytes:
        return chunks.pop(0) if chunks else b""

    async def write(chunk: bytes) -> None:
        written.append(chunk)

    with trio.fail_after(5), pytest.raises(GraphUnmetered):
        await layers._pump(read, write, meter.up)
    assert written == [honest, bad[:1000]]  # the server holds part of the bad graph: it waits, computes nothing
    assert (meter.tokens, meter.refused) == (TOKENS, UNKNOWN_TENSOR)
