"""Leased verifiers (issue 21): a consumer that holds no copy of the model checks a call through a node
leased for ``verify:<sha256>`` on the same market. Real nodes on one chain: a consumer with no model; a
provider that advertises one tiny model's file while serving another (and sells checks of that file
too, cheaper than anyone: it must never be asked to check itself); an honest node holding the file that
sells checks; and the escrows' arbiter with its own copy. The cheat is caught on its first call through
the leased verifier, exactly as by the consumer's own check: refused, the lease ended, the signed
evidence sent to the arbiter, which refunds everything; the verifier is paid for the tokens it checked.

A cheat's accomplice sells checks of the advertised file too, more cheaply than the honest node, while it
holds the cheat's file (so it always answers passed). Verifiers are picked at random, weighted by their
standing, not cheapest first; when the accomplice is drawn first its pass goes to a second opinion from
the honest verifier: the two disagree, both lose standing, and the call is left unchecked (not counted
as a pass, not refused)."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import trio

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from node.config import VerifySection
from protocols.lease.verifier import RemoteVerifier, verify_capability
from runtime.errors import ClawnodeError
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.identity import claim_identity
from tests.support.market import SharedChain, market_nodes, wait_for

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 8, "temperature": 0}
BUDGET = 10**9


class Draws(random.Random):
    """The consumer's draws, queued by the test (0.0 once the queue is empty)."""

    def __init__(self) -> None:
        super().__init__(0)
        self.queue: list[float] = []

    def random(self) -> float:
        return self.queue.pop(0) if self.queue else 0.0


def _claim(path: Path, sha256: str) -> None:
    claim_identity(path, sha256)


def _spec(path: Path) -> ModelSpec:
    return ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]


async def test_a_consumer_without_the_file_catches_a_substitute_through_a_leased_verifier(tmp_path: Path) -> None:
    advertised = write_tiny_llama_gguf(tmp_path / "advertised.gguf", seed=0)
    substitute = write_tiny_llama_gguf(tmp_path / "substitute.gguf", seed=1)
    arbiter_copy = write_tiny_llama_gguf(tmp_path / "arbiter.gguf", seed=0)
    accomplice_copy = write_tiny_llama_gguf(tmp_path / "accomplice.gguf", seed=1)  # the cheat's file
    sha256 = hashlib.sha256(advertised.read_bytes()).hexdigest()
    _claim(substitute, sha256)  # the cheat's claim
    _claim(accomplice_copy, sha256)

    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [
        {},  # the consumer: no model at all
        {"models": (_spec(substitute),), "verify": VerifySection(serve=True, price_per_token=1)},  # type: ignore[call-arg]
        {"models": (_spec(advertised),), "verify": VerifySection(serve=True, price_per_token=500)},  # type: ignore[call-arg]
        {"wallet_key": shared.arbiter.key.hex(), "models": (_spec(arbiter_copy),)},  # the escrows' arbiter
        {"models": (_spec(accomplice_copy),), "verify": VerifySection(serve=True, price_per_token=2)},  # type: ignore[call-arg]
    ]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        consumer, cheat, verifier, arbiter, accomplice = nodes
        cheat_id, verifier_id = str(cheat.host.get_id()), str(verifier.host.get_id())
        accomplice_id = str(accomplice.host.get_id())
        verifying = consumer.market.verifying
        draws = Draws()
        verifying.rng = draws
        # The pick's pool is sorted by peer id: a draw of 0.0 takes the first, 0.999 the last.
        honest_first, accomplice_first = (0.999, 0.0) if accomplice_id < verifier_id else (0.0, 0.999)
        consumer.market.arbiter_peer = str(arbiter.host.get_id())
        assert consumer.model_host.sha256s == {}
        remote = consumer.market.verifying.remote
        assert isinstance(remote, RemoteVerifier)

        # A lookup the consumer's first drawn call would start in the background, waited for here:
        # both have published their verify:<sha256> records.
        with trio.fail_after(20):
            while {o.peer_id for o in await remote.look_up(sha256)} != {cheat_id, verifier_id, accomplice_id}:
                await trio.sleep(0.05)
        draws.queue = [honest_first]
        lease = await consumer.market.open_lease(cheat_id, "model:tiny", budget=BUDGET, duration_s=60)
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.call(lease.lease_id, CHAT)
        reason = caught.value.reason or ""
        assert reason.startswith("verification_") and reason != "verification_model_mismatch"
        record = consumer.market.verifying.book.get(cheat_id)
        assert record is not None and record.failed == 1 and record.passed == 0

        # The verifier drawn, not the cheaper cheat, checked it, and was paid by the token checked.
        sold = [v for v in verifier.market.leases() if v.capability == verify_capability(sha256)]
        assert len(sold) == 1 and sold[0].consumer == str(consumer.host.get_id()) and sold[0].units > 0
        assert remote.spent_units == sold[0].units
        assert not [v for v in cheat.market.leases() if v.capability.startswith("verify:")]

        # The same consequences as the consumer's own check: the lease ends, the escrow is frozen and the
        # arbiter, re-running the check on its own copy of the file, sends everything back.
        await wait_for(lambda: lease.lease_id in consumer.market.lease_disputes, 20, "the arbiter's decision")
        decided = consumer.market.lease_disputes[lease.lease_id]
        assert decided.outcome == "refund" and decided.to_payee == 0
        assert not any(v.lease_id == lease.lease_id and v.state == "active" for v in consumer.market.leases())

        # The accomplice drawn first passes the (already doubted) cheat; the honest verifier, asked for a
        # second opinion, fails it: neither's word is taken, both lose standing, the call is not refused.
        verifying.second_opinion_rate = 1.0
        draws.queue = [accomplice_first, 0.5, 0.0, 0.0]  # pick, the rest of the order, second opinion, its pick
        second = await consumer.market.open_lease(cheat_id, "model:tiny", budget=BUDGET, duration_s=60)
        result = await consumer.market.call(second.lease_id, CHAT)
        assert result.units > 0
        record = consumer.market.verifying.book.get(cheat_id)
        assert record is not None and (record.passed, record.failed, record.unverifiable) == (0, 1, 1)
        honest, liar = verifying.verifiers.get(verifier_id), verifying.verifiers.get(accomplice_id)
        assert honest is not None and liar is not None and honest.disagreed == liar.disagreed == 1
        assert honest.agreed == 1  # the arbiter's refund confirmed its first answer
        sold = [v for v in accomplice.market.leases() if v.capability == verify_capability(sha256)]
        assert len(sold) == 1 and sold[0].units > 0
        assert len([v for v in verifier.market.leases() if v.capability == verify_capability(sha256)]) == 2
