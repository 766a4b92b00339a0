"""What the peer store keeps of one peer: a bounded number of protocols and addresses.

py-libp2p stores whatever a peer's identify (or identify push) names, up to 1 MiB a message: any
number of protocol names (of any length) and 1000 addresses, kept after the peer leaves until the
store holds ``max_peers`` (1000) peers. A stranger that connected and pushed 17 000 protocol names
and 1000 addresses left 1.85 MiB behind, so strangers with fresh identities could make a node hold
about 2 GiB. go-libp2p reads at most 8 KiB of identify; a clawnode node names about 20 protocols
and a handful of addresses.

Here each peer keeps at most ``MAX_PEER_PROTOCOLS`` protocol names of at most
``MAX_PROTOCOL_CHARS`` characters (the first its message lists: the rest are dropped), and at most
``MAX_PEER_ADDRS`` addresses (the newest: an address added past the bound pushes out the oldest,
so a peer that restarted on a new port is still dialed at it).

A peer's signed peer record (an envelope its own key signed, carried by identify and identify push,
pubsub's ``senderRecord``, gossipsub's peer exchange and the DHT's sender records) is kept whole by
py-libp2p's ``consume_peer_record``: its raw payload and every address parsed from it, after the peer
left, whatever the addresses' bound above. One identify push naming 60 000 addresses left 8.9 MiB.
Here a record is refused (not stored; ``consume_peer_record`` answers False, as for a stale one)
when its envelope is over ``MAX_PEER_RECORD_BYTES`` or it names more than ``MAX_PEER_ADDRS``
addresses; the peer stays reachable at the addresses its identify names, and an earlier record
that fitted stays. Every route above stores through ``consume_peer_record`` (``consume_peer_records``
too), so one wrapper covers them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import multiaddr
from libp2p.peer.id import ID

MAX_PEER_PROTOCOLS = 128
MAX_PROTOCOL_CHARS = 256
MAX_PEER_ADDRS = 64
# A whole signed envelope (key, payload, signature): go-libp2p reads at most 8 KiB of identify, of
# which the record is a part. 64 IPv6 QUIC addresses, each with its /p2p/ suffix as a node's own
# record names them, come to about 4.5 KiB; and a refused record costs its peer more than the record:
# py-libp2p then drops the whole message that carried it (a DHT stream, a pubsub RPC, a relay HOP).
MAX_PEER_RECORD_BYTES = 8192


def record_fits(envelope: Any) -> bool:
    """Whether ``envelope`` (a signed peer record) is small enough to keep: at most
    ``MAX_PEER_RECORD_BYTES`` marshalled and at most ``MAX_PEER_ADDRS`` addresses."""
    try:
        signed = len(envelope.raw_payload) + len(envelope.signature)
        if signed > MAX_PEER_RECORD_BYTES:
            return False  # before marshalling or parsing anything large
        # Marshalled only near the bound (the key and framing add well under a KiB): a record comes
        # with every DHT message, identify and pubsub RPC that carries one.
        if signed > MAX_PEER_RECORD_BYTES - 1024 and len(envelope.marshal_envelope()) > MAX_PEER_RECORD_BYTES:
            return False
        return len(envelope.record().addrs) <= MAX_PEER_ADDRS
    except Exception:  # noqa: BLE001 - a record py-libp2p cannot read (it raises anything): not kept
        return False


def bound_peer_data(peerstore: Any) -> None:
    """Bound what ``peerstore`` (py-libp2p's ``PeerStore``) keeps of each peer; call once, before
    anything else wraps its ``add_addrs``."""
    add_protocols, set_protocols, add_addrs = peerstore.add_protocols, peerstore.set_protocols, peerstore.add_addrs
    consume_peer_record = peerstore.consume_peer_record

    def held(peer_id: ID) -> Any:
        return peerstore.peer_data_map.get(peer_id)

    def fitting(protocols: Sequence[str], room: int) -> list[str]:
        return [str(name) for name in protocols if len(name) <= MAX_PROTOCOL_CHARS][: max(0, room)]

    def add_protocols_bounded(peer_id: ID, protocols: Sequence[str]) -> None:
        data = held(peer_id)
        known = set(data.get_protocols()) if data is not None else set()
        new = [name for name in dict.fromkeys(protocols) if name not in known]
        add_protocols(peer_id, fitting(new, MAX_PEER_PROTOCOLS - len(known)))

    def set_protocols_bounded(peer_id: ID, protocols: Sequence[str]) -> None:
        set_protocols(peer_id, fitting(list(dict.fromkeys(protocols)), MAX_PEER_PROTOCOLS))

    def add_addrs_bounded(peer_id: ID, addrs: Sequence[multiaddr.Multiaddr], ttl: int = 0) -> None:
        addrs = list(addrs)[:MAX_PEER_ADDRS]
        data = held(peer_id)
        if data is not None:
            stored: list[multiaddr.Multiaddr] = data.addrs
            new = sum(1 for addr in dict.fromkeys(addrs) if addr not in stored)
            over = len(stored) + new - MAX_PEER_ADDRS
            if over > 0:
                del stored[:over]  # the oldest go
        add_addrs(peer_id, addrs, ttl)

    def consume_peer_record_bounded(envelope: Any, ttl: int) -> bool:
        return record_fits(envelope) and bool(consume_peer_record(envelope, ttl))

    peerstore.add_protocols = add_protocols_bounded
    peerstore.set_protocols = set_protocols_bounded
    peerstore.add_addrs = add_addrs_bounded
    peerstore.consume_peer_record = consume_peer_record_bounded
