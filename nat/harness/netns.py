"""Network-namespace topology for NAT tests: an "internet" bridge, public hosts, NAT routers, home LANs.

Everything here is blocking (``subprocess``); from trio, call it through ``trio.to_thread.run_sync``.
Needs root, ``ip`` (iproute2) and ``nft`` (nftables). Nothing is created in the caller's namespace:
veth pairs are made inside the namespaces (``ip -n NS link add ... peer ... netns OTHER``), no
namespace has a default route that leaves the topology, and no bridge touches a real interface.

See docs/nat.md for the addresses, the rule sets per NAT type and the cleanup rules.
"""

from __future__ import annotations

import atexit
import enum
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

INTERNET_SUBNET = ipaddress.ip_network("203.0.113.0/24")  # TEST-NET-3 (RFC 5737): the "internet"
RELAY_IP = "203.0.113.2"
HELPER_IPS = ("203.0.113.11", "203.0.113.12", "203.0.113.13", "203.0.113.14")
ROUTER_WAN_BASE = 100  # router i (1-based) gets 203.0.113.(100 + i) on its WAN side
CARRIER_WAN_BASE = 150  # the carrier-grade NAT in front of router i: 203.0.113.(150 + i)
CARRIER_SUBNET = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598 shared address space, inside a carrier
STUN_PORT = 3478
STUN_ALT_PORT = 3479

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.]{1,24}$")


class NatType(enum.StrEnum):
    FULL_CONE = "full-cone"
    ADDRESS_RESTRICTED = "address-restricted"
    PORT_RESTRICTED = "port-restricted"
    SYMMETRIC = "symmetric"


class HarnessError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# thin wrappers


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip [-n NS] ARGS...``"""
    return _run(["ip", *(["-n", ns] if ns else []), *args], check=check)


def netns_add(name: str) -> None:
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", ns=name)


def netns_list() -> list[str]:
    out = ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    out = ip("netns", "pids", name, check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def netns_delete(name: str) -> None:
    """Kill what still runs inside the namespace (all started by the harness), then delete it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = netns_pids(name)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while netns_pids(name) and time.monotonic() < deadline:
            time.sleep(0.05)
    ip("netns", "del", name, check=False)


def exec_in(
    ns: str, argv: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside namespace ``ns`` and wait for it (``ip netns exec``)."""
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], input=input, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise HarnessError(f"[{ns}] {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def run_in(ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` inside namespace ``ns``; returns the Popen (the caller owns it).

    ``PYTHONPATH`` gets the repository root so ``python -m nat.harness.stun`` (or ``-m node.cli``)
    works from any cwd.
    """
    env = dict(popen_kwargs.pop("env", None) or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=env, **popen_kwargs)


def nft_load(ns: str, ruleset: str) -> None:
    """Replace the namespace's whole nftables ruleset (``nft -f -``)."""
    exec_in(ns, ["nft", "-f", "-"], input="flush ruleset\n" + ruleset)


def sysctl(ns: str, key: str, value: str | int) -> None:
    exec_in(ns, ["sysctl", "-q", "-w", f"{key}={value}"])


def cleanup_stale(prefix: str) -> list[str]:
    """Delete every namespace named ``PREFIX-*`` (leftovers of a killed run); returns their names."""
    _check_prefix(prefix)
    stale = [name for name in netns_list() if name.startswith(prefix + "-")]
    for name in stale:
        netns_delete(name)
    return stale


def missing_requirements() -> str | None:
    """Why the harness cannot run here (``None`` when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    for tool in ("ip", "nft", "sysctl"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (apt-get install -y iproute2 nftables procps)"
    return None


def _check_prefix(prefix: str) -> None:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"bad namespace prefix {prefix!r}: 1-24 of [A-Za-z0-9_.]")


# ---------------------------------------------------------------------------------------------
# nftables rule sets per NAT type

_RULESET = """\
table ip clawnat {{
{sets}
    chain prefilter {{
        type filter hook prerouting priority mangle; policy accept;
        iifname "{wan}" ct state established,related accept
{allow}
{deny}
    }}
    chain wan_gate {{
        type filter hook prerouting priority dstnat + 10; policy accept;
        iifname "{wan}" ct state new ct status & dnat == 0 drop
    }}
    chain nat_pre {{
        type nat hook prerouting priority dstnat; policy accept;
{dnat}
    }}
    chain nat_post {{
        type nat hook postrouting priority srcnat; policy accept;
        iifname "{lan}" oifname "{wan}" {snat}
    }}
    chain track {{
        type filter hook postrouting priority srcnat + 10; policy accept;
{track}
    }}
    chain filter_fwd {{
        type filter hook forward priority filter; policy drop;
{loss}
        ct state established,related accept
        iifname "{lan}" oifname "{wan}" accept
        iifname "{lan}" oifname "{lan}" accept
        iifname "{wan}" oifname "{lan}" ct status dnat accept
    }}
}}
"""

# Cone NATs: endpoint-independent mapping (snat keeps the source port, `persistent` keeps the
# address), and a dynamic map from the external (proto, port) to the internal (ip, port), filled
# from outbound packets after SNAT (the conntrack reply tuple carries the external port).
_CONE_MAP = """\
    map cone_map {{
        type inet_proto . inet_service : ipv4_addr . inet_service
        flags dynamic,timeout; timeout {timeout}s;
    }}"""
_CONE_ALLOW = """\
    set cone_allow {{
        type inet_proto . inet_service . ipv4_addr
        flags dynamic,timeout; timeout {timeout}s;
    }}"""
_TRACK_MAP = (
    '        oifname "{wan}" ct direction original meta l4proto {{ tcp, udp }} '
    "update @cone_map {{ meta l4proto . ct reply proto-dst : ct original ip saddr . ct original proto-src }}"
)
_TRACK_ALLOW = (
    '        oifname "{wan}" ct direction original meta l4proto {{ tcp, udp }} '
    "update @cone_allow {{ meta l4proto . ct reply proto-dst . ip daddr }}"
)
_DNAT = '        iifname "{wan}" meta l4proto {{ tcp, udp }} dnat ip to meta l4proto . th dport map @cone_map'
_ALLOW_ANY = '        iifname "{wan}" ct state new meta l4proto . th dport @cone_map accept'
# Address-restricted: a mapped port is open only to the addresses already contacted from it (the
# drop of everything else new from the WAN comes after DNAT, in ``wan_gate``, so a port forward or
# a UPnP mapping made by miniupnpd's own table gets through).
_DENY_MAPPED = '        iifname "{wan}" ct state new meta l4proto . th dport @cone_map drop'
_ALLOW_ADDR = '        iifname "{wan}" ct state new meta l4proto . th dport . ip saddr @cone_allow accept'


def render_ruleset(
    nat: NatType,
    *,
    wan_if: str,
    lan_if: str,
    wan_ip: str,
    loss_percent: int = 0,
    mapping_timeout: int = 300,
) -> str:
    """The router's nftables ruleset for ``nat`` (one ``table ip clawnat``).

    - port-restricted: ``masquerade`` (Linux keeps the source port: EIM; conntrack only lets the
      exact remote endpoint back in: APDF).
    - symmetric: ``masquerade fully-random`` (a random port per destination: APDM).
    - address-restricted: ``snat ... persistent`` + ``cone_allow`` (proto, ext port, remote ip)
      filled from outbound packets; inbound new flows pass only from a remote address already
      contacted from that mapping (ADF), and are DNATed via ``cone_map``.
    - full-cone: the same with ``cone_map`` alone: anyone may send to a live mapping (EIF).
    ``loss_percent`` drops that share of forwarded packets (both directions) with ``numgen``.
    """
    if not 0 <= loss_percent <= 100:
        raise ValueError("loss_percent must be within 0..100")
    fmt = {"wan": wan_if, "lan": lan_if, "timeout": int(mapping_timeout)}
    sets: list[str] = []
    allow: list[str] = []
    dnat: list[str] = []
    track: list[str] = []
    deny: list[str] = []
    if nat is NatType.PORT_RESTRICTED:
        snat = "masquerade"
    elif nat is NatType.SYMMETRIC:
        snat = "masquerade fully-random"
    else:
        snat = f"snat ip to {ipaddress.ip_address(wan_ip)} persistent"
        sets.append(_CONE_MAP)
        track.append(_TRACK_MAP)
        dnat.append(_DNAT)
        if nat is NatType.FULL_CONE:
            allow.append(_ALLOW_ANY)
        else:
            sets.append(_CONE_ALLOW)
            track.append(_TRACK_ALLOW)
            allow.append(_ALLOW_ADDR)
            deny.append(_DENY_MAPPED)
    loss = ""
    if 0 < loss_percent < 100:
        loss = f"        numgen random mod 100 < {int(loss_percent)} drop"
    elif loss_percent == 100:
        loss = "        drop"

    def block(lines: list[str]) -> str:
        return "\n".join(line.format(**fmt) for line in lines)

    text = _RULESET.format(
        sets=block(sets),
        allow=block(allow),
        deny=block(deny),
        dnat=block(dnat),
        track=block(track),
        loss=loss,
        snat=snat,
        wan=wan_if,
        lan=lan_if,
    )
    return "\n".join(line for line in text.splitlines() if line.strip()) + "\n"


# ---------------------------------------------------------------------------------------------
# topology


@dataclass
class Host:
    name: str
    ns: str
    ip: str
    iface: str = "eth0"
    gateway: str | None = None  # LAN hosts: their router's LAN address; public hosts: none


@dataclass
class Router:
    name: str
    ns: str
    index: int
    wan_ip: str
    lan_ip: str
    lan_subnet: str
    nat: NatType
    hosts: list[Host] = field(default_factory=list)
    loss_percent: int = 0
    wan_if: str = "wan0"
    lan_if: str = "lan0"
    # A carrier-grade NAT in front of this router (double NAT): the router's WAN is then
    # 100.64.i.2 behind the carrier's ``lan0`` (100.64.i.1), and the carrier holds the public address.
    carrier: Router | None = None

    @property
    def public_ip(self) -> str:
        """The address the internet sees this router's LAN behind: the carrier's, if there is one."""
        return self.carrier.wan_ip if self.carrier is not None else self.wan_ip


_LIVE: weakref.WeakSet[Topology] = weakref.WeakSet()


@atexit.register
def _destroy_live_topologies() -> None:
    for topo in list(_LIVE):
        topo.destroy()


class Topology:
    """Builds the namespaces on ``__enter__`` (or ``build()``) and deletes them on exit, also on error.

    Layout (``P`` = prefix): ``P-inet`` holds bridge ``br0`` (the internet, 203.0.113.0/24, no
    address of its own); public hosts ``P-relay`` (203.0.113.2) and ``P-h1``..``P-h4``
    (203.0.113.11-14); per router ``rN``: ``P-rN`` with ``wan0`` (203.0.113.(100+N)) and ``lan0``
    (192.168.N.1/24), and LAN hosts ``P-rN-a``, ``P-rN-b``... (192.168.N.10, .11, ...) whose
    default route is the router. Nothing routes beyond 203.0.113.0/24.

    ``carriers`` puts a carrier-grade NAT of the given type in front of a router (double NAT):
    ``P-rN-cgn`` with ``wan0`` 203.0.113.(150+N) on the internet and ``lan0`` 100.64.N.1/24 facing the
    router, whose ``wan0`` becomes 100.64.N.2 with a route to 203.0.113.0/24 via the carrier.
    ``lan_hosts`` gives a router more (or fewer) LAN hosts than ``hosts_per_lan``.
    """

    def __init__(
        self,
        routers: dict[str, NatType] | None = None,
        *,
        prefix: str | None = None,
        hosts_per_lan: int = 1,
        loss_percent: int = 0,
        udp_timeout: int | None = None,
        mapping_timeout: int = 300,
        carriers: dict[str, NatType] | None = None,
        lan_hosts: dict[str, int] | None = None,
    ) -> None:
        self.prefix = prefix or f"cnat{secrets.token_hex(3)}"
        _check_prefix(self.prefix)
        routers = routers or {"r1": NatType.PORT_RESTRICTED, "r2": NatType.PORT_RESTRICTED}
        carriers = carriers or {}
        lan_hosts = lan_hosts or {}
        if not 1 <= len(routers) <= 50 or not 1 <= hosts_per_lan <= 20:
            raise ValueError("1..50 routers, 1..20 hosts per LAN")
        if not set(carriers) <= set(routers) or not set(lan_hosts) <= set(routers):
            raise ValueError("carriers and lan_hosts name routers of this topology")
        if any(not 1 <= n <= 20 for n in lan_hosts.values()):
            raise ValueError("1..20 hosts per LAN")
        self.udp_timeout = udp_timeout
        self.mapping_timeout = mapping_timeout
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[Any]] = []
        self.inet = self._ns("inet")
        self.relay = Host("relay", self._ns("relay"), RELAY_IP)
        self.helpers = [Host(f"h{i + 1}", self._ns(f"h{i + 1}"), addr) for i, addr in enumerate(HELPER_IPS)]
        self.routers: dict[str, Router] = {}
        for index, (name, nat) in enumerate(routers.items(), start=1):
            if not re.match(r"^[a-z][a-z0-9]{0,7}$", name):
                raise ValueError(f"bad router name {name!r}")
            router = Router(
                name=name,
                ns=self._ns(name),
                index=index,
                wan_ip=str(INTERNET_SUBNET.network_address + ROUTER_WAN_BASE + index),
                lan_ip=f"192.168.{index}.1",
                lan_subnet=f"192.168.{index}.0/24",
                nat=NatType(nat),
                loss_percent=loss_percent,
            )
            if name in carriers:
                router.wan_ip = f"100.64.{index}.2"
                router.carrier = Router(
                    name=f"{name}c",
                    ns=self._ns(f"{name}-cgn"),
                    index=index,
                    wan_ip=str(INTERNET_SUBNET.network_address + CARRIER_WAN_BASE + index),
                    lan_ip=f"100.64.{index}.1",
                    lan_subnet=f"100.64.{index}.0/24",
                    nat=NatType(carriers[name]),
                    loss_percent=loss_percent,
                )
            for j in range(lan_hosts.get(name, hosts_per_lan)):
                letter = chr(ord("a") + j)
                router.hosts.append(
                    Host(
                        f"{name}-{letter}",
                        self._ns(f"{name}-{letter}"),
                        f"192.168.{index}.{10 + j}",
                        gateway=router.lan_ip,
                    )
                )
            self.routers[name] = router
        self._built = False
        self._stun_started = False

    def _ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Topology:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def build(self) -> None:
        if self._built:
            return
        self._built = True
        _LIVE.add(self)
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise

    def _add_ns(self, name: str) -> None:
        netns_add(name)
        self.namespaces.append(name)

    def _build(self) -> None:
        prefix_len = INTERNET_SUBNET.prefixlen
        self._add_ns(self.inet)
        ip("link", "add", "br0", "type", "bridge", ns=self.inet)
        ip("link", "set", "br0", "up", ns=self.inet)

        def wire(ns: str, iface: str, port: str, addr: str) -> None:
            # the veth is born in ``ns`` with its peer directly in the internet namespace
            ip("link", "add", iface, "type", "veth", "peer", "name", port, "netns", self.inet, ns=ns)
            ip("link", "set", port, "master", "br0", "up", ns=self.inet)
            ip("addr", "add", f"{addr}/{prefix_len}", "dev", iface, ns=ns)
            ip("link", "set", iface, "up", ns=ns)

        for host in (self.relay, *self.helpers):
            self._add_ns(host.ns)
            wire(host.ns, host.iface, host.name, host.ip)
        for router in self.routers.values():
            self._add_ns(router.ns)
            carrier = router.carrier
            if carrier is None:
                wire(router.ns, router.wan_if, router.name, router.wan_ip)
            else:
                self._add_ns(carrier.ns)
                wire(carrier.ns, carrier.wan_if, carrier.name, carrier.wan_ip)
                ip(
                    "link",
                    "add",
                    router.wan_if,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    carrier.lan_if,
                    "netns",
                    carrier.ns,
                    ns=router.ns,
                )
                ip("addr", "add", f"{carrier.lan_ip}/24", "dev", carrier.lan_if, ns=carrier.ns)
                ip("link", "set", carrier.lan_if, "up", ns=carrier.ns)
                ip("addr", "add", f"{router.wan_ip}/24", "dev", router.wan_if, ns=router.ns)
                ip("link", "set", router.wan_if, "up", ns=router.ns)
                ip("route", "add", str(INTERNET_SUBNET), "via", carrier.lan_ip, ns=router.ns)
                sysctl(carrier.ns, "net.ipv4.ip_forward", 1)
            for k, host in enumerate(router.hosts):
                self._add_ns(host.ns)
                port = f"p{k}"
                ip("link", "add", host.iface, "type", "veth", "peer", "name", port, "netns", router.ns, ns=host.ns)
                ip("addr", "add", f"{host.ip}/24", "dev", host.iface, ns=host.ns)
                ip("link", "set", host.iface, "up", ns=host.ns)
                ip("route", "add", "default", "via", router.lan_ip, ns=host.ns)
                if k == 0:
                    ip("link", "add", "name", router.lan_if, "type", "bridge", ns=router.ns)
                    ip("addr", "add", f"{router.lan_ip}/24", "dev", router.lan_if, ns=router.ns)
                    ip("link", "set", router.lan_if, "up", ns=router.ns)
                ip("link", "set", port, "master", router.lan_if, "up", ns=router.ns)
            sysctl(router.ns, "net.ipv4.ip_forward", 1)
            self.set_nat(router.name, router.nat)

    def destroy(self) -> None:
        """Stop the processes started with ``run_in`` and delete every namespace of this run."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=2)
        self.processes.clear()
        for name in reversed(self.namespaces):
            netns_delete(name)
        self.namespaces.clear()
        cleanup_stale(self.prefix)  # anything a half-finished build left behind
        _LIVE.discard(self)
        self._stun_started = False

    # -- configuration --------------------------------------------------------------------------

    def router(self, name: str) -> Router:
        return self.routers[name]

    def set_nat(self, router_name: str, nat: NatType, *, loss_percent: int | None = None) -> None:
        """(Re)load the router's rule set for ``nat`` and forget its conntrack state (and its
        carrier's, if it has one: a fresh double NAT)."""
        router = self.routers[router_name]
        router.nat = NatType(nat)
        if loss_percent is not None:
            router.loss_percent = loss_percent
        self._load_nat(router)
        if router.carrier is not None:
            self._load_nat(router.carrier)

    def _load_nat(self, router: Router) -> None:
        nft_load(
            router.ns,
            render_ruleset(
                router.nat,
                wan_if=router.wan_if,
                lan_if=router.lan_if,
                wan_ip=router.wan_ip,
                loss_percent=router.loss_percent,
                mapping_timeout=self.mapping_timeout,
            ),
        )
        if self.udp_timeout is not None:
            sysctl(router.ns, "net.netfilter.nf_conntrack_udp_timeout", self.udp_timeout)
            sysctl(router.ns, "net.netfilter.nf_conntrack_udp_timeout_stream", self.udp_timeout)
        if shutil.which("conntrack"):
            exec_in(router.ns, ["conntrack", "-F"], check=False)

    # -- processes ------------------------------------------------------------------------------

    def run_in(self, ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """``run_in`` whose process is stopped by ``destroy()``."""
        if ns not in self.namespaces:
            raise HarnessError(f"{ns} is not a namespace of this topology")
        proc = run_in(ns, argv, **popen_kwargs)
        self.processes.append(proc)
        return proc

    def exec_in(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        if ns not in self.namespaces:
            raise HarnessError(f"{ns} is not a namespace of this topology")
        return exec_in(ns, argv, **kwargs)

    def start_stun(self) -> None:
        """Start the STUN-like responder on every helper (idempotent); helper i's "other address"
        is helper i^1 (h1<->h2, h3<->h4)."""
        if self._stun_started:
            return
        started = []
        for i, helper in enumerate(self.helpers):
            other = self.helpers[i ^ 1] if (i ^ 1) < len(self.helpers) else self.helpers[0]
            proc = self.run_in(
                helper.ns,
                [
                    sys.executable,
                    "-m",
                    "nat.harness.stun",
                    "serve",
                    "--bind",
                    f"{helper.ip}:{STUN_PORT}",
                    "--alt-port",
                    str(STUN_ALT_PORT),
                    "--other",
                    f"{other.ip}:{STUN_PORT}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            started.append(proc)
        for proc in started:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("READY"):
                raise HarnessError(f"STUN responder did not start: {line!r}")
        self._stun_started = True
