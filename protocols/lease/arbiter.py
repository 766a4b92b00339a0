"""``/clawnode/lease-dispute/1.0.0``: a lease's verification dispute, from the consumer's freeze to the
arbiter's resolution on chain (docs/verified-inference.md, "Disputes").

The consumer, after a failed check whose signed evidence it kept (``Verifying.evidence``), freezes the
lease's escrow (``dispute`` on chain), writes the dispute into its ledger and sends the package to the
escrow's arbiter (:class:`LeaseDisputeCase`). The arbiter (the node whose wallet the escrow names, and
that holds the file the proof names, by sha256) checks the case against the chain
(``protocols.machines.verify.lease_case_verdict``), re-runs the check on a worker thread
(``runtime.verify.spot.recheck``), lets ``protocols.machines.verify.arbitrate`` decide, resolves on
chain and tells both parties (:class:`LeaseDisputeOutcome`: the consumer in its reply, the provider in
a push). Each party records the split as the chain shows it (``resolution_split``; the ledger asserts
that the two parts add up to what was locked). An arbiter without the file answers
``E_NOT_FOUND arbiter_no_file`` and resolves nothing: the escrow stays frozen for a person.

Why the package binds the escrow: a lease's escrow id is its lease id (``lease_id_for``), the provider's
signed commitment names that lease, and the provider served it only after checking that the escrow pays
its wallet; so the arbiter needs no word of the consumer's about who the provider is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from protocols import lease_wire as w
from protocols.lease.base import ACK, PUSH_TIMEOUT_S, LeaseCore, log
from protocols.lease.verifying import prompt_ids
from protocols.machines.dispute import (
    MAX_RERUN_LEASES,
    MAX_RERUN_PEERS,
    MAX_RERUNS_PER_PEER,
    RERUN_WINDOW_S,
    ToldOutcomeFacts,
    case_intake_verdict,
    lease_rerun_verdict,
    receipt_ask_verdict,
    resume_case_action,
    resume_retry_delay,
    stale_ask_verdict,
    told_outcome_verdict,
)
from protocols.machines.verdict import Refusal, enforce
from protocols.machines.verify import (
    ArbitrationFacts,
    CheckFacts,
    LeaseCaseFacts,
    StaleFreezeFacts,
    check_verdict,
    consumer_dispute_verdict,
    lease_case_verdict,
    owed_total,
    rechecked_findings,
    stale_freeze_verdict,
)
from protocols.machines.verify import arbitrate as decide
from runtime.errors import ClawnodeError, ErrorCode
from runtime.ledger.dispute_cases import CaseRow
from runtime.ledger.receipts import LEASE_ID_PATTERN, SignedReceipt, verify_countersigned
from runtime.ledger.reruns import Bounds
from runtime.ledger.store import LEASE_NOT_DISPUTABLE
from runtime.verify.check import prefill_for
from runtime.verify.evidence import CommitmentBody, DisputePackage, package_binds, prompt_binds
from runtime.verify.spot import SpotCheck, recheck
from wire.framing import write_frame
from wire.peer_keys import ed25519_public_key
from wire.rpc import error_reply, request, serve_requests

DISPUTE_PROTOCOL = TProtocol("/clawnode/lease-dispute/1.0.0")
# A package holds at most 2^20 prompt ids, 2^16 tokens with their chunks and 4 MiB of text.
MAX_DISPUTE_FRAME = 16 * 1024 * 1024
DISPUTE_READ_TIMEOUT_S = 30.0
ARBITER_TIMEOUT_S = 120.0  # the consumer's wait for the arbiter: a re-run of the call plus two transactions
# A case is sent again after these waits while the arbiter is busy, unreachable or slow (then left).
CASE_RETRY_S = (2.0, 10.0, 60.0)
# Waits before reading a decided case's escrow again, while this node's chain has not shown it closed.
RECORD_RETRY_S = (1.0, 2.0, 5.0, 10.0)
CASE_RETRIED = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT})
RESUME_POLL_S = 0.5  # a restarted consumer's wait for its escrow chain before it sends kept cases again
MAX_CASES = 4  # cases an arbiter works on at once; more are refused busy (the consumer may send again)
MAX_OUTCOMES = 256  # outcomes kept in memory per node (the ledger keeps each party's)
# Dispute streams handled at once, and per peer: each may buffer a frame of up to 16 MiB before any
# check, so more are answered busy at once instead of read (at most 256 MiB of frames in memory).
# The escrows' arbiter peer (``DisputeRole.arbiter_peer``) is never refused: a flood of strangers must not
# keep it from the provider's countersigned receipt while it decides a case.
MAX_DISPUTE_STREAMS = 16
MAX_DISPUTE_STREAMS_PER_PEER = 2
_ADDRESS = r"^0x[0-9a-fA-F]{40}$"


class LeaseDisputeCase(BaseModel):
    """Consumer → arbiter: the frozen escrow (payer and lease id: a lease's escrow id is its id) and the
    evidence. ``owed_if_honest``: what the consumer's vouchers and the disputed call come to in all; if
    the evidence does not hold up, the provider ends with that in total (what it claimed before the
    freeze counts toward it; at most what was locked)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["lease_dispute_case"] = "lease_dispute_case"
    lease_id: str = Field(pattern=LEASE_ID_PATTERN)
    payer: str = Field(pattern=_ADDRESS)
    package: DisputePackage
    owed_if_honest: int = Field(ge=0, le=10**30)
    # The payer's EIP-191 signature of the escrow and owed_if_honest (``dispute_case_digest``): the payee can
    # freeze the escrow too, so the arbiter takes the case, and its figure, from the payer only.
    payer_sig: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")


class LeaseDisputeOutcome(BaseModel):
    """Arbiter → both parties: its decision and the resolving transaction (each party reads the split off
    the chain, not off this message)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["lease_dispute_outcome"] = "lease_dispute_outcome"
    lease_id: str = Field(pattern=LEASE_ID_PATTERN)
    payer: str = Field(pattern=_ADDRESS)
    outcome: Literal["refund", "reject", "undecided"]
    reason: str = Field(max_length=64)
    to_payee: int = Field(ge=0, le=10**30, description="wei of what was left, to the provider")
    tx_hash: str | None = Field(None, max_length=80)


class LeaseReceiptAsk(BaseModel):
    """Arbiter → provider, before paying it what is owed: its newest receipt the consumer countersigned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["lease_receipt_ask"] = "lease_receipt_ask"
    lease_id: str = Field(pattern=LEASE_ID_PATTERN)


class LeaseStaleFreeze(BaseModel):
    """Provider → arbiter: the lease's escrow is frozen and its payer sent no case by deadline + window;
    end the freeze paying what ``receipt`` (its newest, with the payer's voucher) says is owed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["lease_stale_freeze"] = "lease_stale_freeze"
    lease_id: str = Field(pattern=LEASE_ID_PATTERN)
    payer: str = Field(pattern=_ADDRESS)
    receipt: SignedReceipt


class LeaseReceiptAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["lease_receipt"] = "lease_receipt"
    receipt: SignedReceipt | None = None


DISPUTE_MESSAGES: TypeAdapter[Any] = TypeAdapter(
    LeaseDisputeCase | LeaseDisputeOutcome | LeaseReceiptAsk | LeaseStaleFreeze
)
OUTCOME = TypeAdapter(LeaseDisputeOutcome)
RECEIPT_ANSWER = TypeAdapter(LeaseReceiptAnswer)
RECEIPTS_SCANNED = 8  # the provider's newest receipts of a lease among which it finds the countersigned one
STALE_SWEEP_S = 600.0  # how often a provider looks for claims an escrow frozen without a case holds up
STALE_SCAN = 200  # claims held up by a freeze taken per sweep (the longest held first)
# What the arbiter's ledger keeps of its re-runs: as its memory does (runtime/ledger/reruns.py).
_RERUN_BOUNDS = Bounds(
    window_s=int(RERUN_WINDOW_S), max_leases=MAX_RERUN_LEASES, max_peers=MAX_RERUN_PEERS, per_peer=MAX_RERUNS_PER_PEER
)


class DisputeRole(LeaseCore):
    """Both ends of a lease's verification dispute: the consumer's freeze and case, the arbiter's
    decision, the provider's record of it. Mounted by ``handler.LeaseMarket``."""

    # Where the peer of the escrows' arbiter wallet comes from (the daemon's: ``escrow.arbiter_peer``, else on
    # escrow.mode auto the peer id the network profile names for this node's arbiter wallet). It is asked at
    # each use: the profile arrives after start and changes when the bootstrap restarts with a fresh chain.
    arbiter_peer_source: Callable[[], str] | None = None
    _arbiter_peer_pinned: str | None = None

    @property
    def arbiter_peer(self) -> str:
        """The peer of the escrows' arbiter wallet: where this node, as a consumer, sends its cases; as a
        provider, the only peer it shows its receipts to and whose outcomes it believes. "": none known, a
        failed check ends the lease without a dispute. A value assigned here wins over the source."""
        if self._arbiter_peer_pinned is not None:
            return self._arbiter_peer_pinned
        source = self.arbiter_peer_source
        return source() if source is not None else ""

    @arbiter_peer.setter
    def arbiter_peer(self, peer: str) -> None:
        self._arbiter_peer_pinned = peer

    @property
    def lease_disputes(self) -> dict[str, LeaseDisputeOutcome]:
        """Outcomes this node sent, received or was told, by lease (the most recent ``MAX_OUTCOMES``)."""
        kept: dict[str, LeaseDisputeOutcome] | None = getattr(self, "_lease_disputes", None)
        if kept is None:
            kept = {}
            self._lease_disputes = kept
        return kept

    def _keep_outcome(self, outcome: LeaseDisputeOutcome) -> None:
        self.lease_disputes[outcome.lease_id] = outcome
        while len(self.lease_disputes) > MAX_OUTCOMES:
            self.lease_disputes.pop(next(iter(self.lease_disputes)))

    def dispute_handler(self) -> Any:
        serve = serve_requests(self._handle_dispute, max_frame=MAX_DISPUTE_FRAME, read_timeout_s=DISPUTE_READ_TIMEOUT_S)
        by_peer: dict[str, int] = {}

        async def bounded(stream: INetStream) -> None:
            peer = str(stream.muxed_conn.peer_id)
            if peer == self.arbiter_peer:  # the escrows' arbiter asking for receipts, telling outcomes
                await serve(stream)
                return
            if sum(by_peer.values()) >= MAX_DISPUTE_STREAMS or by_peer.get(peer, 0) >= MAX_DISPUTE_STREAMS_PER_PEER:
                busy = ClawnodeError(ErrorCode.RATE_LIMITED, "too many dispute streams at once", "busy")
                self._failed("lease_dispute", busy)
                with trio.move_on_after(PUSH_TIMEOUT_S):
                    await write_frame(stream, error_reply(busy).model_dump_json().encode(), max_frame=MAX_DISPUTE_FRAME)
                with trio.move_on_after(1):
                    await stream.close()
                return
            by_peer[peer] = by_peer.get(peer, 0) + 1
            try:
                await serve(stream)
            finally:
                by_peer[peer] -= 1
                if not by_peer[peer]:
                    del by_peer[peer]

        return bounded

    async def _handle_dispute(self, frame: bytes, remote: ID) -> BaseModel:
        try:
            message = DISPUTE_MESSAGES.validate_json(frame)
            if isinstance(message, LeaseDisputeCase):
                return await self._arbitrate(message, str(remote))
            if isinstance(message, LeaseReceiptAsk):
                return await self._receipt_asked(message, str(remote))
            if isinstance(message, LeaseStaleFreeze):
                return await self._end_stale_freeze(message, str(remote))
            return await self._told_outcome(message, str(remote))
        except (ClawnodeError, ValidationError) as error:
            self._failed("lease_dispute", error)
            raise

    # ================= consumer =================

    async def dispute_lease(self, lease_id: str, call_units: int) -> LeaseDisputeOutcome | None:
        """After a failed check with signed evidence: freeze the lease's escrow (first: from then on the
        provider claims nothing, not even a receipt countersigned during the failed call), end the lease
        (the provider is told, the rest of the lock waits for the resolution), record the dispute and send
        the case to the arbiter; record the split the chain shows once it resolved. None when no dispute
        could be opened (no evidence, no escrow of its own, no arbiter known) or the arbiter decided
        nothing (the escrow stays frozen for a person). The signed case is written to the ledger before
        the freeze and kept until the arbiter answers: a consumer that restarts in between sends it
        again (:meth:`resume_cases`)."""
        held, package, client = self.held.get(lease_id), self.verifying.evidence.get(lease_id), self.escrow()
        arbiter_peer = self.arbiter_peer  # read once: the case goes where the verdict was asked about
        refusal = consumer_dispute_verdict(
            evidence=package is not None,
            escrowed=held is not None and held.escrow_id is not None and client is not None,
            channel=held is not None and held.channel_id is not None,
            arbiter_known=bool(arbiter_peer),
        )
        if isinstance(refusal, Refusal):
            log.info("lease %s: no dispute opened (%s)", lease_id[:12], refusal.reason)
            await self._revoke_quietly(lease_id)
            return None
        assert held is not None and held.escrow_id is not None and client is not None and package is not None
        payer, escrow_id, provider, arbiter = (
            client.account.address,
            held.escrow_id,
            held.grant.provider,
            arbiter_peer,
        )
        owed = min(10**30, held.committed + max(0, call_units) * held.grant.price_per_unit)
        signed = await client.chain.run(client.sign_dispute_case, escrow_id, owed)
        case = LeaseDisputeCase(
            lease_id=lease_id, payer=payer, package=package, owed_if_honest=owed, payer_sig="0x" + signed.hex()
        )
        await self._keep_case(case, provider, arbiter)
        try:
            await client.chain.run(client.dispute, payer, escrow_id)
        except Exception:
            await self._drop_unfrozen(client, case)
            raise
        finally:
            await self._revoke_quietly(lease_id)
        record = self.verifying.book.get(provider)
        await self.ledger.open_dispute(
            lease_id,
            opened_by=self.peer_id,
            reason=f"verification_{record.last_reason if record is not None else 'failed'}",
            idempotency_key=f"verify-dispute/{lease_id}",
        )
        log.warning("lease %s: escrow frozen, evidence sent to the arbiter", lease_id[:12])
        return await self._pursue(case, provider, arbiter)

    async def _pursue(self, case: LeaseDisputeCase, provider: str, arbiter: str) -> LeaseDisputeOutcome | None:
        """Send a frozen escrow's case to its arbiter and record what came of it; the kept case is
        forgotten once the arbiter answered (a decision or a refusal) or the chain shows it resolved."""
        lease_id, payer, escrow_id = case.lease_id, case.payer, bytes.fromhex(case.lease_id)
        outcome, answered = await self._send_case(case, arbiter)
        if outcome is None:
            # Lost on the way back, or refused: the chain still says whether the arbiter resolved it.
            if await self._record_resolution(lease_id, payer, escrow_id, opened_by=self.peer_id, reason="resolved"):
                self.verifying.evidence.pop(lease_id, None)
                await self._drop_case(lease_id)
                self.wake_settlement()
            elif answered:  # refused: frozen for a person, sending it again changes nothing
                await self._drop_case(lease_id)
            return None
        recorded = True  # an undecided case: frozen for a person, nothing to record, not sent again
        if outcome.outcome != "undecided":
            recorded = await self._record_decided(lease_id, payer, escrow_id, outcome.reason)
            self.verifying.evidence.pop(lease_id, None)
            self.wake_settlement()  # the refund waiting on the frozen escrow lands now
        if recorded:  # else kept: the next start records it from the chain (``resume_case_action``)
            await self._drop_case(lease_id)
        if outcome.outcome == "reject":  # not at fault: the failed check no longer leaves it out
            await self.verifying.overruled(provider, lease_id)
        elif outcome.outcome == "refund":
            self.verifying.confirmed(lease_id)
        self._keep_outcome(outcome)  # after the ledger has it
        return outcome

    async def _record_decided(self, lease_id: str, payer: str, escrow_id: bytes, reason: str) -> bool:
        """Record a decided case's resolution, trying again while the chain this node reads has not shown
        the escrow closed yet or a read fails (``RECORD_RETRY_S``); True once recorded, or where it never
        can be (the ledger takes no dispute on the lease: settled before a row was written)."""
        for delay in (*RECORD_RETRY_S, None):
            try:
                if await self._record_resolution(lease_id, payer, escrow_id, opened_by=self.peer_id, reason=reason):
                    return True
            except ClawnodeError as error:  # the outcome still counts for the provider's standing
                if error.reason == LEASE_NOT_DISPUTABLE:
                    log.warning("lease %s: the dispute's resolution cannot be recorded", lease_id[:12])
                    return True
                log.info("lease %s: the dispute's resolution not recorded yet (%s)", lease_id[:12], error.code)
            if delay is None:
                break
            await trio.sleep(delay)
        return False

    async def _keep_case(self, case: LeaseDisputeCase, provider: str, arbiter: str) -> None:
        row = CaseRow(case.lease_id, provider, arbiter, case.model_dump_json())
        try:
            await self.ledger.save_dispute_case(row)
        except Exception as error:  # noqa: BLE001 - a full disk: the case is still sent, only not again after a restart
            log.warning("lease %s: the dispute case was not kept (%s)", case.lease_id[:12], type(error).__name__)

    async def _drop_unfrozen(self, client: Any, case: LeaseDisputeCase) -> None:
        """The freeze was refused: the kept case goes unless the escrow is frozen all the same (another
        failed call of the lease froze it first); kept when the chain cannot say."""
        try:
            state = await client.chain.run(client.get, case.payer, bytes.fromhex(case.lease_id))
        except Exception:  # noqa: BLE001 - kept: the next start asks the chain again
            return
        if state.phase != "disputed":
            await self._drop_case(case.lease_id)

    async def _dispute_open(self, lease_id: str) -> bool:
        """Whether the ledger holds an open dispute of the lease (one this node opened at its freeze)."""
        return any(d.state == "dispute_open" for d in await self.ledger.disputes_of(lease_id))

    async def _drop_case(self, lease_id: str) -> None:
        try:
            await self.ledger.drop_dispute_case(lease_id)
        except Exception as error:  # noqa: BLE001 - kept: sent again at the next start, and answered again
            log.warning("lease %s: the answered case was not forgotten (%s)", lease_id[:12], type(error).__name__)

    async def resume_cases(self) -> None:
        """After a restart: each case kept and not yet answered is sent again while its escrow is frozen
        (frozen first when the freeze had not landed); one the chain shows resolved is recorded; the
        rest are forgotten (``resume_case_action``). Waits for the escrow chain; never raises. A case that
        fails (the chain or the disk failing, a freeze the chain refuses) is logged with its code and
        tried again after ``resume_retry_delay``, then left for the next start; it never holds up the
        cases after it."""
        try:
            rows = await self.ledger.dispute_cases()
        except Exception as error:  # noqa: BLE001 - the disk failing: the cases stay kept
            log.warning("dispute cases were not read (%s)", _code_of(error))
            return
        if not rows:
            return
        while (client := self.escrow()) is None:
            await trio.sleep(RESUME_POLL_S)
        failures = 0
        while rows:
            failed: list[CaseRow] = []
            for row in rows:
                try:
                    await self._resume_case(client, row)
                except Exception as error:  # noqa: BLE001 - this case only: the others go on
                    log.warning(
                        "lease %s: the kept dispute case was not resumed (%s)", row.lease_id[:12], _code_of(error)
                    )
                    failed.append(row)
            failures += 1
            delay = resume_retry_delay(failures) if failed else None
            if delay is None:
                if failed:
                    log.warning("%d kept dispute cases are left for the next start", len(failed))
                return
            await trio.sleep(delay)
            rows = failed

    async def _resume_case(self, client: Any, row: CaseRow) -> None:
        try:
            case = LeaseDisputeCase.model_validate_json(row.case_json)
        except ValidationError:
            await self._drop_case(row.lease_id)
            return
        escrow_id = _escrow_of(case.lease_id)
        ours = escrow_id is not None and case.payer.lower() == client.account.address.lower()
        phase, dispute_open = "none", False
        if escrow_id is not None and ours:
            phase = (await client.chain.run(client.get, case.payer, escrow_id)).phase
            dispute_open = phase == "closed" and await self._dispute_open(case.lease_id)
        action = resume_case_action(ours=ours, phase=phase, dispute_open=dispute_open)
        if action == "record":  # only where this node opened the dispute (its freeze landed and was written)
            assert escrow_id is not None
            await self._record_resolution(
                case.lease_id, case.payer, escrow_id, opened_by=self.peer_id, reason="resolved"
            )
        if action in ("drop", "record"):
            await self._drop_case(row.lease_id)
            return
        if action == "freeze_and_send":  # stopped before the freeze landed: freeze it now
            await client.chain.run(client.dispute, case.payer, escrow_id)
        # The dispute's row, written now if ``dispute_lease`` had not: a stop after the freeze landed but
        # before it wrote the row left none, and once the arbiter's refund lets the lease settle, the
        # ledger takes no new dispute on it (its resolution would then go unrecorded).
        if not await self.ledger.disputes_of(case.lease_id):
            try:
                await self.ledger.open_dispute(
                    case.lease_id,
                    opened_by=self.peer_id,
                    reason="verification_failed",
                    idempotency_key=f"verify-dispute/{case.lease_id}",
                )
            except ClawnodeError as error:  # settled at the restart: nothing to record it into
                log.info("lease %s: dispute not recorded (%s)", case.lease_id[:12], error.reason)
        log.warning("lease %s: the dispute case kept before the restart is sent again", case.lease_id[:12])
        self._spawn(self._pursue, case, row.provider, row.arbiter_peer or self.arbiter_peer)

    async def _send_case(self, case: LeaseDisputeCase, arbiter_peer: str) -> tuple[LeaseDisputeOutcome | None, bool]:
        """The arbiter's decision, asked again after ``CASE_RETRY_S`` while it is busy, unreachable or slow,
        and whether it answered at all: (None, True) when it refused the case, (None, False) when it never
        answered."""
        arbiter = _peer(arbiter_peer)
        if arbiter is None:
            log.warning("escrow.arbiter_peer is not a peer id; the case is not sent")
            return None, False
        for delay in (*CASE_RETRY_S, None):
            try:
                outcome = await request(
                    self.host,
                    arbiter,
                    DISPUTE_PROTOCOL,
                    case,
                    OUTCOME,
                    timeout_s=ARBITER_TIMEOUT_S,
                    max_frame=MAX_DISPUTE_FRAME,
                )
                return outcome, True
            except ClawnodeError as error:
                # case_in_progress: our earlier send timed out while the arbiter went on deciding it; its
                # decision is still to come, so asking again is waiting for it, not a refusal.
                retried = error.code in CASE_RETRIED or error.reason == "case_in_progress"
                if delay is None or not retried:
                    log.warning(
                        "lease %s: the arbiter did not decide (%s %s)", case.lease_id[:12], error.code, error.reason
                    )
                    return None, not retried
                log.info(
                    "lease %s: the arbiter answered %s; asking again in %.0f s", case.lease_id[:12], error.code, delay
                )
                await trio.sleep(delay)
        return None, False

    async def _revoke_quietly(self, lease_id: str) -> None:
        held = self.held.get(lease_id)
        if held is None or held.ended_reason is not None:
            return
        try:
            await self.revoke_held(lease_id)
        except ClawnodeError as error:  # ended meanwhile (the provider's notice, its escrow seen frozen)
            log.info("lease %s: not revoked (%s)", lease_id[:12], error.code)

    # ================= arbiter =================

    def _deciding(self) -> set[str]:
        """The lease ids whose case (or freeze without one) this arbiter is deciding (at most ``MAX_CASES``)."""
        cases: set[str] = getattr(self, "_cases", set())
        self._cases = cases
        return cases

    async def _arbitrate(self, case: LeaseDisputeCase, consumer: str) -> LeaseDisputeOutcome:
        client, cases, escrow_id = self.escrow(), self._deciding(), _escrow_of(case.lease_id)
        enforce(
            case_intake_verdict(
                chain=client is not None,
                lease_escrow=escrow_id is not None,
                in_progress=case.lease_id in cases,
                deciding=len(cases),
                limit=MAX_CASES,
            )
        )
        assert escrow_id is not None
        cases.add(case.lease_id)
        try:
            return await self._decide(client, case, escrow_id, consumer)
        finally:
            cases.discard(case.lease_id)

    async def _decide(
        self, client: Any, case: LeaseDisputeCase, escrow_id: bytes, consumer: str
    ) -> LeaseDisputeOutcome:
        from runtime.escrow.client import dispute_case_signer  # web3 is loaded once a chain is connected

        state = await client.chain.run(client.get, case.payer, escrow_id)
        package = case.package
        case_signer = await trio.to_thread.run_sync(
            dispute_case_signer,
            client.chain.chain_id,
            client.address,
            case.payer,
            escrow_id,
            case.owed_if_honest,
            case.payer_sig,
        )
        enforce(
            lease_case_verdict(
                LeaseCaseFacts(
                    lease_id=case.lease_id,
                    escrow_id="0x" + escrow_id.hex(),
                    package_lease=package.lease_id,
                    our_wallet=client.account.address,
                    escrow_arbiter=state.arbiter,
                    phase=state.phase,
                    threshold=state.threshold,
                    payer=case.payer,
                    case_signer=case_signer,
                )
            )
        )
        body = package.proof.commitment.body
        model = self.verifying.local_model(body.model_sha256) if self.verifying.local_model is not None else None
        await self._admit_rerun(case.lease_id, consumer, holds_file=model is not None)
        assert model is not None
        bound = await trio.to_thread.run_sync(package_binds, package, case.lease_id, body.provider, ed25519_public_key)
        spot: SpotCheck | None = None
        rechecked = await rerun_package(model, package) if bound else package
        if rechecked is not None:
            try:
                spot = await trio.to_thread.run_sync(_recheck, model.path, rechecked)
            except ValueError:  # longer than this arbiter's context
                spot = None
        verdict = check_verdict(_facts(spot, body))
        countersigned = 0
        if not (bound and verdict.outcome == "failed" and verdict.dispute):  # the provider may be owed
            countersigned = await self._countersigned(body.provider, consumer, case.lease_id, client, case.payer)
        owed = owed_total(case.owed_if_honest, countersigned)
        decision = decide(
            ArbitrationFacts(
                evidence_bound=bound,
                recheck=verdict,
                left=state.amount - state.released,
                owed_if_honest=max(0, owed - state.released),  # what it claimed before the freeze counts
            )
        )
        tx_hash: str | None = None
        if decision.outcome != "undecided":
            sent = await client.chain.run(client.resolve, case.payer, escrow_id, decision.to_payee)
            tx_hash = sent.tx_hash
        outcome = LeaseDisputeOutcome(
            lease_id=case.lease_id,
            payer=case.payer,
            outcome=decision.outcome,
            reason=decision.reason[:64],
            to_payee=decision.to_payee,
            tx_hash=tx_hash,
        )
        self._keep_outcome(outcome)
        log.warning("lease %s: dispute decided, %s (%s)", case.lease_id[:12], decision.outcome, decision.reason)
        if decision.outcome != "undecided":
            self._spawn(self._tell_provider, body.provider, outcome)
        return outcome

    async def _admit_rerun(self, lease_id: str, peer: str, *, holds_file: bool) -> None:
        """Count a re-run of the lease's case asked by ``peer``, or refuse it (``lease_rerun_verdict``): a case
        left undecided keeps its escrow frozen, and sending it again must not buy fresh re-runs without end.
        Counts are kept in memory (bounded) and written to the ledger before the re-run runs, so an arbiter
        that restarts reads them back instead of granting each lease its re-runs again; a ledger that cannot
        read or write them refuses the re-run (the consumer sends the case again later)."""
        async with self._rerun_lock():
            leases, peers = await self._rerun_counts()
            now = trio.current_time()
            recent = [at for at in peers.get(peer, []) if now - at < RERUN_WINDOW_S]
            reruns = leases.get(lease_id, 0)
            enforce(lease_rerun_verdict(lease_reruns=reruns, peer_reruns=len(recent), holds_file=holds_file))
            await self.ledger.count_rerun(lease_id, peer, reruns + 1, _RERUN_BOUNDS)
            leases.pop(lease_id, None)
            leases[lease_id] = reruns + 1
            peers.pop(peer, None)
            peers[peer] = [*recent, now]
            while len(leases) > MAX_RERUN_LEASES:
                leases.pop(next(iter(leases)))
            while len(peers) > MAX_RERUN_PEERS:
                peers.pop(next(iter(peers)))

    def _rerun_lock(self) -> trio.Lock:
        lock: trio.Lock | None = getattr(self, "_reruns_lock", None)
        if lock is None:
            lock = self._reruns_lock = trio.Lock()
        return lock

    async def _rerun_counts(self) -> tuple[dict[str, int], dict[str, list[float]]]:
        """The re-runs granted, by lease (least recently re-run first) and by peer (times, ``trio.current_time``),
        read back from the ledger at the first case after a start."""
        leases: dict[str, int] | None = getattr(self, "_reruns", None)
        peers: dict[str, list[float]] | None = getattr(self, "_reruns_by_peer", None)
        if leases is None or peers is None:
            saved = await self.ledger.dispute_reruns(_RERUN_BOUNDS)
            now = trio.current_time()
            leases, peers = dict(saved.leases), {}
            for peer, ago in saved.peers:
                peers.setdefault(peer, []).append(now - ago)
            self._reruns, self._reruns_by_peer = leases, peers
        return leases, peers

    async def _countersigned(self, provider: str, consumer: str, lease_id: str, client: Any, payer: str) -> int:
        """What the provider's newest countersigned receipt says is owed: one the case's sender
        countersigned, or one whose voucher the escrow's payer signed for exactly its amount (so a payer
        that sends its case from another peer id does not escape it); 0 when it has none, does not
        answer in time, or sends one that does not verify."""
        peer = _peer(provider)
        if peer is None:
            return 0
        try:
            answer = await request(
                self.host,
                peer,
                DISPUTE_PROTOCOL,
                LeaseReceiptAsk(lease_id=lease_id),
                RECEIPT_ANSWER,
                timeout_s=PUSH_TIMEOUT_S,
            )
        except ClawnodeError as error:
            log.info("lease %s: the provider sent no receipt (%s)", lease_id[:12], error.code)
            return 0
        receipt = answer.receipt
        if receipt is None or (receipt.body.lease_id, receipt.body.provider) != (lease_id, provider):
            return 0
        chain_id, contract = client.chain.chain_id, client.address
        owed = await trio.to_thread.run_sync(_receipt_owed, receipt, chain_id, contract, payer, consumer)
        return owed or 0

    async def _tell_provider(self, provider: str, outcome: LeaseDisputeOutcome) -> None:
        peer = _peer(provider)
        if peer is None:
            return
        try:
            await request(self.host, peer, DISPUTE_PROTOCOL, outcome, ACK, timeout_s=PUSH_TIMEOUT_S)
        except ClawnodeError as error:  # it sees the closed escrow when it claims all the same
            log.info("the provider of lease %s was not told the outcome (%s)", outcome.lease_id[:12], error.code)

    async def _end_stale_freeze(self, ask: LeaseStaleFreeze, sender: str) -> LeaseDisputeOutcome:
        """The payee's node asks to end a freeze its payer sent no case for (``stale_freeze_verdict``)."""
        client, cases, escrow_id = self.escrow(), self._deciding(), _escrow_of(ask.lease_id)
        deciding = ask.lease_id in cases
        enforce(
            case_intake_verdict(
                chain=client is not None,
                lease_escrow=escrow_id is not None,
                in_progress=deciding,
                deciding=len(cases),
                limit=MAX_CASES,
                stale=True,
            )
        )
        assert client is not None and escrow_id is not None
        if not deciding:
            cases.add(ask.lease_id)
        try:
            state = await client.chain.run(client.get, ask.payer, escrow_id)
            now = await client.chain.run(client.chain.now)
            vouched = await self._vouched(client, ask, sender)
            decision = stale_freeze_verdict(
                StaleFreezeFacts(
                    lease_id=ask.lease_id,
                    escrow_id="0x" + escrow_id.hex(),
                    our_wallet=client.account.address,
                    escrow_arbiter=state.arbiter,
                    phase=state.phase,
                    threshold=state.threshold,
                    amount=state.amount,
                    released=state.released,
                    deadline=state.deadline,
                    window=state.window,
                    chain_now=now,
                    deciding=deciding,
                    vouched=vouched,
                )
            )
            if isinstance(decision, Refusal):
                raise decision.error()
            sent = await client.chain.run(client.resolve, ask.payer, escrow_id, decision.to_payee)
        finally:
            if not deciding:
                cases.discard(ask.lease_id)
        outcome = LeaseDisputeOutcome(
            lease_id=ask.lease_id,
            payer=ask.payer,
            outcome="reject",
            reason=decision.reason,
            to_payee=decision.to_payee,
            tx_hash=sent.tx_hash,
        )
        self._keep_outcome(outcome)
        log.warning("lease %s: a freeze without a case ended, %d to the provider", ask.lease_id[:12], decision.to_payee)
        self._spawn(self._tell_provider, ask.receipt.body.consumer, outcome)  # the consumer records it too
        return outcome

    async def _vouched(self, client: Any, ask: LeaseStaleFreeze, sender: str) -> int | None:
        """The amount of the sender's receipt for this lease, countersigned and carrying the payer's
        voucher for exactly that amount on this escrow; None when it is not that."""
        body = ask.receipt.body
        if (body.lease_id, body.provider) != (ask.lease_id, sender):
            return None
        chain_id, contract = client.chain.chain_id, client.address
        return await trio.to_thread.run_sync(_receipt_owed, ask.receipt, chain_id, contract, ask.payer, None)

    # ================= provider =================

    async def end_stale_freeze(self, lease_id: str) -> LeaseDisputeOutcome:
        """Ask the escrows' arbiter to end the freeze of a lease we served whose payer sent no case by
        deadline + window, paying what the newest receipt with the payer's voucher says; the split is
        recorded as the chain shows it."""
        lease = await self.ledger.get_lease(lease_id)
        arbiter = _peer(self.arbiter_peer)
        served = lease.role == "provider" and lease.escrow is not None
        records = await self.ledger.list_receipts(lease_id, limit=RECEIPTS_SCANNED) if served else []
        vouched = [r for r in records if r.countersigned and r.receipt.voucher is not None]
        enforce(stale_ask_verdict(served=served, arbiter_known=arbiter is not None, vouched=bool(vouched)))
        assert lease.escrow is not None and arbiter is not None
        newest = max(vouched, key=lambda r: r.seq)
        ask = LeaseStaleFreeze(lease_id=lease_id, payer=lease.escrow.payer, receipt=newest.receipt)
        outcome = await request(
            self.host, arbiter, DISPUTE_PROTOCOL, ask, OUTCOME, timeout_s=ARBITER_TIMEOUT_S, max_frame=MAX_DISPUTE_FRAME
        )
        escrow_id = bytes.fromhex(lease.escrow.escrow_id.removeprefix("0x"))
        await self._record_resolution(
            lease_id, lease.escrow.payer, escrow_id, opened_by=lease.consumer, reason="no_case"
        )
        self._keep_outcome(outcome)
        self.wake_settlement()
        return outcome

    async def stale_freeze_sweep(self) -> None:
        """Every ``STALE_SWEEP_S``: each claim held up by a frozen escrow whose deadline + window has
        passed is taken to the arbiter (:meth:`end_stale_freeze`). Never raises."""
        while True:
            await trio.sleep(STALE_SWEEP_S)
            await self.stale_freeze_pass()

    async def stale_freeze_pass(self) -> int:
        """One sweep; the freezes it ended."""
        client = self.escrow()
        if client is None or not self.arbiter_peer:
            return 0
        ended = 0
        try:
            held = await self.ledger.claims_held_by_disputes(limit=STALE_SCAN)
        except Exception as error:  # noqa: BLE001 - the disk failing: the next sweep asks again
            log.warning("frozen escrows were not looked at (%s)", _code_of(error))
            return 0
        for lease_id in held:  # one that fails does not hold up the others
            try:
                ended += await self._end_if_stale(client, lease_id)
            except Exception as error:  # noqa: BLE001 - the chain or the arbiter failing: the next sweep asks again
                log.info("lease %s: the freeze was not ended (%s)", lease_id[:12], _code_of(error))
        return ended

    async def _end_if_stale(self, client: Any, lease_id: str) -> int:
        """1 when the lease's escrow was frozen past deadline + window and the arbiter ended the freeze."""
        lease = await self.ledger.get_lease(lease_id)
        if lease.role != "provider" or lease.escrow is None:
            return 0
        escrow_id = bytes.fromhex(lease.escrow.escrow_id.removeprefix("0x"))
        state = await client.chain.run(client.get, lease.escrow.payer, escrow_id)
        if state.phase != "disputed" or await client.chain.run(client.chain.now) <= state.deadline + state.window:
            return 0
        await self.end_stale_freeze(lease_id)
        return 1

    # ================= provider: told =================

    async def _told_outcome(self, outcome: LeaseDisputeOutcome, sender: str) -> w.Ack:
        """The arbiter says a lease we served was resolved (or, for a freeze that came with no case, a lease
        we held): record the split the chain shows, once ``told_outcome_verdict`` admits it (the message
        itself moves nothing, and a lease that closed without a dispute gets no dispute written)."""
        try:
            lease: Any = await self.ledger.get_lease(outcome.lease_id)
        except ClawnodeError as error:
            if error.code != ErrorCode.NOT_FOUND:
                raise
            lease = None
        known = lease is not None and lease.escrow is not None and lease.escrow.payer.lower() == outcome.payer.lower()
        client = self.escrow()
        phase, escrow_arbiter, threshold, resolved_by, dispute_open = "none", "", 0, None, False
        escrow_id = b""
        # A sender the rule refuses anyway (not the arbiter peer this node knows) costs no chain read
        # and no dispute scan: those facts are fetched only for a sender that may be heard.
        arbiter_peer = self.arbiter_peer  # read once: the filter and the rule judge the same peer
        heard = not arbiter_peer or sender == arbiter_peer
        if known and client is not None and heard:
            escrow_id = bytes.fromhex(lease.escrow.escrow_id.removeprefix("0x"))
            state = await client.chain.run(client.get, lease.escrow.payer, escrow_id)
            phase, escrow_arbiter, threshold = state.phase, state.arbiter, state.threshold
            if outcome.tx_hash is not None and phase == "closed":
                resolved_by = await client.chain.run(client.resolved_by, outcome.tx_hash, lease.escrow.payer, escrow_id)
            if lease.role != "provider":
                dispute_open = await self._dispute_open(outcome.lease_id)
        enforce(
            told_outcome_verdict(
                ToldOutcomeFacts(
                    known=known,
                    role=lease.role if known else "",
                    sender=sender,
                    arbiter_peer=arbiter_peer,
                    dispute_open=dispute_open,
                    phase=phase,
                    escrow_arbiter=escrow_arbiter,
                    threshold=threshold,
                    resolved_by=resolved_by,
                    chain=client is not None,
                )
            )
        )
        opened_by = lease.consumer if lease.role == "provider" else self.peer_id
        recorded = await self._record_resolution(
            outcome.lease_id, lease.escrow.payer, escrow_id, opened_by=opened_by, reason=outcome.reason
        )
        if not recorded:
            raise ClawnodeError(ErrorCode.CONFLICT, "the escrow is not resolved on chain", "not_resolved")
        if lease.role != "provider":  # a case kept for it is answered: the escrow is closed
            self.verifying.evidence.pop(outcome.lease_id, None)
            await self._drop_case(outcome.lease_id)
        self._keep_outcome(outcome)
        self.wake_settlement()
        return w.Ack()

    async def _receipt_asked(self, ask: LeaseReceiptAsk, sender: str) -> LeaseReceiptAnswer:
        """The arbiter of a disputed lease we serve asks what the consumer countersigned: our newest
        receipt with its countersignature, for the escrows' arbiter peer only (``receipt_ask_verdict``:
        anyone else, who may read the lease id off the chain, is refused as for a lease we never served,
        before any ledger read)."""
        served, arbiter_peer = False, self.arbiter_peer  # read once: the lookup and the rule judge the same peer
        if arbiter_peer and sender == arbiter_peer:
            try:
                served = (await self.ledger.get_lease(ask.lease_id)).role == "provider"
            except ClawnodeError as error:
                if error.code != ErrorCode.NOT_FOUND:
                    raise
        enforce(receipt_ask_verdict(served=served, sender=sender, arbiter_peer=arbiter_peer))
        records = await self.ledger.list_receipts(ask.lease_id, limit=RECEIPTS_SCANNED)
        signed = [r for r in records if r.countersigned]
        newest = max(signed, key=lambda r: r.seq) if signed else None
        return LeaseReceiptAnswer(receipt=newest.receipt if newest is not None else None)

    # ================= both parties =================

    async def _record_resolution(
        self, lease_id: str, payer: str, escrow_id: bytes, *, opened_by: str, reason: str
    ) -> bool:
        """Write the dispute and its split, as the chain shows the closed escrow, into this node's ledger
        (once: idempotent). False while the escrow is not closed."""
        client = self.escrow()
        if client is None:
            return False
        state = await client.chain.run(client.get, payer, escrow_id)
        if state.phase != "closed":
            return False
        try:  # the consumer opened it at the freeze; the provider learns of it here
            key = f"verify-told/{lease_id}"
            dispute = await self.ledger.open_dispute(
                lease_id, opened_by=opened_by, reason=f"verification_{reason}", idempotency_key=key
            )
        except ClawnodeError as error:
            if error.reason != LEASE_NOT_DISPUTABLE:
                raise
            found = next(iter(await self.ledger.disputes_of(lease_id)), None)
            if found is None:
                raise
            dispute = found
        if dispute.state != "dispute_open":
            return True
        # The escrow is closed: released is the payee's total, the rest went back to the payer.
        to_payee, to_payer = state.released, state.amount - state.released
        await self.ledger.resolve_dispute(
            dispute.dispute_id, to_payee=to_payee, to_payer=to_payer, idempotency_key=f"verify-resolve/{lease_id}"
        )
        log.info("lease %s: dispute resolved, %d to the provider, %d back", lease_id[:12], to_payee, to_payer)
        return True


def _receipt_owed(receipt: SignedReceipt, chain_id: int, contract: str, payer: str, consumer: str | None) -> int | None:
    """What a provider's receipt of a lease says is owed, when it holds (blocking: a few ms of signature
    checks, run on a worker thread): countersigned, and either countersigned by ``consumer`` or carrying
    the escrow payer's voucher for exactly its amount on the lease's escrow; None when it does not."""
    body = receipt.body
    try:
        verify_countersigned(receipt, ed25519_public_key)
    except ClawnodeError:
        return None
    if consumer is not None and body.consumer == consumer:
        return body.amount
    if receipt.voucher is None:
        return None
    from runtime.escrow.client import voucher_signer  # web3 is loaded once a chain is connected

    signer = voucher_signer(chain_id, contract, payer, bytes.fromhex(body.lease_id), body.amount, receipt.voucher)
    return body.amount if signer is not None and signer.lower() == payer.lower() else None


def _escrow_of(lease_id: str) -> bytes | None:
    """The escrow id of a lease that has one of its own (its id is the escrow's, ``lease_id_for``)."""
    return bytes.fromhex(lease_id) if re.fullmatch(r"[0-9a-f]{64}", lease_id) else None


def _code_of(error: BaseException) -> str:
    """An error's stable code and reason for a log line (the type alone for one without a code)."""
    if isinstance(error, ClawnodeError):
        return f"{error.code} {error.reason}"
    return f"{ErrorCode.INTERNAL} {type(error).__name__}"


def _peer(text: str) -> ID | None:
    try:
        return ID.from_base58(text)
    except Exception:  # noqa: BLE001 - base58 and multihash errors come in several types
        return None


async def rerun_package(model: Any, package: DisputePackage) -> DisputePackage | None:
    """The package to re-run: for a v4 body, with the prompt as this arbiter's copy of the file renders
    the request the provider signed it received, in the chat format it signed it rendered with (the
    re-run then fails a signed prompt that is not
    that rendering: another tokenizer's, or a shortened one); where it cannot render the request,
    the package's own ids if they are the signed prompt, else None (not decided here). Earlier
    bodies bind no request: the package's ids, which ``package_binds`` bound to the signed prompt."""
    if package.proof.commitment.body.v < 4 or package.request is None:
        return package
    signed = package.proof.commitment.body
    rendered = await prompt_ids(model, package.request, signed.prompt_tokens, signed.chat_format)
    if rendered is None:
        return package if prompt_binds(package) else None
    return package.model_copy(update={"prompt_ids": rendered})


def _recheck(path: Any, package: DisputePackage) -> SpotCheck:
    prefill, tolerances = prefill_for(path)
    return recheck(prefill, package, ed25519_public_key, tolerances)


def _facts(spot: SpotCheck | None, body: CommitmentBody) -> CheckFacts:
    """The arbiter's re-run as ``check_verdict`` reads it (None: it could not run: unverifiable), its
    finding counted as the signed ``seeded`` flag allows (``rechecked_findings``: ``too_greedy`` only
    where the provider signed the draws its own)."""
    version, seeded = body.v, body.seeded
    if spot is None:
        return CheckFacts(True, True, True, holds_file=False, body_version=version, signed_seeded=seeded)
    return CheckFacts(
        root_signed=spot.root_signed,
        answered=True,
        openings_match=spot.openings_match,
        holds_file=True,
        prompt_matches=spot.prompt_matches,
        findings_reason=rechecked_findings(spot.findings.reason(), seeded) if spot.findings is not None else "",
        text_matches=spot.text_matches,
        prompt_hash_matches=spot.prompt_hash_matches,
        text_hash_matches=spot.text_hash_matches,
        body_version=version,
        signed_seeded=seeded,
    )
