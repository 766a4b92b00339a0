"""A layer seller's RPC server runs a stranger's ggml graph: it never inherits the node's environment,
which may hold the wallet key or API tokens (``CLAWNODE_*``). bubblewrap's ``--clearenv`` dropped it
where bubblewrap runs; without bubblewrap the server got the node's whole environment."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio

from runtime.split.meter import HELLO
from runtime.split.server import RpcServerProcess, open_server_connection
from tests.support.split import needs_rpc


@needs_rpc
async def test_the_layer_server_never_sees_the_node_s_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWNODE_ESCROW_WALLET_KEY", "0x" + "ab" * 32)
    server = RpcServerProcess(sandbox=False)  # the unsandboxed path: a machine without bubblewrap
    try:
        await trio.to_thread.run_sync(server.start)
        assert server.pid is not None
        environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
        assert not [entry for entry in environ if entry.startswith(b"CLAWNODE_")]
        assert os.environ["CLAWNODE_ESCROW_WALLET_KEY"].encode() not in b"\0".join(environ)
        # and it still serves: a ggml-rpc HELLO through its socket is answered
        sock = await open_server_connection(server.socket_path)
        async with sock:
            await sock.send_all(struct.pack("<BQ", HELLO, 24) + bytes(24))
            reply = b""
            with trio.fail_after(20):
                while len(reply) < 8:
                    chunk = await sock.receive_some(64)
                    assert chunk
                    reply += chunk
    finally:
        await trio.to_thread.run_sync(server.stop)
