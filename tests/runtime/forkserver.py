"""A fork server for the SIGKILL tests: pay the imports once, fork a fresh worker per run.

``python -m tests.runtime.forkserver MODULE`` imports ``MODULE`` (a worker with ``run(argv)``), then
reads commands on stdin, one per line: ``go ARG...`` forks a child that runs ``MODULE.run(ARGS)``
(one at a time); the child's own lines (``ready``, ``done``) go to stdout as it prints them; ``kill``
sends it SIGKILL and ``wait`` waits for it, and then the server prints ``exit PID CODE`` (a SIGKILL
shows as ``-9``). The server reaps the child only there, so the pid it kills is always its own child's.
Every child is a real process of its own, killed with a real SIGKILL: the crash is the same as of a process
started from scratch, only the interpreter start and the imports (about a second each time on two
busy cores) are not paid again. The server runs no thread and no event loop, so forking is safe.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def serve(module_name: str) -> None:
    module = importlib.import_module(module_name)
    print("server", flush=True)
    pid = 0
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "go" and not pid:
            pid = os.fork()
            if pid == 0:  # the worker
                _work(module, words[1:])
        elif words[0] in ("kill", "wait") and pid:
            # The worker is not reaped before this point (a zombie at worst), so its pid cannot have been
            # given to another process: the SIGKILL reaches the worker or nothing.
            if words[0] == "kill":
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)
            pid = 0


def _work(module: Any, args: list[str]) -> None:
    code = 0
    try:
        print(f"pid {os.getpid()}", flush=True)
        module.run(args)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException as error:  # noqa: BLE001 - reported as the exit code
        print(f"error {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        code = 1
    finally:
        sys.stdout.flush()
        os._exit(code)


class ForkServer:
    """The test's side: start runs, read their lines, kill them."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            errors = self.proc.stderr_path.read_text()[-2000:]  # type: ignore[attr-defined]
            raise AssertionError(f"the fork server ended: {errors}")
        return line.strip()

    def start(self, *args: str) -> int:
        """Fork a worker; returns its pid once it printed ``ready``."""
        self.spawn(*args)
        while True:
            line = self._line()
            if line == "ready":
                return self._pid
            if line.startswith("exit "):
                raise AssertionError(f"the worker ended before it was ready: {line}")

    def spawn(self, *args: str) -> int:
        """Fork a worker; returns its pid at once (the worker says by other means when it is ready)."""
        assert self.proc.stdin is not None and all(arg and arg.split() == [arg] for arg in args)
        self.proc.stdin.write(" ".join(("go", *args)) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self._line()
            if line.startswith("pid "):
                self._pid = int(line.split()[1])
                return self._pid
            if line.startswith("exit "):
                raise AssertionError(f"the worker ended before it started: {line}")

    def wait(self, pid: int) -> tuple[int, list[str]]:
        """Wait for the worker to end; its exit code and the lines it printed after ``ready``."""
        return self._end("wait", pid)

    def kill(self, pid: int) -> tuple[int, list[str]]:
        """SIGKILL the worker (if it still runs: the server kills only its own unreaped child); as ``wait``."""
        return self._end("kill", pid)

    def _end(self, how: str, pid: int) -> tuple[int, list[str]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(how + "\n")
        self.proc.stdin.flush()
        lines: list[str] = []
        while True:
            line = self._line()
            if line.startswith(f"exit {pid} "):
                return int(line.split()[2]), lines
            lines.append(line)


@contextmanager
def fork_server(module: str, root: Path, stderr: Path) -> Iterator[ForkServer]:
    """A fork server for ``module`` (run from ``root``); its workers' stderr goes to the file ``stderr``."""
    with stderr.open("w") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.runtime.forkserver", module],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    proc.stderr_path = stderr  # type: ignore[attr-defined]
    try:
        server = ForkServer(proc)
        if server._line() != "server":
            raise AssertionError("the fork server did not start")
        yield server
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    serve(sys.argv[1])
