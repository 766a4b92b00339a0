"""Two machines on one LAN find each other by mDNS with no bootstrap peer (issue 23).

The LAN is a pair of network namespaces joined by a veth link (needs root and ``ip``); each runs a
real ``clawnode start`` with no bootstrap peers and the default config (``node.mdns`` on).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nat.harness.netns import exec_in, ip, netns_add, run_in
from node.datadir import read_api_token
from node.mdns import announced_addrs, answer_packet, parse_packet, query_packet

PEER = "12D3KooWDnqS6p1xJ3LY9xWPTr3sajD643G9b4KHtnnUs2FDjivd"
needs_netns = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("curl") is None,
    reason="needs root, ip and curl (network namespaces)",
)


def test_an_answer_names_the_peer_and_its_lan_addresses_and_garbage_names_nobody() -> None:
    addrs = announced_addrs(
        ["/ip4/127.0.0.1/tcp/4021", f"/ip4/192.168.1.7/tcp/4021/p2p/{PEER}", "/ip4/1.2.3.4/tcp/1/p2p/X/p2p-circuit"]
    )
    assert addrs == ["/ip4/192.168.1.7/tcp/4021"]
    heard = parse_packet(answer_packet("a1b2", PEER, addrs))
    assert heard.peers == {PEER: ["/ip4/192.168.1.7/tcp/4021"]} and not heard.asks_for_peers
    assert parse_packet(query_packet()).asks_for_peers
    for garbage in (b"", b"\x00" * 12, os.urandom(300), answer_packet("x", "not-a-peer-id", addrs)):
        assert parse_packet(garbage).peers == {}


def test_an_ipv4_mapped_loopback_or_unspecified_address_is_not_announced_on_the_lan() -> None:
    """``::ffff:127.0.0.1`` is this machine's loopback as a dual-stack socket writes it: useless to a LAN peer."""
    addrs = announced_addrs(
        ["/ip6/::ffff:127.0.0.1/tcp/4021", "/ip6/::ffff:0.0.0.0/tcp/4021", "/ip6/::ffff:192.168.1.7/tcp/4021"]
    )
    assert addrs == ["/ip6/::ffff:192.168.1.7/tcp/4021"]


class _Lan:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.namespaces = [f"cn-mdns-{tag}-a", f"cn-mdns-{tag}-b"]
        self.ips = ["10.231.0.1", "10.231.0.2"]
        self.links = [f"mda{tag}", f"mdb{tag}"]

    def __enter__(self) -> _Lan:
        try:
            self._make()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _make(self) -> None:
        for ns in self.namespaces:
            netns_add(ns)
        ip("link", "add", self.links[0], "netns", self.namespaces[0], "type", "veth", "peer", "name", self.links[1])
        ip("link", "set", self.links[1], "netns", self.namespaces[1])
        for ns, link, address in zip(self.namespaces, self.links, self.ips, strict=True):
            ip("addr", "add", f"{address}/24", "dev", link, ns=ns)
            ip("link", "set", link, "up", ns=ns)
            # A home LAN's default route: where multicast to 224.0.0.251 goes out.
            ip("route", "add", "default", "dev", link, ns=ns)

    def __exit__(self, *exc: object) -> None:
        ip("link", "delete", self.links[1], check=False)  # left in this namespace if the move failed
        for ns in self.namespaces:
            ip("netns", "delete", ns, check=False)


def _api(ns: str, data_dir: Path, path: str) -> dict[str, Any]:
    try:
        running = json.loads((data_dir / "node.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    url = str(running.get("api_url") or "")
    done = exec_in(
        ns,
        ["curl", "-sf", "--max-time", "3", "-H", "@-", url.rstrip("/") + path],
        input=f"authorization: Bearer {read_api_token(data_dir)}\n",
        check=False,
    )
    return dict(json.loads(done.stdout)) if done.returncode == 0 and done.stdout else {}


@pytest.fixture
def lan() -> Iterator[_Lan]:
    with _Lan() as made:
        yield made


@needs_netns
def test_two_home_nodes_with_no_bootstrap_peer_find_each_other_on_the_lan(lan: _Lan, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CLAWNODE_ESCROW_MODE": "off",
        "CLAWNODE_BOOTSTRAP_USE_DEFAULTS": "false",
        "CLAWNODE_NODE_REACHABILITY": "public",  # no AutoNAT wait: the LAN is all there is
    }
    env.pop("CLAWNODE_DATA_DIR", None)
    procs: list[subprocess.Popen[bytes]] = []
    dirs = [tmp_path / "a", tmp_path / "b"]
    try:
        for ns, address, data_dir in zip(lan.namespaces, lan.ips, dirs, strict=True):
            argv = [sys.executable, "-m", "node.cli", "start", "--data-dir", str(data_dir)]
            argv += ["--listen", f"/ip4/{address}/tcp/4021", "--api-port", "0"]
            with (tmp_path / f"{ns}.log").open("wb") as log:
                procs.append(run_in(ns, argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        seen: list[dict[str, Any]] = [{}, {}]
        while time.monotonic() < deadline:
            seen = [_api(ns, d, "/api/peers") for ns, d in zip(lan.namespaces, dirs, strict=True)]
            ids = [_api(ns, d, "/api/status").get("peer_id") for ns, d in zip(lan.namespaces, dirs, strict=True)]
            both = all(
                any(
                    p.get("peer_id") == other and p.get("connected") and p.get("in_routing_table")
                    for p in s.get("peers", [])
                )
                for s, other in zip(seen, reversed(ids), strict=True)
            )
            if both and all(ids):
                break
            assert all(proc.poll() is None for proc in procs), "a daemon exited"
            time.sleep(0.3)
        else:
            logs = [(tmp_path / f"{ns}.log").read_text(errors="replace")[-1500:] for ns in lan.namespaces]
            pytest.fail(f"the two nodes did not find each other: {seen}\n{logs}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
