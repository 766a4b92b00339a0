"""The NAT matrix with real daemons: CI's short matrix and the rules it is judged by.

The namespace tests need Linux, root, `ip`, `nft` and Debian's `miniupnpd` (skipped otherwise, with
the reason). One topology, 5 public daemons and 8 home daemons (4 pairs at once), ~2-3 minutes.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from nat.harness.netns import NatType, netns_list
from node import natmatrix

_MISSING = natmatrix.requirements_problem(natmatrix.SHORT_CASES)
needs_netns = pytest.mark.skipif(_MISSING is not None, reason=f"NAT matrix: {_MISSING}")


def _leftover_daemons(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if marker in line and "node.cli start" in line]


ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "nat-matrix"


def _explain(result: natmatrix.Result, index: int) -> str:
    """The result and the end of both home daemons' logs (kept in test-artifacts/nat-matrix/)."""
    tails = []
    for side in ("a", "b"):
        log = ARTIFACTS / f"home-{side}-{index}-0.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        useful = [line for line in lines if " INFO " in line or " WARNING " in line or " ERROR " in line]
        tails.append(f"--- home-{side} ---\n" + "\n".join(useful[-12:]))
    return f"{result!r}\n" + "\n".join(tails)


@needs_netns
def test_short_matrix_follows_what_the_nats_allow() -> None:
    before = set(netns_list())
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    results = natmatrix.run_matrix(natmatrix.SHORT_CASES, repetitions=1, keep_logs=ARTIFACTS)
    by_case = {r.case: r for r in results}
    index = {case.label: i for i, case in enumerate(natmatrix.SHORT_CASES)}
    failed = [_explain(r, index[r.case]) for r in results if not r.ok]
    assert not failed, "\n\n".join(failed)
    assert set(by_case) == {case.label for case in natmatrix.SHORT_CASES}

    for result in results:
        # AutoNAT right on both sides of every NAT: private behind it, public once UPnP maps B's port.
        assert result.verdict_a == "private", result
        assert result.verdict_b == ("public" if result.mapping_b == "upnp" else "private"), result
        # AutoNAT servers dialed each home side only at its router's public address.
        assert result.dials_only_router_ips, result.server_dials
        assert f"{result.router_b_ip}:{natmatrix.LISTEN_PORT}" in result.server_dials, result
        # Data went both ways on every pair, and again once the path had settled.
        assert result.data_exchanged and result.data_after_punch, result
        assert result.error == "" and result.ok, result

    punched = by_case["full-cone x port-restricted"]
    assert punched.path == "hole-punch", punched
    assert punched.relay_reservations_b >= 2  # a private node holds reservations on two relays
    assert punched.seconds_to_direct is not None and punched.seconds_to_direct < 15
    for label in ("port-restricted x symmetric", "symmetric x symmetric"):
        relayed = by_case[label]
        assert relayed.path == "relay", relayed  # no direct path exists: the relay carries it
        assert relayed.relay_reservations_b >= 2
    mapped = by_case["port-restricted x port-restricted +upnp"]
    assert mapped.upnp_b == "mapped" and mapped.path == "direct", mapped
    assert mapped.relay_reservations_b == 0  # public: no relay needed

    summary = natmatrix.summarize(results)
    assert summary["direct_rate"] == 1.0 and summary["relay_fallback_rate"] == 1.0
    # everything is gone: namespaces and daemons
    assert set(netns_list()) <= before
    assert _leftover_daemons("clawnode-natmatrix-") == []


@needs_netns
def test_cleanup_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    before = set(netns_list())

    def boom(*args: object, **kwargs: object) -> natmatrix.Result:
        raise RuntimeError("case failed")

    monkeypatch.setattr(natmatrix, "_run_case", boom)
    with pytest.raises(RuntimeError, match="case failed"):
        natmatrix.run_matrix([natmatrix.parse_case("symmetric:symmetric")], repetitions=1)
    assert set(netns_list()) <= before
    assert _leftover_daemons("clawnode-natmatrix-") == []


@pytest.mark.parametrize(
    ("nat_a", "nat_b", "direct"),
    [
        ("full-cone", "full-cone", True),
        ("port-restricted", "port-restricted", True),
        ("address-restricted", "port-restricted", True),
        ("full-cone", "symmetric", True),
        ("symmetric", "address-restricted", True),
        ("port-restricted", "symmetric", False),
        ("symmetric", "port-restricted", False),
        ("symmetric", "symmetric", False),
    ],
)
def test_where_a_direct_path_exists(nat_a: str, nat_b: str, direct: bool) -> None:
    assert natmatrix.direct_path_exists(NatType(nat_a), NatType(nat_b)) is direct
    case = natmatrix.parse_case(f"{nat_a}:{nat_b}")
    assert case.expected_path() == ("hole-punch" if direct else "relay")
    assert natmatrix.parse_case(f"{nat_a}:{nat_b}+upnp").expected_path() == "direct"


def test_full_matrix_has_every_pair_and_fits_the_topology() -> None:
    cases = natmatrix.full_cases()
    assert len({(c.nat_a, c.nat_b) for c in cases if c.mapping_b == "none"}) == 16
    assert sum(1 for c in cases if c.mapping_b == "upnp") == 4
    assert len(cases) <= natmatrix.MAX_CASES  # two routers per case, 50 routers at most
    with_quic = natmatrix.full_cases(quic=True)
    assert len(with_quic) == len(cases) + 16 + 4 and {c.transport for c in with_quic} == {"tcp", "quic"}
    quic = natmatrix.parse_case("symmetric:full-cone/quic")
    assert quic.transport == "quic" and quic.label == "symmetric x full-cone /quic"
    assert natmatrix.parse_case("symmetric:full-cone").transport == "tcp"


@pytest.mark.parametrize(
    "text", ["symmetric", "cone:symmetric", "symmetric:symmetric+magic", "", "full-cone:full-cone/udp"]
)
def test_cli_rejects_a_bad_case(text: str) -> None:
    from node.cli import EXIT_CONFIG, main

    outcome = CliRunner().invoke(main, ["nat-test", "--case", text])
    assert outcome.exit_code == EXIT_CONFIG
    assert "E_INVALID_ARGUMENT" in outcome.output


def test_cli_refuses_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from node.cli import EXIT_CANNOT_START, main

    monkeypatch.setattr(natmatrix, "requirements_problem", lambda cases=(): "needs root (network namespaces)")
    outcome = CliRunner().invoke(main, ["nat-test", "--case", "symmetric:symmetric"])
    assert outcome.exit_code == EXIT_CANNOT_START
    assert "E_UNAVAILABLE" in outcome.output


def test_summary_counts_direct_and_relay_fallback() -> None:
    from rich.console import Console

    def result(case: str, path: natmatrix.Path_, data: bool = True) -> natmatrix.Result:
        parsed = natmatrix.parse_case(case)
        return natmatrix.Result(
            case=parsed.label,
            nat_a=parsed.nat_a.value,
            nat_b=parsed.nat_b.value,
            mapping_b=parsed.mapping_b,
            repetition=0,
            router_a_ip="203.0.113.101",
            router_b_ip="203.0.113.102",
            expected_path=parsed.expected_path(),
            path=path,
            data_exchanged=data,
            seconds_to_direct=0.4 if path == "hole-punch" else None,
            transport=parsed.transport,
            direct_transport=parsed.transport if path in ("hole-punch", "direct") else None,
        )

    results = [
        result("full-cone:full-cone", "hole-punch"),
        result("port-restricted:port-restricted", "relay"),  # a punch that failed: the relay carried it
        result("symmetric:symmetric", "relay"),
        result("symmetric:port-restricted", "none", data=False),
        result("port-restricted:symmetric+upnp", "direct"),
    ]
    summary = natmatrix.summarize(results)
    assert summary["direct"] == "1/2" and summary["direct_rate"] == 0.5
    assert summary["relay_fallback"] == "2/3"
    assert summary["mapped_direct"] == "1/1"
    assert summary["quic_direct"] is None

    def rendered(rows: list[natmatrix.Result]) -> str:
        console = Console(record=True, width=240, file=io.StringIO())
        console.print(natmatrix.render_table(rows))
        return console.export_text()

    text = rendered(results)
    assert "full-cone x full-cone" in text and "hole-punch (tcp)" in text and "QUIC not run" in text
    with_quic = [*results, result("address-restricted:full-cone/quic", "hole-punch")]
    assert natmatrix.summarize(with_quic)["quic_direct"] == "1/1"
    text = rendered(with_quic)
    assert "TCP AND QUIC" in text and "hole-punch (quic)" in text and "QUIC not run" not in text
