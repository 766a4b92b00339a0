"""A peer that sends garbage on every protocol the node speaks cannot crash it."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr

from dht.protocol_id import use_kad_protocol_id
from node.host import build_host
from tests.support.processes import DaemonProcess, run_cli

PING = TProtocol("/ipfs/ping/1.0.0")


def garbage_payloads(rng: random.Random) -> list[bytes]:
    return [
        b"",
        b"\x00",
        b"\xff" * 10,  # a varint that never ends
        b"\xff\xff\xff\xff\xff\xff\xff\x7f",  # a length prefix of ~2^56 bytes
        b"\x05\x08\x96\x01",  # a truncated protobuf behind a plausible length
        rng.randbytes(37),
        rng.randbytes(4096),
        rng.randbytes(1 << 20),
    ]


async def spray(host: object, peer_id: object, protocol: TProtocol, payload: bytes) -> None:
    with trio.move_on_after(5):
        try:
            stream = await host.new_stream(peer_id, [protocol])  # type: ignore[attr-defined]
            await stream.write(payload)
            with trio.move_on_after(0.2):
                await stream.read(1024)
            await stream.close()
        except Exception:  # noqa: BLE001 - the node is allowed to hang up on us
            pass


def raw_tcp_garbage(port: int, rng: random.Random) -> None:
    openings = [
        rng.randbytes(512),
        b"\x13/multistream/1.0.0\n" + rng.randbytes(256),
        b"\x13/multistream/1.0.0\n\x07/noise\n" + rng.randbytes(2048),
    ]
    for opening in openings:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(opening)
            sock.settimeout(0.5)
            try:
                sock.recv(1024)
            except OSError:
                pass


async def test_garbage_on_every_protocol_leaves_the_node_running(tmp_path: Path) -> None:
    use_kad_protocol_id()
    node = DaemonProcess(tmp_path / "target", ["--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0"]).start()
    try:
        target_addr = node.identity()["listen_addrs"][0]
        target = info_from_p2p_addr(multiaddr.Multiaddr(target_addr))
        rng = random.Random(20261121)
        attacker = build_host(generate_new_ed25519_identity())
        async with attacker.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            with trio.fail_after(20):
                await attacker.connect(target)
                protocols: list[str] = []
                while not protocols:
                    await trio.sleep(0.1)
                    protocols = list(attacker.get_peerstore().get_protocols(target.peer_id))
            spoken = [TProtocol(p) for p in protocols]
            assert "/clawnode/kad/1.0.0" in spoken and "/ipfs/id/1.0.0" in spoken

            with trio.fail_after(120):
                for protocol in spoken:
                    for payload in garbage_payloads(rng):
                        await spray(attacker, target.peer_id, protocol, payload)
            port = int(target_addr.split("/tcp/")[1].split("/")[0])
            await trio.to_thread.run_sync(raw_tcp_garbage, port, rng)

            assert node.process is not None and node.process.poll() is None, node.log()[-3000:]
            with trio.fail_after(10):
                await attacker.connect(target)
                stream = await attacker.new_stream(target.peer_id, [PING])
                probe = rng.randbytes(32)
                await stream.write(probe)
                echoed = b""
                while len(echoed) < 32:
                    echoed += await stream.read(32 - len(echoed))
                assert echoed == probe
        status = await trio.to_thread.run_sync(lambda: run_cli("status", "--data-dir", str(node.data_dir)))
        assert status.returncode == 0, status.stderr
        code, took_s = node.stop()
        print(f"stopped in {took_s:.2f} s")
        assert code == 0, node.log()[-3000:]
    finally:
        node.kill()
