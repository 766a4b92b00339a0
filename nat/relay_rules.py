"""A relay's decisions on reservations, as pure functions over plain data (the service in ``nat.relay``
only fetches the facts, asks these, and acts), beside ``nat.autonat_v2_rules`` and ``nat.double_nat``:
``nat`` may not import ``protocols`` (docs/architecture.md, "Layers"), so its rules live here.

:func:`reservation_per_ip`: a relay keeps ``relay.max_reservations`` reservations (py-libp2p's own
check, the total), each held while its holder stays connected. A stranger connecting from one address
with that many fresh identities, each reserving, left the relay refusing every private node that
needed it for as long as it held them. So one IP (an IPv4 address, or an IPv6 /64:
``nat.addresses.ip_bucket``) holds at most ``relay.max_reservations_per_ip`` of them. Not counted, so
never refused by it: a renewal, an asker with no IP of its own (it reached the relay over a relayed
connection) and, with ``loopback_exempt`` (the default: a machine's own nodes, a swarm on one host),
an asker on loopback; holders are counted alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

RESERVATIONS_PER_IP = "reservations_per_ip"


@dataclass(frozen=True)
class Refused:
    """Why a reservation is refused: the hop ``status`` the asker is answered with, a stable ``reason``."""

    status: StatusCode
    reason: str


@dataclass(frozen=True)
class Peer:
    """Where one peer reached the relay from."""

    bucket: str | None  # its IP bucket (IPv4 address or IPv6 /64); None: no IP of its own (relayed)
    on_loopback: bool = False


def reservation_per_ip(
    asker: Peer, holders: Iterable[Peer], *, renewal: bool, per_ip: int, loopback_exempt: bool
) -> Refused | None:
    """``None`` when the relay may grant ``asker`` a reservation as far as the per-IP bound goes, else
    why not (``RESOURCE_LIMIT_EXCEEDED``, what py-libp2p answers when the relay is full; reason
    ``reservations_per_ip``): ``per_ip`` of the other ``holders`` (the peers holding one now, the asker
    left out) are counted in its bucket already. ``renewal``: the asker holds one already."""
    if renewal or not _counted(asker, loopback_exempt):
        return None
    held = sum(1 for holder in holders if _counted(holder, loopback_exempt) and holder.bucket == asker.bucket)
    if held < per_ip:
        return None
    return Refused(StatusCode.RESOURCE_LIMIT_EXCEEDED, RESERVATIONS_PER_IP)


def _counted(peer: Peer, loopback_exempt: bool) -> bool:
    return peer.bucket is not None and not (loopback_exempt and peer.on_loopback)
