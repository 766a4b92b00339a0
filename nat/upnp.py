"""UPnP IGD port mapping for a node behind a home router (``miniupnpc``).

``PortMapper`` does the blocking work (SSDP discovery, IGD selection, AddPortMapping /
DeletePortMapping); ``UpnpService`` drives it from trio: every miniupnpc call runs in a worker thread
behind a ``CapacityLimiter(1)``, never on the event loop. The service maps each of the node's TCP listen
ports for TCP and UDP with a lease, renews the mappings when ``renew_fraction`` of the lease has passed,
retries discovery with a backoff while there is no IGD, and deletes its mappings on shutdown.

Nothing here logs or returns a local file path or a secret: errors are reduced to a short code and a
message from the IGD or from miniupnpc.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import trio

from nat.double_nat import DoubleNat, DoubleNatFacts, OutsideView, judge_double_nat

if TYPE_CHECKING:
    # py-libp2p depends on trio-typing, whose stale trio-stubs hide trio's own TaskStatus from mypy.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

Proto = Literal["TCP", "UDP"]
State = Literal["disabled", "searching", "no-igd", "mapped", "failed"]
PROTOS: tuple[Proto, ...] = ("TCP", "UDP")

_T = TypeVar("_T")

# miniupnpc raises a bare ``Exception`` whose text is ``strupnperror(code)``; map it back to a code.
_UPNP_ERRORS: dict[str, str] = {
    "ConflictInMappingEntry": "conflict",
    "ConflictWithOtherMechanisms": "conflict",
    "SamePortValuesRequired": "same-port-required",
    "OnlyPermanentLeasesSupported": "permanent-only",
    "NoPortMapsAvailable": "no-ports",
    "Action not authorized": "not-authorized",
    "NoSuchEntryInArray": "no-such-entry",
    "Invalid Action": "invalid-action",
    "Invalid Args": "invalid-args",
    "Action Failed": "action-failed",
    "Miniupnpc HTTP error": "igd-unreachable",
    "Miniupnpc Socket error": "igd-unreachable",
    "Miniupnpc Unknown Error": "igd-unreachable",
    "Miniupnpc Invalid Arguments": "invalid-args",
}
# errors that mean "the IGD is gone or broken": start over with discovery
_TRANSPORT_CODES = frozenset({"igd-unreachable", "no-igd"})

# external addresses that are not worth advertising (the IGD is itself behind another NAT)
_NON_PUBLIC = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
    )
)


class UpnpError(Exception):
    """A UPnP/miniupnpc failure: ``code`` is a short stable token, ``message`` the IGD's or miniupnpc's text."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _error_from(exc: Exception, default: str = "upnp-error") -> UpnpError:
    text = str(exc).strip() or type(exc).__name__
    return UpnpError(_UPNP_ERRORS.get(text, default), text[:200])


DESCRIPTION_S = 3.0  # for fetching an answering IGD's description (after the SSDP search)


@dataclass(frozen=True)
class UpnpSettings:
    enabled: bool = True
    lease_s: int = 3600
    renew_fraction: float = 0.5
    discover_timeout_ms: int = 2000
    description: str = "clawnode"
    retry_interval_s: float = 60.0  # longest wait between discovery attempts while there is no IGD
    retry_initial_s: float = 5.0  # first wait; doubles up to ``retry_interval_s``
    poll_s: float = 30.0  # how often the listen ports are re-read when no renewal is due sooner
    shutdown_timeout_s: float = 5.0  # bound on deleting the mappings on shutdown
    port_attempts: int = 4  # external ports tried per mapping (the internal port first)

    def __post_init__(self) -> None:
        if self.lease_s < 0:
            raise ValueError("lease_s must be >= 0 (0 = permanent)")
        if not 0.05 <= self.renew_fraction <= 0.95:
            raise ValueError("renew_fraction must be within 0.05..0.95")
        if self.discover_timeout_ms < 1500:
            raise ValueError("discover_timeout_ms must be >= 1500 (SSDP waits 1 s, then the IGD is queried)")
        if self.retry_initial_s <= 0 or self.retry_interval_s < self.retry_initial_s:
            raise ValueError("need 0 < retry_initial_s <= retry_interval_s")
        if self.port_attempts < 1:
            raise ValueError("port_attempts must be >= 1")


# ---------------------------------------------------------------------------------------------
# blocking side


class PortMapper:
    """Blocking miniupnpc client bound to one IGD (after ``discover``). Not thread-safe: serialize calls."""

    def __init__(self, *, discover_timeout_ms: int = 2000, description: str = "clawnode") -> None:
        import miniupnpc  # type: ignore[import-not-found,import-untyped,unused-ignore]

        self._upnp: Any = miniupnpc.UPnP()
        # SSDP wait per search type; miniupnpc waits at least 1 s and, when nothing answers, repeats it
        # for several device types (about 4 s in all), so callers bound ``discover`` themselves.
        self._upnp.discoverdelay = max(1000, int(discover_timeout_ms) // 2)
        self.description = description
        self.lan_ip: str | None = None
        self._same_port_only = False
        self._permanent_only = False

    def discover(self) -> str:
        """Find an IGD by SSDP and select it; returns the LAN address that routes to it."""
        self.search()
        return self.select()

    def search(self) -> None:
        """The SSDP search alone (``UpnpError`` no-igd when no device answered)."""
        try:
            found = self._upnp.discover()
        except Exception as exc:  # noqa: BLE001 - miniupnpc raises bare Exception (also when nothing answered)
            raise UpnpError("no-igd", (str(exc) or "SSDP search failed")[:200]) from None
        if not found:
            raise UpnpError("no-igd", "no UPnP device answered the SSDP search")

    def select(self) -> str:
        """After ``search``: fetch the answering devices' descriptions, select the IGD; its LAN address."""
        try:
            self._upnp.selectigd()
        except Exception as exc:  # noqa: BLE001
            raise UpnpError("no-igd", (str(exc) or "no valid IGD")[:200]) from None
        lan = str(self._upnp.lanaddr or "")
        try:
            ipaddress.IPv4Address(lan)
        except ValueError:
            raise UpnpError("no-lan-address", "the IGD gave no usable LAN address") from None
        self.lan_ip = lan
        return lan

    def external_ip(self) -> str:
        try:
            value = str(self._upnp.externalipaddress() or "")
        except Exception as exc:  # noqa: BLE001
            raise _error_from(exc, "igd-unreachable") from None
        try:
            addr = ipaddress.IPv4Address(value)
        except ValueError:
            raise UpnpError("no-external-ip", "the IGD reports no external address") from None
        if addr.is_unspecified:
            raise UpnpError("no-external-ip", "the IGD reports no external address")
        return value

    def _add(self, proto: Proto, external_port: int, internal_port: int, lease_s: int) -> None:
        assert self.lan_ip is not None, "discover() first"
        lease = 0 if self._permanent_only else int(lease_s)
        try:
            ok = self._upnp.addportmapping(
                external_port, proto, self.lan_ip, internal_port, self.description, "", lease
            )
        except Exception as exc:  # noqa: BLE001
            err = _error_from(exc, "mapping-failed")
            if err.code == "permanent-only" and lease:
                self._permanent_only = True
                return self._add(proto, external_port, internal_port, 0)
            raise err from None
        if not ok:
            raise UpnpError("mapping-failed", "AddPortMapping returned false")
        return None

    def map(
        self, proto: Proto, internal_port: int, lease_s: int, *, preferred: int | None = None, attempts: int = 4
    ) -> int:
        """Map ``proto`` ``internal_port`` on the IGD; returns the external port.

        Tries ``preferred`` (default: the internal port) first, then random high ports on conflicts.
        """
        first = preferred or internal_port
        candidates = [first]
        if not self._same_port_only:
            while len(candidates) < max(1, attempts):
                port = random.randint(20000, 65000)
                if port not in candidates:
                    candidates.append(port)
        last: UpnpError | None = None
        for external in candidates:
            try:
                self._add(proto, external, internal_port, lease_s)
                return external
            except UpnpError as err:
                last = err
                if err.code == "same-port-required" and external != internal_port:
                    self._same_port_only = True
                    try:
                        self._add(proto, internal_port, internal_port, lease_s)
                        return internal_port
                    except UpnpError as err2:
                        raise err2 from None
                if err.code != "conflict":
                    raise
        assert last is not None
        raise last

    def refresh(self, proto: Proto, external_port: int, internal_port: int, lease_s: int) -> None:
        """Extend a mapping's lease (AddPortMapping again with the same values)."""
        self._add(proto, external_port, internal_port, lease_s)

    def delete(self, proto: Proto, external_port: int) -> None:
        try:
            self._upnp.deleteportmapping(external_port, proto)
        except Exception as exc:  # noqa: BLE001
            raise _error_from(exc, "delete-failed") from None

    def lookup(self, proto: Proto, external_port: int) -> tuple[str, int] | None:
        """(internal ip, internal port) the IGD has for ``external_port``, or ``None``."""
        try:
            entry = self._upnp.getspecificportmapping(external_port, proto)
        except Exception as exc:  # noqa: BLE001
            raise _error_from(exc, "lookup-failed") from None
        if not entry:
            return None
        return str(entry[0]), int(entry[1])


# ---------------------------------------------------------------------------------------------
# trio side


@dataclass
class Mapping:
    proto: Proto
    internal_port: int
    external_port: int
    expires_at: float  # wall clock (time.time()); 0 for a permanent lease
    renew_at: float  # trio clock
    renewals: int = 0
    made_at: float = field(default_factory=time.time)  # wall clock: when the IGD first granted it

    def as_dict(self) -> dict[str, Any]:
        return {
            "proto": self.proto,
            "internal_port": self.internal_port,
            "external_port": self.external_port,
            "expires_at": self.expires_at,
            "renewals": self.renewals,
        }


@dataclass
class _Status:
    state: State = "searching"
    external_ip: str | None = None
    lan_ip: str | None = None
    last_error: str | None = None
    mappings: dict[tuple[Proto, int], Mapping] = field(default_factory=dict)


class UpnpService:
    """Keeps UPnP mappings for the node's TCP listen ports (TCP + UDP each) while ``run`` runs.

    ``ports`` returns the internal TCP ports to map (re-read at every renewal/poll); the internal address
    is the LAN address miniupnpc used to reach the IGD, unless ``lan_ip`` is given. ``on_change`` gets
    the new ``external_addrs()`` each time they change (also ``[]`` on shutdown). ``outside`` tells
    what AutoNAT saw of us, so that a double NAT is told (``double_nat()``, ``summary()``).
    """

    def __init__(
        self,
        settings: UpnpSettings,
        ports: Callable[[], Iterable[int]],
        *,
        on_change: Callable[[list[str]], None] | None = None,
        quic_ports: Callable[[], Iterable[int]] = tuple,
        lan_ip: str | None = None,
        mapper_factory: Callable[[UpnpSettings], PortMapper] | None = None,
        outside: Callable[[], OutsideView] | None = None,
    ) -> None:
        self.settings = settings
        self._ports = ports
        self._quic_ports = quic_ports  # listen ports that also carry QUIC: their UDP mapping is advertised
        self._on_change = on_change
        self._outside = outside  # what AutoNAT saw of us: for telling a double NAT
        self._lan_override = lan_ip
        self._factory = mapper_factory or (
            lambda s: PortMapper(discover_timeout_ms=s.discover_timeout_ms, description=s.description)
        )
        self._limiter = trio.CapacityLimiter(1)
        self._mapper: PortMapper | None = None
        self._st = _Status(state="searching" if settings.enabled else "disabled")
        self._last_addrs: list[str] = []

    # -- public read side ----------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._st.state

    def _live(self) -> list[Mapping]:
        now = time.time()
        return [m for m in self._st.mappings.values() if m.expires_at == 0 or m.expires_at > now]

    def double_nat(self) -> DoubleNat:
        """Whether the IGD is itself behind another NAT (``nat.double_nat``), from what it reports
        and what AutoNAT saw (``outside``)."""
        ext = self._st.external_ip
        live = self._live() if ext else []
        mapped = tuple((f"/ip4/{ext}/tcp/{m.external_port}", m.made_at) for m in live if m.proto == "TCP")
        try:
            outside = self._outside() if self._outside is not None else OutsideView()
        except Exception:  # noqa: BLE001 - judged on the IGD's word alone
            outside = OutsideView()
        return judge_double_nat(DoubleNatFacts(igd_external_ip=ext, mapped=mapped, outside=outside))

    def external_addrs(self) -> list[str]:
        """``/ip4/<external ip>/tcp/<external port>`` for each live TCP mapping, and
        ``/ip4/<external ip>/udp/<external port>/quic-v1`` for each UDP mapping of a QUIC listen port;
        none while the IGD's external address is not ours to the world (double NAT)."""
        ext = self._st.external_ip
        if ext is None or _non_public(ext) or not self.double_nat().offer_mapping:
            return []
        try:
            quic = {int(port) for port in self._quic_ports()}
        except Exception:  # noqa: BLE001 - the TCP mappings still count
            quic = set()
        live = self._live()
        tcp = sorted(f"/ip4/{ext}/tcp/{m.external_port}" for m in live if m.proto == "TCP")
        udp = sorted(
            f"/ip4/{ext}/udp/{m.external_port}/quic-v1" for m in live if m.proto == "UDP" and m.internal_port in quic
        )
        return tcp + udp

    def summary(self) -> dict[str, Any]:
        st = self._st
        double = self.double_nat()
        return {
            "state": st.state,
            "external_ip": st.external_ip,
            "double_nat": double.detected,
            "double_nat_reason": double.reason,
            "internal_ip": st.lan_ip,
            "lease_s": self.settings.lease_s,
            "mappings": [m.as_dict() for _, m in sorted(st.mappings.items())],
            "last_error": st.last_error,
        }

    # -- run ------------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``started`` is signalled at once (discovery happens in the background)."""
        if not self.settings.enabled:
            self._st.state = "disabled"
            task_status.started()
            return
        task_status.started()
        backoff = self.settings.retry_initial_s
        try:
            while True:
                if self._mapper is None:
                    self._st.state = "searching"
                    try:
                        await self._discover()
                    except UpnpError as err:
                        self._st.state = "no-igd" if err.code == "no-igd" else "failed"
                        self._st.last_error = err.code
                        first = backoff == self.settings.retry_initial_s  # said once, then quietly
                        (log.info if first else log.debug)(
                            "upnp: %s (%s); retrying in %.0f s", err.code, err.message, backoff
                        )
                        await trio.sleep(backoff)
                        backoff = min(backoff * 2, self.settings.retry_interval_s)
                        continue
                try:
                    await self._sync()
                except UpnpError as err:
                    # the IGD went away: forget it and its mappings, search again
                    log.info("upnp: lost the IGD (%s: %s)", err.code, err.message)
                    self._st.last_error = err.code
                    self._forget_igd()
                    self._st.state = "searching"
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, self.settings.retry_interval_s)
                    continue
                backoff = self.settings.retry_initial_s
                await trio.sleep_until(self._next_wakeup())
        finally:
            with trio.move_on_after(self.settings.shutdown_timeout_s) as scope:
                scope.shield = True
                await self._remove_all()

    # -- internals ------------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., _T], *args: Any, abandon: bool = False) -> _T:
        """Run ``fn`` in a worker thread, one miniupnpc call at a time.

        A call that is not ``abandon``-able cannot be interrupted anyway, so it is shielded: its result
        (e.g. a mapping just made) reaches the caller, and a pending cancel lands at the next checkpoint,
        after the mapping is recorded and can be deleted on shutdown.
        """
        with trio.CancelScope(shield=not abandon):
            return await trio.to_thread.run_sync(  # type: ignore[call-arg]  # stale trio-stubs
                fn, *args, limiter=self._limiter, abandon_on_cancel=abandon
            )

    async def _discover(self) -> None:
        mapper = self._factory(self.settings)
        # Bound the whole search (SSDP + IGD description); a search that runs over is abandoned to its
        # thread (it still holds the limiter until it ends, so miniupnpc calls never overlap).
        # The SSDP search within discover_timeout_ms; once a device answered, fetching its description
        # gets DESCRIPTION_S of its own: with both within 2 s, a node starting on a loaded box (load
        # 15-18) missed its router's IGD at the first search and mapped 5-40 s later (the backoff).
        lan: str | None = None
        with trio.move_on_after(self.settings.discover_timeout_ms / 1000) as searching:
            await self._call(mapper.search, abandon=True)
        if not searching.cancelled_caught:
            with trio.move_on_after(DESCRIPTION_S):
                lan = await self._call(mapper.select, abandon=True)
        if lan is None:
            raise UpnpError("no-igd", f"no IGD answered within {self.settings.discover_timeout_ms} ms")
        if self._lan_override:
            mapper.lan_ip = self._lan_override
            lan = self._lan_override
        ext = await self._call(mapper.external_ip)
        self._mapper = mapper
        self._st.lan_ip = lan
        self._st.external_ip = ext
        self._st.last_error = None
        log.info("upnp: IGD found, external address %s", ext)

    def _forget_igd(self) -> None:
        self._mapper = None
        self._st.mappings.clear()
        self._st.external_ip = None
        self._notify()

    def _wanted(self) -> list[int]:
        try:
            ports = {int(p) for p in self._ports()}
        except Exception:
            log.exception("upnp: listen-port callback failed")
            return sorted(k[1] for k in self._st.mappings)
        return sorted(p for p in ports if 0 < p < 65536)

    def _lease_times(self) -> tuple[float, float]:
        lease = self.settings.lease_s
        now_trio = trio.current_time()
        if lease == 0:
            return 0.0, now_trio + self.settings.poll_s * 10
        return time.time() + lease, now_trio + lease * self.settings.renew_fraction

    async def _sync(self) -> None:
        mapper = self._mapper
        assert mapper is not None
        wanted = self._wanted()
        st = self._st
        # unmap ports no longer listened on
        for key in [k for k in st.mappings if k[1] not in wanted]:
            gone = st.mappings.pop(key)
            try:
                await self._call(mapper.delete, gone.proto, gone.external_port)
            except UpnpError as err:
                if err.code in _TRANSPORT_CODES:
                    raise
        ext = await self._call(mapper.external_ip)
        if ext != st.external_ip:
            st.external_ip = ext
        lease = self.settings.lease_s
        failures: list[str] = []
        for port in wanted:
            for proto in PROTOS:
                key = (proto, port)
                m: Mapping | None = st.mappings.get(key)
                now = trio.current_time()
                if m is not None and now < m.renew_at:
                    continue
                if m is not None:
                    try:
                        await self._call(mapper.refresh, proto, m.external_port, port, lease)
                        m.expires_at, m.renew_at = self._lease_times()
                        m.renewals += 1
                        continue
                    except UpnpError as err:
                        if err.code in _TRANSPORT_CODES:
                            raise
                        st.mappings.pop(key, None)  # lost it (e.g. conflict after expiry): map afresh
                preferred = port
                tcp = st.mappings.get(("TCP", port))
                if proto == "UDP" and tcp is not None:
                    preferred = tcp.external_port
                try:
                    external = await self._call(
                        functools.partial(
                            mapper.map, proto, port, lease, preferred=preferred, attempts=self.settings.port_attempts
                        )
                    )
                except UpnpError as err:
                    if err.code in _TRANSPORT_CODES:
                        raise
                    failures.append(err.code)
                    continue
                expires_at, renew_at = self._lease_times()
                st.mappings[key] = Mapping(proto, port, external, expires_at, renew_at)
        if failures:
            st.last_error = failures[-1]
        # "mapped": the IGD holds our mappings (or there is nothing to map yet); "failed": none could be made
        state: State = "failed" if wanted and not st.mappings else "mapped"
        if state == "failed" and st.state != "failed":
            log.info("upnp: the IGD made no mapping (%s)", st.last_error)
        st.state = state
        self._notify()

    def _next_wakeup(self) -> float:
        now = trio.current_time()
        deadline = now + self.settings.poll_s
        for m in self._st.mappings.values():
            deadline = min(deadline, m.renew_at)
        return max(deadline, now + 0.05)

    async def _remove_all(self) -> None:
        mapper = self._mapper
        mappings = list(self._st.mappings.values())
        self._st.mappings.clear()
        if mapper is not None:
            for m in mappings:
                try:
                    await self._call(mapper.delete, m.proto, m.external_port, abandon=True)
                except UpnpError as err:
                    log.info("upnp: could not delete %s %d (%s)", m.proto, m.external_port, err.code)
        self._notify()

    def _notify(self) -> None:
        addrs = self.external_addrs()
        if addrs == self._last_addrs:
            return
        self._last_addrs = addrs
        if self._on_change is not None:
            try:
                self._on_change(list(addrs))
            except Exception:
                log.exception("upnp: on_change callback failed")


def _non_public(addr: str) -> bool:
    ip = ipaddress.IPv4Address(addr)
    return any(ip in net for net in _NON_PUBLIC)
