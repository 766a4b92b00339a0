"""The next turn of a conversation bought over the network reports the prompt tokens the provider's
KV cache held, in each API's own usage field (OpenAI ``prompt_tokens_details.cached_tokens``,
Responses ``input_tokens_details.cached_tokens``, Anthropic ``cache_read_input_tokens``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import trio

from dht.discovery import DiscoveryQuery
from node.datadir import read_api_token
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.market import market_nodes

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

MODEL = "Tiny/Random-1:q8"


def _conversation(api_url: str, token: str) -> dict[str, Any]:
    client = openai.OpenAI(base_url=f"{api_url}/v1", api_key=token, max_retries=0)
    first: list[Any] = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a colour of the sea."},
    ]
    one = client.chat.completions.create(model=MODEL, messages=first, max_tokens=8, temperature=0)
    second = [*first, {"role": "assistant", "content": one.choices[0].message.content}]
    second.append({"role": "user", "content": "And of the sky?"})
    two = client.chat.completions.create(model=MODEL, messages=second, max_tokens=8, temperature=0)
    three = client.responses.create(model=MODEL, input=second, max_output_tokens=8, temperature=0)
    four = anthropic.Anthropic(base_url=api_url, api_key=token, max_retries=0).messages.create(
        model=MODEL, max_tokens=8, system=first[0]["content"], messages=second[1:], extra_body={"temperature": 0}
    )
    return {"one": one.usage, "two": two.usage, "responses": three.usage, "messages": four.usage}


async def test_the_next_turn_reports_cached_prompt_tokens_through_every_api(tmp_path: Path) -> None:
    path = await trio.to_thread.run_sync(write_tiny_llama_gguf, tmp_path / "tiny.gguf")
    spec = ModelSpec(name=MODEL, path=str(path), n_threads=1)  # type: ignore[call-arg]
    async with market_nodes([{"models": (spec,)}, {}]) as (nodes, _):
        consumer = nodes[1]
        with trio.fail_after(60):
            while not await consumer.discover(DiscoveryQuery(capability=f"model:{MODEL}")):
                await trio.sleep(0.2)
        token = await trio.to_thread.run_sync(read_api_token, consumer.data_dir)
        usage = await trio.to_thread.run_sync(_conversation, consumer.api_url, token)
    one, two = usage["one"], usage["two"]
    assert one.prompt_tokens_details.cached_tokens < one.prompt_tokens
    # The second turn starts with the whole first prompt, which the provider still held.
    assert one.prompt_tokens - 1 <= two.prompt_tokens_details.cached_tokens < two.prompt_tokens
    # The same conversation again: nearly all of it is cached (both prompts are billed in full).
    assert usage["responses"].input_tokens_details.cached_tokens >= one.prompt_tokens
    messages = usage["messages"]
    assert messages.cache_read_input_tokens >= one.prompt_tokens
    assert messages.input_tokens + messages.cache_read_input_tokens == two.prompt_tokens
