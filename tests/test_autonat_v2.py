"""AutoNAT v2 (``nat/autonat_v2*.py``): its messages, its rules, and a client and a server on loopback.

On loopback every address is private, so the services run with ``allow_private``; the server's
rule that refuses private addresses is checked on its own. A second loopback IP (127.0.0.2, which
Linux answers on without configuration) plays "an address whose IP is not the one the request came
from": the server must ask for dial data before dialing it. js-libp2p's client and server against
these: ``tests/test_interop_js.py``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import multiaddr
import pytest
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost, INetStream
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.peerinfo import PeerInfo

from nat.autonat_v2 import AutoNatV2, AutoNatV2Settings
from nat.autonat_v2_rules import (
    DIAL_DATA_MAX,
    DIAL_DATA_MIN,
    Refused,
    Target,
    accept_dial_data,
    admit,
    choose_target,
    dial_data_size,
    judge_addr,
    outcome_of,
)
from nat.autonat_v2_wire import (
    DIAL_BACK_PROTOCOL,
    DIAL_REQUEST_PROTOCOL,
    MAX_MESSAGE_BYTES,
    DialDataRequest,
    DialDataResponse,
    DialRequest,
    DialResponse,
    DialStatus,
    Message,
    ResponseStatus,
    WireError,
    decode_dial_back,
    decode_dial_back_response,
    decode_message,
    encode_dial_back,
    encode_dial_back_response,
    encode_message,
)
from node.host import build_dialer_host, build_host
from runtime.errors import ClawnodeError
from wire.framing import FrameReader, write_frame

if TYPE_CHECKING:
    from trio_typing import TaskStatus

SETTINGS = AutoNatV2Settings(allow_private=True, distinct_by="peer", min_servers=1, check_interval_s=0)
PEER = "12D3KooWLa5bVjD3UaZAjVmWdDEBWHaC5Q5Cw5VCLLwHW2vT2kB9"


def ma(text: str) -> bytes:
    return multiaddr.Multiaddr(text).to_bytes()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- messages


def test_messages_round_trip_and_defaults_are_left_out() -> None:
    messages: list[Message] = [
        DialRequest((ma("/ip4/1.2.3.4/tcp/4001"), ma("/ip6/2001:db8::1/tcp/4001")), 2**64 - 1),
        DialResponse(ResponseStatus.OK, 1, DialStatus.DIAL_ERROR),
        DialDataRequest(0, 65_000),
        DialDataResponse(bytes(4096)),
    ]
    for message in messages:
        assert decode_message(encode_message(message)) == message
    # proto3: an all-default DialResponse is an empty inner message, still a DialResponse
    assert encode_message(DialResponse(ResponseStatus.INTERNAL_ERROR)) == b"\x12\x00"
    assert decode_dial_back(encode_dial_back(12345)) == 12345
    assert encode_dial_back_response() == b"" and decode_dial_back_response(b"") == 0
    # unknown fields are skipped, as proto3 does
    assert decode_message(b"\x28\x07" + encode_message(DialDataRequest(2, 30_000))) == DialDataRequest(2, 30_000)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x0a", b"\x0a\x05\x0a\x09", b"\xff" * 11, b"\x0b", bytes(MAX_MESSAGE_BYTES + 1), b"\x08\x01"],
)
def test_malformed_messages_are_refused(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_message(data)


# --- rules


def test_a_lan_peer_cannot_make_the_server_dial_its_loopback_even_with_allow_private() -> None:
    """nat.autonat_allow_private lets LAN addresses be dialed back; a LAN peer that asks about the
    server's own 127.0.0.1:<port> (paying dial data for another IP) would learn which local ports
    answer: loopback is dialed only for a requester on loopback, link-local only its own address,
    never 0.0.0.0 (it reaches this host) nor an IPv4-mapped loopback."""

    def choose(addr: str, observed: str) -> Target | Refused:
        kw: dict[str, object] = {"families": frozenset({4, 6}), "allow_private": True, "max_addrs": 4}
        return choose_target([ma(addr)], requester=PEER, observed_ip=observed, **kw)  # type: ignore[arg-type]

    refused = Refused(ResponseStatus.DIAL_REFUSED, "no_dialable_address")
    lan = "192.168.1.7"
    for addr in (
        "/ip4/127.0.0.1/tcp/4001",
        "/ip4/127.5.6.7/tcp/4001",
        "/ip6/::1/tcp/4001",
        "/ip6/::ffff:127.0.0.1/tcp/4001",
        "/ip4/0.0.0.0/tcp/4001",
        "/ip4/169.254.9.9/tcp/4001",
        "/ip4/224.0.0.1/tcp/4001",
    ):
        assert choose(addr, lan) == refused, addr
    # the LAN itself is still dialed, the requester's own link-local address too, loopback for a local peer
    assert choose("/ip4/192.168.1.8/tcp/4001", lan) == Target(0, "/ip4/192.168.1.8/tcp/4001", needs_dial_data=True)
    assert choose("/ip4/169.254.9.9/tcp/1", "169.254.9.9") == Target(0, "/ip4/169.254.9.9/tcp/1", needs_dial_data=False)
    assert choose("/ip4/127.0.0.1/tcp/1", "127.0.0.1") == Target(0, "/ip4/127.0.0.1/tcp/1", needs_dial_data=False)


def test_the_server_dials_the_first_address_it_may_and_asks_dial_data_for_another_ip() -> None:
    def choose(addrs: list[str], observed: str = "1.2.3.4", **kw: object) -> Target | Refused:
        args: dict[str, object] = {"families": frozenset({4}), "allow_private": False, "max_addrs": 8} | kw
        return choose_target([ma(a) for a in addrs], requester=PEER, observed_ip=observed, **args)  # type: ignore[arg-type]

    same = choose(["/ip4/1.2.3.4/tcp/4001"])
    assert same == Target(0, "/ip4/1.2.3.4/tcp/4001", needs_dial_data=False)
    # private, IPv6 without IPv6, UDP and someone else's /p2p/ are skipped; another IP costs dial data
    other = choose(
        [
            "/ip4/192.168.1.5/tcp/4001",
            "/ip6/2001:4860::1/tcp/4001",
            "/ip4/1.2.3.4/udp/4001/quic-v1",
            "/ip4/1.2.3.4/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
            "/ip4/5.6.7.8/tcp/4001/p2p/" + PEER,
        ]
    )
    assert other == Target(4, "/ip4/5.6.7.8/tcp/4001", needs_dial_data=True)
    assert choose(["/ip4/10.0.0.1/tcp/1"]) == Refused(ResponseStatus.DIAL_REFUSED, "no_dialable_address")
    assert choose(["/ip4/127.0.0.1/tcp/1"], observed="127.0.0.1", allow_private=True) == Target(
        0, "/ip4/127.0.0.1/tcp/1", needs_dial_data=False
    )
    # only the first max_addrs are looked at
    assert isinstance(choose(["/ip4/10.0.0.1/tcp/1", "/ip4/1.2.3.4/tcp/1"], max_addrs=1), Refused)
    undecodable = choose_target(
        [b"\xff\xff"], requester=PEER, observed_ip="1.2.3.4", families=frozenset({4}), allow_private=True, max_addrs=8
    )
    assert undecodable == Refused(ResponseStatus.DIAL_REFUSED, "no_dialable_address")


def test_admission_bounds_concurrency_rate_and_each_peer() -> None:
    def verdict(**kw: object) -> Refused | None:
        args: dict[str, object] = {
            "last_by_peer": {},
            "recent": [],
            "running": 0,
            "peer_interval_s": 30.0,
            "max_per_minute": 3,
            "max_running": 2,
        } | kw
        return admit("peer", 100.0, **args)  # type: ignore[arg-type]

    assert verdict() is None
    assert verdict(running=2) == Refused(ResponseStatus.REQUEST_REJECTED, "busy")
    assert verdict(recent=[50.0, 60.0, 70.0]) == Refused(ResponseStatus.REQUEST_REJECTED, "rate_limited")
    assert verdict(recent=[10.0, 20.0, 70.0]) is None  # two of them are over a minute old
    assert verdict(last_by_peer={"peer": 80.0}) == Refused(ResponseStatus.REQUEST_REJECTED, "peer_rate_limited")
    assert verdict(last_by_peer={"peer": 60.0, "other": 99.0}) is None


def test_dial_data_sizes_and_what_a_client_pays() -> None:
    assert dial_data_size(0.0) == DIAL_DATA_MIN and dial_data_size(0.999999) <= DIAL_DATA_MAX
    assert all(DIAL_DATA_MIN <= dial_data_size(x / 10) <= DIAL_DATA_MAX for x in range(-5, 15))
    assert accept_dial_data(0, 100_000, asked=1, max_bytes=100_000)
    assert not accept_dial_data(0, 100_001, asked=1, max_bytes=100_000)
    assert not accept_dial_data(1, 30_000, asked=1, max_bytes=100_000)  # an address we did not ask about


def test_a_client_believes_ok_only_with_its_nonce_back() -> None:
    ok = DialResponse(ResponseStatus.OK, 1, DialStatus.OK)
    assert outcome_of(ok, asked=2, nonce_seen=True) == ("reachable", 1)
    assert outcome_of(ok, asked=2, nonce_seen=False) == ("invalid", None)
    assert outcome_of(ok, asked=1, nonce_seen=True) == ("invalid", None)  # an index we did not send
    assert outcome_of(DialResponse(200, 0, 100), asked=1, nonce_seen=False) == ("unreachable", 0)
    assert outcome_of(DialResponse(200, 0, 101), asked=1, nonce_seen=False) == ("inconclusive", 0)
    assert outcome_of(DialResponse(100), asked=1, nonce_seen=False) == ("rejected", None)
    assert outcome_of(DialResponse(101), asked=1, nonce_seen=False) == ("refused", None)
    assert outcome_of(DialResponse(150), asked=1, nonce_seen=True) == ("invalid", None)  # unknown status
    assert outcome_of(DialResponse(200, 0, 7), asked=1, nonce_seen=True) == ("invalid", None)
    assert judge_addr({"a": "reachable", "b": "unreachable"}, 1) == "reachable"
    assert judge_addr({"a": "unreachable", "b": "inconclusive"}, 2) == "unknown"
    assert judge_addr({"a": "unreachable", "b": "unreachable"}, 2) == "unreachable"


# --- client and server on loopback


@dataclass
class Node:
    host: IHost
    autonat: AutoNatV2


@asynccontextmanager
async def v2_node(
    nursery: trio.Nursery, listen: list[str] | None = None, settings: AutoNatV2Settings = SETTINGS
) -> AsyncIterator[Node]:
    host = build_host(generate_new_ed25519_identity())
    addrs = [multiaddr.Multiaddr(addr) for addr in (listen or ["/ip4/127.0.0.1/tcp/0"])]
    async with host.run(addrs):
        autonat = AutoNatV2(host, settings, build_dialer=build_dialer_host)
        scope = trio.CancelScope()

        async def run(task_status: TaskStatus[AutoNatV2] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await autonat.run(task_status=task_status)

        await nursery.start(run)
        try:
            yield Node(host, autonat)
        finally:
            scope.cancel()


async def connect(client: IHost, server: IHost) -> None:
    with trio.fail_after(10):
        await client.connect(PeerInfo(server.get_id(), server.get_addrs()))
        while True:
            try:
                if DIAL_REQUEST_PROTOCOL in client.get_peerstore().get_protocols(server.get_id()):
                    return
            except Exception:  # noqa: BLE001 - not identified yet
                pass
            await trio.sleep(0.02)


def own(host: IHost, prefix: str = "/ip4/127.0.0.1/") -> str:
    return next(str(a).split("/p2p/")[0] for a in host.get_addrs() if str(a).startswith(prefix))


@pytest.mark.trio
async def test_py_client_and_server_reachable_unreachable_and_dial_data() -> None:
    async with trio.open_nursery() as nursery:
        async with (
            v2_node(nursery) as server,
            v2_node(nursery, ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.2/tcp/0"]) as client,
        ):
            await connect(client.host, server.host)
            server_id = server.host.get_id()

            reached = await client.autonat.ask(server_id, [own(client.host)])
            assert (reached.outcome, reached.addr, reached.dial_data) == ("reachable", own(client.host), 0)
            assert client.autonat.verdicts() == {}  # ask() alone records nothing; check() does

            # the same server again at once: one request per peer per interval
            assert (await client.autonat.ask(server_id, [own(client.host)])).outcome == "rejected"
            server.autonat._last_by_peer.clear()

            dead = f"/ip4/127.0.0.1/tcp/{closed_port()}"
            missed = await client.autonat.ask(server_id, [dead, own(client.host)])
            assert (missed.outcome, missed.addr) == ("unreachable", dead)  # exactly one address is dialed
            server.autonat._last_by_peer.clear()

            # 127.0.0.2 is not the IP the request came from: dial data first, then the dial
            other = own(client.host, "/ip4/127.0.0.2/")
            paid = await client.autonat.ask(server_id, [other])
            assert (paid.outcome, paid.addr) == ("reachable", other)
            counts = server.autonat.counts
            assert counts.dial_data_requested == 1
            assert DIAL_DATA_MIN <= counts.dial_data_received <= paid.dial_data < DIAL_DATA_MAX + 4096
            assert counts.served["ok"] == 2 and counts.served["dial_error"] == 1 and counts.dials == 3
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_the_server_never_dials_for_a_client_that_will_not_pay() -> None:
    async with trio.open_nursery() as nursery:
        async with (
            v2_node(nursery) as server,
            v2_node(nursery, settings=AutoNatV2Settings(allow_private=True, client_max_dial_data=10)) as stingy,
            v2_node(nursery) as raw,
        ):
            await connect(stingy.host, server.host)
            victim = f"/ip4/127.0.0.2/tcp/{closed_port()}"
            declined = await stingy.autonat.ask(server.host.get_id(), [victim])
            assert declined.outcome == "declined"

            # A client that sends too little and stops: no dial, the stream ends at the deadline.
            await connect(raw.host, server.host)
            stream = await raw.host.new_stream(server.host.get_id(), [DIAL_REQUEST_PROTOCOL])
            await write_frame(stream, encode_message(DialRequest((ma(victim),), 7)), max_frame=MAX_MESSAGE_BYTES)
            reader = FrameReader(stream, max_frame=MAX_MESSAGE_BYTES)
            asked = decode_message(await reader.read_frame(5))
            assert isinstance(asked, DialDataRequest) and asked.addr_idx == 0
            assert DIAL_DATA_MIN <= asked.num_bytes <= DIAL_DATA_MAX
            await write_frame(stream, encode_message(DialDataResponse(bytes(4096))), max_frame=MAX_MESSAGE_BYTES)
            # a message over the spec's 4,096 data bytes ends the request at once
            await write_frame(stream, encode_message(DialDataResponse(bytes(5000))), max_frame=MAX_MESSAGE_BYTES)
            with trio.fail_after(5):
                while server.autonat.counts.served["aborted"] < 2:
                    await trio.sleep(0.02)
            assert server.autonat.counts.dials == 0  # nothing was dialed for either
            assert server.autonat.counts.dial_data_received == 4096
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_the_check_loop_judges_each_address() -> None:
    settings = AutoNatV2Settings(allow_private=True, distinct_by="peer", min_servers=2, check_interval_s=0)
    async with trio.open_nursery() as nursery:
        async with (
            v2_node(nursery) as first,
            v2_node(nursery) as second,
            v2_node(nursery, settings=settings) as client,
        ):
            for server in (first, second):
                await connect(client.host, server.host)
            dead = f"/ip4/127.0.0.1/tcp/{closed_port()}"
            client.autonat._own_addrs = lambda: [own(client.host), dead]
            # two servers, two addresses: each server is asked about a different one first
            await client.autonat.check()
            for server in (first, second):
                server.autonat._last_by_peer.clear()
            verdicts = await client.autonat.check()
            assert verdicts == {own(client.host): "reachable", dead: "unreachable"}
            assert client.autonat.reachable_addrs() == [own(client.host)]
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_daemon_serves_autonat_v2_beside_its_own(tmp_path: Path) -> None:
    """A bootstrap node serves ``/clawnode/autonat/1.0.0`` by its role, and AutoNAT v2 with it: a v2
    client (what a js or go node runs) hears that its address is reachable."""
    from node.config import ApiSection, BootstrapSection, Config, EscrowSection, NatSection, NodeSection
    from node.daemon import Node as Daemon

    config = Config(
        node=NodeSection(listen=["/ip4/127.0.0.1/tcp/0"], role="bootstrap"),  # type: ignore[call-arg]
        api=ApiSection(port=0),
        bootstrap=BootstrapSection(peers=[], use_defaults=False),
        escrow=EscrowSection(mode="off"),  # type: ignore[call-arg]
        nat=NatSection(autonat_min_servers=1, autonat_distinct_by="peer", autonat_allow_private=True),  # type: ignore[call-arg]
    )
    async with trio.open_nursery() as nursery:
        daemon = Daemon(config, tmp_path / "boot")
        await nursery.start(daemon.run)
        async with v2_node(nursery) as client:
            await connect(client.host, daemon.host)  # waits until identify names the v2 protocol
            answer = await client.autonat.ask(daemon.host.get_id(), [own(client.host)])
            assert (answer.outcome, answer.addr) == ("reachable", own(client.host))
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_lying_server_and_a_stray_dial_back_change_nothing() -> None:
    """A server that answers OK without dialing back is not believed (no nonce came), and a dial-back
    carrying a nonce of no request of ours gets no DialBackResponse."""
    async with trio.open_nursery() as nursery:
        async with v2_node(nursery) as client:
            liar = build_host(generate_new_ed25519_identity())
            async with liar.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):

                async def lie(stream: INetStream) -> None:
                    reader = FrameReader(stream, max_frame=MAX_MESSAGE_BYTES)
                    assert isinstance(decode_message(await reader.read_frame(5)), DialRequest)
                    answer = DialResponse(ResponseStatus.OK, 0, DialStatus.OK)
                    await write_frame(stream, encode_message(answer), max_frame=MAX_MESSAGE_BYTES)
                    await stream.close()

                liar.set_stream_handler(DIAL_REQUEST_PROTOCOL, lie)
                await connect(client.host, liar)
                answer = await client.autonat.ask(liar.get_id(), [own(client.host)])
                assert (answer.outcome, answer.addr) == ("invalid", None)

                stream = await liar.new_stream(client.host.get_id(), [DIAL_BACK_PROTOCOL])
                await write_frame(stream, encode_dial_back(424242), max_frame=64)
                with pytest.raises((ClawnodeError, StreamError)):  # reset: no answer to a nonce nobody sent
                    await FrameReader(stream, max_frame=64).read_frame(5)
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_servers_that_speak_only_v2_decide_the_node_reachability() -> None:
    """A node whose only AutoNAT servers are v2 servers (what js and go nodes run) learns its
    reachability from them: public when they reached its address (and then advertises it as
    confirmed), private when they could not, by the same agreement rule as v1 answers."""
    from nat.autonat import PROTOCOL_ID, AutoNat, AutoNatSettings

    settings = AutoNatSettings(
        min_servers=2, distinct_by="peer", allow_private=True, serve="never", retry_interval_s=3600
    )
    async with trio.open_nursery() as nursery:
        async with (
            v2_node(nursery) as first,
            v2_node(nursery) as second,
            v2_node(nursery) as client,
        ):
            for server in (first, second):
                await connect(client.host, server.host)
                assert PROTOCOL_ID not in client.host.get_peerstore().get_protocols(server.host.get_id())
            address = own(client.host)
            asked = [address]
            autonat = AutoNat(
                client.host,
                settings,
                own_addrs=lambda: asked,
                own_ports=lambda: [],
                build_dialer=build_dialer_host,
                v2=client.autonat,
            )
            assert len(autonat._servers()) == 2
            state = await autonat.check()
            assert (state.verdict, state.reason) == ("public", "autonat: 2/2 dial-backs")
            assert autonat.confirmed_addrs() == [address]
            assert first.autonat.counts.served["ok"] == second.autonat.counts.served["ok"] == 1
            # A v2 server dials what it was asked about, not only our observed IP: no observed IP
            # for the double-NAT rule, but the address counts as tested.
            assert autonat.observed_ips() == [] and [addr for addr, _ in autonat.tested_addrs()] == [address]

            # the same servers, about an address nobody listens on (their rate limit lifted)
            for server in (first, second):
                server.autonat._last_by_peer.clear()
            asked[:] = [f"/ip4/127.0.0.1/tcp/{closed_port()}"]
            state = await autonat.check()
            assert (state.verdict, state.reason) == ("private", "autonat: 0/2 dial-backs")
            assert autonat.confirmed_addrs() == []
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_daemon_learns_it_is_public_from_v2_only_servers(tmp_path: Path) -> None:
    """A daemon whose only peer serves AutoNAT v2 and not ``/clawnode/autonat/1.0.0`` (a js or go
    node) measures itself public, declares it in its status and serves AutoNAT then."""
    from node.config import ApiSection, BootstrapSection, Config, EscrowSection, NatSection, NodeSection
    from node.daemon import Node as Daemon

    async with trio.open_nursery() as nursery:
        async with v2_node(nursery) as server:
            config = Config(
                node=NodeSection(listen=["/ip4/127.0.0.1/tcp/0"], role="node"),  # type: ignore[call-arg]
                api=ApiSection(port=0),
                bootstrap=BootstrapSection(
                    peers=[f"{own(server.host)}/p2p/{server.host.get_id()}"], use_defaults=False
                ),
                escrow=EscrowSection(mode="off"),  # type: ignore[call-arg]
                nat=NatSection(autonat_min_servers=1, autonat_distinct_by="peer", autonat_allow_private=True),  # type: ignore[call-arg]
            )
            daemon = Daemon(config, tmp_path / "node")
            await nursery.start(daemon.run)
            with trio.fail_after(20):
                while daemon.status().reachability != "public":
                    await trio.sleep(0.05)
            assert daemon.status().reachability_reason == "autonat: 1/1 dial-backs"
            assert server.autonat.counts.served["ok"] >= 1
        nursery.cancel_scope.cancel()
