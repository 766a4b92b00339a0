"""A substitute that also bills its error frame past its own proof is disputed and refunded in full.

A provider serving another file than the one its record states (its proofs sign the advertised file's
sha256) fails the consumer's check with signed evidence: the consumer freezes the lease's escrow and the
arbiter, re-running the check on its own copy, refunds everything locked. The same provider billing its
error frame past the proof it carries (``end_frame_over_proof``) also ends the lease, which on its own is
revoked: the provider is told and the rest of the lock refunded. When both happen on one call the
revocation waits for that call's check and, the check having left signed evidence, leaves the escrow to
the dispute, which freezes it before it tells the provider. Before, the revocation was spawned before the
check ran: the provider was told the lease was over (and claimed what was countersigned) and the rest of
the lock queued for refund while the escrow was still unfrozen, racing the freeze that the failed check
asked for. With real nodes, a real escrow on the shared chain and the tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import trio

from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify import check
from tests.support.identity import claim_identity
from tests.support.market import SharedChain, market_nodes, wait_for
from tests.test_lease_inflated_tokens import _cheating
from tests.test_verify_dispute import CHAT, _escrow, _spec


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer's checks load the file for their prefill into a per-process cache: this module's
    go with its tests, not on to interpreter exit (where llama-cpp-python's ``__del__`` complains)."""
    monkeypatch.setattr(check, "_prefills", {})


async def test_a_substitute_billing_its_error_frame_past_its_proof_is_disputed_not_revoked(tmp_path: Path) -> None:
    advertised = write_tiny_llama_gguf(tmp_path / "advertised.gguf", seed=0)
    substitute = write_tiny_llama_gguf(tmp_path / "substitute.gguf", seed=1)
    arbiter_copy = write_tiny_llama_gguf(tmp_path / "arbiter.gguf", seed=0)
    # The cheat's record (and every commitment it signs) states the advertised file's sha256.
    claim_identity(substitute, advertised)

    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [
        {"models": (_spec(advertised),)},
        {"models": (_spec(substitute),)},
        {"wallet_key": shared.arbiter.key.hex(), "models": (_spec(arbiter_copy),)},
    ]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        consumer, cheat, arbiter = nodes
        market = consumer.market
        market.arbiter_peer = str(arbiter.host.get_id())  # escrow.arbiter_peer
        market.verifying.sample_rate = 1.0  # verify.sample_rate: the call is checked
        revoked: list[str] = []  # the escrow's phase on chain each time the consumer revoked the lease
        revoke = market.revoke_held

        async def revoke_held(lease_id: str) -> object:
            revoked.append((await _escrow(consumer, lease_id)).phase)
            return await revoke(lease_id)

        market.revoke_held = revoke_held  # type: ignore[method-assign,assignment]

        lease = await market.open_lease(str(cheat.host.get_id()), "model:tiny", budget=10**9, duration_s=60)
        lease_id = lease.lease_id
        locked = (await _escrow(consumer, lease_id)).amount
        assert locked > 0
        # The substitute streams its reply, then fails the call with an error frame billing 3 times the
        # tokens its proof commits.
        with _cheating(cheat.market, cheat.market.services.get("model:tiny"), "error"):
            with pytest.raises(ClawnodeError) as caught:
                await market.call(lease_id, CHAT)
        # Its check failed on the consumer's own copy of the advertised file: the caller is told so.
        assert caught.value.code == ErrorCode.FORBIDDEN and (caught.value.reason or "").startswith("verification_")
        assert market.failures[("call", ErrorCode.CONFLICT.value)] >= 1  # its bill was refused too

        # The escrow is frozen and the arbiter refunds everything locked; nothing was settled before it.
        await wait_for(lambda: lease_id in market.lease_disputes, 20, "the arbiter's decision")
        decided = market.lease_disputes[lease_id]
        assert decided.outcome == "refund" and decided.to_payee == 0 and decided.tx_hash
        state = await _escrow(consumer, lease_id)
        assert state.phase == "closed" and (state.amount, state.released) == (locked, 0)
        mine = {d.lease_id: d for d in await consumer.ledger.list_disputes()}[lease_id]
        assert mine.state == "dispute_resolved" and (mine.to_payee, mine.to_payer) == (0, locked)
        # The provider was told of no revocation before the freeze (one spawned by the refused bill, while
        # the check ran): the dispute's own, once frozen, or none.
        assert set(revoked) <= {"disputed"}, revoked
