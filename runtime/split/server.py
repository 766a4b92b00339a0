"""The RPC server a seller runs for one lease: a process of its own, reachable through one unix socket.

``python -m runtime.split.server SOCKET THREADS`` serves this machine's CPU device with llama.cpp's
``ggml_backend_rpc_start_server`` (through ctypes: no extra binary) on a loopback TCP port, and
answers each connection made to the unix socket ``SOCKET`` with a TCP connection to that port, handed
over as a file descriptor (``open_server_connection`` takes it). :class:`RpcServerProcess`
starts it under the node's sandbox: rlimits (address space, files, no core dumps) set by ``prlimit``
and, where bubblewrap runs, every namespace unshared (its own network with only a loopback, so the
TCP port is reachable from nowhere but the relay, which connects to it from inside) and only the
interpreter, the virtual environment, the code and the socket's folder mounted, read-only but the
socket's. It executes a stranger's graph: when it crashes or is killed, the lease it serves ends, the
node goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import ClawnodeError, ErrorCode
from runtime.split.sandbox import bwrap_available, code_root, limits_argv, sandbox_argv

if TYPE_CHECKING:
    import trio

SOCKET_NAME = "rpc.sock"
START_TIMEOUT_S = 20.0
HANDOVER = b"F"  # the byte that carries a handed-over connection
DEFAULT_MEMORY_BYTES = 4 << 30  # address space: the layers held, their KV cache, the compute buffers
DEFAULT_CACHE_BYTES = 2 << 30  # a tensor cache folder at most (ggml-rpc's SET_TENSOR_HASH)
CACHE_PRUNE_S = 1.0
SERVER_FAILED = "layer_server_failed"  # stable reason: the lease's RPC server did not start or died


def _connect(port: int, deadline: float) -> socket.socket:
    while True:
        try:
            conn = socket.create_connection(("127.0.0.1", port))
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _relay(listener: socket.socket, port: int) -> None:
    """Each connection to the unix socket gets a TCP connection to the RPC server's port, handed over
    as a file descriptor (SCM_RIGHTS, ``open_server_connection``): the tunnel then reads and writes the
    server's socket itself, no relay thread between (one hop and two wake-ups fewer per message each
    way). The socket stays in the sandbox's network namespace: it reaches nothing but the server."""
    while True:
        client, _ = listener.accept()
        try:
            upstream = _connect(port, time.monotonic() + START_TIMEOUT_S)
        except OSError:
            client.close()
            continue
        try:
            socket.send_fds(client, [HANDOVER], [upstream.fileno()])
        except OSError:
            pass
        finally:
            upstream.close()
            client.close()


def _no_connection() -> ClawnodeError:
    return ClawnodeError(ErrorCode.UNAVAILABLE, "the layer server handed over no connection", SERVER_FAILED)


async def open_server_connection(socket_path: str, timeout_s: float = START_TIMEOUT_S) -> trio.SocketStream:
    """A connection to a lease's RPC server: the TCP socket its relay connected to ggml-rpc's port in
    the sandbox, received over the unix socket ``socket_path``. The sandboxed process is not trusted
    to hand over anything else: only a stream socket of an IP family is taken."""
    import trio

    unix = await trio.open_unix_socket(socket_path)
    try:
        with trio.fail_after(timeout_s):
            await trio.lowlevel.wait_readable(unix.socket.fileno())
        with socket.socket(fileno=os.dup(unix.socket.fileno())) as raw:
            _, fds, _, _ = socket.recv_fds(raw, len(HANDOVER), 1)
    except (OSError, trio.TooSlowError):
        raise ClawnodeError(
            ErrorCode.UNAVAILABLE, "the layer server handed over no connection", SERVER_FAILED
        ) from None
    finally:
        await unix.aclose()
    try:
        conn = socket.socket(fileno=fds[0]) if fds else None
    except OSError:
        os.close(fds[0])
        conn = None
    if conn is None or conn.family not in (socket.AF_INET, socket.AF_INET6) or conn.type != socket.SOCK_STREAM:
        if conn is not None:
            conn.close()
        raise _no_connection()
    conn.setblocking(False)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return trio.SocketStream(trio.socket.from_stdlib_socket(conn))


def layer_cache_dir(root: Path, consumer: str) -> Path:
    """The tensor cache folder of one consumer (a peer id) under the seller's cache ``root``. One
    folder per consumer: ggml-rpc names a cached tensor by a 64-bit FNV-1a hash of its bytes, which a
    client can collide on purpose, so a shared folder would let one consumer plant the tensor another
    consumer's upload is answered with."""
    return root / hashlib.sha256(consumer.encode()).hexdigest()[:32]


def prune_cache(folder: Path, max_bytes: int) -> int:
    """Keep ggml-rpc's tensor cache ``folder`` (its files, and those of its folders one level down:
    a cache root's consumers) within ``max_bytes``: the files used longest ago go first (a cache hit
    reads a file, a miss writes one). Returns the bytes left."""
    files: list[tuple[float, int, Path]] = []
    folders = [folder]
    while folders:
        current = folders.pop()
        with contextlib.suppress(OSError), os.scandir(current) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False) and current == folder:
                        folders.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        stat = entry.stat(follow_symlinks=False)
                        files.append((max(stat.st_atime, stat.st_mtime), stat.st_size, Path(entry.path)))
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= max_bytes:
            break
        with contextlib.suppress(OSError):
            path.unlink()
            total -= size
    return total


def _keep_pruned(folder: Path, max_bytes: int) -> None:
    while True:
        with contextlib.suppress(OSError):
            prune_cache(folder, max_bytes)
        time.sleep(CACHE_PRUNE_S)


def main(argv: list[str]) -> None:
    from runtime.split import rpc

    socket_path, threads = argv[0], int(argv[1])
    # A tensor cache folder and its bound in bytes: large tensors a client uploads are kept there by
    # their hash, and a later upload of the same tensor is a hash, not the bytes.
    cache_dir = argv[2] if len(argv) > 3 else None
    if cache_dir is not None:
        threading.Thread(target=_keep_pruned, args=(Path(cache_dir), int(argv[3])), daemon=True).start()
    if socket_path.startswith("tcp:"):  # plain ggml-rpc on a loopback port (benches' baseline)
        rpc.serve(f"127.0.0.1:{int(socket_path[4:])}", threads, cache_dir)
        sys.exit(3)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path + ".tmp")
    listener.listen(1)
    os.rename(socket_path + ".tmp", socket_path)  # appears only once it accepts
    threading.Thread(target=_relay, args=(listener, port), daemon=True).start()
    rpc.serve(f"127.0.0.1:{port}", threads, cache_dir)  # returns only if the server could not start
    sys.exit(3)


class RpcServerProcess:
    """One lease's RPC server process; ``socket_path`` is where the tunnel connects."""

    def __init__(
        self,
        *,
        threads: int = 1,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        sandbox: bool = True,
        cache_root: Path | None = None,
        consumer: str = "",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        """``cache_root``: the seller's tensor cache, a folder of its own (made mode 0700). The server
        keeps the large tensors (over 10 MiB) the lease's ``consumer`` uploads in that consumer's
        folder there (``layer_cache_dir``), by hash, so that the consumer's next placement sends their
        hashes instead of their bytes (ggml-rpc's SET_TENSOR_HASH). The root is pruned to
        ``cache_bytes`` when a server starts, and a running server keeps its own folder within it.
        None: no cache."""
        self.threads = max(1, threads)
        self.memory_bytes = memory_bytes
        self.cache_root = cache_root
        self.cache_dir = layer_cache_dir(cache_root, consumer) if cache_root is not None else None
        self.cache_bytes = cache_bytes
        self.sandbox = sandbox and bwrap_available()
        self._dir = Path(tempfile.mkdtemp(prefix="clawnode-layers-"))
        os.chmod(self._dir, 0o700)
        self.socket_path = str(self._dir / SOCKET_NAME)
        self._proc: subprocess.Popen[bytes] | None = None

    def _argv(self) -> list[str]:
        command = [sys.executable, "-m", "runtime.split.server", self.socket_path, str(self.threads)]
        if self.cache_dir is not None:
            command += [str(self.cache_dir), str(self.cache_bytes)]
        if not self.sandbox:
            return command
        writable = [str(self._dir)] + ([str(self.cache_dir)] if self.cache_dir is not None else [])
        return sandbox_argv(command, env=self._env(), writable=writable)

    @staticmethod
    def _env() -> dict[str, str]:
        return {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": code_root(),
            "GGML_RPC_NO_RDMA": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
        }

    def start(self) -> None:
        """Start the process and wait until its socket accepts (blocks)."""
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        """Start the process. Call it from a thread that lives as long as the server should:
        bubblewrap's ``--die-with-parent`` ends the sandbox when the thread that started it ends
        (a worker thread retired from a pool would take the server with it)."""
        if self.cache_root is not None and self.cache_dir is not None:
            for folder in (self.cache_root, self.cache_dir):
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(folder, 0o700)
            prune_cache(self.cache_root, self.cache_bytes)
        argv = limits_argv(self._argv(), self.memory_bytes)
        # Not the node's environment: it may hold the wallet key or tokens (CLAWNODE_*), and without
        # bubblewrap (whose --clearenv drops it) a stranger's graph runs in this process.
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self._env()
        )

    def wait_ready(self) -> None:
        """Wait until the socket accepts (blocks); a process that ended or took too long is refused."""
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(self.socket_path):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ClawnodeError(ErrorCode.UNAVAILABLE, "the layer server did not start", SERVER_FAILED)
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
