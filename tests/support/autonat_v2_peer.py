"""A clawnode AutoNAT v2 node as a process, driven like tests/interop/js/peer.mjs (one JSON line per
request and reply), for tests that must run it inside a network namespace.

    python -m tests.support.autonat_v2_peer /ip4/11.0.0.1/tcp/0 [more listen addresses]

First line: ``{"event":"ready","peer_id":...,"addrs":[...]}``. Commands:
``connect {addr}`` -> {peer_id} (and waits until identify says the peer serves AutoNAT v2);
``ask {peer_id, addrs?}`` -> {outcome, addr, dial_data} (about ``addrs``, else this node's own addresses);
``counts`` -> the server side's counts; ``exit``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from nat.autonat_v2 import AutoNatV2, AutoNatV2Settings
from nat.autonat_v2_wire import DIAL_REQUEST_PROTOCOL
from node.host import build_dialer_host, build_host

# Public-looking addresses only (no allow_private): what a node on the internet does.
SETTINGS = AutoNatV2Settings(peer_interval_s=0.0, check_interval_s=0, min_servers=1)


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def main(listen: list[str]) -> None:
    host = build_host(generate_new_ed25519_identity())
    async with host.run([multiaddr.Multiaddr(addr) for addr in listen]), trio.open_nursery() as nursery:
        autonat = AutoNatV2(host, SETTINGS, build_dialer=build_dialer_host)
        await nursery.start(autonat.run)

        async def connect(addr: str) -> dict[str, Any]:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            await host.connect(info)
            while DIAL_REQUEST_PROTOCOL not in _protocols(info.peer_id):
                await trio.sleep(0.05)
            return {"peer_id": str(info.peer_id)}

        def _protocols(peer_id: ID) -> list[str]:
            try:
                return [str(p) for p in host.get_peerstore().get_protocols(peer_id)]
            except Exception:  # noqa: BLE001 - not identified yet
                return []

        async def ask(peer_id: str, addrs: list[str] | None) -> dict[str, Any]:
            answer = await autonat.ask(ID.from_base58(peer_id), addrs or autonat.candidates())
            return {"outcome": answer.outcome, "addr": answer.addr, "dial_data": answer.dial_data}

        send({"event": "ready", "peer_id": str(host.get_id()), "addrs": [str(a) for a in host.get_addrs()]})
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffer = b""
        while True:
            chunk = await stdin.receive_some(65536)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                request = json.loads(line)
                request_id, cmd = request.get("id"), request.get("cmd")
                try:
                    with trio.fail_after(20):
                        if cmd == "connect":
                            reply = await connect(request["addr"])
                        elif cmd == "ask":
                            reply = await ask(request["peer_id"], request.get("addrs"))
                        elif cmd == "counts":
                            counts = autonat.counts
                            reply = {
                                "served": dict(counts.served),
                                "dials": counts.dials,
                                "dial_data_requested": counts.dial_data_requested,
                                "dial_data_received": counts.dial_data_received,
                            }
                        elif cmd == "exit":
                            send({"id": request_id, "ok": True})
                            nursery.cancel_scope.cancel()
                            return
                        else:
                            raise ValueError(f"unknown command {cmd}")
                except Exception as error:  # noqa: BLE001 - every failure is a reply
                    send({"id": request_id, "ok": False, "error": f"{type(error).__name__}: {error}"})
                else:
                    send({"id": request_id, "ok": True, **reply})
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1:])
