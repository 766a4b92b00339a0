"""Fuzzing every protocol a node serves: hypothesis-generated inputs, two ways to drive them.

Used by ``tests/test_protocol_fuzz.py`` (a few hundred inputs per protocol, in CI) and
``bench/fuzz.py`` (10^4 and more). Inputs are generated with hypothesis strategies, collected up
front (``corpus``) and then driven in one of two ways:

* **handler** — the protocol's registered stream handler (``host.get_mux().handlers``) is called
  on an in-memory stream that yields the input's bytes and then end-of-stream, and whatever it
  writes back is parsed as frames. This is the node's own code from the first byte read to the
  last byte written, minus Noise and Yamux; thousands of inputs per second.
* **stream** — a separate libp2p host opens a real stream to the node over loopback, writes the
  bytes, reads the reply (or gives up after a short wait and resets the stream).

Gossip is driven through the topic validator the node registered (handler) and by publishing on
the topic from a peer's own pubsub (stream).

A **crash** is the handler raising (with an in-memory stream that never fails), or the node no
longer answering. An **internal error** is an ``E_INTERNAL`` reply: the handler hit something it
did not expect. Both are bugs; every other reply (a stable error code, or a real answer) is fine.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost
from libp2p.crypto.keys import PrivateKey
from libp2p.custom_types import TProtocol
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.identity.identify_push.identify_push import ID_PUSH, push_identify_to_peer
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage
from libp2p.kad_dht.pb.kademlia_pb2 import Record as KadRecord
from libp2p.peer.envelope import Envelope, make_unsigned
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.pb import rpc_pb2
from libp2p.tools.anyio_service import background_trio_service
from pydantic import TypeAdapter

from bootstrap import network as network_wire
from dht.capability import CAPABILITY_PROTOCOL, MAX_MESSAGE, fetch_sealed_record
from dht.protocol_id import CLAWNODE_KAD_PROTOCOL_ID
from nat import autonat, autonat_v2_wire
from nat.autonat_v2 import AutoNatV2, AutoNatV2Settings
from node.host import build_dialer_host, build_host
from protocols import lease_wire, task_wire
from protocols.gossip import ANNOUNCEMENT_DOMAIN, ANNOUNCEMENT_PAYLOAD_TYPE, TaskAnnouncement, build_pubsub, task_topic
from protocols.lease import INFER_PROTOCOL, LEASE_PROTOCOL, MAX_CALL_FRAME, MAX_LEASE_FRAME, layers, verifier
from protocols.lease import arbiter as lease_dispute
from protocols.task import TASK_PROTOCOL
from runtime.errors import ClawnodeError, ErrorCode
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes
from wire.framing import FrameReader, encode_uvarint
from wire.rpc import request

if TYPE_CHECKING:
    from node.daemon import Node

PROTOCOLS: dict[str, TProtocol] = {
    "lease": LEASE_PROTOCOL,
    "infer": INFER_PROTOCOL,
    "lease_dispute": lease_dispute.DISPUTE_PROTOCOL,
    "task": TASK_PROTOCOL,
    "capability": CAPABILITY_PROTOCOL,
}
MAX_FRAME = {
    "lease": MAX_LEASE_FRAME,
    "infer": MAX_CALL_FRAME,
    "lease_dispute": lease_dispute.MAX_DISPUTE_FRAME,
    "task": task_wire.MAX_TASK_FRAME,
    "capability": MAX_MESSAGE,
}
# Protocols only the bench drives (``fuzz_market(..., more=True)``): the node's network profile, its
# verification reports, remote layers, AutoNAT v1 and v2 (served by a stand-in server on the
# provider's host when the node does not serve them itself), the DHT and identify push.
MORE_PROTOCOLS: dict[str, TProtocol] = {
    "network": network_wire.NETWORK_PROTOCOL,
    "verify_reports": verifier.REPORTS_PROTOCOL,
    "layers": layers.LAYERS_PROTOCOL,
    "autonat": autonat.PROTOCOL_ID,
    "autonat_v2": autonat_v2_wire.DIAL_REQUEST_PROTOCOL,
    "dial_back": autonat_v2_wire.DIAL_BACK_PROTOCOL,
    "kad": CLAWNODE_KAD_PROTOCOL_ID,
    "id_push": ID_PUSH,
}
# Of those, the ones that speak protobuf (their replies are counted, not parsed as JSON).
PROTOBUF = {"autonat_v2", "dial_back", "kad", "id_push"}
MAX_FRAME |= {
    "network": network_wire.MAX_FRAME,
    "verify_reports": verifier.REPORTS_FRAME,
    "layers": layers.MAX_OPEN_FRAME,
    "autonat": autonat.MAX_FRAME,
    "autonat_v2": autonat_v2_wire.MAX_MESSAGE_BYTES,
    "dial_back": autonat_v2_wire.MAX_DIAL_BACK_BYTES,
    "kad": MAX_DHT_MESSAGE_SIZE,
    "id_push": 1 << 20,  # py-libp2p's read_length_prefixed_protobuf limit
}


def protocol_id(name: str) -> TProtocol:
    return PROTOCOLS[name] if name in PROTOCOLS else MORE_PROTOCOLS[name]


# The request models each protocol reads, whose shapes the JSON inputs imitate.
SHAPES: dict[str, tuple[type[Any], ...]] = {
    "lease": (
        lease_wire.QuoteRequest,
        lease_wire.OpenRequest,
        lease_wire.RevokeRequest,
        lease_wire.RenewRequest,
        lease_wire.ReceiptPush,
    ),
    "infer": (lease_wire.CallRequest, lease_wire.CallAck, lease_wire.Cancel),
    "lease_dispute": (
        lease_dispute.LeaseDisputeCase,
        lease_dispute.LeaseDisputeOutcome,
        lease_dispute.LeaseReceiptAsk,
    ),
    "task": (
        task_wire.BidRequest,
        task_wire.WithdrawBidRequest,
        task_wire.AwardRequest,
        task_wire.ResultRequest,
        task_wire.ReviewRequest,
        task_wire.DisputeCase,
        task_wire.DisputeRequest,
        task_wire.EvidenceRequest,
        task_wire.ResolutionRequest,
        task_wire.CancelRequest,
    ),
    "capability": (),
    "gossip": (TaskAnnouncement,),
    "network": (network_wire.ProfileRequest, network_wire.FundRequest),
    "verify_reports": (verifier.ReportsAsk,),
    "layers": (layers.TunnelOpen,),
    "autonat": (autonat.DialBackRequest,),
}
DEEP = "\x00deep:"  # a placeholder string replaced by deeply nested JSON after encoding


@dataclass(frozen=True)
class Known:
    """Real values the inputs may carry, so that some of them get past the first checks."""

    peer_ids: tuple[str, ...] = ()
    lease_ids: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ("model:words",)
    task_ids: tuple[str, ...] = ()
    now: int = 1_800_000_000  # unix seconds that times in the inputs are drawn around
    signer: PrivateKey | None = None  # signs envelopes inside inputs (a party's key reaches past the signature)


# -- strategies --


def _huge_ints() -> st.SearchStrategy[int]:
    return st.sampled_from(
        [0, -1, 1, 2**31, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, 2**256 - 1, 2**256, -(2**63), 10**400]
    )


def _long_text() -> st.SearchStrategy[str]:
    return st.builds(lambda s, n: (s or "a") * n, st.text(max_size=8), st.integers(1, 20_000))


def _deep() -> st.SearchStrategy[str]:
    return st.builds(lambda depth, kind: f"{DEEP}{kind}{depth}", st.integers(1, 5000), st.sampled_from("[{"))


def _scalars(known: Known) -> st.SearchStrategy[Any]:
    plausible = [*known.peer_ids, *known.lease_ids, *known.capabilities, *known.task_ids]
    parts: list[st.SearchStrategy[Any]] = [
        st.none(),
        st.booleans(),
        st.integers(),
        _huge_ints(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=40),
        st.sampled_from(["0x" + "a" * 40, "0x" + "0" * 64, "a" * 64, "AAAA", "=", "", "model:words", "\u202e"]),
        _long_text(),
        _deep(),
    ]
    if plausible:
        parts.append(st.sampled_from(plausible))
    return st.one_of(parts)


def _values(known: Known) -> st.SearchStrategy[Any]:
    return st.recursive(
        _scalars(known),
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
        max_leaves=8,
    )


_PEER_FIELDS = {"provider", "consumer", "creator", "bidder", "party", "served_by", "arbiter"}


def _signed_fields() -> dict[tuple[str, str], tuple[type[Any], str, bytes]]:
    """Fields that carry a base64 signed envelope: (owner model, field) -> (payload model, domain, type)."""
    lease, task = lease_wire, task_wire
    award = (task.AwardNotice, task.AWARD_DOMAIN, task.AWARD_TYPE)
    result = (task.ResultNotice, task.RESULT_DOMAIN, task.RESULT_TYPE)
    review = (task.ReviewNotice, task.REVIEW_DOMAIN, task.REVIEW_TYPE)
    announcement = (TaskAnnouncement, ANNOUNCEMENT_DOMAIN, ANNOUNCEMENT_PAYLOAD_TYPE)
    return {
        ("OpenRequest", "envelope"): (lease.LeaseOpen, lease.OPEN_DOMAIN, lease.OPEN_TYPE),
        ("LeaseOpen", "quote"): (lease.Quote, lease.QUOTE_DOMAIN, lease.QUOTE_TYPE),
        ("AwardRequest", "envelope"): award,
        ("ResultRequest", "envelope"): result,
        ("ReviewRequest", "envelope"): review,
        ("EvidenceRequest", "envelope"): (task.EvidenceNotice, task.EVIDENCE_DOMAIN, task.EVIDENCE_TYPE),
        ("DisputeCase", "announcement"): announcement,
        ("DisputeCase", "award"): award,
        ("DisputeCase", "result"): result,
        ("DisputeCase", "review"): review,
        ("AwardNotice", "announcement"): announcement,
    }


def _sealed_b64(model: type[Any], domain: str, payload_type: bytes, known: Known, depth: int) -> st.SearchStrategy[str]:
    """Base64 of an envelope that really verifies, signed by ``known.signer``, around a nasty payload."""
    key = known.signer
    assert key is not None
    payloads = st.one_of(_shaped(model, known, depth + 1), _valid_shape(model, known, depth + 1)).map(_encode)
    return payloads.map(
        lambda payload: base64.b64encode(seal_raw(GossipInput(payload, True, domain, payload_type), key)).decode()
    )


def _plausible(name: str, annotation: Any, known: Known, depth: int = 0, owner: str = "") -> st.SearchStrategy[Any]:
    """A value of the right type for field ``name``, often one the node knows."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields") and depth < 3:
        return _valid_shape(annotation, known, depth + 1)
    signed = _signed_fields().get((owner, name))
    if signed is not None and known.signer is not None and depth < 2:
        return _sealed_b64(*signed, known, depth)
    if name in {"artifact", "attachment"}:
        return st.binary(max_size=256).map(lambda data: base64.b64encode(data).decode())
    text = str(annotation)
    if name == "lease_id" and known.lease_ids:
        return st.sampled_from(known.lease_ids)
    if name == "task_id" and known.task_ids:
        return st.sampled_from(known.task_ids)
    if name == "capability":
        return st.sampled_from(known.capabilities)
    if name in _PEER_FIELDS and known.peer_ids:
        return st.sampled_from(known.peer_ids)
    if name in {"payee", "payer", "contract", "arbiter_wallet"}:
        return st.just("0x" + "ab" * 20)
    if name in {"escrow_id", "tx_hash"}:
        return st.just("0x" + "cd" * 32)
    if name in {"params_hash", "content_hash", "token_sha256"}:
        return st.just("ab" * 32)
    if name in {"bid_id", "quote_id"}:
        return st.just("id-1")
    if name == "asset":
        return st.just("ETH")
    if name in {"deadline", "expires_at", "valid_until"}:
        return st.integers(known.now - 10, known.now + 10**6)
    if "int" in text:
        return st.integers(0, 10**6)
    if "dict" in text:
        return st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8)), max_size=3)
    if "bool" in text:
        return st.booleans()
    return st.text(alphabet="abcdefABCDEF0123456789+/=", min_size=1, max_size=64)


def _valid_shape(model: type[Any], known: Known, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    fields = {
        name: _plausible(name, info.annotation, known, depth, model.__name__)
        for name, info in model.model_fields.items()
        if name != "type"
    }
    tag = model.model_fields["type"].default if "type" in model.model_fields else None
    if tag is not None:
        fields["type"] = st.just(tag)
    return st.fixed_dictionaries(fields)


def _one_nasty(model: type[Any], known: Known, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A plausible message with one field replaced by a nasty value (wrong type, huge, deep, long)."""
    names = [name for name in model.model_fields if name != "type"]
    # Built once, not on every draw: hypothesis validates each new strategy object it draws from,
    # and validating these (recursive, nested) took about half of the corpus generation's time.
    shape, values = _valid_shape(model, known, depth), _values(known)
    field = st.sampled_from(names) if names else None

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out = dict(draw(shape))
        if field is not None:
            out[draw(field)] = draw(values)
        return out

    return build()


def _shaped(model: type[Any], known: Known, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A dict with the model's field names (some dropped, some extra) and nasty values."""
    names = [name for name in model.model_fields if name != "type"]
    type_tag = model.model_fields["type"].default if "type" in model.model_fields else None
    values = _values(known)
    tags = st.one_of(st.just(type_tag), st.just(type_tag), _scalars(known))  # built once, as in _one_nasty

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if type_tag is not None:
            out["type"] = draw(tags)
        for name in names:
            if draw(st.integers(0, 9)) == 0:
                continue  # missing
            out[name] = draw(values)
        if draw(st.integers(0, 5)) == 0:
            out[draw(st.text(max_size=10))] = draw(values)  # extra
        return out

    return st.one_of(
        build(), _one_nasty(model, known, depth), _one_nasty(model, known, depth), _valid_shape(model, known, depth)
    )


def _encode(document: Any) -> bytes:
    text = json.dumps(document, allow_nan=True, ensure_ascii=False)

    def deepen(match_text: str) -> str:
        kind, depth = match_text[0], int(match_text[1:])
        return ('{"a":' * depth + "1" + "}" * depth) if kind == "{" else ("[" * depth + "]" * depth)

    prefix = json.dumps(DEEP)[:-1]
    while prefix in text:
        start = text.index(prefix)
        end = text.index('"', start + 1)
        marker = json.loads(text[start : end + 1])[len(DEEP) :]
        text = text[:start] + deepen(marker) + text[end + 1 :]
    return text.encode("utf-8", "surrogatepass")


# _mutated is drawn once per input (a flatmap): a composite of strategies built once, which draws
# the same choices as the one_of of eight variants built around each input did (the same corpus for
# a seed) without hypothesis validating eight fresh strategies per input.
_CUT, _JUNK, _PREFIX = st.integers(1, 64), st.binary(max_size=16), st.binary(min_size=1, max_size=4)
_MUTATIONS = st.sampled_from(range(8))


@st.composite
def _mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    kind = draw(_MUTATIONS)
    if kind <= 1:
        return raw
    if kind == 2:
        return raw[: max(0, len(raw) - draw(_CUT))]  # truncated JSON
    if kind == 3:
        return raw + draw(_JUNK)  # trailing garbage
    if kind == 4:
        return raw.replace(b'"', b'"\\ud800', 1)  # a lone surrogate
    if kind == 5:
        return b"\xef\xbb\xbf" + raw  # a byte order mark
    if kind == 6:
        return raw.replace(b":", b':NaN,"x":', 1)
    return bytes(draw(_PREFIX)) + raw


def _framed(payload: bytes, max_frame: int) -> st.SearchStrategy[bytes]:
    """The payload behind a length prefix: honest, truncated, oversized, or never finished."""
    honest = encode_uvarint(len(payload)) + payload
    return st.one_of(
        st.just(honest),
        st.just(honest),
        st.just(honest),
        st.builds(lambda cut: honest[: max(1, len(honest) - cut)], st.integers(1, 32)),  # truncated frame
        st.builds(lambda extra: encode_uvarint(len(payload) + extra) + payload, st.integers(1, 1 << 20)),
        st.sampled_from([encode_uvarint(max_frame + 1), encode_uvarint(2**63), b"\xff" * 10, b"\x80" * 9 + b"\x01"]),
        st.just(honest + honest),  # two frames where one is expected
        st.just(b"\x00"),  # an empty frame
    )


def json_inputs(protocol: str, known: Known) -> st.SearchStrategy[bytes]:
    shapes = [_shaped(model, known) for model in SHAPES[protocol]]
    documents: st.SearchStrategy[Any] = (
        st.one_of([*shapes, _values(known)]) if shapes else st.one_of(st.just({"type": "get_record"}), _values(known))
    )
    return documents.map(_encode).flatmap(_mutated)


def _multiaddr_bytes(known: Known) -> st.SearchStrategy[bytes]:
    """A multiaddr in binary form: a real one (loopback, public, with a peer id), or garbage."""
    texts = ["/ip4/127.0.0.1/tcp/4001", "/ip4/8.8.8.8/tcp/1", "/ip6/::1/tcp/65535", "/ip4/10.0.0.1/udp/1/quic-v1"]
    texts += [f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}" for peer in known.peer_ids]
    real = st.sampled_from([multiaddr.Multiaddr(text).to_bytes() for text in texts])
    return st.one_of(real, real, st.binary(max_size=48), st.builds(lambda n: b"\x04" * n, st.integers(1, 300)))


def _peer_bytes(known: Known) -> st.SearchStrategy[bytes]:
    real = [ID.from_base58(peer).to_bytes() for peer in known.peer_ids]
    return st.one_of(st.sampled_from(real), st.binary(max_size=64)) if real else st.binary(max_size=64)


def _kad_message(known: Known) -> st.SearchStrategy[bytes]:
    peer = st.builds(
        lambda id_, addrs, connection: KadMessage.Peer(id=id_, addrs=addrs, connection=connection),
        _peer_bytes(known),
        st.lists(_multiaddr_bytes(known), max_size=6),
        st.integers(0, 3),
    )
    record = st.builds(
        lambda key, value, received: KadRecord(key=key, value=value, timeReceived=received),
        st.one_of(st.binary(max_size=64), st.sampled_from([b"/pk/x", b"/ipns/x", b"/clawnode/cap/model:words"])),
        st.one_of(st.binary(max_size=256), st.builds(lambda n: b"v" * n, st.integers(1, 200_000))),
        st.text(max_size=30),
    )

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        kinds = KadMessage.MessageType
        every = [kinds.PUT_VALUE, kinds.GET_VALUE, kinds.ADD_PROVIDER, kinds.GET_PROVIDERS, kinds.FIND_NODE, kinds.PING]
        message = KadMessage(type=draw(st.sampled_from(every)))
        message.key = draw(st.one_of(_peer_bytes(known), st.binary(max_size=128), st.just(b"")))
        if draw(st.booleans()):
            message.record.CopyFrom(draw(record))
        message.closerPeers.extend(draw(st.lists(peer, max_size=4)))
        message.providerPeers.extend(draw(st.lists(peer, max_size=4)))
        if draw(st.integers(0, 3)) == 0:
            message.clusterLevelRaw = draw(st.integers(-(2**31), 2**31 - 1))
        return bytes(message.SerializeToString())

    return build()


def _identify(known: Known) -> st.SearchStrategy[bytes]:
    protocol_names = st.one_of(
        st.sampled_from([str(p) for p in (*PROTOCOLS.values(), *MORE_PROTOCOLS.values())]), st.text(max_size=40)
    )

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        message = Identify(
            protocol_version=draw(st.text(max_size=20)),
            agent_version=draw(st.one_of(st.text(max_size=40), _long_text())),
            listen_addrs=draw(st.lists(_multiaddr_bytes(known), max_size=draw(st.sampled_from([4, 40, 400])))),
            protocols=draw(st.lists(protocol_names, max_size=draw(st.sampled_from([4, 40, 400])))),
        )
        if draw(st.booleans()):
            message.public_key = draw(st.binary(max_size=64))
        if draw(st.booleans()):
            message.observed_addr = draw(_multiaddr_bytes(known))
        if draw(st.integers(0, 3)) == 0:
            message.signedPeerRecord = draw(st.binary(max_size=256))
        return bytes(message.SerializeToString())

    return build()


def _autonat_v2_message(known: Known) -> st.SearchStrategy[bytes]:
    wire = autonat_v2_wire
    nonces = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**64 - 1]))
    request = st.builds(
        lambda addrs, nonce: wire.encode_message(wire.DialRequest(tuple(addrs), nonce)),
        st.lists(_multiaddr_bytes(known), max_size=12),
        nonces,
    )
    others = st.one_of(
        st.builds(lambda data: wire.encode_message(wire.DialDataResponse(data)), st.binary(max_size=5000)),
        st.builds(
            lambda index, size: wire.encode_message(wire.DialDataRequest(index, size)),
            st.integers(0, 2**32),
            st.integers(0, 2**40),
        ),
        st.builds(lambda status: wire.encode_message(wire.DialResponse(status)), st.integers(0, 300)),
    )
    return st.one_of(request, request, request, others)


def _protobuf_payloads(protocol: str, known: Known) -> st.SearchStrategy[bytes]:
    if protocol == "kad":
        return _kad_message(known)
    if protocol == "id_push":
        return _identify(known)
    if protocol == "autonat_v2":
        return _autonat_v2_message(known)
    return st.builds(autonat_v2_wire.encode_dial_back, st.integers(0, 2**64 - 1))  # dial_back


def protobuf_inputs(protocol: str, known: Known) -> st.SearchStrategy[bytes]:
    """Bytes a peer writes on a fresh stream of a protobuf protocol: one to three messages (honest
    framing, truncated, oversized), with now and then a message cut short or with junk after it."""
    max_frame = MAX_FRAME[protocol]
    payloads = _protobuf_payloads(protocol, known)
    spoilt = st.one_of(
        payloads,
        payloads,
        st.builds(lambda raw, cut: raw[: max(0, len(raw) - cut)], payloads, st.integers(1, 16)),
        st.builds(lambda raw, junk: raw + junk, payloads, st.binary(min_size=1, max_size=16)),
    )
    one = spoilt.flatmap(lambda payload: _framed(payload, max_frame))
    honest = spoilt.map(lambda payload: encode_uvarint(len(payload)) + payload)
    return st.one_of(
        one,
        one,
        st.builds(lambda first, second: first + second, honest, one),
        st.binary(max_size=512).flatmap(lambda payload: _framed(payload, max_frame)),
        st.binary(max_size=64),
    )


def stream_inputs(protocol: str, known: Known) -> st.SearchStrategy[bytes]:
    """Bytes a peer writes on a fresh stream of ``protocol``."""
    if protocol in PROTOBUF:
        return protobuf_inputs(protocol, known)
    max_frame = MAX_FRAME[protocol]
    framed_json = json_inputs(protocol, known).flatmap(lambda payload: _framed(payload, max_frame))
    framed_garbage = st.binary(max_size=512).flatmap(lambda payload: _framed(payload, max_frame))
    return st.one_of(framed_json, framed_json, framed_json, framed_garbage, st.binary(max_size=64))


@dataclass(frozen=True)
class GossipInput:
    """What a peer publishes: ``sealed`` payloads are signed into a valid envelope by the driver."""

    payload: bytes
    sealed: bool
    domain: str = ANNOUNCEMENT_DOMAIN
    payload_type: bytes = ANNOUNCEMENT_PAYLOAD_TYPE


def gossip_inputs(known: Known) -> st.SearchStrategy[GossipInput]:
    announcement_json = json_inputs("gossip", known)
    return st.one_of(
        st.builds(GossipInput, announcement_json, st.just(True)),
        st.builds(GossipInput, announcement_json, st.just(True)),
        st.builds(GossipInput, st.binary(max_size=512), st.just(False)),
        st.builds(GossipInput, announcement_json, st.just(True), st.sampled_from(["", "other", "clawnode-x"])),
        st.builds(
            GossipInput,
            announcement_json,
            st.just(True),
            st.just(ANNOUNCEMENT_DOMAIN),
            st.binary(max_size=24),
        ),
    )


def corpus(strategy: st.SearchStrategy[Any], count: int, seed_value: int) -> list[Any]:
    """``count`` examples of ``strategy`` (reproducible by ``seed_value``); blocking, run it in a thread."""
    found: list[Any] = []

    @seed(seed_value)
    @settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(strategy)
    def collect(example: Any) -> None:
        found.append(example)

    collect()
    return found


def seal_raw(item: GossipInput, key: PrivateKey) -> bytes:
    """A gossip input as published: a signed envelope around its payload, or the raw bytes."""
    if not item.sealed:
        return item.payload
    signature = key.sign(make_unsigned(item.domain, item.payload_type, item.payload))
    return Envelope(key.get_public_key(), item.payload_type, item.payload, signature).marshal_envelope()


# -- outcomes --


@dataclass
class Outcome:
    protocol: str
    way: str  # handler | stream
    inputs: int = 0
    crashes: int = 0
    internal_errors: int = 0
    replies: dict[str, int] = field(default_factory=dict)  # reply type or error code -> count
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # the first few failing inputs, described

    def record(self, kind: str) -> None:
        self.replies[kind] = self.replies.get(kind, 0) + 1

    def failed(self, what: str, data: bytes, detail: str) -> None:
        if len(self.failures) < 5:
            self.failures.append(f"{what} on {data[:120]!r}{'…' if len(data) > 120 else ''}: {detail}")

    def summary(self) -> str:
        rate = self.inputs / self.seconds if self.seconds > 0 else math.inf
        shown = None if self.protocol == "idle" else 6  # idle: how long each protocol's stream stayed open
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.replies.items(), key=lambda kv: -kv[1])[:shown])
        return (
            f"{self.protocol:<10} via {self.way:<7} inputs={self.inputs} crashes={self.crashes} "
            f"internal_errors={self.internal_errors} {rate:.0f}/s [{kinds}]"
        )


def split_frames(data: bytes) -> list[bytes]:
    """The complete frames in ``data`` (a trailing partial one is dropped)."""
    frames: list[bytes] = []
    while data:
        value, shift, start = 0, 0, 0
        for position, byte in enumerate(data[:10]):
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                start = position + 1
                break
        else:
            return frames
        if len(data) < start + value:
            return frames
        frames.append(data[start : start + value])
        data = data[start + value :]
    return frames


def reply_kind(frame: bytes) -> str:
    """``E_…`` for an error reply, the reply's ``type`` otherwise (``unparsable`` if not JSON)."""
    try:
        document = json.loads(frame)
    except ValueError:
        return "unparsable"
    if not isinstance(document, dict):
        return "unparsable"
    if document.get("type") == "error":
        return str(document.get("code"))
    return str(document.get("type"))


def _score(outcome: Outcome, data: bytes, written: bytes) -> None:
    frames = split_frames(written)
    if not frames:
        outcome.record("no reply")
    if outcome.protocol in PROTOBUF:  # no error codes to read: a reply or none
        if frames:
            outcome.replies["replies"] = outcome.replies.get("replies", 0) + len(frames)
        return
    for frame in frames:
        kind = reply_kind(frame)
        outcome.record(kind)
        if kind == ErrorCode.INTERNAL.value:
            outcome.internal_errors += 1
            outcome.failed("E_INTERNAL", data, frame[:200].decode(errors="replace"))


# -- the handler way --


class _Conn:
    def __init__(self, peer_id: ID) -> None:
        self.peer_id = peer_id


class MemoryStream:
    """A stream whose peer wrote ``data`` and then closed its side; what the node writes is kept."""

    def __init__(self, data: bytes, remote: ID, protocol: TProtocol) -> None:
        self._data = data
        self.written = bytearray()
        self.muxed_conn = _Conn(remote)
        self._protocol = protocol
        self.closed = False
        self.was_reset = False

    def get_protocol(self) -> TProtocol:
        return self._protocol

    def get_remote_address(self) -> tuple[str, int]:
        return ("127.0.0.1", 9)  # loopback, a closed port: AutoNAT's checks judge an address

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        size = len(self._data) if n is None else n
        chunk, self._data = self._data[:size], self._data[size:]
        return chunk

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.written.extend(data)

    async def close(self) -> None:
        self.closed = True

    async def reset(self) -> None:
        self.was_reset = True


StreamHandler = Callable[[Any], Awaitable[None]]


def registered_handler(host: IHost, protocol: TProtocol) -> StreamHandler:
    handler = host.get_mux().handlers.get(protocol)
    if handler is None:
        raise LookupError(f"the node serves no {protocol}")
    return handler  # type: ignore[no-any-return]


async def drive_handler(
    host: IHost, name: str, inputs: list[bytes], remotes: list[ID], *, timeout_s: float = 15.0
) -> Outcome:
    """Each input to the node's registered handler of ``name`` on an in-memory stream."""
    protocol = protocol_id(name)
    handler = registered_handler(host, protocol)
    outcome = Outcome(name, "handler")
    started = time.perf_counter()
    for index, data in enumerate(inputs):
        stream = MemoryStream(data, remotes[index % len(remotes)], protocol)
        outcome.inputs += 1
        try:
            with trio.fail_after(timeout_s):
                await handler(stream)
        except trio.TooSlowError:
            outcome.crashes += 1
            outcome.failed("hang", data, f"no end within {timeout_s:g} s")
            continue
        except Exception as error:  # noqa: BLE001 - what we are looking for
            outcome.crashes += 1
            outcome.failed("crash", data, type(error).__name__)
            continue
        _score(outcome, data, bytes(stream.written))
    outcome.seconds = time.perf_counter() - started
    return outcome


async def drive_streams(
    attacker: IHost,
    target: ID,
    name: str,
    inputs: list[bytes],
    *,
    concurrency: int = 8,
    reply_wait_s: float = 0.5,
) -> Outcome:
    """Each input on a real stream from ``attacker``; the reply is read for at most ``reply_wait_s``."""
    protocol = protocol_id(name)
    outcome = Outcome(name, "stream")
    limiter = trio.CapacityLimiter(concurrency)
    started = time.perf_counter()

    async def one(data: bytes) -> None:
        async with limiter:
            outcome.inputs += 1
            try:
                with trio.fail_after(10):
                    stream = await attacker.new_stream(target, [protocol])
            except Exception as error:  # noqa: BLE001 - the node did not take a new stream
                outcome.crashes += 1
                outcome.failed("no stream", data, type(error).__name__)
                return
            written = bytearray()
            try:
                await stream.write(data)
                with trio.move_on_after(reply_wait_s):
                    while True:
                        chunk = await stream.read(65536)
                        if not chunk:
                            break
                        written.extend(chunk)
            except Exception:  # noqa: BLE001 - the node may hang up on garbage
                pass
            finally:
                with trio.move_on_after(1):
                    try:
                        await stream.reset()
                    except Exception:  # noqa: BLE001 - already closed
                        pass
            _score(outcome, data, bytes(written))

    async with trio.open_nursery() as nursery:
        for data in inputs:
            nursery.start_soon(one, data)
    outcome.seconds = time.perf_counter() - started
    return outcome


async def drive_gossip_validator(
    validate: Callable[[ID, rpc_pb2.Message], bool], inputs: list[GossipInput], key: PrivateKey, forwarder: ID
) -> Outcome:
    """Each input through the node's topic validator, as pubsub calls it for a received message."""
    outcome = Outcome("gossip", "handler")
    started = time.perf_counter()
    for index, item in enumerate(inputs):
        if index % 100 == 0:
            await trio.sleep(0)  # let the node run between batches
        data = seal_raw(item, key)
        message = rpc_pb2.Message(data=data, from_id=forwarder.to_bytes(), seqno=index.to_bytes(8, "big"))
        outcome.inputs += 1
        try:
            accepted = validate(forwarder, message)
        except Exception as error:  # noqa: BLE001 - what we are looking for
            outcome.crashes += 1
            outcome.failed("crash", data, type(error).__name__)
            continue
        outcome.record("accepted" if accepted else "rejected")
    outcome.seconds = time.perf_counter() - started
    return outcome


# -- a whole run: a provider and a consumer node, a stranger's host, every protocol --

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


def _announcement(creator: str, task_id: str) -> TaskAnnouncement:
    return TaskAnnouncement(
        task_id=task_id,
        creator=creator,
        capability=WORDS,
        budget=10**15,
        deadline=int(time.time()) + 3600,
        review_timeout_s=600,
        summary="an honest task after the garbage",
        params_hash=hashlib.sha256(task_id.encode()).hexdigest(),
    )


async def _fuzz_gossip(
    provider: Node, attacker: IHost, key: PrivateKey, pubsub: Any, inputs: list[GossipInput], on_stream: int
) -> list[Outcome]:
    topic = task_topic(WORDS)
    validator: Any = provider.announcements.pubsub.topic_validators[topic].validator  # ours is synchronous
    direct = await drive_gossip_validator(validator, inputs[on_stream:], key, attacker.get_id())
    # Then published for real: the node's pubsub validates each one as it arrives.
    await pubsub.subscribe(topic)
    router = provider.announcements.router
    with trio.fail_after(10):
        while attacker.get_id() not in router.mesh.get(topic, set()):
            await trio.sleep(0.05)
    published = Outcome("gossip", "stream")
    stats = provider.announcements.stats
    rejected_before, delivered_before = stats.rejected, stats.delivered
    started = time.perf_counter()
    for item in inputs[:on_stream]:
        await pubsub.publish(topic, seal_raw(item, key))
        published.inputs += 1
    with trio.move_on_after(max(2.0, on_stream / 100)):
        while stats.rejected + stats.delivered - rejected_before - delivered_before < published.inputs:
            await trio.sleep(0.05)
    published.seconds = time.perf_counter() - started
    published.replies = {"rejected": stats.rejected - rejected_before, "accepted": stats.delivered - delivered_before}
    return [direct, published]


async def honest_calls(provider: Node, consumer: Node, attacker: IHost, key: PrivateKey, pubsub: Any) -> list[str]:
    """What an honest peer no longer gets from the node (nothing, when all is well)."""
    problems: list[str] = []
    target = str(provider.host.get_id())
    try:
        with trio.fail_after(30):
            view = await consumer.market.open_lease(target, WORDS, budget=WORD_PRICE * 10, duration_s=60)
            result = await consumer.market.call(view.lease_id, {"prompt": "still serving after the garbage"})
        if result.units != 5 or result.served_by != target:
            problems.append(f"lease call: {result.units} units served by another peer")
    except Exception as error:  # noqa: BLE001 - reported, not raised
        problems.append(f"lease call failed: {type(error).__name__}: {error}")
    try:
        with trio.fail_after(10):
            sealed, _ = await fetch_sealed_record(consumer.host, ID.from_base58(target))
        if not sealed:
            problems.append("capability: an empty record")
    except Exception as error:  # noqa: BLE001
        problems.append(f"capability fetch failed: {type(error).__name__}: {error}")
    bid = task_wire.BidRequest(task_id="no-such-task", bid_id="b1", price=1, payee="0x" + "ab" * 20)
    try:
        await request(consumer.host, ID.from_base58(target), TASK_PROTOCOL, bid, TypeAdapter(task_wire.Ack))
    except ClawnodeError as error:
        if error.code in (ErrorCode.INTERNAL, ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE):
            problems.append(f"task request: {error.code.value}")
    # The genuine announcement published after the garbage arrives.
    updates = await provider.announcements.subscribe(WORDS)
    honest = _announcement(str(attacker.get_id()), f"honest-{time.monotonic_ns()}")
    await pubsub.publish(task_topic(WORDS), seal_raw(GossipInput(honest.model_dump_json().encode(), True), key))
    with trio.move_on_after(10) as waited:
        async for item in updates:
            if item.announcement.task_id == honest.task_id:
                break
    if waited.cancelled_caught:
        problems.append("gossip: an honest announcement was not delivered")
    await updates.aclose()
    return problems


@contextlib.asynccontextmanager
async def stand_in_servers(provider: Node) -> AsyncIterator[None]:
    """What the provider does not serve in a market test, served on its host as a node would:
    remote layers (``LayerSeller`` on the market's leases) and AutoNAT v1 and v2 servers (on
    loopback: ``allow_private``)."""
    host = provider.host
    if layers.LAYERS_PROTOCOL not in host.get_mux().handlers:
        layers.LayerSeller(host, facts=layers.market_facts(provider.market), max_servers=1).mount()
    async with trio.open_nursery() as nursery:
        if autonat.PROTOCOL_ID not in host.get_mux().handlers:
            settings = autonat.AutoNatSettings(serve="always", allow_private=True, check_interval_s=3600)
            await nursery.start(autonat.AutoNat(host, settings, build_dialer=build_dialer_host).run)
        if autonat_v2_wire.DIAL_REQUEST_PROTOCOL not in host.get_mux().handlers:
            settings_v2 = AutoNatV2Settings(allow_private=True, check_interval_s=0)
            await nursery.start(AutoNatV2(host, settings_v2, build_dialer=build_dialer_host).run)
        with trio.fail_after(10):
            while not {autonat.PROTOCOL_ID, autonat_v2_wire.DIAL_REQUEST_PROTOCOL} <= set(host.get_mux().handlers):
                await trio.sleep(0.05)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


async def _honest_more(provider: Node, consumer: Node) -> list[str]:
    """What an honest peer no longer gets from the protocols of ``MORE_PROTOCOLS``."""
    problems: list[str] = []
    host, target = consumer.host, provider.host.get_id()

    async def asked(name: str, message: Any, replies: TypeAdapter[Any], fine: set[ErrorCode]) -> None:
        try:
            await request(host, target, protocol_id(name), message, replies, max_frame=MAX_FRAME[name])
        except ClawnodeError as error:
            if error.code not in fine:
                problems.append(f"{name}: {error.code.value} {error.message}")

    stable = {ErrorCode.NOT_FOUND, ErrorCode.FORBIDDEN, ErrorCode.INVALID_ARGUMENT, ErrorCode.RATE_LIMITED}
    await asked("network", network_wire.ProfileRequest(), TypeAdapter(network_wire.ProfileReply), set())
    await asked("verify_reports", verifier.ReportsAsk(), verifier.REPORTS_ANSWER, set())
    await asked(
        "layers", layers.TunnelOpen(lease_id="no-such-lease", token="t"), TypeAdapter(layers.TunnelReady), stable
    )
    port = int(multiaddr.Multiaddr(consumer.listen_addrs()[0]).value_for_protocol("tcp"))
    await asked("autonat", autonat.DialBackRequest(ports=[port]), TypeAdapter(autonat.DialBackReply), stable)

    async def exchange(name: str, payload: bytes) -> bytes | None:
        """The first frame the node answers ``payload`` with on a fresh stream (None: none came)."""
        try:
            with trio.fail_after(15):
                stream = await host.new_stream(target, [protocol_id(name)])
                try:
                    await stream.write(encode_uvarint(len(payload)) + payload)
                    return await FrameReader(stream, max_frame=MAX_FRAME[name]).read_frame(15)
                finally:
                    with trio.move_on_after(1):
                        await stream.close()
        except Exception as error:  # noqa: BLE001 - reported
            problems.append(f"{name}: no answer ({type(error).__name__})")
            return None

    find_node = KadMessage(type=KadMessage.MessageType.FIND_NODE, key=host.get_id().to_bytes())
    await exchange("kad", bytes(find_node.SerializeToString()))
    wanted = multiaddr.Multiaddr(consumer.listen_addrs()[0]).to_bytes()
    reply = await exchange("autonat_v2", autonat_v2_wire.encode_message(autonat_v2_wire.DialRequest((wanted,), 7)))
    if reply is not None:
        try:
            autonat_v2_wire.decode_message(reply)
        except autonat_v2_wire.WireError as error:
            problems.append(f"autonat_v2: an unreadable answer ({error})")
    with trio.move_on_after(15) as pushed:
        if not await push_identify_to_peer(host, target):
            problems.append("id_push: the push was not taken")
    if pushed.cancelled_caught:
        problems.append("id_push: no end within 15 s")
    return problems


async def idle_streams(attacker: IHost, target: ID, names: list[str], wait_s: float) -> Outcome:
    """One stream of each protocol opened from ``attacker`` and never written to: the node must end
    each (close or reset) within ``wait_s``; one still open then is a hang (its handler waits for
    good, holding whatever it holds)."""
    outcome = Outcome("idle", "stream")
    started = time.perf_counter()

    async def one(name: str) -> None:
        outcome.inputs += 1
        try:
            with trio.fail_after(10):
                stream = await attacker.new_stream(target, [protocol_id(name)])
        except Exception as error:  # noqa: BLE001 - the node did not take a new stream
            outcome.crashes += 1
            outcome.failed("no stream", name.encode(), type(error).__name__)
            return
        opened = time.perf_counter()
        try:
            with trio.move_on_after(wait_s) as waited:
                while await stream.read(65536):
                    pass
        except Exception:  # noqa: BLE001 - a reset ends it too
            pass
        if waited.cancelled_caught:
            outcome.crashes += 1
            outcome.failed("hang", name.encode(), f"a stream never written to is still open after {wait_s:g} s")
        else:
            outcome.record(f"{name}:{time.perf_counter() - opened:.0f}s")
        with trio.move_on_after(1):
            try:
                await stream.reset()
            except Exception:  # noqa: BLE001 - already closed
                pass

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(one, name)
    outcome.seconds = time.perf_counter() - started
    return outcome


async def fuzz_more(
    provider: Node,
    consumer: Node,
    attacker: IHost,
    known: Known,
    per_protocol: int,
    on_stream: int,
    drawn: int,
    seed_value: int,
    progress: Callable[[str], None],
    idle_wait_s: float = 0.0,
) -> tuple[list[Outcome], list[str]]:
    """``MORE_PROTOCOLS`` fuzzed as ``fuzz_market`` fuzzes the others, then the honest calls on them;
    with ``idle_wait_s``, then one idle stream of every protocol (``idle_streams``)."""
    outcomes: list[Outcome] = []
    target = provider.host.get_id()
    remotes = [attacker.get_id(), consumer.host.get_id()]
    async with stand_in_servers(provider):
        for index, name in enumerate(MORE_PROTOCOLS, start=100):
            progress(f"{name}: generating {drawn} inputs, {per_protocol - drawn} mutants of them")
            base = await trio.to_thread.run_sync(corpus, stream_inputs(name, known), drawn, seed_value + index)
            inputs = expand(base, per_protocol, seed_value + index)
            outcomes.append(await drive_streams(attacker, target, name, inputs[:on_stream]))
            progress(outcomes[-1].summary())
            outcomes.append(await drive_handler(provider.host, name, inputs[on_stream:], remotes))
            progress(outcomes[-1].summary())
        progress("honest calls (more protocols)")
        problems = await _honest_more(provider, consumer)
        if idle_wait_s > 0:
            progress(f"idle streams: one of each protocol, never written to, watched for {idle_wait_s:g} s")
            outcomes.append(await idle_streams(attacker, target, [*PROTOCOLS, *MORE_PROTOCOLS], idle_wait_s))
            progress(outcomes[-1].summary())
    return outcomes, problems


@dataclass
class FuzzRun:
    outcomes: list[Outcome]
    problems: list[str]  # what honest peers no longer got afterwards


def _mutate(data: bytes, other: bytes, rng: random.Random) -> bytes:
    """One byte-level mutation: flips, a cut, a splice with another input, an insertion, a repeat."""
    if not data:
        return other[: rng.randrange(len(other) + 1)]
    cut = rng.randrange(len(data) + 1)
    kind = rng.randrange(5)
    if kind == 0:
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 1:
        return data[:cut]
    if kind == 2:
        return data[:cut] + other[rng.randrange(len(other) + 1) :]
    if kind == 3:
        return data[:cut] + rng.randbytes(rng.randint(1, 16)) + data[cut:]
    return data[:cut] + data[cut : cut + rng.randint(1, 64)] * rng.randint(2, 8) + data[cut:]


def expand(base: list[bytes], total: int, seed_value: int) -> list[bytes]:
    """``base``, then mutants of it up to ``total`` inputs. Half the mutants keep an honest length
    prefix around a mutated body, so they reach the JSON parser rather than the framing check."""
    rng = random.Random(seed_value)
    out = list(base[:total])
    while base and len(out) < total:
        data, other = rng.choice(base), rng.choice(base)
        frames = split_frames(data)
        if frames and rng.random() < 0.5:
            body = _mutate(frames[0], split_frames(other)[0] if split_frames(other) else other, rng)
            out.append(encode_uvarint(len(body)) + body)
        else:
            out.append(_mutate(data, other, rng))
    return out


def expand_gossip(base: list[GossipInput], total: int, seed_value: int) -> list[GossipInput]:
    rng = random.Random(seed_value)
    out = list(base[:total])
    while base and len(out) < total:
        item, other = rng.choice(base), rng.choice(base)
        out.append(GossipInput(_mutate(item.payload, other.payload, rng), item.sealed, item.domain, item.payload_type))
    return out


async def fuzz_market(
    per_protocol: int,
    on_stream: int,
    seed_value: int,
    *,
    generated: int | None = None,
    more: bool = False,
    idle_wait_s: float = 0.0,
    progress: Callable[[str], None] = lambda _: None,
) -> FuzzRun:
    """``per_protocol`` inputs to each protocol, ``on_stream`` of them over real streams, the rest
    through the registered handler; then the honest calls. ``generated`` of them come from the
    hypothesis strategies (default: all), the rest are byte-level mutants of those (``expand``).
    With ``more``, the protocols of ``MORE_PROTOCOLS`` too, and idle streams (``fuzz_more``)."""
    drawn = per_protocol if generated is None else min(generated, per_protocol)
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}]) as (nodes, _):
        provider, consumer = nodes
        target = provider.host.get_id()
        # A lease the consumer holds, so some inputs name a real lease (and come from its party).
        held = await consumer.market.open_lease(str(target), WORDS, budget=WORD_PRICE * 20, duration_s=300)
        await provider.tasks.watch(WORDS)  # a seller's subscription: the topic validator, tasks into the book
        # Real tasks, so some inputs name one: the provider's own (strangers bid on it, the
        # consumer arbitrates it) and the consumer's (the provider may bid; the consumer awards
        # and reviews it with envelopes it really signs, the provider arbitrates it).
        wallet = "0x" + "ab" * 20
        own = await provider.tasks.publish(
            WORDS, 10**15, 3600, arbiter_peer=str(consumer.host.get_id()), arbiter_wallet=wallet
        )
        theirs = await consumer.tasks.publish(WORDS, 10**15, 3600, arbiter_peer=str(target), arbiter_wallet=wallet)
        with trio.move_on_after(10):
            while not any(task.task_id == theirs.task_id for task in provider.tasks.tasks()):
                await trio.sleep(0.05)

        attacker_key = generate_new_ed25519_identity()
        attacker = build_host(attacker_key)
        pubsub, router = build_pubsub(attacker)
        known = Known(
            peer_ids=(str(target), str(consumer.host.get_id()), str(attacker.get_id())),
            lease_ids=(held.lease_id,),
            task_ids=(own.task_id, theirs.task_id, "task-1"),
            now=int(time.time()),
            signer=consumer.market.key,
        )
        outcomes: list[Outcome] = []
        async with attacker.run([LOOPBACK]), background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            with trio.fail_after(10):
                await attacker.connect(info_from_p2p_addr(multiaddr.Multiaddr(provider.listen_addrs()[0])))
            remotes = [attacker.get_id(), consumer.host.get_id()]
            for index, name in enumerate(PROTOCOLS):
                progress(f"{name}: generating {drawn} inputs, {per_protocol - drawn} mutants of them")
                base = await trio.to_thread.run_sync(corpus, stream_inputs(name, known), drawn, seed_value + index)
                inputs = expand(base, per_protocol, seed_value + index)
                outcomes.append(await drive_streams(attacker, target, name, inputs[:on_stream]))
                progress(outcomes[-1].summary())
                outcomes.append(await drive_handler(provider.host, name, inputs[on_stream:], remotes))
                progress(outcomes[-1].summary())
            progress(f"gossip: generating {drawn} inputs, {per_protocol - drawn} mutants of them")
            drawn_gossip = await trio.to_thread.run_sync(corpus, gossip_inputs(known), drawn, seed_value + 99)
            gossip = expand_gossip(drawn_gossip, per_protocol, seed_value + 99)
            outcomes += await _fuzz_gossip(provider, attacker, attacker_key.private_key, pubsub, gossip, on_stream)
            progress("honest calls")
            problems = await honest_calls(provider, consumer, attacker, attacker_key.private_key, pubsub)
            if more:
                found, more_problems = await fuzz_more(
                    provider,
                    consumer,
                    attacker,
                    known,
                    per_protocol,
                    on_stream,
                    drawn,
                    seed_value,
                    progress,
                    idle_wait_s,
                )
                outcomes += found
                problems += more_problems
        return FuzzRun(outcomes, problems)
