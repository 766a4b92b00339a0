"""Fuzzing what a stranger can hand a node about capabilities: records, schemas, reply and request frames.

Usage::

    python bench/fuzz_records.py [--inputs 2000] [--seed 0]

Each input is one of:

1. a record signed by a valid key whose capability carries a random JSON Schema (references,
   patterns RE2 refuses or that backtrack in Python, combinators nested and doubled, big sizes)
   and a random example, through the DHT validator (``CapabilityRecordValidator.validate``);
2. a valid record with a few bytes changed, through the same validator;
3. a random reply frame, through ``dht.capability.parse_record_reply`` (the asking side);
4. a random request frame, through ``capability_handler`` (the answering side) over an in-memory
   stream.

A **crash** is any exception other than the refusals those paths promise (``RecordRejected``,
``ClawnodeError``); an **internal error** is a refusal that only says something unexpected broke
(the ``malformed`` rejection, or an ``E_INTERNAL`` reply). ``run_record_fuzz`` returns both counts
with the number of inputs, the rejections by reason and the slowest input in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
from libp2p import generate_new_ed25519_identity
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from dht.capability import capability_handler, parse_record_reply
from dht.offers import Offer
from dht.record_validator import CapabilityRecordValidator, RejectionCounter, record_key
from dht.records import (
    RECORD_DOMAIN,
    RECORD_PAYLOAD_TYPE,
    CapabilityDescriptor,
    CapabilityRecord,
    Hardware,
    RecordRejected,
    Rejection,
    bind_wallet,
    seal_record,
)
from runtime.errors import ClawnodeError, ErrorCode
from wire.framing import encode_uvarint
from wire.signed import seal

PATTERNS = ["^(a+)+$", "(a|aa)*b", "(x+x+)+y", "(a)\\1", "(?=a)", "[", "^[a-z0-9_-]{1,32}$", "\\d+", ".*" * 40]
TYPES = ["string", "integer", "number", "object", "array", "boolean", "null"]
REFS = ["#", "#/$defs/a", "#/$defs/missing", "#/properties/x", "other.json", "#/%24defs/a", "#/$defs/a/allOf/0"]
OFFER = Offer(name="model:fuzz-1", price_per_unit=1, context_length=2048, family="fuzz")


def random_instance(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(8 if depth < 3 else 5)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.randrange(-(2**70), 2**70)
    if choice in (3, 4):
        return rng.choice(["a" * rng.randrange(40) + "!", "", "x" * rng.randrange(100), "12", "ü" * 3])
    if choice == 5:
        return [random_instance(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice("abxyz"): random_instance(rng, depth + 1) for _ in range(rng.randrange(4))}


def random_schema(rng: random.Random, depth: int = 0) -> Any:
    """A JSON Schema, often hostile: every keyword the validators must survive shows up."""
    if depth > 4 or rng.random() < 0.15:
        return rng.choice([True, False, {}, {"type": rng.choice(TYPES)}])
    schema: dict[str, Any] = {}
    for _ in range(rng.randrange(1, 5)):
        keyword = rng.randrange(16)
        if keyword == 0:
            schema["type"] = rng.choice(TYPES)
        elif keyword == 1:
            schema["pattern"] = rng.choice(PATTERNS)
        elif keyword == 2:
            schema["$ref"] = rng.choice(REFS)
        elif keyword == 3:
            schema["$defs"] = {"a": random_schema(rng, depth + 1), "b": random_schema(rng, depth + 1)}
        elif keyword == 4:
            schema["properties"] = {name: random_schema(rng, depth + 1) for name in rng.sample("xyzq", 2)}
        elif keyword == 5:
            schema["patternProperties"] = {rng.choice(PATTERNS): random_schema(rng, depth + 1)}
        elif keyword == 6:
            schema[rng.choice(["allOf", "anyOf", "oneOf"])] = [random_schema(rng, depth + 1) for _ in range(3)]
        elif keyword == 7:
            schema["items"] = random_schema(rng, depth + 1)
        elif keyword == 8:
            schema["additionalProperties"] = random_schema(rng, depth + 1)
        elif keyword == 9:
            schema["unevaluatedProperties"] = rng.choice([False, {"type": "string"}])
        elif keyword == 10:
            # no floats: signed payloads carry none
            schema[rng.choice(["minLength", "maxItems", "minimum", "multipleOf"])] = rng.choice([0, 1, 2**80, -1, 3])
        elif keyword == 11:
            schema["enum"] = [random_instance(rng) for _ in range(3)]
        elif keyword == 12:
            schema[rng.choice(["$id", "$anchor", "$dynamicRef"])] = "x"
        elif keyword == 13:
            schema["description"] = "d" * rng.choice([10, 500, 5000])
        elif keyword == 14:
            schema["required"] = rng.sample("xyzq", 2)
        else:
            schema[rng.choice(["if", "then", "else", "not", "contains", "propertyNames"])] = random_schema(
                rng, depth + 1
            )
    return schema


class _Fixture:
    def __init__(self) -> None:
        self.key_pair: KeyPair = generate_new_ed25519_identity()
        self.peer_id = str(ID.from_pubkey(self.key_pair.public_key))
        self.wallet = bind_wallet(secrets.token_bytes(32), self.peer_id)
        self.descriptor = OFFER.descriptor()

    def record(self, capabilities: list[CapabilityDescriptor], seq: int = 1) -> CapabilityRecord:
        now = int(time.time())
        return CapabilityRecord.model_construct(
            peer_id=self.peer_id,
            seq=seq,
            issued_at=now,
            expires_at=now + 600,
            reachability="public",
            addrs=["/ip4/127.0.0.1/tcp/4021"],
            hardware=Hardware(cores=2, ram_mb=2048),
            capabilities=capabilities,
            wallet=self.wallet,
        )

    def hostile(self, rng: random.Random) -> bytes:
        """Signed properly, checked by nobody: what a hostile peer publishes."""
        fields = dict(self.descriptor)
        fields.update(params_schema=random_schema(rng), examples=[random_instance(rng) for _ in range(2)])
        if rng.random() < 0.2:
            fields["returns"] = random_schema(rng)
        descriptor = CapabilityDescriptor.model_construct(**fields)
        record = self.record([descriptor], seq=rng.randrange(1, 2**40))
        with warnings.catch_warnings():  # pydantic notices the unchecked fields; that is the point
            warnings.simplefilter("ignore")
            return seal(record, self.key_pair.private_key, domain=RECORD_DOMAIN, payload_type=RECORD_PAYLOAD_TYPE)

    def mutated(self, rng: random.Random) -> bytes:
        data = bytearray(seal_record(self.record([self.descriptor]), self.key_pair.private_key))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        return bytes(data)


def _reply_frame(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(64))
    if kind == 1:
        envelope = rng.choice(["", "a", "ab=", "!!!!", "YQ==", "x" * 9])
        return json.dumps({"type": "record", "envelope": envelope}).encode()
    if kind == 2:
        return json.dumps({"type": "error", "code": rng.choice(["E_NOT_FOUND", "E_BOGUS", 7]), "message": "m"}).encode()
    return json.dumps(random_instance(rng)).encode()


class MemoryStream:
    """Just enough of a libp2p stream for the handler: reads the given bytes, keeps what is written."""

    def __init__(self, incoming: bytes) -> None:
        self._incoming = incoming
        self.written = b""

    async def read(self, n: int | None = None) -> bytes:
        chunk, self._incoming = self._incoming[: n or 65536], self._incoming[n or 65536 :]
        return chunk

    async def write(self, data: bytes) -> None:
        self.written += data

    async def close(self) -> None:
        return None

    async def reset(self) -> None:
        return None


def _request_frame(rng: random.Random) -> bytes:
    body = rng.choice(
        [b'{"type":"get_record"}', rng.randbytes(rng.randrange(40)), json.dumps(random_instance(rng)).encode()]
    )
    length = rng.choice([len(body), len(body), 2**20, 0])
    return encode_uvarint(length) + body if rng.random() < 0.9 else rng.randbytes(12)


async def _handler_cases(
    frames: list[bytes], sealed: bytes, outcomes: Counter[str], crash_types: Counter[str], slowest: list[float]
) -> None:
    handle = capability_handler(lambda: sealed)
    for frame in frames:
        stream = MemoryStream(frame)
        started = time.perf_counter()
        try:
            with trio.fail_after(5):
                await handle(stream)  # type: ignore[arg-type]
            reply = stream.written
            outcomes["internal_errors"] += int(ErrorCode.INTERNAL.value.encode() in reply)
        except (ClawnodeError, trio.TooSlowError):
            outcomes["refused"] += 1
        except Exception as error:  # noqa: BLE001 - the point: count what escapes
            outcomes["crashes"] += 1
            crash_types[type(error).__name__] += 1
        slowest[0] = max(slowest[0], time.perf_counter() - started)


def run_record_fuzz(inputs: int, seed: int = 0) -> dict[str, Any]:
    """Feed ``inputs`` random inputs to the record validator and the capability protocol's two sides.

    Returns ``inputs``, ``crashes`` (exceptions that escaped), ``internal_errors`` (refusals that
    only say something unexpected broke), ``rejections`` (by reason), ``crash_types`` (what escaped,
    by exception type) and ``slowest_ms``.
    """
    rng = random.Random(seed)
    fixture = _Fixture()
    validator = CapabilityRecordValidator(RejectionCounter())
    key = record_key(fixture.peer_id)
    outcomes: Counter[str] = Counter()
    rejections: Counter[str] = Counter()
    crash_types: Counter[str] = Counter()
    slowest = [0.0]
    handler_frames: list[bytes] = []
    for _ in range(inputs):
        mode = rng.randrange(4)
        if mode == 3:
            handler_frames.append(_request_frame(rng))
            continue
        data = fixture.hostile(rng) if mode == 0 else fixture.mutated(rng) if mode == 1 else _reply_frame(rng)
        started = time.perf_counter()
        try:
            if mode == 2:
                parse_record_reply(data)
            else:
                validator.validate(key, data)
            outcomes["accepted"] += 1
        except RecordRejected as rejected:
            rejections[rejected.reason.value] += 1
            outcomes["internal_errors"] += int(rejected.reason is Rejection.MALFORMED)
        except ClawnodeError as error:
            rejections[error.code.value] += 1
            outcomes["internal_errors"] += int(error.code is ErrorCode.INTERNAL)
        except Exception as error:  # noqa: BLE001 - the point: count what escapes
            outcomes["crashes"] += 1
            crash_types[type(error).__name__] += 1
        slowest[0] = max(slowest[0], time.perf_counter() - started)
    sealed = seal_record(fixture.record([fixture.descriptor]), fixture.key_pair.private_key)
    trio.run(_handler_cases, handler_frames, sealed, outcomes, crash_types, slowest)
    return {
        "inputs": inputs,
        "crashes": outcomes["crashes"],
        "internal_errors": outcomes["internal_errors"],
        "rejections": dict(sorted(rejections.items())),
        "crash_types": dict(sorted(crash_types.items())),
        "slowest_ms": round(slowest[0] * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    result = run_record_fuzz(args.inputs, seed=args.seed)
    result["seconds"] = round(time.perf_counter() - started, 2)
    print(json.dumps(result, indent=1))
    sys.exit(1 if result["crashes"] or result["internal_errors"] else 0)


if __name__ == "__main__":
    main()
