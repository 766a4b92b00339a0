"""Sandboxed tasks (``wasm``, ``native``): publish a program by hash, serve it, run it on award, and
decide its dispute by re-running it. The rules: ``protocols.machines.task_run`` (``run_verdict``,
``module_request_verdict``, ``rerun_verdict``); the sandboxes: ``runtime.sandbox``.

* The creator publishes the program's sha256, size, input and limits in the task's params (their
  hash is in the signed announcement, the params ride in the signed award) and keeps the bytes.
* The awarded seller whose ``[sandbox]`` runs that kind within its caps fetches the program from the
  creator (``ModuleRequest``, size-capped, checked against the hash), runs it in its sandbox (a
  worker thread or a child process), and submits the output with its signed usage (fuel, outcome).
* The arbiter of a disputed sandboxed task fetches the program from either party, re-runs it under
  the same limits, and resolves on chain by ``rerun_verdict`` without a person; a program neither
  party serves within ``module_deadline_s`` (asked again every ``module_retry_s``) is withheld and
  the seller is paid (the creator's burden); when it cannot re-run otherwise (or the task says
  ``arbitration = "person"``) the dispute waits for ``resolve`` by hand.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Literal

import trio
from pydantic import TypeAdapter

from dht.records import CapabilityRecord
from protocols import task_wire as w
from protocols.machines import task_panel as panel_rules
from protocols.machines import task_run as rules
from protocols.machines.verdict import enforce
from protocols.task.arbiter import ArbiterRole
from protocols.task.base import PUSH_TIMEOUT_S, TASK_PROTOCOL, TaskLocal, log, parse_peer
from protocols.task.bidder import BidderRole
from protocols.task.creator import CreatorRole
from protocols.task.panel import ZERO_WALLET, PanelRole, draw_panel
from runtime.errors import ClawnodeError, ErrorCode
from runtime.sandbox import Limits, RunResult, sha256_hex
from wire.rpc import request
from wire.signed import from_base64, seal, to_base64

_MODULE_REPLY = TypeAdapter(w.ModuleReply)
_TERMS_REPLY = TypeAdapter(w.TermsReply)


class RunnerRole(CreatorRole, BidderRole, ArbiterRole, PanelRole):
    # How long (and how often) the arbiter asks the parties for a disputed task's program.
    module_deadline_s: float = rules.MODULE_DEADLINE_S
    module_retry_s: float = rules.MODULE_RETRY_S

    async def publish_run(
        self,
        capability: str,
        budget: int,
        deadline_s: int,
        *,
        kind: Literal["wasm", "native"],
        module: bytes,
        input: bytes = b"",
        limits: Limits | None = None,
        summary: str = "",
        arbiter_peer: str | None = None,
        arbiter_wallet: str | None = None,
        review_timeout_s: int = 600,
        arbitration: Literal["rerun", "person"] = "rerun",
        panel: w.PanelTerms | None = None,
        panel_from: Sequence[CapabilityRecord] | None = None,
        panel_size: int = 3,
        panel_threshold: int = 2,
    ) -> w.TaskView:
        """Publish a sandboxed task: the program by hash (this node keeps and serves it), input, limits;
        with a ``panel``, its ``k`` members judge a dispute and ``m`` agreeing votes pay out (no single arbiter).
        With ``panel_from`` (arbiters' verified capability records, in order of preference) and no ``panel``,
        the panel is the first ``panel_size`` of them able to re-run the task (``draw_panel``)."""
        if panel is None and panel_from is not None:
            needs = limits or Limits()
            panel = draw_panel(panel_from, kind, needs, len(module), panel_size, panel_threshold, (self.peer_id,))
        if panel is not None:
            members = [(member.peer, member.wallet) for member in panel.members]
            enforce(panel_rules.panel_terms_verdict(members, panel.threshold, (self.peer_id,)))
            arbiter_peer, arbiter_wallet = panel.members[0].peer, ZERO_WALLET  # the first member takes evidence
        if len(module) > w.MAX_MODULE:
            raise ClawnodeError(
                ErrorCode.INVALID_ARGUMENT, f"modules are at most {w.MAX_MODULE} bytes", "module_too_large"
            )
        if len(input) > w.MAX_RUN_INPUT:
            raise ClawnodeError(
                ErrorCode.INVALID_ARGUMENT, f"inputs are at most {w.MAX_RUN_INPUT} bytes", "input_too_large"
            )
        digest = sha256_hex(module)
        # Refuses a module (or program) no sandbox would run; compiling is a worker thread's job.
        await trio.to_thread.run_sync(self.sandbox.load, kind, module, digest)
        terms = w.SandboxTerms(
            kind=kind,
            module_sha256=digest,
            module_size=len(module),
            input_b64=base64.b64encode(input).decode(),
            limits=limits or Limits(),
            arbitration=arbitration,
            panel=panel,
        )
        view = await self.publish(
            capability,
            budget,
            deadline_s,
            summary=summary,
            params=terms.model_dump_json(),
            arbiter_peer=arbiter_peer,
            arbiter_wallet=arbiter_wallet,
            review_timeout_s=review_timeout_s,
        )
        self.local[view.task_id].module = module
        return self._view(view.task_id)

    def _rerun_decides(self, local: TaskLocal) -> bool:
        terms = self._terms_of(local)
        return terms is not None and terms.arbitration == "rerun"

    async def _on_terms(self, message: w.TermsRequest, remote: str) -> w.TermsReply:
        _, local = self._task(message.task_id)
        terms = w.sandbox_terms(local.params)
        if terms is None:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "the task names no sandboxed program", "no_sandbox_terms")
        return w.TermsReply(
            kind=terms.kind,
            module_sha256=terms.module_sha256,
            module_size=terms.module_size,
            limits=terms.limits,
            arbitration=terms.arbitration,
        )

    async def bid(self, task_id: str, price: int) -> w.BidView:
        """Bid on a task; a node that runs sandboxed tasks by itself first asks the creator for the
        task's sandbox terms and bids only on one it will run (``run_verdict``)."""
        record, _ = self._task(task_id)
        self._check_bid_arbiter(task_id)  # before asking the creator anything
        if self.sandbox.policy.auto_run:
            terms: w.TermsReply | None = None
            try:
                terms = await request(
                    self.host,
                    parse_peer(record.creator),
                    TASK_PROTOCOL,
                    w.TermsRequest(task_id=task_id),
                    _TERMS_REPLY,
                    timeout_s=PUSH_TIMEOUT_S,
                    max_frame=w.MAX_TASK_FRAME,
                )
            except ClawnodeError as error:
                if error.reason != "no_sandbox_terms":
                    raise
            if terms is not None:
                sandboxed = w.SandboxTerms(
                    kind=terms.kind,
                    module_sha256=terms.module_sha256,
                    module_size=terms.module_size,
                    limits=terms.limits,
                    arbitration=terms.arbitration,
                )
                enforce(rules.run_verdict(self._run_facts(sandboxed, automatic=True)))
        return await super().bid(task_id, price)

    async def _on_module(self, message: w.ModuleRequest, remote: str) -> w.ModuleReply:
        record, local = self._task(message.task_id)
        held = sha256_hex(local.module) if local.module is not None else None
        bidder = record.award.bidder if record.award is not None else None
        panel = self._panel_of(local)
        members = panel.peers if panel is not None else ()
        enforce(
            rules.module_request_verdict(remote, record.creator, bidder, record.arbiter, held, message.sha256, members)
        )
        assert local.module is not None
        return w.ModuleReply(module=to_base64(local.module))

    async def _fetch_module(self, task_id: str, terms: w.SandboxTerms, holders: list[str]) -> bytes | None:
        """The program from the first holder that serves the named bytes."""
        for holder in holders:
            if holder == self.peer_id:
                continue
            try:
                peer = parse_peer(holder)
                await self._reachable(peer)
                reply = await request(
                    self.host,
                    peer,
                    TASK_PROTOCOL,
                    w.ModuleRequest(task_id=task_id, sha256=terms.module_sha256),
                    _MODULE_REPLY,
                    timeout_s=PUSH_TIMEOUT_S,
                    max_frame=w.MAX_TASK_FRAME,
                )
                module = from_base64(reply.module)
            except ClawnodeError as error:
                log.info("task %s: module not fetched from %s: %s", task_id[:12], holder[:16], error.code)
                continue
            if len(module) == terms.module_size and sha256_hex(module) == terms.module_sha256:
                return module
            log.warning("task %s: %s served another module than the task names", task_id[:12], holder[:16])
        return None

    async def _await_module(self, task_id: str, terms: w.SandboxTerms, holders: list[str]) -> bytes | None:
        """As the arbiter: ask the parties for the program until one serves it or the deadline passes
        (``module_wait_verdict``); None: withheld."""
        started = trio.current_time()
        while True:
            module = await self._fetch_module(task_id, terms, holders)
            if module is not None:
                return module
            waited = trio.current_time() - started
            if rules.module_wait_verdict(waited, self.module_deadline_s) == "withheld":
                log.warning("task %s: no party served the program in %.0f s: withheld", task_id[:12], waited)
                return None
            await trio.sleep(min(self.module_retry_s, self.module_deadline_s - waited))

    def _run_facts(self, terms: w.SandboxTerms, automatic: bool) -> rules.RunFacts:
        policy = self.sandbox.policy
        return rules.RunFacts(
            kind=terms.kind,
            accepted=self.sandbox.accepts(terms.kind),
            automatic=automatic,
            within_caps=terms.limits.within(policy.cap),
            module_size_ok=terms.module_size <= policy.max_module_bytes,
        )

    async def _run_terms(self, terms: w.SandboxTerms, module: bytes, salt: bytes = b"") -> RunResult:
        digest = await trio.to_thread.run_sync(self.sandbox.load, terms.kind, module, terms.module_sha256)
        data = base64.b64decode(terms.input_b64)
        return await self.sandbox.run(terms.kind, digest, data, terms.limits, salt=salt)

    # -- the seller --

    def _after_award(self, task_id: str) -> None:
        _, local = self._task(task_id)
        if w.sandbox_terms(local.params) is not None:
            self._spawn(self._execute, task_id)

    async def _execute(self, task_id: str) -> None:
        record, local = self._task(task_id)
        terms = w.sandbox_terms(local.params)
        assert terms is not None
        refusal = rules.run_verdict(self._run_facts(terms, self.sandbox.policy.auto_run))
        if refusal is not None:
            if refusal.reason != "not_automatic":
                self.sandbox.stats.refused(terms.kind, refusal.reason)
            log.info("task %s not run here: %s", task_id[:12], refusal.reason)
            return
        module = local.module or await self._fetch_module(task_id, terms, [record.creator])
        if module is None:
            log.warning("task %s: the module could not be fetched", task_id[:12])
            return
        local.module = module  # served to the arbiter should the result be disputed
        try:
            result = await self._run_terms(terms, module)
        except ClawnodeError as error:  # refused, or killed by the wall clock: nothing to submit
            log.warning("task %s: the run was refused: %s %s", task_id[:12], error.code, error.reason)
            return
        usage = w.RunUsage(fuel_used=result.fuel_used, outcome=str(result.outcome), exit_code=result.exit_code)
        await self.submit(task_id, result.output, usage)
        log.info("task %s: ran (%s, %d fuel) and submitted", task_id[:12], result.outcome, result.fuel_used)

    # -- the arbiter --

    async def _record_rerun(
        self, task_id: str, facts: rules.RerunFacts, verdict: rules.RerunVerdict, output: bytes
    ) -> None:
        """Sign what the re-run found (and attach its output when it fits): kept in this ledger, and sent
        to both parties with the resolution."""
        if facts.rerun_usage is not None:
            usage = facts.rerun_usage
            found = (
                f"output sha256 {facts.rerun_sha256} ({facts.rerun_size} bytes), fuel {usage.fuel_used}, "
                f"{usage.outcome} {usage.exit_code}"
            )
        else:
            found = f"not re-run: {facts.rerun_refusal}"
        claimed = facts.claimed_usage
        note = (
            f"re-run by the arbiter: {verdict.reason}. Re-run: {found}. Seller's result: output sha256 "
            f"{facts.claimed_sha256} ({facts.claimed_size} bytes)"
            + (f", fuel {claimed.fuel_used}, {claimed.outcome} {claimed.exit_code}" if claimed else "")
        )
        await self._sign_run_evidence(task_id, note, output)

    async def _sign_run_evidence(self, task_id: str, note: str, output: bytes) -> None:
        _, local = self._task(task_id)
        note = note[: w.MAX_EVIDENCE_NOTE]
        attachment = output if len(output) <= w.MAX_EVIDENCE_ATTACHMENT else b""
        notice = w.EvidenceNotice(
            task_id=task_id,
            party=self.peer_id,
            note=note,
            content_hash=sha256_hex(attachment),
            size=len(attachment),
            submitted_at=int(self._now()),
        )
        envelope = to_base64(seal(notice, self.key, domain=w.EVIDENCE_DOMAIN, payload_type=w.EVIDENCE_TYPE))
        local.run_evidence = (envelope, attachment)
        await self._keep_run_evidence(notice, envelope, attachment)

    def _after_case(self, task_id: str) -> None:
        _, local = self._task(task_id)
        if local.rerunning or local.run_verdict is not None:  # the same case sent again
            return
        if local.award is not None and w.sandbox_terms(local.award.params) is not None:
            local.rerunning = True
            self._spawn(self._arbitrate, task_id)

    async def _arbitrate(self, task_id: str) -> None:
        _, local = self._task(task_id)
        try:
            await self._rerun_and_decide(task_id)
        finally:
            local.rerunning = False

    async def _rerun_and_decide(self, task_id: str) -> None:
        record, local = self._task(task_id)
        award = self._award_of(local)
        terms = w.sandbox_terms(award.params)
        if terms is None or record.result is None:
            return
        if terms.arbitration != "rerun":
            local.run_verdict = "left_to_a_person"  # a person resolves (or, on a panel, votes by hand)
            return
        claimed = local.result_usage
        facts = rules.RerunFacts(
            kind=terms.kind,
            price=award.price,
            claimed_sha256=record.result.content_hash,
            claimed_size=record.result.size,
            claimed_usage=rules.Usage(claimed.fuel_used, claimed.outcome, claimed.exit_code) if claimed else None,
            rerun_sha256=None,
        )
        rerun_output = b""
        refusal = rules.run_verdict(self._run_facts(terms, self.sandbox.policy.auto_arbitrate))
        if refusal is not None:
            facts = rules.RerunFacts(**{**facts.__dict__, "rerun_refusal": refusal.reason})
        else:
            module = local.module or await self._await_module(task_id, terms, [record.creator, award.bidder])
            if module is None:  # neither party served it by the deadline: the creator's burden unmet
                facts = rules.RerunFacts(**{**facts.__dict__, "rerun_refusal": "module_withheld"})
            else:
                local.module = module
                try:
                    result = await self._run_terms(terms, module)
                    if terms.kind == "native" and result.output_sha256 != record.result.content_hash:
                        # A differing native output may be the program's own doing (the clock, or
                        # randomness a seller on an older node did not seed): a second run, on another
                        # random stream, tells a program whose output depends on them from a wrong result.
                        again = await self._run_terms(terms, module, salt=b"second run")
                        reproducible = (again.output_sha256, again.outcome, again.exit_code) == (
                            result.output_sha256,
                            result.outcome,
                            result.exit_code,
                        )
                        facts = rules.RerunFacts(**{**facts.__dict__, "rerun_reproducible": reproducible})
                    rerun_output = result.output
                    facts = rules.RerunFacts(
                        **{
                            **facts.__dict__,
                            "rerun_sha256": result.output_sha256,
                            "rerun_size": len(result.output),
                            "rerun_usage": rules.Usage(result.fuel_used, str(result.outcome), result.exit_code),
                        }
                    )
                except ClawnodeError as error:
                    facts = rules.RerunFacts(**{**facts.__dict__, "rerun_refusal": error.reason or "rerun_refused"})
        verdict = rules.rerun_verdict(facts)
        local.run_verdict = verdict.reason
        await self._record_rerun(task_id, facts, verdict, rerun_output)
        if terms.panel is not None:  # one vote of the panel's: a split, or an abstention it could not decide
            split = verdict.to_bidder if verdict.action == "resolve" else None
            await self.vote(task_id, split, verdict.reason)
            return
        if verdict.action == "escalate":
            log.warning("task %s: not re-run (%s); the dispute waits for a person", task_id[:12], verdict.reason)
            return
        log.info("task %s: re-run decides %s: %d to the seller", task_id[:12], verdict.reason, verdict.to_bidder)
        await self.resolve(task_id, verdict.to_bidder, verdict=verdict.reason)
