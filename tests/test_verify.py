"""Verified inference (issue 21): a commitment to the top-k logprobs of every produced position, and one
prefill of the same GGUF that catches another model, a replaced token or another temperature."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import trio

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from runtime.inference.engine import LlamaModel
from runtime.inference.sampling import Sampling
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify.check import Findings, Prefill, TokenIndex, check_positions, compare, wanted_ids
from runtime.verify.commitment import Commitment, Opened, Position, commit, decode_chunk, opening_matches
from runtime.verify.provider import positions_from_chunks

PROMPT = "Verify me: the quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("verify")
    return write_tiny_llama_gguf(folder / "served.gguf", seed=0), write_tiny_llama_gguf(folder / "other.gguf", seed=1)


async def _generate(path: Path, temperature: float, max_tokens: int = 40) -> tuple[list[int], Commitment, list[int]]:
    model = LlamaModel(path, name="tiny", n_ctx=256, n_threads=1)
    await model.load()
    try:
        prompt = await model.tokenize(PROMPT, add_bos=True)
        sampling = Sampling(temperature=temperature, logprobs=True, top_logprobs=4)
        async with model.stream_generate(prompt=prompt, max_tokens=max_tokens, sampling=sampling, seed=7) as stream:
            chunks = [chunk async for chunk in stream]
    finally:
        await model.aclose()
    positions = positions_from_chunks(chunks, TokenIndex(path))
    return prompt, commit(positions), [p.token for p in positions]


def _check(path: Path, prompt: list[int], sent: Commitment, tokens: list[int], temperature: float) -> Findings:
    opened = []
    for index in range(len(sent.chunks)):
        opening = sent.open(index)
        assert opening_matches(sent.root, opening, len(tokens))
        opened += decode_chunk(opening.data, tokens[index * sent.chunk : (index + 1) * sent.chunk])
    verifier = Prefill(path, n_ctx=256, n_threads=2, n_ubatch=16)  # another thread count and batch size
    try:
        return compare(verifier.rows(prompt, tokens), tokens, opened, temperature=temperature)
    finally:
        verifier.close()


def test_a_chunk_opens_against_its_root_and_nothing_else_does() -> None:
    positions = [Position(t % 300, tuple((t * 7 + i, -0.3 * i) for i in range(4))) for t in range(70)]
    sent = commit(positions)
    assert len(sent.root) == 32 and len(sent.chunks) == 3
    for index in range(3):
        opening = sent.open(index)
        assert opening_matches(sent.root, opening, 70)
        assert not opening_matches(sent.root, opening, 71)  # another token count
        forged = dataclasses.replace(opening, data=opening.data[:-1] + bytes([opening.data[-1] ^ 1]))
        assert not opening_matches(sent.root, forged, 70)
    assert not opening_matches(sent.root, dataclasses.replace(sent.open(0), index=1), 70)
    decoded = decode_chunk(sent.open(2).data, [p.token for p in positions[64:]])
    assert [d.ids for d in decoded] == [tuple(i for i, _ in p.top) for p in positions[64:]]
    assert sent.encoded_bytes / 70 <= 16
    with pytest.raises(ValueError):
        decode_chunk(sent.open(0).data[:-3], [p.token for p in positions[:32]])


async def test_an_honest_reply_passes_at_either_temperature(files: tuple[Path, Path]) -> None:
    served, _ = files
    for temperature in (0.0, 0.9):
        prompt, sent, tokens = await _generate(served, temperature)
        found = await trio.to_thread.run_sync(_check, served, prompt, sent, tokens, temperature)
        assert not found.failed, found
        assert found.positions == len(tokens) == 40


async def test_another_model_a_replaced_token_and_another_temperature_are_caught(files: tuple[Path, Path]) -> None:
    served, other = files
    # Another model (same vocabulary, other weights) behind the advertised file.
    prompt, sent, tokens = await _generate(other, 0.0)
    found = await trio.to_thread.run_sync(_check, served, prompt, sent, tokens, 0.0)
    assert found.failed and found.logprob
    # Sampled at temperature 1 while temperature 0 was declared: some token is not the most likely one.
    prompt, sent, tokens = await _generate(served, 1.0)
    found = await trio.to_thread.run_sync(_check, served, prompt, sent, tokens, 0.0)
    assert found.failed and found.not_sampled
    # A token the model never produced, with a commitment made to fit it (a prefill-only cheat).
    prompt, _, tokens = await _generate(served, 0.0)
    tokens[5] = (tokens[5] + 17) % 356 or 300
    cheater = Prefill(served, n_ctx=256, n_threads=1)
    rows = cheater.rows(prompt, tokens)
    cheater.close()
    top = (-rows).argsort(axis=1)[:, :4]
    fitted = commit(
        [
            Position(t, tuple((int(i), float(row[i])) for i in ids))
            for t, row, ids in zip(tokens, rows, top, strict=True)
        ]
    )
    found = await trio.to_thread.run_sync(_check, served, prompt, fitted, tokens, 0.0)
    assert found.failed and found.reason() == "not_sampled" and found.first_bad == 5


async def test_a_spot_check_of_a_signed_commitment_passes_honesty_and_names_each_cheat(
    files: tuple[Path, Path],
) -> None:
    from libp2p import generate_new_ed25519_identity

    from protocols.machines.verify import CheckFacts, check_verdict
    from runtime.verify.evidence import CommitmentBody, sign_commitment
    from runtime.verify.identity import file_sha256
    from runtime.verify.spot import SpotCheck, check_call
    from wire.peer_keys import ed25519_public_key, receipt_key

    served, other = files
    key = receipt_key(generate_new_ed25519_identity().private_key)
    verifier = Prefill(served, n_ctx=256, n_threads=2)

    def signed_call(path: Path, prompt: list[int], sent: Commitment, tokens: list[int]) -> tuple[object, list]:
        body = CommitmentBody(
            lease_id="lease-1",
            call_id="call-1",
            provider=key.peer_id,
            model_sha256=file_sha256(served),  # what it advertises, whatever it serves
            temperature_milli=0,
            top_p_milli=950,
            prompt_tokens=len(prompt),
            completion_tokens=len(tokens),
            root=sent.root.hex(),
        )
        return sign_commitment(body, key), [sent.open(i) for i in range(len(sent.chunks))]

    def verdict(check: SpotCheck) -> str:
        facts = CheckFacts(
            root_signed=check.root_signed,
            answered=True,
            openings_match=check.openings_match,
            holds_file=True,
            findings_reason=check.findings.reason() if check.findings else "",
        )
        result = check_verdict(facts)
        return result.outcome + (f":{result.reason}" if result.reason else "")

    try:
        tolerances = verifier.tolerances(list(range(40, 60)), list(range(60, 90)))
        for path, expected in ((served, "passed"), (other, "failed:not_sampled")):
            prompt, sent, tokens = await _generate(path, 0.0)
            signed, openings = signed_call(path, prompt, sent, tokens)
            check = check_call(verifier, prompt, tokens, signed, openings, ed25519_public_key, tolerances)  # type: ignore[arg-type]
            assert verdict(check) == expected
        # The honest reply's openings, one byte changed: they no longer open against the signed root.
        prompt, sent, tokens = await _generate(served, 0.0)
        signed, openings = signed_call(served, prompt, sent, tokens)
        openings[0] = dataclasses.replace(openings[0], data=openings[0].data[:-1] + bytes([openings[0].data[-1] ^ 1]))
        check = check_call(verifier, prompt, tokens, signed, openings, ed25519_public_key, tolerances)  # type: ignore[arg-type]
        assert verdict(check) == "failed:opening_mismatch"
        # A commitment someone else signed binds no provider.
        forged = signed.model_copy(update={"body": signed.body.model_copy(update={"root": "00" * 32})})  # type: ignore[attr-defined]
        check = check_call(verifier, prompt, tokens, forged, openings, ed25519_public_key, tolerances)
        assert verdict(check) == "failed:unsigned_root"
        # A token id outside the vocabulary fails without reaching llama.cpp.
        signed, openings = signed_call(served, prompt, sent, tokens)
        bad = [*tokens[:-1], 10**6]
        check = check_call(verifier, prompt, bad, signed, openings, ed25519_public_key, tolerances)  # type: ignore[arg-type]
        assert verdict(check) == "failed:not_sampled"
    finally:
        verifier.close()


def test_scores_read_in_place_agree_with_full_log_softmax_rows(files: tuple[Path, Path]) -> None:
    """The check reads llama.cpp's logits a block at a time (Prefill.scores); what it keeps must be the
    full rows' values, at each position's named ids, best id and 40 best candidates."""
    import numpy as np

    from runtime.verify import check

    served, _ = files
    verifier = Prefill(served, n_ctx=256, n_threads=1)
    try:
        prompt = list(verifier.llama.tokenize(PROMPT.encode(), True, False))
        completion = [(t * 13) % 300 + 3 for t in range(90)]
        wanted = [[t, (t + 1) % 356, 999_999] for t in completion]  # one id outside the vocabulary
        rows = verifier.rows(prompt, completion)
        for block_values in (check.BLOCK_VALUES, 1000):  # many rows a block, and one row a block
            original, check.BLOCK_VALUES = check.BLOCK_VALUES, block_values
            try:
                scores = verifier.scores(prompt, completion, wanted, with_top=True)
            finally:
                check.BLOCK_VALUES = original
            assert scores.best_ids == [int(i) for i in rows.argmax(axis=1)]
            assert np.allclose(scores.best, rows.max(axis=1), atol=1e-4)
            assert scores.top is not None
            assert np.allclose(scores.top, -np.sort(-rows, axis=1)[:, : check.SAMPLING_TOP_K], atol=1e-4)
            for named, row, ids in zip(scores.named, rows, wanted, strict=True):
                assert set(named) == set(ids[:2])
                assert all(abs(named[i] - float(row[i])) < 1e-4 for i in ids[:2])
    finally:
        verifier.close()


async def test_tolerances_are_measured_over_the_models_own_greedy_reply(files: tuple[Path, Path]) -> None:
    # The calibration reply is what a provider at temperature 0 produces: the noise is measured where
    # honest replies are checked, over as many positions as asked (past any end-of-generation token).
    served, _ = files
    prompt, _, tokens = await _generate(served, 0.0)
    verifier = Prefill(served, n_ctx=256, n_threads=2)
    try:
        produced, top_ids, top_values = verifier._stepwise_top(prompt, 120, 4)
        assert len(produced) == 120 and top_ids.shape == top_values.shape == (120, 4)
        assert produced[: len(tokens)] == tokens
        per_entry, mean = verifier.tolerances(prompt, 120)
        assert per_entry >= 0.25 and mean >= 0.03
    finally:
        verifier.close()


def _opened(sent: Commitment, tokens: list[int]) -> list[Opened]:
    opened: list[Opened] = []
    for index in range(len(sent.chunks)):
        opened += decode_chunk(sent.open(index).data, tokens[index * sent.chunk : (index + 1) * sent.chunk])
    return opened


def test_a_check_compares_the_first_positions_the_flagged_ones_and_a_fresh_random_draw() -> None:
    import random

    # 200 positions whose committed best is the produced token, but at 150 (a token below the committed
    # best) and 170 (a token missing from the committed top 4): the commitment itself contradicts greedy
    # sampling there, so those are compared whatever the draw.
    tokens = [10 + i for i in range(200)]
    opened = [Opened((t, t + 1, t + 2, t + 3), (-0.1, -2.0, -3.0, -4.0), (False,) * 4) for t in tokens]
    opened[150] = Opened((160, 151, 161, 162), (-0.5, -0.4, -3.0, -4.0), (False,) * 4)
    opened[170] = Opened((1, 2, 3, 4), (-0.5, -1.0, -3.0, -4.0), (False,) * 4)
    draws = [check_positions(tokens, opened, 0.0, rng=random.Random(seed)) for seed in range(2)]
    for at in draws:
        assert at == sorted(set(at)) and {*range(8), 150, 170} <= set(at)
        assert len(at) == 8 + 2 + 32
    assert draws[0] != draws[1]  # the verifier's randomness picks the rest: a provider cannot know it
    # At a temperature above 0 a token below the committed best is sampling; one missing from the top 4
    # cannot be ranked without the model, so it is compared.
    at = check_positions(tokens, opened, 0.8, rng=random.Random(0))
    assert 170 in at and len(at) == 8 + 1 + 32
    # A short reply, or a sample of 0, compares every position.
    assert check_positions(tokens[:40], opened[:40], 0.0) == list(range(40))
    assert check_positions(tokens, opened, 0.0, sample=0) == list(range(200))


async def test_a_sampled_check_reads_the_full_rows_there_and_catches_a_fitted_foreign_token(
    files: tuple[Path, Path],
) -> None:
    import random

    import numpy as np

    served, _ = files
    prompt, sent, tokens = await _generate(served, 0.0)
    verifier = Prefill(served, n_ctx=256, n_threads=1)
    try:
        # Logits asked at a few positions only (the reply evaluated up to the last of them) are the full
        # pass's rows there.
        rows = verifier.rows(prompt, tokens)
        for at in ([0, 3, 17, 18, 39], [2, 9]):
            scores = verifier.scores(prompt, tokens, [[tokens[i]] for i in at], with_top=True, at=at)
            assert scores.best_ids == [int(rows[i].argmax()) for i in at]
            assert np.allclose(scores.best, rows[at].max(axis=1), atol=1e-3)
        # Honest: passes on any draw.
        opened = _opened(sent, tokens)
        for seed in range(3):
            at = check_positions(tokens, opened, 0.0, sample=4, rng=random.Random(seed))
            wanted = wanted_ids([tokens[i] for i in at], [opened[i] for i in at])
            found = compare(
                verifier.scores(prompt, tokens, wanted, with_top=False, at=at), tokens, opened, temperature=0.0, at=at
            )
            assert not found.failed and found.positions == len(at) < len(tokens) == found.reply_positions
        # A token the model never produced at position 25, the commitment fitted to it by a prefill: the
        # produced token is not the committed best there, so 25 is compared whatever else is drawn.
        tokens[25] = (tokens[25] + 17) % 356 or 300
        rows = verifier.rows(prompt, tokens)
        top = (-rows).argsort(axis=1)[:, :4]
        fitted = commit(
            [
                Position(t, tuple((int(i), float(row[i])) for i in ids))
                for t, row, ids in zip(tokens, rows, top, strict=True)
            ]
        )
        opened = _opened(fitted, tokens)
        at = check_positions(tokens, opened, 0.0, sample=4, rng=random.Random(0))
        assert 25 in at
        wanted = wanted_ids([tokens[i] for i in at], [opened[i] for i in at])
        found = compare(
            verifier.scores(prompt, tokens, wanted, with_top=False, at=at), tokens, opened, temperature=0.0, at=at
        )
        assert found.failed and found.reason() == "not_sampled" and found.first_bad == 25
        # Where the commitment is forged too (the foreign token named the best) and the reply after it is
        # the model's own greedy continuation (so no later position is off its best), nothing flags 25: a
        # draw that leaves it out passes the call, and only comparing every position (the arbiter's
        # re-run) or a draw that holds it catches it (docs/verified-inference.md, "Sampled positions").
        continuation, _, _ = verifier._stepwise_top([*prompt, *tokens[:26]], len(tokens) - 26, 4)
        tokens = [*tokens[:26], *continuation]
        rows = verifier.rows(prompt, tokens)
        top = (-rows).argsort(axis=1)[:, :4]
        entries = [(int(i), float(rows[25][i])) for i in top[25] if int(i) != tokens[25]]
        forged_at = Position(tokens[25], ((tokens[25], entries[0][1]), *entries[:3]))
        forged = commit(
            [
                forged_at if j == 25 else Position(t, tuple((int(i), float(row[i])) for i in ids))
                for j, (t, row, ids) in enumerate(zip(tokens, rows, top, strict=True))
            ]
        )
        opened = _opened(forged, tokens)
        results = {}
        for at in (
            next(
                a
                for s in range(100)
                if 25 not in (a := check_positions(tokens, opened, 0.0, sample=4, rng=random.Random(s)))
            ),
            check_positions(tokens, opened, 0.0, sample=0),
        ):
            wanted = wanted_ids([tokens[i] for i in at], [opened[i] for i in at])
            rows_at = verifier.scores(prompt, tokens, wanted, with_top=False, at=at)
            results[len(at)] = compare(rows_at, tokens, opened, temperature=0.0, at=at)
        sampled, every = results[min(results)], results[len(tokens)]
        assert not sampled.failed
        assert every.failed and every.logprob and every.first_bad == 25
    finally:
        verifier.close()


def test_the_40_best_candidates_are_exact_however_the_logits_spread() -> None:
    """The scores keep each position's 40 best values, found among the logits near the best one where
    enough are (check.TOP_WIDTHS), else over the whole row: whichever way, exactly the full sort's."""
    import numpy as np

    from runtime.verify import check

    rng = np.random.default_rng(3)
    vocab = 5000
    rows = (rng.standard_normal((6, vocab)) * 0.5).astype(np.float32)  # every value near the best
    rows[1, :] -= np.linspace(0, 50_000, vocab, dtype=np.float32)  # 2 values within 16, 7 within 64
    rows[2, 100:] = -1000.0  # 100 values near the best, the rest far below
    rows[3, :] = 2.0  # all tied
    rows[4, :39] = 50.0  # 39 near the best: the 40th is far below it
    rows[5, :] = rng.standard_normal(vocab).astype(np.float32) * 40  # widely spread
    scores = check.score(rows, [[0, 1]] * len(rows), with_top=True)
    assert scores.top is not None
    norm = check._normalisers(rows.copy())
    expected = -np.sort(-rows.astype(np.float64), axis=1)[:, : check.SAMPLING_TOP_K] - norm[:, None]
    assert np.array_equal(scores.top, expected)
    assert scores.best_ids == [int(i) for i in rows.argmax(axis=1)]
