"""The RPC server a seller runs for one lease: a process of its own, reachable through one unix socket.

``python -m runtime.split.server SOCKET THREADS`` serves this machine's CPU device with llama.cpp's
``ggml_backend_rpc_start_server`` (through ctypes: no extra binary) on a loopback TCP port, and
relays the connections made to the unix socket ``SOCKET`` to that port. :class:`RpcServerProcess`
starts it under the node's sandbox: rlimits (address space, files, no core dumps) set by ``prlimit``
and, where bubblewrap runs, every namespace unshared (its own network with only a loopback, so the
TCP port is reachable from nowhere but the relay) and only the interpreter, the virtual environment,
the code and the socket's folder mounted, read-only but the socket's. It executes a stranger's graph:
when it crashes or is killed, the lease it serves ends, the node goes on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from runtime.errors import ClawnodeError, ErrorCode

BWRAP = "/usr/bin/bwrap"
PRLIMIT = "/usr/bin/prlimit"
SOCKET_NAME = "rpc.sock"
START_TIMEOUT_S = 20.0
RELAY_CHUNK = 1 << 16
DEFAULT_MEMORY_BYTES = 4 << 30  # address space: the layers held, their KV cache, the compute buffers
SERVER_FAILED = "layer_server_failed"  # stable reason: the lease's RPC server did not start or died


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(RELAY_CHUNK):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


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
    """Each connection to the unix socket, piped to the RPC server's TCP port (one at a time: the
    server serves one client at a time)."""
    while True:
        client, _ = listener.accept()
        try:
            upstream = _connect(port, time.monotonic() + START_TIMEOUT_S)
        except OSError:
            client.close()
            continue
        back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
        back.start()
        _pipe(client, upstream)
        back.join()
        client.close()
        upstream.close()


def main(argv: list[str]) -> None:
    from runtime.split import rpc

    socket_path, threads = argv[0], int(argv[1])
    if socket_path.startswith("tcp:"):  # plain ggml-rpc on a loopback port (benches' baseline)
        rpc.serve(f"127.0.0.1:{int(socket_path[4:])}", threads)
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
    rpc.serve(f"127.0.0.1:{port}", threads)  # returns only if the server could not start
    sys.exit(3)


class RpcServerProcess:
    """One lease's RPC server process; ``socket_path`` is where the tunnel connects."""

    def __init__(self, *, threads: int = 1, memory_bytes: int = DEFAULT_MEMORY_BYTES, sandbox: bool = True) -> None:
        self.threads = max(1, threads)
        self.memory_bytes = memory_bytes
        self.sandbox = sandbox and os.access(BWRAP, os.X_OK)
        self._dir = Path(tempfile.mkdtemp(prefix="clawnode-layers-"))
        os.chmod(self._dir, 0o700)
        self.socket_path = str(self._dir / SOCKET_NAME)
        self._proc: subprocess.Popen[bytes] | None = None

    def _argv(self) -> list[str]:
        code_root = str(Path(__file__).resolve().parents[2])
        command = [sys.executable, "-m", "runtime.split.server", self.socket_path, str(self.threads)]
        if not self.sandbox:
            return command
        argv = [BWRAP, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv"]
        argv += ["--setenv", "PATH", "/usr/bin:/bin", "--setenv", "PYTHONPATH", code_root]
        argv += ["--setenv", "GGML_RPC_NO_RDMA", "1", "--setenv", "OMP_WAIT_POLICY", "PASSIVE"]
        argv += ["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib"]
        argv += ["--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        mounted: list[str] = ["/usr"]
        for folder in (sys.base_prefix, sys.prefix, code_root + "/runtime", *self._library_folders()):
            if not any(folder == m or folder.startswith(m + "/") for m in mounted):
                argv += ["--ro-bind", folder, folder]
                mounted.append(folder)
        argv += ["--bind", str(self._dir), str(self._dir), "--chdir", "/tmp", "--"]
        return argv + command

    @staticmethod
    def _library_folders() -> list[str]:
        from runtime.split import rpc

        lib = rpc.library_dir()
        return [str(lib.parent.resolve())] if lib is not None else []

    def start(self) -> None:
        """Start the process and wait until its socket accepts (blocks)."""
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        """Start the process. Call it from a thread that lives as long as the server should:
        bubblewrap's ``--die-with-parent`` ends the sandbox when the thread that started it ends
        (a worker thread retired from a pool would take the server with it)."""
        argv = self._argv()
        if os.access(PRLIMIT, os.X_OK):
            argv = [PRLIMIT, f"--as={self.memory_bytes}", "--nofile=64", "--core=0", "--", *argv]
        # Not the node's environment: it may hold the wallet key or tokens (CLAWNODE_*), and without
        # bubblewrap (whose --clearenv drops it) a stranger's graph runs in this process.
        env = {"PATH": "/usr/bin:/bin", "GGML_RPC_NO_RDMA": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
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
