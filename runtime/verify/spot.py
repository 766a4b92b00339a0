"""A spot-check of one call, as the consumer (or an arbiter) runs it: blocking, on a worker thread.

Inputs are what the consumer holds after the call and after asking the provider for the openings of
every chunk: the prompt's token ids (the consumer formats and tokenizes the request with the same
file), the produced token ids, the provider's signed commitment, the openings and the text received. The result is plain
data; ``protocols.machines.verify.check_verdict`` decides what it means.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.ledger.receipts import PeerKeys
from runtime.verify.check import SAMPLED_POSITIONS, Findings, Prefill, check_positions, compare, wanted_ids
from runtime.verify.commitment import Commitment, Opened, Opening, decode_chunk, opening_matches
from runtime.verify.evidence import DisputePackage, SignedCommitment, commitment_signed, ids_sha256, text_sha256


@dataclass(frozen=True)
class SpotCheck:
    root_signed: bool
    openings_match: bool
    findings: Findings | None  # None when the comparison did not run (a bad signature or opening)
    prompt_matches: bool = True  # the signed prompt length is the consumer's own rendering's
    text_matches: bool = True  # the text received is what the produced token ids spell
    prompt_hash_matches: bool = True  # v2: the signed prompt_sha256 is the consumer's rendering's
    text_hash_matches: bool = True  # v2: the signed text_sha256 is the text received's


# A stop string ends a reply with its text cut: what the ids spell may run on past the text received
# by at most this many characters (a template's stop string and the rest of the token that held it)
# plus the longest stop string the request named.
MAX_CUT_CHARS = 64


def text_matches(spelled: str, received: str, longest_stop: int = 0) -> bool:
    """Whether ``received`` is the reply the ids spell: all of it, or all but a stop string's cut
    (``longest_stop``: the longest stop string the request named, in characters)."""
    return spelled.startswith(received) and len(spelled) - len(received) <= MAX_CUT_CHARS + longest_stop


def check_call(
    prefill: Prefill,
    prompt: Sequence[int],
    tokens: Sequence[int],
    signed: SignedCommitment,
    openings: Sequence[Opening],
    peer_keys: PeerKeys,
    tolerances: tuple[float, float],
    text: str | None = None,
    longest_stop: int = 0,
    *,
    sample: int = SAMPLED_POSITIONS,
    rng: random.Random | None = None,
) -> SpotCheck:
    """``sample``: how many positions beyond the first and the flagged ones to compare
    (``check.check_positions``, drawn with ``rng``, the verifier's own randomness); 0: every one."""
    body = signed.body
    if not commitment_signed(signed, peer_keys):
        return SpotCheck(False, False, None)
    if body.prompt_tokens != len(prompt):
        # The provider signed that it processed another prompt (truncated, or another tokenizer's).
        return SpotCheck(True, True, None, prompt_matches=False)
    if body.prompt_sha256 is not None and ids_sha256(prompt) != body.prompt_sha256:
        # Same length, other ids: the provider signed that it evaluated another prompt than this one.
        return SpotCheck(True, True, None, prompt_hash_matches=False)
    if body.text_sha256 is not None and text is not None and text_sha256(text) != body.text_sha256:
        # The text received is not the text the provider signed it streamed.
        return SpotCheck(True, True, None, text_hash_matches=False)
    if body.completion_tokens != len(tokens):
        return SpotCheck(True, False, None)
    root = bytes.fromhex(body.root)
    opened: list[Opened] = []
    chunk = 32
    by_index = {opening.index: opening for opening in openings}
    for index in range(-(-len(tokens) // chunk)):
        opening = by_index.get(index)
        if opening is None or not opening_matches(root, opening, len(tokens)):
            return SpotCheck(True, False, None)
        try:
            opened += decode_chunk(opening.data, tokens[index * chunk : (index + 1) * chunk])
        except ValueError:
            return SpotCheck(True, False, None)
    if any(not 0 <= t < prefill.n_vocab for t in (*prompt, *tokens)):
        # A token id outside the vocabulary is never produced by the model (and never reaches llama.cpp).
        return SpotCheck(True, True, Findings(positions=len(tokens), not_sampled=1))
    if text is not None and not text_matches(prefill.text_of(tokens), text, longest_stop):
        # The proof commits to other tokens than the reply the consumer got (text edited or swapped).
        return SpotCheck(True, True, None, text_matches=False)
    temperature = body.temperature_milli / 1000
    at = check_positions(tokens, opened, temperature, sample=sample, rng=rng)
    wanted = wanted_ids([tokens[i] for i in at], [opened[i] for i in at])
    rows = prefill.scores(prompt, tokens, wanted, with_top=temperature > 0, at=at)
    findings = compare(
        rows,
        tokens,
        opened,
        temperature=temperature,
        top_p=body.top_p_milli / 1000,
        tolerance=tolerances[0],
        mean_tolerance=tolerances[1],
        at=at,
    )
    return SpotCheck(True, True, findings)


# The arbiter does not know the request's stop strings (the request is not signed): it allows this
# many characters of cut instead. An edit anywhere but a cut off the end is caught whatever the allowance.
ARBITER_STOP_ALLOWANCE = 1024


def openings_of(chunks: Sequence[str]) -> list[Opening]:
    """The openings of a proof's chunks (base64), the tree rebuilt in one pass; [] if one does not decode.
    Only the root the provider signed binds them."""
    try:
        data = [base64.b64decode(chunk, validate=True) for chunk in chunks]
    except ValueError:
        return []
    return Commitment(tuple(data), 1).open_all() if data else []


def recheck(
    prefill: Prefill, package: DisputePackage, peer_keys: PeerKeys, tolerances: tuple[float, float]
) -> SpotCheck:
    """An arbiter's re-run of a disputed call on its own copy of the file (blocking): the same check as
    the consumer's, over the prompt ids and text the package carries (bound by the signed hashes:
    ``evidence.package_binds`` first), at every position: a superset of any sample the consumer drew,
    so a position's failure the consumer found is found again, and the mean is the whole reply's
    (the consumer's draw is its own word, which it could have chosen to frame an honest provider)."""
    proof = package.proof
    openings = openings_of(proof.chunks)
    return check_call(
        prefill,
        package.prompt_ids,
        proof.tokens,
        proof.commitment,
        openings,
        peer_keys,
        tolerances,
        package.text,
        ARBITER_STOP_ALLOWANCE,
        sample=0,
    )
