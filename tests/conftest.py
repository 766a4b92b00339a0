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
