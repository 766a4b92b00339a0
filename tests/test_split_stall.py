"""A layer seller that accepts the tunnel and never answers (issue 24's hostile seller): the split
model's load gives up after the load timeout with the stable ``E_TIMEOUT layer_seller_stalled`` (the
runner then asks its sellers through their tunnels and the router goes on elsewhere) and the worker
process is ended. Before, trio's TooSlowError escaped the router's split path, which catches only
clawnode errors: no fallback to a whole-model provider, and the seller never blamed."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import runtime.split.worker as worker_module
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.split.worker import SELLER_STALLED, SplitWorker
from tests.support.split import needs_rpc


@needs_rpc
async def test_a_seller_that_never_answers_fails_the_load_with_a_stable_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "LOAD_TIMEOUT_S", 2.0)
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    held: list[trio.SocketStream] = []

    async with trio.open_nursery() as nursery:

        async def silent() -> None:  # accepts, reads nothing, answers nothing
            while True:
                held.append(await listeners[0].accept())

        nursery.start_soon(silent)
        worker = SplitWorker(model, endpoints=[f"127.0.0.1:{port}"], n_ctx=128, n_threads=1)
        try:
            with trio.fail_after(20), pytest.raises(ClawnodeError) as stalled:
                await worker.load()
            assert (stalled.value.code, stalled.value.reason) == (ErrorCode.TIMEOUT, SELLER_STALLED)
            assert held  # the worker did reach the seller
            with trio.fail_after(5):
                while worker._proc is not None and worker._proc.poll() is None:
                    await trio.sleep(0.05)
        finally:
            await worker.aclose()
            nursery.cancel_scope.cancel()
