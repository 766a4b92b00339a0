"""The ``native`` sandbox (bubblewrap, seccomp, rlimits): the escape battery on a running node.

Programs that read the node's identity key and other host files, open sockets to the node's API and
the internet, fork without end, allocate without end, loop, sleep past the deadline, flood their
output, write outside it and reach for ``unshare(2)``: each is contained, reported with a stable
code and counted, and the node's API answers while they run and after.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time

import httpx
import pytest
import trio

from node.daemon import Node
from node.datadir import IDENTITY_FILE, read_api_token
from runtime.errors import ClawnodeError, ErrorCode
from runtime.sandbox import Limits, Outcome, RunResult, SandboxReason
from runtime.sandbox.native import BWRAP, NOBODY, bwrap_available
from tests.support import native_programs as progs
from tests.support.market import market_nodes, metric_samples


def _bwrap_works() -> bool:
    if not bwrap_available():
        return False
    links = ["--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64"]
    probe = subprocess.run(
        [BWRAP, "--unshare-all", "--ro-bind", "/usr", "/usr", *links, "--", "/usr/bin/true"], check=False
    )
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _bwrap_works(), reason="bubblewrap with user namespaces is not available")

LIMITS = Limits(fuel=1000, memory_bytes=256 * 1024 * 1024, wall_s=2.0, output_bytes=64 * 1024, pids=16)


async def _api_get(node: Node, path: str, token: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5.0) as client:
        return await client.get(f"{node.api_url}{path}", headers={"authorization": f"Bearer {token}"})


def _nobody_processes() -> int:
    return sum(1 for e in os.scandir("/proc") if e.name.isdigit() and _uid(e.path) == NOBODY)


def _uid(path: str) -> int | None:
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


async def test_native_escape_battery_is_contained_and_the_node_keeps_answering() -> None:
    async with market_nodes([{}]) as ((node,), _):
        node.sandbox.policy = dataclasses.replace(node.sandbox.policy, kinds=frozenset({"wasm", "native"}))
        token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
        key_path = node.data_dir / IDENTITY_FILE
        api_port = node.api_url.rsplit(":", 1)[1].strip("/")
        outcomes: dict[str, RunResult | tuple[str, str | None]] = {}

        async def attempt(name: str, program: bytes, data: bytes = b"", limits: Limits = LIMITS) -> None:
            try:
                digest = node.sandbox.load("native", program)
                outcomes[name] = await node.sandbox.run("native", digest, data, limits)
            except ClawnodeError as error:
                outcomes[name] = (error.code, error.reason)

        battery = {
            "read_key": (progs.READ_HOST_FILE, str(key_path).encode() + b"\n"),
            "socket": (progs.OPEN_SOCKET, api_port.encode()),
            "fork_bomb": (progs.FORK_BOMB, b""),
            "allocate": (progs.ALLOCATE, b""),
            "loop": (progs.LOOP_FOREVER, b""),
            "sleep": (progs.SLEEP_PAST_DEADLINE, b""),
            "huge_output": (progs.HUGE_OUTPUT, b""),
            "write_outside": (progs.WRITE_OUTSIDE_OUTPUT, str(node.data_dir).encode() + b"\n"),
            "unshare": (progs.UNSHARE, b""),
        }
        answered = 0
        async with trio.open_nursery() as nursery:
            for name, (program, data) in battery.items():
                nursery.start_soon(attempt, name, program, data)
            with trio.fail_after(30):
                while len(outcomes) < len(battery):
                    assert (await _api_get(node, "/api/status", token)).status_code == 200
                    answered += 1
                    await trio.sleep(0.1)
        assert answered >= 3

        def result(name: str) -> RunResult:
            found = outcomes[name]
            assert isinstance(found, RunResult), (name, found)
            return found

        key = key_path.read_bytes()
        assert result("read_key").output == b"done\n" and key not in result("read_key").output
        assert b"CONNECTED" not in result("socket").output and result("socket").output.count(b"refused") == 2
        bomb = outcomes["fork_bomb"]  # the process limit makes sh give up, or the wall clock kills it all
        assert bomb == (ErrorCode.TIMEOUT, SandboxReason.WALL_CLOCK) or (
            isinstance(bomb, RunResult) and bomb.exit_code != 0
        )
        assert result("allocate").output == b"refused\n"
        loop = outcomes["loop"]
        assert loop == (ErrorCode.TIMEOUT, SandboxReason.WALL_CLOCK) or (
            isinstance(loop, RunResult) and loop.outcome == Outcome.FUEL_EXHAUSTED
        )
        assert outcomes["sleep"] == (ErrorCode.TIMEOUT, SandboxReason.WALL_CLOCK)
        huge = result("huge_output")
        assert huge.outcome == Outcome.OUTPUT_LIMIT and len(huge.output) == LIMITS.output_bytes
        outside = result("write_outside").output
        assert b"WROTE_USR" not in outside and b"done" in outside
        assert not (node.data_dir / "pwned").exists() and not os.path.exists("/usr/pwned")
        unshare = result("unshare")
        assert unshare.outcome == Outcome.TRAP and unshare.denied_calls == ("seccomp",), unshare
        assert b"SURVIVED" not in unshare.output
        if os.geteuid() == 0:  # runs drop to nobody: every process the fork bomb made is gone
            deadline = time.monotonic() + 15  # a killed pid namespace takes a few seconds to clear
            while _nobody_processes() and time.monotonic() < deadline:
                await trio.sleep(0.1)
            assert _nobody_processes() == 0

        samples = metric_samples((await _api_get(node, "/metrics", token)).text)
        assert samples['clawnode_sandbox_runs_total{kind="native"}'] == len(battery)
        assert samples['clawnode_sandbox_kills_total{kind="native",limit="wall_clock"}'] >= 1
        assert samples['clawnode_sandbox_kills_total{kind="native",limit="output_limit"}'] == 1
        assert samples['clawnode_sandbox_denied_calls_total{call="seccomp",kind="native"}'] == 1


def test_native_refusals_carry_stable_codes() -> None:
    from runtime.sandbox.native import NativeSandbox

    box = NativeSandbox(max_program_bytes=1024, cap=LIMITS)
    for call, code, reason in (
        (lambda: box.load(b"MZ not a program"), ErrorCode.INVALID_ARGUMENT, SandboxReason.MODULE_INVALID),
        (lambda: box.load(b"#!" + b"x" * 1024), ErrorCode.INVALID_ARGUMENT, SandboxReason.MODULE_TOO_LARGE),
        (lambda: box.load(progs.UPPER, "0" * 64), ErrorCode.INVALID_ARGUMENT, SandboxReason.MODULE_HASH_MISMATCH),
        (
            lambda: box.run(box.load(progs.UPPER), b"", LIMITS.model_copy(update={"pids": 17})),
            ErrorCode.FORBIDDEN,
            SandboxReason.LIMITS_TOO_HIGH,
        ),
    ):
        with pytest.raises(ClawnodeError) as refused:
            call()
        assert (refused.value.code, refused.value.reason) == (code, reason)
    assert box.run(box.load(progs.UPPER), b"same every time", LIMITS).output == b"SAME EVERY TIME"


def test_a_program_reading_randomness_gives_the_seller_and_an_arbiter_the_same_output() -> None:
    """/dev/urandom is a stream seeded by the program and its input, getrandom(2) is not there (libraries
    fall back to the device) and Python's hash seed is fixed: a re-run reproduces it; the clock is not pinned."""
    from runtime.sandbox.native import NativeSandbox

    box = NativeSandbox(cap=LIMITS)
    reads = box.load(
        b"#!/usr/bin/python3\nimport os, random, sys\n"
        b"print(os.urandom(8).hex(), random.random(), hash('x'), open('/dev/urandom', 'rb').read(4).hex())\n"
    )
    first, again, other = (box.run(reads, data, LIMITS).output for data in (b"a", b"a", b"b"))
    assert first == again and first != other and first.strip()
    # An arbiter's second run reads another stream: a program whose output depends on it shows it.
    assert box.run(reads, b"a", LIMITS, salt=b"second run").output != first
    upper = box.load(progs.UPPER)
    assert box.run(upper, b"a", LIMITS, salt=b"second run").output == box.run(upper, b"a", LIMITS).output == b"A"


def test_a_program_reading_the_clock_gives_the_seller_and_an_arbiter_the_same_output() -> None:
    """With libfaketime preloaded every run's clocks start at 2000-01-01 and advance per reading, not with
    real time: the date and a self-timing loop print the same on every run; an arbiter's second run
    (a salt) starts elsewhere, so a clock-dependent output shows it. Sleeps still take their real time."""
    from runtime.sandbox.native import NativeSandbox

    box = NativeSandbox(cap=LIMITS)
    if box.clock_mode != "pinned":
        pytest.skip(f"the clock is not pinned here ({box.clock_mode}): apt-get install libfaketime")
    clock = box.load(
        b"#!/bin/sh\ndate +%s%N\nsleep 0.2\ndate -u '+%F %T.%N'\n"
        b"python3 -c 'import time\nt = time.monotonic()\nn = 0\nwhile time.monotonic() < t + 0.05: n += 1\n"
        b"print(time.time(), n)'\n"
    )
    first, again = (box.run(clock, b"", LIMITS) for _ in range(2))
    assert first.outcome == Outcome.EXITED and first.output == again.output
    lines = first.output.decode().splitlines()
    assert lines[0].startswith("9466848000") and lines[1].startswith("2000-01-01 00:00:00.")
    assert first.wall_s >= 0.2  # the sleep was real
    assert box.run(clock, b"", LIMITS, salt=b"second run").output != first.output


def test_a_run_s_processes_together_are_held_to_its_memory_cap_by_its_own_cgroup() -> None:
    """The address-space rlimit holds each process; the run's cgroup holds all of them together: four
    children of 30 MiB each under a 64 MiB cap are stopped by the OOM killer (``memory_limit``)."""
    from runtime.sandbox.native import NativeSandbox

    box = NativeSandbox(cap=LIMITS)
    if box.cgroup_mode != "cgroup_v1":
        pytest.skip(f"no per-run cgroup here ({box.cgroup_mode}): the rlimits alone hold")
    four = box.load(
        b"#!/usr/bin/python3\nimport os, time\nfor i in range(4):\n    if os.fork() == 0:\n"
        b"        block = bytearray(30 << 20)\n        block[:: 4096] = b'x' * len(block[:: 4096])\n"
        b"        time.sleep(0.3)\n        os._exit(0)\nfor i in range(4):\n    os.wait()\nprint('held')\n"
    )
    result = box.run(four, b"", LIMITS.model_copy(update={"memory_bytes": 64 << 20}))
    assert result.outcome == Outcome.MEMORY_LIMIT and result.killed_by_limit
    assert box.stats.kills[("native", "memory_limit")] == 1
    groups = box._cgroups.dirs.values()  # type: ignore[union-attr]
    assert not [p for d in groups for p in d.iterdir() if p.name.startswith("clawnode-run-")]  # removed


def test_a_program_cannot_fill_dev_shm_past_the_run_s_scratch_cap() -> None:
    """/dev/shm inside the sandbox is a tmpfs of the same 16 MiB as /tmp: writing 32 MiB there in many files
    stops at the cap instead of growing in the host's memory."""
    from runtime.sandbox.native import TMP_BYTES, NativeSandbox

    box = NativeSandbox(cap=LIMITS)
    # Files of 32 KiB each: one file's size is already capped by the run's file-size rlimit.
    fill = box.load(
        b"#!/usr/bin/python3\nwritten = 0\ntry:\n    for i in range(1024):\n"
        b"        with open(f'/dev/shm/f{i}', 'wb') as f:\n            f.write(bytes(32768))\n"
        b"        written += 32768\nexcept OSError:\n    pass\nprint(written)\n"
    )
    result = box.run(fill, b"", LIMITS)
    assert result.outcome == Outcome.EXITED
    assert 0 < int(result.output.strip()) <= TMP_BYTES
