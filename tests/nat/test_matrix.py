"""The NAT matrix with real daemons: CI's short matrix and the rules it is judged by.

The namespace tests need Linux, root, `ip`, `nft` and Debian's `miniupnpd` (skipped otherwise, with
the reason). One topology, 5 public daemons and 6 home daemons (the 3 short cases at once).
Every home daemon runs the shipped defaults (0.0.0.0, default AutoNAT and relay settings).
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nat.harness.netns import CARRIER_WAN_BASE, NatType, netns_list
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


class _Own:
    """This run's namespace prefixes and data folders: another NAT run on the same box (a bench
    beside the test) adds its own namespaces and daemons meanwhile, which are not this run's leftovers."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.prefixes: list[str] = []
        self.roots: list[str] = []
        own = self
        real_mkdtemp = natmatrix.tempfile.mkdtemp

        class Recorded(natmatrix.Topology):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                own.prefixes.append(self.prefix)

        def mkdtemp(*args: Any, **kwargs: Any) -> str:
            own.roots.append(real_mkdtemp(*args, **kwargs))
            return own.roots[-1]

        monkeypatch.setattr(natmatrix, "Topology", Recorded)
        monkeypatch.setattr(natmatrix.tempfile, "mkdtemp", mkdtemp)

    def leftover_netns(self) -> list[str]:
        assert self.prefixes, "no topology was built"
        return [ns for ns in netns_list() if ns.startswith(tuple(f"{prefix}-" for prefix in self.prefixes))]

    def leftover_daemons(self) -> list[str]:
        assert self.roots, "no data folder was made"
        return [line for line in _leftover_daemons("clawnode-natmatrix-") if any(r in line for r in self.roots)]


@needs_netns
def test_short_matrix_follows_what_the_nats_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    own = _Own(monkeypatch)
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    # The home nodes start as soon as the public nodes listen (the bench waits for their verdicts).
    results = natmatrix.run_matrix(natmatrix.SHORT_CASES, keep_logs=ARTIFACTS, server_verdicts=False)
    by_case = {r.case: r for r in results}
    index = {case.label: i for i, case in enumerate(natmatrix.SHORT_CASES)}
    failed = [_explain(r, index[r.case]) for r in results if not r.ok]
    assert not failed, "\n\n".join(failed)
    assert set(by_case) == {case.label for case in natmatrix.SHORT_CASES}

    for result in results:
        # AutoNAT right on both sides of every NAT: private behind it, public once UPnP maps B's
        # port (unless a carrier-grade NAT sits in front of B's router: the mapping leads nowhere).
        # (behind a full-cone NAT, public too, once a punch dial left a mapping on its listen port)
        full_cone_a = result.nat_a == "full-cone" and not result.cgn_a
        assert result.verdict_a == "private" or (full_cone_a and result.verdict_a == "public"), result
        reachable = result.mapping_b == "upnp" and not result.cgn_b
        assert result.verdict_b == ("public" if reachable else "private"), result
        # AutoNAT servers dialed each home side only at its router's public address (the
        # carrier's, behind a double NAT).
        assert result.dials_only_router_ips, result.server_dials
        assert f"{result.router_b_ip}:{natmatrix.LISTEN_PORT}" in result.server_dials, result
        # Data went both ways on every pair, and again once the path had settled.
        assert result.data_exchanged and result.data_after_punch, result
        assert result.error == "" and result.ok, result
        assert result.seconds_start_to_data is not None  # reported by the bench (no timed assertion)

    relayed = by_case["symmetric x symmetric"]
    assert relayed.path == "relay", relayed  # no direct path exists: the relay carries it
    assert relayed.relay_reservations_b >= 2
    mapped = by_case["port-restricted x port-restricted +upnp"]
    # Direct: by the mapping, or punched first (B's DHT dial reached A through A's relay)
    assert mapped.upnp_b == "mapped" and natmatrix.path_as_allowed(mapped.path, "direct"), mapped
    assert mapped.relay_reservations_b == 0  # public: no relay needed
    assert mapped.double_nat_b is False  # one NAT: the IGD's address is the one servers see
    # Double NAT: B's home router maps by UPnP behind a carrier-grade NAT. The mapping is made but
    # leads nowhere: status says double NAT, B stays private on its relays, and A punches through
    # both NATs to a direct connection.
    double = by_case["full-cone x cgn-port-restricted +upnp"]
    assert double.upnp_b == "mapped" and double.double_nat_b is True, double
    assert double.double_nat_reason_b == "mapping_unreachable", double
    assert int(double.router_b_ip.rsplit(".", 1)[1]) > CARRIER_WAN_BASE, double  # the carrier's address
    # Direct: punched, or B's dial during the punch got through A's full-cone NAT first.
    assert natmatrix.path_as_allowed(double.path, "hole-punch") and double.path != "relay", double
    assert double.relay_reservations_b >= 2  # a private node holds reservations on two relays
    if double.path == "hole-punch":
        assert double.seconds_to_direct is not None and double.seconds_to_direct < 15

    summary = natmatrix.summarize(results)
    assert summary["direct_rate"] == 1.0 and summary["relay_fallback_rate"] == 1.0
    # everything is gone: namespaces and daemons
    assert own.leftover_netns() == []
    assert own.leftover_daemons() == []


@needs_netns
def test_cleanup_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that fails once every daemon is started (the first wait fails at once, instead of the
    ~25 s the public nodes take to reach a verdict) leaves no namespace and no daemon behind."""
    own = _Own(monkeypatch)
    started: list[natmatrix.Daemon] = []
    real_start = natmatrix.start_daemon

    def start(*args: Any, **kwargs: Any) -> natmatrix.Daemon:
        started.append(real_start(*args, **kwargs))
        return started[-1]

    def boom(*args: object, **kwargs: object) -> None:
        assert started and all(daemon.proc.poll() is None for daemon in started)  # they run
        raise RuntimeError("case failed")

    monkeypatch.setattr(natmatrix, "start_daemon", start)
    monkeypatch.setattr(natmatrix, "wait_for", boom)
    with pytest.raises(RuntimeError, match="case failed"):
        natmatrix.run_matrix([natmatrix.parse_case("symmetric:symmetric")], repetitions=1)
    assert len(started) == 5  # the relay and the four helpers
    assert own.leftover_netns() == []
    assert own.leftover_daemons() == []


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


def test_full_matrix_has_every_pair_and_the_new_cases() -> None:
    cases = natmatrix.full_cases()
    plain = [c for c in cases if c.kind == "pair" and not (c.cgn_a or c.cgn_b)]
    assert len({(c.nat_a, c.nat_b) for c in plain if c.mapping_b == "none"}) == 16
    assert sum(1 for c in plain if c.mapping_b == "upnp") == 4
    double = [c for c in cases if c.cgn_a or c.cgn_b]
    assert any(c.mapping_b == "upnp" for c in double) and any(c.mapping_b == "none" for c in double)
    assert {c.kind for c in cases} == {"pair", "same-lan", "relay-loss"}
    with_quic = natmatrix.full_cases(quic=True)
    assert len(with_quic) == len(cases) + 16 + 4 and {c.transport for c in with_quic} == {"tcp", "quic"}
    quic = natmatrix.parse_case("symmetric:full-cone/quic")
    assert quic.transport == "quic" and quic.label == "symmetric x full-cone /quic"
    assert natmatrix.parse_case("symmetric:full-cone").transport == "tcp"


@pytest.mark.parametrize(
    ("text", "label", "path"),
    [
        ("full-cone:cgn-port-restricted", "full-cone x cgn-port-restricted", "hole-punch"),
        ("symmetric:cgn-port-restricted", "symmetric x cgn-port-restricted", "relay"),  # the CGN filters by port
        ("cgn-full-cone:cgn-full-cone", "cgn-full-cone x cgn-full-cone", "hole-punch"),
        ("cgn-symmetric:cgn-full-cone", "cgn-symmetric x cgn-full-cone", "relay"),
        # UPnP behind a carrier NAT maps a port nobody outside reaches: as without UPnP
        ("full-cone:cgn-port-restricted+upnp", "full-cone x cgn-port-restricted +upnp", "hole-punch"),
        ("symmetric:cgn-port-restricted+upnp", "symmetric x cgn-port-restricted +upnp", "relay"),
        ("same-lan", "same LAN (port-restricted)", "lan"),
        ("same-lan:symmetric", "same LAN (symmetric)", "lan"),
        ("relay-loss", "relay loss (port-restricted)", "relay"),
    ],
)
def test_double_nat_same_lan_and_relay_loss_cases(text: str, label: str, path: str) -> None:
    case = natmatrix.parse_case(text)
    assert case.label == label and case.expected_path() == path
    assert case.expected_verdict_b() == "private"
    assert natmatrix.behind(NatType.FULL_CONE, NatType.PORT_RESTRICTED) is NatType.PORT_RESTRICTED
    assert natmatrix.behind(NatType.SYMMETRIC, NatType.FULL_CONE) is NatType.SYMMETRIC


def test_what_counts_as_allowed() -> None:
    # full-cone: reachable by anyone once a mapping on the listen port exists
    assert natmatrix.verdict_as_allowed("public", "private", NatType.FULL_CONE)
    assert not natmatrix.verdict_as_allowed("public", "private", NatType.PORT_RESTRICTED)
    assert not natmatrix.verdict_as_allowed("unknown", "private", NatType.FULL_CONE)
    # a pair that allows a punch may end direct without one; a relay-only pair may not end direct
    assert natmatrix.path_as_allowed("direct", "hole-punch") and natmatrix.path_as_allowed("lan", "lan")
    assert not natmatrix.path_as_allowed("direct", "relay") and not natmatrix.path_as_allowed("relay", "hole-punch")
    # a mapped B is reached directly, by a plain dial or a punch; never over the relay alone
    assert natmatrix.path_as_allowed("hole-punch", "direct") and not natmatrix.path_as_allowed("relay", "direct")


def test_log_lines_a_minute() -> None:
    assert natmatrix.lines_per_minute([]) == 0
    assert natmatrix.lines_per_minute([0.0, 10.0, 59.9, 60.0, 61.0]) == 4  # 10.0 .. 61.0: within 60 s
    assert natmatrix.lines_per_minute([0.0, 60.0, 120.0]) == 1
    assert natmatrix.lines_per_minute([float(i) for i in range(0, 600, 5)]) == 12


@pytest.mark.parametrize(
    "text",
    ["symmetric", "cone:symmetric", "symmetric:symmetric+magic", "", "full-cone:full-cone/udp", "cgn-:full-cone"],
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


def _result_of(case: natmatrix.Case, **measured: Any) -> natmatrix.Result:
    """A result of ``case`` (its first run, routers at .101 and .102) with what was ``measured``."""
    return natmatrix.Result(
        case=case.label,
        kind=case.kind,
        cgn_b=case.cgn_b,
        nat_a=case.nat_a.value,
        nat_b=case.nat_b.value,
        mapping_b=case.mapping_b,
        repetition=0,
        router_a_ip="203.0.113.101",
        router_b_ip="203.0.113.102",
        transport=case.transport,
        **measured,
    )


def test_summary_counts_direct_and_relay_fallback() -> None:
    from rich.console import Console

    def result(case: str, path: natmatrix.Path_, data: bool = True, start_to_data: float = 8.0) -> natmatrix.Result:
        parsed = natmatrix.parse_case(case)
        return _result_of(
            parsed,
            seconds_start_to_data=start_to_data if data else None,
            expected_path=parsed.expected_path(),
            path=path,
            data_exchanged=data,
            seconds_to_direct=0.4 if path == "hole-punch" else None,
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
    assert summary["first_data_p50_s"] == 8.0 and summary["relay_recovery_s"] is None
    # a double NAT pair and a same-LAN pair count where a direct path exists; relay loss apart
    loss = result("relay-loss", "relay")
    loss.relay_recovery_s = 2.5
    double = result("full-cone:cgn-port-restricted", "hole-punch", start_to_data=20.0)
    more = [*results, double, result("same-lan", "lan"), loss]
    summary = natmatrix.summarize(more)
    assert summary["direct"] == "3/4" and summary["relay_recovery_s"] == 2.5
    assert natmatrix.summary_line(summary) == (
        "nat_matrix: direct_rate=0.75 relay_fallback=0.667 first_data_p50_s=8.0 relay_recovery_s=2.5"
    )

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


class _ScriptedHome:
    """A's API as the matrix reads it: each status read moves to the next moment of a punch."""

    def __init__(self, b_id: str, moments: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        self.b_id, self.moments, self.now = b_id, moments, 0

    def api(self, path: str) -> dict[str, Any]:
        peer, punch = self.moments[min(self.now, len(self.moments) - 1)]
        if path == "/api/status":
            self.now += 1
            return {"hole_punch": punch}
        assert path == "/api/peers"
        return {"peers": [{"peer_id": self.b_id, **peer}]}


def test_a_punch_that_goes_direct_after_a_failed_attempt_is_told_with_its_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CI once read this as a hole punch with no time: the first attempt failed while a second was
    running, and the path was settled at the failure."""
    monkeypatch.setattr(natmatrix.time, "sleep", lambda _s: None)
    failed = {"outcome": "failed", "seconds": 2.1, "finished_at": 1.0}
    direct = {"outcome": "direct", "seconds": 0.8, "finished_at": 2.0}
    relayed = {"connection": "relayed", "transport": None}
    punched = {"connection": "direct", "hole_punched": True, "transport": "tcp"}
    home = _ScriptedHome(
        "B",
        [
            (relayed, {"direct": 0, "failed": 1, "in_progress": 1, "recent": [failed]}),
            (relayed, {"direct": 0, "failed": 1, "in_progress": 1, "recent": [failed]}),
            (punched, {"direct": 1, "failed": 1, "in_progress": 0, "recent": [failed, direct]}),
        ],
    )
    case = natmatrix.parse_case("full-cone:cgn-port-restricted+upnp")
    result = _result_of(case)
    path = natmatrix._settle_path(home, home, "B", case, result)  # type: ignore[arg-type]
    assert path == "hole-punch" and result.seconds_to_direct == 0.8 and result.direct_transport == "tcp"
    # A punch that failed for good leaves the relayed path, with no time.
    home = _ScriptedHome("B", [(relayed, {"direct": 0, "failed": 1, "in_progress": 0, "recent": [failed]})])
    result.seconds_to_direct = None
    assert natmatrix._settle_path(home, home, "B", case, result) == "relay"  # type: ignore[arg-type]
    assert result.seconds_to_direct is None
