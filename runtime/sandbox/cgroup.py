"""A cgroup (v1) of its own for each ``native`` run: memory, processes and CPU counted for that run only.

Where the host mounts cgroup v1 with the ``memory``, ``pids`` and ``cpu`` controllers and the node may
create groups under its own (``/proc/self/cgroup``), each run gets ``clawnode-run-<random>`` in all
three: ``memory.limit_in_bytes`` (the run's memory cap: resident memory and its tmpfs, where the
address-space rlimit counts mappings), ``pids.max`` (its processes and threads, where
``RLIMIT_NPROC`` counts every process of the user), and ``cpu.cfs_quota_us`` (one CPU at most). The
run moves itself in before it execs anything (a ``/bin/sh`` that writes its own pid, then execs
``prlimit`` and bubblewrap), so no process of the run is ever outside. After the run the group says
what stopped it (the OOM killer, refused forks), any process left in it is killed, and it is removed.

Elsewhere (cgroup v2 only, no such controllers, a read-only ``/sys/fs/cgroup``, not allowed to create
groups) :func:`detect` says why, and the rlimits alone stay (``runtime/sandbox/native.py``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
# Bubblewrap and the pid namespace's init count as processes of the run too.
PIDS_OVERHEAD = 2


@dataclass(frozen=True)
class CgroupRoots:
    """The node's own group in each controller's hierarchy: where run groups are made."""

    dirs: dict[str, Path]


def _mounts(mounts_text: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != "cgroup":
            continue
        for option in fields[3].split(","):
            if option in CONTROLLERS:
                found.setdefault(option, Path(fields[1]))
    return found


def _own_groups(cgroup_text: str) -> dict[str, str]:
    own: dict[str, str] = {}
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                own[controller] = parts[2]
    return own


def detect() -> tuple[CgroupRoots | None, str]:
    """The roots for run groups, or None and why not (a stable reason)."""
    try:
        mounts = _mounts(Path("/proc/self/mounts").read_text())
        own = _own_groups(Path("/proc/self/cgroup").read_text())
    except OSError:
        return None, "cgroup_unreadable"
    if not mounts:
        return None, "cgroup_v1_not_mounted"  # cgroup v2 only, or none: the rlimits stay
    missing = [c for c in CONTROLLERS if c not in mounts or c not in own]
    if missing:
        return None, f"cgroup_no_{missing[0]}_controller"
    dirs = {c: mounts[c] / own[c].lstrip("/") for c in CONTROLLERS}
    probe_name = f"clawnode-probe-{secrets.token_hex(4)}"
    made: list[Path] = []
    try:
        for directory in dirs.values():
            probe = directory / probe_name
            probe.mkdir()
            made.append(probe)
    except OSError:
        return None, "cgroup_not_writable"
    finally:
        for probe in made:
            with contextlib.suppress(OSError):
                probe.rmdir()
    return CgroupRoots(dirs), "cgroup_v1"


@dataclass(frozen=True)
class RunUsage:
    oom_killed: bool  # the memory limit's OOM killer stopped a process of the run
    forks_refused: int  # forks and clones the pids limit refused
    memory_peak: int


class RunCgroup:
    """One run's groups; create with :meth:`make`, always :meth:`remove` (kills what is left)."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs

    @classmethod
    def make(cls, roots: CgroupRoots, *, memory_bytes: int, pids: int, uid: int | None) -> RunCgroup:
        name = f"clawnode-run-{secrets.token_hex(6)}"
        group = cls({c: d / name for c, d in roots.dirs.items()})
        try:
            for directory in group.dirs.values():
                directory.mkdir()
            mem = group.dirs["memory"]
            (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):  # without swap accounting there is no memsw file
                (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
            (group.dirs["pids"] / "pids.max").write_text(str(pids + PIDS_OVERHEAD))
            (group.dirs["cpu"] / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (group.dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(CPU_PERIOD_US))
            if uid is not None:  # the run drops to this user before it moves itself in
                for directory in group.dirs.values():
                    os.chown(directory / "cgroup.procs", uid, -1)
        except OSError:
            group.remove()
            raise
        return group

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run by a shell that first moves itself into every group of the run (exit 125 if it cannot)."""
        script = (
            'for f in "$@"; do case "$f" in --) break;; esac; echo $$ > "$f" || exit 125; shift; done; shift; exec "$@"'
        )
        return ["/bin/sh", "-c", script, "sh", *self.procs_files, "--", *argv]

    def usage(self) -> RunUsage:
        oom = forks = peak = 0
        with contextlib.suppress(OSError, ValueError):
            for line in (self.dirs["memory"] / "memory.oom_control").read_text().splitlines():
                if line.startswith("oom_kill "):
                    oom = int(line.split()[1])
        with contextlib.suppress(OSError, ValueError):
            for line in (self.dirs["pids"] / "pids.events").read_text().splitlines():
                if line.startswith("max "):
                    forks = int(line.split()[1])
        with contextlib.suppress(OSError, ValueError):
            peak = int((self.dirs["memory"] / "memory.max_usage_in_bytes").read_text())
        return RunUsage(oom > 0, forks, peak)

    def kill_all(self) -> None:
        for directory in self.dirs.values():
            with contextlib.suppress(OSError):
                for pid in (directory / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)

    def remove(self, wait_s: float = 5.0) -> None:
        """Kill whatever is left in the run's groups and remove them (a group empties once its processes
        are reaped: retried for ``wait_s``)."""
        deadline = time.monotonic() + wait_s
        for directory in self.dirs.values():
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # not empty yet: kill what is left, wait for it to be reaped
                    if time.monotonic() > deadline:
                        break
                    self.kill_all()
                    time.sleep(0.01)
