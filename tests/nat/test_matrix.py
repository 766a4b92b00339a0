"""The NAT matrix with real daemons: AutoNAT says `private` behind NATs, `public` with a port forward.

Needs Linux, root, `ip` and `nft` (skipped otherwise). One topology, six daemons, ~60 s.
"""

from __future__ import annotations

import io
import subprocess

import pytest
from click.testing import CliRunner

from nat import natmatrix
from nat.harness.netns import NatType, netns_list

_MISSING = natmatrix.requirements_problem()
needs_netns = pytest.mark.skipif(_MISSING is not None, reason=f"NAT matrix: {_MISSING}")


def _leftover_daemons(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if marker in line and "node.cli start" in line]


@needs_netns
def test_autonat_verdicts_behind_nats() -> None:
    before = set(netns_list())
    results = natmatrix.run_matrix(
        [NatType.PORT_RESTRICTED.value, NatType.SYMMETRIC.value, natmatrix.PORT_FORWARD], repetitions=1
    )
    by_case = {r.case: r for r in results}
    assert set(by_case) == {"port-restricted", "symmetric", "port-forward"}
    for case, expected in (("port-restricted", "private"), ("symmetric", "private"), ("port-forward", "public")):
        result = by_case[case]
        assert result.home_verdict == expected, result
        assert result.seconds_to_verdict is not None and result.seconds_to_verdict < 60
        assert [h.verdict for h in result.helpers] == ["public"] * 4, result.helpers
        # The servers (relay, helpers) opened TCP connections towards the home side only at the
        # router's public address: the AutoNAT dial-backs of the listen port.
        assert result.helper_dials, result
        assert result.dials_only_router_ip, result.helper_dials
        assert result.helper_dials == [f"{result.router_public_ip}:{natmatrix.LISTEN_PORT}"]
        assert result.ok
        # not measured yet: reported as None, never as a pass or a failure
        assert result.hole_punch is None and result.relay is None and result.upnp is None
    # everything is gone: namespaces and daemons
    assert set(netns_list()) <= before
    assert _leftover_daemons("clawnode-natmatrix-") == []


@needs_netns
def test_cleanup_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    before = set(netns_list())

    def boom(*args: object, **kwargs: object) -> natmatrix.Result:
        raise RuntimeError("case failed")

    monkeypatch.setattr(natmatrix, "_run_case", boom)
    # a 1 s timeout for the helpers' verdicts fails fast too; either way nothing may stay behind
    with pytest.raises((RuntimeError, natmatrix.HarnessError)):
        natmatrix.run_matrix(["symmetric"], repetitions=1, verdict_timeout_s=1)
    assert set(netns_list()) <= before
    assert _leftover_daemons("clawnode-natmatrix-") == []


def test_cli_refuses_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from node.cli import EXIT_CANNOT_START, main

    monkeypatch.setattr(natmatrix, "requirements_problem", lambda: "needs root (network namespaces, nftables)")
    outcome = CliRunner().invoke(main, ["nat-test", "--types", "symmetric"])
    assert outcome.exit_code == EXIT_CANNOT_START
    assert "E_UNAVAILABLE" in outcome.output


def test_result_table_marks_unmeasured_columns() -> None:
    from rich.console import Console

    result = natmatrix.Result(
        case="symmetric",
        nat_type="symmetric",
        port_forward=False,
        repetition=0,
        router_public_ip="203.0.113.101",
        home_verdict="private",
        home_expected="private",
        seconds_to_verdict=9.5,
        ok=True,
    )
    console = Console(record=True, width=240, file=io.StringIO())
    console.print(natmatrix.render_table([result]))
    text = console.export_text()
    assert "not measured" in text and "symmetric" in text
    assert result.model_dump()["hole_punch"] is None
