"""Interop with js-libp2p, an independent libp2p implementation.

A js-libp2p peer (tests/interop/js/peer.mjs) runs as a subprocess driven by JSON
lines; the Python side is a real clawnode host (``node.host.build_host``) with
py-libp2p's Kademlia in server mode on ``/clawnode/kad/1.0.0``. Each check goes
both ways: TCP + Noise + Yamux, identify, ping, and the DHT's PUT_VALUE,
GET_VALUE, ADD_PROVIDER and GET_PROVIDERS RPCs; then a clawnode node as the daemon runs
its DHT (capability records under ``/clawnode/`` checked by clawnode's validator on one
side and by a js port of it in peer.mjs on the other, capabilities announced under
their raw CIDv1 multihash).

Needs Node.js and the pinned js packages: ``npm ci --prefix tests/interop/js``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.host.ping import PingService
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL_ID
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import read_length_prefixed_protobuf

from dht.offers import Offer, capability_cid, provider_key
from dht.protocol_id import (
    CLAWNODE_KAD_PROTOCOL_ID,
    IPFS_KAD_PROTOCOL_ID,
    current_kad_protocol_id,
    use_kad_protocol_id,
)
from dht.record_validator import record_key
from dht.records import Rejection, seal_record
from node.host import agent_version, build_host
from tests.support.records import bad_records, make_record
from tests.support.swarm import NodeSpec, SwarmNode, _run_node

JS_DIR = Path(__file__).parent / "interop" / "js"
NODE = shutil.which("node")
INSTALL_HINT = "install the js peer with: npm ci --prefix tests/interop/js"

pytestmark = [
    pytest.mark.skipif(NODE is None, reason=f"node (Node.js >= 20) not found on PATH; then {INSTALL_HINT}"),
    pytest.mark.skipif(
        not (JS_DIR / "node_modules").is_dir(),
        reason=f"tests/interop/js/node_modules missing; {INSTALL_HINT}",
    ),
]

NAMESPACE = "clawtest"
PING_PROTOCOL_ID = "/ipfs/ping/1.0.0"
# Every wait across processes is bounded by one of these.
START_TIMEOUT = 15.0
STEP_TIMEOUT = 10.0


class JsPeerError(Exception):
    """The js peer answered a request with an error, or went away."""


class JsPeer:
    """The js-libp2p subprocess: one JSON request line in, one reply line out."""

    def __init__(self, process: trio.Process) -> None:
        self._process = process
        self._buffer = bytearray()
        self._last_id = 0
        self.peer_id = ID(b"")
        self.addrs: list[str] = []

    async def read_message(self) -> dict[str, Any]:
        stdout = self._process.stdout
        assert stdout is not None
        while b"\n" not in self._buffer:
            chunk = await stdout.receive_some(65536)
            if not chunk:
                raise JsPeerError(f"js peer closed stdout (exit code {self._process.poll()})")
            self._buffer += chunk
        line, _, rest = self._buffer.partition(b"\n")
        self._buffer = bytearray(rest)
        message: dict[str, Any] = json.loads(line)
        return message

    async def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        stdin = self._process.stdin
        assert stdin is not None
        self._last_id += 1
        request_id = self._last_id
        line = json.dumps({"id": request_id, "cmd": cmd, **args}) + "\n"
        with trio.fail_after(STEP_TIMEOUT):
            await stdin.send_all(line.encode())
            reply = await self.read_message()
            while reply.get("id") != request_id:
                reply = await self.read_message()
        if not reply["ok"]:
            raise JsPeerError(f"{cmd} {args}: {reply['error']}")
        return reply


async def _stop_process(process: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5):
            await process.wait()


async def _start_peer(argv: list[str], *, cwd: Path, env: dict[str, str]) -> tuple[trio.Process, JsPeer]:
    """Start a peer process speaking peer.mjs's JSON lines and read its ``ready`` line."""
    process = await trio.lowlevel.open_process(
        argv,
        cwd=str(cwd),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        # stderr is inherited: pytest shows it when a test fails.
        env={**os.environ, **env},
    )
    try:
        js = JsPeer(process)
        with trio.fail_after(START_TIMEOUT):
            ready = await js.read_message()
        assert ready.get("event") == "ready", ready
        js.peer_id = ID.from_base58(ready["peer_id"])
        js.addrs = ready["addrs"]
        assert js.addrs, "the peer listens on nothing"
    except BaseException:
        await _stop_process(process)
        raise
    return process, js


async def _start_js_peer(prefix: tuple[str, ...] = (), **env: str) -> tuple[trio.Process, JsPeer]:
    assert NODE is not None
    return await _start_peer(
        [*prefix, NODE, str(JS_DIR / "peer.mjs")],
        cwd=JS_DIR,
        env={"CLAWNODE_KAD_PROTOCOL": str(CLAWNODE_KAD_PROTOCOL_ID), **env},
    )


class AcceptTestRecords(Validator):
    """The test namespace's records are opaque text: any value, first one wins."""

    def validate(self, key: str, value: bytes) -> None:
        if not key.startswith(f"/{NAMESPACE}/"):
            raise ValueError(f"not a {NAMESPACE} key: {key!r}")

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


@dataclass
class Nodes:
    host: IHost
    dht: KadDHT
    js: JsPeer

    @property
    def py_id(self) -> ID:
        return self.host.get_id()

    def py_addr(self) -> str:
        return str(self.host.get_addrs()[0])


@pytest.fixture
async def nodes() -> AsyncIterator[Nodes]:
    """A js peer and a py host with its DHT running, not connected yet."""
    use_kad_protocol_id()
    assert current_kad_protocol_id() == CLAWNODE_KAD_PROTOCOL_ID
    process, js = await _start_js_peer()
    try:
        host = build_host(generate_new_ed25519_identity())
        validator = NamespacedValidator({NAMESPACE: AcceptTestRecords()})
        dht = KadDHT(host, DHTMode.SERVER, validator=validator, strict_validation=True)
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            async with background_trio_service(dht):
                yield Nodes(host, dht, js)
                with trio.move_on_after(2) as cleanup, contextlib.suppress(JsPeerError):
                    cleanup.shield = True
                    await js.request("exit")  # let js close its connections first
    finally:
        await _stop_process(process)


async def _wait_until_in_routing_tables(nodes: Nodes) -> None:
    """Both DHTs list each other, so that queries have a peer to ask.

    py-libp2p 0.8.1 adds a peer to its table only when that peer opens a KAD
    stream to it (kad_dht.py ``_do_handle_stream``) or turns up in a lookup,
    never on connect: py learns js from js's FIND_NODE self-query, which js runs
    1 s after start and which waits up to 5 s for a first routing-table peer.
    """
    with trio.fail_after(STEP_TIMEOUT):
        while True:
            js_table = (await nodes.js.request("routing_table"))["peers"]
            if nodes.dht.routing_table.peer_in_table(nodes.js.peer_id) and str(nodes.py_id) in js_table:
                return
            await trio.sleep(0.05)


@pytest.fixture
async def connected(nodes: Nodes) -> Nodes:
    """The py host dialled the js peer and each DHT has the other in its table."""
    with trio.fail_after(STEP_TIMEOUT):
        await nodes.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(nodes.js.addrs[0])))
    await _wait_until_in_routing_tables(nodes)
    return nodes


async def _py_identify(host: IHost, peer_id: ID) -> Identify:
    """Run the identify protocol from the py side and return the js peer's answer."""
    with trio.fail_after(STEP_TIMEOUT):
        stream = await host.new_stream(peer_id, [IDENTIFY_PROTOCOL_ID])
        try:
            data = await read_length_prefixed_protobuf(stream, use_varint_format=True)
        finally:
            await stream.close()
    message = Identify()
    message.ParseFromString(data)
    return message


def _unique(label: str) -> str:
    return f"{label}-{secrets.token_hex(6)}"


def _raw_cid(data: bytes) -> tuple[str, bytes]:
    """A CIDv1 (raw codec, sha2-256) in base32 and its multihash: the DHT key."""
    multihash = bytes([0x12, 0x20]) + hashlib.sha256(data).digest()
    cid = bytes([0x01, 0x55]) + multihash
    return "b" + base64.b32encode(cid).decode().lower().rstrip("="), multihash


async def _identify_both_ways(connected: Nodes) -> None:
    js_seen_by_py = await _py_identify(connected.host, connected.js.peer_id)
    public_key = deserialize_public_key(js_seen_by_py.public_key)
    assert ID.from_pubkey(public_key) == connected.js.peer_id
    assert CLAWNODE_KAD_PROTOCOL_ID in js_seen_by_py.protocols
    assert IPFS_KAD_PROTOCOL_ID not in js_seen_by_py.protocols
    assert PING_PROTOCOL_ID in js_seen_by_py.protocols
    assert js_seen_by_py.agent_version.startswith("js-libp2p/")

    py_seen_by_js = await connected.js.request("identify", peer_id=str(connected.py_id))
    assert CLAWNODE_KAD_PROTOCOL_ID in py_seen_by_js["protocols"]
    assert IPFS_KAD_PROTOCOL_ID not in py_seen_by_js["protocols"]
    assert {str(IDENTIFY_PROTOCOL_ID), PING_PROTOCOL_ID} <= set(py_seen_by_js["protocols"])
    assert py_seen_by_js["agent_version"] == agent_version()
    assert py_seen_by_js["agent_version"].startswith("clawnode/")
    py_addrs = {str(addr).split("/p2p/")[0] for addr in connected.host.get_addrs()}
    assert py_addrs & set(py_seen_by_js["listen_addrs"])


@pytest.mark.trio
async def test_js_dials_py_and_both_ping(nodes: Nodes) -> None:
    dialled = await nodes.js.request("dial", addr=nodes.py_addr())
    assert dialled["peer_id"] == str(nodes.py_id)

    rtt_js_to_py = (await nodes.js.request("ping", peer_id=str(nodes.py_id)))["rtt_ms"]
    assert 0 <= rtt_js_to_py < STEP_TIMEOUT * 1000

    with trio.fail_after(STEP_TIMEOUT):
        rtts = await PingService(nodes.host).ping(nodes.js.peer_id, ping_amt=3)
    assert len(rtts) == 3
    assert all(0 <= rtt < STEP_TIMEOUT * 1000 for rtt in rtts)

    # A connection the js side opened still carries the DHT both ways.
    await _wait_until_in_routing_tables(nodes)


async def _py_puts_js_gets(connected: Nodes) -> None:
    key, value = f"/{NAMESPACE}/{_unique('py-put')}", _unique("from-python")
    with trio.fail_after(STEP_TIMEOUT):
        await connected.dht.put_value(key, value.encode())

    got = await connected.js.request("get", key=key)
    # py's PUT_VALUE stored the record at js (get() yields js's own copy; which equal copy it yields
    # last varies) ...
    assert got["best"]["value"] == value
    assert {"from": str(connected.js.peer_id), "value": value} in got["values"]
    # ... and js's GET_VALUE to py returned it too.
    assert got["responses"] == [{"from": str(connected.py_id), "value": value}]


async def _js_puts_py_gets(connected: Nodes) -> None:
    key, value = f"/{NAMESPACE}/{_unique('js-put')}", _unique("from-js")
    put = await connected.js.request("put", key=key, value=value)
    # py answered js's PUT_VALUE by echoing the record ...
    assert put["stored_at"] == [str(connected.py_id)]
    # ... and holds it.
    stored = connected.dht.value_store.get(key.encode())
    assert stored is not None and stored.value == value.encode()

    # Forget it locally, so that get_value must ask js with GET_VALUE.
    assert connected.dht.value_store.remove(key.encode())
    with trio.fail_after(STEP_TIMEOUT):
        assert await connected.dht.get_value(key) == value.encode()


async def _py_provides_js_finds(connected: Nodes) -> None:
    cid, _ = _raw_cid(_unique("py-content").encode())
    with trio.fail_after(STEP_TIMEOUT):
        assert await connected.dht.provide(cid)

    py_id, js_id = str(connected.py_id), str(connected.js.peer_id)
    # provide() does not wait for the ADD_PROVIDER to be processed: poll js.
    with trio.fail_after(STEP_TIMEOUT):
        while True:
            found = (await connected.js.request("find_providers", cid=cid))["providers"]
            # js's own provider store has py (ADD_PROVIDER py -> js) ...
            if any(p["from"] == js_id and p["peer_id"] == py_id for p in found):
                break
            await trio.sleep(0.1)
    # ... and py's answer to js's GET_PROVIDERS names py, with a dialable address.
    from_py = [p for p in found if p["from"] == py_id and p["peer_id"] == py_id]
    assert from_py, found
    assert any(addr.startswith("/ip4/127.0.0.1/tcp/") for addr in from_py[0]["addrs"])
    assert {p["peer_id"] for p in found} == {py_id}


async def _js_provides_py_finds(connected: Nodes) -> None:
    cid, key = _raw_cid(_unique("js-content").encode())
    provided = await connected.js.request("provide", cid=cid)
    assert provided["sent_to"] == [str(connected.py_id)]

    # ADD_PROVIDER js -> py landed in py's provider store.
    with trio.fail_after(STEP_TIMEOUT):
        while not connected.dht.provider_store.get_providers(key):
            await trio.sleep(0.05)
    assert [p.peer_id for p in connected.dht.provider_store.get_providers(key)] == [connected.js.peer_id]

    # Forget it locally, so that find_providers must ask js with GET_PROVIDERS.
    del connected.dht.provider_store.providers[key]
    with trio.fail_after(STEP_TIMEOUT):
        providers = await connected.dht.find_providers(cid)
    assert [p.peer_id for p in providers] == [connected.js.peer_id]
    js_tcp = {addr.split("/p2p/")[0] for addr in connected.js.addrs}
    assert js_tcp & {str(addr) for addr in providers[0].addrs}


@pytest.mark.trio
async def test_identify_records_and_providers_go_both_ways(connected: Nodes) -> None:
    """One connected js/py pair for five facts, each of which used to start a js peer of its own and
    wait for both routing tables (most of each test's time): identify both ways, a record put by
    either side is got by the other, content provided by either side is found by the other. Every
    key is unique, so no step sees another's record or provider."""
    await _identify_both_ways(connected)
    await _py_puts_js_gets(connected)
    await _js_puts_py_gets(connected)
    await _py_provides_js_finds(connected)
    await _js_provides_py_finds(connected)


@pytest.mark.trio
async def test_js_reaches_a_private_py_node_through_a_relay_and_py_punches_to_direct() -> None:
    """DCUtR as the spec orders it: js (A) dials a private clawnode node (B) through a clawnode
    relay; B, which received the relayed connection, starts the exchange (CONNECT, SYNC) and the
    connection becomes direct. Before, only the clawnode side that dialed through a relay punched,
    and js only answers as A: 0 attempts. (js dials public addresses only; on loopback the test
    peer lets it dial ours, see peer.mjs.)"""
    from nat.holepunch import HolePunchService, HolePunchSettings
    from nat.relay import RelayService, RelaySettings

    loopback = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    process, js = await _start_js_peer()
    try:
        relay_host = build_host(generate_new_ed25519_identity())
        private = build_host(generate_new_ed25519_identity())
        async with relay_host.run(loopback), private.run(loopback), trio.open_nursery() as nursery:
            await nursery.start(RelayService(relay_host, RelaySettings(), serve_hop=True).run)
            relay_addr = str(relay_host.get_addrs()[0])
            settings = RelaySettings(static_relays=(relay_addr,), min_relays=1)
            relay = RelayService(private, settings, serve_hop=False, wants_reservations=lambda: True)
            await nursery.start(relay.run)
            punch = await nursery.start(HolePunchService(private, HolePunchSettings()).run)
            with trio.fail_after(STEP_TIMEOUT):
                while not relay.relayed_addrs():
                    await trio.sleep(0.05)
            circuit = f"{relay.relayed_addrs()[0]}/p2p/{private.get_id()}"
            assert (await js.request("dial", addr=circuit))["peer_id"] == str(private.get_id())

            with trio.fail_after(STEP_TIMEOUT * 2):
                while punch.counts["direct"] < 1:
                    await trio.sleep(0.05)
            assert punch.initiated >= 1  # B started it, as the spec says
            assert punch.path_to(js.peer_id) == "direct"
            seen = (await js.request("connections", peer_id=str(private.get_id())))["connections"]
            direct = [c for c in seen if "/p2p-circuit" not in c["remote_addr"] and not c["limited"]]
            assert direct, seen  # js holds a direct, unlimited connection to the private node
            # and it carries traffic: a ping from js goes over it
            assert (await js.request("ping", peer_id=str(private.get_id())))["rtt_ms"] >= 0
            with trio.move_on_after(2) as cleanup, contextlib.suppress(JsPeerError):
                cleanup.shield = True
                await js.request("exit")
            nursery.cancel_scope.cancel()
    finally:
        await _stop_process(process)


# --- a clawnode node as the daemon runs it: records and capabilities --------------------------

OFFER = Offer(name="model:interop-js-q4", price_per_unit=10**9, context_length=4096, family="gemma3")
# The rejections js's validator (peer.mjs clawnodeRecordProblem) makes too; the others need
# clawnode's whole schema, its canonical encoding or what it has already seen.
JS_CHECKS = {
    Rejection.BAD_SIGNATURE,
    Rejection.WRONG_SIGNER,
    Rejection.EXPIRED,
    Rejection.OVERSIZED,
    Rejection.WALLET_BINDING,
}


@dataclass
class Clawnode:
    node: SwarmNode
    js: JsPeer


@pytest.fixture
async def clawnode(tmp_path: Path) -> AsyncIterator[Clawnode]:
    """One js peer and one clawnode node (DHT service, capability publisher and discovery as the
    daemon wires them, selling OFFER) that bootstrapped from js and published its record."""
    use_kad_protocol_id()
    process, js = await _start_js_peer()
    try:
        async with trio.open_nursery() as nursery:
            spec = NodeSpec(offers=(OFFER,))
            run_node = partial(_run_node, spec, js.addrs[:1], tmp_path / "peers.json", 3600.0, 600, 0.0, None)
            node: SwarmNode = await nursery.start(run_node)
            with trio.fail_after(STEP_TIMEOUT):
                await node.dht.joined.wait()
                while node.publisher.published_at is None:
                    await trio.sleep(0.05)
            yield Clawnode(node, js)
            with trio.move_on_after(2) as cleanup, contextlib.suppress(JsPeerError):
                cleanup.shield = True
                await js.request("exit")
            nursery.cancel_scope.cancel()
    finally:
        await _stop_process(process)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _js_gets_a_clawnode_record_and_finds_a_capabilitys_provider(clawnode: Clawnode) -> None:
    node, js = clawnode.node, clawnode.js
    key = record_key(node.peer_id)

    # The publisher's PUT_VALUE passed js's validator (js stores only what its validator takes), and
    # js's get takes both its own copy and py's GET_VALUE answer. The node may reseal its record soon
    # after its first publish (its addresses or reachability settle as the join ends): js gets the
    # record the node holds now once that publish lands.
    with trio.fail_after(STEP_TIMEOUT):
        while True:
            sealed = node.publisher.sealed
            assert sealed is not None
            got = await js.request("get", key=key, encoding="base64")
            if got["best"]["value"] == _b64(sealed) and sealed == node.publisher.sealed:
                break
            await trio.sleep(0.2)
    # Which equal copy get() yields last (its own or py's) varies from run to run.
    assert got["best"]["value"] == _b64(sealed)
    assert {"from": str(js.peer_id), "value": _b64(sealed)} in got["values"]
    assert got["responses"] == [{"from": node.peer_id, "value": _b64(sealed)}]
    assert got["refused"] == []

    # findProviders for the capability's CID (bafkrei...) names the node, from js's own provider
    # store (the publisher's ADD_PROVIDER) and from py's GET_PROVIDERS answer, with its address.
    cid = capability_cid(OFFER.name)
    assert cid.startswith("bafkrei")
    found = (await js.request("find_providers", cid=cid))["providers"]
    assert {(p["from"], p["peer_id"]) for p in found} == {(str(js.peer_id), node.peer_id), (node.peer_id, node.peer_id)}
    assert all(any(addr.startswith("/ip4/127.0.0.1/tcp/") for addr in p["addrs"]) for p in found)


async def _py_discovery_finds_a_js_provider_of_a_capability(clawnode: Clawnode) -> None:
    node, js = clawnode.node, clawnode.js
    name = f"model:js-sells-{secrets.token_hex(4)}"
    assert (await js.request("provide", cid=capability_cid(name)))["sent_to"] == [node.peer_id]
    key = provider_key(name)
    kad = node.dht.dht
    with trio.fail_after(STEP_TIMEOUT):
        while not kad.provider_store.get_providers(key):
            await trio.sleep(0.05)
    # Forget it locally: discovery must ask js with GET_PROVIDERS under the multihash key.
    del kad.provider_store.providers[key]
    with trio.fail_after(STEP_TIMEOUT):
        assert await node.discovery.providers_of(name) == [js.peer_id]


async def _js_puts_a_clawnode_record_and_both_refuse_a_tampered_one(clawnode: Clawnode) -> None:
    node, js = clawnode.node, clawnode.js
    seller = generate_new_ed25519_identity()
    seller_id = str(ID.from_pubkey(seller.public_key))
    key = record_key(seller_id)
    good = seal_record(make_record(seller, seq=10), seller.private_key)
    assert (await js.request("validate", key=key, value=_b64(good), encoding="base64"))["problem"] is None

    # js dht.put() of a record py's validator takes: py stores it, js's get takes it back from py.
    put = await js.request("put", key=key, value=_b64(good), encoding="base64")
    assert put["stored_at"] == [node.peer_id]
    assert node.dht.held_value(key) == good
    got = await js.request("get", key=key, encoding="base64")
    assert got["responses"] == [{"from": node.peer_id, "value": _b64(good)}] and got["refused"] == []

    # Each bad record, under the key it claims (a good record under another peer's key as well):
    # js's validator names the reason where js can check it, and py refuses js's PUT_VALUE of every
    # one: not stored, counted under its reason.
    other_key = record_key(str(ID.from_pubkey(generate_new_ed25519_identity().public_key)))
    cases = [(reason, key, value) for reason, value in bad_records(seller).items() if reason != "stale_sequence"]
    cases.append((Rejection.WRONG_SIGNER.value, other_key, good))
    for reason, where, value in cases:
        problem = (await js.request("validate", key=where, value=_b64(value), encoding="base64"))["problem"]
        if Rejection(reason) in JS_CHECKS:
            assert problem is not None and problem.startswith(reason), (reason, problem)
        else:
            assert problem is None, (reason, problem)  # only clawnode's checks catch it
        before = node.rejections.snapshot().get(reason, 0)
        put = await js.request("put", key=where, value=_b64(value), encoding="base64")
        assert put["stored_at"] == [], reason
        assert node.dht.held_value(where) in (None, good), reason
        assert node.rejections.snapshot().get(reason, 0) > before, reason

    # A tampered copy served by py (written straight into its store, as a hostile node would
    # answer): js's get refuses py's answer and settles on nothing.
    fresh = generate_new_ed25519_identity()
    fresh_key = record_key(str(ID.from_pubkey(fresh.public_key)))
    forged = bytearray(seal_record(make_record(fresh), fresh.private_key))
    forged[-1] ^= 0x01  # inside the signature
    node.dht.dht.value_store.put(fresh_key.encode(), bytes(forged))
    got = await js.request("get", key=fresh_key, encoding="base64")
    assert got["refused"] == [node.peer_id]
    assert got["responses"] == [] and got["best"] is None


@pytest.mark.trio
async def test_clawnode_records_and_capability_providers_interoperate_with_js(clawnode: Clawnode) -> None:
    """One js peer and one clawnode node for three facts (each used to start both): js gets the
    node's record and finds it as a capability's provider; py discovery finds a js provider; js puts
    a record py takes, and both refuse tampered ones. The second and third use keys of their own."""
    await _js_gets_a_clawnode_record_and_finds_a_capabilitys_provider(clawnode)
    await _py_discovery_finds_a_js_provider_of_a_capability(clawnode)
    await _js_puts_a_clawnode_record_and_both_refuse_a_tampered_one(clawnode)


# --- AutoNAT v2 both ways --------------------------------------------------------------------

needs_netns = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and ip (a network namespace)",
)
# js-libp2p's AutoNAT v2 neither asks about nor dials a private address (loopback, RFC 1918, the
# documentation ranges): both peers run in a namespace of their own whose only interface, its
# loopback, holds public-looking addresses. Nothing leaves it: it has no other interface.
JS_IP, PY_IP, PY_IP2 = "11.0.0.2", "11.0.0.1", "11.0.0.3"
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _public_namespace() -> Iterator[str]:
    from nat.harness.netns import ip, netns_add

    ns = f"cn-av2-{secrets.token_hex(3)}"
    try:
        netns_add(ns)
        for address in (JS_IP, PY_IP, PY_IP2):
            ip("addr", "add", f"{address}/32", "dev", "lo", ns=ns)
        yield ns
    finally:
        ip("netns", "delete", ns, check=False)


@needs_netns
@pytest.mark.trio
async def test_autonat_v2_js_client_py_server_and_py_client_js_server() -> None:
    """js-libp2p's AutoNAT v2 client verifies its address with a clawnode server, and a clawnode client
    learns from js-libp2p's server that its addresses are reachable; both servers ask for dial data
    before dialing an IP other than the one the request came from (js dialed py, so py's requests
    reach js from PY_IP: PY_IP2 costs dial data; js's come from JS_IP... its listen address, which
    py sees as the connection's remote, costs nothing)."""
    with _public_namespace() as ns:
        netns = ("ip", "netns", "exec", ns)
        started: dict[str, tuple[trio.Process, JsPeer]] = {}

        async def start_js() -> None:
            started["js"] = await _start_js_peer(
                netns, CLAWNODE_JS_LISTEN=f"/ip4/{JS_IP}/tcp/0", CLAWNODE_JS_AUTONAT_V2="1"
            )

        async def start_py() -> None:
            argv = [*netns, sys.executable, "-m", "tests.support.autonat_v2_peer"]
            argv += [f"/ip4/{PY_IP}/tcp/0", f"/ip4/{PY_IP2}/tcp/0"]
            started["py"] = await _start_peer(argv, cwd=REPO, env={"PYTHONPATH": str(REPO)})

        try:
            async with trio.open_nursery() as nursery:  # both start at once: the Python one takes seconds
                nursery.start_soon(start_js)
                nursery.start_soon(start_py)
            js, py = started["js"][1], started["py"][1]
            js_addr = js.addrs[0].split("/p2p/")[0]
            assert js_addr.startswith(f"/ip4/{JS_IP}/tcp/")
            unverified = (await js.request("addresses"))["addresses"]
            assert {"addr": js_addr, "verified": False, "type": "transport"} in unverified

            py_addrs = {
                ip_: next(a.split("/p2p/")[0] for a in py.addrs if f"/ip4/{ip_}/" in a) for ip_ in (PY_IP, PY_IP2)
            }
            # js dials py; identify tells js that py serves AutoNAT v2, and js's client asks it
            assert (await js.request("dial", addr=py.addrs[0]))["peer_id"] == str(py.peer_id)
            with trio.fail_after(STEP_TIMEOUT):
                while True:
                    seen = (await js.request("addresses"))["addresses"]
                    if {"addr": js_addr, "verified": True, "type": "transport"} in seen:
                        break
                    await trio.sleep(0.1)
            counts = await py.request("counts")
            assert counts["served"].get("ok", 0) >= 1 and counts["dials"] >= 1, counts

            # py's client, js's server: the address at the IP js sees py at, then another one
            assert (await py.request("connect", addr=js.addrs[0]))["peer_id"] == str(js.peer_id)
            paid = []
            for address in (PY_IP, PY_IP2):
                answer = await py.request("ask", peer_id=str(js.peer_id), addrs=[py_addrs[address]])
                assert (answer["outcome"], answer["addr"]) == ("reachable", py_addrs[address])
                paid.append(answer["dial_data"])
            # js sees py's requests come from one IP at most (py-libp2p dials from one of its listen
            # addresses, or the kernel picks one): for the other address js asked for dial data first.
            assert any(30_000 <= amount <= 100_000 + 4096 for amount in paid), paid
            assert all(amount == 0 or 30_000 <= amount <= 100_000 + 4096 for amount in paid), paid
            for peer in (js, py):
                with trio.move_on_after(2) as cleanup, contextlib.suppress(JsPeerError):
                    cleanup.shield = True
                    await peer.request("exit")
        finally:
            for process, _ in started.values():
                await _stop_process(process)
