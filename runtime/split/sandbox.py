"""The sandbox the split model's processes run in: bubblewrap and rlimits, as the seller's layer
server and the consumer's split worker both use them (docs/split.md, "The seller's safety" and "The
consumer's worker").

``sandbox_argv`` wraps a command in ``bwrap --unshare-all`` (its own user, pid, ipc, uts, cgroup and,
unless ``share_net``, network namespaces; ``--die-with-parent``; a new session; an empty environment
but what it is given) with a file system of ``/usr``, the interpreter, the virtual environment and
the ``runtime/`` code, read-only, a private ``/tmp`` and only the paths it is given. ``limits_argv``
sets rlimits with ``prlimit`` before bubblewrap starts: address space, open files, no core dumps.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

BWRAP = "/usr/bin/bwrap"
PRLIMIT = "/usr/bin/prlimit"
MAX_FILES = 64


def bwrap_available() -> bool:
    return os.access(BWRAP, os.X_OK)


def code_root() -> str:
    """The folder that holds the ``runtime`` package (the PYTHONPATH of the sandboxed processes)."""
    return str(Path(__file__).resolve().parents[2])


def _library_folders() -> list[str]:
    from runtime.split import rpc

    lib = rpc.library_dir()
    return [str(lib.parent.resolve())] if lib is not None else []


def sandbox_argv(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    read_only: Sequence[tuple[str, str]] = (),
    writable: Sequence[str] = (),
    share_net: bool = False,
) -> list[str]:
    """``command`` under bubblewrap, seeing only ``env``, the base mounts, each ``(source, dest)`` of
    ``read_only`` (a path missing on the host is left out) and each folder of ``writable``."""
    argv = [BWRAP, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv"]
    if share_net:
        argv.append("--share-net")
    for name, value in env.items():
        argv += ["--setenv", name, value]
    argv += ["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib"]
    argv += ["--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    mounted: list[str] = ["/usr"]
    for folder in (sys.base_prefix, sys.prefix, code_root() + "/runtime", *_library_folders()):
        if not any(folder == m or folder.startswith(m + "/") for m in mounted):
            argv += ["--ro-bind", folder, folder]
            mounted.append(folder)
    for source, dest in read_only:
        argv += ["--ro-bind-try", source, dest]
    for folder in writable:
        argv += ["--bind", folder, folder]
    return [*argv, "--chdir", "/tmp", "--", *command]


def limits_argv(command: Sequence[str], memory_bytes: int, max_files: int = MAX_FILES) -> list[str]:
    """``command`` under rlimits (where ``prlimit`` is installed): ``memory_bytes`` of address space,
    ``max_files`` open files, no core dumps."""
    if not os.access(PRLIMIT, os.X_OK):
        return list(command)
    return [PRLIMIT, f"--as={memory_bytes}", f"--nofile={max_files}", "--core=0", "--", *command]
