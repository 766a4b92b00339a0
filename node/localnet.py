"""A local market: full clawnode ``Node``s in one trio run, sharing one embedded EVM chain.

Every part is real: libp2p hosts on loopback, the DHT, each node's SQLite ledger, the Vyper escrow
on an in-process py-evm chain, the settlement queue. Sharing one chain is the only change from a
daemon on ``escrow.mode = "embedded"`` (which would give each node a chain of its own). Used by
``clawnode demo``, the market tests and the benchmarks.

``WordService`` is a stand-in service for tests: the leased capability emits the words of its prompt,
one unit per word. The lease protocol meters whatever service it fronts and never looks inside it.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from eth_account import Account
from libp2p.peer.id import ID

from dht.offers import Offer
from node.config import (
    ApiSection,
    BootstrapSection,
    Config,
    EscrowSection,
    MarketSection,
    NodeSection,
    SplitSection,
    VerifySection,
)
from node.daemon import Node
from node.datadir import ensure_data_dir, load_or_create_identity, load_or_create_wallet_key
from runtime.errors import ClawnodeError, ErrorCode
from runtime.escrow import Chain, EscrowClient
from runtime.escrow.settings import fund_from_dev_account
from runtime.inference.models import ModelSpec
from runtime.service import Emit, ServiceRegistry, Usage

WORDS = "model:words"
WORD_PRICE = 1_000_000_000  # wei per word
READY_TIMEOUT_S = 60


class WordService:
    """Emits the prompt's words back, one chunk each; one unit per word."""

    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        prompt = body.get("prompt")
        messages = body.get("messages")
        if prompt is None and isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            prompt = messages[-1].get("content")
        if not isinstance(prompt, str):
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "body.prompt must be a string")
        words = prompt.split()
        limit = body.get("max_tokens")
        if isinstance(limit, int):
            words = words[:limit]
        for word in words:
            await emit({"text": word})
        return Usage(units=len(words), detail={"completion_tokens": len(words)})


@dataclass
class SharedChain:
    chain: Chain
    deployer: EscrowClient

    @classmethod
    def start(cls) -> SharedChain:
        chain = Chain.embedded()
        return cls(chain, EscrowClient.deploy(chain, chain.dev_accounts()[0]))

    def connector(self, wallet_key: bytes) -> EscrowClient:
        account = Account.from_key(wallet_key)
        fund_from_dev_account(self.chain, account.address)
        return self.deployer.for_account(account)

    @property
    def arbiter(self) -> Any:
        return self.chain.dev_accounts()[1]


def market_config(
    *,
    bootstrap: list[str],
    offers: tuple[Offer, ...] = (),
    market: MarketSection | None = None,
    dispute_window_s: int = 5,
    models: tuple[ModelSpec, ...] = (),
    verify: VerifySection | None = None,
    split: SplitSection | None = None,
    trusted_arbiters: tuple[str, ...] = (),
    arbiter_peer: str = "",
) -> Config:
    return Config(
        node=NodeSection(listen=["/ip4/127.0.0.1/tcp/0"]),  # type: ignore[call-arg]
        api=ApiSection(port=0),
        bootstrap=BootstrapSection(peers=bootstrap, use_defaults=False),
        # market_nodes hands every node the shared chain; a node started alone on this config runs a
        # private chain of its own (no network to join: its bootstrap peers are in-process nodes).
        escrow=EscrowSection(  # type: ignore[call-arg]
            mode="embedded",
            settle_interval_s=0.5,
            dispute_window_s=dispute_window_s,
            trusted_arbiters=list(trusted_arbiters),
            arbiter_peer=arbiter_peer,
        ),
        market=market or MarketSection(receipt_every_units=10, receipt_every_s=2),  # type: ignore[call-arg]
        offers=list(offers),
        models=list(models),
        verify=verify or VerifySection(),  # type: ignore[call-arg]
        split=split or SplitSection(),  # type: ignore[call-arg]
    )


WORD_OFFER = Offer(name=WORDS, summary="echoes words", price_per_unit=WORD_PRICE)  # type: ignore[call-arg]


async def wait_for(predicate: Callable[[], bool], timeout_s: float = READY_TIMEOUT_S, what: str = "condition") -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.05)


@asynccontextmanager
async def market_nodes(
    specs: list[dict[str, Any]],
    *,
    chain: SharedChain | None = None,
    bootstrap: list[str] | None = None,
    root: Path | None = None,
) -> AsyncIterator[tuple[list[Node], SharedChain]]:
    """Start one Node per spec (``offers``, ``market``, ``serve``, ``wallet_key``, ``trusted_arbiters``,
    ``trusts``, ``arbiter_peer``, ``arbiter``); the first is everyone's bootstrap.

    With ``bootstrap`` (multiaddrs of an existing swarm, e.g. ``open_swarm``'s first nodes), every
    node joins through those peers instead. Data dirs go under ``root`` (default: a temporary
    directory, removed afterwards). Yields once every node runs and has its escrow client.
    """
    shared: SharedChain = chain if chain is not None else await trio.to_thread.run_sync(SharedChain.start)
    with tempfile.TemporaryDirectory(prefix="clawnode-market-") as scratch:
        base = root if root is not None else Path(scratch)
        nodes: list[Node] = []
        # ``trusts`` (indexes into ``specs``): nodes of this market whose PEER:WALLET this node trusts on a
        # task's panel, beside its ``trusted_arbiters`` (escrow.trusted_arbiters); ``arbiter`` (an index): the
        # node whose peer id is this node's escrow.arbiter_peer (a seller takes a single-arbiter award only
        # when the announced peer id and wallet are a pair it trusts). Their identities are made now.
        entries = await trio.to_thread.run_sync(_arbiter_entries, specs, base)
        async with trio.open_nursery() as nursery:
            joined_through = list(bootstrap or [])
            for index, spec in enumerate(specs):
                # ``services`` (a ServiceRegistry) replaces the WordService default; ``models``
                # (ModelSpecs) are loaded and served by the node itself, as [[models]] would be.
                services = spec.get("services") or ServiceRegistry()
                if "services" not in spec and spec.get("serve", bool(spec.get("offers"))):
                    services.register(WORDS, WordService())
                config = market_config(
                    bootstrap=joined_through,
                    offers=tuple(spec.get("offers", ())),
                    market=spec.get("market"),
                    dispute_window_s=spec.get("dispute_window_s", 5),
                    models=tuple(spec.get("models", ())),
                    verify=spec.get("verify"),
                    split=spec.get("split"),  # ``split``: a SplitSection naming ``models`` run over leased layers
                    # ``trusted_arbiters``: PEER:WALLET entries the node trusts on a task's panel
                    trusted_arbiters=(
                        *spec.get("trusted_arbiters", ()),
                        *(entries[i] for i in spec.get("trusts", ())),
                    ),
                    # escrow.arbiter_peer: our arbiter's peer id, named or that of node ``arbiter``
                    arbiter_peer=spec.get("arbiter_peer")
                    or ("" if spec.get("arbiter") is None else entries[spec["arbiter"]].split(":")[0]),
                )
                # ``wallet_key`` (hex): this node's escrow wallet, e.g. ``shared.arbiter.key.hex()`` for the arbiter.
                wallet_hex = spec.get("wallet_key")
                connector = shared.connector if wallet_hex is None else partial(_fixed_wallet, shared, wallet_hex)
                node = Node(config, base / f"node{index}", services=services, escrow_connector=connector)
                await nursery.start(node.run)
                nodes.append(node)
                if not joined_through:
                    joined_through = [f"{node.listen_addrs()[0]}"]
            for node in nodes:
                await wait_for(partial(_escrow_ready, node), what="escrow")
            try:
                yield nodes, shared
            finally:
                nursery.cancel_scope.cancel()


def _arbiter_entries(specs: list[dict[str, Any]], base: Path) -> dict[int, str]:
    """PEER:WALLET of each node some spec ``trusts`` or names as its ``arbiter``, by index: its identity, and
    its wallet key where its spec names none, are made in its data dir now (the node loads them when it starts)."""
    entries: dict[int, str] = {}
    named = {i for spec in specs for i in spec.get("trusts", ())} | {
        spec["arbiter"] for spec in specs if spec.get("arbiter") is not None
    }
    for index in sorted(named):
        data_dir = ensure_data_dir(base / f"node{index}")
        key_pair, _ = load_or_create_identity(data_dir)
        wallet_hex = specs[index].get("wallet_key")
        key = (
            load_or_create_wallet_key(data_dir) if wallet_hex is None else bytes.fromhex(wallet_hex.removeprefix("0x"))
        )
        entries[index] = f"{ID.from_pubkey(key_pair.public_key)}:{Account.from_key(key).address}"
    return entries


def _fixed_wallet(shared: SharedChain, wallet_hex: str, _node_key: bytes) -> EscrowClient:
    return shared.connector(bytes.fromhex(wallet_hex.removeprefix("0x")))


def _escrow_ready(node: Node) -> bool:
    return node.escrow_client is not None and node.settlement_queue is not None
