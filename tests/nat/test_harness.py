"""The NAT harness: each router behaves as its label says, nothing leaks, nothing is left behind.

Needs root, `ip` and `nft` (skipped otherwise). About 10 s.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from nat.harness.classify import Filtering, Mapping, classify
from nat.harness.netns import (
    HarnessError,
    NatType,
    Topology,
    cleanup_stale,
    ip,
    missing_requirements,
    netns_add,
    netns_list,
    render_ruleset,
)

_MISSING = missing_requirements() if sys.platform == "linux" else "Linux network namespaces only"
needs_netns = pytest.mark.skipif(_MISSING is not None, reason=f"NAT harness: {_MISSING}")


def _ours(prefix: str) -> list[str]:
    return [name for name in netns_list() if name.startswith(prefix + "-")]


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with Topology({"r1": NatType.PORT_RESTRICTED, "r2": NatType.SYMMETRIC}) as topology:
        yield topology
    assert _ours(topology.prefix) == []


def test_rulesets_per_type() -> None:
    def render(nat: NatType, **kw: int) -> str:
        return render_ruleset(nat, wan_if="wan0", lan_if="lan0", wan_ip="203.0.113.101", **kw)

    fc, ar, pr, sym = (render(t) for t in NatType)
    # LAN traffic only: the router's own (miniupnpd's STUN) keeps its port, as on a real router
    assert 'iifname "lan0" oifname "wan0" masquerade\n' in pr and "cone_map" not in pr
    assert "masquerade fully-random" in sym and "cone_map" not in sym
    for cone in (ar, fc):
        assert "snat ip to 203.0.113.101 persistent" in cone
        assert "dnat ip to meta l4proto . th dport map @cone_map" in cone
        assert "update @cone_map" in cone
    assert "@cone_allow" in ar and "@cone_allow" not in fc
    assert "numgen" not in pr and "numgen random mod 100 < 7 drop" in render(NatType.FULL_CONE, loss_percent=7)
    with pytest.raises(ValueError):
        render(NatType.FULL_CONE, loss_percent=101)


EXPECTED = {
    NatType.FULL_CONE: ("r1", Filtering.ENDPOINT_INDEPENDENT),
    NatType.ADDRESS_RESTRICTED: ("r2", Filtering.ADDRESS_DEPENDENT),
    NatType.PORT_RESTRICTED: ("r1", Filtering.ADDRESS_AND_PORT_DEPENDENT),
    NatType.SYMMETRIC: ("r2", Filtering.ADDRESS_AND_PORT_DEPENDENT),
}


@needs_netns
@pytest.mark.parametrize("nat_type", list(NatType))
def test_router_behaves_as_labelled(topo: Topology, nat_type: NatType) -> None:
    router, filtering = EXPECTED[nat_type]
    topo.set_nat(router, nat_type)
    result = classify(topo, router)
    assert result.nat_type is nat_type, result.evidence
    assert result.external_ip == topo.router(router).wan_ip
    assert result.filtering is filtering, result.evidence
    if nat_type is NatType.SYMMETRIC:
        assert result.mapping is not Mapping.ENDPOINT_INDEPENDENT
        assert result.tcp_mapping is Mapping.ADDRESS_AND_PORT_DEPENDENT
    else:
        assert result.mapping is Mapping.ENDPOINT_INDEPENDENT
        assert result.tcp_mapping is Mapping.ENDPOINT_INDEPENDENT


@needs_netns
def test_full_loss_is_reported_not_misclassified(topo: Topology) -> None:
    topo.set_nat("r1", NatType.FULL_CONE, loss_percent=100)
    try:
        with pytest.raises(HarnessError, match="unanswered"):
            classify(topo, "r1", timeout=0.3)
    finally:
        topo.set_nat("r1", NatType.FULL_CONE, loss_percent=0)


@needs_netns
@pytest.mark.parametrize(("nat_type", "punched"), [(NatType.PORT_RESTRICTED, True), (NatType.SYMMETRIC, False)])
def test_naive_udp_hole_punch_between_lans(topo: Topology, nat_type: NatType, punched: bool) -> None:
    """The harness supports hole-punching runs: simultaneous sends to the peer's router at a
    preserved port get through two port-restricted NATs and not through two symmetric ones."""
    r1, r2 = topo.router("r1"), topo.router("r2")
    for router in (r1, r2):
        topo.set_nat(router.name, nat_type)
    port = 40000
    procs = [
        topo.run_in(
            me.hosts[0].ns,
            [
                sys.executable,
                "-m",
                "nat.harness.stun",
                "punch",
                "--local-port",
                str(port),
                "--peer",
                f"{peer.wan_ip}:{port}",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for me, peer in ((r1, r2), (r2, r1))
    ]
    results = [json.loads(proc.communicate(timeout=15)[0]) for proc in procs]
    got = [bool(result["received_from"]) for result in results]
    assert got == [punched, punched], results
    if punched:
        assert results[0]["received_from"] == [f"{r2.wan_ip}:{port}"]


def _root_address() -> str:
    out = ip("-4", "-o", "addr", "show", "scope", "global").stdout.split()
    addrs = [tok.split("/")[0] for prev, tok in itertools.pairwise(out) if prev == "inet"]
    return addrs[0] if addrs else "10.255.255.1"


@needs_netns
def test_nothing_leaves_the_topology(topo: Topology) -> None:
    internet = "203.0.113."
    for ns in topo.namespaces:
        default = ip("route", "show", "default", ns=ns).stdout.strip()
        assert default == "" or default.startswith("default via 192.168."), (ns, default)
        for route in ip("-4", "route", "show", ns=ns).stdout.splitlines():
            dest = route.split()[0]
            assert dest == "default" or dest.startswith(("192.168.", internet)), (ns, route)
    for router in topo.routers.values():
        assert ip("route", "get", "8.8.8.8", ns=router.ns, check=False).returncode != 0
    lan_host = topo.router("r1").hosts[0]
    target = _root_address()
    probe = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(1)\n"
        f"try: s.connect(({target!r}, 22)); sys.exit('reached')\n"
        "except OSError as e: print(type(e).__name__)\n"
    )
    out = topo.exec_in(lan_host.ns, [sys.executable, "-c", probe], timeout=10)
    assert out.returncode == 0, out.stderr


@needs_netns
def test_namespaces_removed_on_exit_and_on_error() -> None:
    root_links = ip("-o", "link").stdout.count("\n")
    prefix = "cnattest0"
    cleanup_stale(prefix)
    with pytest.raises(RuntimeError, match="boom"):
        with Topology({"r1": NatType.PORT_RESTRICTED}, prefix=prefix) as topology:
            assert len(_ours(prefix)) == len(topology.namespaces) == 8  # inet, relay, h1-h4, r1, r1-a
            assert ip("-o", "link").stdout.count("\n") == root_links  # nothing created in our namespace
            proc = topology.run_in(topology.relay.ns, ["sleep", "60"])
            raise RuntimeError("boom")
    assert _ours(prefix) == []
    assert proc.poll() is not None

    with Topology({"r1": NatType.FULL_CONE}, prefix=prefix):
        pass
    assert _ours(prefix) == []

    netns_add(f"{prefix}-leftover")  # a killed run's leftover
    assert cleanup_stale(prefix) == [f"{prefix}-leftover"]
    assert _ours(prefix) == []


def test_bad_prefix_is_refused() -> None:
    with pytest.raises(ValueError):
        Topology(prefix="../etc")


@needs_netns
def test_double_nat_and_one_lan() -> None:
    """A carrier-grade NAT in front of a full-cone router: the outside meets the stricter of the two,
    at the carrier's address; two hosts behind one router reach each other over the LAN bridge
    (with br_netfilter loaded the router's drop-policy forward chain used to cut them off)."""
    with Topology({"r1": NatType.FULL_CONE}, carriers={"r1": NatType.PORT_RESTRICTED}, lan_hosts={"r1": 2}) as topology:
        router = topology.router("r1")
        assert router.carrier is not None and router.public_ip == router.carrier.wan_ip != router.wan_ip
        assert router.wan_ip.startswith("100.64.")  # RFC 6598 shared space, inside the carrier
        result = classify(topology, "r1")
        assert result.nat_type is NatType.PORT_RESTRICTED, result.evidence
        assert result.external_ip == router.public_ip
        a, b = router.hosts
        probe = "import socket,sys\ns=socket.create_connection((sys.argv[1], 7), timeout=3)\n"
        server = topology.run_in(b.ns, [sys.executable, "-c", _LISTEN_ONCE], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "READY"
        done = topology.exec_in(a.ns, [sys.executable, "-c", probe, b.ip], check=False)
        assert done.returncode == 0, done.stderr
        assert server.stdout.readline().strip() == a.ip  # straight from A's LAN address: no NAT between


_LISTEN_ONCE = """\
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 7)); s.listen(1)
print("READY", flush=True)
conn, peer = s.accept()
print(peer[0], flush=True)
"""
