"""Small file helpers shared by every layer."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path

from runtime.errors import Reason

log = logging.getLogger(__name__)

# Errors a full or failing disk raises; a save that meets one is skipped, logged and counted.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
LOG_EVERY_S = 60.0
# The message of the E_UNAVAILABLE a write refused for want of disk space carries: the stable reason first.
DISK_FULL_REASON = str(Reason.DISK_FULL)
DISK_FULL_MESSAGE = f"{DISK_FULL_REASON}: the node's disk is full or failing; changes are refused until space returns"


class _SaveFailures:
    """Saves skipped since start (``total``) and since the last save that worked (``current``)."""

    def __init__(self) -> None:
        self.total = 0
        self.current = 0
        self._last_log = float("-inf")
        self._lock = threading.Lock()

    def failed(self, name: str, error: OSError) -> None:
        with self._lock:
            self.total += 1
            self.current += 1
            now = time.monotonic()
            if now - self._last_log < LOG_EVERY_S:
                return
            self._last_log = now
        # The file's name only, never its path.
        log.warning("could not save %s: %s (the data dir is full or failing); will retry", name, error.strerror)

    def worked(self) -> None:
        with self._lock:
            self.current = 0


save_failures = _SaveFailures()


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so a crash leaves the old or the new file, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        # A half-written temporary file would hold on to the space a full disk needs back.
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def save_quietly(path: Path, text: str) -> bool:
    """``write_atomically`` for a node's own state files: a full or failing disk (ENOSPC, EIO, ...)
    keeps the old file, logs one line a minute and counts the failure instead of raising into the
    service that saves. True when the file was written."""
    try:
        write_atomically(path, text)
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        save_failures.failed(path.name, error)
        return False
    save_failures.worked()
    return True
