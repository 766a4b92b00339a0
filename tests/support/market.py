"""Full clawnode ``Node``s in one trio run, sharing one embedded EVM chain, for market tests.

The pieces live in ``node.localnet`` (``clawnode demo`` runs on them too); re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from dht.discovery import DiscoveryQuery
from node.localnet import (
    READY_TIMEOUT_S,
    WORD_OFFER,
    WORD_PRICE,
    WORDS,
    SharedChain,
    WordService,
    market_config,
    market_nodes,
    wait_for,
)
from protocols.gossip import task_topic

if TYPE_CHECKING:
    from node.daemon import Node

__all__ = [
    "READY_TIMEOUT_S",
    "WORDS",
    "WORD_OFFER",
    "WORD_PRICE",
    "SharedChain",
    "WordService",
    "market_config",
    "market_nodes",
    "wait_for",
]


def metric_samples(text: str) -> dict[str, float]:
    """A /metrics body parsed by Prometheus's own text parser: ``name{label="v",…}`` → value."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def discovered(consumer: Node, provider: Node, capability: str = WORDS, timeout_s: float = 30.0) -> None:
    """Once ``provider`` has published its record, until ``consumer``'s discovery lists a provider of ``capability``."""
    await wait_for(lambda: provider.publisher.record is not None)
    with trio.fail_after(timeout_s):
        while not await consumer.discover(DiscoveryQuery(capability=capability)):
            await trio.sleep(0.2)


async def ranked_once_listed(consumer: Node, capability: str, peers: set[str], timeout_s: float = 20.0) -> list[str]:
    """The router's ranking of ``capability``'s providers (peer ids, best first), once discovery lists
    every one of ``peers``: a provider the router leaves out is then left out by choice, not unfound."""
    query = DiscoveryQuery(capability=capability)
    with trio.fail_after(timeout_s):
        while peers - {p.peer_id for p in await consumer.discover(query)}:
            await trio.sleep(0.2)
    return [p.peer_id for p in consumer.router.rank(await consumer.discover(query))]


async def watching(creator: Node, seller: Node, capability: str) -> None:
    """The seller watches ``capability``'s task announcements, and the creator's pubsub knows it does."""
    await seller.tasks.watch(capability)
    topic = task_topic(capability)
    await wait_for(lambda: seller.host.get_id() in creator.announcements.pubsub.peer_topics.get(topic, ()), 30)
