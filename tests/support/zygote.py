"""One process per test run that pays ``clawnode``'s imports once and forks each daemon and CLI run from them.

Every ``python -m node.cli start`` pays the interpreter start and the imports of libp2p, eth_account,
fastapi, py_ecc and llama.cpp: about 2 s on a quiet core, 4-10 s on two busy ones, before the daemon does
anything; every CLI command pays the interpreter start and node.cli's imports. The suite starts some 60
daemons, most one after the other, and runs the CLI about a hundred times. ``python -m tests.support.zygote``
imports what the daemon imports, then forks a child per ``start`` command; the child is a process of its
own that runs ``node.cli.main()`` with the given argv, environment, working folder and output files,
exactly the code a fresh ``clawnode`` runs, and exits through the same atexit handlers (the interpreter's
own teardown is skipped). The zygote runs no thread and no event loop, so forking it is safe (as
tests/runtime/forkserver.py, which runs one child at a time). ``python -m node.cli`` itself stays
covered by tests/test_demo.py and tests/nat/test_matrix.py.

Commands on stdin and answers on stdout are JSON lines: ``{"start": [ARG...], "env": {...}, "cwd": DIR,
"log": FILE}`` (and ``"stderr": FILE`` for a file of its own) answers ``{"pid": PID}``;
``{"signal": PID, "number": N}`` signals a child that was not reaped yet (so a pid reused by another
process is never hit); every child's end is reported as ``{"exit": PID, "code": CODE}`` (a signal N
shows as -N, as ``subprocess`` shows it). The zygote ends when its stdin closes (the test run ended)
and leaves its children to the tests' own cleanup.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _child(command: dict[str, Any]) -> None:
    code = 1
    try:
        for target, path in ((1, command["log"]), (2, command.get("stderr", command["log"]))):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, target)
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.clear()
        os.environ.update(command["env"])
        os.chdir(command["cwd"])
        import node.cli

        sys.argv = ["clawnode", *command["start"]]
        try:
            node.cli.main()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        atexit._run_exitfuncs()
    except BaseException as error:  # noqa: BLE001 - reported as the exit code, as an uncaught error would be
        print(f"clawnode (forked): {type(error).__name__}: {error}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import node.cli
    import node.daemon  # noqa: F401
    import runtime.inference.engine  # noqa: F401

    def say(answer: dict[str, Any]) -> None:
        os.write(1, (json.dumps(answer) + "\n").encode())

    say({"ready": os.getpid()})
    children: set[int] = set()
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if not readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            command = json.loads(line)
            if "start" in command:
                pid = os.fork()
                if pid == 0:
                    _child(command)
                children.add(pid)
                say({"pid": pid})
            elif "signal" in command and command["signal"] in children:
                os.kill(command["signal"], command["number"])


class Zygote:
    """The tests' side: fork daemons and learn when they end. Thread-safe."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.zygote"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._pids: list[int] = []
        self.exits: dict[int, int] = {}
        assert self.proc.stdout is not None
        while not (line := self.proc.stdout.readline()).startswith(b'{"ready"'):
            if not line:
                raise RuntimeError("the daemon zygote did not start")
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.startswith(b"{"):
                continue  # a library's own print
            answer = json.loads(line)
            with self._changed:
                if "pid" in answer:
                    self._pids.append(answer["pid"])
                elif "exit" in answer:
                    self.exits[answer["exit"]] = answer["code"]
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, args: list[str], env: dict[str, str], log: Path, stderr: Path | None = None) -> ForkedProcess:
        """``clawnode ARG...`` with stdout (and stderr, unless given its own file) appended to ``log``."""
        with self._lock:
            command = {"start": args, "env": env, "cwd": os.getcwd(), "log": str(log)}
            if stderr is not None:
                command["stderr"] = str(stderr)
            self._send(command)
            with self._changed:
                if not self._changed.wait_for(lambda: self._pids or not self.alive(), timeout=30):
                    raise RuntimeError("the daemon zygote did not fork")
                if not self._pids:
                    raise RuntimeError("the daemon zygote ended")
                return ForkedProcess(self, self._pids.pop(0))

    def signal(self, pid: int, number: int) -> None:
        with self._lock:
            self._send({"signal": pid, "number": number})

    def wait(self, pid: int, timeout: float | None) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: pid in self.exits or not self.alive(), timeout=timeout)
            return self.exits.get(pid)


class ForkedProcess:
    """What the tests use of ``subprocess.Popen`` for a daemon the zygote forked."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote = zygote
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.returncode = self.zygote.exits.get(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self.zygote.wait(self.pid, timeout)
        if code is None:
            if not self.zygote.alive():
                raise RuntimeError("the daemon zygote ended before the daemon")
            raise subprocess.TimeoutExpired(f"clawnode start (pid {self.pid})", timeout or 0)
        self.returncode = code
        return code

    def send_signal(self, number: int) -> None:
        if self.poll() is not None:
            return
        if self.zygote.alive():
            self.zygote.signal(self.pid, number)
        else:  # the zygote ended first: its children were left to the tests' cleanup
            try:
                os.kill(self.pid, number)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def zygote() -> Zygote:
    """The run's zygote, started on first use."""
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive():
            _zygote = Zygote()
        return _zygote


if __name__ == "__main__":
    serve()
