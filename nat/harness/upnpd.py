"""A real UPnP IGD for the NAT harness: Debian's ``miniupnpd`` (nftables build) in a router namespace.

``miniupnpd`` refuses a documentation/private address (our routers' WAN side is 203.0.113.0/24) as its
external address unless it learns it by STUN, so this module also carries a minimal RFC 5389 Binding
responder (``python -m nat.harness.upnpd stun --bind IP:PORT``), run on the relay host at
``UPNP_STUN_PORT`` (3480: the JSON responder of ``nat.harness.stun`` owns 3478/3479 on the helpers).
The responder ignores CHANGE-REQUEST and answers every request from the address it came to, which is
what miniupnpd's NAT test expects from a router that is directly on the internet (all four replies
arrive, mapped port == local port: "unrestricted", port forwarding enabled).

Blocking (``subprocess``); root only. Everything started here is registered with the topology, so
``Topology.destroy()`` stops it; the config directory is gone once ``start_miniupnpd`` returns.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nat.harness.netns import HarnessError, Router, Topology

UPNP_STUN_PORT = 3480
UPNP_HTTP_PORT = 5000  # miniupnpd's HTTP (SOAP) port on the router's LAN address
NFT_TABLE = "miniupnpd"  # miniupnpd's own ``table inet``: filter + nat chains

_MAGIC_COOKIE = 0x2112A442
_BINDING_REQUEST = 0x0001
_BINDING_SUCCESS = 0x0101
_ATTR_MAPPED_ADDRESS = 0x0001
_ATTR_XOR_MAPPED_ADDRESS = 0x0020


# ---------------------------------------------------------------------------------------------
# STUN (RFC 5389) Binding responder


def stun_response(request: bytes, addr: tuple[str, int]) -> bytes | None:
    """The Binding success response to ``request`` from ``addr`` (``None`` when it is not a Binding request)."""
    if len(request) < 20:
        return None
    msg_type, _length, cookie = struct.unpack("!HHI", request[:8])
    if msg_type != _BINDING_REQUEST or cookie != _MAGIC_COOKIE:
        return None
    txid = request[8:20]
    host, port = addr
    ip_bytes = socket.inet_aton(host)
    mapped = struct.pack("!BBH", 0, 1, port) + ip_bytes
    xport = port ^ (_MAGIC_COOKIE >> 16)
    xip = bytes(b ^ c for b, c in zip(ip_bytes, struct.pack("!I", _MAGIC_COOKIE), strict=True))
    xor_mapped = struct.pack("!BBH", 0, 1, xport) + xip
    attrs = struct.pack("!HH", _ATTR_XOR_MAPPED_ADDRESS, 8) + xor_mapped
    attrs += struct.pack("!HH", _ATTR_MAPPED_ADDRESS, 8) + mapped
    return struct.pack("!HHI", _BINDING_SUCCESS, len(attrs), _MAGIC_COOKIE) + txid + attrs


def serve_stun(bind: str) -> None:
    host, _, port = bind.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, int(port)))
    print("READY", flush=True)
    while True:
        data, addr = sock.recvfrom(2048)
        reply = stun_response(data, addr)
        if reply is not None:
            sock.sendto(reply, addr)


def start_stun(topology: Topology, port: int = UPNP_STUN_PORT) -> None:
    """Start the RFC 5389 responder on the relay host (idempotent per topology)."""
    if getattr(topology, "_upnp_stun_port", None) == port:
        return
    proc = topology.run_in(
        topology.relay.ns,
        [sys.executable, "-m", "nat.harness.upnpd", "stun", "--bind", f"{topology.relay.ip}:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        raise HarnessError(f"STUN responder did not start: {line!r}")
    topology._upnp_stun_port = port  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# miniupnpd


def missing_miniupnpd() -> str | None:
    """Why miniupnpd cannot run here (``None`` when it can)."""
    if shutil.which("miniupnpd") is None and not Path("/usr/sbin/miniupnpd").exists():
        return "needs `miniupnpd` (apt-get install -y miniupnpd)"
    return None


def _miniupnpd_bin() -> str:
    return shutil.which("miniupnpd") or "/usr/sbin/miniupnpd"


_CHAINS = """\
table inet {table} {{
    chain forward {{
        type filter hook forward priority filter - 5; policy accept;
        jump miniupnpd
    }}
    chain miniupnpd {{
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat - 5; policy accept;
        jump prerouting_miniupnpd
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat - 5; policy accept;
        jump postrouting_miniupnpd
    }}
    chain prerouting_miniupnpd {{
    }}
    chain postrouting_miniupnpd {{
    }}
}}
"""

_CONFIG = """\
ext_ifname={wan}
listening_ip={lan}
http_port={http_port}
enable_upnp=yes
enable_natpmp=yes
{stun}secure_mode=yes
system_uptime=no
notify_interval=60
clean_ruleset_interval=600
uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07{index}
friendly_name=clawnat {name}
upnp_table_name={table}
upnp_nat_table_name={table}
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
allow 1024-65535 {subnet} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""


def _wait_http(router: Router, topology: Topology, deadline: float) -> None:
    probe = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(0.5)\n"
        f"sys.exit(s.connect_ex(({router.lan_ip!r}, {UPNP_HTTP_PORT})))\n"
    )
    while time.monotonic() < deadline:
        if topology.exec_in(router.ns, [sys.executable, "-c", probe], check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise HarnessError(f"[{router.ns}] miniupnpd did not open its HTTP port")


def restore_chains(topology: Topology, router_name: str) -> None:
    """(Re)create miniupnpd's empty nftables chains in router ``router_name``: reloading the router's
    NAT rules (``Topology.set_nat``: ``flush ruleset``) deletes them, and a running miniupnpd then
    refuses every mapping (``Action Failed``): a matrix repetition after the first had no mapping."""
    router = topology.router(router_name)
    topology.exec_in(
        router.ns,
        ["nft", "-f", "-"],
        input=f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n" + _CHAINS.format(table=NFT_TABLE),
    )


def start_miniupnpd(
    topology: Topology, router_name: str, *, timeout: float = 15.0, log_path: Path | None = None, stun: bool = True
) -> None:
    """Start miniupnpd (UPnP IGD + NAT-PMP) in router ``router_name`` and wait until it serves.

    Starts the STUN responder on the relay host, creates miniupnpd's nftables chains (``table inet
    miniupnpd``), writes the config to a
    temporary directory and runs ``miniupnpd -d`` under the topology, so ``destroy()`` stops it. The
    directory is removed as soon as miniupnpd has read its config and serves (also on failure);
    miniupnpd's debug output goes to ``log_path`` when given (the caller owns that file), else to an
    unlinked file that vanishes with the process.
    """
    missing = missing_miniupnpd()
    if missing:
        raise HarnessError(missing)
    router = topology.router(router_name)
    if stun:
        start_stun(topology)
    restore_chains(topology, router_name)
    tmp = Path(tempfile.mkdtemp(prefix="clawnat-miniupnpd-"))
    try:
        conf = tmp / "miniupnpd.conf"
        conf.write_text(
            _CONFIG.format(
                wan=router.wan_if,
                lan=router.lan_if,
                http_port=UPNP_HTTP_PORT,
                stun=(
                    "ext_perform_stun=yes\n"
                    f"ext_stun_host={topology.relay.ip}\n"
                    f"ext_stun_port={getattr(topology, '_upnp_stun_port', UPNP_STUN_PORT)}\n"
                    if stun
                    else ""
                ),
                index=router.index % 10,
                name=router.name,
                table=NFT_TABLE,
                subnet=router.lan_subnet,
            )
        )
        with open(log_path or tmp / "miniupnpd.log", "w+") as log:
            proc = topology.run_in(
                router.ns,
                [_miniupnpd_bin(), "-d", "-f", str(conf), "-P", str(tmp / "miniupnpd.pid")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                _wait_http(router, topology, time.monotonic() + timeout)
            except HarnessError:
                proc.terminate()
                proc.wait(timeout=5)
                log.seek(0)
                raise HarnessError(f"[{router.ns}] miniupnpd failed to start: {log.read()[-2000:]}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nat.harness.upnpd")
    sub = parser.add_subparsers(dest="cmd", required=True)
    stun = sub.add_parser("stun", help="RFC 5389 Binding responder")
    stun.add_argument("--bind", required=True, help="IP:PORT")
    args = parser.parse_args(argv)
    if args.cmd == "stun":
        try:
            serve_stun(args.bind)
        except KeyboardInterrupt:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
