"""The node's reachability as measured by AutoNAT (``nat.autonat``), and why.

A small state object: the verdict (``public``, ``private`` or ``unknown``), one line saying how it
was determined ("autonat: 3/3 dial-backs"), when, and what each asked server answered. The
capability publisher declares ``effective(configured)``: the configured ``node.reachability`` when
an operator set one, else this measured verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from nat.addresses import Reachability

ServerOutcome = Literal["ok", "dial_error", "error"]


@dataclass(frozen=True)
class ServerResult:
    """What one AutoNAT server answered in the last check."""

    peer_id: str
    ip: str
    outcome: ServerOutcome  # ok: dialed us back (and we saw it); dial_error: could not; error: no usable answer
    detail: str = ""  # the dial-back identity, or the error code
    at: float = 0.0  # unix time of the answer
    confirmed: tuple[str, ...] = ()  # ok: the addresses it reached us on
    dialed: tuple[str, ...] = ()  # ok, dial_error: every address it dialed
    # Whether ``dialed`` is at the IP the server saw us come from (v1 dials nothing else); an AutoNAT
    # v2 server dials any one address we asked about (another IP once paid in dial data), so its
    # answers say nothing of our observed IP (``AutoNat.observed_ips``, the double-NAT rule).
    at_observed_ip: bool = True


@dataclass
class ReachabilityState:
    verdict: Reachability = "unknown"
    reason: str = "autonat: not checked yet"
    checked_at: float | None = None  # unix time of the last completed check
    servers: list[ServerResult] = field(default_factory=list)
    _listeners: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever the verdict changes, or the addresses AutoNAT confirmed while
        public do (``addrs_changed``): e.g. to republish the capability record."""
        self._listeners.append(listener)

    def addrs_changed(self) -> None:
        for listener in self._listeners:
            listener()

    def update(self, verdict: Reachability, reason: str, servers: list[ServerResult], checked_at: float) -> None:
        changed = verdict != self.verdict
        self.verdict, self.reason, self.servers, self.checked_at = verdict, reason, list(servers), checked_at
        if changed:
            for listener in self._listeners:
                listener()

    def effective(self, configured: Reachability) -> Reachability:
        """The configured value wins unless it is ``unknown`` (the default): then the measured one."""
        return configured if configured != "unknown" else self.verdict

    def explain(self, configured: Reachability) -> str:
        if configured != "unknown":
            return "configured (node.reachability)"
        return self.reason
