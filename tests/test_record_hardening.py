"""Issue 14: nothing a stranger sends can crash a node, freeze it, or get service without paying.

Each test is named after the defect it shows fixed: a bad offer killing the daemon for good, a
record whose schema freezes the validating node, a record whose ``$ref`` breaks discovery of a
capability everywhere, a price no quote can carry, an older record served after a newer one was
seen. Then random records and schemas: no exception ever escapes, every rejection has a reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libp2p import generate_new_ed25519_identity
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.records.record import make_signed_put_record
from pydantic import ValidationError

from bench.fuzz_records import MemoryStream, random_schema, run_record_fuzz
from dht.capability import capability_handler, parse_record_reply
from dht.discovery import DiscoveryQuery
from dht.offers import Offer
from dht.record_validator import CapabilityRecordValidator, RejectionCounter, record_key
from dht.records import (
    MAX_PRICE_PER_UNIT,
    MAX_QUOTE_UNITS,
    CapabilityDescriptor,
    RecordRejected,
    Rejection,
    seal_record,
    verify_record,
)
from dht.schema_safety import schema_problem
from dht.seq_book import SeqBook
from node.datadir import read_api_token, read_running
from protocols.lease_wire import Quote
from runtime.errors import ClawnodeError, ErrorCode
from runtime.ledger.receipts import MAX_AMOUNT
from tests.support.processes import LOOPBACK_ANY_PORT, DaemonProcess
from tests.support.records import GEMMA, make_record, sealed_unchecked
from tests.support.swarm import NodeSpec, SwarmNode, open_swarm

KEY_PAIR = generate_new_ed25519_identity()
CATASTROPHIC = "^(a+)+$"
EVIL_INPUT = "a" * 28 + "!"  # ~10 s for Python's backtracking engine; microseconds for RE2

if TYPE_CHECKING:
    from trio_typing import TaskStatus


async def put_value_at(sender: SwarmNode, receiver: SwarmNode, key: str, value: bytes) -> bool:
    """A PUT_VALUE of exactly ``value`` from ``sender`` to ``receiver`` (as any peer can send one)."""
    record = make_signed_put_record(key.encode(), value, sender.key_pair.private_key)
    store = sender.dht.dht.value_store
    return bool(await store._store_at_peer(receiver.host.get_id(), key.encode(), value, record=record))


def poisoned_descriptor(params_schema: dict[str, Any], example: dict[str, Any]) -> CapabilityDescriptor:
    """GEMMA's descriptor with a hostile schema and example, built the way a hostile peer would: unchecked."""
    fields = dict(GEMMA.descriptor())
    fields.update(params_schema=params_schema, examples=[example])
    return CapabilityDescriptor.model_construct(**fields)


def poisoned_record(key_pair: KeyPair, params_schema: dict[str, Any], example: dict[str, Any], seq: int) -> bytes:
    # model_copy: nothing is checked or evaluated on the way (a record's constructor would re-run the
    # descriptor's example check, which is exactly what must not happen before the node under test).
    record = make_record(key_pair, seq=seq).model_copy(
        update={"capabilities": [poisoned_descriptor(params_schema, example)]}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic notices the unchecked fields when dumping them
        return sealed_unchecked(record, key_pair)


# -- 1. a bad offer is refused, and one stored earlier is skipped: the node lives -----------------

LEAKY_OFFER = {"name": "model:leaky", "price_per_unit": 1, "summary": "see http://10.1.2.3:8080/v1 for weights"}
# Each schema is under the per-schema bound; together with the rest the record is over 8 KiB.
BIG_SCHEMA = {
    "type": "object",
    "properties": {f"field{i}": {"type": "string", "description": "d" * 150} for i in range(19)},
}
OVERSIZED_OFFER = {"name": "model:huge", "price_per_unit": 1, "params_schema": BIG_SCHEMA, "returns": BIG_SCHEMA}
OVERPRICED_OFFER = {"name": "model:dear", "price_per_unit": MAX_PRICE_PER_UNIT * 10}


def _request(daemon: DaemonProcess, method: str, path: str, body: Any = None) -> httpx.Response:
    running = read_running(daemon.data_dir)
    assert running is not None
    headers = {"authorization": f"Bearer {read_api_token(daemon.data_dir)}"}
    return httpx.request(method, f"{running.api_url}{path}", json=body, headers=headers, timeout=10)


def test_unsealable_offer_is_refused_and_never_kills_the_node(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    env = {"CLAWNODE_ESCROW_MODE": "off", "CLAWNODE_ALERTS_INTERVAL_S": "0.2"}
    daemon = DaemonProcess(tmp_path / "node", LOOPBACK_ANY_PORT, env=env).start()
    daemons.append(daemon)
    refused = {
        "model:leaky": (LEAKY_OFFER, "private_data"),
        "model:huge": (OVERSIZED_OFFER, "oversized"),
        "model:dear": (OVERPRICED_OFFER, "price_per_unit"),
    }
    for name, (offer, reason) in refused.items():
        reply = _request(daemon, "PUT", f"/api/offers/{name}", offer)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["code"] == "E_INVALID_ARGUMENT" and reason in error["message"], error
        assert "10.1.2.3" not in reply.text
    time.sleep(1.0)  # the publisher used to die a moment after the PUT
    assert daemon.process is not None and daemon.process.poll() is None, daemon.log()[-2000:]
    assert _request(daemon, "GET", "/api/status").status_code == 200
    stored = daemon.data_dir / "offers.json"
    assert not stored.exists() or not set(refused) & set(json.loads(stored.read_text())["overrides"])
    assert daemon.stop()[0] == 0

    # Offers stored by an earlier version (or written by hand) that cannot be published now.
    planted = {"model:leaky": LEAKY_OFFER, "model:huge": OVERSIZED_OFFER, "model:dear": OVERPRICED_OFFER}
    stored.write_text(json.dumps({"version": 1, "overrides": planted}))
    restarted = DaemonProcess(tmp_path / "node", LOOPBACK_ANY_PORT, env=env).start()
    daemons.append(restarted)
    assert _request(restarted, "GET", "/api/capabilities").json()["offers"] == []
    deadline = time.monotonic() + 15
    alerts: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not any(a["name"] == "OfferSkipped" for a in alerts):
        alerts = _request(restarted, "GET", "/api/alerts").json()["alerts"]
        time.sleep(0.2)
    assert any(a["name"] == "OfferSkipped" for a in alerts), alerts
    assert "clawnode_offers_skipped 3.0" in _request(restarted, "GET", "/metrics").text
    log = restarted.log()
    assert "offer model:leaky is not published: private_data" in log
    assert "offer model:huge is not published: oversized" in log
    assert "stored offer model:dear is skipped" in log
    assert "10.1.2.3" not in log and str(tmp_path) not in log
    # The owner can remove what was skipped; what is left stays in offers.json, untouched.
    assert _request(restarted, "DELETE", "/api/offers/model:huge").status_code == 200
    kept = json.loads(stored.read_text())["overrides"]
    assert kept["model:huge"] is None and kept["model:dear"] == OVERPRICED_OFFER
    assert restarted.process is not None and restarted.process.poll() is None


# -- 2. a catastrophic pattern cannot freeze the event loop ---------------------------------------


class LoopWatch:
    """The longest the trio loop went without running a 10 ms ticker."""

    def __init__(self) -> None:
        self.longest_gap_s = 0.0

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        last = time.monotonic()
        task_status.started()
        while True:
            await trio.sleep(0.01)
            now = time.monotonic()
            self.longest_gap_s = max(self.longest_gap_s, now - last)
            last = now


async def test_catastrophic_pattern_does_not_freeze_the_node() -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string", "pattern": CATASTROPHIC}}}
    async with open_swarm(3, specs={2: NodeSpec(offers=(GEMMA,))}) as nodes:
        victim, rogue = nodes[1], nodes[2]
        assert rogue.publisher.record is not None
        poison = poisoned_record(rogue.key_pair, schema, {"q": EVIL_INPUT}, seq=rogue.publisher.record.seq + 1)
        rogue.publisher.sealed = poison  # what it serves when asked directly
        watch = LoopWatch()
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            with trio.fail_after(30):
                # A PUT_VALUE is validated on the receiver's trio thread, inside py-libp2p.
                assert not await put_value_at(rogue, victim, record_key(rogue.peer_id), poison)
                # describe fetches the record live and verifies it.
                await victim.discovery.describe(rogue.host.get_id())
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert victim.rejections.snapshot().get("schema_invalid", 0) >= 2, victim.rejections.snapshot()
        assert watch.longest_gap_s < 0.5, f"the event loop stalled {watch.longest_gap_s:.2f} s"


def test_schemas_re2_cannot_run_or_too_costly_are_refused() -> None:
    defs: dict[str, Any] = {"a0": {"type": "string"}}
    for i in range(1, 40):  # each level doubles the work: 2**39 evaluations once expanded
        defs[f"a{i}"] = {"allOf": [{"$ref": f"#/$defs/a{i - 1}"}, {"$ref": f"#/$defs/a{i - 1}"}]}
    cases: dict[str, dict[str, Any]] = {
        "unsafe_pattern": {"type": "string", "pattern": "(a)\\1"},
        "too_complex": {"$defs": defs, "$ref": "#/$defs/a39"},
        "ref_cycle": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        "too_large": {"description": "x" * 5000},
        "forbidden_keyword": {"$id": "urn:x", "type": "object"},
    }
    schema: dict[str, Any]
    for kind, schema in cases.items():
        problem = schema_problem(schema)
        assert problem is not None and problem.kind == kind, (kind, problem)
    started = time.monotonic()
    record = poisoned_record(KEY_PAIR, cases["too_complex"], {"q": 1}, seq=1)
    with pytest.raises(RecordRejected) as rejected:
        verify_record(record, now=time.time())
    assert rejected.value.reason is Rejection.UNSAFE_SCHEMA
    assert time.monotonic() - started < 1.0
    # Within every static bound, but costly against its own example (2**7 checks per item, 3000
    # items): the evaluation budget (50 ms of CPU) refuses it, once; the verdict is then remembered.
    costly_defs: dict[str, Any] = {"a0": {"type": "integer"}}
    for i in range(1, 8):
        costly_defs[f"a{i}"] = {"allOf": [{"$ref": f"#/$defs/a{i - 1}"}, {"$ref": f"#/$defs/a{i - 1}"}]}
    costly = {"type": "object", "properties": {"q": {"type": "array", "items": {"$ref": "#/$defs/a7"}}}}
    costly["$defs"] = costly_defs
    assert schema_problem(costly) is None
    record = poisoned_record(KEY_PAIR, costly, {"q": [1] * 3000}, seq=2)
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(RecordRejected) as rejected:
            verify_record(record, now=time.time())
        assert rejected.value.reason is Rejection.UNSAFE_SCHEMA and "too long" in str(rejected.value)
        assert time.monotonic() - started < 1.0


CYCLE_CHECK = """
import warnings
from libp2p import generate_new_ed25519_identity
from libp2p.peer.id import ID
from dht.record_validator import CapabilityRecordValidator, RejectionCounter, record_key
from dht.records import CapabilityDescriptor, RecordRejected
from tests.support.records import GEMMA, make_record, sealed_unchecked

key_pair = generate_new_ed25519_identity()
fields = dict(GEMMA.descriptor())
fields.update(params_schema={"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, examples=[{"q": 1}])
record = make_record(key_pair, seq=5).model_copy(
    update={"capabilities": [CapabilityDescriptor.model_construct(**fields)]}
)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    data = sealed_unchecked(record, key_pair)
counter = RejectionCounter()
try:
    CapabilityRecordValidator(counter).validate(record_key(str(ID.from_pubkey(key_pair.public_key))), data)
except RecordRejected as rejected:
    print(rejected.reason.value, counter.snapshot())
"""


def test_a_cyclic_ref_cannot_crash_the_validating_node() -> None:
    # Run apart: before the fix, evaluating such a schema overflowed the C stack (a segfault, exit
    # -11): any node that validated the record (a PUT_VALUE, a describe) died on the spot.
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", CYCLE_CHECK], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "unsafe_schema {'unsafe_schema': 1}", done.stdout


# -- 3. an unresolvable $ref is a rejection; honest providers are still found ---------------------


async def test_unresolvable_ref_is_rejected_and_honest_providers_still_found() -> None:
    specs = {2: NodeSpec(offers=(GEMMA,)), 3: NodeSpec(offers=(GEMMA,)), 4: NodeSpec(offers=(GEMMA,))}
    async with open_swarm(5, specs=specs) as nodes:
        asker, honest, rogues = nodes[0], nodes[2], nodes[3:]
        schemas = [{"$ref": "#/$defs/missing"}, {"$ref": "other.json#/x"}]
        for rogue, schema in zip(rogues, schemas, strict=True):
            assert rogue.publisher.record is not None
            rogue.publisher.sealed = poisoned_record(rogue.key_pair, schema, {"q": 1}, rogue.publisher.record.seq + 1)
        with trio.fail_after(30):
            found = await asker.discovery.find(DiscoveryQuery(capability=GEMMA.name))
        assert [result.peer_id for result in found] == [honest.peer_id]
        assert asker.rejections.snapshot().get("unsafe_schema") == len(rogues), asker.rejections.snapshot()
        for rogue in rogues:  # describe falls back to the DHT's (older, honest) copy, or says none is valid
            try:
                described = await asker.discovery.describe(rogue.host.get_id())
            except ClawnodeError as refused:
                assert refused.code.value == "E_NOT_FOUND"
            else:
                assert not described.reachable


# -- 4. prices are bounded by what a quote can carry ----------------------------------------------


def test_offer_price_beyond_a_quote_is_refused() -> None:
    # The bound: the largest price times the most units a quote names still fits the escrow's uint256.
    assert MAX_PRICE_PER_UNIT * MAX_QUOTE_UNITS <= MAX_AMOUNT
    Offer(name=GEMMA.name, price_per_unit=MAX_PRICE_PER_UNIT)
    quote = Quote(
        quote_id="q1",
        provider=str(ID.from_pubkey(KEY_PAIR.public_key)),
        consumer=str(ID.from_pubkey(KEY_PAIR.public_key)),
        capability=GEMMA.name,
        price_per_unit=MAX_PRICE_PER_UNIT,
        expected_units=MAX_QUOTE_UNITS,
        duration_s=60,
        valid_until=0,
    )
    assert quote.price_per_unit * quote.expected_units <= MAX_AMOUNT
    for price in (MAX_PRICE_PER_UNIT + 1, 2**256, 10**80):
        with pytest.raises(ValidationError, match="price_per_unit"):
            Offer(name=GEMMA.name, price_per_unit=price)
    # A received record asking such a price is refused as well.
    dear = GEMMA.descriptor().pricing.model_copy(update={"price_per_unit": 10**40})
    descriptor = GEMMA.descriptor().model_copy(update={"pricing": dear})
    record = sealed_unchecked(make_record(KEY_PAIR).model_copy(update={"capabilities": [descriptor]}), KEY_PAIR)
    with pytest.raises(RecordRejected) as rejected:
        verify_record(record, now=time.time())
    assert rejected.value.reason is Rejection.SCHEMA


# -- 5. replay protection --------------------------------------------------------------------------


async def test_older_record_is_not_served_after_a_newer_one_was_seen() -> None:
    async with open_swarm(4, specs={2: NodeSpec(offers=(GEMMA,))}) as nodes:
        attacker, provider, node = nodes[0], nodes[2], nodes[3]
        key = record_key(provider.peer_id)
        older = provider.publisher.sealed
        assert older is not None
        await provider.publisher.publish()  # a new price, say: a higher sequence
        assert provider.publisher.record is not None
        newer_seq = provider.publisher.record.seq
        # This node holds no copy for the DHT (it expired, or the node is new to the key)...
        node.dht.dht.value_store.remove(key.encode())
        # ...but it has seen the newer record, straight from the provider.
        with trio.fail_after(15):
            described = await node.discovery.describe(provider.host.get_id())
        assert described.reachable and described.record.seq == newer_seq
        # Someone now offers it the older, still unexpired record.
        with trio.fail_after(15):
            assert not await put_value_at(attacker, node, key, older)
        assert node.dht.held_value(key) != older, "the older record is held, and would be served"
        assert node.rejections.snapshot().get("stale_sequence", 0) >= 1
        # With the provider offline, describe falls back to the DHT: never the older record.
        provider.host.remove_stream_handler("/clawnode/capability/1.0.0")  # type: ignore[arg-type]
        node.discovery._cache.clear()
        with trio.fail_after(30):
            try:
                fallback = await node.discovery.describe(provider.host.get_id())
            except ClawnodeError:
                pass
            else:
                assert fallback.record.seq == newer_seq


async def test_record_sequence_marks_survive_a_restart(tmp_path: Path) -> None:
    book = SeqBook.in_data_dir(tmp_path)
    newer = make_record(KEY_PAIR, seq=20)
    validator = CapabilityRecordValidator(RejectionCounter(), seq_book=book)
    validator.validate(record_key(newer.peer_id), seal_record(newer, KEY_PAIR.private_key))
    await book.save()
    restarted = SeqBook.in_data_dir(tmp_path)
    await restarted.load()
    assert restarted.highest(newer.peer_id) == 20
    counter = RejectionCounter()
    fresh = CapabilityRecordValidator(counter, seq_book=restarted)  # holds nothing in its DHT store
    with pytest.raises(RecordRejected):
        fresh.validate(record_key(newer.peer_id), seal_record(make_record(KEY_PAIR, seq=10), KEY_PAIR.private_key))
    assert counter.snapshot() == {"stale_sequence": 1}
    fresh.validate(record_key(newer.peer_id), seal_record(make_record(KEY_PAIR, seq=20), KEY_PAIR.private_key))


# -- fuzz: random records and schemas, random reply frames ----------------------------------------

REASONS = {reason.value for reason in Rejection}


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=12)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), example=st.dictionaries(st.text(max_size=6), _json_values(), max_size=4))
def test_random_schemas_never_raise_anything_but_a_rejection(seed: int, example: dict[str, Any]) -> None:
    import random

    schema = random_schema(random.Random(seed))
    record = poisoned_record(KEY_PAIR, schema, example, seq=1) if isinstance(schema, dict) else None
    if record is None:
        return
    started = time.monotonic()
    try:
        verify_record(record, now=time.time())
    except RecordRejected as rejected:
        assert rejected.reason.value in REASONS and rejected.reason is not Rejection.MALFORMED, rejected
    assert time.monotonic() - started < 2.0


@settings(max_examples=200, deadline=None)
@given(frame=st.binary(max_size=256) | _json_values().map(lambda v: json.dumps(v).encode()))
def test_random_reply_frames_are_refused_with_a_code(frame: bytes) -> None:
    try:
        parse_record_reply(frame)
    except ClawnodeError as error:
        assert error.code.value.startswith("E_")


@settings(max_examples=150, deadline=None)
@given(frame=st.binary(max_size=48) | st.builds(lambda body: bytes([len(body)]) + body, st.binary(max_size=40)))
def test_random_requests_get_a_record_or_a_coded_error_from_the_handler(frame: bytes) -> None:
    sealed = seal_record(make_record(KEY_PAIR, seq=3), KEY_PAIR.private_key)
    stream = MemoryStream(frame)

    async def serve() -> None:
        with trio.fail_after(10):
            await capability_handler(lambda: sealed)(stream)  # type: ignore[arg-type]

    trio.run(serve)
    reply = json.loads(stream.written[1:] if stream.written[0] < 0x80 else stream.written[2:])
    assert reply["type"] in ("record", "error")
    if reply["type"] == "error":
        assert reply["code"] in {code.value for code in ErrorCode} - {"E_INTERNAL"} and reply["message"]


def test_the_record_fuzz_finds_no_crash() -> None:
    result = run_record_fuzz(int(os.environ.get("CLAWNODE_FUZZ_INPUTS", "300")))
    assert result["inputs"] >= 300 and result["crashes"] == 0 and result["internal_errors"] == 0, result
