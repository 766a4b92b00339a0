"""Three real ``clawnode start`` processes: they find each other, stop cleanly on
SIGTERM, and rejoin from their peer books when the bootstrap peer is gone."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from tests.support.processes import LOOPBACK_ANY_PORT, DaemonProcess, run_cli


def tcp_port(multiaddr: str) -> int:
    parts = multiaddr.split("/")
    return int(parts[parts.index("tcp") + 1])


def test_three_daemons_find_each_other_stop_cleanly_and_rejoin_without_bootstrap(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    bootstrap = DaemonProcess(tmp_path / "bootstrap", [*LOOPBACK_ANY_PORT, "--role", "bootstrap"]).start()
    daemons.append(bootstrap)
    bootstrap_addr = bootstrap.identity()["listen_addrs"][0]
    alice = DaemonProcess(tmp_path / "alice", [*LOOPBACK_ANY_PORT, "--bootstrap", bootstrap_addr]).start()
    daemons.append(alice)
    bob = DaemonProcess(tmp_path / "bob", [*LOOPBACK_ANY_PORT, "--bootstrap", bootstrap_addr]).start()
    daemons.append(bob)

    ids = {name: d.identity() for name, d in (("bootstrap", bootstrap), ("alice", alice), ("bob", bob))}
    peer_ids = {name: identity["peer_id"] for name, identity in ids.items()}
    alice.wait_for_peers({peer_ids["bootstrap"], peer_ids["bob"]})
    bob.wait_for_peers({peer_ids["bootstrap"], peer_ids["alice"]})
    bootstrap.wait_for_peers({peer_ids["alice"], peer_ids["bob"]})

    listed = run_cli("peers", "--data-dir", str(alice.data_dir))
    assert listed.returncode == 0, listed.stderr
    assert peer_ids["bob"] in listed.stdout and peer_ids["bootstrap"] in listed.stdout
    status = run_cli("status", "--data-dir", str(alice.data_dir))
    assert status.returncode == 0, status.stderr
    assert peer_ids["alice"] in status.stdout
    assert "2 connected" in status.stdout

    ports = {name: tcp_port(identity["listen_addrs"][0]) for name, identity in ids.items()}
    for daemon in (bootstrap, alice, bob):
        code, seconds = daemon.stop()
        assert code == 0, daemon.log()[-2000:]
        assert seconds < 5.0, f"took {seconds:.1f} s to stop"
        assert run_cli("status", "--data-dir", str(daemon.data_dir)).returncode == 3

    # The bootstrap peer stays down; alice and bob come back on their old ports.
    alice = DaemonProcess(
        alice.data_dir,
        ["--listen", f"/ip4/127.0.0.1/tcp/{ports['alice']}", "--api-port", "0", "--bootstrap", bootstrap_addr],
    ).start()
    daemons.append(alice)
    bob = DaemonProcess(
        bob.data_dir,
        ["--listen", f"/ip4/127.0.0.1/tcp/{ports['bob']}", "--api-port", "0", "--bootstrap", bootstrap_addr],
    ).start()
    daemons.append(bob)
    assert alice.identity()["peer_id"] == peer_ids["alice"]
    assert bob.identity()["peer_id"] == peer_ids["bob"]
    alice.wait_for_peers({peer_ids["bob"]})
    bob.wait_for_peers({peer_ids["alice"]})


def test_identity_and_token_are_private_files_never_shown(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    node = DaemonProcess(tmp_path / "n", LOOPBACK_ANY_PORT).start()
    daemons.append(node)
    for name in ("identity.key", "api.token"):
        mode = stat.S_IMODE(os.stat(node.data_dir / name).st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    token = (node.data_dir / "api.token").read_text().strip()
    key_bytes = (node.data_dir / "identity.key").read_bytes()
    outputs = [
        run_cli(command, "--json", "--data-dir", str(node.data_dir)).stdout for command in ("id", "status", "peers")
    ]
    assert json.loads(outputs[0]) == node.identity()  # the CLI prints what the API (and the other tests) read
    node.stop()
    outputs.append(node.log())
    for output in outputs:
        assert token not in output
        assert key_bytes.hex() not in output
        assert str(tmp_path) not in output, "a local file path leaked"


def test_api_refuses_a_missing_or_wrong_token(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    import httpx

    node = DaemonProcess(tmp_path / "n", LOOPBACK_ANY_PORT).start()
    daemons.append(node)
    api_url = node.identity()["api_url"]
    for headers in ({}, {"authorization": "Bearer wrong"}):
        reply = httpx.get(f"{api_url}/api/status", headers=headers, timeout=5)
        assert reply.status_code == 401
        assert reply.json()["error"]["code"] == "E_UNAUTHENTICATED"


def test_a_second_daemon_on_a_taken_port_refuses_to_start(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    first = DaemonProcess(tmp_path / "first", LOOPBACK_ANY_PORT).start()
    daemons.append(first)
    identity = first.identity()
    p2p_port = tcp_port(identity["listen_addrs"][0])
    api_port = identity["api_url"].rsplit(":", 1)[1]

    same_listen = run_cli(
        "start", "--data-dir", str(tmp_path / "second"), "--listen", f"/ip4/127.0.0.1/tcp/{p2p_port}",
        "--api-port", "0",
    )  # fmt: skip
    assert same_listen.returncode == 4
    assert "E_UNAVAILABLE" in same_listen.stderr and "node.listen" in same_listen.stderr

    same_api = run_cli(
        "start", "--data-dir", str(tmp_path / "third"), "--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", api_port,
    )  # fmt: skip
    assert same_api.returncode == 4
    assert "E_UNAVAILABLE" in same_api.stderr and "api.port" in same_api.stderr
    assert "Traceback" not in same_api.stderr and str(tmp_path) not in same_api.stderr

    assert first.process is not None and first.process.poll() is None
    assert first.identity()["peer_id"] == identity["peer_id"]
