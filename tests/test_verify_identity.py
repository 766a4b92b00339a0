"""Model identity (issue 21): a served model's record carries its GGUF file's sha256, quantisation and
architecture, and discovery filters providers by the file."""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

from libp2p import generate_new_ed25519_identity

from dht.discovery import DiscoveryQuery, _result
from dht.offers import Offer
from dht.records import ModelFacts, seal_record, verify_record
from runtime.inference.models import ModelHost, ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify.identity import file_sha256
from tests.support.records import GEMMA, make_record


async def test_a_served_model_offers_its_file_hash_quantisation_and_architecture(tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=3)
    spec = ModelSpec(name="tiny", path=str(path), n_ctx=128, n_threads=1)  # type: ignore[call-arg]
    host = ModelHost([spec], progress=io.StringIO())
    await host.start()
    try:
        (offer,) = map(Offer.model_validate, host.offer_fields())
    finally:
        await host.aclose()
    facts = offer.descriptor().model
    assert facts is not None
    assert facts.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (facts.quantisation, facts.family) == ("F32", "llama")
    # Another file (another seed) has another identity; the same file rewritten in place is hashed again.
    other = write_tiny_llama_gguf(tmp_path / "other.gguf", seed=4)
    assert file_sha256(other) != facts.sha256
    write_tiny_llama_gguf(path, seed=4)
    assert file_sha256(path) == file_sha256(other)


def test_discovery_filters_by_file_and_old_records_keep_their_encoding() -> None:
    key_pair = generate_new_ed25519_identity()
    digest = "ab" * 32
    served = GEMMA.model_copy(update={"sha256": digest})
    record = make_record(key_pair, capabilities=[served.descriptor()])
    facts = verify_record(seal_record(record, key_pair.private_key), now=int(time.time())).capabilities[0].model
    assert facts is not None and facts.sha256 == digest
    query = DiscoveryQuery(capability=GEMMA.name)
    found = _result(record, 0.01, query.model_copy(update={"sha256": digest}), is_self=False)
    assert found is not None and found.sha256 == digest
    assert _result(record, 0.01, query.model_copy(update={"sha256": "cd" * 32}), is_self=False) is None
    assert _result(record, 0.01, query, is_self=False) is not None
    # A record without the hash encodes as before (no "sha256" key): old signatures still verify.
    plain = ModelFacts(family="gemma3", parameters=0, quantisation="Q4_K_M", context_length=8192)
    assert "sha256" not in plain.model_dump(mode="json")
