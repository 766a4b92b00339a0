"""The node's wallet outside the daemon: an encrypted export and import of its key, and deploying the escrow.

Blocking (scrypt and web3 are): the CLI calls these directly. The key never leaves in the clear:
an export is a standard Web3 Secret Storage (v3) keystore, encrypted with a passphrase (scrypt),
readable by any Ethereum wallet; an import takes one back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from eth_account import Account

from runtime.errors import ClawnodeError, ErrorCode
from runtime.escrow.chain import Chain
from runtime.escrow.client import EscrowClient
from runtime.escrow.errors import EscrowError, normalise

MAX_KEYSTORE_BYTES = 16 * 1024
MIN_PASSPHRASE = 8


def export_keystore(key: bytes, passphrase: str) -> dict[str, object]:
    """``key`` as an encrypted v3 keystore (address in the clear, the key only under the passphrase)."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise ClawnodeError(
            ErrorCode.INVALID_ARGUMENT, f"the passphrase needs at least {MIN_PASSPHRASE} characters", "weak_passphrase"
        )
    return dict(Account.encrypt(key, passphrase))


def import_keystore(data: bytes, passphrase: str) -> bytes:
    """The key inside a v3 keystore; ``E_INVALID_ARGUMENT`` ``bad_keystore`` for anything else or a wrong passphrase."""
    if len(data) > MAX_KEYSTORE_BYTES:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "not a wallet keystore (too large)", "bad_keystore")
    try:
        keystore = json.loads(data)
        return bytes(Account.decrypt(keystore, passphrase))
    except Exception:  # noqa: BLE001 - a wrong passphrase and a malformed file are told apart by nobody
        raise ClawnodeError(
            ErrorCode.INVALID_ARGUMENT, "not a wallet keystore, or the passphrase is wrong", "bad_keystore"
        ) from None


@dataclass(frozen=True)
class Deployed:
    chain_id: int
    contract: str
    deployer: str


def deploy_escrow(rpc_url: str, key: bytes, *, timeout_s: float = 30.0) -> Deployed:
    """Deploy the committed escrow contract to the chain at ``rpc_url``, paid by ``key``'s account.

    Raises ``EscrowError`` with a stable reason (``chain_unavailable``, ``insufficient_funds``, …);
    never the URL.
    """
    account = Account.from_key(key)
    chain = Chain.rpc(rpc_url, timeout_s=timeout_s)
    try:
        balance = chain.sync(lambda: int(chain.w3.eth.get_balance(account.address)))
    except Exception as error:  # noqa: BLE001 - normalised to a stable reason
        raise normalise(error) from None
    if balance == 0:
        raise EscrowError("insufficient_funds", "the wallet holds nothing to pay the deployment's gas")
    client = EscrowClient.deploy(chain, account)
    client.verify_contract()
    return Deployed(chain.chain_id, client.address, account.address)
