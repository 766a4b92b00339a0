"""``/clawnode/autonat/1.0.0`` with real hosts on loopback: dial-backs come from another identity
on a fresh connection, an unreachable address gets ``private``, the server dials only the
requester's observed IP and rate-limits, and garbage costs one stream."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost
from libp2p.peer.peerinfo import PeerInfo
from pydantic import TypeAdapter

from nat.autonat import (
    MAX_FRAME,
    PROTOCOL_ID,
    AutoNat,
    AutoNatSettings,
    DialBackReply,
    DialBackRequest,
    candidate_addrs,
    judge,
)
from nat.reachability import ReachabilityState, ServerResult
from node.config import ApiSection, BootstrapSection, Config, EscrowSection, NatSection, NodeSection
from node.daemon import Node
from node.host import build_dialer_host, build_host
from runtime.errors import ClawnodeError, ErrorCode
from wire.framing import encode_uvarint
from wire.rpc import request

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
# Loopback: every server has the same IP, so distinct peer ids count; private addresses allowed.
LOOPBACK_SETTINGS = AutoNatSettings(
    distinct_by="peer", allow_private=True, check_interval_s=3600, retry_interval_s=3600, addr_poll_s=3600
)
REPLY = TypeAdapter(DialBackReply)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def running(host: IHost) -> AsyncIterator[IHost]:
    async with host.run(LOOPBACK):
        yield host


@asynccontextmanager
async def autonat_node(
    nursery: trio.Nursery,
    settings: AutoNatSettings,
    *,
    serves: bool,
    own_addrs: list[str] | None = None,
    own_ports: list[int] | None = None,
) -> AsyncIterator[AutoNat]:
    host = build_host(generate_new_ed25519_identity())
    async with running(host):
        autonat = AutoNat(
            host,
            settings,
            serves_by_role=serves,
            own_addrs=(lambda: own_addrs) if own_addrs is not None else None,
            own_ports=(lambda: own_ports) if own_ports is not None else None,
            build_dialer=build_dialer_host,
        )
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await autonat.run()

        nursery.start_soon(run)
        with trio.fail_after(10):
            while autonat.serving != (serves and settings.serve != "never") or (
                settings.serve != "never" and autonat.dialer_id is None
            ):
                await trio.sleep(0.01)
        try:
            yield autonat
        finally:
            scope.cancel()


async def connect_and_identify(client: IHost, servers: list[IHost]) -> None:
    with trio.fail_after(20):
        for server in servers:
            await client.connect(PeerInfo(server.get_id(), server.get_addrs()))
        for server in servers:
            while PROTOCOL_ID not in _protocols(client, server):
                await trio.sleep(0.05)


def _protocols(client: IHost, server: IHost) -> list[str]:
    try:
        return list(client.get_peerstore().get_protocols(server.get_id()))
    except Exception:  # noqa: BLE001 - not identified yet
        return []


@asynccontextmanager
async def swarm(
    count: int,
    client_addrs: list[str] | None = None,
    settings: AutoNatSettings = LOOPBACK_SETTINGS,
    client_ports: list[int] | None = None,
) -> AsyncIterator[tuple[AutoNat, list[AutoNat]]]:
    async with trio.open_nursery() as nursery:
        servers: list[AutoNat] = []
        async with _servers(nursery, count, settings, servers):
            client_settings = replace(settings, serve="never")
            async with autonat_node(
                nursery, client_settings, serves=False, own_addrs=client_addrs, own_ports=client_ports
            ) as client:
                await connect_and_identify(client.host, [server.host for server in servers])
                yield client, servers
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _servers(
    nursery: trio.Nursery, count: int, settings: AutoNatSettings, into: list[AutoNat]
) -> AsyncIterator[None]:
    if count == 0:
        yield
        return
    async with autonat_node(nursery, settings, serves=True) as server:
        into.append(server)
        async with _servers(nursery, count - 1, settings, into):
            yield


async def test_four_servers_dial_back_from_other_identities_on_fresh_connections() -> None:
    async with swarm(4) as (client, servers):
        with trio.fail_after(60):
            state = await client.check()
        assert state.verdict == "public", state.reason
        ok = [result for result in state.servers if result.outcome == "ok"]
        assert len(ok) >= 3, state.servers
        assert state.reason.startswith(f"autonat: {len(ok)}/")
        main_ids = {str(server.host.get_id()) for server in servers}
        dialers = {server.dialer_id for server in servers}
        for result in ok:
            dialer = result.detail
            # From a different peer id than any server's main identity, one per server ...
            assert dialer not in main_ids and dialer in dialers
            # ... and the client saw an inbound connection from that identity: a new connection,
            # since it never had one to it before.
            assert dialer in client.inbound.seen
        assert len({result.detail for result in ok}) == len(ok)
        assert state.checked_at is not None
        # What the servers reached is what a public node advertises (a port forward's address).
        own = str(client.host.get_addrs()[0]).split("/p2p/")[0]
        assert client.confirmed_addrs() == [own]


async def test_answers_add_up_across_checks_without_asking_a_server_twice() -> None:
    """Two servers are not enough for K=3; when a third connects, only it is asked (the other two
    would rate-limit a second request) and the three answers together make the node public."""
    settings = replace(LOOPBACK_SETTINGS, server_peer_interval_s=60)
    async with swarm(3, settings=settings) as (client, servers):
        late = servers[2].host
        with trio.fail_after(60):
            await client.host.disconnect(late.get_id())
            while late.get_id() in client.host.get_connected_peers():
                await trio.sleep(0.05)
            state = await client.check()
            assert state.verdict == "unknown", state.reason
            assert state.reason == "autonat: 2/2 dial-backs, 3 distinct servers needed"
            await connect_and_identify(client.host, [late])
            state = await client.check()
        assert state.verdict == "public", state.reason
        assert sorted(result.outcome for result in state.servers) == ["ok"] * 3


async def test_a_busy_server_is_asked_again_within_seconds_not_at_the_next_round() -> None:
    """Three servers for K=3, one busy with other nodes' dial-backs when the client asks: that round is
    inconclusive. The client's own loop asks the busy one again ~2 s later (not after
    ``retry_interval_s``, an hour here; 30 s by default: a home node with a UPnP mapping learned it
    was public 48 s after its start), and the refused request did not count against the per-peer
    interval (60 s here), so the server answers and the node is public."""
    settings = replace(LOOPBACK_SETTINGS, server_peer_interval_s=60, addr_poll_s=3600)
    async with trio.open_nursery() as nursery:
        servers: list[AutoNat] = []
        async with _servers(nursery, 3, settings, servers):
            busy = servers[2]
            for _ in range(busy.settings.server_max_concurrent):
                busy._dialing.acquire_nowait()  # every dial-back slot "running"
            client_settings = replace(settings, serve="never")
            async with autonat_node(nursery, client_settings, serves=False) as client:
                await connect_and_identify(client.host, [server.host for server in servers])
                with trio.fail_after(20):
                    while not any(r.outcome == "error" for r in client.state.servers):
                        await trio.sleep(0.05)
                assert client.state.verdict == "unknown", client.state.reason
                for _ in range(busy.settings.server_max_concurrent):
                    busy._dialing.release()
                released = trio.current_time()
                with trio.fail_after(15):
                    while client.state.verdict != "public":
                        await trio.sleep(0.05)
                assert trio.current_time() - released < 10, "asked again at the next round only"
                assert sorted(r.outcome for r in client.state.servers) == ["ok"] * 3
        nursery.cancel_scope.cancel()


async def test_a_mapping_made_just_after_a_private_verdict_makes_the_node_public_within_seconds() -> None:
    """UPnP maps the port a moment after AutoNAT said private: the re-check at once is refused by
    every server (each answered a moment ago), which decides nothing. The node asks again seconds
    later instead of keeping ``private`` with a working mapping until the next check (an hour here,
    300 s by default)."""
    port = closed_port()
    addrs = [f"/ip4/127.0.0.1/tcp/{port}"]
    # 1.5 s: the re-check at once is still refused, and the round after it (2 s later: the first
    # error retry) is answered; at 4 s, that round was refused too and the next came 4 s after it.
    settings = replace(LOOPBACK_SETTINGS, server_peer_interval_s=1.5)
    async with swarm(3, client_addrs=addrs, client_ports=[], settings=settings) as (client, _servers):
        with trio.fail_after(20):
            while client.state.verdict != "private":
                await trio.sleep(0.05)
        addrs[:] = [str(client.host.get_addrs()[0]).split("/p2p/")[0]]  # the new mapping: reachable
        client.recheck_soon()
        with trio.fail_after(20):
            while client.state.verdict != "public":
                await trio.sleep(0.05)


async def test_confirmed_addresses_outlive_a_change_of_what_is_asked() -> None:
    """A public node's candidate addresses change right after its verdict (a UPnP-mapped home node
    drops its relays): the servers that just answered refuse to be asked again so soon and the
    round decides nothing. The address they reached it on stays confirmed, so its record and
    identify keep naming it; before, only answers about the current candidates counted, the record
    of a mapped home node named its LAN address only, and a peer's first contact waited ~50 s."""
    settings = replace(LOOPBACK_SETTINGS, server_peer_interval_s=60)
    addrs: list[str] = []
    async with swarm(3, client_addrs=addrs, client_ports=[], settings=settings) as (client, _servers):
        own = str(client.host.get_addrs()[0]).split("/p2p/")[0]
        seen: list[list[str]] = []
        client.state.on_change(lambda: seen.append(client.confirmed_addrs()))
        addrs.append(own)
        with trio.fail_after(30):
            state = await client.check()
        assert state.verdict == "public", state.reason
        assert seen == [[own]]  # listeners of the verdict see the address it was reached on
        addrs.append(f"/ip4/127.0.0.1/tcp/{closed_port()}")  # the candidates change
        with trio.fail_after(30):
            state = await client.check()
        assert state.verdict == "public", state.reason
        assert client.confirmed_addrs() == [own]


async def test_unreachable_address_gets_private() -> None:
    """A node behind a NAT: its address and its listen port (at the IP the servers observe)
    lead nowhere, here a closed port."""
    port = closed_port()
    async with swarm(3, client_addrs=[f"/ip4/127.0.0.1/tcp/{port}"], client_ports=[port]) as (client, _servers):
        with trio.fail_after(60):
            state = await client.check()
        assert state.verdict == "private", state.reason
        assert [result.outcome for result in state.servers] == ["dial_error"] * 3
        assert state.reason == "autonat: 0/3 dial-backs"
        assert client.confirmed_addrs() == []  # nothing reached: nothing to advertise


async def test_server_dials_only_the_observed_ip_and_rate_limits() -> None:
    settings = replace(LOOPBACK_SETTINGS, server_peer_interval_s=60)
    async with swarm(1, settings=settings) as (client, servers):
        server_id = servers[0].host.get_id()
        own = str(client.host.get_addrs()[0]).split("/p2p/")[0]
        port = own.rsplit("/", 1)[1]
        with trio.fail_after(30):
            # A third party's IP: refused, nothing dialed.
            try:
                await request(
                    client.host,
                    server_id,
                    PROTOCOL_ID,
                    DialBackRequest(addrs=[f"/ip4/198.51.100.7/tcp/{port}"]),
                    REPLY,
                    max_frame=MAX_FRAME,
                )
                raise AssertionError("a third-party IP was accepted")
            except ClawnodeError as error:
                assert error.code == ErrorCode.FORBIDDEN
            # Its own observed IP: dialed back (a refused request did not count) ...
            reply = await request(client.host, server_id, PROTOCOL_ID, DialBackRequest(addrs=[own]), REPLY)
            assert [result.status for result in reply.results] == ["ok"]
            # ... and the same peer again within the interval: rate-limited.
            try:
                await request(client.host, server_id, PROTOCOL_ID, DialBackRequest(addrs=[own]), REPLY)
                raise AssertionError("the second request was not rate-limited")
            except ClawnodeError as error:
                assert error.code == ErrorCode.RATE_LIMITED
    # Too many dial-backs running at once: rate-limited too, until one ends.
    busy = replace(LOOPBACK_SETTINGS, server_peer_interval_s=0, server_max_concurrent=1)
    async with swarm(1, settings=busy) as (client, servers):
        own = str(client.host.get_addrs()[0]).split("/p2p/")[0]
        ask = DialBackRequest(addrs=[own])
        with trio.fail_after(30):
            servers[0]._dialing.acquire_nowait()  # one dial-back "running"
            try:
                await request(client.host, servers[0].host.get_id(), PROTOCOL_ID, ask, REPLY)
                raise AssertionError("a request beyond the concurrency limit was served")
            except ClawnodeError as error:
                assert error.code == ErrorCode.RATE_LIMITED
            servers[0]._dialing.release()
            reply = await request(client.host, servers[0].host.get_id(), PROTOCOL_ID, ask, REPLY)
            assert [result.status for result in reply.results] == ["ok"]
    # Validation alone (no network): too many addresses, another protocol, private in production,
    # another IP; mixed requests dial only what may be dialed; ports are dialed at the observed IP.
    strict = AutoNat(
        build_host(generate_new_ed25519_identity()),
        AutoNatSettings(server_max_addrs=2),
        build_dialer=build_dialer_host,
    )
    for addrs, observed, code in [
        (
            ["/ip4/81.2.69.5/tcp/1", "/ip4/81.2.69.5/tcp/2", "/ip4/81.2.69.5/tcp/3"],
            "81.2.69.5",
            ErrorCode.INVALID_ARGUMENT,
        ),
        (["/ip4/81.2.69.5/udp/1/quic-v1"], "81.2.69.5", ErrorCode.INVALID_ARGUMENT),
        (["/ip4/10.0.0.5/tcp/4021"], "10.0.0.5", ErrorCode.FORBIDDEN),
        (["/ip4/81.2.69.6/tcp/4021"], "81.2.69.5", ErrorCode.FORBIDDEN),
    ]:
        try:
            strict.validate(DialBackRequest(addrs=addrs), observed)
            raise AssertionError(f"{addrs} accepted")
        except ClawnodeError as error:
            assert error.code == code, (addrs, error.code)
    mixed = DialBackRequest(addrs=["/ip4/81.2.69.5/tcp/4021", "/ip4/81.2.69.6/tcp/4021/p2p/12D3KooWAbc"])
    assert strict.validate(mixed, "81.2.69.5") == (
        ["/ip4/81.2.69.5/tcp/4021"],
        {"/ip4/81.2.69.6/tcp/4021": "not the requester's observed IP"},
    )
    assert strict.validate(DialBackRequest(ports=[4021]), "203.0.113.9") == (["/ip4/203.0.113.9/tcp/4021"], {})


async def test_garbage_and_oversized_frames_cost_one_stream() -> None:
    async with swarm(1) as (client, servers):
        server = servers[0]
        server_id = server.host.get_id()
        payloads = [
            b"\xff" * 12,  # a length prefix that never ends
            encode_uvarint(MAX_FRAME + 1) + b"x" * 100,  # over the frame limit
            encode_uvarint(5) + b"nope!",  # not JSON
            encode_uvarint(2) + b"{}",  # JSON without a type
        ]
        with trio.fail_after(30):
            for payload in payloads:
                stream = await client.host.new_stream(server_id, [PROTOCOL_ID])
                await stream.write(payload)
                with trio.move_on_after(2):
                    await stream.read(4096)
                await stream.close()
            # Still serving, and the garbage did not use up this peer's request: the check works.
            assert server.serving
            state = await client.check()
        assert [result.outcome for result in state.servers] == ["ok"], state.servers


def test_verdict_rules_and_address_filter() -> None:
    def result(peer: str, ip: str, outcome: str) -> ServerResult:
        return ServerResult(peer, ip, outcome, "")  # type: ignore[arg-type]

    same_ip = [result(f"p{index}", "81.2.69.1", "ok") for index in range(3)]
    assert judge(same_ip, 3, "ip")[0] == "unknown"  # one IP is one server in production
    assert judge(same_ip, 3, "peer") == ("public", "autonat: 3/3 dial-backs")
    failed = [result(f"p{index}", f"81.2.69.{index}", "dial_error") for index in range(3)]
    assert judge(failed, 3, "ip")[0] == "private"
    assert judge([*failed[:2], result("p9", "81.2.69.9", "error")], 3, "ip")[0] == "unknown"
    # One host's peer ids whose connections closed before the ask (no IP read) are no distinct servers.
    sybils = [result(f"s{index}", "", "dial_error") for index in range(5)]
    assert judge([*failed[:2], *sybils], 3, "ip")[0] == "unknown"
    assert judge(sybils, 3, "peer")[0] == "private"  # loopback tests count peer ids
    assert candidate_addrs(
        [
            "/ip4/127.0.0.1/tcp/4021",
            "/ip4/192.168.1.4/tcp/4021",
            "/ip4/100.64.0.9/tcp/4021",
            "/ip4/81.2.69.7/tcp/4021/p2p/12D3KooWAbc",
            "/ip4/81.2.69.7/udp/4021/quic-v1",
        ],
        allow_private=False,
        limit=4,
    ) == ["/ip4/81.2.69.7/tcp/4021"]
    state = ReachabilityState()
    changes: list[str] = []
    state.on_change(lambda: changes.append(state.verdict))
    state.update("public", "autonat: 3/3 dial-backs", [], 1.0)
    state.update("public", "autonat: 4/4 dial-backs", [], 2.0)
    assert changes == ["public"]
    assert state.effective("unknown") == "public" and state.effective("private") == "private"


async def test_daemon_measures_its_reachability_and_reports_it(tmp_path: Path) -> None:
    """Two full nodes: a bootstrap node serves AutoNAT by its role, the other measures itself public,
    declares it in its capability record and reports it in its status."""

    def config(role: str, bootstrap: list[str]) -> Config:
        return Config(
            node=NodeSection(listen=["/ip4/127.0.0.1/tcp/0"], role=role),  # type: ignore[call-arg, arg-type]
            api=ApiSection(port=0),
            bootstrap=BootstrapSection(peers=bootstrap, use_defaults=False),
            escrow=EscrowSection(mode="off"),  # type: ignore[call-arg]
            nat=NatSection(autonat_min_servers=1, autonat_distinct_by="peer", autonat_allow_private=True),  # type: ignore[call-arg]
        )

    async with trio.open_nursery() as nursery:
        boot = Node(config("bootstrap", []), tmp_path / "boot")
        await nursery.start(boot.run)
        node = Node(config("node", [boot.listen_addrs()[0]]), tmp_path / "node")
        await nursery.start(node.run)
        assert boot.status().autonat_server and not node.status().autonat_server
        with trio.fail_after(30):
            while node.status().reachability != "public":
                await trio.sleep(0.1)
            status = node.status()
            assert status.reachability_reason == "autonat: 1/1 dial-backs"
            assert status.reachability_checked_at is not None
            # Public now, so it serves AutoNAT too, and republished its record as public.
            assert status.autonat_server
            while node.publisher.record is None or node.publisher.record.reachability != "public":
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


async def test_requesters_leave_nothing_behind_on_the_server() -> None:
    # Each requester's peer id got a dial lock that was never dropped: strangers asking from fresh
    # identities (one key and one handshake each) grew the server's memory for as long as it ran.
    settings = replace(LOOPBACK_SETTINGS, server_peer_interval_s=0)
    async with trio.open_nursery() as nursery, autonat_node(nursery, settings, serves=True) as server:
        target = PeerInfo(server.host.get_id(), server.host.get_addrs())
        with trio.fail_after(9):
            for _ in range(12):
                async with running(build_host(generate_new_ed25519_identity())) as stranger:
                    await stranger.connect(target)
                    ask = DialBackRequest(addrs=[f"/ip4/127.0.0.1/tcp/{closed_port()}"])
                    reply = await request(stranger, target.peer_id, PROTOCOL_ID, ask, REPLY)
                    assert [result.status for result in reply.results] == ["dial_error"]
        print(f"dial locks left: {len(server._dial_locks)}")
        assert len(server._dial_locks) == 0
        nursery.cancel_scope.cancel()
