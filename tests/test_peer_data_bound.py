"""A stranger's identify push cannot make the node keep megabytes about it (node/peer_data.py)."""

from __future__ import annotations

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.identity.identify_push.identify_push import ID_PUSH, push_identify_to_peer
from libp2p.peer.peerinfo import info_from_p2p_addr

from node.host import build_host
from node.peer_data import MAX_PEER_ADDRS, MAX_PEER_PROTOCOLS, MAX_PROTOCOL_CHARS
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
