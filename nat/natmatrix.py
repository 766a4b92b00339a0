"""The NAT matrix: real ``clawnode start`` daemons in the namespace harness, AutoNAT verdicts checked.

One topology (``nat.harness``) with one router ``r1``: the relay host runs a bootstrap/relay
daemon, the four helpers run public nodes that serve AutoNAT (``nat.autonat_serve = "always"``),
and for every case a fresh home node (new data dir, so a new peer id and no server rate limit)
starts behind ``r1`` after the router got the case's NAT type. Recorded per case: the home node's
verdict and the time from its start to that verdict, each helper's verdict, and every TCP
connection the helpers opened (an nftables set in each helper's namespace), so a run can check that
AutoNAT servers only ever dialed the router's public address. A ``+port-forward`` case adds a DNAT
of the home node's listen port on the router (``add_port_forward``): then the node is ``public``.

Hole punching, relayed connections and UPnP are not measured yet (being built elsewhere): their
fields in ``Result`` stay ``None`` and ``measured`` lists what was.

Linux only, needs root, ``ip`` and ``nft``. Blocking; from trio use ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from nat.harness.netns import (
    HELPER_IPS,
    RELAY_IP,
    HarnessError,
    Host,
    NatType,
    Topology,
    exec_in,
    missing_requirements,
)
from node.datadir import ensure_data_dir, load_or_create_identity

LISTEN_PORT = 4021
PORT_FORWARD = "port-forward"  # a case label: port-restricted NAT + DNAT of the listen port
NOT_MEASURED = "not measured yet: hole punching (DCUtR), relay and UPnP are being built elsewhere"
ALL_CASES: tuple[str, ...] = (*(t.value for t in NatType), PORT_FORWARD)

_VERDICT_RE = re.compile(r"reachability: (public|private|unknown) \((.*)\)\s*$")
_STAMP_FMT = "%Y-%m-%d %H:%M:%S,%f"
_STAMP_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")

Verdict = Literal["public", "private", "unknown"]


class HelperResult(BaseModel):
    name: str
    ip: str
    verdict: Verdict
    reason: str = ""
    seconds_to_verdict: float | None = None  # since the helpers started (they run for the whole matrix)


class Result(BaseModel):
    """One case of the matrix (one NAT type, one repetition)."""

    case: str  # a NatType value, or "port-forward"
    nat_type: str  # the router's NAT type
    port_forward: bool
    repetition: int
    router_public_ip: str
    home_verdict: Verdict
    home_reason: str = ""
    home_expected: Verdict
    seconds_to_verdict: float | None = None  # home node start -> first conclusive verdict
    helpers: list[HelperResult] = Field(default_factory=list)
    # TCP connections (ip:port) opened from the relay's and the helpers' namespaces while this case
    # ran, other than among themselves: AutoNAT dial-backs and any other dial towards the home node.
    # A dial to an unroutable (private) address fails in the route lookup and sends no packet, so it
    # is not seen here; the servers' refusal of private addresses is covered by tests/test_autonat.py.
    helper_dials: list[str] = Field(default_factory=list)
    dials_only_router_ip: bool = True
    ok: bool = False
    error: str = ""
    # --- not measured yet (features being built elsewhere); None means "not measured", not "failed"
    hole_punch: bool | None = Field(None, description=NOT_MEASURED)
    relay: bool | None = Field(None, description=NOT_MEASURED)
    upnp: bool | None = Field(None, description=NOT_MEASURED)
    measured: list[str] = Field(default_factory=lambda: ["autonat"])
    not_measured_note: str = NOT_MEASURED


class MatrixError(RuntimeError):
    """Raised when the matrix cannot run here; ``code`` is stable (``E_UNAVAILABLE``)."""

    def __init__(self, message: str, code: str = "E_UNAVAILABLE") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def requirements_problem() -> str | None:
    """Why the matrix cannot run here (``None`` when it can)."""
    if sys.platform != "linux":
        return "Linux network namespaces only"
    return missing_requirements()


# ---------------------------------------------------------------------------------------------
# nftables helpers


def add_port_forward(topology: Topology, router: str, host: Host, port: int) -> None:
    """DNAT ``router``'s WAN ``port`` (TCP) to ``host``: a manual port forward on a home router.

    Added to the router's ``clawnat`` table (``set_nat`` removes it again): an accept for new
    inbound flows to the port, inserted before the prefilter's drop, and a dnat in ``nat_pre``.
    """
    r = topology.router(router)
    ipaddress.ip_address(host.ip)
    if not 1 <= port <= 65535:
        raise ValueError("port must be within 1..65535")
    rules = (
        f'insert rule ip clawnat prefilter iifname "{r.wan_if}" ct state new tcp dport {port} accept\n'
        f'add rule ip clawnat nat_pre iifname "{r.wan_if}" tcp dport {port} dnat ip to {host.ip}:{port}\n'
    )
    exec_in(r.ns, ["nft", "-f", "-"], input=rules)


_WATCH = """\
table ip clawwatch {
    set dialed {
        type ipv4_addr . inet_service
        flags dynamic
    }
    chain out {
        type filter hook output priority 0; policy accept;
        tcp flags & (syn | ack) == syn add @dialed { ip daddr . tcp dport }
    }
}
"""


def watch_dials(ns: str) -> None:
    """Record every TCP connection opened from ``ns`` (destination ip:port) in ``clawwatch``."""
    exec_in(ns, ["nft", "-f", "-"], input="table ip clawwatch\ndelete table ip clawwatch\n" + _WATCH)


def dialed(ns: str, *, flush: bool = False) -> list[str]:
    """The ``ip:port`` destinations recorded by ``watch_dials`` (optionally emptied afterwards)."""
    out = exec_in(ns, ["nft", "-j", "list", "set", "ip", "clawwatch", "dialed"]).stdout
    found: list[str] = []
    for item in json.loads(out).get("nftables", []):
        for elem in item.get("set", {}).get("elem", []) or []:
            value = elem.get("elem", {}).get("val", elem) if isinstance(elem, dict) else elem
            concat = value.get("concat") if isinstance(value, dict) else None
            if concat and len(concat) == 2:
                found.append(f"{concat[0]}:{concat[1]}")
    if flush:
        exec_in(ns, ["nft", "flush", "set", "ip", "clawwatch", "dialed"])
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# daemons


@dataclass
class Daemon:
    name: str
    ns: str
    ip: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[Any]
    started_wall: float  # time.time() at start

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def verdict(self) -> tuple[Verdict, str, float | None]:
        """The latest conclusive verdict in the log (else ``unknown``), its reason, and the seconds
        from the daemon's start to its first conclusive verdict (from the log lines' timestamps)."""
        found: tuple[Verdict, str, float | None] = ("unknown", "", None)
        first: float | None = None
        for line in self.log_text().splitlines():
            match = _VERDICT_RE.search(line)
            if not match or match.group(1) == "unknown":
                continue
            if first is None:
                stamp = _STAMP_RE.match(line)
                at = (
                    time.time()
                    if stamp is None
                    else datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                )
                first = max(0.0, at - self.started_wall)
            found = ("public" if match.group(1) == "public" else "private", match.group(2), first)
        return found

    def running_file(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.data_dir / "node.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None

    def status(self) -> dict[str, Any]:
        """``clawnode status --json`` run inside the daemon's namespace (its API is on 127.0.0.1 there)."""
        out = exec_in(
            self.ns,
            [sys.executable, "-m", "node.cli", "status", "--json", "--data-dir", str(self.data_dir)],
            timeout=20,
        ).stdout
        return dict(json.loads(out))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def make_identity(data_dir: Path) -> str:
    """Create the data dir and its identity key now; returns the peer id the daemon will have."""
    from libp2p.peer.id import ID

    key_pair, _ = load_or_create_identity(ensure_data_dir(data_dir))
    return str(ID.from_pubkey(key_pair.public_key))


def start_daemon(
    topology: Topology,
    host: Host,
    *,
    name: str,
    root: Path,
    role: str,
    bootstrap: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Daemon:
    data_dir = ensure_data_dir(root / name)
    log_path = root / f"{name}.log"
    environment = {
        **os.environ,
        "CLAWNODE_ESCROW_MODE": "off",
        "CLAWNODE_BOOTSTRAP_USE_DEFAULTS": "false",
        "CLAWNODE_LOG_LEVEL": "info",
        **(env or {}),
    }
    environment.pop("CLAWNODE_DATA_DIR", None)
    argv = [
        sys.executable,
        "-m",
        "node.cli",
        "start",
        "--data-dir",
        str(data_dir),
        "--listen",
        f"/ip4/{host.ip}/tcp/{LISTEN_PORT}",
        "--api-port",
        "0",
        "--role",
        role,
    ]
    for addr in bootstrap:
        argv += ["--bootstrap", addr]
    with log_path.open("wb") as log:
        proc = topology.run_in(host.ns, argv, env=environment, stdout=log, stderr=subprocess.STDOUT)
    return Daemon(name, host.ns, host.ip, data_dir, log_path, proc, time.time())


def wait_for(what: str, predicate: Callable[[], bool], timeout: float, daemons: Sequence[Daemon] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for daemon in daemons:
            if daemon.proc.poll() is not None:
                tail = daemon.log_text()[-1500:]
                raise HarnessError(f"{daemon.name} exited ({daemon.proc.returncode}) while waiting for {what}:\n{tail}")
        time.sleep(0.25)
    raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---------------------------------------------------------------------------------------------
# the matrix


def _cases(types: Sequence[str]) -> list[tuple[str, NatType, bool]]:
    cases = []
    for label in types:
        if label == PORT_FORWARD:
            cases.append((label, NatType.PORT_RESTRICTED, True))
        else:
            cases.append((label, NatType(label), False))
    return cases


def run_matrix(
    types: Sequence[str] = ALL_CASES,
    repetitions: int = 1,
    *,
    verdict_timeout_s: float = 60.0,
    keep_logs: Path | None = None,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run every case ``repetitions`` times; returns one ``Result`` per case and repetition.

    ``types``: NatType values and/or ``"port-forward"``. Raises ``MatrixError`` where the harness
    cannot run (not Linux, not root, no ``ip``/``nft``). Everything (namespaces, daemons) is
    removed on return, also on error.
    """
    problem = requirements_problem()
    if problem is not None:
        raise MatrixError(f"the NAT matrix needs Linux and root: {problem}")
    if repetitions < 1:
        raise ValueError("repetitions must be >= 1")
    cases = _cases(types)
    results: list[Result] = []
    root = Path(tempfile.mkdtemp(prefix="clawnode-natmatrix-"))
    try:
        with Topology({"r1": cases[0][1] if cases else NatType.PORT_RESTRICTED}) as topo:
            # Identities made up front, so every public daemon can start at once with all the
            # others as bootstrap peers (an AutoNAT client needs >= 3 connected servers).
            public_hosts = [topo.relay, *topo.helpers]
            addrs = {
                host.name: f"/ip4/{host.ip}/tcp/{LISTEN_PORT}/p2p/{make_identity(root / host.name)}"
                for host in public_hosts
            }
            boot = list(addrs.values())
            relay = start_daemon(
                topo,
                topo.relay,
                name="relay",
                root=root,
                role="relay",
                bootstrap=[a for n, a in addrs.items() if n != "relay"],
            )
            helpers = [
                start_daemon(
                    topo,
                    host,
                    name=host.name,
                    root=root,
                    role="node",
                    bootstrap=[a for n, a in addrs.items() if n != host.name],
                    env={"CLAWNODE_NAT_AUTONAT_SERVE": "always"},
                )
                for host in topo.helpers
            ]
            every = [relay, *helpers]
            for daemon in every:
                watch_dials(daemon.ns)
            wait_for(
                "the helpers' verdicts",
                lambda: all(h.verdict()[0] != "unknown" for h in helpers),
                verdict_timeout_s,
                every,
            )
            for rep in range(repetitions):
                for label, nat, forward in cases:
                    result = _run_case(topo, root, boot, helpers, every, label, nat, forward, rep, verdict_timeout_s)
                    results.append(result)
                    if progress is not None:
                        progress(result)
    finally:
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for log in root.glob("*.log"):
                shutil.copy(log, keep_logs / log.name)
        shutil.rmtree(root, ignore_errors=True)
    return results


def _run_case(
    topo: Topology,
    root: Path,
    boot: list[str],
    helpers: list[Daemon],
    every: list[Daemon],
    label: str,
    nat: NatType,
    forward: bool,
    rep: int,
    timeout: float,
) -> Result:
    router = topo.router("r1")
    home_host = router.hosts[0]
    topo.set_nat("r1", nat)
    if forward:
        add_port_forward(topo, "r1", home_host, LISTEN_PORT)
    for server in every:
        dialed(server.ns, flush=True)
    result = Result(
        case=label,
        nat_type=nat.value,
        port_forward=forward,
        repetition=rep,
        router_public_ip=router.wan_ip,
        home_verdict="unknown",
        home_expected="public" if forward else "private",
    )
    home = start_daemon(topo, home_host, name=f"home-{label}-{rep}", root=root, role="node", bootstrap=boot)
    try:
        wait_for(f"the home node's verdict ({label})", lambda: home.verdict()[0] != "unknown", timeout, [*every, home])
    except HarnessError as error:
        result.error = str(error).splitlines()[0][:300]
    verdict, reason, seconds = home.verdict()
    result.home_verdict, result.home_reason = verdict, reason
    result.seconds_to_verdict = round(seconds, 2) if seconds is not None else None
    if verdict == "unknown" and home.proc.poll() is None:
        try:
            status = home.status()
            result.home_reason = str(status.get("reachability_reason", ""))
        except (HarnessError, ValueError, subprocess.TimeoutExpired):
            pass
    home.stop()
    public = {RELAY_IP, *HELPER_IPS}
    dials = sorted({d for server in every for d in dialed(server.ns) if d.rsplit(":", 1)[0] not in public})
    result.helper_dials = dials
    result.dials_only_router_ip = all(d.rsplit(":", 1)[0] == router.wan_ip for d in dials)
    for helper in helpers:
        h_verdict, h_reason, h_seconds = helper.verdict()
        result.helpers.append(
            HelperResult(
                name=helper.name,
                ip=helper.ip,
                verdict=h_verdict,
                reason=h_reason,
                seconds_to_verdict=round(h_seconds, 2) if h_seconds is not None else None,
            )
        )
    result.ok = (
        result.home_verdict == result.home_expected
        and all(h.verdict == "public" for h in result.helpers)
        and result.dials_only_router_ip
        and not result.error
    )
    return result


# ---------------------------------------------------------------------------------------------
# output


def render_table(results: Sequence[Result]) -> Any:
    """A rich ``Table`` of the results."""
    from rich.table import Table

    table = Table(title="clawnode NAT matrix (AutoNAT, real daemons in network namespaces)")
    for column in ("case", "rep", "home verdict", "expected", "time to verdict", "helpers", "dial-backs to"):
        table.add_column(column)
    table.add_column("hole punch / relay / UPnP", style="dim")
    table.add_column("ok")
    for r in results:
        helpers = ",".join(sorted({h.verdict for h in r.helpers})) or "-"
        targets = ", ".join(r.helper_dials) or "-"
        table.add_row(
            r.case,
            str(r.repetition + 1),
            r.home_verdict,
            r.home_expected,
            f"{r.seconds_to_verdict:.1f} s" if r.seconds_to_verdict is not None else "-",
            helpers,
            targets,
            "not measured yet",
            "yes" if r.ok else "NO" + (f" ({r.error})" if r.error else ""),
        )
    table.caption = NOT_MEASURED
    return table
