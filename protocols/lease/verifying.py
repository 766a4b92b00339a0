"""The consumer's spot-check of a call (verified inference, docs/verified-inference.md).

After a call's end frame, when the frame carries a proof for a file this node holds (same sha256), the
consumer checks the call if ``verify_sample_rate`` draws it, always on a provider's first checked call
and after any doubt: the prompt as its own copy of the model renders it, the produced tokens and
the committed chunks against the signed root, then one prefill (``runtime.verify.spot.check_call``, on
a worker thread). ``protocols.machines.verify.check_verdict`` decides; a failure ends the lease (no
more countersigned receipts) and refuses the call with ``E_FORBIDDEN verification_<reason>``.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any

import trio

from protocols.machines.verify import CheckFacts, check_verdict
from runtime.verify.book import VerificationBook
from runtime.verify.check import prefill_for
from runtime.verify.commitment import Commitment, Opening
from runtime.verify.evidence import CallProof
from runtime.verify.sampling import DEFAULT_SAMPLE_RATE, should_check
from runtime.verify.spot import SpotCheck, check_call
from wire.peer_keys import ed25519_public_key

log = logging.getLogger(__name__)

LocalModel = Callable[[str], Any]  # sha256 -> a loaded LlamaModel of that file, or None


class Verifying:
    """The consumer's checks; the role holds one."""

    def __init__(self, local_model: LocalModel | None = None, sample_rate: float = DEFAULT_SAMPLE_RATE) -> None:
        self.local_model = local_model
        self.sample_rate = sample_rate
        self.book = VerificationBook()

    async def check(self, provider: str, lease_id: str, body: dict[str, Any], proof: CallProof | None) -> str:
        """``passed``, ``failed:<reason>``, ``unverifiable`` or ``skipped``."""
        if proof is None or self.local_model is None:
            return "skipped"
        signed = proof.commitment.body
        model = self.local_model(signed.model_sha256)
        if model is None:
            self.book.note(provider, "unverifiable", "no_file")
            return "unverifiable"
        doubt = self.book.in_doubt(provider)
        if not should_check(rate=self.sample_rate, checked_before=self.book.checked_before(provider), in_doubt=doubt):
            return "skipped"
        prompt = await _prompt_ids(model, body, signed.prompt_tokens)
        bound = signed.provider == provider and signed.lease_id == lease_id
        if prompt is None:
            self.book.note(provider, "unverifiable", "prompt")
            return "unverifiable"
        try:
            data = [base64.b64decode(chunk, validate=True) for chunk in proof.chunks]
        except ValueError:
            data = []
        openings = [_opening(data, index) for index in range(len(data))]
        try:
            spot: SpotCheck = await trio.to_thread.run_sync(_run, model.path, prompt, proof, openings)
        except ValueError:  # longer than the verifier's context: not checked here
            self.book.note(provider, "unverifiable", "too_long")
            return "unverifiable"
        facts = CheckFacts(
            root_signed=bound and spot.root_signed,
            answered=True,
            openings_match=spot.openings_match,
            holds_file=True,
            prompt_matches=spot.prompt_matches,
            findings_reason=spot.findings.reason() if spot.findings is not None else "",
        )
        verdict = check_verdict(facts)
        self.book.note(provider, verdict.outcome, verdict.reason)
        if verdict.outcome == "failed":
            log.warning("provider %s failed verification (%s)", provider[:16], verdict.reason)
            return f"failed:{verdict.reason}"
        return verdict.outcome


def _opening(chunks: list[bytes], index: int) -> Opening:
    # The chunks arrived whole: the path is rebuilt here and only the root the provider signed binds them.
    return Commitment(tuple(chunks), 1).open(index)


def _run(path: Any, prompt: list[int], proof: CallProof, openings: list[Opening]) -> SpotCheck:
    prefill, tolerances = prefill_for(path)
    return check_call(prefill, prompt, proof.tokens, proof.commitment, openings, ed25519_public_key, tolerances)


async def _prompt_ids(model: Any, body: dict[str, Any], claimed: int) -> list[int] | None:
    """The prompt's token ids as this node's copy of the model renders the request (None if it cannot)."""
    try:
        messages, prompt = body.get("messages"), body.get("prompt")
        if messages is not None:
            text = await model.format_chat(messages)
            ids = await model.tokenize(text, add_bos=True, special=True)
            if len(ids) != claimed:  # a template that writes its own BOS: without the added one
                ids = await model.tokenize(text, add_bos=False, special=True)
            return list(ids)
        if isinstance(prompt, str):
            return list(await model.tokenize(prompt, add_bos=True))
        if isinstance(prompt, list):
            return list(prompt)
    except Exception:  # noqa: BLE001 - a request this node cannot render is unverifiable, not a failure
        return None
    return None
