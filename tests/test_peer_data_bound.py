"""A stranger's identify push cannot make the node keep megabytes about it (node/peer_data.py): not
through its protocols and addresses, nor through a signed peer record of its own."""

from __future__ import annotations

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.identity.identify_push.identify_push import ID_PUSH, push_identify_to_peer
from libp2p.peer.envelope import Envelope, seal_record
from libp2p.peer.id import ID
from libp2p.peer.peer_record import PeerRecord
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.peer.peerstore import PeerStore

from node.host import build_host
from node.peer_data import MAX_PEER_ADDRS, MAX_PEER_PROTOCOLS, MAX_PEER_RECORD_BYTES, MAX_PROTOCOL_CHARS
from wire.framing import encode_uvarint

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


def flood() -> bytes:
    """An identify of ~0.9 MiB: 12 000 protocol names (some very long) and 1000 public addresses."""
    message = Identify(
        protocols=[f"/stranger/{index:05d}/" + "p" * (40 if index % 300 else 4000) for index in range(12_000)],
        listen_addrs=[
            multiaddr.Multiaddr(f"/ip4/1.2.{index // 250}.{index % 250}/tcp/{index + 1}").to_bytes()
            for index in range(1000)
        ],
    )
    return bytes(message.SerializeToString())


async def test_a_pushed_flood_leaves_a_bounded_record_and_honest_peers_stay_whole() -> None:
    node = build_host(generate_new_ed25519_identity())
    stranger = build_host(generate_new_ed25519_identity())
    honest = build_host(generate_new_ed25519_identity())
    async with node.run([LOOPBACK]), stranger.run([LOOPBACK]), honest.run([LOOPBACK]):
        address = node.get_addrs()[0]
        for peer in (stranger, honest):
            await peer.connect(info_from_p2p_addr(address))
        store = node.get_peerstore()

        data = flood()
        stream = await stranger.new_stream(node.get_id(), [ID_PUSH])
        await stream.write(encode_uvarint(len(data)) + data)
        await stream.close()
        with trio.fail_after(8):
            while not any(name.startswith("/stranger/") for name in store.get_protocols(stranger.get_id())):
                await trio.sleep(0.05)
        await trio.sleep(0.5)  # the push is handled as one message: nothing more comes

        kept = store.get_protocols(stranger.get_id())
        assert len(kept) <= MAX_PEER_PROTOCOLS, f"{len(kept)} protocol names kept for one stranger"
        assert all(len(name) <= MAX_PROTOCOL_CHARS for name in kept)
        assert len(store.addrs(stranger.get_id())) <= MAX_PEER_ADDRS

        # An address learned later (a DHT answer, a restart on a new port) is still kept: the oldest go.
        moved = multiaddr.Multiaddr("/ip4/9.9.9.9/tcp/4242")
        store.add_addrs(stranger.get_id(), [moved], 7200)
        assert moved in store.addrs(stranger.get_id())
        assert len(store.addrs(stranger.get_id())) <= MAX_PEER_ADDRS

        # An honest peer's own protocols and addresses, pushed the ordinary way, are kept whole.
        with trio.fail_after(8):
            assert await push_identify_to_peer(honest, node.get_id())
        assert set(honest.get_mux().handlers) <= set(store.get_protocols(honest.get_id()))
        assert set(honest.get_addrs()) <= set(store.addrs(honest.get_id()))


def signed_record(identity: KeyPair, addrs: list[multiaddr.Multiaddr]) -> Envelope:
    """A peer record signed by the peer's own key; its seq beats the one its identify sent."""
    return seal_record(PeerRecord(ID.from_pubkey(identity.public_key), addrs, seq=2**62), identity.private_key)


async def push_record(sender: IHost, receiver: IHost, envelope: Envelope, marker: multiaddr.Multiaddr) -> None:
    """Push an identify naming ``marker`` and carrying ``envelope``; return once it was handled: the
    marker is stored, or the record was (its addresses replace the marker)."""
    data = Identify(listen_addrs=[marker.to_bytes()], signedPeerRecord=envelope.marshal_envelope()).SerializeToString()
    stream = await sender.new_stream(receiver.get_id(), [ID_PUSH])
    await stream.write(encode_uvarint(len(data)) + data)
    await stream.close()
    store = receiver.get_peerstore()

    def kept(held: Envelope | None) -> bool:
        return held is not None and held.raw_payload == envelope.raw_payload

    with trio.fail_after(8):
        while marker not in store.addrs(sender.get_id()) and not kept(store.get_peer_record(sender.get_id())):
            await trio.sleep(0.05)
    await trio.sleep(0.3)  # the record is handled in the same pass, right after the addresses


def peer_store(host: IHost) -> PeerStore:
    store = host.get_peerstore()
    assert isinstance(store, PeerStore)
    return store


def kept_record_size(host: IHost, peer: IHost) -> tuple[int, int]:
    """The bytes and addresses of the signed record ``host`` keeps of ``peer`` (0, 0 when none)."""
    state = peer_store(host).peer_record_map.get(peer.get_id())
    if state is None:
        return 0, 0
    return len(state.envelope.marshal_envelope()), len(state.envelope.record().addrs)


async def test_a_pushed_signed_record_too_large_is_not_kept_and_the_peer_stays_reachable() -> None:
    node = build_host(generate_new_ed25519_identity())
    identity = generate_new_ed25519_identity()
    stranger = build_host(identity)
    async with node.run([LOOPBACK]), stranger.run([LOOPBACK]):
        await stranger.connect(info_from_p2p_addr(node.get_addrs()[0]))
        store = peer_store(node)

        # 5000 addresses (60 KiB), signed by the stranger's own key: py-libp2p kept every one.
        many = [multiaddr.Multiaddr(f"/ip4/1.2.{i // 250}.{i % 250}/tcp/{i + 1}") for i in range(5000)]
        marker = multiaddr.Multiaddr("/ip4/9.9.9.9/tcp/9001")
        await push_record(stranger, node, signed_record(identity, many), marker)
        size, addrs = kept_record_size(node, stranger)
        assert size <= MAX_PEER_RECORD_BYTES and addrs <= MAX_PEER_ADDRS, f"kept a record of {size} B, {addrs} addrs"
        assert len(store.addrs(stranger.get_id())) <= MAX_PEER_ADDRS

        # Few addresses, but long ones: 40 DNS names of 243 characters (10 KiB).
        name = ".".join(["a" * 60] * 4)
        long = [multiaddr.Multiaddr(f"/dns4/{i:03d}{name}/tcp/1") for i in range(40)]
        marker = multiaddr.Multiaddr("/ip4/9.9.9.9/tcp/9002")
        await push_record(stranger, node, signed_record(identity, long), marker)
        size, addrs = kept_record_size(node, stranger)
        assert size <= MAX_PEER_RECORD_BYTES and addrs <= MAX_PEER_ADDRS, f"kept a record of {size} B, {addrs} addrs"

        # Every other route (pubsub senderRecord, peer exchange, DHT sender records) stores the same way.
        assert store.consume_peer_records([signed_record(identity, many)], 7200) == [False]

        # The stranger is still reached at the address its identify named.
        assert marker in store.addrs(stranger.get_id())
        assert store.peer_info(stranger.get_id()).addrs


async def test_an_honest_signed_record_is_kept_and_forwarded() -> None:
    node = build_host(generate_new_ed25519_identity())
    identity = generate_new_ed25519_identity()
    honest = build_host(identity)
    async with node.run([LOOPBACK]), honest.run([LOOPBACK]):
        await honest.connect(info_from_p2p_addr(node.get_addrs()[0]))
        store = node.get_peerstore()

        # The record the honest peer's identify carried is what the DHT and peer exchange hand on.
        with trio.fail_after(8):
            while store.get_peer_record(honest.get_id()) is None:
                await trio.sleep(0.05)
        envelope = store.get_peer_record(honest.get_id())
        assert envelope is not None
        assert set(envelope.record().addrs) == set(honest.get_addrs())

        # A record naming MAX_PEER_ADDRS IPv6 addresses (the most an honest peer may name) is kept whole.
        full = [multiaddr.Multiaddr(f"/ip6/2001:db8::{i:x}/udp/{4001 + i}/quic-v1") for i in range(MAX_PEER_ADDRS)]
        await push_record(honest, node, signed_record(identity, full), multiaddr.Multiaddr("/ip4/9.9.9.9/tcp/9003"))
        envelope = store.get_peer_record(honest.get_id())
        assert envelope is not None
        assert envelope.record().seq == 2**62
        assert set(envelope.record().addrs) == set(full)
