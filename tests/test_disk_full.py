"""A full disk (issue 15): the node turns read-only, refuses new work with E_UNAVAILABLE ``disk_full``,
never exits, and heals by itself once space returns.

The data dir sits on a small tmpfs (root only: the tests skip elsewhere) that a filler file fills."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.datadir import read_api_token, read_running
from node.offer_book import OfferBook
from runtime import files
from runtime.errors import ErrorCode
from runtime.files import DISK_FULL_REASON, save_failures, save_quietly
from runtime.ledger import LeaseOpen, Ledger, LedgerError
from tests.runtime.support import peer_id, peer_key
from tests.support.processes import LOOPBACK_ANY_PORT, DaemonProcess, prepare_data_dir

PROVIDER, CONSUMER = peer_key("disk-provider"), peer_key("disk-consumer")
OFFER = {"name": "model:tiny", "summary": "a tiny model", "price_per_unit": 1000}


def _mount_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    yield from _mount_tmpfs(tmp_path / "disk", "4m")


def _fill(directory: Path) -> Path:
    """Take every free byte of ``directory``'s file system with one filler file."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as file:
        while True:
            try:
                file.write(chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    return filler


def _lease(lease_id: str) -> LeaseOpen:
    return LeaseOpen(
        lease_id=lease_id,
        role="provider",
        provider=peer_id(PROVIDER),
        consumer=peer_id(CONSUMER),
        price_per_unit=3,
        budget=10**6,
    )


# -- the save helper --


def test_a_save_the_disk_refuses_keeps_the_old_file_logs_once_and_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "peers.json"
    assert save_quietly(path, "old")
    before = save_failures.total

    def no_space(_: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", no_space)
    monkeypatch.setattr(save_failures, "_last_log", float("-inf"))
    with caplog.at_level(logging.WARNING, logger="runtime.files"):
        assert not save_quietly(path, "new")
        assert not save_quietly(path, "newer")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peers.json"]  # no temporary file left behind
    assert save_failures.total == before + 2 and save_failures.current >= 2
    lines = [r.getMessage() for r in caplog.records if r.name == "runtime.files"]
    assert len(lines) == 1 and "peers.json" in lines[0] and str(tmp_path) not in lines[0]

    monkeypatch.undo()
    assert save_quietly(path, "new")
    assert path.read_text() == "new" and save_failures.current == 0


def test_other_errors_still_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        save_quietly(tmp_path / "missing" / "peers.json", "{}")


# -- on a real full disk --


async def test_the_ledger_refuses_disk_full_and_heals_when_space_returns(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="runtime.ledger.ledger")
    ledger = await Ledger.open(small_disk / "ledger.db")
    await ledger.open_lease(_lease("before"), idempotency_key="before")
    filler = _fill(small_disk)
    refused: LedgerError | None = None
    for i in range(200):
        try:
            await ledger.open_lease(_lease(f"full-{i}"), idempotency_key=f"full-{i}")
        except LedgerError as error:
            refused = error
            break
    assert refused is not None, "the ledger never met the full disk"
    assert refused.code == ErrorCode.UNAVAILABLE and refused.reason == DISK_FULL_REASON
    assert DISK_FULL_REASON in refused.message and str(small_disk) not in refused.message
    assert ledger.failing_writes >= 1
    assert (await ledger.get_lease("before")).budget == 10**6  # reads still work
    for i in range(3):  # more refusals: still one log line, no path in it
        with pytest.raises(LedgerError):
            await ledger.open_lease(_lease(f"again-{i}"), idempotency_key=f"again-{i}")
    lines = [r.getMessage() for r in caplog.records if r.name == "runtime.ledger.ledger"]
    assert len(lines) == 1 and "full" in lines[0] and str(small_disk) not in lines[0]

    filler.unlink()
    await ledger.open_lease(_lease("after"), idempotency_key="after")  # healed, nothing reopened
    assert ledger.failing_writes == 0 and ledger.write_failures >= 1
    await ledger.aclose()


async def test_an_offer_the_disk_refuses_is_not_accepted(small_disk: Path) -> None:
    from dht.offers import Offer

    book = OfferBook(small_disk / "offers.json")
    filler = _fill(small_disk)
    with pytest.raises(Exception) as caught:
        await book.record("model:tiny", Offer(**OFFER))  # type: ignore[arg-type]
    assert getattr(caught.value, "code", None) == ErrorCode.UNAVAILABLE
    assert DISK_FULL_REASON in str(caught.value)
    assert "model:tiny" not in book.overrides
    filler.unlink()
    await book.record("model:tiny", Offer(**OFFER))  # type: ignore[arg-type]
    assert "model:tiny" in book.overrides


# -- a real daemon --


def _api(daemon: DaemonProcess, method: str, path: str, body: object = None) -> httpx.Response:
    running = read_running(daemon.data_dir)
    assert running is not None
    headers = {"authorization": f"Bearer {read_api_token(daemon.data_dir)}"}
    return httpx.request(method, f"{running.api_url}{path}", json=body, headers=headers, timeout=10)


def _metric(daemon: DaemonProcess, name: str) -> float:
    for line in _api(daemon, "GET", "/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_a_daemon_on_a_full_disk_stays_up_refuses_writes_and_heals(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    data_dir = prepare_data_dir(tmp_path / "node")
    mounts = _mount_tmpfs(data_dir, "4m")  # the daemon's log (beside the data dir) stays off it
    next(mounts)
    try:
        daemon = DaemonProcess(data_dir, LOOPBACK_ANY_PORT, env={"CLAWNODE_BOOTSTRAP_USE_DEFAULTS": "false"}).start()
        daemons.append(daemon)
        assert _api(daemon, "PUT", "/api/offers/model:tiny", OFFER).status_code == 200

        filler = _fill(data_dir)
        refused = _api(daemon, "PUT", "/api/offers/model:tiny", {**OFFER, "price_per_unit": 2000})
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "E_UNAVAILABLE" and error["reason"] == DISK_FULL_REASON
        assert str(tmp_path) not in refused.text
        assert _metric(daemon, "clawnode_data_dir_save_failures_total") >= 1
        assert daemon.process is not None and daemon.process.poll() is None  # still alive
        assert _api(daemon, "GET", "/api/status").status_code == 200

        filler.unlink()
        healed = _api(daemon, "PUT", "/api/offers/model:tiny", {**OFFER, "price_per_unit": 2000})
        assert healed.status_code == 200, healed.text
        assert '"price_per_unit": 2000' in (data_dir / "offers.json").read_text()
        assert daemon.process.poll() is None
        code, _ = daemon.stop()
        assert code == 0, daemon.log()[-3000:]
    finally:
        for daemon in daemons:
            daemon.kill()
        next(mounts, None)


async def test_a_running_node_fires_the_ledger_alert_on_a_full_disk_and_resolves_it(tmp_path: Path) -> None:
    import trio

    from node.config import AlertsSection
    from node.daemon import Node
    from runtime.service import ServiceRegistry
    from tests.support.market import market_config

    data_dir = tmp_path / "node"
    mounts = _mount_tmpfs(data_dir, "4m")
    next(mounts)
    try:
        config = market_config(bootstrap=[]).model_copy(update={"alerts": AlertsSection(interval_s=0.2)})
        node = Node(config, data_dir, services=ServiceRegistry())
        token_headers: dict[str, str] = {}

        async def ledger_alert() -> str | None:
            async with httpx.AsyncClient() as client:
                reply = await client.get(f"{node.api_url}/api/alerts", headers=token_headers)
            assert reply.status_code == 200
            states = [a["state"] for a in reply.json()["alerts"] if a["name"] == "LedgerWriteFailures"]
            return states[0] if states else None

        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            token_headers["authorization"] = f"Bearer {read_api_token(data_dir)}"
            filler = _fill(data_dir)
            with pytest.raises(LedgerError) as caught:
                for i in range(200):
                    await node.ledger.open_lease(_lease(f"full-{i}"), idempotency_key=f"full-{i}")
            assert caught.value.code == ErrorCode.UNAVAILABLE and caught.value.reason == DISK_FULL_REASON
            with trio.fail_after(10):
                while await ledger_alert() != "firing":
                    await trio.sleep(0.1)

            filler.unlink()
            await node.ledger.open_lease(_lease("after"), idempotency_key="after")
            with trio.fail_after(10):
                while await ledger_alert() is not None:
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    finally:
        next(mounts, None)


async def test_the_wal_stays_near_one_mebibyte(tmp_path: Path) -> None:
    """wal_autocheckpoint = 256 pages and journal_size_limit = 1 MiB: SQLite's defaults (1000 pages,
    no limit) let the WAL reach ~4 MiB before a checkpoint. ``pytest -s -k wal_stays`` prints the peak.
    500 opens are plenty: on SQLite's defaults they take the WAL to 3.9 MiB (as 1,500 did), and with
    ours its peak is 1.02 MiB after 500 and 1.04 MiB after 1,500."""
    path = tmp_path / "ledger.db"
    ledger = await Ledger.open(path)
    wal = path.with_name("ledger.db-wal")
    peak = 0
    for i in range(500):
        await ledger.open_lease(_lease(f"wal-{i}"), idempotency_key=f"wal-{i}")
        peak = max(peak, wal.stat().st_size if wal.exists() else 0)
    await ledger.aclose()
    print(f"WAL peak over 500 lease opens: {peak / 2**20:.2f} MiB")
    assert peak <= 1.2 * 2**20


async def test_a_provider_on_a_full_disk_refuses_lease_opens_disk_full_then_serves_again(tmp_path: Path) -> None:
    from runtime.errors import ClawnodeError
    from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes

    mounts = _mount_tmpfs(tmp_path / "node0", "8m")  # the provider's data dir; the consumer's is not on it
    provider_dir = next(mounts)
    try:
        async with market_nodes([{"offers": (WORD_OFFER,)}, {}], root=tmp_path) as (nodes, _):
            provider, consumer = nodes
            target = str(provider.host.get_id())
            filler = _fill(provider_dir)
            with pytest.raises(ClawnodeError) as caught:
                await consumer.market.open_lease(target, WORDS, budget=WORD_PRICE * 20, duration_s=300)
            assert caught.value.code == ErrorCode.UNAVAILABLE, caught.value.message
            assert caught.value.reason == DISK_FULL_REASON  # as the provider's error frame said
            assert DISK_FULL_REASON in caught.value.message and str(tmp_path) not in caught.value.message
            assert provider.ledger.failing_writes >= 1

            filler.unlink()
            lease = await consumer.market.open_lease(target, WORDS, budget=WORD_PRICE * 20, duration_s=300)
            assert lease.lease_id and provider.ledger.failing_writes == 0
    finally:
        next(mounts, None)


async def test_the_peer_book_and_sequence_marks_ride_out_a_full_disk(small_disk: Path) -> None:
    from bootstrap.peer_book import PeerBook
    from dht.seq_book import SeqBook

    peers, seqs = PeerBook(small_disk / "peers.json"), SeqBook(small_disk / "record_seqs.json")
    peers.remember("12D3KooWpeer", ["/ip4/127.0.0.1/tcp/4001"])
    await peers.save()
    filler = _fill(small_disk)
    before = save_failures.total
    peers.remember("12D3KooWother", ["/ip4/127.0.0.1/tcp/4002"])
    seqs.note("12D3KooWpeer", 7)
    await peers.save()  # raised OSError [Errno 28] into the DHT service, which took the daemon down
    await seqs.save()
    assert save_failures.total >= before + 2
    assert "12D3KooWother" not in (small_disk / "peers.json").read_text()  # the old file, whole
    filler.unlink()
    await peers.save()
    assert "12D3KooWother" in (small_disk / "peers.json").read_text()


async def test_a_provider_whose_disk_fills_mid_traffic_serves_no_call_it_does_not_meter(tmp_path: Path) -> None:
    """The write-ahead meter: every call served has a durable row before its first chunk, so once space
    returns the provider has metered exactly what the consumer counted; a call the disk refuses is
    refused whole (E_UNAVAILABLE ``disk_full``, no chunk); calls are served again once space returns.
    Before: chunks and end frames kept going out while the meter's writes failed (25 % unmetered)."""
    import trio

    from runtime.errors import ClawnodeError
    from runtime.service import ServiceRegistry, Usage
    from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, WordService, market_nodes

    mounts = _mount_tmpfs(tmp_path / "node0", "8m")  # the provider's data dir; the consumer's is not on it
    provider_dir = next(mounts)
    fillers: list[Path] = []
    ledgers: list[Ledger] = []

    async def fill_until_the_ledger_fails() -> None:
        fillers.append(await trio.to_thread.run_sync(_fill, provider_dir))
        for i in range(200):  # the WAL may still have room for a few writes: use it up
            try:
                await ledgers[0].open_lease(_lease(f"fill-{i}"), idempotency_key=f"fill-{i}")
            except LedgerError:
                return

    class FillsTheDisk(WordService):
        """Echoes words; during the third call, after its first chunk, once that call's pending row is
        written, the provider's disk fills up: its settlement is not written (until space returns)."""

        calls = 0

        async def run(self, body: dict[str, object], emit: object) -> Usage:
            FillsTheDisk.calls += 1

            async def emit_then_fill(data: dict[str, object]) -> None:
                await emit(data)  # type: ignore[operator]
                if FillsTheDisk.calls == 3 and not fillers:
                    # The provider writes the call's row while the engine starts; a chunk produced before
                    # the row is durable waits unsent. Fill only once the row is there, as the call's
                    # first chunk then leaves.
                    with trio.fail_after(10):
                        while not await ledgers[0].pending_calls():
                            await trio.sleep(0.01)
                    await fill_until_the_ledger_fails()

            return await super().run(body, emit_then_fill)  # type: ignore[arg-type]

    services = ServiceRegistry()
    services.register(WORDS, FillsTheDisk())
    try:
        async with market_nodes([{"offers": (WORD_OFFER,), "services": services}, {}], root=tmp_path) as (nodes, _):
            provider, consumer = nodes
            ledgers.append(provider.ledger)
            view = await consumer.market.open_lease(
                str(provider.host.get_id()), WORDS, budget=WORD_PRICE * 100_000, duration_s=300
            )
            held = consumer.market.held[view.lease_id]
            served, refused = 0, None
            for _ in range(400):
                chunks: list[dict[str, object]] = []

                async def collect(data: dict[str, object], chunks: list[dict[str, object]] = chunks) -> None:
                    chunks.append(data)

                try:
                    await consumer.market.stream_call(view.lease_id, {"prompt": "one two three four five"}, collect)
                except ClawnodeError as error:
                    refused = error
                    assert chunks == [], "a refused call served chunks"
                    break
                served += 1
            assert refused is not None, "the provider never met the full disk"
            assert served == 3
            assert refused.code == ErrorCode.UNAVAILABLE and refused.reason == DISK_FULL_REASON
            assert str(tmp_path) not in refused.message
            # The third call waits for space: its settlement, tried as its end frame left, is refused. That
            # try is not ordered before the fourth call's refusal: the fourth call's write-ahead row goes
            # ahead of a settlement still queued for the ledger's writer (``Lane.FIRST``), so the refusal can
            # reach the consumer first. Wait for the settlement's refusal, not for an order.
            with trio.fail_after(10):
                while not provider.market._unsettled:
                    await trio.sleep(0.01)
            assert len(provider.market._unsettled) == 1
            assert len(await provider.ledger.pending_calls()) == 1  # its row, unsettled: not metered yet
            assert (await provider.ledger.get_lease(view.lease_id)).metered_units == 5 * 2

            fillers[0].unlink()  # space returns: the settlements the disk refused land, calls are served
            with trio.fail_after(10):
                while provider.market._unsettled:
                    await trio.sleep(0.05)
            await consumer.market.call(view.lease_id, {"prompt": "six seven"})
            lease = await provider.ledger.get_lease(view.lease_id)
            assert await provider.ledger.pending_calls() == []
            assert lease.metered_units == held.seen_units == 5 * served + 2, (lease.metered_units, held.seen_units)
    finally:
        next(mounts, None)


async def test_a_lease_that_ends_on_a_full_disk_is_still_claimed_once_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease the consumer revokes while the provider's disk is full: its end and its claim wait for
    space instead of being given up, so the countersigned service is paid on chain once space returns.
    Before: the claim's write failed, the provider logged "ended with nothing to claim" and the
    consumer's refund took back the whole lock (1,848 metered units unpaid in a soak run)."""
    import trio

    from node.config import MarketSection
    from protocols.lease import provider as provider_side
    from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes

    monkeypatch.setattr(provider_side, "DISK_RETRY_MAX_S", 0.2)  # the backoff's cap (30 s) is not what is tested
    rare_claims = MarketSection(receipt_every_units=4, receipt_every_s=1, countersign_timeout_s=5, claim_every_s=3600)  # type: ignore[call-arg]
    mounts = _mount_tmpfs(tmp_path / "node0", "8m")  # the provider's data dir; the consumer's is not on it
    provider_dir = next(mounts)
    try:
        async with market_nodes([{"offers": (WORD_OFFER,), "market": rare_claims}, {}], root=tmp_path) as (nodes, _):
            provider, consumer = nodes
            view = await consumer.market.open_lease(
                str(provider.host.get_id()), WORDS, budget=WORD_PRICE * 1000, duration_s=300
            )
            for _ in range(4):
                await consumer.market.call(view.lease_id, {"prompt": "one two three four five"})
            with trio.fail_after(10):  # the receipts so far are countersigned (20 words)
                while await provider.ledger.countersigned_amount(view.lease_id) < 20 * WORD_PRICE:
                    await trio.sleep(0.05)
            filler = await trio.to_thread.run_sync(_fill, provider_dir)
            for i in range(200):  # the WAL may still have room for a few writes: use it up
                try:
                    await provider.ledger.open_lease(_lease(f"fill-{i}"), idempotency_key=f"fill-{i}")
                except LedgerError:
                    break
            await consumer.market.revoke(view.lease_id)
            await trio.sleep(1)  # the provider's wind-down meets the full disk
            assert [s for s in await provider.ledger.list_settlements() if s.kind == "claim"] == []

            filler.unlink()
            with trio.fail_after(30):
                while not any(
                    s.kind == "claim" and s.state == "landed" for s in await provider.ledger.list_settlements()
                ):
                    await trio.sleep(0.1)
            owed = await provider.ledger.countersigned_amount(view.lease_id)
            income = sum(t.income for t in await provider.ledger.totals_by_peer())
            assert owed >= 20 * WORD_PRICE and income == owed, (income, owed)
    finally:
        next(mounts, None)
