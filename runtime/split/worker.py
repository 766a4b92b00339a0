"""A split model in a process of its own, so that a lost layer seller costs that process, never the node.

llama.cpp's RPC client calls ``abort()`` when a server closes or answers malformed bytes: the process
that loaded the split model ends at once. :class:`SplitWorker` loads it in ``python -m
runtime.split.worker`` and talks to it with one JSON line per request and per reply over its pipes.
When the worker ends, the call in flight and every later one fail with ``E_UNAVAILABLE
layer_seller_lost``; the caller retries elsewhere or falls back to a whole-model provider. The worker
parses what sellers send: it runs sandboxed (``runtime/split/sandbox.py``), seeing its model file and
nothing else of the host.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from runtime.errors import ClawnodeError, ErrorCode
from runtime.split.sandbox import bwrap_available, code_root, limits_argv, sandbox_argv
from runtime.split.server import DEFAULT_MEMORY_BYTES

SELLER_LOST = "layer_seller_lost"  # stable reason: the worker ended (a layer server was lost, or it crashed)
SELLER_STALLED = "layer_seller_stalled"  # stable reason: no answer through the layers for the stall timeout
MAX_LINE = 4 << 20  # a reply line at most (a completion's text and usage)
LOAD_TIMEOUT_S = 300.0
LISTEN_BACKLOG = 8  # the engine connects before the node accepts: its connections wait here
HANDOVER_TIMEOUT_S = 20.0
PASSED_ENV = ("GGML_", "OMP_", "LLAMA_")  # llama.cpp's own settings reach the worker; nothing else does


def private_endpoints(count: int, handover_fd: int) -> list[str]:
    """In the worker, in a network namespace of its own: ``count`` listening sockets on its loopback,
    handed to the node over the socket ``handover_fd`` (SCM_RIGHTS, with their endpoints as JSON);
    the node's tunnels accept on them (``SplitWorker.start``). Nothing else can reach them, and the
    worker reaches nothing else. Returns their endpoints, for llama.cpp's RPC client."""
    handover = socket.socket(fileno=handover_fd)
    listeners: list[socket.socket] = []
    try:
        for _ in range(count):
            listener = socket.socket()
            listeners.append(listener)
            listener.bind(("127.0.0.1", 0))
            listener.listen(LISTEN_BACKLOG)
        endpoints = [f"127.0.0.1:{listener.getsockname()[1]}" for listener in listeners]
        socket.send_fds(handover, [json.dumps(endpoints).encode()], [listener.fileno() for listener in listeners])
    finally:
        for listener in listeners:
            listener.close()
        handover.close()
    return endpoints


def _child() -> None:
    """The worker: load the model the first line names, then answer one request per line.

    A request ``{"body": …}`` is a chat-completions body run by the chat service: each chunk it emits
    goes out as a line ``{"chunk": …}``, then ``{"usage": {"units", "detail"}}`` (or ``{"error": …}``)."""
    from runtime.inference.service import ChatService
    from runtime.split.model import SplitLlamaModel

    # The replies go out on a private copy of stdout; what llama.cpp (C code) writes to fd 1 goes to
    # stderr instead, so it never lands inside a reply line.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    config = json.loads(sys.stdin.readline())
    model = SplitLlamaModel(
        config["path"],
        endpoints=config["endpoints"] or private_endpoints(int(config["listen"]), int(config["handover_fd"])),
        shares=config.get("shares"),
        name=config.get("name", "split"),
        n_ctx=config.get("n_ctx", 2048),
        n_threads=config.get("n_threads"),
    )
    service = ChatService(model)

    def send(value: dict[str, Any]) -> None:
        replies.write(json.dumps(value) + "\n")
        replies.flush()

    async def emit(chunk: dict[str, Any]) -> None:
        send({"chunk": chunk})

    async def serve() -> None:
        await model.load()
        send({"ready": True})
        while line := await trio.to_thread.run_sync(sys.stdin.readline):
            request = json.loads(line)
            try:
                usage = await service.run(request["body"], emit)
                answer: dict[str, Any] = {"usage": {"units": usage.units, "detail": usage.detail}}
            except ClawnodeError as error:
                answer = {"error": {"code": str(error.code), "reason": error.reason, "message": error.message}}
            send(answer)
        await model.aclose()

    trio.run(serve)


class _Child:
    """A worker process started with ``subprocess.Popen`` and its pipes as trio streams."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        assert popen.stdin is not None and popen.stdout is not None
        self._popen = popen
        self.stdin = trio.lowlevel.FdStream(os.dup(popen.stdin.fileno()))
        self.stdout = trio.lowlevel.FdStream(os.dup(popen.stdout.fileno()))
        popen.stdin.close()
        popen.stdout.close()

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def poll(self) -> int | None:
        return self._popen.poll()

    def kill(self) -> None:
        if self._popen.poll() is None:
            self._popen.kill()

    async def wait(self) -> int:
        while (code := self._popen.poll()) is None:
            await trio.sleep(0.02)
        for stream in (self.stdin, self.stdout):
            await stream.aclose()
        return code


class SplitWorker:
    """The node's handle on a split model running in a worker process."""

    def __init__(
        self,
        path: Path | str,
        *,
        endpoints: list[str] | None = None,
        listen: int = 0,
        shares: list[float] | None = None,
        name: str = "split",
        n_ctx: int = 2048,
        n_threads: int | None = None,
        command: list[str] | None = None,
        sandbox: bool = True,
        memory_bytes: int | None = None,
    ) -> None:
        """``sandbox``: run the worker under bubblewrap where it is installed (``runtime/split/sandbox.py``:
        the model file read-only, the network shared for the tunnels' loopback ports, nothing else of
        the host's); the rlimits hold either way: ``memory_bytes`` of address space (default: the
        model file's size, which the worker maps, plus the layer servers' bound), 64 open files."""
        self.sandbox = sandbox and bwrap_available()
        self.memory_bytes = memory_bytes
        if bool(endpoints) == bool(listen) or (listen and not self.sandbox):
            raise ClawnodeError(
                ErrorCode.INVALID_ARGUMENT, "a split worker takes its endpoints, or listens when it is sandboxed"
            )
        self.listen = listen
        self._config = {
            "path": str(path),
            "endpoints": list(endpoints or []),
            "listen": listen,
            "shares": shares,
            "name": name,
            "n_ctx": n_ctx,
            "n_threads": n_threads,
        }
        self._proc: _Child | None = None
        self._buffer = bytearray()
        self._lock = trio.Lock()
        # The worker's command line: this module, unless a test stands in for llama.cpp.
        self._command = command or [sys.executable, "-m", "runtime.split.worker"]

    @property
    def pid(self) -> int | None:
        """The process that runs the model (the one that opens the tunnels' connections): under
        bubblewrap the innermost of its processes, else the worker itself."""
        if self._proc is None:
            return None
        pid = self._proc.pid
        for _ in range(4):  # bubblewrap, its pid-1 child, then the interpreter
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() != "bwrap":
                    break
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                break
            if not children:
                break
            pid = int(children[0])
        return pid

    def _lost(self) -> ClawnodeError:
        return ClawnodeError(
            ErrorCode.UNAVAILABLE, "the split model's worker ended: a layer seller was lost", SELLER_LOST
        )

    async def _line(self) -> dict[str, Any]:
        """The worker's next reply line; a line that is no JSON object (a dying process's last bytes)
        ends it: lost."""
        assert self._proc is not None
        # A line per streamed chunk: the buffer is searched from where the last search ended and cut
        # in place, not copied whole for every line.
        searched = 0
        while (end := self._buffer.find(b"\n", searched)) < 0:
            chunk = await self._proc.stdout.receive_some(1 << 16)
            if not chunk or len(self._buffer) > MAX_LINE:
                raise self._lost()
            searched = len(self._buffer)
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            self._proc.kill()
            raise self._lost()
        return value

    async def start(self) -> list[trio.SocketListener]:
        """Start the worker process; with ``listen``, the listeners it hands over, one per layer
        server, in its own network namespace (a tunnel accepts on each: ``open_tunnel(listener=…)``).
        ``load`` then waits for the model."""
        handover: socket.socket | None = None
        child_end: socket.socket | None = None
        if self.listen:
            handover, child_end = socket.socketpair()
        try:
            await self._spawn(child_end)
        finally:
            if child_end is not None:
                child_end.close()
        if handover is None:
            return []
        try:
            return await self._receive_listeners(handover)
        finally:
            handover.close()

    async def _receive_listeners(self, handover: socket.socket) -> list[trio.SocketListener]:
        handover.setblocking(False)
        fds: list[int] = []
        try:
            with trio.fail_after(HANDOVER_TIMEOUT_S):
                await trio.lowlevel.wait_readable(handover.fileno())
            _, fds, _, _ = socket.recv_fds(handover, 1 << 12, self.listen)
        except (OSError, trio.TooSlowError):
            pass
        listeners: list[trio.SocketListener] = []
        for fd in fds:
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            # The worker is not trusted to hand over anything but listening TCP sockets.
            if (
                sock.type != socket.SOCK_STREAM
                or sock.family != socket.AF_INET
                or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            ):
                sock.close()
                continue
            sock.setblocking(False)
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        if len(listeners) != self.listen:
            for listener in listeners:
                await listener.aclose()
            if self._proc is not None:
                self._proc.kill()
            raise self._lost()
        return listeners

    async def _spawn(self, handover: socket.socket | None) -> None:
        # Not the node's environment (it may hold the wallet key or tokens, CLAWNODE_*): the worker
        # parses bytes from sellers.
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": code_root(), "GGML_RPC_NO_RDMA": "1", "HOME": "/tmp"}
        env |= {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)}
        command = list(self._command)
        path = Path(str(self._config["path"])).absolute()
        if self.sandbox:
            # Listening in a network namespace of its own, it reaches nothing but its tunnels; given
            # endpoints (the node's loopback ports), it shares the node's network.
            read_only = [(str(path.resolve()), str(path))]
            command = sandbox_argv(command, env=env, read_only=read_only, share_net=not self.listen)
        memory = self.memory_bytes
        if memory is None:
            memory = DEFAULT_MEMORY_BYTES + (path.stat().st_size if path.is_file() else 0)
        # Started from the event loop's thread, not trio's open_process (which forks in a pool thread):
        # bubblewrap's --die-with-parent ends the sandbox when the thread that started it ends, and an
        # idle pool thread ends after some seconds, taking the worker with it mid-conversation.
        popen = subprocess.Popen(
            limits_argv(command, memory),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            pass_fds=[handover.fileno()] if handover is not None else [],
        )
        self._proc = _Child(popen)
        config = {**self._config, "path": str(path)}
        if handover is not None:
            config["handover_fd"] = handover.fileno()
        await self._proc.stdin.send_all(json.dumps(config).encode() + b"\n")

    async def load(self) -> None:
        """Start the worker (unless ``start`` did) and wait until its model is loaded."""
        if self._proc is None:
            await self.start()
        assert self._proc is not None
        with trio.move_on_after(LOAD_TIMEOUT_S) as waited:
            ready = await self._line()
        if waited.cancelled_caught:
            # A seller that accepts the tunnel and then never answers (or reads the weights' upload
            # without end) holds llama.cpp's RPC client: a stable error, so that the runner asks its
            # sellers through their tunnels and the router goes on elsewhere.
            self._proc.kill()
            raise ClawnodeError(
                ErrorCode.TIMEOUT, f"the split model's layers did not load in {LOAD_TIMEOUT_S:g} s", SELLER_STALLED
            )
        if not ready.get("ready"):
            raise self._lost()

    async def run(
        self, body: dict[str, Any], emit: Callable[[dict[str, Any]], Awaitable[None]], *, stall_s: float | None = None
    ) -> dict[str, Any]:
        """Run a chat-completions ``body``: each chunk the chat service emits goes to ``emit`` as it comes
        (the chunk contract of ``runtime/inference/service.py``); returns ``{"units", "detail"}``.
        ``E_UNAVAILABLE layer_seller_lost`` when the worker is gone, ``E_TIMEOUT layer_seller_stalled``
        (and the worker is ended) when no line comes for ``stall_s``: a seller that stops answering
        holds llama.cpp's RPC client forever, so it is never waited on longer."""
        async with self._lock:
            if self._proc is None or self._proc.returncode is not None:
                raise self._lost()
            try:
                await self._proc.stdin.send_all(json.dumps({"body": body}).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise self._lost() from None
            while True:
                with trio.move_on_after(stall_s if stall_s is not None else math.inf) as waited:
                    line = await self._line()
                if waited.cancelled_caught:
                    self._proc.kill()
                    raise ClawnodeError(
                        ErrorCode.TIMEOUT, f"the split model's layers stalled for {stall_s:g} s", SELLER_STALLED
                    )
                if "chunk" in line:
                    await emit(line["chunk"])
                    continue
                if "error" in line:
                    error = line["error"]
                    raise ClawnodeError(ErrorCode(error["code"]), str(error["message"]), error.get("reason"))
                usage = line.get("usage")
                if not isinstance(usage, dict):
                    raise self._lost()
                return usage

    async def chat(
        self, messages: list[dict[str, Any]], *, max_tokens: int = 256, temperature: float = 0.0
    ) -> dict[str, Any]:
        """``{"text", "prompt_tokens", "completion_tokens", "finish_reason"}`` of one chat; ``E_UNAVAILABLE
        layer_seller_lost`` when the worker is gone."""
        texts: list[str] = []
        finish: list[str] = []

        async def collect(chunk: dict[str, Any]) -> None:
            if isinstance(chunk.get("text"), str):
                texts.append(chunk["text"])
            if chunk.get("finish_reason"):
                finish.append(str(chunk["finish_reason"]))

        body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        usage = await self.run(body, collect)
        detail = usage.get("detail") or {}
        return {
            "text": "".join(texts),
            "prompt_tokens": int(detail.get("prompt_tokens", 0)),
            "completion_tokens": int(detail.get("completion_tokens", usage.get("units", 0))),
            "finish_reason": finish[-1] if finish else None,
        }

    async def aclose(self) -> None:
        if self._proc is None:
            return
        with trio.CancelScope(shield=True):
            if self._proc.returncode is None:
                self._proc.kill()
            await self._proc.wait()


if __name__ == "__main__":
    _child()
