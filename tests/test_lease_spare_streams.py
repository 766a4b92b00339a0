"""A consumer negotiates its next call's stream to a provider ahead of the call (``wire.spare_streams``):
real nodes, real libp2p streams over loopback. A spare carries one call like a fresh stream, a spare
closed unused is no failure on the provider, and a spare the peer wrote into, closed or let go stale
is never used."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from node.daemon import Node
from protocols.lease.base import INFER_PROTOCOL
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes, wait_for
from wire.spare_streams import SpareStreams, untouched

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

PROMPT = "the quick brown fox jumps over the lazy dog again"  # 10 words
CHATTY = TProtocol("/clawnode-test/chatty/1.0.0")


def _serve_call_failures(node: Node) -> dict[Any, int]:
    return {key: count for key, count in node.market.failures.items() if key[0] == "serve_call"}


def _count_handled(provider: Node) -> dict[str, int]:
    """The provider's call handler, wrapped to count the streams it took and let go of."""
    counts = {"started": 0, "ended": 0}

    async def counted(stream: INetStream) -> None:
        counts["started"] += 1
        try:
            await provider.market._handle_call(stream)
        finally:
            counts["ended"] += 1

    provider.host.set_stream_handler(INFER_PROTOCOL, counted)
    return counts


async def test_calls_ride_spare_streams_and_an_unused_spare_is_no_failure() -> None:
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}]) as (nodes, _):
        provider, consumer = nodes
        handled = _count_handled(provider)
        view = await consumer.market.open_lease(
            str(provider.host.get_id()), WORDS, budget=WORD_PRICE * 200, duration_s=60
        )
        spares = consumer.market.spare_streams
        for turn in range(3):
            result = await consumer.market.call(view.lease_id, {"prompt": PROMPT})
            assert "".join(chunk["text"] for chunk in result.chunks).replace(" ", "") == PROMPT.replace(" ", "")
            assert result.units == 10
            await wait_for(lambda: len(spares) == spares.per_peer, 10, "the spares to be parked")
            assert spares.taken == turn  # the first call opened its stream, the others took a spare
        lease = await consumer.market.call(view.lease_id, {"prompt": "two words"})
        assert lease.units == 2 and spares.taken == 3
        await wait_for(lambda: len(spares) == spares.per_peer, 10, "the spares to be parked")
        # Both sides counted the same units: 32 words, receipts countersigned as before.
        await wait_for(lambda: consumer.market.held[view.lease_id].seen_units == 32, 10, "the consumer's count")
        assert provider.market.served[view.lease_id].session.units_metered == 32

        # Idle spares are closed; the provider, which waited for their requests, counts no failure.
        spares.idle_s = 0.0
        await spares.close_stale()
        assert len(spares) == 0
        assert handled["started"] == 4 + spares.per_peer
        await wait_for(lambda: handled["ended"] == handled["started"], 10, "the provider to let them go")
        assert _serve_call_failures(provider) == {}
        assert consumer.market.failures == {} or all(key[0] != "call" for key in consumer.market.failures)


async def test_a_spare_the_peer_wrote_into_or_let_go_stale_is_not_used() -> None:
    async with market_nodes([{}, {}]) as (nodes, _):
        server, client = nodes

        async def chatty(stream: INetStream) -> None:  # writes before any request: a stranger's server
            await stream.write(b"\x05hello")
            await trio.sleep(5)

        server.host.set_stream_handler(CHATTY, chatty)
        peer = server.host.get_id()
        spares = SpareStreams(client.host, [CHATTY], per_peer=1)
        await spares.refill(peer)
        assert len(spares) == 1
        parked = spares._spares[str(peer)][0][0]
        muxed: Any = getattr(parked, "muxed_stream")  # noqa: B009 - a NetStream's, not in INetStream
        await wait_for(lambda: bool(muxed.conn.stream_buffers.get(muxed.stream_id)), 10, "the stranger's bytes")
        assert not untouched(parked)
        fresh = await spares.take(peer)
        assert fresh is not parked and spares.taken == 0 and len(spares) == 0
        await fresh.close()

        quiet = SpareStreams(client.host, [INFER_PROTOCOL], per_peer=1, idle_s=0.05)
        await quiet.refill(peer)
        stale = quiet._spares[str(peer)][0][0]
        await trio.sleep(0.1)
        taken = await quiet.take(peer)  # older than idle_s: closed, a new stream opened
        assert taken is not stale and quiet.taken == 0
        await taken.close()
        await quiet.refill(peer)
        reused = quiet._spares[str(peer)][0][0]
        assert await quiet.take(peer) is reused and quiet.taken == 1
        await reused.close()
        await spares.aclose()
        await quiet.aclose()
