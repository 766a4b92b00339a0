"""The pure rules of sandboxed tasks: who runs, who fetches the module, and the re-execution verdict."""

from __future__ import annotations

from protocols.machines.task_run import (
    RerunFacts,
    RunFacts,
    Usage,
    module_request_verdict,
    rerun_verdict,
    run_verdict,
)

CLAIM = RerunFacts(
    kind="wasm",
    price=100,
    claimed_sha256="a" * 64,
    claimed_size=5,
    claimed_usage=Usage(700, "exited", 0),
    rerun_sha256="a" * 64,
    rerun_size=5,
    rerun_usage=Usage(700, "exited", 0),
)


def _with(**changes: object) -> RerunFacts:
    return RerunFacts(**{**CLAIM.__dict__, **changes})  # type: ignore[arg-type]


def test_the_re_run_decides_every_disputed_sandboxed_task_it_could_run() -> None:
    assert (rerun_verdict(CLAIM).action, rerun_verdict(CLAIM).to_bidder) == ("resolve", 100)
    assert rerun_verdict(_with(rerun_sha256="b" * 64)).reason == "output_differs"
    assert rerun_verdict(_with(rerun_size=6)).to_bidder == 0
    assert rerun_verdict(_with(rerun_usage=Usage(701, "exited", 0))).reason == "usage_differs"
    assert rerun_verdict(_with(rerun_usage=Usage(700, "trap", None))).to_bidder == 0
    # native: CPU time differs between machines, only the output and how it ended count.
    assert rerun_verdict(_with(kind="native", rerun_usage=Usage(9, "exited", 0))).reason == "rerun_matches"
    # A program that failed the same way on both machines was still run faithfully.
    failed = Usage(1000, "fuel_exhausted", None)
    assert rerun_verdict(_with(claimed_usage=failed, rerun_usage=failed)).to_bidder == 100
    # No usage signed: the output decides.
    assert rerun_verdict(_with(claimed_usage=None)).to_bidder == 100
    # The arbiter could not re-run: a person decides, with the sandbox's reason.
    cannot = rerun_verdict(_with(rerun_sha256=None, rerun_usage=None, rerun_refusal="wall_clock"))
    assert (cannot.action, cannot.reason) == ("escalate", "wall_clock")
    assert rerun_verdict(_with(rerun_sha256=None, rerun_usage=None)).reason == "rerun_unavailable"
    # A native program whose two re-runs differ proves nothing: a person decides, nobody is refunded away.
    shaky = rerun_verdict(_with(kind="native", rerun_sha256="b" * 64, rerun_reproducible=False))
    assert (shaky.action, shaky.reason, shaky.to_bidder) == ("escalate", "not_reproducible", 0)


def test_a_program_neither_party_serves_by_the_deadline_pays_the_seller() -> None:
    from protocols.machines.task_run import MODULE_DEADLINE_S, module_wait_verdict

    # The arbiter asks again until the deadline, then holds the creator (who published the program and
    # rejected the result) to have withheld it: the dispute is the seller's, without a person.
    assert module_wait_verdict(0.0, MODULE_DEADLINE_S) == "ask_again"
    assert module_wait_verdict(MODULE_DEADLINE_S - 0.1, MODULE_DEADLINE_S) == "ask_again"
    assert module_wait_verdict(MODULE_DEADLINE_S, MODULE_DEADLINE_S) == "withheld"
    withheld = rerun_verdict(_with(rerun_sha256=None, rerun_usage=None, rerun_refusal="module_withheld"))
    assert (withheld.action, withheld.reason, withheld.to_bidder) == ("resolve", "module_withheld", 100)
    # Refused by the arbiter's own sandbox is not withheld: a person (or a capable panel) decides.
    refused = rerun_verdict(_with(rerun_sha256=None, rerun_usage=None, rerun_refusal="limits_too_high"))
    assert refused.action == "escalate"


def test_who_runs_and_who_fetches() -> None:
    ok = RunFacts(kind="wasm", accepted=True, automatic=True, within_caps=True, module_size_ok=True)
    assert run_verdict(ok) is None
    for change, reason in (
        ({"automatic": False}, "not_automatic"),
        ({"accepted": False}, "kind_not_accepted"),
        ({"module_size_ok": False}, "module_too_large"),
        ({"within_caps": False}, "limits_too_high"),
    ):
        refusal = run_verdict(RunFacts(**{**ok.__dict__, **change}))  # type: ignore[arg-type]
        assert refusal is not None and refusal.reason == reason
    held = "c" * 64
    assert module_request_verdict("seller", "creator", "seller", "arbiter", held, held) is None
    assert module_request_verdict("arbiter", "creator", "seller", "arbiter", held, held) is None
    stranger = module_request_verdict("other", "creator", "seller", "arbiter", held, held)
    assert stranger is not None and stranger.reason == "not_a_party"
    before_award = module_request_verdict("seller", "creator", None, "arbiter", held, held)
    assert before_award is not None and before_award.reason == "not_a_party"
    assert module_request_verdict("member", "creator", "seller", "arbiter", held, held, ("arbiter", "member")) is None
    missing = module_request_verdict("arbiter", "creator", "seller", "arbiter", None, held)
    assert missing is not None and missing.reason == "module_unknown"


def test_only_params_naming_a_sandboxed_kind_are_sandbox_terms() -> None:
    import pytest

    from protocols.task_wire import sandbox_terms
    from runtime.errors import ClawnodeError

    for params in ('{"kind": "summary"}', "{}", "[1]", "not json", None):
        assert sandbox_terms(params) is None
    terms = sandbox_terms(
        '{"kind": "wasm", "module_sha256": "' + "a" * 64 + '", "module_size": 10, "limits": {"fuel": 5}}'
    )
    assert terms is not None and terms.limits.fuel == 5 and terms.arbitration == "rerun"
    with pytest.raises(ClawnodeError) as refused:
        sandbox_terms('{"kind": "wasm", "module_size": 10}')
    assert refused.value.reason == "bad_terms"


def test_the_re_run_verdict_pays_the_seller_only_for_what_it_reproduced() -> None:
    from collections import Counter

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tests.protocols.refusals import report

    hashes = st.sampled_from(["a" * 64, "b" * 64])
    usages = st.builds(Usage, st.sampled_from([700, 701]), st.sampled_from(["exited", "trap"]), st.sampled_from([0, 1]))
    seen: Counter[str] = Counter()

    @settings(max_examples=400, deadline=None, database=None, derandomize=True)  # every reason, every run
    @given(
        kind=st.sampled_from(["wasm", "native"]),
        price=st.integers(1, 10**18),
        claimed=st.tuples(hashes, st.integers(0, 2), st.none() | usages),
        rerun=st.none() | st.tuples(hashes, st.integers(0, 2), usages),
        refusal=st.none() | st.sampled_from(["wall_clock", "module_withheld", "limits_too_high"]),
        reproducible=st.sampled_from([True, True, True, False]),
    )
    def check(
        kind: str,
        price: int,
        claimed: tuple[str, int, Usage | None],
        rerun: tuple[str, int, Usage] | None,
        refusal: str | None,
        reproducible: bool,
    ) -> None:
        facts = RerunFacts(
            kind=kind,
            price=price,
            claimed_sha256=claimed[0],
            claimed_size=claimed[1],
            claimed_usage=claimed[2],
            rerun_sha256=rerun[0] if rerun else None,
            rerun_size=rerun[1] if rerun else 0,
            rerun_usage=rerun[2] if rerun else None,
            rerun_refusal=None if rerun else refusal,
            rerun_reproducible=reproducible,
        )
        verdict = rerun_verdict(facts)
        seen[f"{verdict.action} {verdict.reason}"] += 1
        if rerun is None and refusal == "module_withheld":  # the creator's burden: the seller is paid
            assert (verdict.action, verdict.reason, verdict.to_bidder) == ("resolve", "module_withheld", price)
            return
        if rerun is None:  # nothing reproduced: never decided without a person
            assert verdict.action == "escalate" and verdict.reason == (refusal or "rerun_unavailable")
            return
        if not reproducible:  # the arbiter could not reproduce its own run: never decided without a person
            assert (verdict.action, verdict.reason) == ("escalate", "not_reproducible")
            return
        assert verdict.action == "resolve" and verdict.to_bidder in (0, price)
        same_output = (rerun[0], rerun[1]) == (claimed[0], claimed[1])
        if verdict.to_bidder:  # the seller is paid only for the output (and usage) the arbiter got too
            assert same_output
            usage = claimed[2]
            if usage is not None:
                assert (usage.outcome, usage.exit_code) == (rerun[2].outcome, rerun[2].exit_code)
                assert kind == "native" or usage.fuel_used == rerun[2].fuel_used
        else:
            assert not same_output or verdict.reason == "usage_differs"

    check()
    report(
        "rerun_verdict",
        seen,
        {
            "rerun_matches",
            "output_differs",
            "usage_differs",
            "wall_clock",
            "module_withheld",
            "rerun_unavailable",
            "not_reproducible",
        },
    )
