"""Opening a stream to a peer, through a circuit relay when it is known only by circuit addresses.

A leaf: it knows libp2p and nothing of the project's other folders. The relay service
(``nat.relay.RelayService``) registers itself here for its host while it runs
(``register_circuit_dialer``), so the protocols can reach private peers without importing ``nat/``.
They lived in ``nat/relay.py``, which still offers ``is_circuit``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

# The relay's logger, as when this code lived in nat/relay.py: the same lines under the same name.
log = logging.getLogger("nat.relay")

DIAL_TIMEOUT_S = 10.0


class _CircuitTransport(Protocol):
    async def dial(self, maddr: multiaddr.Multiaddr) -> INetConn: ...


class CircuitDialer(Protocol):
    """What ``connect_via_relay`` needs of the host's running relay service."""

    @property
    def transport(self) -> _CircuitTransport: ...

    @property
    def dials(self) -> dict[str, int]: ...  # "ok" / "failed": circuits dialed through a relay

    @property
    def on_relayed_dial(self) -> Callable[[ID], None]: ...


_DIALERS: weakref.WeakKeyDictionary[IHost, CircuitDialer] = weakref.WeakKeyDictionary()


def register_circuit_dialer(host: IHost, dialer: CircuitDialer) -> None:
    _DIALERS[host] = dialer


def unregister_circuit_dialer(host: IHost) -> None:
    _DIALERS.pop(host, None)


def is_circuit(addr: multiaddr.Multiaddr | str) -> bool:
    return "/p2p-circuit" in str(addr)


async def connect_via_relay(host: IHost, peer_id: ID, addrs: Sequence[multiaddr.Multiaddr] = ()) -> bool:
    """Make sure a connection to ``peer_id`` exists, through a relay when no direct address works.

    Returns False when nothing was done (already connected, or no circuit address known: the
    caller's ``new_stream`` dials as usual); raises the last error when every circuit failed.
    """
    network = host.get_network()
    if network.get_connections(peer_id):
        return False
    known = list(addrs)
    try:
        known += [addr for addr in host.get_peerstore().addrs(peer_id) if addr not in known]
    except Exception:  # noqa: BLE001 - no addresses stored
        pass
    circuits = [addr for addr in known if is_circuit(addr)]
    if not circuits:
        return False
    # Circuit addresses come from the peer's signed record, which names them only while the peer
    # is private: its direct addresses would time out behind its NAT, so the relays go first and
    # a hole punch (``nat.holepunch``) finds the direct path afterwards.
    service = _DIALERS.get(host)
    error: Exception = ConnectionError("no relay service runs on this host")
    if service is not None:
        suffix = f"/p2p/{peer_id}"
        for addr in circuits:
            text = str(addr)
            target = multiaddr.Multiaddr(text if text.endswith(suffix) else text + suffix)
            try:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    await service.transport.dial(target)
                service.dials["ok"] += 1
                service.on_relayed_dial(peer_id)
                return True
            except Exception as failure:  # noqa: BLE001 - the next relay is tried
                service.dials["failed"] += 1
                log.info("no circuit to %s through %s: %s", peer_id, text.split("/p2p/")[1], type(failure).__name__)
                error = failure
    direct = [addr for addr in known if not is_circuit(addr)]
    if direct:
        # A stale record: the peer may be public again.
        with trio.fail_after(DIAL_TIMEOUT_S):
            await host.connect(PeerInfo(peer_id, direct))
        return True
    raise error


async def open_stream(host: IHost, peer_id: ID, protocols: Sequence[TProtocol]) -> INetStream:
    """``host.new_stream``, first connecting through a relay when the peer is known only by circuit addresses."""
    try:
        await connect_via_relay(host, peer_id)
    except Exception as error:  # noqa: BLE001 - new_stream's own dial reports the failure
        log.debug("no circuit to %s: %s", peer_id, error)
    return await host.new_stream(peer_id, list(protocols))
