"""A panel member's side of a disputed task (``k`` arbiters, threshold ``m``, named at publication):
vote a split with a signed vote, hear the other members' votes, and send the decided split on chain
once ``m`` votes agree. The rules: ``protocols.machines.task_panel`` (``tally``, ``vote_verdict``,
``vote_notice_verdict``, ``panel_lock_verdict``); the escrow contract's ``resolve_by_panel`` counts
the same signatures again.

* The task's params name the panel (``SandboxTerms.panel``: each member's peer id and wallet, and
  ``m``); the creator locks the price with ``lock_panel`` (no single arbiter: the announcement's
  arbiter wallet is the zero address, its arbiter peer the first member, who also takes evidence).
* A dispute goes to every member (``DisputeCase``). A member re-runs the program as a single arbiter
  would (``runner.RunnerRole``) and votes what ``rerun_verdict`` decides, or abstains when it could
  not decide; a person at a member that abstained (or on a task that asks for people) votes a split
  by hand with :meth:`PanelRole.vote`. A member's split is final, as on chain only agreeing
  signatures count.
* A vote is a :class:`~protocols.task_wire.VoteNotice` sealed with the member's peer key, carrying its
  wallet's signature of the contract's vote digest; it goes to the other members and both parties.
* Once ``m`` counted votes name one split, the members holding them send ``resolve_by_panel`` (the
  first agreeing member at once, the others later, and only while the chain still shows the escrow
  disputed). Both parties close out from the chain as after a single arbiter's resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from dht.records import CapabilityRecord
from protocols import task_wire as w
from protocols.machines import task as m
from protocols.machines import task_panel as rules
from protocols.machines.verdict import Refusal, enforce
from protocols.task.base import TaskCore, TaskLocal, checked_evidence, log
from runtime.errors import ClawnodeError, ErrorCode
from runtime.sandbox import Limits
from wire.signed import open_base64, seal, to_base64

ZERO_WALLET = "0x" + "0" * 40
# Members after the first agreeing one wait this long per place before sending the decided split.
SEND_STAGGER_S = 2.0


def panel_candidate(record: CapabilityRecord) -> rules.PanelCandidate | None:
    """An arbiter as its (verified) capability record states it; None for a record that runs no sandboxed kind."""
    offer = record.sandbox
    if offer is None:
        return None
    return rules.PanelCandidate(
        peer=record.peer_id,
        wallet=record.wallet.address,
        kinds=frozenset(offer.kinds),
        max_fuel=offer.max_fuel,
        max_memory_bytes=offer.max_memory_mb * 1024 * 1024,
        max_wall_s=float(offer.max_wall_s),
        max_output_bytes=offer.max_output_bytes,
        max_module_bytes=offer.max_module_bytes,
    )


def draw_panel(
    records: Sequence[CapabilityRecord],
    kind: str,
    limits: Limits,
    module_size: int,
    size: int,
    threshold: int,
    parties: Sequence[str] = (),
) -> w.PanelTerms:
    """A panel of ``size`` arbiters able to re-run the task, drawn from ``records`` in their order
    (``task_panel.draw_panel``; ``E_NOT_FOUND`` ``panel_short`` when fewer are able)."""
    candidates = [c for c in map(panel_candidate, records) if c is not None]
    needs = rules.RunNeeds(kind, limits.fuel, limits.memory_bytes, limits.wall_s, limits.output_bytes, module_size)
    drawn = rules.draw_panel(candidates, needs, size, threshold, parties)
    if isinstance(drawn, Refusal):
        raise drawn.error()
    return w.PanelTerms(members=[w.PanelMember(peer=c.peer, wallet=c.wallet) for c in drawn], threshold=threshold)


class PanelRole(TaskCore):
    def _panel_facts(self, local: TaskLocal, panel: w.PanelTerms) -> rules.PanelFacts:
        award = self._award_of(local)
        return rules.PanelFacts(panel.peers, panel.threshold, award.price)

    def _panel_view(self, local: TaskLocal) -> dict[str, Any]:
        panel = self._panel_of(local)
        if panel is None:
            return {}
        view: dict[str, Any] = {"panel": panel}
        if local.award is not None:
            verdict = self._tally(local, panel)
            view |= {"panel_votes": verdict.votes, "panel_state": verdict.state}
        return view

    def undecided_panels(self) -> dict[str, int]:
        """Disputed tasks this node knows whose panel has not decided, by the panel's state (``open``: votes
        missing, ``needs_person``, ``deadlocked``): the contract pays out only on ``m`` agreeing votes, so
        their escrow stays locked until the members vote (``clawnode_task_panels_undecided``)."""
        counts = {"open": 0, "needs_person": 0, "deadlocked": 0}
        for task_id, record in self.book.tasks.items():
            local = self.local.get(task_id)
            panel = self._panel_of(local) if local is not None else None
            if panel is None or local is None or local.award is None or record.dispute is None:
                continue
            if record.dispute.state != m.DisputeState.OPEN:
                continue
            state = self._tally(local, panel).state
            if state in counts:
                counts[state] += 1
        return counts

    def _tally(self, local: TaskLocal, panel: w.PanelTerms) -> rules.PanelVerdict:
        votes = [rules.Vote(notice.voter, notice.to_bidder) for notice, _ in local.votes.values()]
        return rules.tally(self._panel_facts(local, panel), votes)

    async def _check_panel_lock(self, notice: w.AwardNotice, panel: w.PanelTerms, creator: str) -> None:
        """The seller, before accepting an award: the panel is one it may be judged by, locked on chain."""
        members = [(m.peer, m.wallet) for m in panel.members]
        enforce(rules.panel_terms_verdict(members, panel.threshold, (creator, self.peer_id)))
        client = self._client()
        payer, escrow_id = notice.lock.payer, bytes.fromhex(notice.lock.escrow_id[2:])
        state = await client.chain.run(client.get, payer, escrow_id)
        on_chain = await client.chain.run(client.panel_of, payer, escrow_id)
        wallets = [m.wallet for m in panel.members]
        enforce(rules.panel_lock_verdict(wallets, panel.threshold, state.arbiter, state.threshold, on_chain))

    def _panel_member_wallet(self, panel: w.PanelTerms) -> str:
        """This node's wallet on the panel (the case came to a member whose wallet the panel names)."""
        ours = self._client().account.address
        named = panel.wallet_of(self.peer_id)
        if named is None or named.lower() != ours.lower():
            raise ClawnodeError(ErrorCode.FORBIDDEN, "this node is not on the task's panel", "not_on_panel")
        return ours

    async def vote(self, task_id: str, to_bidder: int | None, reason: str = "by_hand") -> w.TaskView:
        """As a panel member: vote ``to_bidder`` of the price to the seller (``None``: abstain)."""
        record, local = self._task(task_id)
        panel = self._panel_of(local)
        if panel is None:
            raise ClawnodeError(ErrorCode.CONFLICT, "the task names no panel", "no_panel")
        if record.dispute is None:
            raise ClawnodeError(ErrorCode.CONFLICT, "the task has no dispute", "no_dispute")
        wallet = self._panel_member_wallet(panel)
        award = self._award_of(local)
        vote = rules.Vote(self.peer_id, to_bidder)
        counted = self._tally(local, panel).votes
        verdict = rules.vote_verdict(self._panel_facts(local, panel), counted, vote)
        if isinstance(verdict, Refusal):
            raise verdict.error()
        if verdict == "merged":
            return self._view(task_id)
        signature = ""
        if to_bidder is not None:
            client = self._client()
            escrow_id = bytes.fromhex(award.lock.escrow_id[2:])
            raw = await client.chain.run(client.sign_panel_vote, award.lock.payer, escrow_id, to_bidder)
            signature = "0x" + bytes(raw).hex()
        notice = w.VoteNotice(
            task_id=task_id,
            voter=self.peer_id,
            wallet=wallet,
            to_bidder=to_bidder,
            reason=reason,
            signature=signature,
            voted_at=int(self._now()),
        )
        envelope = to_base64(seal(notice, self.key, domain=w.VOTE_DOMAIN, payload_type=w.VOTE_TYPE))
        local.votes[self.peer_id] = (notice, envelope)
        log.info("task %s: panel vote %s (%s)", task_id[:12], "abstain" if to_bidder is None else to_bidder, reason)
        evidence, attachment = local.run_evidence or (None, b"")
        message = w.VoteRequest(
            envelope=envelope, evidence=evidence, attachment=to_base64(attachment) if attachment else ""
        )
        for peer in {*panel.peers, record.creator, award.bidder} - {self.peer_id}:
            self._spawn(self._push_quietly, peer, message)
        await self._after_vote(task_id)
        return self._view(task_id)

    async def _on_vote(self, message: w.VoteRequest, remote: str) -> None:
        """A vote from a member (to the other members and the parties): checked, counted once."""
        signer, payload = open_base64(message.envelope, domain=w.VOTE_DOMAIN, payload_type=w.VOTE_TYPE)
        notice = w.VoteNotice.model_validate_json(payload)
        _, local = self._task(notice.task_id)
        panel = self._panel_of(local)
        if panel is None:
            raise ClawnodeError(ErrorCode.CONFLICT, "the task names no panel", "no_panel")
        award = self._award_of(local)
        chain_signer: str | None = None
        if notice.signature and notice.to_bidder is not None:
            from runtime.escrow import client as escrow  # here: web3 is slow to import, and only votes need it

            chain_signer = await trio.to_thread.run_sync(
                lambda: escrow.panel_vote_signer(
                    award.chain_id,
                    award.contract,
                    award.lock.payer,
                    bytes.fromhex(award.lock.escrow_id[2:]),
                    notice.to_bidder or 0,
                    notice.signature,
                )
            )
        enforce(
            rules.vote_notice_verdict(
                rules.VoteFacts(
                    sealed_by=signer,
                    voter=notice.voter,
                    wallet=notice.wallet,
                    panel_wallet=panel.wallet_of(notice.voter),
                    abstains=notice.to_bidder is None,
                    has_signature=bool(notice.signature),
                    chain_signer=chain_signer,
                )
            )
        )
        counted = self._tally(local, panel).votes
        verdict = rules.vote_verdict(
            self._panel_facts(local, panel), counted, rules.Vote(notice.voter, notice.to_bidder)
        )
        if isinstance(verdict, Refusal):
            raise verdict.error()
        if verdict is None:
            local.votes[notice.voter] = (notice, message.envelope)
            self._wake(notice.task_id)
            self._spawn(self._after_vote, notice.task_id)
        if message.evidence is not None and remote == notice.voter:  # the member's re-run record, in our ledger
            piece, attachment = checked_evidence(message.evidence, message.attachment, remote)
            if piece.task_id != notice.task_id:
                raise ClawnodeError(
                    ErrorCode.INVALID_ARGUMENT, "the evidence is about another task", "case_mixes_tasks"
                )
            await self._keep_run_evidence(piece, message.evidence, attachment)

    async def _after_vote(self, task_id: str) -> None:
        """A member holding ``m`` agreeing votes sends them on chain (staggered by its place among them)."""
        record, local = self._task(task_id)
        panel = self._panel_of(local)
        assert panel is not None
        verdict = self._tally(local, panel)
        if verdict.state in ("needs_person", "deadlocked"):
            local.run_verdict = f"panel_{verdict.state}"
            log.warning("task %s: the panel is short of agreeing votes (%s)", task_id[:12], verdict.state)
            return
        if verdict.state != "decided" or local.panel_sent or panel.wallet_of(self.peer_id) is None:
            return
        assert verdict.to_bidder is not None
        agreeing = [p for p in panel.peers if verdict.votes.get(p) == verdict.to_bidder and p in local.votes]
        if self.peer_id not in agreeing:
            return  # the members who voted the split send it
        local.panel_sent = True
        await trio.sleep(SEND_STAGGER_S * agreeing.index(self.peer_id))
        award = self._award_of(local)
        client = self._client()
        escrow_id = bytes.fromhex(award.lock.escrow_id[2:])
        state = await self._escrow_state(award)
        if state.phase not in ("disputed", "closed"):
            # Votes that agree before anyone disputed decide nothing: the chain pays only a disputed
            # escrow, so recording a resolution here would leave this node's view apart from the chain.
            local.panel_sent = False
            log.warning("task %s: the panel agrees but the escrow is %s, not disputed", task_id[:12], state.phase)
            return
        if state.phase == "disputed":
            signatures = [bytes.fromhex(local.votes[p][0].signature[2:]) for p in agreeing[: panel.threshold]]
            try:
                await client.chain.run(
                    client.resolve_by_panel, award.lock.payer, escrow_id, verdict.to_bidder, signatures
                )
            except ClawnodeError as error:  # another member's transaction landed first
                state = await self._escrow_state(award)
                if state.phase != "closed":
                    local.panel_sent = False
                    raise
                log.info("task %s: the panel's split was already sent (%s)", task_id[:12], error.reason)
        price = award.price
        self._record_resolution(record, verdict.to_bidder, price - verdict.to_bidder)
        evidence, attachment = local.run_evidence or (None, b"")
        message = w.ResolutionRequest(
            task_id=task_id,
            to_bidder=verdict.to_bidder,
            to_creator=price - verdict.to_bidder,
            verdict=f"panel_{verdict.agreeing}_of_{len(panel.members)}",
            evidence=evidence,
            attachment=to_base64(attachment) if attachment else "",
        )
        async with trio.open_nursery() as nursery:
            for party in (record.creator, award.bidder):
                nursery.start_soon(self._push_quietly, party, message)
        if record.creator != self.peer_id and award.bidder != self.peer_id:
            local.closed, local.module = True, None
        log.info("task %s: the panel decided %d to the seller", task_id[:12], verdict.to_bidder)
