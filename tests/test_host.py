"""The libp2p host every node runs: Noise only, and no stream can take it down."""

from __future__ import annotations

import socket

import multiaddr
import pytest
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL_ID
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.utils.varint import read_length_prefixed_protobuf

from node.host import advertised_addrs, build_host, clawnode_version

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
EXPLODING = TProtocol("/clawnode/test-explodes/1.0.0")
ECHO = TProtocol("/clawnode/test-echo/1.0.0")


def _varint_frame(text: str) -> bytes:
    body = text.encode() + b"\n"
    assert len(body) < 128
    return bytes([len(body)]) + body


def _negotiate_security(port: int, protocol: str) -> bytes:
    """Speak multistream-select by hand and return the node's answer to ``protocol``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_varint_frame("/multistream/1.0.0") + _varint_frame(protocol))
        sock.settimeout(5)
        received = b""
        while received.count(b"\n") < 2:
            chunk = sock.recv(1024)
            if not chunk:
                break
            received += chunk
        return received


@pytest.mark.parametrize("protocol", ["/plaintext/2.0.0", "/secio/1.0.0", "/tls/1.0.0"])
async def test_only_noise_is_offered(protocol: str) -> None:
    host = build_host(generate_new_ed25519_identity())
    async with host.run(LOOPBACK):
        port = int(str(host.get_transport_addrs()[0]).split("/tcp/")[1])
        refused = await trio.to_thread.run_sync(_negotiate_security, port, protocol)
        accepted = await trio.to_thread.run_sync(_negotiate_security, port, "/noise")
    assert refused.endswith(b"na\n"), refused
    assert accepted.endswith(b"/noise\n"), accepted


async def test_a_failing_handler_costs_one_stream_not_the_node() -> None:
    server, client = build_host(generate_new_ed25519_identity()), build_host(generate_new_ed25519_identity())

    async def explode(stream: INetStream) -> None:
        await stream.read(1)
        raise ValueError("a bug in a protocol handler")

    async def echo(stream: INetStream) -> None:
        await stream.write(await stream.read(5))
        await stream.close()

    server.set_stream_handler(EXPLODING, explode)
    server.set_stream_handler(ECHO, echo)
    async with server.run(LOOPBACK), client.run(LOOPBACK):
        with trio.fail_after(10):
            await client.connect(info_from_p2p_addr(server.get_addrs()[0]))
            for _ in range(3):
                stream = await client.new_stream(server.get_id(), [EXPLODING])
                await stream.write(b"x")
                await trio.sleep(0.05)
            stream = await client.new_stream(server.get_id(), [ECHO])
            await stream.write(b"hello")
            assert await stream.read(5) == b"hello"


def test_unspecified_listen_address_is_advertised_as_local_addresses() -> None:
    advertised = [str(a) for a in advertised_addrs([multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/4021")])]
    assert "/ip4/127.0.0.1/tcp/4021" in advertised
    assert not any("0.0.0.0" in a for a in advertised)
    kept = advertised_addrs([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/1")])
    assert [str(a) for a in kept] == ["/ip4/127.0.0.1/tcp/1"]


async def test_peers_connect_and_ping_over_quic() -> None:
    addrs = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0"), multiaddr.Multiaddr("/ip4/127.0.0.1/udp/0/quic-v1")]
    server = build_host(generate_new_ed25519_identity(), listen_addrs=addrs)
    client = build_host(generate_new_ed25519_identity(), listen_addrs=addrs)
    async with server.run(addrs), client.run(addrs):
        quic = [addr for addr in server.get_addrs() if "/quic-v1" in str(addr)]
        assert quic, "no QUIC listen address"
        with trio.fail_after(10):
            await client.connect(info_from_p2p_addr(quic[0]))
            stream = await client.new_stream(server.get_id(), [TProtocol("/ipfs/ping/1.0.0")])
            await stream.write(b"q" * 32)
            echoed = b""
            while len(echoed) < 32:
                echoed += await stream.read(32 - len(echoed))
        assert echoed == b"q" * 32
        remote = [str(conn.get_transport_addresses()) for conn in client.get_network().connections[server.get_id()]]
        assert any("quic" in text for text in remote), remote


async def test_identify_announces_clawnode_and_its_version() -> None:
    server, client = build_host(generate_new_ed25519_identity()), build_host(generate_new_ed25519_identity())
    async with server.run(LOOPBACK), client.run(LOOPBACK):
        with trio.fail_after(10):
            await client.connect(info_from_p2p_addr(server.get_addrs()[0]))
            stream = await client.new_stream(server.get_id(), [IDENTIFY_PROTOCOL_ID])
            try:
                data = await read_length_prefixed_protobuf(stream, use_varint_format=True)
            finally:
                await stream.close()
    seen = Identify()
    seen.ParseFromString(data)
    assert seen.agent_version == f"clawnode/{clawnode_version()}"
    assert not seen.agent_version.startswith("py-libp2p")
