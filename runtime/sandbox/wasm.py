"""``wasm`` runs: WebAssembly modules under wasmtime, fuel-metered, capped, deterministic, offline.

The sandbox:

* **Modules** are content-addressed: :meth:`WasmSandbox.load` takes the bytes (at most
  ``max_module_bytes``), checks them against the sha256 the task names, compiles them once and
  keeps the compiled module in a bounded cache keyed by that hash.
* **ABI**: a WASI command (``_start``). Only a handful of ``wasi_snapshot_preview1`` calls are
  served, all by this module, none by the host's WASI: ``fd_read`` on fd 0 reads the task's input
  (read-only, from memory), ``fd_write`` on fd 1 appends to the output (capped: past
  ``output_bytes`` the run stops with ``output_limit``), fd 2 is counted and dropped, ``proc_exit``,
  empty args and environment, ``fd_fdstat_get``/``fd_prestat_get`` (no preopened directory: no file
  can ever be named), ``sched_yield``. Every other WASI call (``path_open``, ``sock_*``,
  ``poll_oneoff``, ``clock_time_get``, ``random_get``, ...) links to a stub that refuses with
  ``ENOTCAPABLE`` and records the attempt (``denied_calls``): there is no file, socket, clock or
  randomness to reach. Imports from any other module, or of names that are not preview1 functions,
  refuse the module (``import_not_allowed``), so the refused calls counted are a fixed set of names.
* **Limits**: fuel (wasm instructions) with a cap (``fuel_exhausted``), the store's memory limiter
  (``memory.grow`` fails past ``memory_bytes``; a trap with the memory at the cap is reported
  ``memory_limit``), a wall-clock cap by epoch interruption (a ticker thread advances the engine's
  epoch; killed runs raise ``E_TIMEOUT``/``wall_clock``: not deterministic, never a result).
* **Determinism**: no threads, no relaxed SIMD, Cranelift NaN canonicalisation, no clock and no
  randomness: the same module, input and limits give the same output, fuel and outcome.

:meth:`WasmSandbox.run` blocks: call it in a worker thread (:meth:`run_async` does, bounded by a
capacity limiter), never on the trio loop; wasmtime releases the GIL while wasm runs.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from runtime.errors import ClawnodeError, ErrorCode
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

if TYPE_CHECKING:
    import wasmtime as wt
else:

    class _Wasmtime:
        """``wasmtime``, imported on first use: a node that runs no wasm task never loads it at start."""

        def __getattr__(self, name: str) -> Any:
            import wasmtime

            return getattr(wasmtime, name)

    wt = _Wasmtime()

KIND = "wasm"
WASI = "wasi_snapshot_preview1"
MAX_MODULE_BYTES = 256 * 1024
MODULE_CACHE = 16
EPOCH_TICK_S = 0.01
MAX_DENIED_KEPT = 32  # denied calls kept per run (all are counted)
# Every function of wasi_snapshot_preview1: a module may import only these (so the names counted as
# refused calls, and shown as metric labels, are a fixed set).
WASI_CALLS = frozenset(
    {
        "args_get", "args_sizes_get", "environ_get", "environ_sizes_get", "clock_res_get", "clock_time_get",
        "fd_advise", "fd_allocate", "fd_close", "fd_datasync", "fd_fdstat_get", "fd_fdstat_set_flags",
        "fd_fdstat_set_rights", "fd_filestat_get", "fd_filestat_set_size", "fd_filestat_set_times", "fd_pread",
        "fd_prestat_get", "fd_prestat_dir_name", "fd_pwrite", "fd_read", "fd_readdir", "fd_renumber", "fd_seek",
        "fd_sync", "fd_tell", "fd_write", "path_create_directory", "path_filestat_get", "path_filestat_set_times",
        "path_link", "path_open", "path_readlink", "path_remove_directory", "path_rename", "path_symlink",
        "path_unlink_file", "poll_oneoff", "proc_exit", "proc_raise", "sched_yield", "random_get", "sock_accept",
        "sock_recv", "sock_send", "sock_shutdown",
    }
)  # fmt: skip
STDERR_CAP = 4096

# WASI errno values
_ESUCCESS = 0
_EBADF = 8
_ENOTCAPABLE = 76
_ESPIPE = 70
_EFAULT = 21


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _OutputFull(Exception):
    pass


def engine_config() -> wt.Config:
    config = wt.Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    config.wasm_threads = False
    config.shared_memory = False
    config.wasm_relaxed_simd = False
    config.cranelift_nan_canonicalization = True
    config.parallel_compilation = False
    return config


class _Ticker:
    """Advances the engine's epoch every ``EPOCH_TICK_S`` while any run is in flight."""

    def __init__(self, engine: wt.Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._active = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> None:
        with self._lock:
            self._active += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
                self._thread.start()

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._active -= 1

    def _tick(self) -> None:
        while True:
            time.sleep(EPOCH_TICK_S)
            with self._lock:
                if self._active == 0:
                    self._thread = None
                    return
            self._engine.increment_epoch()


@dataclass
class _Io:
    """One run's stdin, stdout and the calls it was refused."""

    input: bytes
    output_cap: int
    read_at: int = 0
    output: bytearray = field(default_factory=bytearray)
    stderr_bytes: int = 0
    denied: list[str] = field(default_factory=list)
    denied_count: int = 0

    def deny(self, name: str) -> None:
        self.denied_count += 1
        if len(self.denied) < MAX_DENIED_KEPT:
            self.denied.append(name)


def _u32(data: bytes | bytearray, at: int = 0) -> int:
    return int.from_bytes(data[at : at + 4], "little")


def _memory(caller: wt.Caller) -> wt.Memory:
    memory = caller["memory"]
    if not isinstance(memory, wt.Memory):
        raise _Exit(-1)
    return memory


class WasmSandbox:
    """Loads modules by hash and runs them under the limits; one per node (the engine and cache are shared)."""

    def __init__(
        self,
        *,
        max_module_bytes: int = MAX_MODULE_BYTES,
        cap: Limits | None = None,
        stats: SandboxStats | None = None,
        concurrency: int = 2,
    ) -> None:
        self._engine: wt.Engine | None = None  # made on first use (see :attr:`engine`)
        self._engine_lock = threading.Lock()
        self._ticker: _Ticker | None = None
        self.max_module_bytes = max_module_bytes
        self.cap = cap or Limits(fuel=10**10, memory_bytes=256 * 1024 * 1024, wall_s=60.0, output_bytes=256 * 1024)
        self.stats = stats or SandboxStats()
        self._modules: OrderedDict[str, wt.Module] = OrderedDict()
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(concurrency)

    @property
    def engine(self) -> wt.Engine:
        """The wasmtime engine, made (with its epoch ticker) on first use from any thread."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = wt.Engine(engine_config())
                self._ticker = _Ticker(self._engine)
            return self._engine

    # -- modules --

    def has(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._modules

    def load(self, module: bytes, sha256: str | None = None) -> str:
        """Check, compile and cache ``module`` (wasm binary, or WAT text in tests); return its sha256."""
        try:
            digest = checked_program(module, sha256, self.max_module_bytes, "module")
            if self.has(digest):
                return digest
            try:
                compiled = wt.Module(self.engine, module)
            except wt.WasmtimeError:
                raise refuse(
                    ErrorCode.INVALID_ARGUMENT, SandboxReason.MODULE_INVALID, "not a valid wasm module"
                ) from None
            self._check_imports(compiled)
        except ClawnodeError as error:
            self.stats.refused(KIND, error.reason or "")
            raise
        with self._lock:
            self._modules[digest] = compiled
            while len(self._modules) > MODULE_CACHE:
                self._modules.popitem(last=False)
        return digest

    @staticmethod
    def _check_imports(module: wt.Module) -> None:
        for item in module.imports:
            if item.module != WASI or item.name not in WASI_CALLS or not isinstance(item.type, wt.FuncType):
                raise refuse(
                    ErrorCode.FORBIDDEN,
                    SandboxReason.IMPORT_NOT_ALLOWED,
                    "the module imports something outside the sandbox's WASI subset",
                )
        if not any(e.name == "_start" and isinstance(e.type, wt.FuncType) for e in module.exports):
            raise refuse(ErrorCode.INVALID_ARGUMENT, SandboxReason.NO_ENTRY_POINT, "the module exports no _start")

    def _module(self, sha256: str) -> wt.Module:
        with self._lock:
            module = self._modules.get(sha256)
            if module is not None:
                self._modules.move_to_end(sha256)
        if module is None:
            self.stats.refused(KIND, SandboxReason.MODULE_UNKNOWN)
            raise refuse(ErrorCode.NOT_FOUND, SandboxReason.MODULE_UNKNOWN, "the module is not loaded")
        return module

    # -- runs --

    async def run_async(self, sha256: str, input: bytes, limits: Limits) -> RunResult:
        """:meth:`run` in a worker thread (at most ``concurrency`` at once)."""
        return await trio.to_thread.run_sync(self.run, sha256, input, limits, limiter=self._limiter)

    def run(self, sha256: str, input: bytes, limits: Limits) -> RunResult:
        """Run a loaded module on ``input`` under ``limits``. Blocks: call from a worker thread."""
        try:
            check_run(limits, self.cap, input)
        except ClawnodeError as error:
            self.stats.refused(KIND, error.reason or "")
            raise
        module = self._module(sha256)
        self.stats.ran(KIND)
        io = _Io(input=input, output_cap=limits.output_bytes)
        store = wt.Store(self.engine)
        assert self._ticker is not None  # made with the engine
        store.set_fuel(limits.fuel)
        store.set_limits(memory_size=limits.memory_bytes, table_elements=100_000, instances=1, tables=4, memories=1)
        store.set_epoch_deadline(max(1, int(limits.wall_s / EPOCH_TICK_S) + 1))
        started = time.perf_counter()
        with self._ticker:
            try:
                outcome, exit_code, _ = self._start(module, io, store, limits)
            finally:
                self.stats.denied(KIND, tuple(io.denied))
        wall_s = time.perf_counter() - started
        fuel_used = limits.fuel - store.get_fuel()
        result = RunResult(
            output=bytes(io.output),
            output_sha256=sha256_hex(bytes(io.output)),
            fuel_used=fuel_used,
            outcome=outcome,
            exit_code=exit_code,
            denied_calls=tuple(io.denied),
            wall_s=wall_s,
        )
        if result.killed_by_limit:
            self.stats.killed(KIND, outcome)
        return result

    def _start(
        self, module: wt.Module, io: _Io, store: wt.Store, limits: Limits
    ) -> tuple[Outcome, int | None, wt.Memory | None]:
        """Instantiate and call ``_start``; how it ended. A wall-clock kill raises (not deterministic)."""
        outcome: Outcome = Outcome.EXITED
        exit_code: int | None = 0
        memory: wt.Memory | None = None
        try:
            instance = self._linker(module, io).instantiate(store, module)
            exported = instance.exports(store).get("memory")
            memory = exported if isinstance(exported, wt.Memory) else None
            start = instance.exports(store)["_start"]
            assert isinstance(start, wt.Func)
            start(store)
        except _Exit as done:
            exit_code = done.code
        except _OutputFull:
            outcome, exit_code = Outcome.OUTPUT_LIMIT, None
        except wt.Trap as trap:
            outcome, exit_code = self._trap_outcome(trap, store, memory, limits), None
        except wt.WasmtimeError:  # instantiation refused: the declared memory is above the cap
            outcome, exit_code = Outcome.MEMORY_LIMIT, None
        except ClawnodeError:
            raise
        except Exception:  # noqa: BLE001 - anything else a host call hit: the same trap on every machine
            outcome, exit_code = Outcome.TRAP, None
        return outcome, exit_code, memory

    def _trap_outcome(self, trap: wt.Trap, store: wt.Store, memory: wt.Memory | None, limits: Limits) -> Outcome:
        code = trap.trap_code
        if code == wt.TrapCode.INTERRUPT:
            self.stats.killed(KIND, SandboxReason.WALL_CLOCK)
            raise refuse(ErrorCode.TIMEOUT, SandboxReason.WALL_CLOCK, f"killed after {limits.wall_s:g} s of wall clock")
        if code == wt.TrapCode.OUT_OF_FUEL:
            return Outcome.FUEL_EXHAUSTED
        if memory is not None and memory.data_len(store) + 65536 > limits.memory_bytes:
            return Outcome.MEMORY_LIMIT
        return Outcome.TRAP

    # -- the ABI --

    def _linker(self, module: wt.Module, io: _Io) -> wt.Linker:
        linker = wt.Linker(self.engine)
        served: dict[str, Callable[..., Any]] = {
            "fd_read": lambda caller, fd, iovs, n, nread: self._fd_read(caller, io, fd, iovs, n, nread),
            "fd_write": lambda caller, fd, iovs, n, nwritten: self._fd_write(caller, io, fd, iovs, n, nwritten),
            "proc_exit": self._proc_exit,
            "args_sizes_get": self._two_zeros,
            "environ_sizes_get": self._two_zeros,
            "args_get": lambda caller, a, b: _ESUCCESS,
            "environ_get": lambda caller, a, b: _ESUCCESS,
            "fd_fdstat_get": self._fdstat,
            "fd_prestat_get": lambda caller, fd, out: _EBADF,  # no preopened directory: no path can be named
            "fd_close": lambda caller, fd: _ESUCCESS if fd in (0, 1, 2) else _EBADF,
            "fd_seek": lambda caller, fd, off, whence, out: _ESPIPE,
            "sched_yield": lambda caller: _ESUCCESS,
        }
        for item in module.imports:
            name = item.name or ""
            functype = item.type
            assert isinstance(functype, wt.FuncType)
            handler = served.get(name)
            if handler is None:
                handler = self._denied(io, name, functype)
            linker.define_func(WASI, name, functype, handler, access_caller=True)
        return linker

    @staticmethod
    def _denied(io: _Io, name: str, functype: wt.FuncType) -> Callable[..., Any]:
        returns_errno = [str(t) for t in functype.results] == ["i32"]

        def refuse_call(caller: wt.Caller, *_: Any) -> int | None:
            io.deny(name)
            if returns_errno:
                return _ENOTCAPABLE
            raise _Exit(-1)  # e.g. proc_raise: nothing to answer with

        return refuse_call

    @staticmethod
    def _proc_exit(caller: wt.Caller, code: int) -> None:
        raise _Exit(code)

    @staticmethod
    def _two_zeros(caller: wt.Caller, a: int, b: int) -> int:
        memory = _memory(caller)
        if max(a, b) + 4 > memory.data_len(caller):
            return _EFAULT
        memory.write(caller, bytes(4), a)
        memory.write(caller, bytes(4), b)
        return _ESUCCESS

    @staticmethod
    def _fdstat(caller: wt.Caller, fd: int, out: int) -> int:
        if fd not in (0, 1, 2):
            return _EBADF
        # filetype character device (2), no flags, rights: fd_read (1<<1) or fd_write (1<<6)
        rights = (1 << 1) if fd == 0 else (1 << 6)
        stat = bytes([2, 0]) + bytes(6) + rights.to_bytes(8, "little") + bytes(8)
        memory = _memory(caller)
        if out + len(stat) > memory.data_len(caller):
            return _EFAULT
        memory.write(caller, stat, out)
        return _ESUCCESS

    @staticmethod
    def _iovecs(caller: wt.Caller, memory: wt.Memory, iovs: int, n: int) -> list[tuple[int, int]] | None:
        """The iovecs, or None when any of them (or the array) lies outside the memory (``EFAULT``)."""
        size = memory.data_len(caller)
        count = min(n, 1024)
        if iovs + 8 * count > size:
            return None
        raw = memory.read(caller, iovs, iovs + 8 * count)
        vectors = [(_u32(raw, 8 * i), _u32(raw, 8 * i + 4)) for i in range(count)]
        if any(ptr + length > size for ptr, length in vectors):
            return None
        return vectors

    def _fd_read(self, caller: wt.Caller, io: _Io, fd: int, iovs: int, n: int, nread: int) -> int:
        if fd != 0:
            return _EBADF
        memory = _memory(caller)
        vectors = self._iovecs(caller, memory, iovs, n)
        if vectors is None or nread + 4 > memory.data_len(caller):
            return _EFAULT
        total = 0
        for ptr, length in vectors:
            chunk = io.input[io.read_at : io.read_at + length]
            if not chunk:
                break
            memory.write(caller, chunk, ptr)
            io.read_at += len(chunk)
            total += len(chunk)
        memory.write(caller, total.to_bytes(4, "little"), nread)
        return _ESUCCESS

    def _fd_write(self, caller: wt.Caller, io: _Io, fd: int, iovs: int, n: int, nwritten: int) -> int:
        if fd not in (1, 2):
            io.deny("fd_write")
            return _EBADF
        memory = _memory(caller)
        vectors = self._iovecs(caller, memory, iovs, n)
        if vectors is None or nwritten + 4 > memory.data_len(caller):
            return _EFAULT
        total = 0
        for ptr, length in vectors:
            if fd == 2:
                io.stderr_bytes += length
                total += length
                continue
            if len(io.output) + length > io.output_cap:
                raise _OutputFull()
            io.output += memory.read(caller, ptr, ptr + length)
            total += length
        memory.write(caller, total.to_bytes(4, "little"), nwritten)
        return _ESUCCESS
