"""A tiny STUN-like responder and the client probes the classifier runs (RFC 5780 in spirit).

Not STUN on the wire: one JSON object per UDP datagram, which keeps both ends ~100 lines.

Responder (``python -m nat.harness.stun serve --bind IP:PORT --alt-port P2 --other IP2:PORT2``):

- UDP on ``IP:PORT`` and ``IP:P2``; a request ``{"id": ..., "change": "none"|"port"|"ip"}`` is
  answered with ``{"id", "mapped": "ip:port" (the source it saw), "from": "ip:port"}``:
  ``none`` from the socket that got it, ``port`` from the other port, ``ip`` by the *other* helper
  (the request is forwarded there as ``{"relay": {...}}`` and answered from ``IP2:PORT2``).
- TCP on ``IP:PORT``: writes ``{"mapped": "ip:port"}`` and closes.

Client (``python -m nat.harness.stun probe --primary IP:PORT --alt-port P2 --other IP2:PORT2``) runs
the whole test sequence and prints the evidence as JSON (see ``run_probes``).
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import threading
import time
import uuid
from typing import Any

Addr = tuple[str, int]


def parse_addr(text: str) -> Addr:
    host, _, port = text.rpartition(":")
    return host, int(port)


def fmt_addr(addr: Addr) -> str:
    return f"{addr[0]}:{addr[1]}"


# ---------------------------------------------------------------------------------------------
# responder


def serve(bind: Addr, alt_port: int, other: Addr | None) -> None:
    primary = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    primary.bind(bind)
    alt = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    alt.bind((bind[0], alt_port))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(bind)
    listener.listen(64)
    threading.Thread(target=_serve_tcp, args=(listener,), daemon=True).start()
    print("READY", flush=True)
    socks = [primary, alt]
    while True:
        readable, _, _ = select.select(socks, [], [])
        for sock in readable:
            try:
                data, src = sock.recvfrom(2048)
                msg = json.loads(data)
            except (OSError, ValueError):
                continue
            if not isinstance(msg, dict):
                continue
            if "relay" in msg:  # forwarded by the other helper: answer from our primary address
                relay = msg["relay"]
                reply = {"id": relay.get("id"), "mapped": relay.get("mapped"), "from": fmt_addr(bind)}
                _send(primary, reply, parse_addr(str(relay.get("to"))))
                continue
            change = msg.get("change", "none")
            reply = {"id": msg.get("id"), "mapped": fmt_addr(src)}
            if change == "port":
                out = alt if sock is primary else primary
            elif change == "ip" and other is not None:
                _send(primary, {"relay": {**reply, "to": fmt_addr(src)}}, other)
                continue
            else:
                out = sock
            reply["from"] = fmt_addr(out.getsockname())
            _send(out, reply, src)


def _send(sock: socket.socket, msg: dict[str, Any], to: Addr) -> None:
    try:
        sock.sendto(json.dumps(msg).encode(), to)
    except OSError:
        pass


def _serve_tcp(listener: socket.socket) -> None:
    while True:
        try:
            conn, src = listener.accept()
        except OSError:
            continue
        with conn:
            try:
                conn.sendall(json.dumps({"mapped": fmt_addr(src)}).encode())
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# client probes


def udp_request(
    sock: socket.socket, server: Addr, change: str = "none", *, timeout: float = 1.0, interval: float = 0.2
) -> dict[str, Any] | None:
    """Send a request (resent every ``interval``) and wait for its answer; ``None`` if none came.

    The answer carries ``mapped`` (our address as the responder saw it) and ``src`` (where the
    answer really came from, as our kernel saw it)."""
    results = udp_requests([(sock, server, change)], timeout=timeout, interval=interval)
    return results[0]


def udp_requests(
    requests: list[tuple[socket.socket, Addr, str]], *, timeout: float = 1.0, interval: float = 0.2
) -> list[dict[str, Any] | None]:
    """Several requests at once (one per socket), sharing one wait window."""
    ids = [uuid.uuid4().hex for _ in requests]
    results: list[dict[str, Any] | None] = [None] * len(requests)
    deadline = time.monotonic() + timeout
    next_send = 0.0
    while time.monotonic() < deadline and any(r is None for r in results):
        now = time.monotonic()
        if now >= next_send:
            for (sock, server, change), rid, res in zip(requests, ids, results, strict=True):
                if res is None:
                    try:
                        sock.sendto(json.dumps({"id": rid, "change": change}).encode(), server)
                    except OSError:
                        pass
            next_send = now + interval
        pending = [sock for (sock, _, _), res in zip(requests, results, strict=True) if res is None]
        wait = max(0.0, min(next_send, deadline) - time.monotonic())
        readable, _, _ = select.select(pending, [], [], wait)
        for sock in readable:
            try:
                data, src = sock.recvfrom(2048)
                msg = json.loads(data)
            except (OSError, ValueError):
                continue
            for k, ((s, _, _), rid) in enumerate(zip(requests, ids, strict=True)):
                if s is sock and isinstance(msg, dict) and msg.get("id") == rid:
                    results[k] = {"mapped": msg.get("mapped"), "from": msg.get("from"), "src": fmt_addr(src)}
    return results


def tcp_mapped(server: Addr, local_port: int = 0, *, timeout: float = 2.0) -> tuple[str | None, int]:
    """Connect (from ``local_port``, reusable) and read the address the responder saw."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.settimeout(timeout)
    try:
        sock.bind(("0.0.0.0", local_port))
        port = sock.getsockname()[1]
        sock.connect(server)
        data = b""
        while chunk := sock.recv(2048):
            data += chunk
        return str(json.loads(data)["mapped"]), port
    except (OSError, ValueError, KeyError):
        return None, local_port
    finally:
        sock.close()


def _udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    return sock


def run_probes(primary: Addr, alt_port: int, other: Addr, *, timeout: float = 1.0) -> dict[str, Any]:
    """The RFC 5780-style sequence, from this host (inside the LAN namespace).

    mapping: one UDP socket asks ``primary``, ``other`` (another IP) and ``primary_ip:alt_port``
    (another port) what source they saw. filtering: fresh sockets (no prior state at the NAT) ask
    ``primary`` to answer from another IP (``change=ip``), from another port (``change=port``),
    and, as a control, normally. tcp: two connections from the same local port to ``primary`` and
    ``other``.
    """
    alt = (primary[0], alt_port)
    local = _udp_socket()
    try:
        answers = {}
        for label, server in (("primary", primary), ("other_ip", other), ("other_port", alt)):
            got = udp_request(local, server, timeout=timeout)
            answers[label] = got["mapped"] if got else None
        mapping = {"local": fmt_addr(local.getsockname()), **answers}
    finally:
        local.close()

    socks = {name: _udp_socket() for name in ("control", "change_ip", "change_port")}
    try:
        results = udp_requests(
            [
                (socks["control"], primary, "none"),
                (socks["change_ip"], primary, "ip"),
                (socks["change_port"], primary, "port"),
            ],
            timeout=timeout,
        )
        filtering = dict(zip(socks, results, strict=True))
    finally:
        for sock in socks.values():
            sock.close()

    first, port = tcp_mapped(primary, timeout=2 * timeout)
    second, _ = tcp_mapped(other, port, timeout=2 * timeout) if first else (None, 0)
    tcp = {"local_port": port, "primary": first, "other_ip": second}
    return {"mapping": mapping, "filtering": filtering, "tcp": tcp}


def punch(local_port: int, peer: Addr, duration: float = 2.0, interval: float = 0.1) -> dict[str, Any]:
    """Naive UDP hole punch: send to ``peer`` from ``local_port`` every ``interval`` for ``duration``;
    report what arrived (the other side runs the same at the same time)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", local_port))
    received: list[str] = []
    deadline = time.monotonic() + duration
    try:
        while time.monotonic() < deadline:
            try:
                sock.sendto(b"punch", peer)
            except OSError:
                pass
            readable, _, _ = select.select([sock], [], [], interval)
            if readable:
                try:
                    data, src = sock.recvfrom(2048)
                except OSError:
                    continue
                if data == b"punch":
                    received.append(fmt_addr(src))
    finally:
        sock.close()
    return {"local_port": local_port, "peer": fmt_addr(peer), "received_from": sorted(set(received))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nat.harness.stun")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve", help="run the responder")
    p_serve.add_argument("--bind", required=True, help="ip:port (UDP + TCP)")
    p_serve.add_argument("--alt-port", type=int, required=True, help="second UDP port on the same ip")
    p_serve.add_argument("--other", help="ip:port of the helper that answers change=ip requests")
    p_probe = sub.add_parser("probe", help="run the classifier's probes and print the evidence as JSON")
    p_probe.add_argument("--primary", required=True)
    p_probe.add_argument("--alt-port", type=int, required=True)
    p_probe.add_argument("--other", required=True)
    p_probe.add_argument("--timeout", type=float, default=1.0)
    p_punch = sub.add_parser("punch", help="naive simultaneous-send UDP hole punch; prints what arrived")
    p_punch.add_argument("--local-port", type=int, required=True)
    p_punch.add_argument("--peer", required=True, help="the peer's public ip:port")
    p_punch.add_argument("--duration", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.cmd == "punch":
        json.dump(punch(args.local_port, parse_addr(args.peer), args.duration), sys.stdout)
        sys.stdout.write("\n")
        return 0
    if args.cmd == "serve":
        serve(parse_addr(args.bind), args.alt_port, parse_addr(args.other) if args.other else None)
        return 0
    evidence = run_probes(parse_addr(args.primary), args.alt_port, parse_addr(args.other), timeout=args.timeout)
    json.dump(evidence, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
