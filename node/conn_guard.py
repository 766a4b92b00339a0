"""Inbound connections: only upgraded ones count, a handshake has a deadline, and one IP waits in few.

py-libp2p 0.8.1 admits an inbound TCP connection through a limiter of ``max_connections -
min_connections`` slots taken the moment the socket is accepted, before Noise or Yamux. A
stranger holding that many idle sockets open (reconnecting as each one times out) kept every
new peer out. And a slot taken by a connection that did upgrade was only given back when the
whole swarm stopped, so peers that came and went used the slots up for good.

``ConnGuard`` takes over the swarm's inbound entry point (``Swarm._handle_inbound_connection``,
which every listener calls through a closure, so replacing it on the instance covers them all):

* a connection that has not finished the upgrade (Noise + Yamux + registration) within
  ``handshake_timeout_s`` is closed;
* at most ``max_pending_per_ip`` connections from one IPv4 address (or IPv6 /64) and
  ``max_pending`` in all may be upgrading at once; one more is closed at once;
* upgraded inbound connections are capped at ``max_inbound`` (``max_connections -
  min_connections``, as py-libp2p meant, so outbound dials keep room): a connection arriving
  while that many are open is closed before its handshake; the count drops when one closes;
* one IPv4 address (or IPv6 /64) holds at most ``max_inbound_per_ip`` of those, its connections
  still upgrading included: a stranger opening ``max_inbound`` connections from one address, each
  with a fresh identity, kept every other peer out for as long as it held them. Loopback is
  exempt (``loopback_exempt``: a machine's own nodes, a swarm on one host), and so is a connection
  with no IP of its own (relayed);
* ``max_connections`` stays py-libp2p's own check at registration, which counts upgraded
  connections only.

Pre-multiplexed connections (QUIC) finished their handshake in the transport and take
py-libp2p's own path unchanged.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from libp2p.abc import IMuxedConn, IRawConnection
from libp2p.io.abc import ReadWriteCloser
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm
from multiaddr import Multiaddr

from nat.addresses import ip_bucket, is_loopback_ip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnLimits:
    """The limits on inbound connections that have not finished the libp2p upgrade."""

    handshake_timeout_s: float = 10.0
    max_pending_per_ip: int = 8
    max_pending: int = 256
    max_inbound: int | None = None  # upgraded inbound connections; None: only max_connections caps them
    max_inbound_per_ip: int = 32  # of those (and those upgrading), from one IPv4 address or IPv6 /64
    loopback_exempt: bool = True  # loopback peers are not counted per IP (a swarm on one machine)

    @classmethod
    def of(cls, node: _NodeSettings) -> ConnLimits:
        """The limits the ``node.*`` config section sets."""
        return cls(
            handshake_timeout_s=node.handshake_timeout_s,
            max_pending_per_ip=node.max_pending_connections_per_ip,
            max_pending=node.max_pending_connections,
        )


class _NodeSettings(Protocol):
    @property
    def handshake_timeout_s(self) -> float: ...

    @property
    def max_pending_connections_per_ip(self) -> int: ...

    @property
    def max_pending_connections(self) -> int: ...


def ip_key(address: str) -> str:
    """The bucket a remote address is counted in: the IPv4 address, or the IPv6 /64 (the address itself
    when it is no IP)."""
    return ip_bucket(address) or address


class ConnGuard:
    """Admits, times and counts inbound connections for one swarm; ``install`` once, before listening."""

    def __init__(self, swarm: Swarm, limits: ConnLimits) -> None:
        self.swarm = swarm
        self.limits = limits
        self.pending: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # reason: per_ip | total | gate | inbound_full | per_ip_inbound
        self.timed_out = 0
        self.upgraded = 0  # inbound connections that finished the upgrade, ever
        self.inbound = 0  # of those, open now
        self.inbound_by_ip: Counter[str] = Counter()  # of those, per IP key (loopback exempt: not counted)
        self._original: Any = None

    @property
    def pending_total(self) -> int:
        return sum(self.pending.values())

    def install(self) -> None:
        swarm: Any = self.swarm
        self._original = swarm._handle_inbound_connection
        # The admission limiter py-libp2p takes per raw connection: ours replaces it.
        swarm._inbound_limiter = trio.CapacityLimiter(math.inf)
        swarm._handle_inbound_connection = self.handle

    async def handle(self, read_write_closer: ReadWriteCloser, maddr: Multiaddr) -> None:
        if isinstance(read_write_closer, IMuxedConn):
            await self._original(read_write_closer, maddr)
            return
        address = self._address(read_write_closer)
        key = ip_key(address) if address else "unknown"
        counted = address is not None and not (self.limits.loopback_exempt and is_loopback_ip(address))
        reason = self._refusal(key, counted)
        if reason is not None:
            self.refused[reason] += 1
            log.debug("inbound connection refused: %s", reason)
            await _close_quietly(read_write_closer)
            return
        self.pending[key] += 1
        try:
            muxed = await self._upgrade(read_write_closer, maddr)
        finally:
            self.pending[key] -= 1
            if self.pending[key] <= 0:
                del self.pending[key]
        if muxed is None:
            return
        self.upgraded += 1
        self.inbound += 1
        if counted:
            self.inbound_by_ip[key] += 1
        try:
            # The listener closes the socket when this handler returns: stay as long as the connection,
            # and no longer than the swarm. The listener's tasks outlive a stopped swarm (py-libp2p runs
            # them in a system task until the listener is closed), so waiting for the connection alone
            # kept a stopped node's sockets open: peers kept a connection nobody answered on (a
            # restarted provider's consumer opened its next stream there and timed out after 10 s).
            closed: trio.Event | None = getattr(muxed, "event_closed", None)
            if closed is None:
                await self.swarm.manager.wait_finished()
            else:
                await _first_of(closed.wait, self.swarm.manager.wait_finished)
        finally:
            self.inbound -= 1
            if counted:
                self.inbound_by_ip[key] -= 1
                if self.inbound_by_ip[key] <= 0:
                    del self.inbound_by_ip[key]

    def _address(self, read_write_closer: ReadWriteCloser) -> str | None:
        try:
            remote = read_write_closer.get_remote_address()
        except Exception:  # noqa: BLE001 - a socket already gone has no address
            remote = None
        return str(remote[0]) if remote else None

    def _refusal(self, key: str, counted: bool = True) -> str | None:
        if self.limits.max_inbound is not None and self.inbound >= self.limits.max_inbound:
            return "inbound_full"
        if counted and self.inbound_by_ip[key] + self.pending[key] >= self.limits.max_inbound_per_ip:
            return "per_ip_inbound"
        if self.pending[key] >= self.limits.max_pending_per_ip:
            return "per_ip"
        if self.pending_total >= self.limits.max_pending:
            return "total"
        return None

    async def _upgrade(self, read_write_closer: ReadWriteCloser, maddr: Multiaddr) -> IMuxedConn | None:
        """Noise + Yamux + registration within the deadline, or the connection is closed."""
        swarm = self.swarm
        raw: IRawConnection | None = None
        try:
            with trio.move_on_after(self.limits.handshake_timeout_s) as deadline:
                remote = swarm._build_remote_multiaddr(read_write_closer)
                if remote is not None and not await swarm.connection_gate.is_allowed(remote):
                    self.refused["gate"] += 1
                    await _close_quietly(read_write_closer)
                    return None
                raw = RawConnection(read_write_closer, False)
                return await swarm.upgrade_inbound_raw_conn(raw, maddr)
        except Exception as error:  # noqa: BLE001 - a failed handshake costs that connection only
            log.debug("inbound upgrade failed: %s", type(error).__name__)
        if deadline.cancelled_caught:
            self.timed_out += 1
            log.debug("inbound connection closed: no upgrade within %g s", self.limits.handshake_timeout_s)
        await _close_quietly(raw if raw is not None else read_write_closer)
        return None


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as one of ``waits`` returns."""
    async with trio.open_nursery() as nursery:

        async def wait_then_cancel(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(wait_then_cancel, wait)


async def _close_quietly(conn: ReadWriteCloser | IRawConnection) -> None:
    with trio.move_on_after(1):
        try:
            await conn.close()
        except Exception:  # noqa: BLE001 - already broken
            pass


_GUARDS: weakref.WeakKeyDictionary[Swarm, ConnGuard] = weakref.WeakKeyDictionary()


def guard_inbound_connections(swarm: Swarm, limits: ConnLimits) -> ConnGuard:
    guard = ConnGuard(swarm, limits)
    guard.install()
    _GUARDS[swarm] = guard
    return guard


def guard_of(swarm: object) -> ConnGuard | None:
    """The guard installed on ``swarm`` (a host's network), if any."""
    try:
        return _GUARDS.get(swarm)  # type: ignore[call-overload]
    except TypeError:
        return None
