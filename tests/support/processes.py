"""Real ``clawnode start`` subprocesses, each with its own data dir, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from node.datadir import RunningNode, read_api_token, read_running
from tests.support.zygote import ForkedProcess, zygote

CLAWNODE = [sys.executable, "-m", "node.cli"]
# Any free port for libp2p and for the API, so many daemons share one machine.
LOOPBACK_ANY_PORT = ["--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0"]
# Daemons are forked from one process that paid their imports (tests/support/zygote.py): the same
# ``clawnode start`` code in a process of its own, without 2-5 s of interpreter start and imports each.
# CLAWNODE_TEST_FRESH_DAEMONS=1 starts each as ``python -m node.cli start`` instead.
FORK_DAEMONS = os.environ.get("CLAWNODE_TEST_FRESH_DAEMONS", "") != "1"


# Daemons on loopback that settle every half second and never dial the public bootstrap peers.
FAST_DAEMON_ENV = {"CLAWNODE_ESCROW_SETTLE_INTERVAL_S": "0.5", "CLAWNODE_BOOTSTRAP_USE_DEFAULTS": "false"}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``clawnode ARG...`` in a process of its own; forked from the zygote too (its imports paid)."""
    if not FORK_DAEMONS:
        return subprocess.run(
            [*CLAWNODE, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
    with tempfile.TemporaryDirectory(prefix="clawnode-cli-") as scratch:
        out, err = Path(scratch) / "stdout", Path(scratch) / "stderr"
        process = zygote().start(list(args), {**os.environ, **(env or {})}, out, stderr=err)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        return subprocess.CompletedProcess([*CLAWNODE, *args], code, out.read_text(), err.read_text())


@dataclass
class DaemonProcess:
    data_dir: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[str] | ForkedProcess | None = None
    log_path: Path | None = None

    def start(self, wait_s: float = 30.0) -> DaemonProcess:
        self.spawn()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.up() is not None:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"clawnode did not start within {wait_s} s:\n{self.log()}")

    def spawn(self, command: Sequence[str] = (), cwd: Path | None = None) -> None:
        """``clawnode start --data-dir DATA_DIR ARG...``, not waited for (``up`` says when it is), its
        output appended to DATA_DIR's log: forked from the zygote, or in a fresh process when
        ``FORK_DAEMONS`` is off or a ``command`` is given (run as ``COMMAND start ...`` in ``cwd``;
        ``clawnode`` by default)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        argv = ["start", "--data-dir", str(self.data_dir), *self.args]
        env = {**os.environ, **self.env}
        if FORK_DAEMONS and not command:
            self.process = zygote().start(argv, env, self.log_path)
            return
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [*(command or CLAWNODE), *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,  # as the zygote's forks have it
                text=True,
                env=env,
                cwd=cwd,
            )

    def up(self) -> RunningNode | None:
        """The daemon's ``running.json`` once it wrote it (its API and libp2p host are up), else None;
        RuntimeError, with its log, once it exited."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"clawnode exited with {self.process.returncode}:\n{self.log()}")
        running = read_running(self.data_dir)
        return running if running is not None and running.pid == self.process.pid else None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def api(self, path: str) -> Any:
        running = read_running(self.data_dir)
        assert running is not None, "the daemon is not running"
        reply = httpx.get(
            f"{running.api_url}{path}",
            headers={"authorization": f"Bearer {read_api_token(self.data_dir)}"},
            timeout=10.0,
        )
        reply.raise_for_status()
        return reply.json()

    def identity(self) -> dict[str, Any]:
        """What ``clawnode id --json`` prints (tests/test_daemon_processes.py checks they agree), read from
        the API without a CLI process of its own (0.5-1.5 s each)."""
        return dict(self.api("/api/id"))

    def connected_peer_ids(self) -> set[str]:
        return {peer["peer_id"] for peer in self.api("/api/peers")["peers"] if peer["connected"]}

    def wait_for_peers(self, peer_ids: set[str], timeout_s: float = 30.0) -> set[str]:
        deadline = time.monotonic() + timeout_s
        seen: set[str] = set()
        while time.monotonic() < deadline:
            seen = self.connected_peer_ids()
            if peer_ids <= seen:
                return seen
            time.sleep(0.2)
        raise AssertionError(f"peers {peer_ids - seen} not connected within {timeout_s} s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> tuple[int, float]:
        """Send ``sig``; return the exit code and the seconds it took to exit."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def prepare_data_dir(path: Path, *, wallet_key: str | None = None, config: str | None = None) -> Path:
    """A data dir made before the first start: a given wallet key (0600, e.g. a funded dev
    account) and a config.toml, as an operator would write them."""
    path.mkdir(mode=0o700, parents=True)
    if wallet_key is not None:
        wallet = path / "wallet.key"
        wallet.write_text(wallet_key)
        os.chmod(wallet, 0o600)
    if config is not None:
        (path / "config.toml").write_text(config)
    return path
