"""``/metrics`` in the Prometheus text format: what an operator graphs and alerts on.

Rendered per scrape from the node's live state and its ledger, into a fresh registry, so a value
is never stale and nothing is double-registered across the many nodes one test process runs.
No label carries a token, an endpoint or a path: peers appear only as counts.

Latencies (DHT lookups, local and leased inference) are accumulated in ``LatencyHistogram``s that
live on the node's parts and are copied into each scrape as Prometheus histograms, like the time
a successful hole punch took.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from node.conn_guard import guard_of
from runtime.files import save_failures
from runtime.telemetry import LatencyHistogram

if TYPE_CHECKING:
    from libp2p.abc import IHost

    from nat.holepunch import HolePunchService
    from nat.relay import RelayService
    from nat.upnp import UpnpService
    from node.api import EscrowStatus, StatusReply
    from node.router import Router
    from protocols.background import Supervisor
    from protocols.lease import LeaseMarket
    from runtime.ledger import Ledger
    from runtime.settlement.reconcile import Reconciler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

SETTLEMENT_PAGE = 1000


class MetricsSource(Protocol):
    """What a scrape reads of the node (``node.daemon.Node`` is one): metrics never import the daemon."""

    @property
    def host(self) -> IHost: ...

    @property
    def relay(self) -> RelayService | None: ...

    @property
    def holepunch(self) -> HolePunchService | None: ...

    @property
    def upnp(self) -> UpnpService | None: ...

    @property
    def escrow_status(self) -> EscrowStatus: ...

    @property
    def escrow_problem(self) -> str | None: ...

    @property
    def reconciler(self) -> Reconciler | None: ...

    @property
    def supervisor(self) -> Supervisor: ...

    @property
    def market(self) -> LeaseMarket: ...

    @property
    def dht_lookup_s(self) -> LatencyHistogram: ...

    @property
    def router(self) -> Router: ...

    @property
    def ledger(self) -> Ledger: ...

    def status(self) -> StatusReply: ...

    def skipped_offers(self) -> dict[str, str]: ...


def _histogram(name: str, help_text: str, by_via: Iterable[tuple[str, LatencyHistogram]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_text, labels=["via"])
    for via, hist in by_via:
        family.add_metric([via], hist.cumulative(), hist.total_s)
    return family


def _nat_traversal(node: MetricsSource) -> list[Metric]:
    """Relay dials, hole punches, connections by path and the UPnP mapping."""
    families: list[Metric] = []
    relay = node.relay
    if relay is not None:
        dials = CounterMetricFamily(
            "clawnode_relay_dials", "circuits this node dialed through a relay, by outcome", labels=["outcome"]
        )
        for outcome, count in relay.dials.items():
            dials.add_metric([outcome], count)
        families.append(dials)
        if relay.serve_hop:
            carried = CounterMetricFamily(
                "clawnode_relay_circuit_bytes", "bytes this relay carried on circuits between other peers"
            )
            carried.add_metric([], relay.relayed.bytes)
            cut = CounterMetricFamily(
                "clawnode_relay_circuits_cut",
                "circuits this relay cut at a limit ([relay] max_circuit_bytes / max_circuit_duration_s)",
                labels=["limit"],
            )
            for limit, count in relay.relayed.cut.items():
                cut.add_metric([limit], count)
            families += [carried, cut]
    punch = node.holepunch
    if punch is not None:
        punches = CounterMetricFamily(
            "clawnode_hole_punches",
            "hole punches (DCUtR) this node started or answered, by outcome: direct or failed (the relay stays)",
            labels=["outcome"],
        )
        for outcome, count in punch.counts.items():
            punches.add_metric([outcome], count)
        took = HistogramMetricFamily(
            "clawnode_hole_punch_seconds", "from the start of a successful hole punch to the direct connection"
        )
        took.add_metric([], punch.direct_after_s.cumulative(), punch.direct_after_s.total_s)
        connections = GaugeMetricFamily(
            "clawnode_connections", "connected peers by path: direct or relayed", labels=["path"]
        )
        for path, count in punch.connections_by_path().items():
            connections.add_metric([path], count)
        families += [punches, took, connections]
    upnp = node.upnp
    if upnp is not None:
        mapped = GaugeMetricFamily(
            "clawnode_upnp_mappings", "port mappings held on the home router by UPnP, by protocol", labels=["proto"]
        )
        held = Counter(str(m["proto"]) for m in upnp.summary()["mappings"])
        for proto in ("TCP", "UDP"):
            mapped.add_metric([proto], held[proto])
        families.append(mapped)
    return families


def _inbound_connections(node: MetricsSource) -> list[Metric]:
    """Inbound connections the guard refused or timed out, and those in their handshake now."""
    guard = guard_of(node.host.get_network())
    if guard is None:
        return []
    refused = CounterMetricFamily(
        "clawnode_inbound_refused",
        "inbound connections refused: per_ip / total pending limit, gate, inbound_full, per_ip_inbound",
        labels=["reason"],
    )
    for reason in ("per_ip", "total", "gate", "inbound_full", "per_ip_inbound"):
        refused.add_metric([reason], guard.refused[reason])
    timed_out = CounterMetricFamily(
        "clawnode_inbound_handshake_timeouts", "inbound connections closed unfinished at node.handshake_timeout_s"
    )
    timed_out.add_metric([], guard.timed_out)
    pending = GaugeMetricFamily("clawnode_inbound_pending", "inbound connections in their handshake now")
    pending.add_metric([], guard.pending_total)
    return [refused, timed_out, pending]


def _sandbox(node: MetricsSource) -> list[Metric]:
    """Sandboxed task runs (runtime/sandbox): runs, kills by limit, refusals and refused system calls."""
    stats = getattr(node, "sandbox_stats", None)
    if stats is None:
        return []
    runs = CounterMetricFamily("clawnode_sandbox_runs", "sandboxed task runs started, by kind", labels=["kind"])
    for kind in ("wasm", "native"):
        runs.add_metric([kind], stats.runs[kind])
    kills = CounterMetricFamily(
        "clawnode_sandbox_kills", "sandboxed runs stopped by a limit, by kind and limit", labels=["kind", "limit"]
    )
    for (kind, limit), count in sorted(stats.kills.items()):
        kills.add_metric([kind, str(limit)], count)
    refusals = CounterMetricFamily(
        "clawnode_sandbox_refusals",
        "sandboxed runs refused before they ran, by kind and reason",
        labels=["kind", "reason"],
    )
    for (kind, reason), count in sorted(stats.refusals.items()):
        refusals.add_metric([kind, str(reason)], count)
    denied = CounterMetricFamily(
        "clawnode_sandbox_denied_calls",
        "system calls a sandboxed program was refused (escape attempts), by kind and call",
        labels=["kind", "call"],
    )
    for (kind, call), count in sorted(stats.denied_calls.items()):
        denied.add_metric([kind, call], count)
    violations = CounterMetricFamily(
        "clawnode_sandbox_violations",
        "refused system calls plus kills by limit, by kind (what SandboxViolations watches)",
        labels=["kind"],
    )
    for kind in ("wasm", "native"):
        violations.add_metric([kind], stats.violations(kind))
    return [runs, kills, refusals, denied, violations]


def _task_panels(node: MetricsSource) -> list[Metric]:
    """Disputed tasks whose arbiter panel has not decided: their escrow stays locked until it does."""
    try:
        tasks = getattr(node, "tasks", None)
    except RuntimeError:  # the node is not running: no task market yet
        return []
    if tasks is None:
        return []
    undecided = GaugeMetricFamily(
        "clawnode_task_panels_undecided",
        "disputed tasks whose arbiter panel has not decided (escrow locked), by the panel's state",
        labels=["state"],
    )
    for state, count in tasks.undecided_panels().items():
        undecided.add_metric([state], count)
    return [undecided]


def _escrow_disconnected(node: MetricsSource) -> Metric:
    """1 once a configured chain failed to connect, 0 when connected or off; no sample while unknown.

    Until the first connection attempt has an answer (state ``connecting``, or not started yet) the
    node does not know whether the chain is down: a rule on this gauge must not fire on a node that
    is merely starting, so the gauge has no sample and the rule nothing to evaluate.
    """
    family = GaugeMetricFamily(
        "clawnode_escrow_disconnected",
        "1 when an escrow chain is configured but not connected (no sample until the first attempt answers)",
    )
    escrow = node.escrow_status
    if escrow.mode == "off" or escrow.state == "connected":
        family.add_metric([], 0)
    elif escrow.state == "unavailable":
        family.add_metric([], 1)
    return family


class _Families:
    """A collector that yields families built for this one scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


async def render_metrics(node: MetricsSource) -> bytes:
    registry = CollectorRegistry()

    def gauge(name: str, help_text: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, help_text, labels, registry=registry)

    families: list[Metric] = []
    status = node.status()
    gauge("clawnode_connected_peers", "peers with an open connection").set(status.connected_peers)
    gauge("clawnode_routing_table_size", "peers in the DHT routing table").set(status.routing_table_size)
    gauge("clawnode_offers", "capabilities this node offers").set(status.offers)
    gauge("clawnode_uptime_seconds", "seconds since the node started").set(status.uptime_s)
    reachability = gauge("clawnode_reachability", "1 for the node's current reachability verdict", ("verdict",))
    for verdict in ("public", "private", "unknown"):
        reachability.labels(verdict=verdict).set(1 if status.reachability == verdict else 0)
    gauge("clawnode_relay_reservations", "relays this node holds a reservation on (while private)").set(
        len(status.relay_reservations)
    )
    gauge("clawnode_relay_reservation_renewals", "renewals of the reservations held now").set(
        sum(r.renewals for r in status.relay_reservations)
    )
    if status.relay_hop_reservations is not None:
        gauge("clawnode_relay_hop_reservations", "reservations this relay grants right now").set(
            status.relay_hop_reservations
        )
    families += _nat_traversal(node)
    families += _inbound_connections(node)
    families += _sandbox(node)
    families += _task_panels(node)
    rejected = gauge("clawnode_records_rejected", "capability records rejected, by reason", ("reason",))
    for reason, count in status.records_rejected.items():
        rejected.labels(reason=reason).set(count)
    gauge("clawnode_offers_skipped", "stored or configured offers left unpublished: their record cannot be sealed").set(
        len(node.skipped_offers())
    )
    restarts = CounterMetricFamily(
        "clawnode_service_restarts", "times a failed node service was restarted, by service", labels=["service"]
    )
    for service, count in sorted(node.supervisor.restarts.items()):
        restarts.add_metric([service], count)
    families.append(restarts)

    leases = gauge("clawnode_leases", "leases since start, by our role and state", ("role", "state"))
    units = gauge("clawnode_lease_units", "units metered on leases since start, by our role", ("role",))
    by_state: Counter[tuple[str, str]] = Counter()
    by_role: Counter[str] = Counter()
    market = node.market
    for view in market.leases():
        by_state[(view.role, view.state)] += 1
        by_role[view.role] += view.units
    for (role, state), count in by_state.items():
        leases.labels(role=role, state=state).set(count)
    for role, total in by_role.items():
        units.labels(role=role).set(total)
    served = CounterMetricFamily(
        "clawnode_tokens_served", "units (tokens for model offers) this node served on leases since start"
    )
    served.add_metric([], by_role["provider"])
    bought = CounterMetricFamily(
        "clawnode_tokens_bought", "units (tokens for model offers) this node bought on leases since start"
    )
    bought.add_metric([], by_role["consumer"])
    failures = CounterMetricFamily(
        "clawnode_lease_failures",
        "lease operations refused or failed since start, by operation and error code",
        labels=["op", "code"],
    )
    for (op, code), count in sorted(market.failures.items()):
        failures.add_metric([op, code], count)
    families += [served, bought, failures]

    lookups = HistogramMetricFamily("clawnode_dht_lookup_seconds", "duration of capability lookups in the DHT")
    lookups.add_metric([], node.dht_lookup_s.cumulative(), node.dht_lookup_s.total_s)
    families.append(lookups)
    router = node.router
    families.append(
        _histogram(
            "clawnode_inference_first_token_seconds",
            "time from request to the first chunk of a model call served here (local: the router; lease: for a peer)",
            [("local", router.local_first_chunk_s), ("lease", market.serve_first_chunk_s)],
        )
    )
    families.append(
        _histogram(
            "clawnode_inference_duration_seconds",
            "duration of model calls served here (local: the router; lease: for a peer)",
            [("local", router.local_duration_s), ("lease", market.serve_duration_s)],
        )
    )

    queue = await node.ledger.queue_stats()
    gauge("clawnode_settlement_queue_length", "settlements waiting to land on chain").set(queue.length)
    gauge("clawnode_settlement_queue_oldest_age_seconds", "age of the oldest pending settlement (0 when none)").set(
        queue.oldest_age_s or 0
    )
    settlements = gauge("clawnode_settlements", "settlements in the ledger, by state", ("state",))
    by_settlement_state: Counter[str] = Counter({"pending": 0, "landed": 0, "failed": 0, "flagged": 0})
    retries = 0
    offset = 0
    while True:
        page = await node.ledger.list_settlements(limit=SETTLEMENT_PAGE, offset=offset)
        for settlement in page:
            by_settlement_state[settlement.state] += 1
            # Every attempt but a landing one failed.
            retries += settlement.attempts - (1 if settlement.state == "landed" else 0)
        if len(page) < SETTLEMENT_PAGE:
            break
        offset += SETTLEMENT_PAGE
    for state, count in by_settlement_state.items():
        settlements.labels(state=state).set(count)
    failed = CounterMetricFamily("clawnode_settlements_failed", "settlements that failed for good (ledger)")
    failed.add_metric([], by_settlement_state["failed"])
    retried = CounterMetricFamily("clawnode_settlement_retries", "settlement attempts that did not land (ledger)")
    retried.add_metric([], retries)
    families += [failed, retried]
    # Failures since the last write that committed: 0 again once the disk takes writes, so the alert resolves.
    gauge(
        "clawnode_ledger_write_failures", "ledger operations that failed for a storage reason since the last write"
    ).set(node.ledger.failing_writes)
    ledger_failed = CounterMetricFamily(
        "clawnode_ledger_storage_errors", "ledger operations that failed for a storage reason since start"
    )
    ledger_failed.add_metric([], node.ledger.write_failures)
    saves_failed = CounterMetricFamily(
        "clawnode_data_dir_save_failures", "state file saves (peer book, offers, ...) the disk refused since start"
    )
    saves_failed.add_metric([], save_failures.total)
    families += [ledger_failed, saves_failed]
    gauge("clawnode_escrow_connected", "1 when the escrow chain is connected").set(
        1 if node.escrow_status.state == "connected" else 0
    )
    families.append(_escrow_disconnected(node))
    gauge(
        "clawnode_escrow_contract_invalid",
        "1 while escrow.contract holds no escrow contract on the chain (or the chain is not escrow.chain_id)",
    ).set(1 if node.escrow_problem else 0)
    gauge(
        "clawnode_escrow_ledger_mismatches",
        "escrows whose ledger rows the chain does not know (flagged by the reconciliation, no longer retried)",
    ).set(node.reconciler.mismatches.count if node.reconciler is not None else 0)
    counts = await node.ledger.counts()
    gauge("clawnode_ledger_receipts", "usage receipts in the ledger").set(counts["receipts"])
    by_day = await node.ledger.totals_by_day()
    gauge("clawnode_income_wei", "income recorded in the ledger, wei").set(sum(t.income for t in by_day))
    gauge("clawnode_spend_wei", "spend recorded in the ledger, wei").set(sum(t.spend for t in by_day))
    registry.register(_Families(families))  # type: ignore[arg-type]
    return generate_latest(registry)
