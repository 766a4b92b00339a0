"""``inference`` tasks: a prompt batch run on a served model, named by name and GGUF sha256. The
rules: ``protocols.machines.task_inference``; the engine: ``runtime.inference`` (its public API,
generation in its worker thread).

* The creator publishes the model's name (and the sha256 the seller's record states, when it
  states one), the prompts (bounded: count and bytes), ``max_tokens`` and the temperature (0 by
  default) in the task's params; their hash is in the signed announcement.
* The awarded seller whose ``[sandbox] kinds`` holds ``inference`` and that serves that model file
  runs the batch (a prompt the model refuses as busy is asked again, ``busy_retry_verdict``; the
  arbiter's re-run too) and submits the outputs (canonical JSON, see :func:`outputs_bytes`) with its
  signed usage: ``fuel_used`` counts the completion tokens, ``outcome`` is ``inference``.
* The arbiter of a disputed ``inference`` task re-runs the batch on its own copy of the same model
  file and resolves on chain by ``inference_rerun_verdict`` (exact text at temperature 0); when it
  holds no such file, or the task sampled above 0, the dispute waits for a person.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import trio
from pydantic import BaseModel, ConfigDict, Field

from protocols import task_wire as w
from protocols.machines import task_inference as rules
from protocols.machines import task_panel as panel_rules
from protocols.machines.verdict import enforce
from protocols.task.base import TaskLocal, log
from protocols.task.panel import ZERO_WALLET
from protocols.task.runner import RunnerRole
from runtime.errors import ClawnodeError, ErrorCode
from runtime.jsonsafe import loads_bounded
from runtime.sandbox import sha256_hex

KIND = "inference"


class InferenceTerms(BaseModel):
    """What an ``inference`` task names in its params (JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["inference"] = "inference"
    model: str = Field(min_length=1, max_length=128)
    model_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$", description="the GGUF file's; empty: any")
    prompts: list[str] = Field(min_length=1, max_length=rules.MAX_PROMPTS)
    max_tokens: int = Field(32, ge=1, le=rules.MAX_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    arbitration: Literal["rerun", "person"] = "rerun"
    panel: w.PanelTerms | None = Field(None, description="k arbiters who each re-run and vote; m votes decide")

    def batch_bytes(self) -> int:
        return sum(len(prompt.encode()) for prompt in self.prompts)


def inference_terms(params: str | None) -> InferenceTerms | None:
    """The inference terms in a task's params; None for a task of another kind."""
    try:
        data = loads_bounded(params or "", what="the task's params")
    except (ValueError, ClawnodeError):
        return None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        return None
    try:
        return InferenceTerms.model_validate(data)
    except ValueError:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the task's inference terms are invalid", "bad_terms") from None


def outputs_bytes(outputs: list[str]) -> bytes:
    """The result an ``inference`` task delivers: the outputs, in prompt order, as canonical JSON."""
    return json.dumps({"outputs": outputs}, ensure_ascii=False, separators=(",", ":")).encode()


class InferenceRole(RunnerRole):
    busy_deadline_s: float = rules.BUSY_DEADLINE_S  # how long a batch waits, in all, on a busy model

    async def publish_inference(
        self,
        capability: str,
        budget: int,
        deadline_s: int,
        *,
        terms: InferenceTerms,
        summary: str = "",
        arbiter_peer: str | None = None,
        arbiter_wallet: str | None = None,
        review_timeout_s: int = 600,
    ) -> w.TaskView:
        if terms.batch_bytes() > rules.MAX_BATCH_BYTES:
            raise ClawnodeError(
                ErrorCode.INVALID_ARGUMENT, f"prompts are at most {rules.MAX_BATCH_BYTES} bytes", "batch_too_large"
            )
        if terms.panel is not None:  # as for a sandboxed task: no single arbiter, the first member takes evidence
            members = [(member.peer, member.wallet) for member in terms.panel.members]
            enforce(panel_rules.panel_terms_verdict(members, terms.panel.threshold, (self.peer_id,)))
            arbiter_peer, arbiter_wallet = terms.panel.members[0].peer, ZERO_WALLET
        return await self.publish(
            capability,
            budget,
            deadline_s,
            summary=summary,
            params=terms.model_dump_json(),
            arbiter_peer=arbiter_peer,
            arbiter_wallet=arbiter_wallet,
            review_timeout_s=review_timeout_s,
        )

    def _inference_facts(self, terms: InferenceTerms, automatic: bool) -> rules.InferenceRunFacts:
        loaded: str | None = None
        if self.task_models is not None and self.task_models.get(terms.model) is not None:
            loaded = self.task_models.sha256s.get(terms.model, "")
        return rules.InferenceRunFacts(
            accepted=self.sandbox.accepts(KIND),
            automatic=automatic,
            model=terms.model,
            loaded_sha256=loaded,
            wanted_sha256=terms.model_sha256,
            prompts=len(terms.prompts),
            batch_bytes=terms.batch_bytes(),
            max_tokens=terms.max_tokens,
        )

    async def _run_batch(self, terms: InferenceTerms) -> tuple[bytes, int]:
        """The batch on the loaded model, one prompt after another (the engine generates in its worker thread)."""
        model = self.task_models.get(terms.model)
        outputs: list[str] = []
        tokens = 0
        started = trio.current_time()
        for prompt in terms.prompts:
            while True:
                try:
                    done = await model.complete(prompt, max_tokens=terms.max_tokens, temperature=terms.temperature)
                    break
                except ClawnodeError as error:  # a full queue: asked again after its hint (busy_retry_verdict)
                    busy = error.code == ErrorCode.RATE_LIMITED and error.reason == "busy"
                    facts = rules.BusyFacts(busy, trio.current_time() - started, error.retry_after_s)
                    wait = rules.busy_retry_verdict(facts, self.busy_deadline_s)
                    if wait is None:
                        raise
                    await trio.sleep(wait)
            outputs.append(done.text)
            tokens += done.usage.completion_tokens
        return outputs_bytes(outputs), tokens

    def _kind_of(self, local: TaskLocal) -> str | None:
        params = local.params if local.params is not None else (local.award.params if local.award else None)
        try:
            return KIND if inference_terms(params) is not None else None
        except ClawnodeError:
            return None

    def _rerun_decides(self, local: TaskLocal) -> bool:
        params = local.params if local.params is not None else (local.award.params if local.award else None)
        try:
            terms = inference_terms(params)
        except ClawnodeError:
            return False
        if terms is None:
            return super()._rerun_decides(local)
        return terms.arbitration == "rerun" and terms.temperature == 0.0 and bool(terms.model_sha256)

    # -- the seller --

    def _after_award(self, task_id: str) -> None:
        _, local = self._task(task_id)
        if inference_terms(local.params) is not None:
            self._spawn(self._execute_inference, task_id)
            return
        super()._after_award(task_id)

    async def _execute_inference(self, task_id: str) -> None:
        _, local = self._task(task_id)
        terms = inference_terms(local.params)
        assert terms is not None
        refusal = rules.inference_run_verdict(self._inference_facts(terms, self.sandbox.policy.auto_run))
        if refusal is not None:
            if refusal.reason != "not_automatic":
                self.sandbox.stats.refused(KIND, refusal.reason)
            log.info("task %s not run here: %s", task_id[:12], refusal.reason)
            return
        self.sandbox.stats.ran(KIND)
        try:
            output, tokens = await self._run_batch(terms)
        except ClawnodeError as error:
            log.warning("task %s: the batch failed: %s %s", task_id[:12], error.code, error.reason)
            return
        await self.submit(task_id, output, w.RunUsage(fuel_used=tokens, outcome=KIND, exit_code=None))
        log.info("task %s: ran %d prompts (%d tokens) and submitted", task_id[:12], len(terms.prompts), tokens)

    # -- the arbiter --

    def _after_case(self, task_id: str) -> None:
        _, local = self._task(task_id)
        if local.award is not None and inference_terms(local.award.params) is not None:
            if local.rerunning or local.run_verdict is not None:
                return
            local.rerunning = True
            self._spawn(self._arbitrate_inference, task_id)
            return
        super()._after_case(task_id)

    async def _arbitrate_inference(self, task_id: str) -> None:
        _, local = self._task(task_id)
        try:
            await self._rerun_inference(task_id)
        finally:
            local.rerunning = False

    async def _rerun_inference(self, task_id: str) -> None:
        record, local = self._task(task_id)
        award = self._award_of(local)
        terms = inference_terms(award.params)
        if terms is None or record.result is None:
            return
        if terms.arbitration != "rerun":
            local.run_verdict = "left_to_a_person"
            return
        facts = rules.InferenceRerunFacts(
            price=award.price,
            temperature=terms.temperature,
            claimed_sha256=record.result.content_hash,
            rerun_sha256=None,
            model_named=bool(terms.model_sha256),
        )
        output = b""
        refusal = rules.inference_run_verdict(self._inference_facts(terms, self.sandbox.policy.auto_arbitrate))
        if terms.temperature != 0.0 or not terms.model_sha256:
            pass  # a sampled batch, or one on an unnamed file, proves nothing by re-running it
        elif refusal is not None:
            facts = rules.InferenceRerunFacts(**{**facts.__dict__, "rerun_refusal": refusal.reason})
        else:
            self.sandbox.stats.ran(KIND)
            try:
                output, _ = await self._run_batch(terms)
                facts = rules.InferenceRerunFacts(**{**facts.__dict__, "rerun_sha256": sha256_hex(output)})
            except ClawnodeError as error:
                facts = rules.InferenceRerunFacts(
                    **{**facts.__dict__, "rerun_refusal": error.reason or "rerun_refused"}
                )
        verdict = rules.inference_rerun_verdict(facts)
        local.run_verdict = verdict.reason
        await self._record_inference_rerun(task_id, facts, verdict, output)
        if terms.panel is not None:  # one vote of the panel's: a split, or an abstention it could not decide
            await self.vote(task_id, verdict.to_bidder if verdict.action == "resolve" else None, verdict.reason)
            return
        if verdict.action == "escalate":
            log.warning("task %s: not re-run (%s); the dispute waits for a person", task_id[:12], verdict.reason)
            return
        log.info("task %s: re-run decides %s: %d to the seller", task_id[:12], verdict.reason, verdict.to_bidder)
        await self.resolve(task_id, verdict.to_bidder, verdict=verdict.reason)

    async def _record_inference_rerun(
        self, task_id: str, facts: rules.InferenceRerunFacts, verdict: Any, output: bytes
    ) -> None:
        found = (
            f"outputs sha256 {facts.rerun_sha256} ({len(output)} bytes)"
            if facts.rerun_sha256 is not None
            else f"not re-run: {facts.rerun_refusal or verdict.reason}"
        )
        note = f"re-run by the arbiter: {verdict.reason}. Re-run: {found}. Seller's result: {facts.claimed_sha256}"
        await self._sign_run_evidence(task_id, note, output)
