"""Verified inference (issue 21): what a consumer can check without the file and without a prefill is
checked on every call, not on the ``verify.sample_rate`` of calls drawn for a spot check.

Before, a provider past its first passed check could end its calls with an end frame that carried no
proof (and stream text-less or inflated chunks, which only a proof bounds) and was failed ``no_proof``
only on the 2 % of calls drawn; and a proof whose signed ``text_sha256`` was not the text streamed was
failed only inside a drawn check, although it is one hash. Now an end frame without the proof it owes
fails ``no_proof`` on every call (a cut keeps its forgiven-once rule and the draw), and a proof's
signature, its signed sampling and, on an end frame, its signed text hash are checked on every call that
carries one (``protocols.machines.verify.every_call_facts``). Pure tests of the rule, tests of
``Verifying.check`` with signed proofs, and one with real nodes, real leases and the tiny model: an honest
provider's 20 calls (ended by ``max_tokens``, by stop strings, cancelled, stalled) are never flagged."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import trio
from hypothesis import given
from hypothesis import strategies as st

from protocols.lease import serving
from protocols.lease.verifying import Verifying
from protocols.machines.lease_consumer import CUT_ENDINGS, CallEnding
from protocols.machines.verify import CallFacts, check_verdict, every_call_facts, signed_hash_matches
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify import check
from runtime.verify.evidence import CallProof, CommitmentBody, sign_commitment, text_sha256
from runtime.verify.provider import CallRecorder
from tests.support.market import market_nodes
from tests.test_verify_stall import CHAT, STALL_S, _pausing_after_text, _spec

LEASE = "lease-every-call"
SHA = "ab" * 32
TEXT = "the reply as streamed"
ERROR_FRAMES = (CallEnding.ERROR, CallEnding.STOPPED)  # a proof on an error frame (or none at all)


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer's checks load the file for their prefill into a per-process cache: this module's
    go with its tests, not on to interpreter exit (where llama-cpp-python's ``__del__`` complains)."""
    monkeypatch.setattr(check, "_prefills", {})


_facts = st.builds(
    CallFacts,
    proof_sent=st.booleans(),
    proof_owed=st.booleans(),
    cut=st.booleans(),
    error_frame=st.booleans(),
    root_signed=st.booleans(),
    sampling_matches=st.booleans(),
    text_hash_matches=st.booleans(),
    body_version=st.integers(1, 3),
    signed_seeded=st.sampled_from([None, True, False]),
)


@given(_facts)
def test_what_every_call_fails_on(call: CallFacts) -> None:
    facts = every_call_facts(call)
    verdict = None if facts is None else check_verdict(facts)
    if not call.proof_sent:
        # An end frame's missing proof, owed, fails on every call; a cut's goes by its forgiven-once rule.
        expected = "no_proof" if call.proof_owed and not call.cut else None
    elif not call.root_signed:
        expected = "unsigned_root"
    elif not call.sampling_matches:
        expected = "sampling_mismatch"
    elif not call.text_hash_matches and not call.error_frame:
        expected = "text_hash_mismatch"
    else:
        expected = None
    assert (verdict.reason if verdict is not None else None) == expected
    if verdict is not None:
        assert verdict.outcome == "failed" and not verdict.dispute  # no signature, or the consumer's word
    # What the call fails on is check_verdict's own facts: the same reasons and consequences as a drawn check.
    assert (every_call_facts(call) is None) == (verdict is None)


@given(st.text(max_size=40), st.text(max_size=40))
def test_a_signed_text_hash_is_the_text_received(signed: str, received: str) -> None:
    assert signed_hash_matches(text_sha256(signed), text_sha256(received)) == (signed == received)
    assert signed_hash_matches(None, text_sha256(received))  # a v1 body signs no text
    assert signed_hash_matches(text_sha256(signed), None)  # no text known here


async def _advertised(provider: str, lease_id: str) -> str:
    return SHA  # the provider's record names the file


def _proof(key: Any, *, text: str = TEXT) -> CallProof:
    body = CommitmentBody(
        v=3,
        lease_id=LEASE,
        call_id="call-1",
        provider=key.peer_id,
        model_sha256=SHA,
        temperature_milli=0,
        top_p_milli=950,
        prompt_tokens=4,
        completion_tokens=2,
        root="cd" * 32,
        prompt_sha256="ef" * 32,
        text_sha256=text_sha256(text),
        seeded=False,
    )
    return CallProof(commitment=sign_commitment(body, key), tokens=[5, 6], chunks=[])


@pytest.fixture
def key() -> Any:
    from libp2p import generate_new_ed25519_identity

    from wire.peer_keys import receipt_key

    return receipt_key(generate_new_ed25519_identity().private_key)


def _passed_before(key: Any, rate: float = 0.0) -> Verifying:
    """A consumer that holds no copy of the file (only the checks that need none run) and has checked the
    provider once, passed: its next calls are drawn at ``rate`` only (0: none is)."""
    verifying = Verifying(local_model=lambda sha256: None, sample_rate=rate)
    verifying.advertised = _advertised
    verifying.book.note(key.peer_id, "passed")
    assert verifying.book.checked_before(key.peer_id) and not verifying.book.in_doubt(key.peer_id)
    return verifying


async def test_an_end_frame_without_its_proof_fails_on_every_call_and_a_cut_only_when_drawn(key: Any) -> None:
    for rate in (0.0, 0.02):  # undrawn, and verify.sample_rate's default
        verifying = _passed_before(key, rate)
        usage = {"completion_tokens": 8}
        assert await verifying.check(key.peer_id, LEASE, CHAT, None, usage=usage) == "failed:no_proof"
    for ending in sorted(CUT_ENDINGS):  # after its forgiven one (the consumer's), a cut is drawn as before
        verifying = _passed_before(key)
        outcome = await verifying.check(key.peer_id, LEASE, CHAT, None, received_tokens=8, ending=ending)
        assert outcome == "skipped", ending
    # A call served without a commitment by design, or that produced nothing, owes none.
    verifying = _passed_before(key)
    assert await verifying.check(key.peer_id, LEASE, {**CHAT, "n": 2}, None, received_tokens=8) == "skipped"
    assert await verifying.check(key.peer_id, LEASE, CHAT, None, usage={}, received_tokens=0) == "skipped"


async def test_a_proof_for_other_text_or_not_the_providers_fails_undrawn(key: Any) -> None:
    for ending in (CallEnding.END, CallEnding.CANCELLED):  # a proof on an end frame
        verifying = _passed_before(key)
        edited = TEXT + "!"
        if ending is CallEnding.END:  # the default: a call's own end frame
            outcome = await verifying.check(key.peer_id, LEASE, CHAT, _proof(key), text=edited)
        else:
            outcome = await verifying.check(key.peer_id, LEASE, CHAT, _proof(key), text=edited, ending=ending)
        assert outcome == "failed:text_hash_mismatch", ending
        assert LEASE not in verifying.evidence  # the consumer's word about what arrived: never disputed
        record = verifying.book.get(key.peer_id)
        assert record is not None and (record.failed, record.last_reason) == (1, "text_hash_mismatch")
    for ending in ERROR_FRAMES:
        # An honest provider whose write failed signs text that never left: compared in a drawn check only.
        verifying = _passed_before(key)
        outcome = await verifying.check(key.peer_id, LEASE, CHAT, _proof(key), text=TEXT + "!", ending=ending)
        assert outcome == "unverifiable", ending
    # A proof whose signature is not the provider's (anyone could write one) stands in for no proof:
    # failed undrawn too.
    honest = _proof(key)
    forged = honest.commitment.model_copy(update={"sig": _proof(key, text="other").commitment.sig})
    verifying = _passed_before(key)
    unsigned = honest.model_copy(update={"commitment": forged})
    assert await verifying.check(key.peer_id, LEASE, CHAT, unsigned, text=TEXT) == "failed:unsigned_root"
    # The honest proof, its text as received, is left to the draw (no file here: unverifiable, as before).
    verifying = _passed_before(key)
    assert await verifying.check(key.peer_id, LEASE, CHAT, _proof(key), text=TEXT) == "unverifiable"


HONEST_CALLS = 20


async def test_a_provider_omitting_its_proof_or_signing_other_text_is_caught_undrawn_and_an_honest_one_never(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    cheat: dict[str, str] = {}  # provider peer id -> the cheat it plays now
    real_proof, real_see = serving.call_proof, CallRecorder.see

    def call_proof(recorder: Any, key: Any, *args: Any) -> Any:
        if cheat.get(key.peer_id) == "no_proof":
            return None  # its end frame goes without the proof its record promises
        return real_proof(recorder, key, *args)

    def see(self: CallRecorder, data: dict[str, Any]) -> dict[str, Any]:
        seen = real_see(self, data)
        if "text_hash" in cheat.values() and seen.get("text"):
            return {**seen, "text": seen["text"].upper() + "!"}  # streams other text than it hashed
        return seen

    monkeypatch.setattr(serving, "call_proof", call_proof)
    monkeypatch.setattr(CallRecorder, "see", see)
    models = {"models": (_spec(path),)}
    async with market_nodes([models, models, models]) as (nodes, _):
        consumer, honest, other = nodes
        market = consumer.market
        assert market.verifying.sample_rate == 0.02  # verify.sample_rate's default: drawn or not
        honest_id, other_id = str(honest.host.get_id()), str(other.host.get_id())
        lease = await market.open_lease(honest_id, "model:tiny", budget=10**9, duration_s=120)
        texts: list[str] = []

        async def collect(data: dict[str, Any]) -> None:
            texts.append(data.get("text", ""))

        # Each check the consumer runs: how the call ended, whether its proof hashes the text received.
        checks: list[tuple[CallEnding, bool, str]] = []
        real_check = market.verifying.check

        async def recording(provider: str, lease_id: str, body: dict[str, Any], proof: Any, **kwargs: Any) -> str:
            outcome = await real_check(provider, lease_id, body, proof, **kwargs)
            signed = proof.commitment.body.text_sha256 if proof is not None else None
            checks.append((kwargs.get("ending", CallEnding.END), signed == text_sha256(kwargs["text"]), outcome))
            return outcome

        market.verifying.check = recording  # type: ignore[method-assign]

        # An honest provider's calls: its first is drawn and passes; none of the next is ever flagged,
        # whichever way it ends.
        bodies = [
            CHAT,  # ended by max_tokens
            {**CHAT, "max_tokens": 1},
            {**CHAT, "temperature": 0.7, "seed": 3},
            {**CHAT, "temperature": 0.9},
            {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0},
        ]
        first = (await market.call(lease.lease_id, CHAT)).chunks
        reply = "".join(c.get("text", "") for c in first)
        for stop in (reply[2:4], reply[-3:], [reply[1:2], "zz"], "\n"):  # the stop scanner holds text back
            bodies.append({**CHAT, "stop": stop})
        calls, finishes = 1, set()
        while calls < HONEST_CALLS - 2:
            chunks = (await market.call(lease.lease_id, bodies[calls % len(bodies)])).chunks
            finishes |= {c["finish_reason"] for c in chunks if "finish_reason" in c}
            calls += 1
        assert finishes == {"length", "stop"}  # cut by max_tokens, and by stop strings
        with trio.CancelScope() as scope:  # this side cancels after the first chunk: unchecked, unflagged

            async def cancel(data: dict[str, Any]) -> None:
                scope.cancel()

            await market.stream_call(lease.lease_id, {**CHAT, "max_tokens": 64}, cancel)
        service = honest.market.services.get("model:tiny")
        with _pausing_after_text(service, ["pause"], trio.Event()), pytest.raises(ClawnodeError) as stalled:
            # It pauses past stall_s after its reply: the end frame that answers the cancel carries the
            # proof of what it streamed, its text hash compared on this call.
            await market.stream_call(lease.lease_id, CHAT, collect, stall_s=STALL_S)
        assert stalled.value.code == ErrorCode.TIMEOUT  # the stall's own error, not a failed check
        record = market.verifying.book.get(honest_id)
        assert record is not None and record.failed == 0 and record.passed >= 1
        assert calls + 2 == HONEST_CALLS
        # Every call but the one this side cancelled was checked, its proof hashing the text received: its
        # own end frame's (18), and the end frame that answered the cancel of the stalled one.
        endings = [ending for ending, _, _ in checks]
        assert endings == [CallEnding.END] * (HONEST_CALLS - 2) + [CallEnding.CANCELLED]
        assert all(hashed and outcome in ("passed", "skipped") for _, hashed, outcome in checks)

        # The same provider, its check passed, now omits its proof: caught on that very call.
        cheat[honest_id] = "no_proof"
        with pytest.raises(ClawnodeError) as caught:
            await market.call(lease.lease_id, CHAT)
        assert (caught.value.code, caught.value.reason) == (ErrorCode.FORBIDDEN, "verification_no_proof")
        record = market.verifying.book.get(honest_id)
        assert record is not None and (record.failed, record.last_reason) == (1, "no_proof")

        # Another provider passes its first (drawn) call, then streams other text than its proof hashes.
        other_lease = await market.open_lease(other_id, "model:tiny", budget=10**9, duration_s=60)
        await market.call(other_lease.lease_id, CHAT)
        record = market.verifying.book.get(other_id)
        assert record is not None and (record.passed, record.failed) == (1, 0)
        cheat[other_id] = "text_hash"
        owed = market.held[other_lease.lease_id].seen_units
        with pytest.raises(ClawnodeError) as caught:
            await market.call(other_lease.lease_id, CHAT)
        assert caught.value.reason == "verification_text_hash_mismatch"
        held = market.held.get(other_lease.lease_id)
        assert held is None or held.seen_units == owed  # the cheat's call is not owed
        record = market.verifying.book.get(other_id)
        assert record is not None and (record.failed, record.last_reason) == (1, "text_hash_mismatch")
