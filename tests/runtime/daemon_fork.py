"""``clawnode start`` forked from a fork server (tests/runtime/forkserver.py) with its imports paid.

``run([LOG, ARG...])`` sends the process's stdout and stderr to the file ``LOG`` and runs the CLI with
``ARG...`` (``start --data-dir DIR``), as ``python -m node.cli ARG...`` would: the same daemon, a process
of its own, only without the interpreter start and the imports (several seconds on two busy cores).
"""

from __future__ import annotations

import os
import sys

import node.cli
import node.daemon
import runtime.inference.engine  # noqa: F401


def run(argv: list[str]) -> None:
    log, *args = argv
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.argv = ["clawnode", *args]
    node.cli.main()
