import logging
import os
from collections.abc import Iterator

import libp2p  # noqa: F401 - configures its loggers on import; ours must come after
import pytest

from tests.support.processes import DaemonProcess

# ggml's abort handler forks gdb, and orphaned children can hang a test run.
os.environ.setdefault("GGML_NO_BACKTRACE", "1")

# py-libp2p warns on every normal DHT stream close and every peer that hangs up;
# the daemon silences the same logger unless log.level is debug.
logging.getLogger("libp2p").setLevel(logging.CRITICAL)


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Daemons a test started; whatever still runs at its end is killed."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.kill()


@pytest.fixture
def scan_logs_for_secrets(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Collects every clawnode log line of a test (at DEBUG) and, at its end, checks that none
    carries a local path; tests add their tokens to the yielded list to have them checked too."""
    for name in ("node", "protocols", "runtime", "dht", "bootstrap"):
        caplog.set_level(logging.DEBUG, logger=name)
    secrets: list[str] = []
    yield secrets
    for record in caplog.records:
        text = record.getMessage()
        assert "/tmp/" not in text and "pytest-of-" not in text, text
        assert not any(secret in text for secret in secrets), "a secret reached a log line"
