"""Verified inference end to end (issue 21): real nodes, a real lease. A provider that advertises one
GGUF file and serves another is caught on its first call, and the lease ends; an honest provider of the
same file passes its checks and keeps serving."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from click.testing import CliRunner

from dht.discovery import DiscoveryQuery
from node.cli import main
from runtime.errors import ClawnodeError
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify import identity
from tests.support.market import market_nodes, wait_for

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 12, "temperature": 0}


async def test_a_substitute_model_is_caught_on_its_first_call_and_an_honest_one_is_not(tmp_path: Path) -> None:
    advertised = write_tiny_llama_gguf(tmp_path / "advertised.gguf", seed=0)
    honest = write_tiny_llama_gguf(tmp_path / "honest.gguf", seed=0)  # the same bytes, another node's copy
    substitute = write_tiny_llama_gguf(tmp_path / "substitute.gguf", seed=1)
    # The cheat: its record states the advertised file's sha256 while it serves another file.
    stat = substitute.stat()
    identity._cache[(str(substitute.resolve()), stat.st_size, stat.st_mtime_ns)] = hashlib.sha256(
        advertised.read_bytes()
    ).hexdigest()

    def spec(path: Path) -> ModelSpec:
        return ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]

    specs = [{"models": (spec(advertised),)}, {"models": (spec(substitute),)}, {"models": (spec(honest),)}]
    async with market_nodes(specs) as (nodes, _):
        consumer, cheat, fair = nodes
        cheat_id, fair_id = str(cheat.host.get_id()), str(fair.host.get_id())
        assert cheat.model_host.sha256s["tiny"] == fair.model_host.sha256s["tiny"]  # both advertise the same file

        lease = await consumer.market.open_lease(cheat_id, "model:tiny", budget=10**9, duration_s=60)
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.call(lease.lease_id, CHAT)
        assert caught.value.reason is not None and caught.value.reason.startswith("verification_")
        record = consumer.market.verifying.book.get(cheat_id)
        assert record is not None and (record.failed, record.passed) == (1, 0)

        def ended() -> bool:
            return any(v.lease_id == lease.lease_id and v.state != "active" for v in consumer.market.leases())

        await wait_for(ended, what="the cheat's lease ended")
        with pytest.raises(ClawnodeError):
            await consumer.market.call(lease.lease_id, CHAT)  # nothing more is bought on that lease

        lease = await consumer.market.open_lease(fair_id, "model:tiny", budget=10**9, duration_s=60)
        for _ in range(2):
            result = await consumer.market.call(lease.lease_id, CHAT)
            assert result.units > 0 and "logprobs" not in result.chunks[0]  # asked none: sent none
        record = consumer.market.verifying.book.get(fair_id)
        assert record is not None and record.failed == 0 and record.passed >= 1

        # The router never buys from the caught provider again; the honest one stays in its ranking.
        query = DiscoveryQuery(capability="model:tiny")
        with trio.fail_after(30):
            while {cheat_id, fair_id} - {p.peer_id for p in await consumer.discover(query)}:
                await trio.sleep(0.2)
        ranked = [p.peer_id for p in consumer.router.rank(await consumer.discover(query))]
        assert fair_id in ranked and cheat_id not in ranked

        # `clawnode find` shows this node's checks of each provider it lists.
        def find() -> str:
            args = ["find", "model:tiny", "--data-dir", str(consumer.data_dir)]
            return CliRunner().invoke(main, args, catch_exceptions=False).output

        shown = await trio.to_thread.run_sync(find)
        assert f"{cheat_id}  verification FAILED (" in shown and f"{fair_id}  verification passed" in shown
