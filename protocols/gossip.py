"""Task announcements over GossipSub: one topic per capability.

A node that wants work done announces a signed :class:`TaskAnnouncement` on the
topic of the capability it needs (``/clawnode/tasks/1.0.0/model:gemma3-270m``).
Nodes selling that capability subscribe to the topic; GossipSub only relays a
topic between nodes that are subscribed to it, so every seller is also a relay.

py-libp2p 0.8.1's GossipSub defaults are tuned for nothing in particular and lose
bursts (a 10 msgs/s per-peer spam cap that silently stops relaying, a 32-RPC
outbound queue per peer, a 32-message subscription channel, a 120 s heartbeat).
:class:`GossipSettings` sets every knob deliberately; the ones py-libp2p does
not expose are applied in :func:`build_pubsub` (see its comments).

Every message is a libp2p signed envelope (``wire/signed.py``). A topic
validator rejects, before relaying, anything that does not verify, is not a task
announcement for that topic's capability, is larger than 16 KiB, or whose
``creator`` is not the key that signed it. Rejected messages are never relayed,
so a forger's message dies at its first honest hop.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import PrivateKey
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import RpcQueue
from libp2p.pubsub.subscription import TrioSubscriptionAPI
from libp2p.tools.anyio_service import background_trio_service
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dht.records import CAPABILITY_NAME
from runtime.errors import ClawnodeError, ErrorCode
from wire.signed import SignatureError, open_sealed, seal, signer_peer_id

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

TASK_TOPIC_PREFIX = "/clawnode/tasks/1.0.0/"
ANNOUNCEMENT_DOMAIN = "clawnode-task-announcement"
ANNOUNCEMENT_PAYLOAD_TYPE = b"/clawnode/task-announcement/1"
# An announcement is a pointer to a task, not the task: 16 KiB is generous for a
# summary and a hash, and small enough that a burst cannot fill queues by bytes.
MAX_ANNOUNCEMENT_BYTES = 16 * 1024

_CAPABILITY = re.compile(CAPABILITY_NAME)


class TaskAnnouncement(BaseModel):
    """What a buyer broadcasts: enough to decide whether to bid, nothing secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    creator: str = Field(min_length=1, max_length=128, description="peer id of the signer")
    capability: str = Field(pattern=CAPABILITY_NAME)
    budget: int = Field(ge=0, description="in wei")
    asset: Literal["ETH"] = "ETH"
    deadline: int = Field(ge=0, description="unix seconds")
    review_timeout_s: int = Field(ge=0)
    summary: str = Field(max_length=280)
    params_hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the task parameters")
    # Who settles a dispute: the arbiter's peer id (to send it the case) and the wallet the escrow
    # lock names as arbiter. Optional so that a bare announcement still validates; the task market
    # ignores announcements without them (nobody could lock or dispute safely).
    arbiter: str | None = Field(None, pattern=r"^[1-9A-HJ-NP-Za-km-z]{32,128}$")
    arbiter_wallet: str | None = Field(None, pattern=r"^0x[0-9a-fA-F]{40}$")


class VerifiedAnnouncement(NamedTuple):
    signer: str
    announcement: TaskAnnouncement


@dataclass(frozen=True)
class GossipSettings:
    """Every GossipSub/Pubsub knob we rely on, with the reason for its value."""

    # /meshsub/1.1.0 only. py-libp2p sends an IDONTWANT control RPC to every mesh
    # peer for *every* message on 1.2+ (gossipsub.py `_emit_idontwant_for_message`,
    # no size threshold, unlike go's 1 KiB), doubling outbound RPCs in a burst for
    # no gain on <=16 KiB payloads. Measured on a 6-node line with every other knob
    # below applied: on 1.2, nodes two or more hops away got only ~90-125 of a
    # 200-message burst; on 1.1, all 200. go and js peers negotiate 1.1 fine.
    protocols: tuple[str, ...] = (str(PROTOCOL_ID_V11),)
    # Small networks: a home swarm has tens of nodes, often only 2-3 links each.
    # D=4 keeps the mesh reaching everyone without flooding; D_lo=3 makes the 1 s
    # heartbeat graft as soon as a node drops below 3; D_hi=8 tolerates inbound grafts.
    degree: int = 4
    degree_low: int = 3
    degree_high: int = 8
    # go-libp2p's 1 s. py-libp2p's 120 s default means a new subscriber waits up to
    # two minutes to join the mesh, and IHAVE gossip (the repair path for anything
    # lost) runs twice an hour.
    heartbeat_interval_s: int = 1
    heartbeat_initial_delay_s: float = 0.1
    # IHAVE advertises the last 3 heartbeats; the cache answers IWANT for 5 (5 s).
    gossip_window: int = 3
    gossip_history: int = 5
    # Fanout (publishing to a topic we do not subscribe to) forgets peers after 60 s.
    fanout_ttl_s: int = 60
    # Off: its "network health" heuristic rewrites heartbeat_interval to >= 30-60 s
    # (gossipsub.py `_adapt_heartbeat_parameters`) and shifts the degree bounds,
    # silently undoing the values above.
    adaptive_gossip: bool = False
    # py-libp2p's spam check counts messages per (forwarding peer, topic) in a
    # sliding second, our own publishes included, and a message over the cap is
    # delivered locally but never relayed or cached for IHAVE: lost downstream for
    # good. The default 10/s loses any burst. 1000/s lets a buyer post a few hundred
    # tasks at once while still capping a flooding neighbour.
    max_messages_per_topic_per_second: float = 1000.0
    # IWANT is rate-limited per peer across all topics (default 10/s); with a 1 s
    # heartbeat and one topic per capability a node can legitimately ask more.
    max_iwant_requests_per_second: float = 100.0
    max_ihave_messages_per_second: float = 10.0
    # Outbound RPCs queued per peer before py-libp2p drops them (default 32, not a
    # constructor argument: `Pubsub._handle_new_peer` builds `RpcQueue()` bare).
    # Each message is one RPC, so the queue must hold a whole burst per peer.
    outbound_queue_size: int = 2048
    # Messages buffered between pubsub and our topic pump (py-libp2p's module
    # constant SUBSCRIPTION_CHANNEL_SIZE = 32; overflow is dropped with a warning).
    subscription_channel_size: int = 4096
    # Verified announcements buffered per local subscriber before we drop for it.
    subscriber_buffer: int = 1024
    # Message ids remembered to drop duplicates; must outlive gossip_history.
    seen_ttl_s: int = 120
    # (signer, task id) pairs remembered for application-level dedup.
    dedup_capacity: int = 65536


DEFAULT_SETTINGS = GossipSettings()


def task_topic(capability: str) -> str:
    """The gossip topic on which tasks needing ``capability`` are announced."""
    if not _CAPABILITY.fullmatch(capability):
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"not a capability name: {capability!r}")
    return TASK_TOPIC_PREFIX + capability


class _ResizingQueues(dict[ID, RpcQueue]):
    """Enlarges every per-peer outbound queue as pubsub registers it.

    py-libp2p creates each queue with the module default (32) inside
    ``Pubsub._handle_new_peer`` and offers no parameter; intercepting the one
    assignment that stores it is the least invasive way to size it.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size

    def __setitem__(self, peer_id: ID, queue: RpcQueue) -> None:
        queue._queue.max_size = self._size
        super().__setitem__(peer_id, queue)


def build_pubsub(host: IHost, settings: GossipSettings = DEFAULT_SETTINGS) -> tuple[Pubsub, GossipSub]:
    """A Pubsub + GossipSub pair on ``host`` with our settings.

    The pair must be run (see :meth:`TaskAnnouncements.run`) as soon as it is
    built: Pubsub registers a network notifee whose channel has no buffer, and
    the swarm awaits notifees while setting up each connection, so a Pubsub that
    exists but does not run stalls every new connection of the host.
    """
    router = GossipSub(
        protocols=[TProtocol(p) for p in settings.protocols],
        degree=settings.degree,
        degree_low=settings.degree_low,
        degree_high=settings.degree_high,
        time_to_live=settings.fanout_ttl_s,
        gossip_window=settings.gossip_window,
        gossip_history=settings.gossip_history,
        heartbeat_initial_delay=settings.heartbeat_initial_delay_s,
        heartbeat_interval=settings.heartbeat_interval_s,
        adaptive_gossip_enabled=settings.adaptive_gossip,
        spam_protection_enabled=True,
        max_messages_per_topic_per_second=settings.max_messages_per_topic_per_second,
    )
    # Plain attributes set after construction in py-libp2p, not arguments.
    router.max_iwant_requests_per_second = settings.max_iwant_requests_per_second
    router.max_ihave_messages_per_second = settings.max_ihave_messages_per_second
    pubsub = Pubsub(
        host,
        router,
        # Pubsub-level signatures bind from/seqno (the message id) to a key, so a
        # peer cannot poison the seen-cache with someone else's message ids.
        strict_signing=True,
        seen_ttl=settings.seen_ttl_s,
    )
    pubsub.peer_queues = _ResizingQueues(settings.outbound_queue_size)
    return pubsub, router


def verify_announcement(data: bytes, capability: str) -> VerifiedAnnouncement:
    """Check one gossip payload for the topic of ``capability``.

    Raises :class:`ClawnodeError` (``E_INVALID_ARGUMENT`` or ``E_UNAUTHENTICATED``).
    """
    if len(data) > MAX_ANNOUNCEMENT_BYTES:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"announcement over {MAX_ANNOUNCEMENT_BYTES} bytes")
    try:
        signer, payload = open_sealed(data, domain=ANNOUNCEMENT_DOMAIN, payload_type=ANNOUNCEMENT_PAYLOAD_TYPE)
    except SignatureError as error:
        raise ClawnodeError(ErrorCode.UNAUTHENTICATED, str(error)) from None
    try:
        announcement = TaskAnnouncement.model_validate_json(payload)
    except ValidationError:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "payload is not a task announcement") from None
    if announcement.capability != capability:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "announcement is for another capability's topic")
    if announcement.creator != str(signer):
        raise ClawnodeError(ErrorCode.UNAUTHENTICATED, "announcement creator is not its signer")
    return VerifiedAnnouncement(str(signer), announcement)


@dataclass
class _Topic:
    capability: str
    subscription: TrioSubscriptionAPI
    subscribers: list[trio.MemorySendChannel[VerifiedAnnouncement]] = field(default_factory=list)


@dataclass
class GossipStats:
    delivered: int = 0
    duplicates: int = 0
    rejected: int = 0
    subscriber_overflow: int = 0


class TaskAnnouncements:
    """Announce tasks and receive verified announcements, per capability.

    Start with ``await nursery.start(ann.run)`` *before* connecting to peers
    when possible (peers already connected are registered with pubsub at start).
    """

    def __init__(self, host: IHost, settings: GossipSettings = DEFAULT_SETTINGS) -> None:
        self.host = host
        self.settings = settings
        self.stats = GossipStats()
        self._pubsub: Pubsub | None = None
        self._router: GossipSub | None = None
        self._nursery: trio.Nursery | None = None
        self._topics: dict[str, _Topic] = {}
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()

    @property
    def pubsub(self) -> Pubsub:
        if self._pubsub is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "task announcements are not running")
        return self._pubsub

    @property
    def router(self) -> GossipSub:
        if self._router is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "task announcements are not running")
        return self._router

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Built here, not in __init__, so it never exists without running (see build_pubsub).
        pubsub, router = build_pubsub(self.host, self.settings)
        async with background_trio_service(pubsub), background_trio_service(router), trio.open_nursery() as nursery:
            await pubsub.wait_until_ready()
            self._pubsub, self._router, self._nursery = pubsub, router, nursery
            # Connections made before pubsub existed never reached its notifee.
            for peer_id in list(self.host.get_network().connections):
                nursery.start_soon(pubsub.ensure_peer_stream, peer_id)
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._pubsub = self._router = self._nursery = None
                for topic in self._topics.values():
                    for channel in topic.subscribers:
                        channel.close()
                self._topics.clear()

    async def subscribe(self, capability: str) -> trio.MemoryReceiveChannel[VerifiedAnnouncement]:
        """A channel of verified, deduplicated announcements for ``capability``.

        Subscribing also makes this node relay the topic. Close the returned
        channel to stop receiving; the node stays subscribed (and relaying).
        """
        topic_id = task_topic(capability)
        pubsub = self.pubsub
        topic = self._topics.get(topic_id)
        if topic is None:
            self._set_validator(topic_id, capability)
            subscription = await pubsub.subscribe(topic_id)
            if not isinstance(subscription, TrioSubscriptionAPI):
                raise ClawnodeError(ErrorCode.INTERNAL, "unexpected pubsub subscription type")
            self._enlarge_subscription(topic_id, subscription)
            topic = _Topic(capability, subscription)
            self._topics[topic_id] = topic
            assert self._nursery is not None
            self._nursery.start_soon(self._pump, topic)
        send, receive = trio.open_memory_channel[VerifiedAnnouncement](self.settings.subscriber_buffer)
        topic.subscribers.append(send)
        return receive

    async def announce(self, order: TaskAnnouncement, private_key: PrivateKey) -> None:
        """Sign ``order`` with ``private_key`` and publish it on its capability's topic."""
        topic_id = task_topic(order.capability)
        if order.creator != str(signer_peer_id(private_key.get_public_key())):
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "creator must be the peer id of the signing key")
        data = seal(order, private_key, domain=ANNOUNCEMENT_DOMAIN, payload_type=ANNOUNCEMENT_PAYLOAD_TYPE)
        if len(data) > MAX_ANNOUNCEMENT_BYTES:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"announcement over {MAX_ANNOUNCEMENT_BYTES} bytes")
        # Pubsub validates local publishes too, but only for topics with a validator.
        self._set_validator(topic_id, order.capability)
        await self.pubsub.publish(topic_id, data)

    def _set_validator(self, topic_id: str, capability: str) -> None:
        if topic_id not in self.pubsub.topic_validators:
            self.pubsub.set_topic_validator(topic_id, self._validator_for(capability), False)

    def _validator_for(self, capability: str) -> Callable[[ID, rpc_pb2.Message], bool]:
        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            try:
                verify_announcement(msg.data, capability)
            except ClawnodeError as error:
                self.stats.rejected += 1
                log.debug("rejected announcement via %s: %s", forwarder, error.message)
                return False
            return True

        return validate

    def _enlarge_subscription(self, topic_id: str, subscription: TrioSubscriptionAPI) -> None:
        """Swap pubsub's 32-slot subscription channel for one of our size.

        Pubsub pushes with ``send_nowait`` and drops on a full channel; a burst's
        messages are handled by concurrent tasks that can all run before our pump
        does, so 32 slots lose messages even with an idle consumer.
        """
        pubsub = self.pubsub
        send, receive = trio.open_memory_channel[rpc_pb2.Message](self.settings.subscription_channel_size)
        pubsub.subscribed_topics_send[topic_id] = send
        subscription.receive_channel = receive

    async def _pump(self, topic: _Topic) -> None:
        async for msg in topic.subscription:
            try:
                item = verify_announcement(msg.data, topic.capability)
            except ClawnodeError:
                # The validator already ran; only a bug gets here.
                self.stats.rejected += 1
                continue
            key = (item.signer, item.announcement.task_id)
            if key in self._seen:
                self.stats.duplicates += 1
                continue
            self._seen[key] = None
            if len(self._seen) > self.settings.dedup_capacity:
                self._seen.popitem(last=False)
            self.stats.delivered += 1
            for channel in list(topic.subscribers):
                try:
                    channel.send_nowait(item)
                except trio.WouldBlock:
                    self.stats.subscriber_overflow += 1
                    log.warning("subscriber to %s is not keeping up; dropped an announcement", topic.capability)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    topic.subscribers.remove(channel)
