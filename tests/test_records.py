"""Capability records: what is accepted, what is rejected and counted, and that a
record's own schema and examples are enough to build an acceptable request."""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import multihash
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p import generate_new_ed25519_identity
from libp2p.kad_dht.kad_dht import parse_cid

from dht.discovery import DiscoveryQuery
from dht.offers import Offer, capability_cid, legacy_provider_key, provider_key
from dht.record_validator import CapabilityRecordValidator, RejectionCounter, legacy_record_key, record_key
from dht.records import MAX_RECORD_BYTES, RecordRejected, private_leaks, seal_record, verify_record
from tests.support.records import GEMMA, bad_records, make_record
from tests.support.swarm import NodeSpec, SwarmNode, open_nodes, publish_offers

KEY_PAIR = generate_new_ed25519_identity()
# Records expire: they are signed when a test first needs them, not at collection (a long suite run
# would otherwise hand these tests records older than their TTL).
REASONS = sorted(bad_records(KEY_PAIR, good_seq=10))
RECORD_BYTES = len(seal_record(make_record(KEY_PAIR, seq=10), KEY_PAIR.private_key))  # the same every time


@functools.cache
def good() -> bytes:
    return seal_record(make_record(KEY_PAIR, seq=10), KEY_PAIR.private_key)


@functools.cache
def bad() -> dict[str, bytes]:
    return bad_records(KEY_PAIR, good_seq=10)


PEER = make_record(KEY_PAIR).peer_id


def test_a_good_record_verifies_and_fits_the_size_limit() -> None:
    record = verify_record(good(), now=time.time(), held_seq=9)
    assert record.peer_id == PEER
    assert record.capability(GEMMA.name) is not None
    assert len(good()) <= MAX_RECORD_BYTES


@pytest.mark.parametrize("reason", REASONS)
def test_each_bad_record_is_rejected_for_its_reason(reason: str) -> None:
    with pytest.raises(RecordRejected) as rejected:
        verify_record(bad()[reason], now=time.time(), held_seq=10)
    assert rejected.value.reason.value == reason


@pytest.mark.parametrize("reason", REASONS)
def test_the_dht_validator_rejects_and_counts_each_bad_record(reason: str) -> None:
    counter = RejectionCounter()
    held = {record_key(PEER): good()}
    validator = CapabilityRecordValidator(counter, held_value=held.get)
    validator.validate(record_key(PEER), good())
    with pytest.raises(RecordRejected):
        validator.validate(record_key(PEER), bad()[reason])
    assert counter.snapshot() == {reason: 1}


def test_the_validator_refuses_a_record_stored_under_another_peers_key() -> None:
    counter = RejectionCounter()
    validator = CapabilityRecordValidator(counter)
    other = make_record(generate_new_ed25519_identity()).peer_id
    with pytest.raises(RecordRejected):
        validator.validate(record_key(other), good())
    assert counter.snapshot() == {"wrong_signer": 1}


def test_record_keys_fit_a_find_node_any_dht_server_answers() -> None:
    """py-libp2p's DHT server resets a FIND_NODE whose key is over 50 bytes and not a multihash: the
    record key must fit, or neither js's put/get nor our own lookups for it reach a clawnode node."""
    key = record_key(PEER)
    assert key.startswith("/clawnode/") and len(key.encode()) <= 50
    assert key == record_key(PEER) and key != record_key(make_record(generate_new_ed25519_identity()).peer_id)
    assert len(legacy_record_key(PEER).encode()) > 50  # what it was


def test_the_validator_still_takes_a_record_under_its_legacy_key() -> None:
    counter = RejectionCounter()
    validator = CapabilityRecordValidator(counter)
    validator.validate(legacy_record_key(PEER), good())
    assert validator.select(legacy_record_key(PEER), [good()]) == 0
    assert counter.total() == 0


def test_provider_keys_are_sha256_multihashes_of_a_raw_cid() -> None:
    """js and go DHT servers refuse a provider key that is not a CID's multihash (``Invalid CID``)."""
    key = provider_key(GEMMA.name)
    decoded = multihash.decode(key)
    assert decoded.code == 0x12 and len(decoded.digest) == 32
    assert decoded.digest == legacy_provider_key(GEMMA.name)  # the same digest old releases announced
    cid = capability_cid(GEMMA.name)
    assert cid.startswith("bafkrei") and parse_cid(cid).multihash == key
    assert provider_key("model:other") != key


def test_select_prefers_the_highest_valid_sequence() -> None:
    validator = CapabilityRecordValidator(RejectionCounter())
    older = seal_record(make_record(KEY_PAIR, seq=5), KEY_PAIR.private_key)
    newer = seal_record(make_record(KEY_PAIR, seq=20), KEY_PAIR.private_key)
    assert validator.select(record_key(PEER), [older, good(), newer]) == 2
    assert validator.select(record_key(PEER), [bad()["bad_signature"], older]) == 1


@settings(max_examples=150, deadline=None)
@given(position=st.integers(min_value=0, max_value=RECORD_BYTES - 1), flip=st.integers(min_value=1, max_value=255))
def test_any_changed_byte_breaks_the_record(position: int, flip: int) -> None:
    tampered = bytearray(good())
    tampered[position] ^= flip
    with pytest.raises(RecordRejected):
        verify_record(bytes(tampered), now=time.time())


def test_the_publisher_refuses_to_seal_private_data() -> None:
    for summary in ("see http://192.168.1.20:8080/v1", "weights in ~/models", "C:\\models\\gemma.gguf"):
        leaky = GEMMA.model_copy(update={"summary": summary}).descriptor()
        with pytest.raises(RecordRejected) as refused:
            seal_record(make_record(KEY_PAIR, capabilities=[leaky]), KEY_PAIR.private_key)
        assert refused.value.reason.value == "private_data"
    assert private_leaks(make_record(KEY_PAIR).model_dump(mode="json")) == []


def test_a_request_built_from_the_record_alone_is_accepted() -> None:
    record = verify_record(good(), now=time.time())
    capability = record.capability(GEMMA.name)
    assert capability is not None and capability.examples
    for example in capability.examples:
        assert capability.request_problems(example) == []
    built = {**capability.examples[0], "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 8}
    assert capability.request_problems(built) == []
    assert capability.request_problems({"prompt": "no messages"}) != []
    assert capability.request_problems({"messages": [{"role": "wizard", "content": "x"}]}) != []


def test_an_offer_whose_example_breaks_its_own_schema_is_refused() -> None:
    with pytest.raises(ValueError, match="examples"):
        Offer(name=GEMMA.name, price_per_unit=1, examples=[{"max_tokens": 0}]).descriptor()


@asynccontextmanager
async def _swarm_without_refresh(size: int, specs: Mapping[int, NodeSpec]) -> AsyncIterator[list[SwarmNode]]:
    """``open_swarm`` without its refresh of every routing table (a third of its start-up on two cores):
    the asker is the first bootstrap peer, which every node met at its join and every publish after the
    joins therefore reaches, so the asker learns every provider whatever the other tables hold."""
    with tempfile.TemporaryDirectory(prefix="clawnode-swarm-") as scratch:
        async with open_nodes(range(size), Path(scratch), bootstrap_count=2, specs=specs) as nodes:
            await publish_offers(nodes)
            yield nodes


async def test_the_query_path_drops_and_counts_every_bad_record() -> None:
    """Rogue providers announce the capability and serve one bad record each."""
    honest, rogues = 2, list(REASONS)
    specs = {index: NodeSpec(offers=(GEMMA,)) for index in range(honest, honest + len(rogues) + 1)}
    async with _swarm_without_refresh(honest + len(rogues) + 2, specs) as nodes:
        asker, good = nodes[0], nodes[honest]
        rogue_nodes = dict(zip(rogues, nodes[honest + 1 : honest + 1 + len(rogues)], strict=True))
        for reason, rogue in rogue_nodes.items():
            assert rogue.publisher.record is not None
            # The stale one must first be seen at a higher sequence for its replay to be stale.
            if reason != "stale_sequence":
                rogue.publisher.sealed = bad_records(rogue.key_pair, good_seq=rogue.publisher.record.seq)[reason]
        with trio.fail_after(30):
            first = await asker.discovery.find(DiscoveryQuery(capability=GEMMA.name))
        stale_rogue = rogue_nodes["stale_sequence"]
        assert {r.peer_id for r in first} == {good.peer_id, stale_rogue.peer_id}
        assert stale_rogue.publisher.record is not None
        stale_rogue.publisher.sealed = bad_records(stale_rogue.key_pair, good_seq=stale_rogue.publisher.record.seq)[
            "stale_sequence"
        ]
        with trio.fail_after(30):
            second = await asker.discovery.find(DiscoveryQuery(capability=GEMMA.name))
        assert [r.peer_id for r in second] == [good.peer_id]
        counted = asker.rejections.snapshot()
        assert set(counted) == set(rogues), counted
        assert counted["stale_sequence"] == 1


def test_a_seller_of_inference_tasks_says_so_in_its_record() -> None:
    from dht.records import SandboxOffer

    offer = SandboxOffer(
        kinds=["inference", "wasm"],
        max_fuel=10**9,
        max_memory_mb=256,
        max_wall_s=60,
        max_output_bytes=65536,
        max_module_bytes=65536,
    )
    sealed = seal_record(make_record(KEY_PAIR, seq=10, sandbox=offer), KEY_PAIR.private_key)
    record = verify_record(sealed, now=time.time())
    assert record.sandbox is not None and record.sandbox.kinds == ["inference", "wasm"]
