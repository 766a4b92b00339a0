"""Run py-libp2p's Kademlia on clawnode's own protocol id.

py-libp2p 0.8.1 hard-codes ``/ipfs/kad/1.0.0``: each DHT module binds the
constant ``PROTOCOL_ID`` into its own globals with ``from .common import
PROTOCOL_ID`` and ignores ``KadDHT(protocol_prefix=...)``. Forking the DHT for
one string would be far more invasive than rebinding that one global in the
modules that read it, which is what :func:`use_kad_protocol_id` does.

The rebinding is process-wide (one process speaks one DHT) and checked: if a
future py-libp2p moves the constant, :func:`use_kad_protocol_id` raises instead
of silently speaking the IPFS DHT.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from libp2p.custom_types import TProtocol

CLAWNODE_KAD_PROTOCOL_ID = TProtocol("/clawnode/kad/1.0.0")
IPFS_KAD_PROTOCOL_ID = TProtocol("/ipfs/kad/1.0.0")

# Every py-libp2p 0.8.1 module whose code opens or registers DHT streams by the
# module-level name PROTOCOL_ID (routing_table imports it lazily from common).
_MODULES_READING_PROTOCOL_ID = (
    "libp2p.kad_dht.common",
    "libp2p.kad_dht.kad_dht",
    "libp2p.kad_dht.peer_routing",
    "libp2p.kad_dht.provider_store",
    "libp2p.kad_dht.value_store",
)


def _dht_modules() -> list[ModuleType]:
    modules = [importlib.import_module(name) for name in _MODULES_READING_PROTOCOL_ID]
    for module in modules:
        if not hasattr(module, "PROTOCOL_ID"):
            raise RuntimeError(
                f"{module.__name__} no longer defines PROTOCOL_ID: "
                "the installed py-libp2p changed; revisit dht/protocol_id.py"
            )
    return modules


def use_kad_protocol_id(protocol_id: str = CLAWNODE_KAD_PROTOCOL_ID) -> None:
    """Make every KadDHT created afterwards in this process speak ``protocol_id``."""
    if not protocol_id.startswith("/"):
        raise ValueError(f"a protocol id starts with '/': {protocol_id!r}")
    for module in _dht_modules():
        module.PROTOCOL_ID = TProtocol(protocol_id)  # type: ignore[attr-defined]


def current_kad_protocol_id() -> str:
    """The protocol id the DHT modules use now; raises if they disagree."""
    ids = {str(module.PROTOCOL_ID) for module in _dht_modules()}  # type: ignore[attr-defined]
    if len(ids) != 1:
        raise RuntimeError(f"DHT modules disagree on the protocol id: {sorted(ids)}")
    return ids.pop()
