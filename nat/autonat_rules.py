"""AutoNAT v1's server decision, as a pure function over plain data (``nat.autonat`` fetches the
request and the connection's observed IP, asks :func:`dial_back_targets`, and dials what it returns).

Only the requester's observed IP is ever dialed (no third party, so nobody can use a server to
amplify), and no private address unless the server allows them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from nat.addresses import dial_back_allowed, ip_of, parse_ip
from runtime.errors import ClawnodeError, ErrorCode


def dialable_tcp_addr(addr: str) -> str | None:
    """``/ip4|ip6/<ip>/tcp/<port>`` with any ``/p2p/…`` stripped, or None when it is anything else."""
    base = addr.split("/p2p/")[0]
    parts = base.split("/")
    if len(parts) != 5 or parts[0] != "" or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    try:
        ipaddress.ip_address(parts[2])
        port = int(parts[4])
    except ValueError:
        return None
    if not 0 < port < 65536:
        return None
    return base


def dial_back_targets(
    addrs: Sequence[str],
    ports: Sequence[int],
    observed_ip: str,
    *,
    max_addrs: int,
    allow_private: bool,
) -> tuple[list[str], dict[str, str]]:
    """The addresses a dial-back request may have dialed, and those refused (with why).

    Raises ``E_INVALID_ARGUMENT`` for a malformed or oversized request and ``E_FORBIDDEN`` when
    nothing may be dialed (no observed address, or every address refused).
    """
    if len(addrs) + len(ports) > max_addrs:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"at most {max_addrs} addresses per request")
    if not addrs and not ports:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "no address or port to dial back")
    # a dual-stack listener sees an IPv4 peer as ::ffff:a.b.c.d: judged (and dialed) as its IPv4 address
    observed = parse_ip(observed_ip) if observed_ip else None
    if observed is None:
        raise ClawnodeError(ErrorCode.FORBIDDEN, "no observed address for this connection")
    family = "ip4" if observed.version == 4 else "ip6"
    requested: list[str] = []
    for addr in addrs:
        base = dialable_tcp_addr(addr)
        if base is None:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "only /ip4|ip6/<ip>/tcp/<port> addresses")
        requested.append(base)
    requested.extend(f"/{family}/{observed}/tcp/{port}" for port in ports)
    targets: list[str] = []
    refused: dict[str, str] = {}
    for base in requested:
        ip = parse_ip(ip_of(base) or "")
        if ip is None or ip != observed:
            refused[base] = "not the requester's observed IP"
        elif not dial_back_allowed(str(ip), observed_ip, allow_private=allow_private):
            refused[base] = "a private address"
        elif base not in targets:
            targets.append(base)
    if not targets:
        reasons = sorted(set(refused.values()))
        raise ClawnodeError(ErrorCode.FORBIDDEN, "nothing to dial back: " + ", ".join(reasons))
    return targets, refused
