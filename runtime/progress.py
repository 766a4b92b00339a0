"""A one-line progress bar for long work reported on a text stream (model loading at start).

On a terminal the line is redrawn in place; into a file or a journal (systemd) each quarter is one
line, so logs stay short. Safe to call from worker threads: llama.cpp reports load progress from
the thread that loads the model.
"""

from __future__ import annotations

import threading
from typing import TextIO

WIDTH = 24
QUARTERS = 4


class ProgressBar:
    def __init__(self, label: str, stream: TextIO) -> None:
        self.label = label
        self.stream = stream
        self._lock = threading.Lock()
        self._fraction = 0.0
        self._printed_step = -1
        try:
            self._tty = stream.isatty()
        except (AttributeError, ValueError):
            self._tty = False

    def line(self, fraction: float, note: str = "") -> str:
        filled = round(WIDTH * fraction)
        bar = "#" * filled + "." * (WIDTH - filled)
        return f"{self.label} [{bar}] {100 * fraction:3.0f}%" + (f" {note}" if note else "")

    def update(self, fraction: float, note: str = "") -> None:
        """Report ``fraction`` (0.0 … 1.0) done; never raises (progress must not break the work)."""
        fraction = min(1.0, max(0.0, float(fraction)))
        with self._lock:
            if fraction < self._fraction:
                return
            self._fraction = fraction
            step = min(int(fraction * QUARTERS), QUARTERS - 1)  # the full bar is done()'s to print
            if self._tty:
                self._write("\r" + self.line(fraction, note))
            elif step > self._printed_step:
                self._printed_step = step
                self._write(self.line(fraction, note) + "\n")

    def done(self, note: str) -> None:
        """The work finished: the full bar, with ``note`` (on a terminal, in place of the last redraw)."""
        with self._lock:
            self._fraction = 1.0
            self._printed_step = QUARTERS
            self._write(("\r" if self._tty else "") + self.line(1.0, note) + "\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass
