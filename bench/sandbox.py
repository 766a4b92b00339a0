"""Sandbox benchmark: start times, the metering's cost, arbitration by re-execution, the escape batteries.

Usage::

    python bench/sandbox.py [--runs 50] [--disputes 100] [--arbitrations 3] [--seed 7]

Measures, in one process:

1. ``start_ms_wasm``: the median wall time of a whole ``wasm`` run of a small module already in the
   cache (the honest upper-case module of the tests on 16 bytes): a fresh store with its limits,
   instantiation, the run, the result. ``start_ms_native``: the same for a ``native`` program (a
   ``#!/bin/sh`` script running ``tr``) in a fresh bubblewrap sandbox (namespaces, seccomp, rlimits).
2. ``kernel_ratio``: a compute kernel's throughput in the sandbox ÷ outside it. For ``wasm`` the same
   compiled module (2000 FNV-1a rounds with float work over 60 KB) run by wasmtime with fuel metering,
   epoch interruption and the store limiter (the sandbox) and without them (outside); for
   ``native`` (printed, not in the last line) a Python kernel under bubblewrap and as a plain child.
3. ``arbitration_s``: real nodes on the embedded chain (buyer, seller, arbiter): a ``wasm`` task
   published, awarded, run by the seller, rejected and disputed by the buyer; the time from the
   dispute call to the escrow closed on chain by the arbiter's re-execution (median of
   ``--arbitrations``). Printed beside it (not in the last line): the same for a ``native`` task
   before a 2-of-3 panel, to the escrow closed by ``resolve_by_panel``.
4. ``auto_resolved``: a mixed batch of ``--disputes`` disputed sandboxed tasks, kinds (``wasm``,
   ``native``) and faults drawn at random: an honest result rejected, a wrong output, a wrong fuel
   claim, an honest run that hit its limit, an honest result whose program neither party serves (the
   creator's burden: the seller is paid, ``module_withheld``; a creator whose rejection is right would
   serve the program it published, so the seller is the right winner there), a task that asks
   for a person, an honest result on a task whose limits are above the default arbiter's caps (the
   seller's cover them), an honest seller of a non-deterministic native
   program (half read randomness, which the native sandbox seeds from the program and input, half
   the clock, which it pins where libfaketime is installed: the clock mode is printed). Every task
   names a 2-of-3 panel drawn by the creator as ``publish_run(panel_from=records)`` draws one
   (``task_panel.draw_panel``) from a pool of six arbiters' records (the default arbiter, one like
   it, three with higher caps, one ``wasm`` only): the default arbiter first, the others in random
   order, only those able to re-run the task; where fewer than 3 are able (``drawn:panel_short``)
   the creator names its arbiter and two others at random. A ``wasm`` dispute is decided by the
   first member's re-run when it decides; a ``native`` one (and a ``wasm`` one that member could not
   decide) by the panel: each
   member re-runs in its own sandbox (real runs) and votes its ``rerun_verdict`` or abstains,
   ``task_panel.tally`` decides at 2 agreeing votes. Counted as resolved without a person: a
   re-run's decision or the panel's automatic votes; a person: a task that asks for one, or a panel
   short of 2 agreeing votes. ``wrong``: decisions against the party that was right. Disputes over
   tasks with no sandboxed kind (a person's deliverable, inference) always go to a person and are
   not in this batch.
5. ``escapes``: both escape batteries (the modules and programs of the tests) run once; an escape is
   any entry whose containment check fails (a host file's bytes in the output, a connection made,
   a process left behind, a write outside the output, a run not stopped by its limit).

Progress goes to stderr, the figures to stdout, the last line ``sandbox: start_ms_wasm=…
start_ms_native=… kernel_ratio=… arbitration_s=… auto_resolved=… wrong=… escapes=…``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import trio
import wasmtime as wt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocols.machines.task_panel import PanelCandidate, PanelFacts, RunNeeds, Vote, draw_panel, tally
from protocols.machines.task_run import RerunFacts, RunFacts, Usage, rerun_verdict, run_verdict
from runtime.errors import ClawnodeError
from runtime.sandbox import Limits, Outcome, RunResult, Sandboxes, SandboxPolicy, sha256_hex
from runtime.sandbox.native import NOBODY, NativeSandbox, bwrap_available
from runtime.sandbox.wasm import WasmSandbox
from tests.support import native_programs as progs
from tests.support import wasm_modules as mods

WASM_LIMITS = Limits(fuel=10**11, memory_bytes=4 * 1024 * 1024, wall_s=10.0, output_bytes=64 * 1024)
NATIVE_LIMITS = Limits(fuel=5000, memory_bytes=256 * 1024 * 1024, wall_s=10.0, output_bytes=64 * 1024, pids=16)


def say(text: str) -> None:
    print(f"[sandbox {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def start_ms(run: object, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def wasm_kernel_ratio(data: bytes) -> tuple[float, float, float]:
    box = WasmSandbox(cap=WASM_LIMITS)
    digest = box.load(mods.KERNEL)
    result = box.run(digest, data, WASM_LIMITS)
    assert result.ok, result.outcome
    inside = min(_timed(lambda: box.run(digest, data, WASM_LIMITS)) for _ in range(3))
    plain = wt.Engine()  # no fuel, no epoch, no limiter: wasmtime's defaults
    module = wt.Module(plain, mods.KERNEL)

    def outside_run() -> None:
        store = wt.Store(plain)
        linker = wt.Linker(plain)
        wasi = wt.WasiConfig()
        with tempfile.NamedTemporaryFile() as stdin:
            stdin.write(data)
            stdin.flush()
            wasi.stdin_file = stdin.name
            store.set_wasi(wasi)
            linker.define_wasi()
            start = linker.instantiate(store, module).exports(store)["_start"]
            assert isinstance(start, wt.Func)
            start(store)

    outside = min(_timed(outside_run) for _ in range(3))
    return outside / inside, inside, outside


def native_kernel_ratio(data: bytes) -> tuple[float, float, float]:
    box = NativeSandbox(cap=NATIVE_LIMITS)
    digest = box.load(progs.KERNEL)
    inside = min(_timed(lambda: box.run(digest, data, NATIVE_LIMITS)) for _ in range(3))
    with tempfile.NamedTemporaryFile(suffix=".py") as script:
        script.write(progs.KERNEL)
        script.flush()
        outside = min(
            _timed(
                lambda: subprocess.run(["/usr/bin/python3", script.name], input=data, capture_output=True, check=True)
            )
            for _ in range(3)
        )
    return outside / inside, inside, outside


def _timed(call: object) -> float:
    started = time.perf_counter()
    call()  # type: ignore[operator]
    return time.perf_counter() - started


# -- arbitration time on real nodes --


async def arbitration_times(count: int) -> list[float]:
    from protocols.gossip import task_topic
    from tests.support.market import SharedChain, market_nodes, wait_for

    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [{"arbiter": 2}, {"arbiter": 2}, {"wallet_key": shared.arbiter.key.hex()}]  # escrow.arbiter_peer
    times: list[float] = []
    async with market_nodes(specs, chain=shared) as (nodes, _):
        buyer, seller, arbiter = nodes
        await seller.tasks.watch("model:wasm-bench")
        topic = task_topic("model:wasm-bench")
        await wait_for(lambda: seller.host.get_id() in buyer.announcements.pubsub.peer_topics.get(topic, ()), 30, "sub")
        for index in range(count):
            view = await buyer.tasks.publish_run(
                "model:wasm-bench",
                10**18,
                120,
                kind="wasm",
                module=mods.UPPER,
                input=f"dispute {index}".encode(),
                limits=Limits(fuel=1_000_000, memory_bytes=2 * 1024 * 1024, wall_s=5.0, output_bytes=4096),
                arbiter_peer=str(arbiter.host.get_id()),
                arbiter_wallet=shared.arbiter.address,
                review_timeout_s=60,
            )
            task_id = view.task_id
            await wait_for(lambda: task_id in seller.tasks.book.tasks, 30, "announcement")  # noqa: B023
            bid = await seller.tasks.bid(task_id, 10**17)
            awarded = await buyer.tasks.award(task_id, bid.bid_id)
            await wait_for(lambda: buyer.tasks.view(task_id).result_state == "result_submitted", 30, "result")  # noqa: B023
            await buyer.tasks.review(task_id, False, "bench")
            client = buyer.escrow_client
            assert awarded.escrow_id is not None
            escrow_id = bytes.fromhex(awarded.escrow_id[2:])
            started = time.perf_counter()
            await buyer.tasks.dispute(task_id, "bench")
            while True:
                state = await client.chain.run(client.get, client.account.address, escrow_id)
                if state.phase == "closed":
                    break
                await trio.sleep(0.02)
            times.append(time.perf_counter() - started)
            for party in (buyer, seller):  # both book the resolution before the next task (or the end)
                await wait_for(partial(_closed, party, task_id), 30, "closed")
            verdict = arbiter.tasks.view(task_id).run_verdict
            say(f"arbitration {index + 1}/{count}: {times[-1]:.2f} s ({verdict}, {state.released} to the seller)")
    return times


async def panel_arbitration_times(count: int) -> list[float]:
    """A ``native`` task disputed before a 2-of-3 panel (real nodes, the embedded chain): the time from
    the dispute call to the escrow closed by ``resolve_by_panel``."""
    import dataclasses

    from protocols import task_wire as w
    from protocols.gossip import task_topic
    from tests.support.market import SharedChain, market_nodes, wait_for

    shared = await trio.to_thread.run_sync(SharedChain.start)
    times: list[float] = []
    # The seller trusts the three members (escrow.trusted_arbiters: their PEER:WALLET).
    specs = [{}, {"trusts": (2, 3, 4)}, {}, {}, {}]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        buyer, seller, *members = nodes
        for node in (seller, *members):
            node.sandbox.policy = dataclasses.replace(node.sandbox.policy, kinds=frozenset({"wasm", "native"}))
        panel = w.PanelTerms(
            members=[
                w.PanelMember(peer=str(n.host.get_id()), wallet=n.escrow_client.account.address)  # type: ignore[union-attr]
                for n in members
            ],
            threshold=2,
        )
        await seller.tasks.watch("model:native-bench")
        topic = task_topic("model:native-bench")
        await wait_for(lambda: seller.host.get_id() in buyer.announcements.pubsub.peer_topics.get(topic, ()), 30, "sub")
        for index in range(count):
            view = await buyer.tasks.publish_run(
                "model:native-bench",
                10**18,
                120,
                kind="native",
                module=progs.UPPER,
                input=f"dispute {index}".encode(),
                limits=Limits(fuel=2000, memory_bytes=64 * 1024 * 1024, wall_s=5.0, output_bytes=4096, pids=8),
                review_timeout_s=60,
                panel=panel,
            )
            task_id = view.task_id
            await wait_for(lambda: task_id in seller.tasks.book.tasks, 30, "announcement")  # noqa: B023
            bid = await seller.tasks.bid(task_id, 10**17)
            awarded = await buyer.tasks.award(task_id, bid.bid_id)
            await wait_for(lambda: buyer.tasks.view(task_id).result_state == "result_submitted", 30, "result")  # noqa: B023
            await buyer.tasks.review(task_id, False, "bench")
            client = buyer.escrow_client
            assert client is not None and awarded.escrow_id is not None
            escrow_id = bytes.fromhex(awarded.escrow_id[2:])
            started = time.perf_counter()
            await buyer.tasks.dispute(task_id, "bench")
            while (await client.chain.run(client.get, client.account.address, escrow_id)).phase != "closed":
                await trio.sleep(0.02)
            times.append(time.perf_counter() - started)
            for party in (buyer, seller):
                await wait_for(partial(_closed, party, task_id), 30, "closed")
            say(f"panel arbitration {index + 1}/{count}: {times[-1]:.2f} s ({buyer.tasks.view(task_id).panel_votes})")
    return times


def _closed(node: Any, task_id: str) -> bool:
    return str(node.tasks.book.get(task_id).state) == "task_closed"


# -- the mixed batch of disputes --

FAULTS = {  # fault: (weight, who is right: "seller" / "buyer" / "person")
    "honest_rejected": (35, "seller"),
    "wrong_output": (25, "buyer"),
    "wrong_fuel": (8, "buyer"),
    "honest_hit_limit": (10, "seller"),
    # An honest result rejected, and then neither party serves the program past the arbiter's deadline: the
    # creator published it and rejected the result, so the burden of producing it is the creator's (a creator
    # whose rejection is right serves it); unmet, the seller is paid (``module_withheld``), and rightly.
    "module_withheld": (5, "seller"),
    "asks_for_person": (5, "person"),
    # An honest result rejected, on a task whose limits exceed the default arbiter's caps (the seller's cover
    # them): a panel drawn from members able to re-run it decides; the seller is right.
    "limits_above_arbiter": (5, "seller"),
    # An honest seller of a program that reads randomness or the clock: the seller is right, but only a
    # reproducible re-run may say so; a program whose re-runs differ goes to a person (not wrong).
    "nondeterministic": (7, "seller"),
}

# Half read randomness (the native sandbox seeds it from the program and input: reproducible), half the
# clock (pinned where libfaketime is installed: reproducible there, not elsewhere).
NONDETERMINISTIC = (
    b"#!/bin/sh\nhead -c 8 /dev/urandom | od -An -tx1\n",
    b"#!/bin/sh\ndate +%s%N\n",
)
# The arbiters a creator draws a task's panel from (``task_panel.draw_panel``), as their records state what
# they run: the creator's default arbiter, another like it, three with higher caps, one that runs wasm only.
ARBITER_CAP = Limits(fuel=10**9, memory_bytes=256 * 1024 * 1024, wall_s=10)
HIGHER_CAP = ARBITER_CAP.model_copy(update={"fuel": 10**11})
BOTH = frozenset({"wasm", "native"})
PANEL_POOL = (
    ("arbiter", BOTH, ARBITER_CAP),
    ("like_the_arbiter", BOTH, ARBITER_CAP),
    ("higher_caps_1", BOTH, HIGHER_CAP),
    ("higher_caps_2", BOTH, HIGHER_CAP),
    ("higher_caps_3", BOTH, HIGHER_CAP),
    ("wasm_only", frozenset({"wasm"}), ARBITER_CAP),
)
PANEL_SIZE, PANEL_THRESHOLD = 3, 2


def _rerun(
    arbiter: Sandboxes,
    kind: str,
    program: bytes,
    digest: str,
    data: bytes,
    limits: Limits,
    facts: RerunFacts,
    withheld: bool,
) -> RerunFacts:
    """One arbiter's re-run, as ``runner.RunnerRole`` does it: refused, unavailable, or run (twice for a
    native output that differs)."""
    refusal = run_verdict(
        RunFacts(
            kind,
            arbiter.accepts(kind),
            True,
            limits.within(arbiter.policy.cap),
            len(program) <= arbiter.policy.max_module_bytes,
        )
    )
    if refusal is not None:
        return RerunFacts(**{**facts.__dict__, "rerun_refusal": refusal.reason})
    if withheld:  # no party served it by the deadline (the bench does not wait it out)
        return RerunFacts(**{**facts.__dict__, "rerun_refusal": "module_withheld"})
    try:
        loaded = arbiter.load(kind, program, digest)
        rerun = arbiter.run_sync(kind, loaded, data, limits)
        reproducible = True
        if kind == "native" and rerun.output_sha256 != facts.claimed_sha256:  # as the arbiter: once more
            again = arbiter.run_sync(kind, loaded, data, limits, salt=b"second run")
            reproducible = (again.output_sha256, again.outcome, again.exit_code) == (
                rerun.output_sha256,
                rerun.outcome,
                rerun.exit_code,
            )
        return RerunFacts(
            **{
                **facts.__dict__,
                "rerun_sha256": rerun.output_sha256,
                "rerun_size": len(rerun.output),
                "rerun_usage": Usage(rerun.fuel_used, str(rerun.outcome), rerun.exit_code),
                "rerun_reproducible": reproducible,
            }
        )
    except ClawnodeError as error:
        return RerunFacts(**{**facts.__dict__, "rerun_refusal": error.reason or "refused"})


def _candidates(pool: dict[str, Sandboxes]) -> dict[str, PanelCandidate]:
    """Each pool member as its capability record states it (``panel.panel_candidate``)."""
    return {
        name: PanelCandidate(
            peer=name,
            wallet=f"0x{index + 1:040x}",
            kinds=box.policy.kinds,
            max_fuel=box.policy.cap.fuel,
            max_memory_bytes=box.policy.cap.memory_bytes,
            max_wall_s=box.policy.cap.wall_s,
            max_output_bytes=box.policy.cap.output_bytes,
            max_module_bytes=box.policy.max_module_bytes,
        )
        for index, (name, box) in enumerate(pool.items())
    }


def mixed_batch(count: int, rng: random.Random) -> tuple[float, int, Counter[str]]:
    """Every task names a 2-of-3 panel, drawn by the creator from ``PANEL_POOL`` as ``publish_run`` draws
    one from records (``task_panel.draw_panel``): the default arbiter first, then the others in random
    order, only those able to re-run the task (kind, caps); where fewer than 3 are able the creator
    names its arbiter and two others at random. A ``wasm`` dispute is decided by the first member's
    re-run when it decides; a ``native`` one, and a ``wasm`` one that member could not decide, by the
    panel: each member re-runs in its own sandbox and votes (an abstention when it cannot decide),
    ``tally`` decides at 2 agreeing votes. Resolved without a person: a decision by a re-run (a program
    withheld past the deadline included) or by the panel's automatic votes; a person: a task that asks
    for one, or a panel that cannot reach 2 agreeing votes."""
    # The awarded seller's caps cover the task: it bids only on tasks within them (``run_verdict``).
    seller = Sandboxes(SandboxPolicy(kinds=BOTH, cap=HIGHER_CAP))
    pool = {name: Sandboxes(SandboxPolicy(kinds=kinds, cap=cap)) for name, kinds, cap in PANEL_POOL}
    records = _candidates(pool)
    auto = wrong = 0
    decided: Counter[str] = Counter()
    names, weights = zip(*((name, weight) for name, (weight, _) in FAULTS.items()), strict=True)
    for index in range(count):
        fault = rng.choices(names, weights)[0]
        kind = "native" if fault == "nondeterministic" else rng.choice(["wasm", "wasm", "native"])
        if not bwrap_available() and kind == "native":
            kind = "wasm"
        others = rng.sample([name for name in pool if name != "arbiter"], len(pool) - 1)
        program = {"wasm": mods.UPPER, "native": progs.UPPER}[kind]
        if fault == "nondeterministic":
            program = rng.choice(NONDETERMINISTIC)
        if fault == "honest_hit_limit" and kind == "wasm":
            program = mods.LOOP_FOREVER
        limits = Limits(fuel=1_000_000 if kind == "wasm" else 2000, memory_bytes=64 * 1024 * 1024, wall_s=5.0)
        if fault == "limits_above_arbiter":
            limits = limits.model_copy(update={"fuel": 10**10})
        needs = RunNeeds(kind, limits.fuel, limits.memory_bytes, limits.wall_s, limits.output_bytes, len(program))
        drawn = draw_panel([records[n] for n in ("arbiter", *others)], needs, PANEL_SIZE, PANEL_THRESHOLD)
        if isinstance(drawn, tuple):
            members = tuple(member.peer for member in drawn)
        else:  # too few able: the creator names its arbiter and two others
            members = ("arbiter", *others[: PANEL_SIZE - 1])
            decided["drawn:panel_short"] += 1
        data = f"dispute {index}".encode()
        digest = seller.load(kind, program)
        claimed = seller.run_sync(kind, digest, data, limits)
        output, usage = claimed.output, Usage(claimed.fuel_used, str(claimed.outcome), claimed.exit_code)
        if fault == "wrong_output":
            output = output + b"?"
        if fault == "wrong_fuel" and kind == "wasm":
            usage = Usage(usage.fuel_used + 1, usage.outcome, usage.exit_code)
        elif fault == "wrong_fuel":
            usage = Usage(usage.fuel_used, "trap", None)
        facts = RerunFacts(
            kind=kind,
            price=100,
            claimed_sha256=sha256_hex(output),
            claimed_size=len(output),
            claimed_usage=usage,
            rerun_sha256=None,
        )
        if fault == "asks_for_person":
            decided["person:asks_for_person"] += 1
            continue
        withheld = fault == "module_withheld"
        first = rerun_verdict(_rerun(pool[members[0]], kind, program, digest, data, limits, facts, withheld))
        if kind == "wasm" and first.action == "resolve":
            to_bidder, how = first.to_bidder, f"rerun:{first.reason}"
        else:
            votes = [Vote(members[0], first.to_bidder if first.action == "resolve" else None)]
            for name in members[1:]:
                verdict = rerun_verdict(_rerun(pool[name], kind, program, digest, data, limits, facts, withheld))
                votes.append(Vote(name, verdict.to_bidder if verdict.action == "resolve" else None))
            panel = tally(PanelFacts(members, PANEL_THRESHOLD, 100), votes)
            if panel.state != "decided" or panel.to_bidder is None:
                decided[f"person:panel_{panel.state}:{first.reason}"] += 1
                continue
            to_bidder, how = panel.to_bidder, f"panel:{first.reason}"
        auto += 1
        winner = "seller" if to_bidder else "buyer"
        decided[f"auto:{winner}:{how}"] += 1
        if winner != FAULTS[fault][1]:
            wrong += 1
            decided[f"wrong:{kind}:{fault}"] += 1
    return auto / count, wrong, decided


# -- the escape batteries --


def escapes() -> tuple[int, list[str]]:
    failed: list[str] = []
    limits = Limits(fuel=50_000_000, memory_bytes=4 * 1024 * 1024, wall_s=1.0, output_bytes=64 * 1024)
    box = WasmSandbox(cap=Limits(fuel=10**12, memory_bytes=4 * 1024 * 1024, wall_s=1.0))
    with tempfile.TemporaryDirectory() as scratch:
        secret = Path(scratch) / "identity.key"
        secret.write_bytes(os.urandom(32))

        def wasm(module: bytes, data: bytes = b"", lim: Limits = limits) -> RunResult | str:
            try:
                return box.run(box.load(module), data, lim)
            except ClawnodeError as error:
                return error.reason or "refused"

        checks = {
            "wasm read key": lambda: (
                (r := wasm(mods.READ_HOST_FILE, str(secret).encode())) != ""
                and isinstance(r, RunResult)
                and secret.read_bytes() not in r.output
                and set(r.output) <= {8, 76}
            ),
            "wasm socket": lambda: isinstance(r := wasm(mods.OPEN_SOCKET), RunResult) and set(r.output) == {76},
            "wasm host import": lambda: wasm(mods.HOST_SOCKET_IMPORT) == "import_not_allowed",
            "wasm loop": lambda: (
                isinstance(r := wasm(mods.LOOP_FOREVER), RunResult) and r.outcome == Outcome.FUEL_EXHAUSTED
            ),
            "wasm allocate": lambda: (
                isinstance(r := wasm(mods.ALLOCATE_FOREVER), RunResult) and r.outcome == Outcome.MEMORY_LIMIT
            ),
            "wasm huge output": lambda: (
                isinstance(r := wasm(mods.HUGE_OUTPUT), RunResult)
                and r.outcome == Outcome.OUTPUT_LIMIT
                and len(r.output) <= limits.output_bytes
            ),
            "wasm sleep": lambda: (
                wasm(mods.SLEEP_PAST_DEADLINE, b"", limits.model_copy(update={"fuel": 10**12})) == "wall_clock"
            ),
            "wasm write outside": lambda: (
                isinstance(r := wasm(mods.WRITE_OUTSIDE_OUTPUT), RunResult) and r.output == bytes([8, 8, 76])
            ),
        }
        if bwrap_available():
            native = NativeSandbox(cap=NATIVE_LIMITS)
            nl = NATIVE_LIMITS.model_copy(update={"fuel": 1000, "wall_s": 2.0})

            def run_native(program: bytes, data: bytes = b"") -> RunResult | str:
                try:
                    return native.run(native.load(program), data, nl)
                except ClawnodeError as error:
                    return error.reason or "refused"

            def no_leftovers() -> bool:
                if os.geteuid() != 0:
                    return True
                deadline = time.monotonic() + 15  # a killed pid namespace takes a few seconds to clear
                while time.monotonic() < deadline:
                    if not any(e.name.isdigit() and _uid(e.path) == NOBODY for e in os.scandir("/proc")):
                        return True
                    time.sleep(0.1)
                return False

            checks |= {
                "native read key": lambda: (
                    isinstance(r := run_native(progs.READ_HOST_FILE, str(secret).encode() + b"\n"), RunResult)
                    and r.output == b"done\n"
                ),
                "native socket": lambda: (
                    isinstance(r := run_native(progs.OPEN_SOCKET, b"22"), RunResult) and b"CONNECTED" not in r.output
                ),
                # Stopped by the process limit (sh cannot fork: it exits) or the wall clock; none left.
                "native fork bomb": lambda: (
                    (
                        (r := run_native(progs.FORK_BOMB)) == "wall_clock"
                        or (isinstance(r, RunResult) and r.exit_code != 0)
                    )
                    and no_leftovers()
                ),
                "native allocate": lambda: (
                    isinstance(r := run_native(progs.ALLOCATE), RunResult) and r.output == b"refused\n"
                ),
                "native loop": lambda: (
                    (r := run_native(progs.LOOP_FOREVER)) == "wall_clock"
                    or (isinstance(r, RunResult) and r.outcome == Outcome.FUEL_EXHAUSTED)
                ),
                "native sleep": lambda: run_native(progs.SLEEP_PAST_DEADLINE) == "wall_clock",
                "native huge output": lambda: (
                    isinstance(r := run_native(progs.HUGE_OUTPUT), RunResult) and r.outcome == Outcome.OUTPUT_LIMIT
                ),
                "native write outside": lambda: (
                    isinstance(r := run_native(progs.WRITE_OUTSIDE_OUTPUT, scratch.encode() + b"\n"), RunResult)
                    and b"WROTE_USR" not in r.output
                    and not (Path(scratch) / "pwned").exists()
                ),
                "native unshare": lambda: (
                    isinstance(r := run_native(progs.UNSHARE), RunResult) and b"SURVIVED" not in r.output
                ),
            }
        for name, check in checks.items():
            if not check():
                failed.append(name)
            say(f"battery {name}: {'ESCAPED' if name in failed else 'contained'}")
    return len(failed), failed


def _uid(path: str) -> int | None:
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--disputes", type=int, default=100)
    parser.add_argument("--arbitrations", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    box = WasmSandbox(cap=WASM_LIMITS)
    digest = box.load(mods.UPPER)
    ms_wasm = start_ms(lambda: box.run(digest, b"sixteen bytes!!!", WASM_LIMITS), args.runs)
    say(f"wasm run of a cached module: {ms_wasm:.2f} ms (median of {args.runs})")
    ms_native = float("nan")
    if bwrap_available():
        native = NativeSandbox(cap=NATIVE_LIMITS)
        program = native.load(progs.UPPER)
        ms_native = start_ms(lambda: native.run(program, b"sixteen bytes!!!", NATIVE_LIMITS), max(5, args.runs // 5))
        say(f"native run in a fresh bubblewrap sandbox: {ms_native:.1f} ms")
    data = (bytes(range(256)) * 240)[:60_000]  # the module reads at most 60 KiB of input
    ratio, inside, outside = wasm_kernel_ratio(data)
    print(f"wasm kernel: {inside:.3f} s in the sandbox, {outside:.3f} s outside: throughput ratio {ratio:.3f}")
    if bwrap_available():
        n_ratio, n_inside, n_outside = native_kernel_ratio(bytes(range(256)) * 8)
        print(
            f"native kernel: {n_inside:.3f} s in bubblewrap, {n_outside:.3f} s outside: throughput ratio {n_ratio:.3f}"
        )

    arbitration = trio.run(arbitration_times, args.arbitrations)
    arbitration_s = statistics.median(arbitration)
    print(f"arbitration (dispute -> escrow closed by the re-run): {', '.join(f'{t:.2f}' for t in arbitration)} s")
    if bwrap_available():
        panel = trio.run(panel_arbitration_times, args.arbitrations)
        print(
            "panel arbitration (native, 2 of 3: dispute -> escrow closed by resolve_by_panel): "
            f"{', '.join(f'{t:.2f}' for t in panel)} s"
        )

    if bwrap_available():
        say(f"native clock: {NativeSandbox(cap=NATIVE_LIMITS, cgroups=False).clock_mode}")
    share, wrong, decided = mixed_batch(args.disputes, random.Random(args.seed))
    print(f"mixed batch of {args.disputes}: {share:.0%} decided without a person, {wrong} of them wrongly")
    print(
        "  counted as without a person: a decision by the arbiter's re-run or by 2 of 3 panel members' automatic"
        " votes (each re-ran the program); a person: a task that asks for one, or a panel short of 2 agreeing votes"
    )
    for outcome, count in sorted(decided.items()):
        print(f"  {outcome}: {count}")

    escaped, which = escapes()
    print(f"escape batteries: {escaped} escaped{(': ' + ', '.join(which)) if which else ''}")
    print(
        f"sandbox: start_ms_wasm={ms_wasm:.2f} start_ms_native={ms_native:.1f} kernel_ratio={ratio:.3f} "
        f"arbitration_s={arbitration_s:.2f} auto_resolved={share:.2f} wrong={wrong} escapes={escaped}"
    )


if __name__ == "__main__":
    main()
