"""A relay that goes away: its reservation and circuit addresses go with it, another relay is used,
and the lost one is reserved on again as soon as it is back (real relays and nodes on loopback)."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.host.ping import ID as PING_PROTOCOL

from nat.relay import RETRY_MAX_S, retry_delay
from node.config import Config, RelaySection
from node.daemon import Node
from node.natmatrix import make_identity
from tests.support.processes import DaemonProcess
from tests.test_relay import config

if TYPE_CHECKING:
    from trio_typing import TaskStatus


async def _run(
    node: Node, scope: trio.CancelScope, *, task_status: TaskStatus[Node] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run ``node`` until ``scope`` is cancelled (a relay going away: its connections close)."""
    with scope:
        await node.run(task_status=task_status)


def _relay_config(port: int = 0) -> Config:
    cfg = config("relay")
    return cfg.model_copy(update={"node": cfg.node.model_copy(update={"listen": [f"/ip4/127.0.0.1/tcp/{port}"]})})


def _named(private: Node, relay_id: str) -> tuple[bool, bool]:
    """Whether ``relay_id`` appears in the private node's status, and in its capability record."""
    in_status = any(r.relay == relay_id for r in private.status().relay_reservations)
    record = private.publisher.record
    in_record = record is not None and any(relay_id in addr for addr in record.addrs)
    return in_status, in_record


def test_retry_delay_doubles_from_1_s_to_60_s() -> None:
    assert [retry_delay(n) for n in range(9)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert retry_delay(10_000) == RETRY_MAX_S


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_killed_relay_is_dropped_at_once_and_used_again_when_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay is a real ``clawnode start --role relay`` process, killed with SIGKILL and started
    again with the same identity and port."""
    caplog.set_level(logging.DEBUG, logger="nat.relay")
    port = _free_port()
    relay_id = make_identity(tmp_path / "relay")
    relay_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{relay_id}"
    env = {"CLAWNODE_ESCROW_MODE": "off", "CLAWNODE_BOOTSTRAP_USE_DEFAULTS": "false"}
    args = ["--listen", f"/ip4/127.0.0.1/tcp/{port}", "--api-port", "0", "--role", "relay"]
    relay = DaemonProcess(tmp_path / "relay", args, env)
    await trio.to_thread.run_sync(relay.start)
    try:
        async with trio.open_nursery() as nursery:
            private = Node(
                config("node", "private", RelaySection(static_relays=[relay_addr], min_relays=1)),  # type: ignore[call-arg]
                tmp_path / "private",
            )
            await nursery.start(private.run)
            with trio.fail_after(15):
                while _named(private, relay_id) != (True, True):
                    await trio.sleep(0.1)

            # Killed: within 10 s neither status nor record names it.
            relay.kill()
            lost_at = time.monotonic()
            with trio.fail_after(10):
                while _named(private, relay_id) != (False, False):
                    await trio.sleep(0.1)
            dropped_s = time.monotonic() - lost_at
            assert private.relay is not None and private.relay.lost_total == 1

            # Down for 4 s: re-dialled with backoff (1, 2, 4 s ...: failed dials at about 1 and 3 s, the
            # next at 7 s), never in a tight loop nor every second (4 by then), few log lines.
            caplog.clear()
            await trio.sleep(4)
            dials = private.relay._failures.get(relay_id).failures
            assert 1 <= dials <= 3, dials
            lines = [r.getMessage() for r in caplog.records if r.name == "nat.relay" and r.levelno >= logging.INFO]
            assert len(lines) <= 3, lines

            # Back with the same identity and address: reserved on again within 10 s of the start
            # command (the process itself takes ~2 s to start).
            back_at = time.monotonic()
            await trio.to_thread.run_sync(relay.start)
            with trio.fail_after(10):
                while _named(private, relay_id) != (True, True):
                    await trio.sleep(0.1)
            print(
                f"relay killed -> dropped in {dropped_s:.2f} s; {dials} dials and {len(lines)} log lines"
                f" in 4 s down; restarted -> reserved again in {time.monotonic() - back_at:.2f} s"
            )
            nursery.cancel_scope.cancel()
    finally:
        relay.kill()


async def test_with_three_relays_the_record_names_only_live_ones(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        scopes: dict[str, trio.CancelScope] = {}
        addrs: dict[str, str] = {}
        for name in ("relay1", "relay2", "relay3"):
            relay = Node(_relay_config(), tmp_path / name)
            scope = trio.CancelScope()
            await nursery.start(_run, relay, scope)
            scopes[str(relay.host.get_id())] = scope
            addrs[str(relay.host.get_id())] = relay.listen_addrs()[0]
        private = Node(
            config("node", "private", RelaySection(static_relays=list(addrs.values()), min_relays=2)),  # type: ignore[call-arg]
            tmp_path / "private",
        )
        await nursery.start(private.run)
        with trio.fail_after(15):
            while len(private.status().relay_reservations) < 2:
                await trio.sleep(0.1)
        first = private.status().relay_reservations[0].relay
        scopes[first].cancel()
        with trio.fail_after(10):
            while True:
                held = {r.relay for r in private.status().relay_reservations}
                if first not in held and len(held) == 2:
                    break
                await trio.sleep(0.1)
        assert _named(private, first) == (False, False)
        record = private.publisher.record
        assert record is not None
        circuits = [addr for addr in record.addrs if "/p2p-circuit" in addr]
        assert circuits and all(any(relay in addr for relay in held) for addr in circuits)
        nursery.cancel_scope.cancel()


async def test_a_relay_that_stops_answering_is_dropped_by_the_ping_probe(tmp_path: Path) -> None:
    """A hung relay (or a connection a NAT forgot): nothing closes, but pings go unanswered."""
    async with trio.open_nursery() as nursery:
        relay = Node(_relay_config(), tmp_path / "relay")
        await nursery.start(_run, relay, trio.CancelScope())
        relay_id = str(relay.host.get_id())
        private = Node(
            # A probe every second, two pings of 2 s unanswered (defaults 5 s and 4 s): the same probe,
            # a drop within ~5 s instead of ~13 s.
            config(
                "node",
                "private",
                RelaySection(  # type: ignore[call-arg]
                    static_relays=relay.listen_addrs(), min_relays=1, probe_interval_s=1.0, probe_timeout_s=2.0
                ),
            ),
            tmp_path / "private",
        )
        await nursery.start(private.run)
        with trio.fail_after(15):
            while _named(private, relay_id) != (True, True):
                await trio.sleep(0.1)

        async def hang(stream: INetStream) -> None:
            await trio.sleep_forever()

        relay.host.set_stream_handler(PING_PROTOCOL, hang)
        hung_at = time.monotonic()
        # probe every 1 s, two pings of 2 s each unanswered: <= 5 s, with room for a loaded CI box
        with trio.fail_after(20):
            while _named(private, relay_id) != (False, False):
                await trio.sleep(0.1)
        print(f"hung relay dropped after {time.monotonic() - hung_at:.2f} s")
        assert private.relay is not None and private.relay.lost_total == 1
        nursery.cancel_scope.cancel()
