"""``native`` runs: a program (an ELF binary or a ``#!`` script) under bubblewrap, for sellers who opt in.

The sandbox of one run (``bwrap --unshare-all --die-with-parent``):

* **Namespaces**: new user, pid, network (loopback only, nothing routed), ipc, uts and cgroup
  namespaces; a new session (no terminal to inject into).
* **File system**: a read-only root made of the host's ``/usr`` only (``/bin``, ``/lib`` and
  ``/lib64`` are links into it): no ``/home``, ``/root``, ``/etc``, ``/var`` or data directory, so
  the node's identity key and wallet are not there to read. The program is bound read-only at
  ``/task/program``, a private ``/tmp`` is a size-capped tmpfs; the input arrives on stdin (a
  read-only file) and the output leaves on stdout (a pipe the node reads up to the output cap).
* **seccomp** (x86_64): a filter kills the process on calls that reach for the kernel's
  privileged or cross-process surface (``ptrace``, ``mount``, ``unshare``, ``setns``, ``bpf``,
  ``keyctl``, ``perf_event_open``, ``io_uring_*``, module loading, ...) and refuses sockets of any
  family but ``AF_UNIX`` with ``EACCES``.
* **cgroup** (``runtime/sandbox/cgroup.py``): where the host has cgroup v1 with the memory, pids and
  cpu controllers and lets the node make groups, each run has a group of its own: resident memory
  at the memory cap (the OOM killer: ``memory_limit``), processes at the process cap (a refused fork
  is counted as a refused call ``fork``), one CPU, and whatever is left in it is killed when the run
  ends. Elsewhere (``cgroup_mode`` says why) the rlimits alone hold.
* **Limits** (rlimits, set by ``prlimit`` before bubblewrap starts): CPU seconds from the fuel cap (native fuel is
  CPU-milliseconds), address space from the memory cap, processes and threads (``RLIMIT_NPROC``,
  counted for the unprivileged user the run uses), open files, file size, no core dumps; the wall
  clock is the node's: at the cap the whole process group (and, through the pid namespace, every
  process the program started) is killed.
* **Reproducible**: ``/dev/urandom`` and ``/dev/random`` are a read-only stream seeded by the
  program's hash and the input (:data:`RANDOM_BYTES` long), ``getrandom(2)`` answers ``ENOSYS`` (so
  libraries fall back to the device) and ``PYTHONHASHSEED=0``; pids start at 1 in the new pid
  namespace. The clock is pinned where Debian's ``libfaketime`` is installed (``clock_mode``):
  the program runs with it preloaded (it lies under the read-only ``/usr``), every clock starts at
  :data:`CLOCK_START` (2000-01-01 00:00:00 UTC, the same for every task) and advances
  :data:`CLOCK_STEP` seconds per reading, not with real time, so a program that prints the date
  or times itself prints the same on the seller's run and the arbiter's. A program reading
  randomness or the clock gives the seller and an arbiter the same output. Not pinned: statically
  linked programs (they read the clock without libc), and everywhere on a node without
  libfaketime; their disputes go to a person when the re-runs differ. Under the pinned clock
  sleeps and ``select``/``poll`` timeouts take their real time, but a wait on a lock or condition
  with a timeout measured on the monotonic clock (``sem_clockwait``: Python's ``Lock.acquire``
  with a timeout, ``Event.wait``, ``queue.get`` with a timeout) does not end at its timeout: the
  run's wall clock ends it.
* **Identity**: when the node runs as root, the run drops to ``nobody`` (65534) before bubblewrap,
  so the process limit counts only sandboxed processes.

A native run's fuel is the CPU time ``wait4`` reports for bubblewrap (the processes it waited for:
an estimate, a process killed by a signal inside the pid namespace may not be counted); the cap is
``RLIMIT_CPU`` (SIGXCPU, then SIGKILL: ``fuel_exhausted``). It is not deterministic: a dispute over
a native run compares the output and how it ended, not the fuel (``protocols.machines.task_run``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import selectors
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import trio

from runtime.errors import ClawnodeError, ErrorCode
from runtime.sandbox.cgroup import CgroupRoots, RunCgroup, detect
from runtime.sandbox.limits import (
    Limits,
    Outcome,
    RunResult,
    SandboxReason,
    check_run,
    checked_program,
    refuse,
    sha256_hex,
)
from runtime.sandbox.stats import SandboxStats

KIND = "native"
BWRAP = "/usr/bin/bwrap"
PRLIMIT = "/usr/bin/prlimit"
MAX_PROGRAM_BYTES = 256 * 1024
# The bytes a run reads from /dev/urandom and /dev/random: a stream seeded by the program and its input.
RANDOM_BYTES = 256 * 1024
PROGRAM_CACHE = 16
TMP_BYTES = 16 * 1024 * 1024
# Room left in the user-wide process count for other runs where each run has a cgroup of its own.
NPROC_BACKSTOP = 1024
NOBODY = 65534
# The pinned clock (libfaketime, preloaded into the program): where every run's clocks start and how
# far they advance per reading (seconds). An arbiter's second run (a salt) starts at another instant.
CLOCK_START = 946684800  # 2000-01-01 00:00:00 UTC
CLOCK_STEP = "0.000001"
FAKETIME_LIBRARIES = tuple(
    f"/usr/lib/{triplet}/faketime/libfaketimeMT.so.1"
    for triplet in ("x86_64-linux-gnu", "aarch64-linux-gnu", "riscv64-linux-gnu")
)

# -- seccomp (classic BPF, x86_64) --
_AUDIT_ARCH_X86_64 = 0xC000003E
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_EACCES = 13
_ENOSYS = 38
_SYS_SOCKET = 41
_SYS_GETRANDOM = 318
_AF_UNIX = 1
# Privileged or cross-process calls a task has no business making: the process is killed (SIGSYS).
_KILLED_CALLS = {
    "ptrace": 101,
    "pivot_root": 155,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "sethostname": 170,
    "setdomainname": 171,
    "init_module": 175,
    "delete_module": 176,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def seccomp_filter() -> bytes | None:
    """The filter as a BPF program bubblewrap loads (``--seccomp FD``); None off x86_64 (not applied)."""
    if platform.machine() != "x86_64":
        return None
    ld_w_abs, jeq_k, ret_k = 0x20, 0x15, 0x06
    prog = [
        _insn(ld_w_abs, 0, 0, 4),  # arch
        _insn(jeq_k, 1, 0, _AUDIT_ARCH_X86_64),
        _insn(ret_k, 0, 0, _RET_KILL_PROCESS),
        _insn(ld_w_abs, 0, 0, 0),  # syscall number
    ]
    for number in sorted(_KILLED_CALLS.values()):
        prog += [_insn(jeq_k, 0, 1, number), _insn(ret_k, 0, 0, _RET_KILL_PROCESS)]
    # getrandom(2) is "not implemented": libraries fall back to /dev/urandom, the run's seeded stream.
    prog += [_insn(jeq_k, 0, 1, _SYS_GETRANDOM), _insn(ret_k, 0, 0, _RET_ERRNO | _ENOSYS)]
    prog += [
        _insn(jeq_k, 0, 3, _SYS_SOCKET),
        _insn(ld_w_abs, 0, 0, 16),  # args[0] (low half): the address family
        _insn(jeq_k, 0, 1, _AF_UNIX),
        _insn(ret_k, 0, 0, _RET_ALLOW),
        _insn(ld_w_abs, 0, 0, 0),  # not a socket call, or a socket of another family
        _insn(jeq_k, 0, 1, _SYS_SOCKET),
        _insn(ret_k, 0, 0, _RET_ERRNO | _EACCES),
        _insn(ret_k, 0, 0, _RET_ALLOW),
    ]
    return b"".join(prog)


def seeded_random(program: bytes, input: bytes, salt: bytes = b"") -> bytes:
    """What the run reads as randomness: the same for every run of this program on this input (a seller's
    and an arbiter's re-run), different for another program, input or ``salt``."""
    seed = hashlib.sha256(
        b"clawnode-native-random\0" + hashlib.sha256(program).digest() + hashlib.sha256(salt).digest() + input
    ).digest()
    return hashlib.shake_256(seed).digest(RANDOM_BYTES)


def faketime_library() -> str | None:
    """Debian's libfaketime (package ``libfaketime``), under ``/usr`` (the sandbox sees only that); None when
    it is not installed."""
    return next((path for path in FAKETIME_LIBRARIES if os.path.isfile(path)), None)


def pinned_clock(salt: bytes = b"") -> str:
    """libfaketime's ``FAKETIME`` for a run: :data:`CLOCK_START` (shifted by up to a year for a ``salt``: an
    arbiter's second run sees whether the output depends on the clock), :data:`CLOCK_STEP` per reading."""
    offset = 0
    if salt:
        offset = int.from_bytes(hashlib.sha256(b"clawnode-native-clock\0" + salt).digest()[:4], "big") % (366 * 86400)
    start = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(CLOCK_START + offset))
    return f"@{start} i{CLOCK_STEP}"


def bwrap_available() -> bool:
    return os.access(BWRAP, os.X_OK) and os.access(PRLIMIT, os.X_OK)


def _user_tasks(uid: int) -> int:
    """Processes and threads the user runs now (what RLIMIT_NPROC counts)."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return count


class NativeSandbox:
    """Programs by sha256 (bounded cache of their bytes), each run in a fresh bubblewrap sandbox."""

    def __init__(
        self,
        *,
        max_program_bytes: int = MAX_PROGRAM_BYTES,
        cap: Limits | None = None,
        stats: SandboxStats | None = None,
        concurrency: int = 2,
        cgroups: bool = True,
    ) -> None:
        self.max_program_bytes = max_program_bytes
        self.cap = cap or Limits(fuel=60_000, memory_bytes=512 * 1024 * 1024, wall_s=60.0, output_bytes=256 * 1024)
        self.stats = stats or SandboxStats()
        self._programs: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(concurrency)
        self._seccomp = seccomp_filter()
        # A cgroup of its own per run where the host allows it; otherwise why not, and the rlimits alone.
        self._cgroups: CgroupRoots | None = None
        self.cgroup_mode = "off"
        if cgroups:
            self._cgroups, self.cgroup_mode = detect()
        # The pinned clock where libfaketime is installed; otherwise why not (the runs read the host's clock).
        self._faketime = faketime_library()
        self.clock_mode = "pinned" if self._faketime else "not_pinned: libfaketime is not installed"

    def has(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._programs

    def load(self, program: bytes, sha256: str | None = None) -> str:
        try:
            digest = checked_program(program, sha256, self.max_program_bytes, "program")
            if not (program.startswith(b"\x7fELF") or program.startswith(b"#!")):
                raise refuse(ErrorCode.INVALID_ARGUMENT, SandboxReason.MODULE_INVALID, "not an ELF binary or a script")
        except ClawnodeError as error:
            self.stats.refused(KIND, error.reason or "")
            raise
        with self._lock:
            self._programs[digest] = program
            self._programs.move_to_end(digest)
            while len(self._programs) > PROGRAM_CACHE:
                self._programs.popitem(last=False)
        return digest

    async def run_async(self, sha256: str, input: bytes, limits: Limits, salt: bytes = b"") -> RunResult:
        return await trio.to_thread.run_sync(
            functools.partial(self.run, sha256, input, limits, salt=salt), limiter=self._limiter
        )

    def run(self, sha256: str, input: bytes, limits: Limits, *, salt: bytes = b"") -> RunResult:
        """Run a loaded program on ``input`` under ``limits`` in bubblewrap. Blocks: a worker thread's job.
        ``salt`` changes the run's random stream (an arbiter's second run: does the output depend on it?)."""
        try:
            check_run(limits, self.cap, input)
            if not bwrap_available():
                raise refuse(
                    ErrorCode.UNAVAILABLE, SandboxReason.SANDBOX_UNAVAILABLE, "bubblewrap or prlimit is not installed"
                )
            with self._lock:
                program = self._programs.get(sha256)
            if program is None:
                raise refuse(ErrorCode.NOT_FOUND, SandboxReason.MODULE_UNKNOWN, "the program is not loaded")
        except ClawnodeError as error:
            self.stats.refused(KIND, error.reason or "")
            raise
        self.stats.ran(KIND)
        scratch = Path(tempfile.mkdtemp(prefix="clawnode-native-"))
        try:
            return self._run_in(scratch, program, input, limits, salt)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _argv(self, scratch: Path, seccomp_fd: int | None, salt: bytes = b"") -> list[str]:
        argv = [
            BWRAP,
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
            "--setenv",
            "PATH",
            "/usr/bin:/bin",
            "--ro-bind",
            "/usr",
            "/usr",
            "--symlink",
            "usr/bin",
            "/bin",
            "--symlink",
            "usr/lib",
            "/lib",
            "--symlink",
            "usr/lib64",
            "/lib64",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            # bwrap's /dev/shm is an unbounded tmpfs: a program could fill it past its output cap.
            "--size",
            str(TMP_BYTES),
            "--tmpfs",
            "/dev/shm",
            "--ro-bind",
            str(scratch / "random"),
            "/dev/urandom",
            "--ro-bind",
            str(scratch / "random"),
            "/dev/random",
            "--setenv",
            "PYTHONHASHSEED",
            "0",
            "--size",
            str(TMP_BYTES),
            "--tmpfs",
            "/tmp",
            "--ro-bind",
            str(scratch / "program"),
            "/task/program",
            "--chdir",
            "/tmp",
        ]
        if self._faketime is not None:  # the library lies under the read-only /usr bound above
            argv += ["--setenv", "LD_PRELOAD", self._faketime, "--setenv", "FAKETIME", pinned_clock(salt)]
        if seccomp_fd is not None:
            argv += ["--seccomp", str(seccomp_fd)]
        return [*argv, "--", "/task/program"]

    def _run_in(self, scratch: Path, program: bytes, input: bytes, limits: Limits, salt: bytes) -> RunResult:
        os.chmod(scratch, 0o755)
        (scratch / "program").write_bytes(program)
        os.chmod(scratch / "program", 0o555)
        (scratch / "input").write_bytes(input)
        os.chmod(scratch / "input", 0o444)
        (scratch / "random").write_bytes(seeded_random(program, input, salt))
        os.chmod(scratch / "random", 0o444)
        as_root = os.geteuid() == 0
        uid = NOBODY if as_root else os.geteuid()
        # RLIMIT_NPROC counts every process of the user: those of other runs still running or being
        # cleared too. Bubblewrap and its init count as two. Where a cgroup holds each run to its pids,
        # the user-wide count is only a backstop: a tight one let another run's fork bomb, growing after
        # this run started, make this run's bubblewrap fail to clone.
        nproc = limits.pids + 2 + _user_tasks(uid) + (NPROC_BACKSTOP if self._cgroups is not None else 0)
        cpu_s = max(1, -(-limits.fuel // 1000))

        # prlimit (util-linux) sets the limits and execs bubblewrap: no Python runs between fork and
        # exec (preexec_fn is unsafe in a threaded daemon); Popen drops to nobody the same way.
        prlimit = [
            PRLIMIT,
            f"--cpu={cpu_s}:{cpu_s + 1}",
            f"--as={limits.memory_bytes}",
            f"--fsize={TMP_BYTES}",
            "--nofile=64",
            "--core=0",
            f"--nproc={nproc}",
            "--",
        ]
        drop = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if as_root else {}

        group: RunCgroup | None = None
        if self._cgroups is not None:
            try:
                group = RunCgroup.make(
                    self._cgroups, memory_bytes=limits.memory_bytes, pids=limits.pids, uid=NOBODY if as_root else None
                )
            except OSError as error:
                self.stats.refused(KIND, SandboxReason.SANDBOX_UNAVAILABLE)
                raise refuse(
                    ErrorCode.UNAVAILABLE, SandboxReason.SANDBOX_UNAVAILABLE, "the run's cgroup could not be made"
                ) from error
        try:
            return self._run_grouped(scratch, input, limits, prlimit, drop, group, salt)
        finally:
            if group is not None:
                group.remove()

    def _run_grouped(
        self,
        scratch: Path,
        input: bytes,
        limits: Limits,
        prlimit: list[str],
        drop: dict[str, object],
        group: RunCgroup | None,
        salt: bytes = b"",
    ) -> RunResult:
        seccomp_fd: int | None = None
        if self._seccomp is not None:
            seccomp_fd = os.memfd_create("clawnode-seccomp", 0)
            os.write(seccomp_fd, self._seccomp)
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
        started = time.perf_counter()
        try:
            with open(scratch / "input", "rb") as stdin:
                argv = [*prlimit, *self._argv(scratch, seccomp_fd, salt)]
                proc = subprocess.Popen(  # type: ignore[call-overload]
                    group.wrap(argv) if group is not None else argv,
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    **drop,
                    start_new_session=True,
                    pass_fds=(seccomp_fd,) if seccomp_fd is not None else (),
                    close_fds=True,
                )
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)
        output, cut, timed_out, code, cpu_s_used = self._collect(proc, limits)
        wall_s = time.perf_counter() - started
        usage = group.usage() if group is not None else None
        if group is not None and code == 125 and not output:
            raise refuse(ErrorCode.UNAVAILABLE, SandboxReason.SANDBOX_UNAVAILABLE, "the run could not join its cgroup")
        cpu_ms = int(cpu_s_used * 1000)
        if timed_out:
            self.stats.killed(KIND, SandboxReason.WALL_CLOCK)
            raise refuse(ErrorCode.TIMEOUT, SandboxReason.WALL_CLOCK, f"killed after {limits.wall_s:g} s of wall clock")
        outcome: Outcome = Outcome.EXITED
        exit_code: int | None = code
        denied: tuple[str, ...] = ()
        if cut:
            outcome, exit_code = Outcome.OUTPUT_LIMIT, None
        elif usage is not None and usage.oom_killed:  # the OOM killer stopped a process of the run at its cap
            outcome, exit_code = Outcome.MEMORY_LIMIT, None
        elif code in (128 + signal.SIGXCPU, 128 + signal.SIGKILL):  # RLIMIT_CPU's soft, then hard, signal
            outcome, exit_code = Outcome.FUEL_EXHAUSTED, None
        elif code == 128 + signal.SIGSYS:
            outcome, exit_code, denied = Outcome.TRAP, None, ("seccomp",)
        elif code > 128:
            outcome, exit_code = Outcome.TRAP, None
        if usage is not None and usage.forks_refused:
            denied += ("fork",)  # a fork or clone past the run's pids limit
        self.stats.denied(KIND, denied)
        result = RunResult(
            output=output,
            output_sha256=sha256_hex(output),
            fuel_used=cpu_ms,
            outcome=outcome,
            exit_code=exit_code,
            denied_calls=denied,
            wall_s=wall_s,
        )
        if result.killed_by_limit:
            self.stats.killed(KIND, outcome)
        return result

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        """Kill bubblewrap's children (the pid namespace's init: every process in it dies with it),
        then bubblewrap's process group."""
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            children = []
        for child in children:
            try:
                os.kill(int(child), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _collect(self, proc: subprocess.Popen[bytes], limits: Limits) -> tuple[bytes, bool, bool, int, float]:
        """Read stdout up to the cap until the program ends: (output, cut at the cap, killed by the wall
        clock, exit code (128 + signal when killed), CPU seconds)."""
        assert proc.stdout is not None
        deadline = time.monotonic() + limits.wall_s
        output = bytearray()
        cut = timed_out = False
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    self._kill(proc)
                    break
                if not selector.select(min(left, 0.5)):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                if len(output) + len(chunk) > limits.output_bytes:
                    output += chunk[: limits.output_bytes - len(output)]
                    cut = True
                    self._kill(proc)
                    break
                output += chunk
        proc.stdout.close()
        while True:  # wait4: this run's own CPU time (bubblewrap and the processes it waited for)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                timed_out = True
                self._kill(proc)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code < 0:  # bubblewrap itself killed by a signal (ours)
            code = 128 - code
        return bytes(output), cut, timed_out, code, usage.ru_utime + usage.ru_stime
