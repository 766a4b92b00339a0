"""libp2p peer keys as the raw Ed25519 bytes the layers without libp2p take.

``runtime/ledger`` signs and verifies usage receipts with plain Ed25519 over raw key bytes and
knows no peer-id format; the node hands it ``receipt_key(its libp2p private key)`` to sign with and
``ed25519_public_key`` to read the public key a peer id embeds.
"""

from __future__ import annotations

from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import PrivateKey
from libp2p.peer.id import ID

from runtime.ledger.receipts import ReceiptKey


def peer_id_of(key: PrivateKey) -> str:
    return ID.from_pubkey(key.get_public_key()).to_base58()


def receipt_key(key: PrivateKey) -> ReceiptKey:
    """The node's libp2p Ed25519 key as the ledger's receipt key (its 32-byte seed and peer id)."""
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("usage receipts are signed with an Ed25519 peer key")
    return ReceiptKey(seed=key.to_bytes(), peer_id=peer_id_of(key))


def ed25519_public_key(peer_id: str) -> bytes | None:
    """The raw 32-byte Ed25519 public key a peer id embeds; None for a malformed id or another key type."""
    try:
        public_key = ID.from_base58(peer_id).extract_public_key()
    except Exception:  # noqa: BLE001 - any malformed peer id embeds no key
        return None
    if not isinstance(public_key, Ed25519PublicKey):
        return None
    return public_key.to_bytes()
