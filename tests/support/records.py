"""Capability records for tests: a valid one, and each way a record can be bad."""

from __future__ import annotations

import secrets
import time
from typing import Any

from libp2p import generate_new_ed25519_identity
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from dht.offers import Offer
from dht.records import (
    RECORD_DOMAIN,
    RECORD_PAYLOAD_TYPE,
    CapabilityRecord,
    Hardware,
    bind_wallet,
    seal_record,
)
from wire.signed import seal

GEMMA = Offer(name="model:gemma3-270m-q4_k_m", price_per_unit=10**9, context_length=8192, family="gemma3")


def make_record(key_pair: KeyPair, *, seq: int = 1, ttl_s: int = 600, **changes: Any) -> CapabilityRecord:
    peer_id = str(ID.from_pubkey(key_pair.public_key))
    now = int(time.time())
    fields: dict[str, Any] = {
        "peer_id": peer_id,
        "seq": seq,
        "issued_at": now,
        "expires_at": now + ttl_s,
        "reachability": "public",
        "addrs": ["/ip4/127.0.0.1/tcp/4021"],
        "hardware": Hardware(cores=2, ram_mb=2048),
        "capabilities": [GEMMA.descriptor()],
        "wallet": bind_wallet(secrets.token_bytes(32), peer_id),
    }
    fields.update(changes)
    return CapabilityRecord(**fields)


def sealed_unchecked(record: CapabilityRecord, key_pair: KeyPair) -> bytes:
    """Seal without the publisher's own checks, as a hostile peer would."""
    return seal(record, key_pair.private_key, domain=RECORD_DOMAIN, payload_type=RECORD_PAYLOAD_TYPE)


def bad_records(key_pair: KeyPair, *, good_seq: int = 10) -> dict[str, bytes]:
    """Sealed records, each bad in one way, keyed by the rejection reason they must get."""
    stranger = generate_new_ed25519_identity()
    forged = bytearray(seal_record(make_record(key_pair, seq=good_seq + 1), key_pair.private_key))
    forged[-1] ^= 0x01  # the last byte is inside the signature
    long_summary = "x" * 280
    many = [
        Offer(name=f"model:padding-{i}", summary=long_summary, price_per_unit=1, context_length=512).descriptor()
        for i in range(12)
    ]
    missing_hardware = make_record(key_pair, seq=good_seq + 1).model_copy(update={"hardware": None})
    other_wallet = bind_wallet(secrets.token_bytes(32), str(ID.from_pubkey(stranger.public_key)))
    leaky = GEMMA.model_copy(update={"summary": "weights at /home/alice/models/gemma.gguf"}).descriptor()
    return {
        "bad_signature": bytes(forged),
        "wrong_signer": sealed_unchecked(make_record(key_pair, seq=good_seq + 1), stranger),
        "stale_sequence": seal_record(make_record(key_pair, seq=good_seq - 1), key_pair.private_key),
        "expired": sealed_unchecked(
            make_record(key_pair, seq=good_seq + 1).model_copy(update={"issued_at": 1, "expires_at": 2}), key_pair
        ),
        "oversized": sealed_unchecked(make_record(key_pair, seq=good_seq + 1, capabilities=many), key_pair),
        "schema_invalid": sealed_unchecked(missing_hardware, key_pair),
        "bad_wallet_binding": sealed_unchecked(make_record(key_pair, seq=good_seq + 1, wallet=other_wallet), key_pair),
        "private_data": sealed_unchecked(make_record(key_pair, seq=good_seq + 1, capabilities=[leaky]), key_pair),
    }
