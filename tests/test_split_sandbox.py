"""The split model's processes and their sandbox (docs/split.md, "The seller's safety" and "The
consumer's worker"): the seller's tensor cache stays within its bound in bytes, and the consumer's
worker, which parses what sellers send, sees its model file and nothing else of the host."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

from runtime.errors import ClawnodeError
from runtime.split.sandbox import bwrap_available
from runtime.split.server import layer_cache_dir, prune_cache
from runtime.split.worker import SplitWorker


def test_the_tensor_cache_keeps_within_its_bound_dropping_what_was_used_longest_ago(tmp_path: Path) -> None:
    # A seller's cache root: one folder per consumer, the bound over all of them.
    alice, bob = layer_cache_dir(tmp_path, "peerA"), layer_cache_dir(tmp_path, "peerB")
    assert alice != bob and alice.parent == bob.parent == tmp_path
    for folder in (alice, bob):
        folder.mkdir()
    files = {"newest": alice, "recent": bob, "old": alice, "oldest": bob}
    for age, (name, folder) in enumerate(files.items()):
        (folder / name).write_bytes(bytes(1000))
        os.utime(folder / name, (1_000_000 - age * 100, 1_000_000 - age * 100))

    def left() -> list[str]:
        return sorted(p.name for p in tmp_path.rglob("*") if p.is_file())

    assert prune_cache(tmp_path, 4000) == 4000
    assert left() == ["newest", "old", "oldest", "recent"]
    assert prune_cache(tmp_path, 2500) == 2000
    assert left() == ["newest", "recent"]
    assert prune_cache(alice, 0) == 0  # a running server keeps its own folder within the bound
    assert left() == ["recent"]


_PROBE = """
import json, os, sys
config = json.loads(sys.stdin.readline())

def readable(path):
    try:
        with open(path, "rb") as f:
            return f.read() != b""
    except OSError:
        return False

print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
seen = {
    "model": readable(config["path"]),
    "secret": readable(sys.argv[1]),
    "key": readable(sys.argv[2]),
    "env": sorted(k for k in os.environ if k.startswith("CLAWNODE_")),
}
print(json.dumps({"usage": {"units": 0, "detail": seen}}), flush=True)
"""


@pytest.mark.skipif(not bwrap_available(), reason="bubblewrap is not installed")
async def test_the_consumer_s_worker_reads_its_model_and_nothing_else_of_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama.cpp's RPC client in the worker parses bytes from sellers: the worker sees its model file,
    read-only, and not the node's files (a secret beside the model, the data dir's key) or environment."""
    monkeypatch.setenv("CLAWNODE_ESCROW_WALLET_KEY", "0x" + "ab" * 32)
    model, secret = tmp_path / "model.gguf", tmp_path / "secret.txt"
    model.write_bytes(b"GGUF model bytes")
    secret.write_text("the node's secret")
    key = Path.home() / ".bashrc" if (Path.home() / ".bashrc").is_file() else secret
    command = [sys.executable, "-c", _PROBE, str(secret), str(key)]
    seen: dict[str, object] = {}
    for sandbox in (True, False):
        worker = SplitWorker(model, endpoints=["127.0.0.1:1"], command=command, sandbox=sandbox)
        try:
            with trio.fail_after(30):
                await worker.load()
                # The tunnels admit the process that holds the sockets: under bubblewrap, its innermost.
                assert worker.pid is not None
                assert Path(f"/proc/{worker.pid}/comm").read_text().startswith("python")
                seen[str(sandbox)] = (await worker.run({}, _nothing))["detail"]
        finally:
            await worker.aclose()
    assert seen["True"] == {"model": True, "secret": False, "key": False, "env": []}
    # Unsandboxed (no bubblewrap) it could read them: the probe tells.
    assert seen["False"] == {"model": True, "secret": True, "key": True, "env": []}


async def _nothing(_chunk: dict[str, object]) -> None:
    return None


_NETWORK_PROBE = """
import json, socket, sys
from runtime.split.worker import private_endpoints
config = json.loads(sys.stdin.readline())
[own] = private_endpoints(config["listen"], config["handover_fd"])

def reaches(endpoint, data):
    host, port = endpoint.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2) as conn:
            conn.sendall(data)
        return True
    except OSError:
        return False

print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
seen = {"own": reaches(own, b"through the tunnel"), "node": reaches(sys.argv[1], b"escaped")}
print(json.dumps({"usage": {"units": 0, "detail": seen}}), flush=True)
"""


@pytest.mark.skipif(not bwrap_available(), reason="bubblewrap is not installed")
async def test_a_listening_worker_reaches_its_tunnels_and_nothing_of_the_node_s_network(tmp_path: Path) -> None:
    """In a network namespace of its own, the worker hands the node its listening sockets (one per
    layer server) and connects only to them: a port open on the node's loopback is out of reach."""
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF model bytes")
    node_port = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    node_endpoint = f"127.0.0.1:{node_port.socket.getsockname()[1]}"
    worker = SplitWorker(model, listen=1, command=[sys.executable, "-c", _NETWORK_PROBE, node_endpoint])
    seen: dict[str, object] = {}

    async def ask() -> None:
        seen.update((await worker.run({}, _nothing))["detail"])

    try:
        with trio.fail_after(30):
            [listener] = await worker.start()
            await worker.load()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                conn = await listener.accept()  # what the node's tunnel does with it
                assert await conn.receive_some(64) == b"through the tunnel"
                await conn.aclose()
            await listener.aclose()
    finally:
        await worker.aclose()
        await node_port.aclose()
    assert seen == {"own": True, "node": False}


def test_a_worker_listens_only_in_a_sandbox_and_never_both_ways() -> None:
    with pytest.raises(ClawnodeError):
        SplitWorker("m.gguf", endpoints=["127.0.0.1:1"], listen=1)
    with pytest.raises(ClawnodeError):
        SplitWorker("m.gguf", listen=1, sandbox=False)
    with pytest.raises(ClawnodeError):
        SplitWorker("m.gguf")


_ECHO = """
import json, sys
sys.stdin.readline()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    print(json.dumps({"usage": {"units": 1, "detail": {}}}), flush=True)
"""


@pytest.mark.skipif(not bwrap_available(), reason="bubblewrap is not installed")
async def test_a_sandboxed_worker_outlives_the_thread_pool_s_idle_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bubblewrap's --die-with-parent ends the sandbox when the thread that started it ends. Started
    from one of trio's pool threads (open_process), the worker died with that thread once it had
    been idle for trio's idle timeout (10 s): a split model's third request failed layer_seller_lost."""
    import trio._core._thread_cache as thread_cache

    monkeypatch.setattr(thread_cache, "IDLE_TIMEOUT", 0.1)  # pool threads end as soon as they idle
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF model bytes")
    worker = SplitWorker(model, endpoints=["127.0.0.1:1"], command=[sys.executable, "-c", _ECHO])
    try:
        with trio.fail_after(30):
            await worker.load()
            await trio.to_thread.run_sync(lambda: None)  # a pool thread, idle and gone after it
            await trio.sleep(0.5)
            assert (await worker.run({}, _nothing))["units"] == 1
    finally:
        await worker.aclose()
