import os

# ggml's abort handler forks gdb, and orphaned children can hang a test run.
os.environ.setdefault("GGML_NO_BACKTRACE", "1")

import logging

import libp2p  # noqa: F401 - configures its loggers on import; ours must come after

# py-libp2p warns on every normal DHT stream close and every peer that hangs up;
# the daemon silences the same logger unless log.level is debug.
logging.getLogger("libp2p").setLevel(logging.CRITICAL)
