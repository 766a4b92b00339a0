"""Soak: steady agent traffic through the router while the chain freezes, a provider dies and a disk fills.

Usage::

    python bench/soak.py [--minutes 15] [--clients 2] [--interval 0.3] [--max-tokens 24]
    python bench/soak.py --minutes 2        # smoke run, about 5 minutes with setup and settlement

Needs root (the primary provider's data dir is a tmpfs mount) and anvil from npm
(``npm install --prefix tests/runtime/anvil``).

Setup: one anvil chain with the escrow deployed (``tests.runtime.support.anvil_popen``), three real
``clawnode start`` daemons (``tests.support.processes.DaemonProcess``), each with a funded dev wallet:

- ``primary``: serves the tiny llama model (``write_tiny_llama_gguf``) as ``model:tiny`` at
  ``--price`` wei per unit, on a fixed loopback port (a restart keeps its address), its data dir on a
  ``--disk`` tmpfs (``tests.test_disk_full._mount_tmpfs``);
- ``backup``: the same model at twice the price;
- ``consumer``: no model; its router buys ``model:tiny`` from the network through leases it opens
  itself (``[router] lease_units`` = ``--lease-units``, half the shipped default, so leases run out and
  are renewed during the run).

``--clients`` agents post ``/v1/chat/completions`` (non-streaming, ``--max-tokens``) to the consumer's
API one after another, pausing ``--interval`` s between requests, for ``--minutes``. The run is cut
into phases (shares of the length): warm-up 15 %, chain freeze 15 %, after 15 %, provider restart
10 %, after 15 %, disk full 15 %, after 15 %. At the start of its phase each fault is injected:

- chain freeze: ``SIGSTOP`` to anvil for ``--freeze-s`` (default: a tenth of the run, at most 60 s),
  then ``SIGCONT``;
- provider restart: ``SIGKILL`` to the primary, ``--down-s`` later started again on the same data dir
  (same identity, same port); healed when its ``running.json`` names the new process;
- disk full: a filler file takes every free byte of the primary's tmpfs for ``--disk-full-s`` (default
  as the freeze), then is deleted.

Faults never overlap: a phase starts at its planned time or when the previous fault healed, whichever
is later.

A fault's own window runs from its injection until it healed plus ``--grace-s`` (default 2 s: the time
the issue allows a restarted provider to be called again). A failed request is "in a fault" when its
[start, end] overlaps a fault's window, else "outside". A request fails when the reply is not a 200
with a non-empty answer; its error code is the reply's ``error.code`` (``E_…``) or, with no reply,
the client exception's type.

After the traffic stops, final settlement: every lease the consumer still holds is revoked
(``DELETE /api/leases/{id}``); the bench waits (``--settle-timeout``) until every provider lease has
ended and every provider settlement has landed, then moves anvil's clock past every lease's deadline
and dispute window and waits ``--refund-wait`` for the consumer's refunds. Then it counts, per escrow
the consumer's wallet locked (the chain's ``Locked`` events, not the ledgers):

- ``unpaid_units`` = Σ over those leases of max(0, served − paid), where served = max(the provider
  ledger's ``metered_units``, the units the consumer's market saw delivered on the lease — the
  ``units`` of ``/api/leases``, sampled every ``--sample-s`` and at the end, largest kept) and paid =
  the chain's ``released`` ÷ ``price_per_unit``. Units delivered but never metered count, and so do
  units metered but never paid.
- ``lost_wei`` = Σ over those escrows of |locked − paid − refunded − still locked|, where locked is the
  ``Locked`` event's amount, paid the provider ledger's ``settled_amount``, refunded the consumer
  ledger's ``refunded_amount`` and still locked what the chain holds in the escrow (open or disputed).
  An escrow the ledgers do not know counts whole unless the chain still holds it. Money that has not
  moved yet is "still locked", not lost: ``still_locked_wei=`` says how much.
- ``rss_growth_mb_per_h``: each daemon's RSS (``/proc/<pid>/status``) every ``--sample-s``; a least-
  squares line over the samples of one process after its first ``--warmup-s`` (default: the warm-up
  phase); for the restarted primary, the longest-lived process. The figure is the largest of the three.

Prints a per-phase table and the settlement figures to stderr (the failed requests with time, phase
and code too), then exactly one line to stdout::

    soak: minutes=… requests=… failed=… failed_in_faults=… failed_outside=… unpaid_units=… lost_wei=…
          still_locked_wei=… rss_growth_mb_per_h=… exits=… leases=…

(``exits``: daemons that exited without the bench killing them, each started again for the
settlement; ``leases``: escrows the consumer locked.)

Goals (issue 15): failed_outside 0, unpaid_units 0, lost_wei 0, rss growth < 5 MB/h (after the
first hour: a 15-minute run only shows the trend). Everything started is stopped and the tmpfs
unmounted on success, error, Ctrl-C or SIGTERM. ``--keep DIR`` keeps the data dirs and daemon logs.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.datadir import read_api_token, read_running
from runtime.escrow import Chain, EscrowClient
from runtime.escrow.client import escrow_key
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.runtime.support import AnvilEscrow, anvil_popen, anvil_skip_reason, free_port
from tests.support.processes import LOOPBACK_ANY_PORT, DaemonProcess, prepare_data_dir
from tests.test_disk_full import _fill, _mount_tmpfs

MODEL = "tiny"
LEASE_DURATION_S = 300
DISPUTE_WINDOW_S = 5
# Phases as shares of the run; the fault named is injected at the phase's start.
PHASES: tuple[tuple[str, float, str | None], ...] = (
    ("warm-up", 0.15, None),
    ("chain freeze", 0.15, "freeze"),
    ("after freeze", 0.15, None),
    ("provider restart", 0.10, "restart"),
    ("after restart", 0.15, None),
    ("disk full", 0.15, "disk"),
    ("after disk full", 0.15, None),
)
_ACTIVE_PHASES = ("active", "disputed")  # the escrow's state index 1, 2: money still held
_ESCROW_PHASES = ("none", "active", "disputed", "closed")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Request:
    started: float
    ended: float
    ok: bool
    code: str = ""
    message: str = ""
    served_by: tuple[str, ...] = ()
    failovers: int = 0


@dataclass
class Fault:
    kind: str
    started: float
    healed: float | None = None
    note: str = ""


@dataclass
class Soak:
    args: argparse.Namespace
    t0: float = 0.0
    t0_wall: float = 0.0  # time.time() at t0: ledger times are wall-clock seconds
    requests: list[Request] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    phases: list[tuple[str, float, float]] = field(default_factory=list)  # name, start, end (monotonic)
    rss: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)  # daemon -> (pid, t, MB)
    seen_units: dict[str, int] = field(default_factory=dict)  # lease id -> units the consumer saw
    exits: dict[int, str] = field(default_factory=dict)  # pid -> what the bench saw: a daemon it did not kill
    killing: bool = False  # the restart fault is under way: the primary's exit is ours

    def note_exits(self, daemons: dict[str, DaemonProcess]) -> None:
        for name, daemon in daemons.items():
            process = daemon.process
            if process is None or process.pid in self.exits or (name == "primary" and self.killing):
                continue
            if process.poll() is not None:
                at = time.monotonic() - self.t0
                self.exits[process.pid] = f"{name} exited with {process.returncode} at t={at:.0f} s"
                log(f"{self.exits[process.pid]}; its log ends:\n{daemon.log()[-2000:]}")

    def window(self, fault: Fault) -> tuple[float, float]:
        healed = fault.healed if fault.healed is not None else math.inf
        return fault.started, healed + self.args.grace_s

    def in_fault(self, request: Request) -> bool:
        return any(request.started <= end and request.ended >= start for start, end in map(self.window, self.faults))

    def phase_of_wall(self, at: float) -> str:
        return self.phase_of(self.t0 + at - self.t0_wall)

    def phase_of(self, at: float) -> str:
        for name, start, end in self.phases:
            if start <= at < end:
                return name
        return self.phases[-1][0] if self.phases else "?"


# -- daemons --


def provider_config(anvil: AnvilEscrow, model: Path, price: int, bootstrap: list[str], args: argparse.Namespace) -> str:
    peers = ", ".join(f'"{addr}"' for addr in bootstrap)
    return (
        f"[bootstrap]\nuse_defaults = false\npeers = [{peers}]\n"
        + anvil.config_section()
        + f"settle_interval_s = 0.5\ndispute_window_s = {DISPUTE_WINDOW_S}\n"
        + "[market]\nclaim_every_s = 10\nreceipt_every_s = 5\n"
        + f"[alerts]\ninterval_s = {args.alerts_interval}\n"
        + f'[[models]]\nname = "{MODEL}"\npath = "{model}"\nprice_per_unit = {price}\nn_threads = 1\n'
    )


def consumer_config(anvil: AnvilEscrow, bootstrap: list[str], args: argparse.Namespace) -> str:
    peers = ", ".join(f'"{addr}"' for addr in bootstrap)
    return (
        f"[bootstrap]\nuse_defaults = false\npeers = [{peers}]\n"
        + anvil.config_section()
        + f"settle_interval_s = 0.5\ndispute_window_s = {DISPUTE_WINDOW_S}\n"
        + f"[router]\nlease_units = {args.lease_units}\nlease_duration_s = {LEASE_DURATION_S}\n"
        + f"[alerts]\ninterval_s = {args.alerts_interval}\n"
    )


def own_addr(daemon: DaemonProcess) -> str:
    """The daemon's loopback listen address with its peer id (a bootstrap entry)."""
    ident = daemon.api("/api/id")
    addrs = [a for a in ident["listen_addrs"] if a.startswith("/ip4/127.0.0.1/")] or ident["listen_addrs"]
    addr = str(addrs[0])
    return addr if "/p2p/" in addr else f"{addr}/p2p/{ident['peer_id']}"


def kill_all(daemons: dict[str, DaemonProcess]) -> None:
    for daemon in daemons.values():
        daemon.kill()


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def paged(daemon: DaemonProcess, path: str, key: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    while True:
        page = daemon.api(f"{path}?limit=1000&offset={len(rows)}")[key]
        rows += page
        if len(page) < 1000:
            return rows


@contextlib.contextmanager
def primary_disk(root: Path, size: str) -> Iterator[Path]:
    """The primary's data dir on its own tmpfs (the log beside it stays on the real disk)."""
    mounts = _mount_tmpfs(root / "primary", size)
    try:
        yield next(mounts)
    except BaseException as error:  # pytest.skip's Outcome is a BaseException
        if type(error).__name__ == "Skipped":
            raise SystemExit("soak: mounting a tmpfs needs root") from None
        raise
    finally:
        next(mounts, None)


# -- the run --


async def agent(soak: Soak, url: str, token: str, index: int, until: float) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"agent {index}: tell me a short story"}],
        "max_tokens": soak.args.max_tokens,
        "temperature": 0,
    }
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=soak.args.request_timeout) as client:
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                reply = await client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError as error:
                soak.requests.append(Request(started, time.monotonic(), False, type(error).__name__, str(error)[:200]))
            else:
                ended = time.monotonic()
                try:
                    data = reply.json()
                except ValueError:
                    data = {}
                if reply.status_code == 200 and data.get("choices") and data["choices"][0]["message"]["content"]:
                    extra = data.get("clawnode") or {}
                    served = tuple(extra.get("served_by") or ())
                    soak.requests.append(Request(started, ended, True, "", "", served, int(extra.get("failovers", 0))))
                else:
                    error_body = data.get("error") if isinstance(data.get("error"), dict) else {}
                    code = str(error_body.get("code") or f"HTTP {reply.status_code}")
                    message = str(error_body.get("message") or reply.text)[:200]
                    soak.requests.append(Request(started, ended, False, code, message))
            await trio.sleep(soak.args.interval)


async def sampler(soak: Soak, daemons: dict[str, DaemonProcess], until: float) -> None:
    consumer = daemons["consumer"]
    while time.monotonic() < until:
        now = time.monotonic()
        soak.note_exits(daemons)
        for name, daemon in daemons.items():
            process = daemon.process
            if process is not None and process.poll() is None:
                mb = rss_mb(process.pid)
                if mb is not None:
                    soak.rss.setdefault(name, []).append((process.pid, now - soak.t0, mb))
        await sample_seen_units(soak, consumer)
        await trio.sleep(soak.args.sample_s)


async def sample_seen_units(soak: Soak, consumer: DaemonProcess) -> None:
    try:
        leases = await trio.to_thread.run_sync(consumer.api, "/api/leases")
    except (httpx.HTTPError, AssertionError) as error:
        log(f"sampling the consumer's leases failed: {type(error).__name__}")
        return
    for view in leases["leases"]:
        if view["role"] == "consumer":
            lease_id = view["lease_id"]
            soak.seen_units[lease_id] = max(soak.seen_units.get(lease_id, 0), int(view["units"]))


async def inject(soak: Soak, kind: str, anvil_proc: Any, primary: DaemonProcess, disk: Path) -> None:
    args = soak.args
    fault = Fault(kind, time.monotonic())
    soak.faults.append(fault)
    at = fault.started - soak.t0
    if kind == "freeze":
        log(f"t={at:.0f}s chain freeze: SIGSTOP anvil for {args.freeze_s:.0f} s")
        anvil_proc.send_signal(signal.SIGSTOP)
        try:
            await trio.sleep(args.freeze_s)
        finally:
            anvil_proc.send_signal(signal.SIGCONT)
        fault.healed = time.monotonic()
    elif kind == "restart":
        log(f"t={at:.0f}s provider restart: SIGKILL the primary, start it again after {args.down_s:.0f} s")
        soak.killing = True
        try:
            await trio.to_thread.run_sync(primary.kill)
            await trio.sleep(args.down_s)
            try:
                await trio.to_thread.run_sync(primary.start, 60.0)
            except (RuntimeError, TimeoutError) as error:
                log(f"the primary did not come back ({type(error).__name__}); trying once more:\n{error}"[-3000:])
                fault.note = "the first restart failed; "
                await trio.to_thread.run_sync(primary.kill)
                await trio.to_thread.run_sync(primary.start, 60.0)
        finally:
            soak.killing = False
        fault.healed = time.monotonic()
        fault.note += f"back after {fault.healed - fault.started:.1f} s"
    elif kind == "disk":
        log(f"t={at:.0f}s disk full: filling the primary's {args.disk} tmpfs for {args.disk_full_s:.0f} s")
        filler = await trio.to_thread.run_sync(_fill, disk)
        try:
            await trio.sleep(args.disk_full_s)
        finally:
            filler.unlink()
        fault.healed = time.monotonic()
    alive = primary.process is not None and primary.process.poll() is None
    log(f"{kind} healed after {(fault.healed or 0) - fault.started:.1f} s; primary alive: {alive}")


async def schedule(soak: Soak, anvil_proc: Any, primary: DaemonProcess, disk: Path, until: float) -> None:
    """The phases one after another; faults never overlap: a phase starts at its planned time or when
    the previous fault healed, whichever is later (a slow restart shortens the phases after it)."""
    planned = soak.t0
    for name, share, kind in PHASES:
        await trio.sleep(max(0.0, planned - time.monotonic()))
        start = time.monotonic()
        if soak.phases:
            previous, previous_start, _ = soak.phases[-1]
            soak.phases[-1] = (previous, previous_start, start)
        soak.phases.append((name, start, until))
        log(f"t={start - soak.t0:.0f}s phase: {name}")
        if kind is not None and start < until:
            await inject(soak, kind, anvil_proc, primary, disk)
        planned += share * soak.args.minutes * 60


async def wait_until(what: str, timeout_s: float, check: Any) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if await trio.to_thread.run_sync(check):
                return True
        except (httpx.HTTPError, AssertionError) as error:
            log(f"{what}: {type(error).__name__}")
        await trio.sleep(1.0)
    log(f"{what}: not within {timeout_s:.0f} s")
    return False


async def settle(
    soak: Soak, anvil: AnvilEscrow, daemons: dict[str, DaemonProcess], names: dict[str, str]
) -> dict[str, Any]:
    """Revoke what the consumer holds, let the claims and refunds land, then count (see the docstring)."""
    args, consumer = soak.args, daemons["consumer"]
    providers = [daemons["primary"], daemons["backup"]]
    await sample_seen_units(soak, consumer)
    held = await trio.to_thread.run_sync(consumer.api, "/api/leases")
    token = await trio.to_thread.run_sync(read_api_token, consumer.data_dir)
    running = read_running(consumer.data_dir)
    assert running is not None
    async with httpx.AsyncClient(base_url=running.api_url, headers={"authorization": f"Bearer {token}"}) as client:
        for view in held["leases"]:
            if view["role"] == "consumer" and view["state"] == "lease_active":
                reply = await client.delete(f"/api/leases/{view['lease_id']}", timeout=60)
                if reply.status_code != 200:
                    log(f"revoking {view['lease_id'][:12]} answered {reply.status_code}: {reply.text[:200]}")
    await sample_seen_units(soak, consumer)

    def claims_landed() -> bool:
        for provider in providers:
            if any(lease["state"] == "lease_active" for lease in paged(provider, "/api/ledger/leases", "leases")):
                return False
            settlements = paged(provider, "/api/ledger/settlements", "settlements")
            if any(s["state"] == "pending" for s in settlements):
                return False
        return True

    started = time.monotonic()
    landed = await wait_until("provider claims", args.settle_timeout, claims_landed)
    log(f"provider leases ended and claims landed: {landed} ({time.monotonic() - started:.0f} s)")

    contract = anvil.escrow.contract
    consumer_wallet = anvil.chain.dev_accounts()[3].address

    def locks() -> list[dict[str, Any]]:
        logs = contract.events.Locked.get_logs(from_block=0)
        return [dict(entry["args"]) for entry in logs if entry["args"]["payer"] == consumer_wallet]

    def escrow_state(key: bytes) -> tuple[int, int, str]:
        raw = contract.functions.escrows(key).call()
        return int(raw[2]), int(raw[3]), _ESCROW_PHASES[int(raw[6])]

    await trio.to_thread.run_sync(anvil.chain.time_travel, LEASE_DURATION_S + DISPUTE_WINDOW_S + 120)

    def refunds_landed() -> bool:
        return all(escrow_state(lock["key"])[2] == "closed" for lock in locks())

    started = time.monotonic()
    refunded = await wait_until("consumer refunds", args.refund_wait, refunds_landed)
    log(f"every escrow closed: {refunded} ({time.monotonic() - started:.0f} s)")
    await trio.sleep(2.0)  # a refund can land a moment before the consumer's ledger records it
    for name, daemon in daemons.items():
        settlements = await trio.to_thread.run_sync(paged, daemon, "/api/ledger/settlements", "settlements")
        states = Counter(f"{s['kind']} {s['state']}" for s in settlements)
        failed = [s for s in settlements if s["state"] == "failed"]
        log(f"settlements of {name}: {dict(sorted(states.items()))}")
        for settlement in failed[:5]:
            log(f"  failed {settlement['kind']} {settlement['settlement_id'][:12]}: {settlement['last_error']}")

    locked = await trio.to_thread.run_sync(locks)
    by_key: dict[bytes, dict[str, Any]] = {}
    for provider in providers:
        for lease in await trio.to_thread.run_sync(paged, provider, "/api/ledger/leases", "leases"):
            if lease["role"] == "provider" and lease["escrow"]:
                by_key[_key_of(lease["escrow"])] = {"provider": lease, "by": names.get(lease["provider"], "?")}
    for lease in await trio.to_thread.run_sync(paged, consumer, "/api/ledger/leases", "leases"):
        if lease["role"] == "consumer" and lease["escrow"]:
            by_key.setdefault(_key_of(lease["escrow"]), {})["consumer"] = lease
    totals = Counter[str]()
    problems: list[str] = []
    for lock in locked:
        key = bytes(lock["key"])
        amount, released, phase = await trio.to_thread.run_sync(escrow_state, key)
        sides = by_key.get(key, {})
        provider_side, consumer_side = sides.get("provider"), sides.get("consumer")
        paid = int(provider_side["settled_amount"]) if provider_side else 0
        refunded_amount = int(consumer_side["refunded_amount"]) if consumer_side else 0
        still = amount - released if phase in _ACTIVE_PHASES else 0
        lost = abs(int(lock["amount"]) - paid - refunded_amount - still)
        lease_id = (consumer_side or provider_side or {}).get("lease_id", "")
        price = int((provider_side or consumer_side or {}).get("price_per_unit", 0)) or 1
        metered = int(provider_side["metered_units"]) if provider_side else 0
        seen = soak.seen_units.get(lease_id, 0)
        unpaid = max(0, max(metered, seen) - released // price)
        totals.update(
            locked=int(lock["amount"]),
            released=released,
            paid=paid,
            refunded=refunded_amount,
            still=still,
            lost=lost,
            metered=metered,
            seen=seen,
            paid_units=released // price,
            unpaid=unpaid,
        )
        if lost or unpaid or paid != released:
            created = (consumer_side or provider_side or {}).get("created_at")
            opened = "?" if created is None else f"t={created - soak.t0_wall:.0f} s, {soak.phase_of_wall(created)}"
            problems.append(
                f"lease {lease_id[:12] or key.hex()[:12]} ({sides.get('by', '?')}, opened {opened}, {phase}): "
                f"locked {lock['amount']} chain released "
                f"{released} provider ledger paid {paid} consumer refunded {refunded_amount} still {still} "
                f"-> lost {lost}; metered {metered} seen {seen} paid {released // price} units"
            )
    return {"escrows": len(locked), "totals": totals, "problems": problems, "claims": landed, "refunds": refunded}


def _key_of(ref: dict[str, str]) -> bytes:
    return escrow_key(ref["payer"], bytes.fromhex(ref["escrow_id"][2:]))


def slope_mb_per_h(samples: list[tuple[int, float, float]], warmup_s: float) -> float | None:
    """Least-squares slope of the longest-lived process's samples after its first ``warmup_s``."""
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for pid, at, mb in samples:
        by_pid.setdefault(pid, []).append((at, mb))
    if not by_pid:
        return None
    points = max(by_pid.values(), key=lambda p: p[-1][0] - p[0][0])
    points = [(t, mb) for t, mb in points if t >= points[0][0] + warmup_s]
    if len(points) < 3:
        return None
    xs, ys = [t for t, _ in points], [mb for _, mb in points]
    return statistics.linear_regression(xs, ys).slope * 3600


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def phase_table(soak: Soak, names: dict[str, str]) -> list[str]:
    lines = [
        f"{'phase':<18}{'s':>6}{'requests':>10}{'failed':>8}{'in fault':>10}{'p50 s':>8}{'p95 s':>8}"
        f"{'primary':>9}{'backup':>8}{'failover':>10}  errors"
    ]
    for name, start, end in soak.phases:
        rows = [r for r in soak.requests if start <= r.started < end]
        failed = [r for r in rows if not r.ok]
        latency = [r.ended - r.started for r in rows if r.ok]
        served = Counter(names.get(who, who[:8]) for r in rows if r.ok for who in r.served_by[-1:])
        errors = Counter(r.code for r in failed)
        lines.append(
            f"{name:<18}{end - start:>6.0f}{len(rows):>10}{len(failed):>8}"
            f"{sum(1 for r in failed if soak.in_fault(r)):>10}{percentile(latency, 0.5):>8.2f}"
            f"{percentile(latency, 0.95):>8.2f}{served['primary']:>9}{served['backup']:>8}"
            f"{sum(1 for r in rows if r.failovers):>10}  {dict(errors) or ''}"
        )
    return lines


async def run(args: argparse.Namespace, root: Path) -> int:
    soak = Soak(args)
    daemons: dict[str, DaemonProcess] = {}
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "CLAWNODE_BOOTSTRAP_USE_DEFAULTS": "false"}
    with contextlib.ExitStack() as stack:
        url, anvil_proc = stack.enter_context(anvil_popen())
        chain = await trio.to_thread.run_sync(Chain.rpc, url)
        escrow = await trio.to_thread.run_sync(EscrowClient.deploy, chain, chain.dev_accounts()[0])
        anvil = AnvilEscrow(url, chain, escrow)
        disk = stack.enter_context(primary_disk(root, args.disk))
        stack.callback(kill_all, daemons)  # before the tmpfs is unmounted
        model = await trio.to_thread.run_sync(write_tiny_llama_gguf, root / "tiny.gguf")
        wallets = {name: chain.dev_accounts()[i].key.hex() for name, i in (("primary", 1), ("backup", 2))}

        # The primary's data dir is made on the real disk, then copied onto its tmpfs.
        staged = prepare_data_dir(
            root / "primary-staged",
            wallet_key=wallets["primary"],
            config=provider_config(anvil, model, args.price, [], args),
        )
        shutil.copytree(staged, disk, dirs_exist_ok=True)
        shutil.rmtree(staged)
        listen = ["--listen", f"/ip4/127.0.0.1/tcp/{free_port()}", "--api-port", "0"]
        daemons["primary"] = DaemonProcess(disk, listen, env=env)
        await trio.to_thread.run_sync(daemons["primary"].start, 60.0)
        primary_addr = await trio.to_thread.run_sync(own_addr, daemons["primary"])
        backup_dir = prepare_data_dir(
            root / "backup",
            wallet_key=wallets["backup"],
            config=provider_config(anvil, model, 2 * args.price, [primary_addr], args),
        )
        daemons["backup"] = DaemonProcess(backup_dir, list(LOOPBACK_ANY_PORT), env=env)
        await trio.to_thread.run_sync(daemons["backup"].start, 60.0)
        backup_addr = await trio.to_thread.run_sync(own_addr, daemons["backup"])
        consumer_dir = prepare_data_dir(
            root / "consumer",
            wallet_key=chain.dev_accounts()[3].key.hex(),
            config=consumer_config(anvil, [primary_addr, backup_addr], args),
        )
        daemons["consumer"] = DaemonProcess(consumer_dir, list(LOOPBACK_ANY_PORT), env=env)
        await trio.to_thread.run_sync(daemons["consumer"].start, 60.0)
        consumer = daemons["consumer"]
        names = {
            (await trio.to_thread.run_sync(d.api, "/api/id"))["peer_id"]: name
            for name, d in daemons.items()
            if name != "consumer"
        }

        def both_found() -> bool:
            found = consumer.api(f"/api/discover?capability=model:{MODEL}")["providers"]
            return {p["peer_id"] for p in found} >= set(names)

        if not await wait_until("discovering both providers", 120, both_found):
            log(f"the consumer's log ends:\n{consumer.log()[-3000:]}")
            return 1
        running = read_running(consumer.data_dir)
        assert running is not None
        token = await trio.to_thread.run_sync(read_api_token, consumer.data_dir)
        log(f"setup done: 3 daemons, anvil; soak for {args.minutes:g} min")

        soak.t0, soak.t0_wall = time.monotonic(), time.time()
        until = soak.t0 + args.minutes * 60
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler, soak, daemons, until)
            nursery.start_soon(schedule, soak, anvil_proc, daemons["primary"], disk, until)
            for index in range(args.clients):
                nursery.start_soon(agent, soak, running.api_url, token, index, until)
        log("traffic stopped; final settlement")
        soak.note_exits(daemons)
        for name, daemon in daemons.items():
            if daemon.process is None or daemon.process.poll() is not None:
                # Counted (exits=); started again so that its ledger can be read and its claims land.
                log(f"{name} is not running at the end: starting it again for the settlement")
                await trio.to_thread.run_sync(daemon.start, 60.0)
        figures = await settle(soak, anvil, daemons, names)

    return report(soak, figures, names)


def report(soak: Soak, figures: dict[str, Any], names: dict[str, str]) -> int:
    args = soak.args
    for line in phase_table(soak, names):
        log(line)
    primary = next((peer for peer, name in names.items() if name == "primary"), "")
    for fault in soak.faults:
        start, end = soak.window(fault)
        healed = fault.healed if fault.healed is not None else math.inf
        back = min(
            (r.ended for r in soak.requests if r.ok and r.started >= healed and r.served_by[-1:] == (primary,)),
            default=None,
        )
        served = "never" if back is None else f"+{back - healed:.1f} s"
        log(
            f"fault {fault.kind}: window t={start - soak.t0:.1f}..{end - soak.t0:.1f} s; "
            f"{fault.note}{'; ' * bool(fault.note)}"
            f"first request answered by the primary after it healed: {served}"
        )
    failed = [r for r in soak.requests if not r.ok]
    outside = [r for r in failed if not soak.in_fault(r)]
    for request in failed[:40]:
        where = "in fault" if soak.in_fault(request) else "OUTSIDE faults"
        log(
            f"failed t={request.started - soak.t0:.1f}..{request.ended - soak.t0:.1f} s "
            f"({soak.phase_of(request.started)}, {where}): {request.code} {request.message}"
        )
    totals: Counter[str] = figures["totals"]
    log(
        f"settlement: {figures['escrows']} escrows; locked {totals['locked']} = paid {totals['paid']} + refunded "
        f"{totals['refunded']} + still locked {totals['still']} (+ lost {totals['lost']}); chain released "
        f"{totals['released']}; units metered {totals['metered']} seen {totals['seen']} paid {totals['paid_units']}"
    )
    for problem in figures["problems"][:20]:
        log(problem)
    growth: dict[str, float | None] = {}
    for name, samples in soak.rss.items():
        growth[name] = slope_mb_per_h(samples, args.warmup_s)
        first, last = samples[0][2], samples[-1][2]
        slope = growth[name]
        log(
            f"rss {name}: {first:.0f} -> {last:.0f} MB, {len({pid for pid, _, _ in samples})} process(es), "
            f"growth {'n/a' if slope is None else f'{slope:.1f} MB/h'}"
        )
    slopes = [s for s in growth.values() if s is not None]
    worst = max(slopes) if slopes else math.nan
    print(
        f"soak: minutes={args.minutes:g} requests={len(soak.requests)} failed={len(failed)} "
        f"failed_in_faults={len(failed) - len(outside)} failed_outside={len(outside)} "
        f"unpaid_units={totals['unpaid']} lost_wei={totals['lost']} still_locked_wei={totals['still']} "
        f"rss_growth_mb_per_h={worst:.1f} exits={len(soak.exits)} leases={figures['escrows']}",
        flush=True,
    )
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=15.0, help="traffic length (setup, settlement extra)")
    parser.add_argument("--clients", type=int, default=2, help="agents sending requests one after another")
    parser.add_argument("--interval", type=float, default=0.3, help="each agent's pause between requests, s")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--price", type=int, default=1000, help="the primary's wei per unit; the backup asks twice")
    parser.add_argument("--lease-units", type=int, default=10_000, help="[router] lease_units of the consumer")
    parser.add_argument("--alerts-interval", type=float, default=1.0, help="[alerts] interval_s of every daemon")
    parser.add_argument("--freeze-s", type=float, default=None, help="chain freeze length (default run/10, ≤ 60)")
    parser.add_argument("--disk-full-s", type=float, default=None, help="disk-full length (default as the freeze)")
    parser.add_argument("--down-s", type=float, default=2.0, help="how long the killed primary stays down")
    parser.add_argument("--disk", default="32m", help="size of the primary's tmpfs")
    parser.add_argument("--grace-s", type=float, default=2.0, help="a fault's window lasts this long after it healed")
    parser.add_argument("--sample-s", type=float, default=5.0, help="RSS and lease sampling period")
    parser.add_argument("--warmup-s", type=float, default=None, help="RSS left out of the fit (default: warm-up)")
    parser.add_argument("--settle-timeout", type=float, default=180.0)
    parser.add_argument("--refund-wait", type=float, default=90.0)
    parser.add_argument("--keep", type=Path, default=None, help="keep data dirs and logs here")
    args = parser.parse_args(argv)
    total = args.minutes * 60
    if args.freeze_s is None:
        args.freeze_s = min(60.0, total / 10)
    if args.disk_full_s is None:
        args.disk_full_s = args.freeze_s
    if args.warmup_s is None:
        args.warmup_s = PHASES[0][1] * total
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    skip = anvil_skip_reason()
    if skip is not None:
        print(f"soak: needs anvil: {skip}", file=sys.stderr)
        return 2

    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="soak-", dir=args.keep))
        return trio.run(run_until_stopped, args, root)
    with tempfile.TemporaryDirectory(prefix="clawnode-soak-") as tmp:
        return trio.run(run_until_stopped, args, Path(tmp))


async def run_until_stopped(args: argparse.Namespace, root: Path) -> int:
    """``run``, cancelled on SIGTERM (Ctrl-C raises inside it): either way everything it started is
    stopped and the tmpfs unmounted as its context managers unwind."""
    code = 143
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    log("SIGTERM: stopping")
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            code = await run(args, root)
            nursery.cancel_scope.cancel()
    return code


if __name__ == "__main__":
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    sys.exit(main())
