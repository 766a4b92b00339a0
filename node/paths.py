"""Where a node keeps its files. Cheap to import: the CLI's client commands start with it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

DATA_DIR_ENV = "CLAWNODE_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.clawnode")


def resolve_data_dir(flag: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """``--data-dir``, else ``$CLAWNODE_DATA_DIR``, else ``~/.clawnode``."""
    environ = os.environ if environ is None else environ
    chosen = flag or environ.get(DATA_DIR_ENV) or str(DEFAULT_DATA_DIR)
    return Path(chosen).expanduser()
