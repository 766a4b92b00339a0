"""Hypothesis-generated garbage on every protocol a node serves: no crash, no E_INTERNAL, and the
node still serves honest peers afterwards (issue 14).

A provider node (lease, infer, task, capability, and a gossip subscription) and a consumer node
run in one trio run with a stranger's bare libp2p host beside them. Inputs (``tests.support.fuzz``)
are varint frames around JSON shaped like each protocol's wire models (wrong types, huge numbers,
deep nesting, long strings, lone surrogates, truncated text), garbage behind honest, truncated and
oversized length prefixes, and for gossip envelopes signed around such payloads. Each protocol
gets a few hundred inputs through its registered handler on an in-memory stream, and a sample over
real streams (gossip: published on the topic). ``bench/fuzz.py`` runs the same with 10^4 inputs.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service
from pydantic import TypeAdapter

from node.daemon import Node
from node.host import build_host
from protocols import task_wire
from protocols.capability import fetch_sealed_record
from protocols.gossip import TaskAnnouncement, build_pubsub, task_topic
from protocols.rpc import request
from protocols.task import TASK_PROTOCOL
from runtime.errors import ClawnodeError, ErrorCode
from tests.support.fuzz import (
    PROTOCOLS,
    GossipInput,
    Known,
    Outcome,
    corpus,
    drive_gossip_validator,
    drive_handler,
    drive_streams,
    gossip_inputs,
    seal_raw,
    stream_inputs,
)
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes

HANDLER_INPUTS = 250  # per protocol, through the registered handler
STREAM_INPUTS = 30  # per protocol, over real streams
SEED = 20261206
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


def _check(outcomes: list[Outcome]) -> None:
    for outcome in outcomes:
        print(outcome.summary())
    bad = [o for o in outcomes if o.crashes or o.internal_errors]
    assert not bad, "\n".join(f"{o.summary()}\n  " + "\n  ".join(o.failures) for o in bad)
    assert all(o.inputs for o in outcomes)


def _generate(known: Known) -> tuple[dict[str, list[bytes]], list[GossipInput]]:
    frames = {
        name: corpus(stream_inputs(name, known), HANDLER_INPUTS + STREAM_INPUTS, SEED + index)
        for index, name in enumerate(PROTOCOLS)
    }
    return frames, corpus(gossip_inputs(known), HANDLER_INPUTS + STREAM_INPUTS, SEED + 99)


def _announcement(creator: str, task_id: str) -> TaskAnnouncement:
    return TaskAnnouncement(
        task_id=task_id,
        creator=creator,
        capability=WORDS,
        budget=10**15,
        deadline=int(time.time()) + 3600,
        review_timeout_s=600,
        summary="an honest task after the garbage",
        params_hash=hashlib.sha256(task_id.encode()).hexdigest(),
    )


async def test_fuzzed_frames_on_every_protocol_neither_crash_nor_fail_internally() -> None:
    started = time.monotonic()
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}]) as (nodes, _):
        provider, consumer = nodes
        target = provider.host.get_id()
        # A lease the consumer holds, so some inputs name a real lease (and come from its party).
        held = await consumer.market.open_lease(str(target), WORDS, budget=WORD_PRICE * 20, duration_s=120)
        updates = await provider.announcements.subscribe(WORDS)

        attacker_key = generate_new_ed25519_identity()
        attacker = build_host(attacker_key)
        pubsub, router = build_pubsub(attacker)
        known = Known(
            peer_ids=(str(target), str(consumer.host.get_id()), str(attacker.get_id())),
            lease_ids=(held.lease_id,),
            task_ids=("task-1",),
        )
        frames, gossip = await trio.to_thread.run_sync(_generate, known)

        async with attacker.run([LOOPBACK]), background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            with trio.fail_after(10):
                await attacker.connect(info_from_p2p_addr(multiaddr.Multiaddr(provider.listen_addrs()[0])))
            outcomes: list[Outcome] = []
            remotes = [attacker.get_id(), consumer.host.get_id()]
            for name in PROTOCOLS:
                inputs = frames[name]
                outcomes.append(await drive_handler(provider.host, name, inputs[:HANDLER_INPUTS], remotes))
                outcomes.append(await drive_streams(attacker, target, name, inputs[HANDLER_INPUTS:]))
            outcomes += await _fuzz_gossip(provider, attacker, attacker_key.private_key, pubsub, gossip)
            _check(outcomes)

            # Still serving: the genuine announcement published after the garbage arrives ...
            honest = _announcement(str(attacker.get_id()), "honest-after-garbage")
            await pubsub.publish(task_topic(WORDS), seal_raw(_sealed(honest), attacker_key.private_key))
            with trio.fail_after(10):
                async for item in updates:
                    if item.announcement.task_id == honest.task_id:
                        break
        await _honest_calls(provider, consumer)
    assert time.monotonic() - started < 120


def _sealed(announcement: TaskAnnouncement) -> GossipInput:
    return GossipInput(payload=announcement.model_dump_json().encode(), sealed=True)


async def _fuzz_gossip(
    provider: Node, attacker: Any, key: Any, pubsub: Any, inputs: list[GossipInput]
) -> list[Outcome]:
    topic = task_topic(WORDS)
    validator = provider.announcements.pubsub.topic_validators[topic].validator
    direct = drive_gossip_validator(validator, inputs[:HANDLER_INPUTS], key, attacker.get_id())  # type: ignore[arg-type]
    # Then published for real: the node's pubsub validates each one as it arrives.
    await pubsub.subscribe(topic)
    router = provider.announcements.router
    with trio.fail_after(10):
        while attacker.get_id() not in router.mesh.get(topic, set()):
            await trio.sleep(0.05)
    published = Outcome("gossip", "stream")
    stats = provider.announcements.stats
    rejected_before, delivered_before = stats.rejected, stats.delivered
    started = time.perf_counter()
    for item in inputs[HANDLER_INPUTS:]:
        await pubsub.publish(topic, seal_raw(item, key))
        published.inputs += 1
    with trio.move_on_after(2):
        while stats.rejected + stats.delivered - rejected_before - delivered_before < published.inputs:
            await trio.sleep(0.05)
    published.seconds = time.perf_counter() - started
    published.replies = {"rejected": stats.rejected - rejected_before, "accepted": stats.delivered - delivered_before}
    assert published.replies["rejected"] > 0
    return [direct, published]


async def _honest_calls(provider: Node, consumer: Node) -> None:
    """Every protocol still answers an honest peer as it should."""
    target = str(provider.host.get_id())
    view = await consumer.market.open_lease(target, WORDS, budget=WORD_PRICE * 10, duration_s=60)
    result = await consumer.market.call(view.lease_id, {"prompt": "still serving after the garbage"})
    assert result.units == 5 and result.served_by == target
    sealed, _ = await fetch_sealed_record(consumer.host, ID.from_base58(target))
    assert sealed
    bid = task_wire.BidRequest(task_id="no-such-task", bid_id="b1", price=1, payee="0x" + "ab" * 20)
    try:
        await request(consumer.host, ID.from_base58(target), TASK_PROTOCOL, bid, TypeAdapter(task_wire.Ack))
    except ClawnodeError as error:
        assert error.code != ErrorCode.INTERNAL, error.message
