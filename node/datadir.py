"""The data dir: identity key, API token, config, peer book and the running daemon's
address card. Secrets are created 0600 inside a 0700 directory."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from runtime.files import save_quietly

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair

IDENTITY_FILE = "identity.key"
WALLET_FILE = "wallet.key"
API_TOKEN_FILE = "api.token"
RUNNING_FILE = "node.json"
SECRET_MODE = 0o600


def ensure_data_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start: never readable by others, not even briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _read_secret(path: Path) -> bytes:
    if path.stat().st_mode & 0o077:
        os.chmod(path, SECRET_MODE)
    return path.read_bytes()


def load_or_create_identity(data_dir: Path) -> tuple[KeyPair, bool]:
    """The node's Ed25519 key pair, created on first start. Returns (key pair, created)."""
    # Imported here: the CLI's client commands read this module and must not pay
    # for importing libp2p (about a second) just to find the running daemon.
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.keys import KeyPair
    from libp2p.crypto.serialization import deserialize_private_key

    path = data_dir / IDENTITY_FILE
    if path.exists():
        private_key = deserialize_private_key(_read_secret(path))
        return KeyPair(private_key, private_key.get_public_key()), False
    key_pair = create_new_key_pair()
    _write_secret(path, key_pair.private_key.serialize())
    return key_pair, True


def load_or_create_wallet_key(data_dir: Path) -> bytes:
    """The payout wallet's secp256k1 private key (32 bytes), created on first start."""
    path = data_dir / WALLET_FILE
    if path.exists():
        return bytes.fromhex(_read_secret(path).decode().strip().removeprefix("0x"))
    key = secrets.token_bytes(32)
    _write_secret(path, key.hex().encode())
    return key


def load_or_create_api_token(data_dir: Path) -> str:
    path = data_dir / API_TOKEN_FILE
    if path.exists():
        return _read_secret(path).decode().strip()
    token = secrets.token_urlsafe(32)
    _write_secret(path, token.encode())
    return token


def read_api_token(data_dir: Path) -> str:
    return _read_secret(data_dir / API_TOKEN_FILE).decode().strip()


class RunningNode(BaseModel):
    """What a running daemon publishes for the CLI and scripts: no secrets in here."""

    pid: int
    peer_id: str
    listen_addrs: list[str]
    api_url: str
    role: str


def publish_running(data_dir: Path, running: RunningNode) -> bool:
    """Tell the CLI where this node's API is; False when the disk refused it (the caller tries again)."""
    return save_quietly(data_dir / RUNNING_FILE, running.model_dump_json(indent=2))


def read_running(data_dir: Path) -> RunningNode | None:
    path = data_dir / RUNNING_FILE
    if not path.exists():
        return None
    return RunningNode.model_validate(json.loads(path.read_text(encoding="utf-8")))


def clear_running(data_dir: Path) -> None:
    (data_dir / RUNNING_FILE).unlink(missing_ok=True)
