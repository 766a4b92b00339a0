"""A libp2p network notifee that ignores every event: watchers override only the events they need."""

from __future__ import annotations

import multiaddr
from libp2p.abc import INetConn, INetStream, INetwork, INotifee


class QuietNotifee(INotifee):
    """py-libp2p calls all six methods on every notifee; each does nothing here."""

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None
