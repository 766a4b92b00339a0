"""AutoNAT v2's decisions, as pure functions over plain data (the service in ``nat.autonat_v2`` only
fetches the facts, asks these, and acts).

Server: :func:`admit` (rate limits, before anything is read beyond the request), :func:`choose_target`
(the one address it will dial, and whether the requester must first pay in dial data),
:func:`dial_data_size`. Client: :func:`accept_dial_data` (whether to pay what a server asks),
:func:`outcome_of` (what a server's answer says about the address), :func:`judge_addr`, and
:func:`server_result_of` (a v2 answer as the one-server result the node's reachability verdict,
``nat.autonat.judge``, counts beside v1 answers).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import multiaddr

from nat.addresses import dial_back_allowed, parse_ip, unmapped
from nat.autonat_v2_wire import DialResponse, DialStatus, ResponseStatus
from nat.reachability import ServerResult

# The spec: servers SHOULD ask for 30k to 100k bytes before dialing an IP other than the observed one.
DIAL_DATA_MIN = 30_000
DIAL_DATA_MAX = 100_000


@dataclass(frozen=True)
class Refused:
    status: ResponseStatus  # REQUEST_REJECTED or DIAL_REFUSED
    reason: str  # a stable token: rate_limited, busy, no_dialable_address, ...


@dataclass(frozen=True)
class Target:
    index: int  # into the request's address list
    addr: str  # ``/ip4|ip6/<ip>/tcp/<port>``, what is dialed
    needs_dial_data: bool  # its IP is not the one the request came from


def admit(
    peer: str,
    now: float,
    *,
    last_by_peer: Mapping[str, float],
    recent: Sequence[float],
    running: int,
    peer_interval_s: float,
    max_per_minute: int,
    max_running: int,
) -> Refused | None:
    """Whether to serve a request now: at most ``max_running`` at once, ``max_per_minute`` in any
    minute (``recent``: when the served ones started) and one per peer per ``peer_interval_s``."""
    if running >= max_running:
        return Refused(ResponseStatus.REQUEST_REJECTED, "busy")
    if sum(1 for at in recent if now - at < 60.0) >= max_per_minute:
        return Refused(ResponseStatus.REQUEST_REJECTED, "rate_limited")
    last = last_by_peer.get(peer)
    if last is not None and now - last < peer_interval_s:
        return Refused(ResponseStatus.REQUEST_REJECTED, "peer_rate_limited")
    return None


def _tcp_target(raw: bytes, requester: str) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """``/ip4|ip6/<ip>/tcp/<port>`` (an optional trailing ``/p2p/<requester>``) and its IP, else None."""
    try:
        text = str(multiaddr.Multiaddr(raw))
    except Exception:  # noqa: BLE001 - undecodable bytes are simply not dialable
        return None
    base, _, peer = text.partition("/p2p/")
    if peer and peer != requester:
        return None  # names someone else: never dialed
    parts = base.split("/")
    if len(parts) != 5 or parts[0] != "" or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    try:
        ip = ipaddress.ip_address(parts[2])
        port = int(parts[4])
    except ValueError:
        return None
    if not 0 < port < 65536 or (parts[1] == "ip4") != (ip.version == 4):
        return None
    return base, ip


def choose_target(
    addrs: Sequence[bytes],
    *,
    requester: str,
    observed_ip: str,
    families: frozenset[int],
    allow_private: bool,
    max_addrs: int,
) -> Target | Refused:
    """The first of the first ``max_addrs`` addresses this server is willing to dial (the spec: it
    dials exactly one): TCP, an IP family it has (``families``: 4, 6), not private unless
    ``allow_private`` (tests, LANs; even then no loopback unless the requester is on loopback, no
    link-local but its own: ``nat.addresses.dial_back_allowed``), and no ``/p2p/`` of another peer. Its IP differs from
    ``observed_ip``, the one the request came from: the requester pays in dial data first."""
    observed = parse_ip(observed_ip)  # a dual-stack listener sees an IPv4 peer as ::ffff:a.b.c.d
    if observed is None:
        return Refused(ResponseStatus.DIAL_REFUSED, "no_observed_address")
    for index, raw in enumerate(addrs[:max_addrs]):
        found = _tcp_target(raw, requester)
        if found is None:
            continue
        base, ip = found
        if ip.version not in families:
            continue
        if not dial_back_allowed(str(ip), observed_ip, allow_private=allow_private):
            continue
        return Target(index, base, needs_dial_data=unmapped(ip) != observed)
    return Refused(ResponseStatus.DIAL_REFUSED, "no_dialable_address")


def dial_data_size(draw: float) -> int:
    """What to ask for before dialing another IP, from a uniform ``draw`` in [0, 1): 30k to 100k bytes."""
    return DIAL_DATA_MIN + int(min(max(draw, 0.0), 1.0) * (DIAL_DATA_MAX - DIAL_DATA_MIN))


def accept_dial_data(addr_idx: int, num_bytes: int, *, asked: int, max_bytes: int) -> bool:
    """Whether a client pays what a server asks: an address it asked about, at most ``max_bytes``."""
    return 0 <= addr_idx < asked and 0 < num_bytes <= max_bytes


Outcome = Literal["reachable", "unreachable", "inconclusive", "rejected", "refused", "invalid"]


def outcome_of(response: DialResponse, *, asked: int, nonce_seen: bool) -> tuple[Outcome, int | None]:
    """What a server's DialResponse says, and about which address (its index), for a client.

    ``reachable`` only when the dial-back with our nonce did arrive (the spec: the client MUST check
    it; a server that says OK without it is lying or mistaken: ``invalid``); ``unreachable`` on
    E_DIAL_ERROR; ``inconclusive`` on E_DIAL_BACK_ERROR; statuses not in the spec: ``invalid``.
    """
    try:
        status = ResponseStatus(response.status)
    except ValueError:
        return "invalid", None
    if status == ResponseStatus.REQUEST_REJECTED:
        return "rejected", None
    if status == ResponseStatus.DIAL_REFUSED:
        return "refused", None
    if status != ResponseStatus.OK or not 0 <= response.addr_idx < asked:
        return "invalid", None
    index = response.addr_idx
    if response.dial_status == DialStatus.OK:
        return ("reachable", index) if nonce_seen else ("invalid", None)
    if response.dial_status == DialStatus.DIAL_ERROR:
        return "unreachable", index
    if response.dial_status == DialStatus.DIAL_BACK_ERROR:
        return "inconclusive", index
    return "invalid", None


AddrVerdict = Literal["reachable", "unreachable", "unknown"]


def judge_addr(outcomes: Mapping[str, Outcome], min_servers: int) -> AddrVerdict:
    """One address's verdict from the latest outcome per server (keyed by server IP, or peer id on
    loopback): ``min_servers`` that reached it, or that could not, decide; reached wins a tie."""
    reached = sum(1 for outcome in outcomes.values() if outcome == "reachable")
    missed = sum(1 for outcome in outcomes.values() if outcome == "unreachable")
    if reached >= min_servers:
        return "reachable"
    if missed >= min_servers:
        return "unreachable"
    return "unknown"


def server_result_of(
    server: str, ip: str, outcome: Outcome | Literal["declined", "error"], addr: str | None, at: float
) -> ServerResult:
    """A v2 server's answer as one server's result for the node's verdict (``nat.autonat.judge``):
    ``reachable`` (its dial-back brought our nonce) counts as a v1 ``ok`` on that address,
    ``unreachable`` (it could not connect) as a v1 ``dial_error`` on it, and everything else
    (rejected, refused, inconclusive, invalid, declined, no answer) as ``error``: no usable answer,
    asked again soon. A v2 server dials one address where a v1 server dials all asked about at
    our observed IP, so the same agreement rule (``min_servers`` distinct servers) decides."""
    detail = f"autonat v2: {outcome}"
    if outcome == "reachable" and addr is not None:
        return ServerResult(server, ip, "ok", detail, at, confirmed=(addr,), dialed=(addr,), at_observed_ip=False)
    if outcome == "unreachable" and addr is not None:
        return ServerResult(server, ip, "dial_error", detail, at, dialed=(addr,), at_observed_ip=False)
    return ServerResult(server, ip, "error", detail, at)
