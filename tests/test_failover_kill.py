"""Kill the provider that is streaming an answer: the agent's stream completes from another one.

The first provider is a real ``clawnode start`` process (a tiny llama.cpp model, on an anvil chain
shared by everyone) and is SIGKILLed after the agent has received 40 pieces; the second is a full
in-process node serving the same model at a higher price. The agent uses the official ``openai``
client against the consumer node's ``/v1`` and sees one uninterrupted stream.

Needs anvil from npm (``npm install --prefix tests/runtime/anvil``); skipped with that hint without.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from dht.discovery import DiscoveryQuery
from node.config import Config
from node.daemon import Node
from node.datadir import read_api_token
from runtime.escrow import EscrowClient
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.ledger import LedgerStore
from tests.runtime.support import AnvilEscrow, anvil_skip_reason, anvil_with_escrow
from tests.support.market import market_config, wait_for
from tests.support.processes import LOOPBACK_ANY_PORT, DaemonProcess, prepare_data_dir

_skip = anvil_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

MAX_TOKENS = 1200
KILL_AFTER = 3  # frames: the engine sends ~10 ms of tokens a frame; the tiny model runs 1,200 in under a second


@pytest.fixture(scope="module")
def anvil() -> Iterator[AnvilEscrow]:
    with anvil_with_escrow() as chain:
        yield chain


def _subprocess_provider(root: Path, anvil: AnvilEscrow, model: Path) -> DaemonProcess:
    config = (
        "[bootstrap]\nuse_defaults = false\n"
        + anvil.config_section()
        + f'[[models]]\nname = "tiny"\npath = "{model}"\nprice_per_unit = 1000\nn_threads = 1\n'
    )
    wallet_key = anvil.chain.dev_accounts()[1].key.hex()
    return DaemonProcess(
        prepare_data_dir(root / "cheap", wallet_key=wallet_key, config=config), list(LOOPBACK_ANY_PORT)
    )


async def test_killing_the_streaming_provider_switches_to_the_next(anvil: AnvilEscrow, tmp_path: Path) -> None:
    chain, escrow = anvil.chain, anvil.escrow
    model = await trio.to_thread.run_sync(write_tiny_llama_gguf, tmp_path / "tiny.gguf")
    cheap = _subprocess_provider(tmp_path, anvil, model)
    await trio.to_thread.run_sync(cheap.start)
    try:
        cheap_id = cheap.identity()["peer_id"]
        bootstrap = cheap.identity()["listen_addrs"][:1]
        spec = ModelSpec(name="tiny", path=str(model), price_per_unit=2000, n_threads=1)  # type: ignore[call-arg]

        def connector(index: int) -> Any:
            account = chain.dev_accounts()[index]
            return lambda _key: EscrowClient(chain, account, escrow.address)

        def under_cheaps_arbiter(config: Config) -> Config:
            # A consumer locks only under the arbiter it trusts: all three name the one cheap's config does.
            trusted = config.escrow.model_copy(update={"arbiter": chain.dev_accounts()[9].address})
            return config.model_copy(update={"escrow": trusted})

        with tempfile.TemporaryDirectory(prefix="clawnode-failover-") as root:
            backup = Node(
                under_cheaps_arbiter(market_config(bootstrap=bootstrap, models=(spec,))),
                Path(root) / "backup",
                escrow_connector=connector(2),
            )
            consumer = Node(
                under_cheaps_arbiter(market_config(bootstrap=bootstrap)),
                Path(root) / "consumer",
                escrow_connector=connector(3),
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(backup.run)
                await nursery.start(consumer.run)
                await wait_for(lambda: backup.settlement_queue is not None and consumer.settlement_queue is not None)
                with trio.fail_after(60):
                    while len(await consumer.discover(DiscoveryQuery(capability="model:tiny"))) < 2:
                        await trio.sleep(0.2)
                client = openai.OpenAI(
                    base_url=f"{consumer.api_url}/v1", api_key=read_api_token(consumer.data_dir), max_retries=0
                )
                messages: list[Any] = [{"role": "user", "content": "a long story, please"}]

                def stream_and_kill() -> tuple[list[str], Any, dict[str, Any]]:
                    pieces: list[str] = []
                    final: dict[str, Any] = {}
                    usage = None
                    for chunk in client.chat.completions.create(
                        model="tiny",
                        messages=messages,
                        max_tokens=MAX_TOKENS,
                        temperature=0,
                        stream=True,
                        stream_options={"include_usage": True},
                    ):
                        if chunk.choices:
                            pieces.append(chunk.choices[0].delta.content or "")
                            if chunk.choices[0].finish_reason:
                                final = dict(chunk.model_extra or {})
                        if chunk.usage is not None:
                            usage = chunk.usage
                        if len(pieces) == KILL_AFTER:
                            cheap.kill()  # SIGKILL, mid-stream
                    return pieces, usage, final

                pieces, usage, final = await trio.to_thread.run_sync(stream_and_kill)
                text = "".join(pieces)
                assert final["clawnode"]["served_by"] == [cheap_id, str(backup.host.get_id())]
                assert final["clawnode"]["failovers"] == 1
                engine = backup.model_host.get("tiny")
                assert engine is not None
                reference = await engine.chat(messages, max_tokens=MAX_TOKENS, temperature=0)
                # Continued where the dead provider stopped: the answer an uninterrupted model gives,
                # up to the last token or two (the text so far is re-tokenized by the backup, which can
                # split a piece differently than it was generated).
                agreed = next(
                    (i for i, (a, b) in enumerate(zip(text, reference.text, strict=False)) if a != b),
                    min(len(text), len(reference.text)),
                )
                assert agreed >= len(reference.text) - 2, (agreed, len(text), len(reference.text))

                # Usage on each ledger covers only what that provider delivered: the killed one
                # never got to meter its broken call; the backup metered its continuation exactly.
                store = await trio.to_thread.run_sync(LedgerStore.open, cheap.data_dir / "ledger.db")
                try:
                    assert all(lease.metered_units == 0 for lease in store.list_leases())
                finally:
                    store.close()
                # The agent's usage: the backup's prompt (which carried the text so far) and every
                # token it received; the backup metered its prompt and only its own tokens.
                assert usage is not None and usage.completion_tokens == MAX_TOKENS
                [lease] = await backup.ledger.list_leases()
                own_completion = lease.metered_units - usage.prompt_tokens
                assert 0 < own_completion <= MAX_TOKENS - (KILL_AFTER - 1)  # the first piece may be the role alone
                nursery.cancel_scope.cancel()
    finally:
        cheap.kill()
