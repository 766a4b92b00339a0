"""Payments benchmark: on-chain transactions and gas per router call, one escrow per lease vs payment channels.

Usage::

    python bench/payments.py [--calls 1000] [--words 100] [--lease-units 2000] [--leases-per-channel 50]
                             [--gas-price-gwei 0.001] [--concurrency 3] [--log FILE]

One consumer's router answers ``--calls`` requests of ``--words`` words each (one unit per word, at
``WORD_PRICE`` = 1 gwei a unit) from 3 providers, real nodes (libp2p over loopback, SQLite ledgers)
on one in-process chain, ``--concurrency`` requests at a time so the router spreads them over the
providers by load. A router lease budgets ``--lease-units`` units, so the router opens a new lease
when one runs out, as it does in production. The run is made twice on a fresh chain each time:

* ``lease``: every lease locks its own escrow (lock, then the provider's claim, then the refund of
  the rest after deadline + window);
* ``channels``: the leases with one provider draw on one channel (``router.channels``), locked for
  ``--leases-per-channel`` lease budgets and closed when idle (the provider's settle, or its claim and
  the consumer's refund on a contract without ``settle``).

After each run every settlement is driven to the chain (chain time moved past every deadline), and
every transaction sent to the escrow contract is counted with its gas. Value served is what the
consumer countersigned (the chain paid exactly that). ``gas_share`` is the gas of the channel run at
``--gas-price-gwei`` divided by the value served (the goal: at most 1 %).

Ends with one line::

    payments: calls=… txs_per_lease=… txs_channels=… gas_per_call_lease=… gas_per_call_channel=… gas_share=…
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import trio
from eth_utils import keccak

from dht.discovery import DiscoveryQuery
from node.daemon import Node
from node.localnet import WORD_OFFER, WORDS, SharedChain, market_nodes
from protocols.lease.channels import CHANNEL_CHECK_S
from protocols.settings import MarketSection

# A channel unused this long closes (both sides' timers): short enough for the wind-down, long enough that
# a provider the router skips for a moment keeps its channel.
IDLE_S = 60


@dataclass
class Run:
    mode: str
    calls: int
    txs: int
    gas: int
    value: int  # wei the consumer countersigned (and the chain released)
    by_kind: dict[str, int]
    leases: int
    channels: int
    seconds: float


def _market(args: argparse.Namespace) -> MarketSection:
    return MarketSection(  # type: ignore[call-arg]
        receipt_every_units=max(10, args.words * 5),
        receipt_every_s=2,
        channel_leases_per_lock=args.leases_per_channel,
        channel_duration_s=86_400,
        channel_idle_close_s=IDLE_S,
        channel_claim_idle_s=IDLE_S,
        channel_margin_s=600,
    )


def _escrow_txs(shared: SharedChain, first_block: int) -> tuple[int, int, dict[str, int]]:
    """Transactions to the escrow contract since ``first_block``: count, gas, and count by function."""
    w3 = shared.chain.w3
    contract = shared.deployer.contract
    address = shared.deployer.address.lower()
    txs = gas = 0
    by_kind: dict[str, int] = {}
    abi: list[dict[str, Any]] = [dict(entry) for entry in contract.abi]
    names = {keccak(text=_signature(entry))[:4]: str(entry["name"]) for entry in abi if entry.get("type") == "function"}
    for number in range(first_block, int(w3.eth.block_number) + 1):
        block = w3.eth.get_block(number, full_transactions=True)
        for raw in block["transactions"]:
            tx: Any = raw
            if str(tx.get("to") or "").lower() != address:
                continue
            receipt = w3.eth.get_transaction_receipt(tx["hash"])
            txs += 1
            gas += int(receipt["gasUsed"])
            selector = bytes(tx.get("input") or tx.get("data") or b"")[:4]
            name = names.get(selector, "other")
            by_kind[name] = by_kind.get(name, 0) + 1
    return txs, gas, by_kind


def _signature(abi: dict[str, Any]) -> str:
    return f"{abi['name']}({','.join(str(i['type']) for i in abi.get('inputs', []))})"


async def _settled(node: Node) -> bool:
    rows = await node.ledger.list_settlements(limit=10_000)
    return all(s.state in ("landed", "failed", "flagged") for s in rows)


async def run(args: argparse.Namespace, *, channels: bool) -> Run:
    shared = await trio.to_thread.run_sync(SharedChain.start)
    first_block = int(shared.chain.sync(lambda: shared.chain.w3.eth.block_number)) + 1
    provider_market = consumer_market = _market(args)
    specs: list[dict[str, Any]] = [{"offers": (WORD_OFFER,), "market": provider_market} for _ in range(3)]
    specs.append({"market": consumer_market})
    async with market_nodes(specs, chain=shared) as (nodes, _):
        providers, consumer = nodes[:3], nodes[3]
        with trio.fail_after(120):
            while len(await consumer.discover(DiscoveryQuery(capability=WORDS))) < 3:
                await trio.sleep(0.2)
        router = consumer.router
        router.settings = router.settings.model_copy(
            update={"channels": channels, "lease_units": args.lease_units, "lease_duration_s": 3600}
        )
        prompt = " ".join(f"w{i}" for i in range(args.words))
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.words}
        done = 0
        started = time.perf_counter()

        async def ignore(_text: str) -> None:
            return None

        async def worker() -> None:
            nonlocal done
            while done < args.calls:
                done += 1
                await router.chat("words", body, ignore)

        async with trio.open_nursery() as nursery:
            for _ in range(args.concurrency):
                nursery.start_soon(worker)
        seconds = time.perf_counter() - started
        # End every lease the router holds (the rest refunded), then drive every settlement to the chain.
        for lease_id, held in list(consumer.market.held.items()):
            if held.ended_reason is None:
                await consumer.market.revoke(lease_id)
        # Idle channels close (the consumer after IDLE_S, the provider's settle after IDLE_S), then chain time
        # moves past every lock's deadline + window so every refund is due, and every settlement lands.
        await trio.sleep(IDLE_S + 2 * CHANNEL_CHECK_S)
        await trio.to_thread.run_sync(shared.chain.time_travel, 86_400 + 3600)
        everyone = [*providers, consumer]
        with trio.fail_after(600):
            while True:
                for node in everyone:
                    node._wake_settlement()
                open_channels = await consumer.market.channels.list(
                    role="consumer", states=("channel_open", "channel_opening")
                )
                if all([await _settled(node) for node in everyone]) and not open_channels:
                    break
                await trio.sleep(0.5)
        value = 0
        for lease in await consumer.ledger.list_leases(limit=100_000):
            value += await consumer.ledger.countersigned_amount(lease.lease_id)
        leases = len(await consumer.ledger.list_leases(limit=100_000))
        opened = len(await consumer.market.channels.list(role="consumer"))
        txs, gas, by_kind = await trio.to_thread.run_sync(_escrow_txs, shared, first_block)
    return Run("channels" if channels else "lease", args.calls, txs, gas, value, by_kind, leases, opened, seconds)


async def main(args: argparse.Namespace) -> None:
    per_lease = await run(args, channels=False)
    channel = await run(args, channels=True)
    gas_price = int(args.gas_price_gwei * 10**9)
    for r in (per_lease, channel):
        print(
            f"{r.mode:>8}: {r.calls} calls in {r.seconds:.1f} s, {r.leases} leases, {r.channels} channels;"
            f" {r.txs} escrow txs {r.by_kind}, {r.gas} gas ({r.gas / r.calls:.0f} per call);"
            f" value served {r.value / 1e18:.6f} ETH; gas share at {args.gas_price_gwei} gwei"
            f" {r.gas * gas_price / max(1, r.value):.2%}"
        )
    share = channel.gas * gas_price / max(1, channel.value)
    for gwei in (0.001, 0.01, 0.05):
        print(
            f"gas share at {gwei} gwei: per lease {per_lease.gas * gwei * 1e9 / max(1, per_lease.value):.2%},"
            f" channels {channel.gas * gwei * 1e9 / max(1, channel.value):.2%}"
        )
    print(
        f"payments: calls={args.calls} txs_per_lease={per_lease.txs} txs_channels={channel.txs}"
        f" gas_per_call_lease={math.ceil(per_lease.gas / per_lease.calls)}"
        f" gas_per_call_channel={math.ceil(channel.gas / channel.calls)} gas_share={share:.4f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--words", type=int, default=100, help="units per call (the word echo's answer)")
    parser.add_argument("--lease-units", type=int, default=2000, help="units a router lease budgets")
    parser.add_argument("--leases-per-channel", type=int, default=50)
    parser.add_argument("--gas-price-gwei", type=float, default=0.001, help="an L2 gas price (Base, OP: ~0.001 gwei)")
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--log", default="", help="a file for the nodes' INFO log (the lease market's steps)")
    parsed = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if parsed.log:
        handler = logging.FileHandler(parsed.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        for name in ("protocols", "node.router", "runtime.settlement"):
            logging.getLogger(name).setLevel(logging.INFO)
            logging.getLogger(name).addHandler(handler)
    trio.run(main, parsed)
