"""UPnP port mapping (nat.upnp) against a real miniupnpd in a router namespace of the NAT harness.

Needs root, `ip`, `nft` and Debian's `miniupnpd` (skipped otherwise). About 15 s.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nat.harness.netns import NatType, Topology, missing_requirements, netns_list
from nat.harness.upnpd import NFT_TABLE, missing_miniupnpd, start_miniupnpd, stun_response

_MISSING = missing_requirements() if sys.platform == "linux" else "Linux network namespaces only"
if _MISSING is None:
    _MISSING = missing_miniupnpd()
needs_upnpd = pytest.mark.skipif(_MISSING is not None, reason=f"UPnP harness: {_MISSING}")

INTERNAL_PORT = 4100

# Runs in the LAN host's namespace: a TCP echo server on INTERNAL_PORT and UpnpService mapping it.
# Protocol on stdout: one JSON object per line with an "event" key; "stop" on stdin ends the service.
_CLIENT = r"""
import json, sys, time
import trio, miniupnpc
from nat.upnp import UpnpService, UpnpSettings

PORT = int(sys.argv[1]); LEASE = int(sys.argv[2]); DISCOVER_MS = int(sys.argv[3])

def emit(event, **kw):
    print(json.dumps({"event": event, **kw}), flush=True)

def igd_lookup(ports):
    u = miniupnpc.UPnP(); u.discoverdelay = 1000  # the delay UpnpService's own search uses
    if not u.discover():
        return {"igd": False}
    u.selectigd()
    out = {"igd": True}
    for proto, port in ports:
        entry = u.getspecificportmapping(port, proto)
        out[f"{proto}/{port}"] = list(entry) if entry else None
    return out

async def echo(stream):
    async with stream:
        async for data in stream:
            await stream.send_all(data)

async def main():
    changes = []
    settings = UpnpSettings(lease_s=LEASE, renew_fraction=0.5, discover_timeout_ms=DISCOVER_MS,
                            description="clawnode-test", retry_initial_s=1.0, retry_interval_s=2.0)
    # The port listens for QUIC too (as a node with /udp/PORT/quic-v1 would): its UDP mapping is advertised.
    service = UpnpService(settings, lambda: [PORT], quic_ports=lambda: [PORT], on_change=changes.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_tcp, echo, PORT)
        svc_scope = trio.CancelScope()
        done = trio.Event()
        async def run_service(task_status=trio.TASK_STATUS_IGNORED):
            try:
                with svc_scope:
                    await service.run(task_status=task_status)
            finally:
                done.set()
        t0 = trio.current_time()
        await nursery.start(run_service)
        if LEASE == 0:  # no-IGD mode: report the first settled state
            while service.state in ("searching",):
                await trio.sleep(0.05)
            emit("settled", after_s=trio.current_time() - t0, summary=service.summary())
            svc_scope.cancel()
            nursery.cancel_scope.cancel()
            return
        while service.state != "mapped" and trio.current_time() - t0 < 10:
            await trio.sleep(0.05)
        mapped_s = trio.current_time() - t0
        summary = service.summary()
        ports = [(m["proto"], m["external_port"]) for m in summary["mappings"]]
        emit("mapped", after_s=mapped_s, summary=summary, addrs=service.external_addrs(),
             igd=await trio.to_thread.run_sync(igd_lookup, ports))
        while not (summary["mappings"] and all(m["renewals"] >= 1 for m in service.summary()["mappings"])):
            if trio.current_time() - t0 > 20:
                break
            await trio.sleep(0.1)
        emit("renewed", after_s=trio.current_time() - t0, summary=service.summary())
        await trio.to_thread.run_sync(sys.stdin.readline)
        svc_scope.cancel()
        await done.wait()
        emit("stopped", summary=service.summary(), changes=changes,
             igd=await trio.to_thread.run_sync(igd_lookup, ports))
        nursery.cancel_scope.cancel()

trio.run(main)
"""

_CONNECT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
s.sendall(b"hello through upnp")
data = b""
while len(data) < 18:
    chunk = s.recv(64)
    if not chunk:
        break
    data += chunk
sys.exit(0 if data == b"hello through upnp" else 3)
"""


def test_stun_binding_response() -> None:
    txid = bytes(range(12))
    request = struct.pack("!HHI", 0x0001, 8, 0x2112A442) + txid + struct.pack("!HHI", 0x0003, 4, 0x6)
    reply = stun_response(request, ("203.0.113.101", 40000))
    assert reply is not None
    msg_type, length, cookie = struct.unpack("!HHI", reply[:8])
    assert (msg_type, cookie, reply[8:20], len(reply)) == (0x0101, 0x2112A442, txid, 20 + length)
    attrs = {}
    body = reply[20:]
    while body:
        kind, size = struct.unpack("!HH", body[:4])
        attrs[kind] = body[4 : 4 + size]
        body = body[4 + size :]
    family_port = struct.unpack("!BBH", attrs[0x0001][:4])
    assert family_port == (0, 1, 40000) and socket.inet_ntoa(attrs[0x0001][4:]) == "203.0.113.101"
    xport = struct.unpack("!H", attrs[0x0020][2:4])[0] ^ 0x2112
    xip = bytes(a ^ b for a, b in zip(attrs[0x0020][4:], struct.pack("!I", 0x2112A442), strict=True))
    assert (xport, socket.inet_ntoa(xip)) == (40000, "203.0.113.101")
    assert stun_response(b"\x00\x01" + request[2:4] + b"\x00" * 16, ("1.2.3.4", 1)) is None  # no magic cookie
    assert stun_response(request[:10], ("1.2.3.4", 1)) is None


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with Topology({"r1": NatType.PORT_RESTRICTED, "r2": NatType.PORT_RESTRICTED}, hosts_per_lan=2) as topology:
        t0 = time.monotonic()
        start_miniupnpd(topology, "r1")
        topology.miniupnpd_start_s = time.monotonic() - t0  # type: ignore[attr-defined]
        yield topology
    assert [n for n in netns_list() if n.startswith(topology.prefix + "-")] == []


def _spawn(
    topo: Topology, router: str, lease: int, discover_ms: int = 2000, port: int = INTERNAL_PORT
) -> subprocess.Popen[str]:
    host = topo.router(router).hosts[0]
    return topo.run_in(
        host.ns,
        [sys.executable, "-c", _CLIENT, str(port), str(lease), str(discover_ms)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_event(proc: subprocess.Popen[str], name: str) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        assert proc.stderr is not None
        proc.wait(timeout=5)
        pytest.fail(f"client exited ({proc.returncode}) before {name!r}: {proc.stderr.read()[-3000:]}")
    event = json.loads(line)
    assert event["event"] == name, event
    return event


def _connect(topo: Topology, ip: str, port: int) -> int:
    helper = topo.helpers[0]  # 203.0.113.11
    return topo.exec_in(helper.ns, [sys.executable, "-c", _CONNECT, ip, str(port)], check=False).returncode


def _nft_upnp(topo: Topology) -> str:
    return topo.exec_in(topo.router("r1").ns, ["nft", "list", "table", "inet", NFT_TABLE]).stdout


@needs_upnpd
def test_maps_renews_and_removes(topo: Topology) -> None:
    r1 = topo.router("r1")
    lease = 2
    proc = _spawn(topo, "r1", lease)
    try:
        mapped = _read_event(proc, "mapped")
        summary = mapped["summary"]
        assert summary["state"] == "mapped", summary
        assert summary["external_ip"] == r1.wan_ip == "203.0.113.101"
        assert summary["internal_ip"] == r1.hosts[0].ip
        by_proto = {m["proto"]: m for m in summary["mappings"]}
        assert set(by_proto) == {"TCP", "UDP"}
        ext = by_proto["TCP"]["external_port"]
        assert ext == INTERNAL_PORT  # the same external port is free, so it is taken
        assert by_proto["UDP"]["external_port"] == ext
        advertised = [f"/ip4/203.0.113.101/tcp/{ext}", f"/ip4/203.0.113.101/udp/{ext}/quic-v1"]
        assert mapped["addrs"] == advertised
        # the IGD itself holds both mappings, to the LAN host
        for proto in ("TCP", "UDP"):
            entry = mapped["igd"][f"{proto}/{ext}"]
            assert entry is not None and entry[0] == r1.hosts[0].ip and entry[1] == INTERNAL_PORT, mapped["igd"]
        rules = _nft_upnp(topo)
        assert f"th dport {ext} dnat ip to {r1.hosts[0].ip}:{INTERNAL_PORT}" in rules
        assert rules.count(f"dnat ip to {r1.hosts[0].ip}:{INTERNAL_PORT}") == 2  # TCP and UDP
        # inbound TCP from the internet reaches the LAN server through the mapping
        assert _connect(topo, r1.wan_ip, ext) == 0

        renewed = _read_event(proc, "renewed")
        assert renewed["after_s"] - mapped["after_s"] >= lease * 0.5 - 0.2
        assert all(m["renewals"] >= 1 for m in renewed["summary"]["mappings"]), renewed
        assert renewed["summary"]["state"] == "mapped"
        # still reachable after the original lease would have run out
        time.sleep(max(0.0, lease + 0.5 - (renewed["after_s"] - mapped["after_s"])))
        assert _connect(topo, r1.wan_ip, ext) == 0

        assert proc.stdin is not None
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        stopped = _read_event(proc, "stopped")
        assert stopped["summary"]["mappings"] == []
        assert stopped["igd"]["TCP/" + str(ext)] is None and stopped["igd"]["UDP/" + str(ext)] is None
        assert stopped["changes"][0] == advertised and stopped["changes"][-1] == []
        assert f"dnat ip to {r1.hosts[0].ip}:{INTERNAL_PORT}" not in _nft_upnp(topo)
        assert _connect(topo, r1.wan_ip, ext) != 0
        proc.wait(timeout=5)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


_PREMAP = r"""
import sys, miniupnpc
u = miniupnpc.UPnP(); u.discoverdelay = 1000
u.discover(); u.selectigd()
port = int(sys.argv[2])
if sys.argv[1] == "add":
    u.addportmapping(port, "TCP", u.lanaddr, port, "someone else", "", 60)
else:
    u.deleteportmapping(port, "TCP")
"""


@needs_upnpd
def test_taken_port_gets_another(topo: Topology) -> None:
    r1 = topo.router("r1")
    port = INTERNAL_PORT + 100
    other = r1.hosts[1]  # 192.168.1.11 already holds external TCP `port`
    topo.exec_in(other.ns, [sys.executable, "-c", _PREMAP, "add", str(port)])
    proc = _spawn(topo, "r1", 2, port=port)
    try:
        mapped = _read_event(proc, "mapped")
        by_proto = {m["proto"]: m for m in mapped["summary"]["mappings"]}
        ext = by_proto["TCP"]["external_port"]
        assert ext != port and by_proto["TCP"]["internal_port"] == port
        assert by_proto["UDP"]["external_port"] == ext  # UDP follows the TCP external port
        assert mapped["igd"][f"TCP/{ext}"][0] == r1.hosts[0].ip
        assert mapped["addrs"] == [f"/ip4/{r1.wan_ip}/tcp/{ext}", f"/ip4/{r1.wan_ip}/udp/{ext}/quic-v1"]
        assert _connect(topo, r1.wan_ip, ext) == 0
        _read_event(proc, "renewed")
        assert proc.stdin is not None
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        stopped = _read_event(proc, "stopped")
        assert stopped["igd"][f"TCP/{ext}"] is None
        proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        topo.exec_in(other.ns, [sys.executable, "-c", _PREMAP, "delete", str(port)], check=False)


@needs_upnpd
def test_no_igd(topo: Topology) -> None:
    discover_ms = 2000
    proc = _spawn(topo, "r2", 0, discover_ms)  # r2 runs no miniupnpd
    try:
        settled = _read_event(proc, "settled")
        assert settled["summary"]["state"] == "no-igd", settled
        assert settled["summary"]["last_error"] == "no-igd"
        assert settled["summary"]["mappings"] == [] and settled["summary"]["external_ip"] is None
        assert settled["after_s"] < discover_ms / 1000 + 0.5
        proc.wait(timeout=5)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
