"""The ``wasm`` sandbox: deterministic runs, stable refusals, and the escape battery on a running node.

Every battery module tries one way out (a host file — the node's own identity key —, a socket, a
loop without end, memory without end, a huge output, a sleep past the deadline, a write outside its
output); each is contained and reported with a stable code, counted in ``/metrics``, and the node's
API keeps answering while they run and after.
"""

from __future__ import annotations

import httpx
import pytest
import trio

from node.daemon import Node
from node.datadir import IDENTITY_FILE, read_api_token
from runtime.errors import ClawnodeError, ErrorCode
from runtime.sandbox import Limits, Outcome, SandboxReason, WasmSandbox, sha256_hex
from tests.support import wasm_modules as mods
from tests.support.market import market_nodes, metric_samples

LIMITS = Limits(fuel=50_000_000, memory_bytes=4 * 1024 * 1024, wall_s=5.0, output_bytes=64 * 1024)


def test_same_module_input_and_limits_give_the_same_hash_and_fuel() -> None:
    first, second = WasmSandbox(), WasmSandbox()  # two engines: what another node would get
    for module, data in ((mods.UPPER, b"count these words"), (mods.KERNEL, b"x" * 512)):
        digest = first.load(module)
        assert digest == sha256_hex(module) and second.load(module, digest) == digest
        a = first.run(digest, data, LIMITS)
        b = second.run(digest, data, LIMITS)
        assert a.ok and (a.output_sha256, a.fuel_used, a.outcome) == (b.output_sha256, b.fuel_used, b.outcome)
        assert a.fuel_used > 0 and a.output_sha256 == sha256_hex(a.output)
    upper = first.run(sha256_hex(mods.UPPER), b"abc", LIMITS)
    assert upper.output == b"ABC!\x03"
    # Another input: another hash. Less fuel than it needs: the same deterministic kill, every time.
    assert first.run(sha256_hex(mods.UPPER), b"abd", LIMITS).output_sha256 != upper.output_sha256
    short = LIMITS.model_copy(update={"fuel": 1000})
    kernel = sha256_hex(mods.KERNEL)
    runs = {(r.outcome, r.fuel_used) for r in (first.run(kernel, b"x" * 64, short) for _ in range(3))}
    assert runs == {(Outcome.FUEL_EXHAUSTED, 1000)}


def test_pointers_outside_the_memory_are_refused_not_clamped() -> None:
    box = WasmSandbox()
    module = mods.wasm("""(module
     (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
     (memory (export "memory") 1)
     (func (export "_start")
       (i32.store (i32.const 0) (i32.const 65530)) (i32.store (i32.const 4) (i32.const 100))
       (i32.store8 (i32.const 40) (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
       (i32.store (i32.const 0) (i32.const 40)) (i32.store (i32.const 4) (i32.const 1))
       (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))""")
    result = box.run(box.load(module), b"", LIMITS)
    assert result.ok and result.output == bytes([21])  # EFAULT, and nothing of the bad span written


def test_refusals_carry_stable_codes() -> None:
    box = WasmSandbox(max_module_bytes=64 * 1024, cap=LIMITS)
    # A name WASI does not have (each would be a new metric label if counted).
    not_wasi = mods.wasm("""(module (import "wasi_snapshot_preview1" "sock_open_x" (func))
      (memory (export "memory") 1) (func (export "_start")))""")
    cases = [
        (lambda: box.load(mods.UPPER, "0" * 64), ErrorCode.INVALID_ARGUMENT, SandboxReason.MODULE_HASH_MISMATCH),
        (lambda: box.load(b"\0asm junk"), ErrorCode.INVALID_ARGUMENT, SandboxReason.MODULE_INVALID),
        (lambda: box.load(b"\0" * (64 * 1024 + 1)), ErrorCode.INVALID_ARGUMENT, SandboxReason.MODULE_TOO_LARGE),
        (lambda: box.load(mods.HOST_SOCKET_IMPORT), ErrorCode.FORBIDDEN, SandboxReason.IMPORT_NOT_ALLOWED),
        (lambda: box.load(not_wasi), ErrorCode.FORBIDDEN, SandboxReason.IMPORT_NOT_ALLOWED),
        (lambda: box.run("f" * 64, b"", LIMITS), ErrorCode.NOT_FOUND, SandboxReason.MODULE_UNKNOWN),
        (
            lambda: box.run(box.load(mods.UPPER), b"", LIMITS.model_copy(update={"fuel": LIMITS.fuel + 1})),
            ErrorCode.FORBIDDEN,
            SandboxReason.LIMITS_TOO_HIGH,
        ),
    ]
    for call, code, reason in cases:
        with pytest.raises(ClawnodeError) as refused:
            call()
        assert (refused.value.code, refused.value.reason) == (code, reason)
    assert box.stats.refusals[("wasm", "import_not_allowed")] == 2


async def _api_get(node: Node, path: str, token: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5.0) as client:
        return await client.get(f"{node.api_url}{path}", headers={"authorization": f"Bearer {token}"})


async def test_escape_battery_is_contained_and_the_node_keeps_answering() -> None:
    async with market_nodes([{}]) as ((node,), _):
        box = node.sandbox.wasm
        token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
        key_path = str(node.data_dir / IDENTITY_FILE).encode()
        key_bytes = (node.data_dir / IDENTITY_FILE).read_bytes()
        outcomes: dict[str, object] = {}

        async def attempt(name: str, module: bytes, data: bytes = b"", limits: Limits = LIMITS) -> None:
            try:
                outcomes[name] = await box.run_async(box.load(module), data, limits)
            except ClawnodeError as error:
                outcomes[name] = (error.code, error.reason)

        await node.alerting.evaluate_once()  # the violations counter's first point: 0
        answered = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, "read_key", mods.READ_HOST_FILE, key_path)
            nursery.start_soon(attempt, "socket", mods.OPEN_SOCKET)
            nursery.start_soon(attempt, "host_socket", mods.HOST_SOCKET_IMPORT)
            nursery.start_soon(attempt, "loop", mods.LOOP_FOREVER)
            nursery.start_soon(attempt, "allocate", mods.ALLOCATE_FOREVER)
            nursery.start_soon(attempt, "huge_memory", mods.HUGE_MEMORY)
            nursery.start_soon(attempt, "huge_output", mods.HUGE_OUTPUT)
            nursery.start_soon(attempt, "write_outside", mods.WRITE_OUTSIDE_OUTPUT)
            # Enough fuel for hours: only the wall clock stops it.
            sleepy = LIMITS.model_copy(update={"fuel": 10**13 // 1000, "wall_s": 1.0})
            nursery.start_soon(attempt, "sleep", mods.SLEEP_PAST_DEADLINE, b"", sleepy)
            # The API answers while the battery runs (in worker threads, never on the loop).
            with trio.fail_after(10):
                while len(outcomes) < 9:
                    reply = await _api_get(node, "/api/status", token)
                    assert reply.status_code == 200
                    answered += 1
                    await trio.sleep(0.05)
        assert answered >= 3

        read_key = outcomes["read_key"]
        assert not isinstance(read_key, tuple) and read_key.outcome == Outcome.EXITED  # type: ignore[attr-defined]
        assert set(read_key.output) <= {76, 8} and key_bytes not in read_key.output  # type: ignore[attr-defined]
        assert "path_open" in read_key.denied_calls  # type: ignore[attr-defined]
        assert set(outcomes["socket"].denied_calls) == {"sock_accept", "sock_send"}  # type: ignore[attr-defined]
        assert outcomes["host_socket"] == (ErrorCode.FORBIDDEN, SandboxReason.IMPORT_NOT_ALLOWED)
        assert outcomes["loop"].outcome == Outcome.FUEL_EXHAUSTED  # type: ignore[attr-defined]
        assert outcomes["allocate"].outcome == Outcome.MEMORY_LIMIT  # type: ignore[attr-defined]
        assert outcomes["huge_memory"].outcome == Outcome.MEMORY_LIMIT  # type: ignore[attr-defined]
        huge = outcomes["huge_output"]
        assert huge.outcome == Outcome.OUTPUT_LIMIT and len(huge.output) <= LIMITS.output_bytes  # type: ignore[attr-defined]
        outside = outcomes["write_outside"]
        assert outside.output == bytes([8, 8, 76])  # type: ignore[attr-defined]
        assert outcomes["sleep"] == (ErrorCode.TIMEOUT, SandboxReason.WALL_CLOCK)

        reply = await _api_get(node, "/metrics", token)
        assert reply.status_code == 200
        samples = metric_samples(reply.text)
        assert samples['clawnode_sandbox_runs_total{kind="wasm"}'] == 8
        for limit in ("fuel_exhausted", "memory_limit", "output_limit", "wall_clock"):
            assert samples[f'clawnode_sandbox_kills_total{{kind="wasm",limit="{limit}"}}'] >= 1, limit
        assert samples['clawnode_sandbox_refusals_total{kind="wasm",reason="import_not_allowed"}'] == 1
        for call in ("path_open", "sock_accept", "poll_oneoff", "fd_write"):
            assert samples[f'clawnode_sandbox_denied_calls_total{{call="{call}",kind="wasm"}}'] >= 1, call
        # Repeated violations raise the P1 alert.
        await node.alerting.evaluate_once()
        alerts = (await _api_get(node, "/api/alerts", token)).json()["alerts"]
        assert [(a["name"], a["severity"], a["state"]) for a in alerts if a["name"] == "SandboxViolations"] == [
            ("SandboxViolations", "P1", "firing")
        ]
