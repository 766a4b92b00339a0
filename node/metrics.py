"""``/metrics`` in the Prometheus text format: what an operator graphs and alerts on.

Rendered per scrape from the node's live state and its ledger, into a fresh registry, so a value
is never stale and nothing is double-registered across the many nodes one test process runs.
No label carries a token, an endpoint or a path: peers appear only as counts.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, generate_latest

if TYPE_CHECKING:
    from node.daemon import Node

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def render_metrics(node: Node) -> bytes:
    registry = CollectorRegistry()

    def gauge(name: str, help_text: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, help_text, labels, registry=registry)

    status = node.status()
    gauge("clawnode_connected_peers", "peers with an open connection").set(status.connected_peers)
    gauge("clawnode_routing_table_size", "peers in the DHT routing table").set(status.routing_table_size)
    gauge("clawnode_offers", "capabilities this node offers").set(status.offers)
    gauge("clawnode_uptime_seconds", "seconds since the node started").set(status.uptime_s)
    rejected = gauge("clawnode_records_rejected", "capability records rejected, by reason", ("reason",))
    for reason, count in status.records_rejected.items():
        rejected.labels(reason=reason).set(count)

    leases = gauge("clawnode_leases", "leases since start, by our role and state", ("role", "state"))
    units = gauge("clawnode_lease_units", "units metered on leases since start, by our role", ("role",))
    by_state: Counter[tuple[str, str]] = Counter()
    by_role: Counter[str] = Counter()
    for view in node.market.leases():
        by_state[(view.role, view.state)] += 1
        by_role[view.role] += view.units
    for (role, state), count in by_state.items():
        leases.labels(role=role, state=state).set(count)
    for role, total in by_role.items():
        units.labels(role=role).set(total)

    queue = await node.ledger.queue_stats()
    gauge("clawnode_settlement_queue_length", "settlements waiting to land on chain").set(queue.length)
    gauge("clawnode_settlement_queue_oldest_age_seconds", "age of the oldest pending settlement (0 when none)").set(
        queue.oldest_age_s or 0
    )
    gauge("clawnode_ledger_write_failures", "ledger operations that failed for a storage reason").set(
        node.ledger.write_failures
    )
    gauge("clawnode_escrow_connected", "1 when the escrow chain is connected").set(
        1 if node.escrow_status.state == "connected" else 0
    )
    counts = await node.ledger.counts()
    gauge("clawnode_ledger_receipts", "usage receipts in the ledger").set(counts["receipts"])
    by_day = await node.ledger.totals_by_day()
    gauge("clawnode_income_wei", "income recorded in the ledger, wei").set(sum(t.income for t in by_day))
    gauge("clawnode_spend_wei", "spend recorded in the ledger, wei").set(sum(t.spend for t in by_day))
    return generate_latest(registry)
