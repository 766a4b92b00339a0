"""The NAT matrix: real ``clawnode start`` daemons behind namespace NATs, connecting to each other.

One topology (``nat.harness``): the relay host runs a bootstrap/relay daemon, ``h4`` a second relay
(a private node keeps reservations on two), ``h1``..``h3`` public nodes that serve AutoNAT
(``nat.autonat_serve = "always"``). A case is a pair of home LANs, each behind its own router:
``A`` (behind NAT type ``nat_a``) asks ``B`` (behind ``nat_b``, serving one offer) for its
capability record with ``clawnode describe``; ``B``'s router optionally maps B's port by UPnP (a real
``miniupnpd`` in the router namespace) or by a manual port forward. Every case gets fresh data dirs
(new peer ids); the cases of one repetition run at once, each on its own two routers.

Recorded per case: both AutoNAT verdicts (and that the servers dialed only the routers' public
addresses), B's relay reservations, whether the record came back live from B (data exchanged, its
round trip, the time from the request), and how A ended up connected to B: ``direct`` (B is
reachable: UPnP or a port forward), ``hole-punch`` (relayed first, then DCUtR made a direct
connection; its duration), ``relay`` (the relayed connection only), or ``none``. ``expected_path``
is what the NAT types allow: a direct path exists unless one side maps each destination to a new
port (symmetric) while the other only lets back in the exact endpoint it sent to (port-restricted
or symmetric). Transport: TCP only (QUIC is not measured: py-libp2p's QUIC moves ~1.5 MiB/s).

Linux only, needs root, ``ip`` and ``nft`` (and ``miniupnpd`` for UPnP cases). Blocking; from trio
use ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
OFFER_TOML = '[[offers]]\nname = "model:nat-test"\nsummary = "NAT matrix probe"\nprice_per_unit = 1\n'

_VERDICT_RE = re.compile(r"reachability: (public|private|unknown) \((.*)\)\s*$")
_STAMP_FMT = "%Y-%m-%d %H:%M:%S,%f"
_STAMP_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")

Verdict = Literal["public", "private", "unknown"]
Mapping = Literal["none", "upnp", "port-forward"]
Path_ = Literal["direct", "hole-punch", "relay", "none"]
Transport = Literal["tcp", "quic"]
Listen = Literal["any", "lan"]  # home nodes listen on 0.0.0.0 (the shipped default) or on their LAN IP
MAX_CASES = 25

_RESTRICTIVE = {NatType.PORT_RESTRICTED, NatType.SYMMETRIC}


def direct_path_exists(nat_a: NatType, nat_b: NatType) -> bool:
    """Whether a hole punch can succeed between these NAT types (TCP, endpoint-independent or not).

    A symmetric NAT gives the punch a port nobody predicted; that works only if the other side
    accepts packets from any port of an address it contacted (full-cone, address-restricted).
    """
    if NatType.SYMMETRIC not in (nat_a, nat_b):
        return True
    other = nat_b if nat_a is NatType.SYMMETRIC else nat_a
    return other not in _RESTRICTIVE


class Case(BaseModel):
    nat_a: NatType
    nat_b: NatType
    mapping_b: Mapping = "none"
    transport: Transport = "tcp"  # quic: the home nodes (and the servers) listen on QUIC too
    listen: Listen = "any"  # any: node.listen's default 0.0.0.0; lan: the host's LAN IP

    @property
    def label(self) -> str:
        suffix = "" if self.mapping_b == "none" else f" +{self.mapping_b}"
        quic = " /quic" if self.transport == "quic" else ""
        lan = " @lan" if self.listen == "lan" else ""
        return f"{self.nat_a.value} x {self.nat_b.value}{suffix}{quic}{lan}"

    def expected_path(self) -> Path_:
        if self.mapping_b != "none":
            return "direct"
        return "hole-punch" if direct_path_exists(self.nat_a, self.nat_b) else "relay"


def parse_case(text: str) -> Case:
    """``"full-cone:symmetric"``, ``"port-restricted:port-restricted+upnp"``, ``"…/quic"``, ``"…@lan"``
    (home nodes listen on their LAN IP instead of 0.0.0.0) -> a ``Case``."""
    text, at, listen = text.partition("@")
    if at and listen != "lan":
        raise ValueError(f"bad case {text!r}: only @lan may follow a case")
    text, slash, transport = text.partition("/")
    body, _, mapping = text.partition("+")
    nat_a, sep, nat_b = body.partition(":")
    if not sep or (slash and transport not in ("tcp", "quic")):
        raise ValueError(f"bad case {text!r}: NAT_A:NAT_B[+upnp|+port-forward][/quic]")
    return Case(
        nat_a=NatType(nat_a),
        nat_b=NatType(nat_b),
        mapping_b=mapping or "none",  # type: ignore[arg-type]
        transport=transport or "tcp",  # type: ignore[arg-type]
        listen="lan" if at else "any",
    )


# CI's short matrix: the pattern physics allows, one case each.
SHORT_CASES: tuple[Case, ...] = (
    Case(nat_a=NatType.FULL_CONE, nat_b=NatType.PORT_RESTRICTED),
    Case(nat_a=NatType.PORT_RESTRICTED, nat_b=NatType.SYMMETRIC),
    Case(nat_a=NatType.SYMMETRIC, nat_b=NatType.SYMMETRIC),
    Case(nat_a=NatType.PORT_RESTRICTED, nat_b=NatType.PORT_RESTRICTED, mapping_b="upnp"),
)


def full_cases(*, upnp: bool = True, quic: bool = False) -> list[Case]:
    """Every ordered pair of NAT types, plus B behind each type with UPnP (and a port forward);
    ``quic``: the 16 pairs and the UPnP cases again with QUIC listeners beside TCP."""
    cases = [Case(nat_a=a, nat_b=b) for a, b in itertools.product(NatType, NatType)]
    if quic:
        cases += [Case(nat_a=a, nat_b=b, transport="quic") for a, b in itertools.product(NatType, NatType)]
        if upnp:
            cases += [Case(nat_a=NatType.PORT_RESTRICTED, nat_b=b, mapping_b="upnp", transport="quic") for b in NatType]
    if upnp:
        cases += [Case(nat_a=NatType.PORT_RESTRICTED, nat_b=b, mapping_b="upnp") for b in NatType]
    cases.append(Case(nat_a=NatType.PORT_RESTRICTED, nat_b=NatType.SYMMETRIC, mapping_b="port-forward"))
    return cases


class Result(BaseModel):
    """One case of the matrix, one repetition."""

    case: str
    nat_a: str
    nat_b: str
    mapping_b: Mapping
    transport: str = "tcp"
    repetition: int
    router_a_ip: str
    router_b_ip: str
    verdict_a: Verdict = "unknown"
    verdict_b: Verdict = "unknown"
    expected_verdict_a: Verdict = "private"
    expected_verdict_b: Verdict = "private"
    seconds_to_verdict_a: float | None = None
    seconds_to_verdict_b: float | None = None
    upnp_b: str | None = None  # B's UPnP state ("mapped" ...), UPnP cases only
    relay_reservations_b: int = 0  # relays holding a reservation for B when A asked
    data_exchanged: bool = False  # B's record came back live from B
    seconds_to_data: float | None = None  # A's `describe` of B, request to answer
    rtt_ms: float | None = None  # the record request's round trip over the path in use then
    path: Path_ = "none"
    expected_path: Path_ = "none"
    seconds_to_direct: float | None = None  # hole punches: the DCUtR attempt, relayed connection to direct
    data_after_punch: bool | None = None  # a second request answered once the path settled
    direct_transport: Transport | None = None  # what A's direct connection to B runs on
    # TCP connections (ip:port) the relays and helpers opened towards the home side: AutoNAT
    # dial-backs (and any other dial). Only the routers' public addresses may appear.
    server_dials: list[str] = Field(default_factory=list)
    dials_only_router_ips: bool = True
    ok: bool = False
    error: str = ""


class MatrixError(RuntimeError):
    """Raised when the matrix cannot run here; ``code`` is stable (``E_UNAVAILABLE``)."""

    def __init__(self, message: str, code: str = "E_UNAVAILABLE") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def requirements_problem(cases: Sequence[Case] = ()) -> str | None:
    """Why the matrix cannot run here (``None`` when it can)."""
    if sys.platform != "linux":
        return "Linux network namespaces only"
    problem = missing_requirements()
    if problem is None and any(case.mapping_b == "upnp" for case in cases):
        from nat.harness.upnpd import missing_miniupnpd

        problem = missing_miniupnpd()
    return problem


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
                at = time.time() if stamp is None else datetime.strptime(stamp.group(1), _STAMP_FMT).timestamp()
                first = max(0.0, at - self.started_wall)
            found = ("public" if match.group(1) == "public" else "private", match.group(2), first)
        return found

    def running_file(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.data_dir / "node.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None

    def cli(self, args: Sequence[str], *, timeout: float = 20) -> dict[str, Any]:
        """``clawnode ARGS --data-dir D`` inside the daemon's namespace (its API is on 127.0.0.1 there)."""
        done = exec_in(
            self.ns,
            [sys.executable, "-m", "node.cli", *args, "--data-dir", str(self.data_dir)],
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise HarnessError(f"clawnode {args[0]} failed: {(done.stderr or done.stdout).strip()[-200:]}")
        return dict(json.loads(done.stdout))

    def status(self) -> dict[str, Any]:
        return self.cli(["status", "--json"])

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
    quic: bool = False,
    listen_ip: str | None = None,
) -> Daemon:
    """``listen_ip``: what the daemon listens on (default the host's own IP; home nodes: 0.0.0.0)."""
    listen = listen_ip or host.ip
    data_dir = ensure_data_dir(root / name)
    log_path = root / f"{name}.log"
    environment = {
        **os.environ,
        "CLAWNODE_ESCROW_MODE": "off",
        "CLAWNODE_BOOTSTRAP_USE_DEFAULTS": "false",
        "CLAWNODE_LOG_LEVEL": os.environ.get("CLAWNODE_LOG_LEVEL", "info"),  # debug: why a case went wrong
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
        f"/ip4/{listen}/tcp/{LISTEN_PORT}",
        "--api-port",
        "0",
        "--role",
        role,
    ]
    if quic:  # beside TCP: AutoNAT dials back TCP only; py-libp2p dials QUIC first where both exist
        argv += ["--listen", f"/ip4/{listen}/udp/{LISTEN_PORT}/quic-v1"]
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


@dataclass
class _Servers:
    relay: Daemon
    helpers: list[Daemon]
    boot: list[str]

    @property
    def every(self) -> list[Daemon]:
        return [self.relay, *self.helpers]


def _router_names(index: int) -> tuple[str, str]:
    return f"r{2 * index + 1}", f"r{2 * index + 2}"


def _start_servers(topo: Topology, root: Path, timeout: float, *, quic: bool = False) -> _Servers:
    # Identities made up front, so every public daemon can start at once with all the others as
    # bootstrap peers (an AutoNAT client needs >= 3 connected servers).
    public_hosts = [topo.relay, *topo.helpers]
    addrs = {
        host.name: f"/ip4/{host.ip}/tcp/{LISTEN_PORT}/p2p/{make_identity(root / host.name)}" for host in public_hosts
    }
    daemons = []
    for host in public_hosts:
        second_relay = host is topo.helpers[-1]
        daemons.append(
            start_daemon(
                topo,
                host,
                name=host.name,
                root=root,
                role="relay" if host is topo.relay or second_relay else "node",
                bootstrap=[a for n, a in addrs.items() if n != host.name],
                # Home nodes here re-check every 10 s (below); a server's default of one request
                # per peer per 30 s would refuse most of those rounds.
                env={"CLAWNODE_NAT_AUTONAT_SERVE": "always", "CLAWNODE_NAT_AUTONAT_PEER_INTERVAL_S": "5"},
                quic=quic,
            )
        )
    servers = _Servers(daemons[0], daemons[1:], list(addrs.values()))
    for daemon in servers.every:
        watch_dials(daemon.ns)
    wait_for(
        "the public nodes' verdicts",
        lambda: all(d.verdict()[0] != "unknown" for d in servers.every),
        timeout,
        servers.every,
    )
    return servers


def run_matrix_with_progress(console: Any, cases: Sequence[Case], repetitions: int = 1, **options: Any) -> list[Result]:
    """``run_matrix`` under a rich progress bar (runs done of all, elapsed), each run's outcome
    printed above it as it finishes: ``clawnode nat-test`` and ``bench/nat_matrix.py``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"NAT runs, {options.get('parallel', 4)} at a time", total=len(cases) * repetitions)

        def finished(result: Result) -> None:
            verdict = "ok" if result.ok else "NOT AS EXPECTED"
            bar.console.print(f"  {result.case} #{result.repetition + 1}: {result.path} ({verdict})", highlight=False)
            bar.advance(task)

        results: list[Result] = []
        for start in range(0, len(cases), MAX_CASES):  # one topology holds MAX_CASES pairs of routers
            results += run_matrix(cases[start : start + MAX_CASES], repetitions, progress=finished, **options)
        return results


def run_matrix(
    cases: Sequence[Case] = SHORT_CASES,
    repetitions: int = 1,
    *,
    parallel: int = 4,
    timeout_s: float = 90.0,
    loss_percent: int = 0,
    keep_logs: Path | None = None,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run every case ``repetitions`` times, ``parallel`` cases at once; one ``Result`` per run.

    Raises ``MatrixError`` where the harness cannot run (not Linux, not root, no ``ip``/``nft``, no
    ``miniupnpd`` for a UPnP case). ``loss_percent`` drops that share of the packets every router
    forwards, both ways (nftables ``numgen``). Everything (namespaces, daemons) is removed on return, also on
    error.
    """
    problem = requirements_problem(cases)
    if problem is not None:
        raise MatrixError(f"the NAT matrix needs Linux and root: {problem}")
    if repetitions < 1 or parallel < 1:
        raise ValueError("repetitions and parallel must be >= 1")
    if not 1 <= len(cases) <= MAX_CASES:
        raise ValueError(f"1..{MAX_CASES} cases (two routers each, {2 * MAX_CASES} at most)")
    routers: dict[str, NatType] = {}
    for index, case in enumerate(cases):
        name_a, name_b = _router_names(index)
        routers[name_a], routers[name_b] = case.nat_a, case.nat_b
    results: list[Result] = []
    root = Path(tempfile.mkdtemp(prefix="clawnode-natmatrix-"))
    try:
        with Topology(routers, loss_percent=loss_percent) as topo:
            servers = _start_servers(topo, root, timeout_s, quic=any(case.transport == "quic" for case in cases))
            if any(case.mapping_b == "upnp" for case in cases):
                from nat.harness.upnpd import start_miniupnpd

                for index, case in enumerate(cases):
                    if case.mapping_b == "upnp":
                        start_miniupnpd(topo, _router_names(index)[1])
            for rep in range(repetitions):
                for daemon in servers.every:
                    dialed(daemon.ns, flush=True)

                def one(index: int, rep: int = rep) -> Result:
                    result = _run_case(topo, root, servers, cases[index], index, rep, timeout_s)
                    if progress is not None:
                        progress(result)
                    return result

                with ThreadPoolExecutor(max_workers=parallel) as pool:
                    batch = list(pool.map(one, range(len(cases))))
                _check_server_dials(batch, servers)
                results.extend(batch)
    finally:
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for log in root.glob("*.log"):
                shutil.copy(log, keep_logs / log.name)
        shutil.rmtree(root, ignore_errors=True)
    return results


def _check_server_dials(batch: list[Result], servers: _Servers) -> None:
    public = {RELAY_IP, *HELPER_IPS}
    dials = sorted({d for s in servers.every for d in dialed(s.ns) if d.rsplit(":", 1)[0] not in public})
    router_ips = {ip for r in batch for ip in (r.router_a_ip, r.router_b_ip)}
    stray = [d for d in dials if d.rsplit(":", 1)[0] not in router_ips]
    for result in batch:
        mine = {result.router_a_ip, result.router_b_ip}
        result.server_dials = [d for d in dials if d.rsplit(":", 1)[0] in mine]
        result.dials_only_router_ips = not stray
        result.ok = result.ok and not stray


def _start_home(
    topo: Topology,
    host: Host,
    root: Path,
    name: str,
    boot: list[str],
    *,
    serves: bool,
    quic: bool = False,
    listen: Listen = "any",
) -> Daemon:
    if serves:
        data_dir = ensure_data_dir(root / name)
        (data_dir / "config.toml").write_text(OFFER_TOML, encoding="utf-8")
    # Re-checked every 10 s rather than 300 s: a first check before three servers are connected
    # is retried after min(30 s, interval), which would dominate a case's time.
    env = {"CLAWNODE_NAT_AUTONAT_INTERVAL_S": "10"}
    listen_ip = "0.0.0.0" if listen == "any" else host.ip
    return start_daemon(
        topo, host, name=name, root=root, role="node", bootstrap=boot, env=env, quic=quic, listen_ip=listen_ip
    )


def _published_reachable(daemon: Daemon) -> bool:
    """Whether the daemon's record in the DHT names where to reach it: its relays while private.

    Its first record can go out before the relays granted a reservation; a peer that read that
    one would have no way in.
    """
    record = daemon.cli(["capabilities", "--json"]).get("record") or {}
    relayed = any("/p2p-circuit" in addr for addr in record.get("addrs", []))
    if record.get("reachability") == "private" and not relayed:
        return False
    return f"published capability record seq {record.get('seq')} " in daemon.log_text()


def _peer_entry(daemon: Daemon, peer_id: str) -> dict[str, Any]:
    body = daemon.cli(["peers", "--json"])
    for peer in body.get("peers", []):
        if peer.get("peer_id") == peer_id:
            return dict(peer)
    return {}


def _run_case(
    topo: Topology, root: Path, servers: _Servers, case: Case, index: int, rep: int, timeout: float
) -> Result:
    name_a, name_b = _router_names(index)
    router_a, router_b = topo.router(name_a), topo.router(name_b)
    if rep > 0:  # forget the last repetition's mappings (a port forward is re-added below)
        topo.set_nat(name_a, case.nat_a)
        topo.set_nat(name_b, case.nat_b)
    host_a, host_b = router_a.hosts[0], router_b.hosts[0]
    if case.mapping_b == "port-forward":
        add_port_forward(topo, name_b, host_b, LISTEN_PORT)
    result = Result(
        case=case.label,
        nat_a=case.nat_a.value,
        nat_b=case.nat_b.value,
        mapping_b=case.mapping_b,
        transport=case.transport,
        repetition=rep,
        router_a_ip=router_a.wan_ip,
        router_b_ip=router_b.wan_ip,
        expected_verdict_b="private" if case.mapping_b == "none" else "public",
        expected_path=case.expected_path(),
    )
    tag = f"{index}-{rep}"
    quic = case.transport == "quic"
    b = _start_home(topo, host_b, root, f"home-b-{tag}", servers.boot, serves=True, quic=quic, listen=case.listen)
    a = _start_home(topo, host_a, root, f"home-a-{tag}", servers.boot, serves=False, quic=quic, listen=case.listen)
    watched = [*servers.every, a, b]
    try:
        wait_for("both verdicts", lambda: a.verdict()[0] != "unknown" and b.verdict()[0] != "unknown", timeout, watched)
        result.verdict_a, _, seconds_a = a.verdict()
        result.verdict_b, _, seconds_b = b.verdict()
        result.seconds_to_verdict_a = round(seconds_a, 2) if seconds_a is not None else None
        result.seconds_to_verdict_b = round(seconds_b, 2) if seconds_b is not None else None
        if result.verdict_b == "private":
            wait_for("B's relay reservation", lambda: bool(b.status().get("relayed_addrs")), timeout, watched)
        wait_for("B's record published with its addresses", lambda: _published_reachable(b), timeout, watched)
        status_b = b.status()
        result.relay_reservations_b = len(status_b.get("relay_reservations") or [])
        if case.mapping_b == "upnp":
            result.upnp_b = str((status_b.get("upnp") or {}).get("state"))
        b_id = str(status_b["peer_id"])
        started = time.monotonic()
        described = a.cli(["describe", b_id, "--json"], timeout=150)
        result.seconds_to_data = round(time.monotonic() - started, 2)
        result.data_exchanged = bool(described.get("reachable"))
        result.rtt_ms = described.get("rtt_ms")
        result.path = _settle_path(a, b_id, case, result)
        again = a.cli(["describe", b_id, "--json"], timeout=60)
        result.data_after_punch = bool(again.get("reachable"))
    except (HarnessError, ValueError, subprocess.SubprocessError) as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        result.error = " | ".join(lines[:1] + lines[-2:])[:600] if lines else type(error).__name__
    finally:
        a.stop()
        b.stop()
    result.ok = (
        not result.error
        and result.verdict_a == result.expected_verdict_a
        and result.verdict_b == result.expected_verdict_b
        and result.data_exchanged
        and bool(result.data_after_punch)
        and result.path == result.expected_path
        and (result.verdict_b == "public" or result.relay_reservations_b >= 1)
    )
    return result


def _settle_path(a: Daemon, b_id: str, case: Case, result: Result, wait_s: float = 20.0) -> Path_:
    """How A is connected to B once any hole punch has ended."""
    deadline = time.monotonic() + wait_s
    entry: dict[str, Any] = {}
    while time.monotonic() < deadline:
        entry = _peer_entry(a, b_id)
        punch = a.status().get("hole_punch") or {}
        if entry.get("connection") == "direct" or punch.get("direct", 0) + punch.get("failed", 0) >= 1:
            attempts = punch.get("recent") or []
            if attempts:
                result.seconds_to_direct = attempts[-1]["seconds"] if attempts[-1]["outcome"] == "direct" else None
            break
        time.sleep(0.5)
    entry = _peer_entry(a, b_id) or entry
    result.direct_transport = entry.get("transport")
    if entry.get("connection") == "direct":
        return "hole-punch" if entry.get("hole_punched") else "direct"
    if entry.get("connection") == "relayed" or (result.data_exchanged and result.verdict_b == "private"):
        return "relay"
    return "none"


def summarize(results: Sequence[Result]) -> dict[str, Any]:
    """The rates the issue asks for: direct connections where a direct path exists, relay fallback."""
    punchable = [r for r in results if r.mapping_b == "none" and r.expected_path == "hole-punch"]
    relay_only = [r for r in results if r.mapping_b == "none" and r.expected_path == "relay"]
    mapped = [r for r in results if r.mapping_b != "none"]
    direct_ok = sum(1 for r in punchable if r.path == "hole-punch")
    fallback_ok = sum(1 for r in [*punchable, *relay_only] if r.path != "hole-punch" and r.data_exchanged)
    fallback_total = sum(1 for r in [*punchable, *relay_only] if r.path != "hole-punch")
    punch_times = sorted(r.seconds_to_direct for r in punchable if r.seconds_to_direct is not None)
    quic = [r for r in punchable if r.transport == "quic"]
    quic_direct = sum(1 for r in quic if r.path == "hole-punch" and r.direct_transport == "quic")
    return {
        "runs": len(results),
        "direct_rate": round(direct_ok / len(punchable), 3) if punchable else None,
        "direct": f"{direct_ok}/{len(punchable)}",
        "relay_fallback_rate": round(fallback_ok / fallback_total, 3) if fallback_total else None,
        "relay_fallback": f"{fallback_ok}/{fallback_total}",
        "mapped_direct": f"{sum(1 for r in mapped if r.path == 'direct')}/{len(mapped)}",
        "hole_punch_seconds_p50": punch_times[len(punch_times) // 2] if punch_times else None,
        "ok": f"{sum(1 for r in results if r.ok)}/{len(results)}",
        # QUIC cases where a direct path exists that ended on a direct QUIC connection
        "quic_direct": f"{quic_direct}/{len(quic)}" if quic else None,
    }


# ---------------------------------------------------------------------------------------------
# output


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def render_table(results: Sequence[Result]) -> Any:
    """A rich ``Table`` of the results."""
    from rich.table import Table

    transports = sorted({r.transport for r in results}, reverse=True)  # tcp, then quic
    table = Table(title=f"clawnode NAT matrix (real daemons in network namespaces, {' and '.join(transports).upper()})")
    for column in ("A x B", "rep", "AutoNAT A/B", "relays B", "data", "path", "expected", "to direct", "ok"):
        table.add_column(column)
    for r in results:
        data = f"yes, {_seconds(r.seconds_to_data)}" if r.data_exchanged else "no"
        table.add_row(
            r.case,
            str(r.repetition + 1),
            f"{r.verdict_a}/{r.verdict_b}" + (f" (upnp {r.upnp_b})" if r.upnp_b else ""),
            str(r.relay_reservations_b),
            data,
            r.path + (f" ({r.direct_transport})" if r.direct_transport and r.path in ("direct", "hole-punch") else ""),
            r.expected_path,
            _seconds(r.seconds_to_direct),
            "yes" if r.ok else "NO" + (f" ({r.error})" if r.error else ""),
        )
    summary = summarize(results)
    table.caption = (
        f"direct where a path exists {summary['direct']} (rate {summary['direct_rate']}), relay fallback "
        f"{summary['relay_fallback']}, mapped direct {summary['mapped_direct']}"
        + ("" if "quic" in transports else "; QUIC not run (--quic, or a case ending in /quic)")
    )
    return table
