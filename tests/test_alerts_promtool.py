"""The shipped alert rules checked and unit-tested by Prometheus's own ``promtool``.

``promtool`` comes with Debian's ``prometheus`` package (``scripts/test`` installs it when it can);
without it these tests skip, with the reason, and ``tests/test_alerts.py`` still evaluates the
same rules with the daemon's evaluator.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parent.parent / "node" / "alerts.yml"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")

# Series per rule: a value that crosses the threshold, and when the alert must (not) fire,
# `for:` included. Times are minutes of the promtool test's clock.
UNIT_TESTS = """\
rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: clawnode_settlement_queue_oldest_age_seconds
        values: "0+600x40"        # 600 s older every minute: > 10800 from minute 19
      - series: clawnode_ledger_write_failures
        values: "0x4 1x10 0x10"   # the first failed write at minute 5, a write lands again at minute 16
      - series: clawnode_lease_failures_total{{op="open",code="E_UNAVAILABLE"}}
        values: "0+5x40"          # 5 failures a minute
      - series: clawnode_escrow_disconnected
        values: "0x40"
      - series: clawnode_service_restarts_total{{service="router"}}
        values: "0x4 1x10"        # the router failed and was restarted at minute 5
      - series: clawnode_offers_skipped
        values: "0x2 1x10"        # a stored offer could not be sealed at minute 3
      - series: clawnode_escrow_ledger_mismatches
        values: "0x6 2x10"        # the reconciliation flagged two escrows at minute 7
    alert_rule_test:
      - eval_time: 28m
        alertname: SettlementQueueStalled
        exp_alerts: []            # over the threshold, but not yet for 10 minutes
      - eval_time: 30m
        alertname: SettlementQueueStalled
        exp_alerts:
          - exp_labels: {{severity: P0}}
            exp_annotations:
              summary: The oldest pending settlement is more than 3 hours old; money is not landing.
      - eval_time: 4m
        alertname: LedgerWriteFailures
        exp_alerts: []
      - eval_time: 6m
        alertname: LedgerWriteFailures
        exp_alerts:
          - exp_labels: {{severity: P0}}
            exp_annotations:
              summary: The ledger failed to write (disk full or storage error); usage may go unrecorded.
      - eval_time: 17m
        alertname: LedgerWriteFailures
        exp_alerts: []            # resolved: the gauge counts failures since the last write that landed
      - eval_time: 2m
        alertname: LeaseFailureRate
        exp_alerts: []
      - eval_time: 20m
        alertname: LeaseFailureRate
        exp_alerts:
          - exp_labels: {{severity: P1}}
            exp_annotations:
              summary: More than 20 lease opens or calls were refused or failed in 15 minutes.
      - eval_time: 30m
        alertname: EscrowChainDisconnected
        exp_alerts: []
      - eval_time: 4m
        alertname: ServiceRestarting
        exp_alerts: []
      - eval_time: 6m
        alertname: ServiceRestarting
        exp_alerts:
          - exp_labels: {{severity: P1, service: router}}
            exp_annotations:
              summary: A node service failed and was restarted in the last 15 minutes; the node kept running.
      - eval_time: 2m
        alertname: OfferSkipped
        exp_alerts: []
      - eval_time: 4m
        alertname: OfferSkipped
        exp_alerts:
          - exp_labels: {{severity: P1}}
            exp_annotations:
              summary: An offer is left unpublished as its record cannot be sealed; replace or delete it.
      - eval_time: 6m
        alertname: EscrowLedgerMismatch
        exp_alerts: []
      - eval_time: 7m
        alertname: EscrowLedgerMismatch
        exp_alerts:
          - exp_labels: {{severity: P0}}
            exp_annotations:
              summary: >-
                The ledger holds escrow locks, claims or refunds the chain does not know;
                see `clawnode status` and `clawnode ledger --settlements`.
"""


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_rules_file() -> None:
    checked = _promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 14 rules found" in checked.stdout


def test_rules_fire_in_prometheus_as_in_the_daemon(tmp_path: Path) -> None:
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(UNIT_TESTS.format(rules=RULES), encoding="utf-8")
    ran = _promtool("test", "rules", str(tests))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "SUCCESS" in ran.stdout
