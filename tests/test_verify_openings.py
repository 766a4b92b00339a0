"""A provider's proof of up to 2,049 chunks is opened in one pass over its tree, off the trio loop."""

from __future__ import annotations

import base64
import threading

import pytest
from libp2p import generate_new_ed25519_identity

from protocols.lease import verifying
from runtime.verify import commitment
from runtime.verify.commitment import Commitment, opening_matches
from runtime.verify.evidence import CallProof, CommitmentBody, sign_commitment
from wire.peer_keys import receipt_key


def test_every_opening_of_a_full_proof_costs_one_tree() -> None:
    chunks = tuple(bytes([i % 251]) * 3 for i in range(2049))  # the most chunks a CallProof carries
    built = 0
    levels = commitment._levels

    def counting(leaves: list[bytes]) -> list[list[bytes]]:
        nonlocal built
        built += 1
        return levels(leaves)

    committed = Commitment(chunks, 2049 * 32)
    root = committed.root
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(commitment, "_levels", counting)
        openings = verifying._openings([base64.b64encode(c).decode() for c in chunks])
    # One tree for all 2,049 (rebuilding it per chunk hashed ~8.4 M times: seconds of a stalled loop).
    assert built == 1
    assert len(openings) == 2049
    assert all(opening_matches(root, o, 2049 * 32) for o in (openings[0], openings[1000], openings[-1]))


class _Model:
    path = None

    async def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return [1, 2, 3]


async def test_openings_of_a_proof_are_built_on_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    on_loop: list[bool] = []

    def recording(chunks: list[str]) -> list[commitment.Opening]:
        on_loop.append(threading.current_thread() is threading.main_thread())
        raise ValueError("stop here")  # read as a call too long to check: unverifiable

    monkeypatch.setattr(verifying, "_openings", recording)
    # Signed by the provider: a proof whose signature is not its own fails on every call, unopened.
    key = receipt_key(generate_new_ed25519_identity().private_key)
    body = CommitmentBody(
        lease_id="lease-1",
        call_id="call-1",
        provider=key.peer_id,
        model_sha256="ab" * 32,
        temperature_milli=0,
        top_p_milli=1000,
        prompt_tokens=3,
        completion_tokens=32,
        root="00" * 32,
    )
    proof = CallProof(commitment=sign_commitment(body, key), tokens=[5] * 32, chunks=["AA=="])
    checks = verifying.Verifying(local_model=lambda sha256: _Model(), sample_rate=1.0)
    request = {"prompt": "hi", "temperature": 0, "top_p": 1}
    outcome = await checks.check(key.peer_id, "lease-1", request, proof, text="x")
    assert outcome == "unverifiable"
    assert on_loop == [False]


class _FakePrefill:
    def __init__(self, path: object, n_ctx: int = 0) -> None:
        self.closed = False
        self.llama = self

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        return list(range(48))

    def tolerances(self, prompt: list[int], completion: list[int]) -> tuple[float, float]:
        return (1.0, 0.1)

    def close(self) -> None:
        self.closed = True


def test_a_verifier_in_use_is_not_closed_when_the_cache_evicts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from runtime.verify import check

    monkeypatch.setattr(check, "Prefill", _FakePrefill)
    monkeypatch.setattr(check, "_prefills", {})
    in_use, _ = check.prefill_for(Path("/models/a.gguf"))  # a check's worker thread holds it
    for name in "bcde":  # checks of four other files meanwhile evict it
        check.prefill_for(Path(f"/models/{name}.gguf"))
    assert "/models/a.gguf" not in check._prefills
    assert not in_use.closed  # type: ignore[attr-defined]
