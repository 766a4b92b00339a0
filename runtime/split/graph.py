"""How many tokens a ``GRAPH_COMPUTE`` runs through a seller's layers, read as the RPC server reads it.

Pure: bytes in, a :class:`GraphCount` or a :class:`GraphRefused` out. The server (ggml-rpc,
``rpc_server::graph_compute``) builds its graph from the payload
``| device (4) | n_nodes (4) | node ids (8 each) | n_tensors (4) | tensors (296 bytes each) |``:
it maps each tensor id to the FIRST entry with that id (``unordered_map::emplace`` keeps the first),
creates each listed node from its entry and its sources from theirs, and computes the listed nodes.

The tokens of a graph are the most vectors any one matrix product of the graph multiplies. Each
product counts the larger of its operand's shape and its own (ggml asserts they agree), so a decoy
entry for the operand cannot narrow it:

- a ``MUL_MAT`` whose weight operand (``src[0]``) is a tensor the server holds as it is (op ``NONE``,
  no view): every column of the other operand, ``ne[1] × ne[2] × ne[3]``, is a token through that
  weight (llama.cpp's projections and feed-forward: ``n_embd × n_tokens``);
- any other ``MUL_MAT`` (attention: the KV cache through a permuted view): the other operand's
  ``ne[1]``, which is ``n_tokens`` in llama.cpp's graphs (its ``ne[2]`` is the heads);
- a ``MUL_MAT_ID`` (mixture of experts): the other operand's ``ne[2] × ne[3]`` (its tokens), for a
  held weight, else ``ne[2]``;
- and never fewer than the first node's ``ne[1]`` (the hidden state, ``n_embd × n_tokens``).

For llama.cpp's graphs every one of these is the batch's token count, so the count is exact; a
graph encoded to look smaller (a decoy entry for a node placed after the one the server takes, a
one-row node first, tokens stacked in ``ne[2]``) still shows its products' true widths. A payload the
server would not build (truncated, a node id with no entry, a source id with none) is refused rather
than counted. Left open: a crafted graph that multiplies a weight only through a view or another op
of it, its tokens stacked past ``ne[1]``, is counted by ``ne[1]``, as llama.cpp's own products with
the KV cache (same shape, ``ne[2]`` the heads) must be.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

TENSOR_SIZE = 296  # packed struct rpc_tensor
# id, type, buffer, ne[4], nb[4], op, op_params[16], flags, src[10], view_src, view_offs, data, name[64], pad
_TENSOR = struct.Struct("<Q4x8x4I16xI64x4x2Q64xQ8x8x64x4x")
assert _TENSOR.size == TENSOR_SIZE
OP_NONE = 0
OP_MUL_MAT = 29  # enum ggml_op of the ggml that llama-cpp-python 0.3.36 vendors (ggml_op_name)
OP_MUL_MAT_ID = 30

# Reasons a graph is refused (stable: they reach the tunnel's error and the meter's record).
TRUNCATED = "graph_truncated"
UNKNOWN_TENSOR = "graph_unknown_tensor"


@dataclass(frozen=True)
class GraphCount:
    device: int
    tokens: int


@dataclass(frozen=True)
class GraphRefused:
    reason: str


def graph_count(payload: bytes | bytearray | memoryview) -> GraphCount | GraphRefused:
    """The tokens a ``GRAPH_COMPUTE`` payload runs through the server's layers, or why it is refused."""
    view = memoryview(payload)
    if len(view) < 12:
        return GraphRefused(TRUNCATED)
    device, n_nodes = struct.unpack_from("<II", view, 0)
    offset = 8 + 8 * n_nodes
    if len(view) < offset + 4:
        return GraphRefused(TRUNCATED)
    if n_nodes == 0:  # nothing to compute: no tokens, and nothing to refuse
        return GraphCount(device, 0)
    nodes = struct.unpack_from(f"<{n_nodes}Q", view, 8)
    (n_tensors,) = struct.unpack_from("<I", view, offset)
    offset += 4
    end = offset + n_tensors * TENSOR_SIZE
    if len(view) < end:
        return GraphRefused(TRUNCATED)
    # id -> (ne0, ne1, ne2, ne3, op, src0, src1, view_src); the first entry of an id wins, as on the server
    tensors: dict[int, tuple[int, int, int, int, int, int, int, int]] = {}
    for tensor_id, ne0, ne1, ne2, ne3, op, src0, src1, view_src in _TENSOR.iter_unpack(view[offset:end]):
        if tensor_id not in tensors:
            tensors[tensor_id] = (ne0, ne1, ne2, ne3, op, src0, src1, view_src)
    first = tensors.get(nodes[0])
    if first is None:
        return GraphRefused(UNKNOWN_TENSOR)
    tokens = first[1]
    for node_id in nodes:
        node = tensors.get(node_id)
        if node is None:  # the server fails the graph too (id 0 included: it would compute a null node)
            return GraphRefused(UNKNOWN_TENSOR)
        op = node[4]
        if op != OP_MUL_MAT and op != OP_MUL_MAT_ID:
            continue
        weight, other = tensors.get(node[5]), tensors.get(node[6])
        if weight is None or other is None:
            return GraphRefused(UNKNOWN_TENSOR)
        held = weight[4] == OP_NONE and weight[7] == 0  # the server's own tensor, not a view of one
        # the operand's columns and the product's: ggml asserts they agree, so the larger is what runs
        if op == OP_MUL_MAT:
            vectors = max(other[1] * other[2] * other[3], node[1] * node[2] * node[3]) if held else other[1]
            vectors = max(vectors, node[1])
        else:
            vectors = max(other[2] * other[3], node[2] * node[3]) if held else max(other[2], node[2])
        tokens = max(tokens, vectors)
    return GraphCount(device, tokens)
