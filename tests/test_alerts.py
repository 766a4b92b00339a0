"""Alerts: the shipped rules, the evaluator (a promtool-like check of every rule), and the daemon's view.

``node/alerts.yml`` must parse with the daemon's evaluator and name only metrics ``/metrics``
exports; every rule fires on one side of its threshold only, and only after its ``for:``; a node
whose chain is down with a settlement waiting shows the alert in ``GET /api/alerts``.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import httpx
import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dht.discovery import DiscoveryQuery
from node.alerts import (
    MAX_POINTS_PER_WINDOW,
    AlertEvaluator,
    Rule,
    Sample,
    default_rules_text,
    load_rules,
    parse_duration,
    parse_expr,
    parse_rules,
)
from node.config import AlertsSection, EscrowSection
from node.daemon import Node
from node.datadir import read_api_token
from runtime.errors import ClawnodeError
from runtime.ledger import EscrowRef, LeaseOpen
from runtime.service import ServiceRegistry
from tests.support.market import market_config, market_nodes

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

STEP_S = 30.0


def _exported_names(text: str) -> set[str]:
    """Every sample name a /metrics body can carry, counters' ``_total`` included even without samples."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    return names


async def _get(node: Node, path: str) -> httpx.Response:
    token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
    async with httpx.AsyncClient() as client:
        return await client.get(f"{node.api_url}{path}", headers={"authorization": f"Bearer {token}"})


# -- (a) the shipped rules parse, and name only metrics the node exports --


async def test_shipped_rules_parse_and_reference_exported_metrics() -> None:
    raw = yaml.safe_load(default_rules_text())
    assert all(
        set(rule) >= {"alert", "expr", "for", "labels", "annotations"} for g in raw["groups"] for rule in g["rules"]
    )
    rules = load_rules(None)
    names = {rule.name for rule in rules}
    assert {"SettlementQueueBacklog", "SettlementQueueStalled", "LedgerWriteFailures", "LeaseFailureRate"} <= names
    assert {"EscrowChainDisconnected", "SettlementsFailing"} <= names
    assert {rule.severity for rule in rules} == {"P0", "P1"}
    assert all(rule.summary for rule in rules)
    async with market_nodes([{}]) as (nodes, _):
        reply = await _get(nodes[0], "/metrics")
        assert reply.status_code == 200
        exported = _exported_names(reply.text)
        for rule in rules:
            assert rule.expr.metric in exported, f"{rule.name} uses {rule.expr.metric}, which /metrics lacks"
        for name in (
            "clawnode_tokens_served_total",
            "clawnode_tokens_bought_total",
            "clawnode_lease_failures_total",
            "clawnode_dht_lookup_seconds_bucket",
            "clawnode_inference_first_token_seconds_bucket",
            "clawnode_inference_duration_seconds_count",
            "clawnode_settlements_failed_total",
            "clawnode_settlement_retries_total",
            "clawnode_escrow_disconnected",
        ):
            assert name in exported, name
        # A refused open is counted by operation and code; a lookup is timed.
        with pytest.raises(ClawnodeError):
            await nodes[0].market.open_lease("not-a-peer", "model:words")
        await nodes[0].discover(DiscoveryQuery(capability="model:words"))
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families((await _get(nodes[0], "/metrics")).text)
            for s in family.samples
        }
        assert samples[("clawnode_lease_failures_total", (("code", "E_INVALID_ARGUMENT"), ("op", "open")))] == 1
        assert samples[("clawnode_dht_lookup_seconds_count", ())] == 1
        assert samples[("clawnode_tokens_served_total", ())] == 0
        # Nothing fires on a healthy idle node.
        nodes[0].alerting.evaluator = AlertEvaluator(rules)
        await nodes[0].alerting.evaluate_once()
        alerts = (await _get(nodes[0], "/api/alerts")).json()
        assert alerts == {"alerts": []}


def test_the_supported_subset_and_what_it_refuses() -> None:
    expr = parse_expr('sum(increase(clawnode_lease_failures_total{op="call",code!="E_TIMEOUT"}[1h30m])) > 2')
    assert (expr.func, expr.metric, expr.window_s, expr.summed, expr.op, expr.threshold) == (
        "increase",
        "clawnode_lease_failures_total",
        5400.0,
        True,
        ">",
        2.0,
    )
    assert expr.matchers == (("op", "=", "call"), ("code", "!=", "E_TIMEOUT"))
    assert parse_expr("rate(x_total[5m]) <= 0.5").func == "rate"
    assert parse_duration("0s") == 0 and parse_duration("90s") == 90 and parse_duration("2h") == 7200
    for bad in ("avg(x) > 1", "x > y", "x + 1 > 2", "rate(x) > 1", "sum(x > 1", "x{a=~'b'} > 1", "rate(x[0s]) > 0"):
        with pytest.raises(ValueError):
            parse_expr(bad)
    with pytest.raises(ValueError, match="severity"):
        parse_rules("groups: [{name: g, rules: [{alert: A, expr: x > 1, labels: {severity: P7}}]}]")
    with pytest.raises(ValueError, match="only alerting rules"):
        parse_rules("groups: [{name: g, rules: [{record: r, expr: x}]}]")
    with pytest.raises(ClawnodeError) as refused:
        load_rules(Path("/nonexistent/secret-place/rules.yml"))
    assert "secret-place" not in refused.value.message


# -- (b) promtool-equivalent: every shipped rule over synthetic series --


def _series(rule: Rule, t: float, above: bool) -> list[Sample]:
    """Samples at time ``t`` for the rule's metric: past its threshold when ``above``, short of it otherwise."""
    expr = rule.expr
    assert expr.op == ">", "the shipped rules all alert on `>`"
    labels = frozenset((label, value) for label, op, value in expr.matchers if op == "=")
    target = expr.threshold + 1 if above else expr.threshold * 0.5
    if expr.func is None:
        value = target
    else:
        # A counter rising evenly: its increase over the window is ``target`` (its rate target/window).
        slope = target / expr.window_s if expr.func == "increase" else target
        value = slope * t
    samples: list[Sample] = [(expr.metric, labels, value)]
    if expr.summed:  # a second series that adds nothing: sum() must still see the first
        samples.append((expr.metric, labels | {("zz", "other")}, 0.0))
    return samples


@pytest.mark.parametrize("rule", load_rules(None), ids=lambda rule: rule.name)
def test_each_rule_fires_past_its_threshold_only_after_its_for(rule: Rule) -> None:
    horizon = rule.expr.window_s + rule.for_s + 10 * STEP_S
    steps = int(horizon // STEP_S) + 1

    quiet = AlertEvaluator([rule])
    for i in range(steps):
        quiet.step(_series(rule, i * STEP_S, above=False), 1_000_000 + i * STEP_S)
        assert quiet.alerts() == [], f"{rule.name} fired short of its threshold at step {i}"

    loud = AlertEvaluator([rule])
    first_active: float | None = None
    fired_at: float | None = None
    for i in range(steps):
        now = 1_000_000 + i * STEP_S
        loud.step(_series(rule, i * STEP_S, above=True), now)
        alerts = loud.alerts()
        assert len(alerts) <= 1
        if alerts and first_active is None:
            first_active = now
        if first_active is not None:
            assert alerts, f"{rule.name} stopped holding while its series stayed past the threshold"
            state = alerts[0].state
            assert state == ("firing" if now - first_active >= rule.for_s else "pending"), (rule.name, now)
            if state == "firing" and fired_at is None:
                fired_at = now
                assert alerts[0].severity == rule.severity and alerts[0].summary == rule.summary
    assert first_active is not None, f"{rule.name} never held past its threshold"
    assert first_active - 1_000_000 <= rule.expr.window_s, "a range rule holds once its window is full"
    assert fired_at is not None and fired_at - first_active == pytest.approx(STEP_S * -(-rule.for_s // STEP_S)), (
        "firing waits for `for:`, no more than one evaluation longer"
    )

    # The condition stops holding: the alert is gone.
    loud.step(_series(rule, 0.0, above=False) if rule.expr.func is None else [], 1_000_000 + steps * STEP_S)
    if rule.expr.func is None:
        assert loud.alerts() == []


def test_evaluator_counter_resets_matchers_and_per_series_alerts() -> None:
    (rule,) = parse_rules(
        """
groups:
  - name: t
    rules:
      - alert: CallFailures
        expr: increase(fail_total{op="call"}[2m]) > 3
        for: 0s
        labels: {severity: P1}
        annotations: {summary: calls fail}
"""
    )
    evaluator = AlertEvaluator([rule])
    call = frozenset({("op", "call"), ("code", "E_TIMEOUT")})
    other = frozenset({("op", "open"), ("code", "E_TIMEOUT")})
    # 5 → 8 → (restart) 2: an increase of 3 + 2 = 5, past the threshold despite the reset.
    for t, value in ((0, 5.0), (30, 8.0), (60, 2.0)):
        evaluator.step([("fail_total", call, value), ("fail_total", other, value * 100)], t)
    (alert,) = evaluator.alerts()
    assert alert.state == "firing" and alert.labels == {"op": "call", "code": "E_TIMEOUT"}
    # Old samples leave the window: no more increase, no more alert.
    for t in (200, 230):
        evaluator.step([("fail_total", call, 2.0)], t)
    assert evaluator.alerts() == []


# -- (c) a stalled settlement queue, in a running node whose chain is down --


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


TEST_RULES = """
groups:
  - name: test
    rules:
      - alert: SettlementQueueStalled
        expr: clawnode_settlement_queue_oldest_age_seconds > 1
        for: 1s
        labels: {severity: P0}
        annotations: {summary: the oldest pending settlement is old}
      - alert: EscrowChainDisconnected
        expr: clawnode_escrow_disconnected > 0
        for: 1s
        labels: {severity: P0}
        annotations: {summary: the escrow chain is unreachable}
"""


async def test_a_stalled_queue_fires_in_a_running_node(tmp_path: Path, scan_logs_for_secrets: list[str]) -> None:
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(TEST_RULES)
    rpc_url = f"http://127.0.0.1:{_closed_port()}/secret-rpc-key"
    scan_logs_for_secrets.append("secret-rpc-key")
    base = market_config(bootstrap=[])
    config = base.model_copy(
        update={
            "escrow": EscrowSection(  # type: ignore[call-arg]
                mode="rpc", rpc_url=rpc_url, contract="0x" + "11" * 20, rpc_timeout_s=1, settle_interval_s=0.5
            ),
            "alerts": AlertsSection(interval_s=0.2, rules=str(rules_file)),
        }
    )
    node = Node(config, tmp_path / "node", services=ServiceRegistry())
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        me = str(node.host.get_id())
        lease_id = secrets.token_hex(32)
        escrow = EscrowRef(contract="0x" + "11" * 20, payer="0x" + "22" * 20, escrow_id="0x" + lease_id)
        await node.ledger.open_lease(
            LeaseOpen(
                lease_id=lease_id, role="consumer", provider=me, consumer=me, price_per_unit=1, budget=10, escrow=escrow
            ),
            idempotency_key=f"open/{lease_id}",
        )
        await node.ledger.enqueue_refund(lease_id)

        firing: dict[str, dict[str, str]] = {}
        with trio.fail_after(30):
            while set(firing) != {"SettlementQueueStalled", "EscrowChainDisconnected"}:
                await trio.sleep(0.2)
                reply = await _get(node, "/api/alerts")
                assert reply.status_code == 200
                firing = {a["name"]: a for a in reply.json()["alerts"] if a["state"] == "firing"}
        stalled = firing["SettlementQueueStalled"]
        assert stalled["severity"] == "P0" and stalled["summary"] and stalled["since"].endswith("Z")

        # (d) neither /metrics nor /api/alerts carries the token, the RPC URL or a local path.
        token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
        metrics = (await _get(node, "/metrics")).text
        alerts = (await _get(node, "/api/alerts")).text
        assert "clawnode_settlement_queue_length 1.0" in metrics
        for body in (metrics, alerts):
            for secret in (token, rpc_url, "secret-rpc-key", str(tmp_path), "/tmp/", str(rules_file)):
                assert secret not in body
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{node.api_url}/api/alerts")).status_code == 401
        nursery.cancel_scope.cancel()


async def test_fresh_node_with_connected_chain_has_no_escrow_alert(tmp_path: Path) -> None:
    # The first evaluation runs while the embedded chain is still starting: an escrow state nobody
    # knows yet is not a disconnected chain, and must not put a P0 beside "Escrow: embedded, connected".
    node = Node(market_config(bootstrap=[]), tmp_path / "node", services=ServiceRegistry())
    assert node.config.escrow.mode == "embedded"
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        with trio.fail_after(60):
            while node.escrow_status.state != "connected":
                await trio.sleep(0.05)
        summary = (await _get(node, "/api/ledger/summary")).json()
        assert summary["escrow"]["mode"] == "embedded" and summary["escrow"]["state"] == "connected"
        alerts = (await _get(node, "/api/alerts")).json()["alerts"]
        assert "EscrowChainDisconnected" not in {alert["name"] for alert in alerts}, alerts
        await node.alerting.evaluate_once()
        assert (await _get(node, "/api/alerts")).json() == {"alerts": []}
        nursery.cancel_scope.cancel()


def test_a_metric_not_set_yet_fires_nothing() -> None:
    rules = parse_rules(
        """
groups:
  - name: g
    rules:
      - alert: NotZero
        expr: clawnode_x != 0
        for: 0s
        labels: {severity: P0}
        annotations: {summary: x is not zero}
"""
    )
    evaluator = AlertEvaluator(rules)
    evaluator.step([], 0.0)  # absent from /metrics
    evaluator.step([("clawnode_x", frozenset(), float("nan"))], STEP_S)  # exported as NaN
    assert evaluator.alerts() == []
    evaluator.step([("clawnode_x", frozenset(), 1.0)], 2 * STEP_S)
    assert [alert.name for alert in evaluator.alerts()] == ["NotZero"]


# -- (d) the history stays bounded: hours of one-second evaluations --


def _node_like_samples(t: float) -> list[Sample]:
    """What a busy node's /metrics looks like to the evaluator: the shipped rules' metrics, rising,
    and many series no rule reads (histogram buckets, per-peer gauges)."""
    samples: list[Sample] = []
    for code in ("E_TIMEOUT", "E_UNAVAILABLE", "E_INSUFFICIENT_FUNDS", "E_FORBIDDEN"):
        for op in ("open", "call"):
            samples.append(("clawnode_lease_failures_total", frozenset({("code", code), ("op", op)}), t // 600))
    for name in (
        "clawnode_settlements_failed_total",
        "clawnode_settlement_retries_total",
        "clawnode_service_restarts_total",
    ):
        samples.append((name, frozenset(), 0.0))
    for name in ("clawnode_settlement_queue_length", "clawnode_settlement_queue_oldest_age_seconds"):
        samples.append((name, frozenset(), 1.0))
    samples.append(("clawnode_escrow_disconnected", frozenset(), 0.0))
    for bucket in range(40):
        samples.append(("clawnode_dht_lookup_seconds_bucket", frozenset({("le", str(bucket))}), t))
    for peer in range(40):
        samples.append(("clawnode_peer_rtt_seconds", frozenset({("peer", f"p{peer}")}), 0.01))
    return samples


def test_history_is_bounded_over_hours_of_evaluations() -> None:
    rules = load_rules(None)
    evaluator = AlertEvaluator(rules)
    sizes: dict[int, int] = {}
    start = 1_000_000.0
    for i in range(2 * 3600 + 1):  # two hours (twice the longest window), evaluated every second
        evaluator.step(_node_like_samples(float(i)), start + i)
        if i % 1800 == 0:
            sizes[i // 60] = evaluator.history.points()
    range_series = 8 + 3  # the counters a rate/increase rule reads
    bound = range_series * (MAX_POINTS_PER_WINDOW + 3) + 20  # + the instant rules' latest values
    assert max(sizes.values()) <= bound, sizes
    assert sizes[120] == sizes[90] == sizes[60], f"the history still grows after its longest window: {sizes}"
    # Series no rule reads keep nothing (before: every one, for the longest window + 60 s).
    assert not any(name.endswith("_bucket") or "rtt" in name for name, _ in evaluator.history.series)
    assert not any("rtt" in name for name, _ in evaluator.history.latest)
    # Downsampling keeps the answer: each of the 8 series rose from 6300 // 600 to 7200 // 600 in
    # the last 15 minutes (the window's first point is at most one resolution step late).
    (failures,) = [rule for rule in rules if rule.name == "LeaseFailureRate"]
    (value,) = evaluator.history.vector(failures.expr, start + 2 * 3600).values()
    assert value == 8 * (7200 // 600 - 6300 // 600)
    print(f"history points every 30 min over 2 h: {sizes}")
