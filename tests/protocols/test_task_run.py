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
