"""Task announcements over GossipSub between real hosts on loopback.

Nodes are connected in a line (plus leaves), never a full mesh, so every
announcement has to be relayed hop by hop.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair, PrivateKey
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from pydantic import Field

from node.host import build_host
from protocols.gossip import (
    ANNOUNCEMENT_DOMAIN,
    ANNOUNCEMENT_PAYLOAD_TYPE,
    TaskAnnouncement,
    TaskAnnouncements,
    VerifiedAnnouncement,
    build_pubsub,
    task_topic,
)
from wire.signed import seal

if TYPE_CHECKING:
    from trio_typing import TaskStatus

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
CAPABILITY = "model:gemma3-270m"
OTHER_CAPABILITY = "model:qwen3-0.6b"
BURST = 200


@dataclass
class Node:
    key_pair: KeyPair
    host: IHost
    announcements: TaskAnnouncements

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())


def order(creator: str, task_id: str, capability: str = CAPABILITY) -> TaskAnnouncement:
    return TaskAnnouncement(
        task_id=task_id,
        creator=creator,
        capability=capability,
        budget=10**15,
        deadline=int(time.time()) + 3600,
        review_timeout_s=600,
        summary="summarise a page",
        params_hash=hashlib.sha256(task_id.encode()).hexdigest(),
    )


async def _run_node(*, task_status: TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
    key_pair = generate_new_ed25519_identity()
    host = build_host(key_pair)
    async with host.run(LOOPBACK), trio.open_nursery() as nursery:
        announcements = TaskAnnouncements(host)
        await nursery.start(announcements.run)
        task_status.started(Node(key_pair, host, announcements))
        await trio.sleep_forever()


async def connect(a: IHost, b: IHost) -> None:
    await a.connect(info_from_p2p_addr(b.get_addrs()[0]))


@asynccontextmanager
async def open_nodes(count: int, links: Sequence[tuple[int, int]]) -> AsyncIterator[list[Node]]:
    async with trio.open_nursery() as nursery:
        nodes: list[Node] = [await nursery.start(_run_node) for _ in range(count)]
        with trio.fail_after(10):
            for a, b in links:
                await connect(nodes[a].host, nodes[b].host)
        yield nodes
        nursery.cancel_scope.cancel()


def sealed(model: TaskAnnouncement, key: PrivateKey, domain: str = ANNOUNCEMENT_DOMAIN) -> bytes:
    return seal(model, key, domain=domain, payload_type=ANNOUNCEMENT_PAYLOAD_TYPE)


async def wait_for_mesh(
    routers: Sequence[GossipSub], hosts: Sequence[IHost], topic: str, links: Sequence[tuple[int, int]]
) -> None:
    """Until both ends of every link have grafted each other for ``topic``."""
    with trio.fail_after(10):
        while not all(
            hosts[b].get_id() in routers[a].mesh.get(topic, set())
            and hosts[a].get_id() in routers[b].mesh.get(topic, set())
            for a, b in links
        ):
            await trio.sleep(0.05)


async def collect(
    channel: trio.MemoryReceiveChannel[VerifiedAnnouncement], into: list[VerifiedAnnouncement], want: int
) -> None:
    async for item in channel:
        into.append(item)
        if len(into) >= want:
            return


LINE = [(i, i + 1) for i in range(5)]  # 0-1-2-3-4-5: five hops end to end


async def test_burst_of_200_reaches_every_subscriber_across_hops() -> None:
    async with open_nodes(6, LINE) as nodes:
        channels = [await node.announcements.subscribe(CAPABILITY) for node in nodes]
        topic = task_topic(CAPABILITY)
        await wait_for_mesh([n.announcements.router for n in nodes], [n.host for n in nodes], topic, LINE)
        publisher = nodes[0]
        received: list[list[VerifiedAnnouncement]] = [[] for _ in nodes]
        started = trio.current_time()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for channel, into in zip(channels[1:], received[1:], strict=True):
                    nursery.start_soon(collect, channel, into, BURST)
                for index in range(BURST):
                    await publisher.announcements.announce(
                        order(publisher.peer_id, f"task-{index}"), publisher.key_pair.private_key
                    )
        elapsed = trio.current_time() - started
        for into in received[1:]:
            assert sorted(item.announcement.task_id for item in into) == sorted(f"task-{i}" for i in range(BURST))
            assert {item.signer for item in into} == {publisher.peer_id}
        # Measured on a loaded 2-core box: all 200 at all 5 subscribers in ~3 s.
        print(f"ours: {BURST}/{BURST} at each of 5 subscribers in {elapsed:.2f}s")


async def test_default_py_libp2p_settings_lose_part_of_the_same_burst() -> None:
    """A measurement, not a requirement: py-libp2p's defaults on the same line.

    Defaults: 10 msgs/s per (peer, topic) spam cap, 32-RPC outbound queues,
    32-message subscription channels, /meshsub/1.2 with per-message IDONTWANT.
    """
    keys = [generate_new_ed25519_identity() for _ in range(6)]
    hosts = [build_host(key) for key in keys]
    topic = task_topic(CAPABILITY)
    async with trio.open_nursery() as nursery:
        routers: list[GossipSub] = []
        pubsubs: list[Pubsub] = []

        async def run(host: IHost, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            router = GossipSub(
                protocols=[TProtocol(PROTOCOL_ID_V12), TProtocol(PROTOCOL_ID_V11)],
                degree=6,
                degree_low=4,
                degree_high=12,
            )
            pubsub = Pubsub(host, router)
            routers.append(router)
            pubsubs.append(pubsub)
            async with host.run(LOOPBACK), background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                task_status.started()
                await trio.sleep_forever()

        for host in hosts:
            await nursery.start(run, host)
        with trio.fail_after(10):
            for a, b in LINE:
                await connect(hosts[a], hosts[b])
        subscriptions = [await pubsub.subscribe(topic) for pubsub in pubsubs]
        await wait_for_mesh(routers, hosts, topic, LINE)
        counts = [0] * len(hosts)

        async def count(index: int) -> None:
            async for _ in subscriptions[index]:  # type: ignore[attr-defined]
                counts[index] += 1

        for index in range(1, len(hosts)):
            nursery.start_soon(count, index)
        for index in range(BURST):
            await pubsubs[0].publish(topic, f"task-{index}".encode())
        await trio.sleep(3)  # ample: ours deliver the whole burst end to end in less
        # Measured here (2 loaded cores): nodes 1..5 received [10, 10, 10, 10, 10]
        # of 200. The spam cap counts the publisher's own messages too: the 11th
        # in a second is never sent. Raising only the cap: [16, 16, 16, 16, 16]
        # (32-RPC queues). Cap + queues + channels, still on /meshsub/1.2:
        # [200, 125, 123, 121, 120]. The same on /meshsub/1.1: all 200.
        print(f"py-libp2p defaults: received {counts[1:]} of {BURST}")
        nursery.cancel_scope.cancel()


async def test_forged_announcements_are_not_delivered_and_the_network_keeps_working() -> None:
    # 0 is a forger: a raw pubsub with no validator, so its forgeries leave it.
    # 1-2-3-4 are honest, in a line behind it.
    forger_key = generate_new_ed25519_identity()
    forger_host = build_host(forger_key)
    links = [(0, 1), (1, 2), (2, 3), (3, 4)]
    topic = task_topic(CAPABILITY)
    async with trio.open_nursery() as outer:
        pubsub, router = build_pubsub(forger_host)

        async def run_forger(*, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with forger_host.run(LOOPBACK), background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                task_status.started()
                await trio.sleep_forever()

        await outer.start(run_forger)
        async with open_nodes(4, [(a - 1, b - 1) for a, b in links[1:]]) as honest:
            with trio.fail_after(10):
                await connect(forger_host, honest[0].host)
            channels = [await node.announcements.subscribe(CAPABILITY) for node in honest]
            await pubsub.subscribe(topic)
            await wait_for_mesh(
                [router, *(n.announcements.router for n in honest)],
                [forger_host, *(n.host for n in honest)],
                topic,
                links,
            )

            forger = str(forger_host.get_id())
            victim = honest[3].peer_id
            key = forger_key.private_key

            class Padded(TaskAnnouncement):
                padding: str = Field(max_length=20_000)

            padded = Padded(**order(forger, "oversized").model_dump(), padding="x" * 17_000)
            forgeries = [
                # creator is someone else's peer id
                sealed(order(victim, "impersonated"), key),
                # signed for another domain: the signature does not verify for ours
                sealed(order(forger, "bad-signature"), key, domain="other-domain"),
                # not an envelope at all
                b"\x00garbage",
                # valid, but for another capability than the topic's
                sealed(order(forger, "wrong-topic", OTHER_CAPABILITY), key),
                # correctly signed but over 16 KiB
                sealed(padded, key),
            ]
            for data in forgeries:
                await pubsub.publish(topic, data)
            # Then a genuine one from the same forger, on the same ordered path:
            # once it arrives, anything published before it would have too.
            genuine = sealed(order(forger, "genuine"), key)
            await pubsub.publish(topic, genuine)
            # And an honest node keeps announcing to the others.
            await honest[3].announcements.announce(order(victim, "after"), honest[3].key_pair.private_key)

            with trio.fail_after(10):
                for index, channel in enumerate(channels):
                    seen: set[str] = set()
                    want = {"genuine", "after"} - ({"after"} if index == 3 else set())
                    while not want <= seen:
                        item = await channel.receive()
                        assert item.announcement.task_id in {"genuine", "after"}, item
                        seen.add(item.announcement.task_id)
            # Every forgery died at the first honest hop.
            assert honest[0].announcements.stats.rejected == len(forgeries)
            assert all(node.announcements.stats.rejected == 0 for node in honest[1:])
        outer.cancel_scope.cancel()


async def test_subscribers_to_another_capability_receive_nothing() -> None:
    # 0-1-2-3 subscribe to CAPABILITY; 4 hangs off 2 and subscribes to another one.
    links = [(0, 1), (1, 2), (2, 3), (2, 4)]
    async with open_nodes(5, links) as nodes:
        channels = [await node.announcements.subscribe(CAPABILITY) for node in nodes[:4]]
        other = await nodes[4].announcements.subscribe(OTHER_CAPABILITY)
        topic = task_topic(CAPABILITY)
        await wait_for_mesh([n.announcements.router for n in nodes], [n.host for n in nodes], topic, links[:3])
        publisher = nodes[0]
        for index in range(20):
            await publisher.announcements.announce(
                order(publisher.peer_id, f"task-{index}"), publisher.key_pair.private_key
            )
        with trio.fail_after(10):
            for channel in channels[1:]:
                for _ in range(20):
                    await channel.receive()
        await trio.sleep(0.5)  # give a stray message time to land, if one were coming
        try:
            unexpected = other.receive_nowait()
        except trio.WouldBlock:
            unexpected = None
        assert unexpected is None
        assert nodes[4].announcements.stats.delivered == 0
        assert nodes[4].announcements.stats.rejected == 0
