"""Helpers for the runtime tests: peer keys, an anvil process, and a TCP relay that can cut a chain off."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair

from runtime.escrow import Chain, EscrowClient
from runtime.ledger import EscrowRef, LeaseOpen
from runtime.ledger.receipts import ReceiptKey
from wire.peer_keys import peer_id_of, receipt_key

ANVIL_DIR = Path(__file__).parent / "anvil"
# `npm install`, not `npm ci`: the package's optional per-platform binaries other than this one are
# not all in the registry, so the lock file lists only the one found here and `npm ci` refuses it.
ANVIL_INSTALL_HINT = (
    "install anvil with: npm install --prefix tests/runtime/anvil --no-audit --no-fund (needs Node.js >= 20 and npm)"
)


def peer_key(name: str) -> KeyPair:
    """A deterministic Ed25519 peer key per name."""
    return create_new_key_pair(name.encode().ljust(32, b"\0")[:32])


def peer_id(key: KeyPair) -> str:
    return peer_id_of(key.private_key)


def receipt_key_of(key: KeyPair) -> ReceiptKey:
    """The peer key as the ledger signs receipts with it."""
    return receipt_key(key.private_key)


def anvil_binary() -> Path | None:
    """The anvil binary the npm package installed (the native one: killing it kills the chain)."""
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    system = {"Linux": "linux", "Darwin": "darwin"}.get(platform.system())
    if arch is None or system is None:
        return None
    candidate = ANVIL_DIR / "node_modules" / "@foundry-rs" / f"anvil-{system}-{arch}" / "bin" / "anvil"
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def anvil_skip_reason() -> str | None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return f"node/npm not found on PATH; {ANVIL_INSTALL_HINT}"
    if anvil_binary() is None:
        return f"tests/runtime/anvil/node_modules has no anvil binary; {ANVIL_INSTALL_HINT}"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def anvil_daemon_env(url: str, contract: str, *, dispute_window_s: int) -> dict[str, str]:
    """Environment for ``clawnode start`` daemons settling on the anvil chain at ``url``."""
    return {
        "CLAWNODE_ESCROW_MODE": "rpc",
        "CLAWNODE_ESCROW_RPC_URL": url,
        "CLAWNODE_ESCROW_CONTRACT": contract,
        "CLAWNODE_ESCROW_SETTLE_INTERVAL_S": "0.5",
        "CLAWNODE_ESCROW_DISPUTE_WINDOW_S": str(dispute_window_s),
        "CLAWNODE_BOOTSTRAP_USE_DEFAULTS": "false",
    }


@contextlib.contextmanager
def anvil_process() -> Iterator[str]:
    """Run anvil on a free loopback port; yields its URL."""
    with anvil_popen() as (url, _):
        yield url


@contextlib.contextmanager
def anvil_popen() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run anvil on a free loopback port; yields its URL and process (to SIGSTOP it: a frozen chain)."""
    binary = anvil_binary()
    assert binary is not None, ANVIL_INSTALL_HINT
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "--port", str(port), "--host", "127.0.0.1", "--silent"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("anvil did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


class Relay:
    """A loopback TCP relay to ``target_port``; ``down()`` refuses and cuts every connection (a chain outage)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._up = threading.Event()
        self._up.set()
        self._cut = 0  # connections still to be cut as soon as they are accepted
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        self._up.clear()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.close()
            self._open.clear()

    def up(self) -> None:
        self._up.set()

    def cut_next(self, count: int) -> None:
        """Close the next ``count`` connections as soon as they are accepted (a dropped connection)."""
        with self._lock:
            self._cut = count

    def close(self) -> None:
        self.down()
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                cut, self._cut = self._cut > 0, max(0, self._cut - 1)
            if cut or not self._up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.close()


def lease_for(
    role: str,
    lease_id: str,
    provider: KeyPair,
    consumer: KeyPair,
    *,
    price_per_unit: int,
    budget: int,
    escrow: EscrowRef | None = None,
) -> LeaseOpen:
    """One lease as the provider's or the consumer's ledger records it."""
    return LeaseOpen(
        lease_id=lease_id,
        role=role,  # type: ignore[arg-type]
        provider=peer_id(provider),
        consumer=peer_id(consumer),
        price_per_unit=price_per_unit,
        budget=budget,
        escrow=escrow,
    )


@dataclass(frozen=True)
class AnvilEscrow:
    """An anvil chain with the escrow contract deployed by its first dev account."""

    url: str
    chain: Chain
    escrow: EscrowClient

    def config_section(self, *, arbiter_index: int = 9) -> str:
        """The ``[escrow]`` table of a daemon on this chain."""
        arbiter = self.chain.dev_accounts()[arbiter_index].address
        return (
            f'[escrow]\nmode = "rpc"\nrpc_url = "{self.url}"\ncontract = "{self.escrow.address}"\n'
            f'arbiter = "{arbiter}"\n'
        )


@contextlib.contextmanager
def anvil_with_escrow() -> Iterator[AnvilEscrow]:
    with anvil_process() as url:
        chain = Chain.rpc(url)
        yield AnvilEscrow(url, chain, EscrowClient.deploy(chain, chain.dev_accounts()[0]))
