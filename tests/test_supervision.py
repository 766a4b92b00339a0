"""Issue 14: no service's exception can end the node. A service that fails after it came up is
restarted with backoff, counted and alerted on, and every other service keeps running."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from node.config import AlertsSection, EscrowSection
from node.daemon import Node
from node.datadir import read_api_token
from node.router import Router
from protocols.background import Supervisor, next_backoff
from runtime.service import ServiceRegistry
from tests.support.market import market_config, metric_samples

if TYPE_CHECKING:
    from trio_typing import TaskStatus


def test_backoff_doubles_while_failing_and_starts_over_after_a_healthy_run() -> None:
    waits: list[float] = []
    delay = None
    for _ in range(8):
        delay = next_backoff(delay, 0.1, initial_s=1.0, max_s=60.0, healthy_s=60.0)
        waits.append(delay)
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60]
    assert next_backoff(60.0, 120.0, initial_s=1.0, max_s=60.0, healthy_s=60.0) == 1.0


async def test_a_supervised_failure_restarts_that_service_only() -> None:
    supervisor = Supervisor(initial_backoff_s=0.01)
    runs, ticks = [], []

    async def flaky(*, task_status: TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        runs.append(1)
        task_status.started("ready")
        await trio.sleep(0.01)
        if len(runs) <= 3:
            raise ExceptionGroup("a nursery inside the service", [ValueError("boom")])
        await trio.sleep_forever()

    async def steady(*, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            ticks.append(1)
            await trio.sleep(0.005)

    async def never_ready(*, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise OSError("port taken")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            assert await nursery.start(supervisor.run, "flaky", flaky) == "ready"
            await nursery.start(supervisor.run, "steady", steady)
            while len(runs) < 4:
                await trio.sleep(0.01)
            before = len(ticks)
            await trio.sleep(0.05)
            assert len(ticks) > before  # the sibling never stopped
            assert supervisor.restarts == {"flaky": 3, "steady": 0}
            assert supervisor.last_failure["flaky"] == "ValueError"
            # A service that never came up fails the start, as before: the node says it cannot start.
            with pytest.raises(OSError):
                await nursery.start(supervisor.run, "never_ready", never_ready)
            nursery.cancel_scope.cancel()


async def _get(node: Node, path: str) -> httpx.Response:
    token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
    async with httpx.AsyncClient() as client:
        return await client.get(f"{node.api_url}{path}", headers={"authorization": f"Bearer {token}"}, timeout=10)


async def test_a_crashing_service_is_restarted_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Router.run
    crashes: list[int] = []

    async def crashes_twice(self: Router, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if len(crashes) < 2:
            task_status.started()
            await trio.sleep(0.05)
            crashes.append(1)
            raise RuntimeError("a bug in one service")
        await original(self, task_status=task_status)

    monkeypatch.setattr(Router, "run", crashes_twice)
    base = market_config(bootstrap=[])
    config = base.model_copy(
        update={
            "escrow": EscrowSection(mode="off"),  # type: ignore[call-arg]
            "alerts": AlertsSection(interval_s=0.1),
        }
    )
    node = Node(config, tmp_path / "node", services=ServiceRegistry())
    node.supervisor.initial_backoff_s = 0.05
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            while node.supervisor.restarts["router"] < 2:
                await trio.sleep(0.05)
            # Still one node: its API answers, the DHT and the publisher never stopped.
            status = await _get(node, "/api/status")
            assert status.status_code == 200 and status.json()["peer_id"] == str(node.host.get_id())
            assert node.dht.kad is not None and node.publisher.sealed is not None
            samples = metric_samples((await _get(node, "/metrics")).text)
            assert samples['clawnode_service_restarts_total{service="router"}'] == 2
            assert samples['clawnode_service_restarts_total{service="dht"}'] == 0
            firing: list[dict[str, Any]] = []
            while not any(a["name"] == "ServiceRestarting" for a in firing):
                await trio.sleep(0.1)
                firing = (await _get(node, "/api/alerts")).json()["alerts"]
            alert = next(a for a in firing if a["name"] == "ServiceRestarting")
            assert alert["labels"].get("service") == "router", alert
            nursery.cancel_scope.cancel()
