"""The lease market against peers that misbehave: each case is answered with its stable code, the
node keeps serving, and nothing secret leaks into a reply, an error or a log line."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from libp2p.peer.id import ID
from pydantic import TypeAdapter

from node.config import MarketSection
from node.daemon import Node
from protocols import lease as lease_module
from protocols import lease_wire as w
from protocols.lease import handler as lease_handler
from runtime.errors import ClawnodeError, ErrorCode
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes, wait_for
from wire.framing import encode_uvarint
from wire.rpc import request
from wire.signed import seal

FAST = MarketSection(  # type: ignore[call-arg]
    receipt_every_units=5, receipt_every_s=1, countersign_timeout_s=2, abandon_after_s=4
)
QUOTE_REPLY = TypeAdapter(w.QuoteReply)
GRANT_REPLY = TypeAdapter(w.GrantReply)
SEEN: list[str] = []  # every reply and error text produced in these tests, for the secret scan
TOKENS: list[str] = []  # every access token granted in these tests


@pytest.fixture(autouse=True)
def _capture_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG, logger="protocols")
    caplog.set_level(logging.DEBUG, logger="node")
    caplog.set_level(logging.DEBUG, logger="runtime")
    yield
    SEEN.extend(record.getMessage() for record in caplog.records)


async def _refused(code: ErrorCode, call: Any) -> ClawnodeError:
    with pytest.raises(ClawnodeError) as caught:
        await call
    SEEN.append(caught.value.message)
    assert caught.value.code == code, caught.value.message
    return caught.value


def _peer(node: Node) -> str:
    return str(node.host.get_id())


async def test_wrong_token_expired_lease_and_over_budget_are_refused() -> None:
    async with market_nodes([{"offers": (WORD_OFFER,), "market": FAST}, {}]) as (nodes, _):
        provider, consumer = nodes
        view = await consumer.market.open_lease(_peer(provider), WORDS, budget=WORD_PRICE * 4, duration_s=3)
        held = consumer.market.held[view.lease_id]
        real_token = held.token
        TOKENS.append(real_token)

        held.token = "x" * 43
        await _refused(ErrorCode.FORBIDDEN, consumer.market.call(view.lease_id, {"prompt": "a"}))
        held.token = real_token

        # 4 words of budget: a call that may use 10 is refused before it runs.
        await _refused(
            ErrorCode.INSUFFICIENT_FUNDS, consumer.market.call(view.lease_id, {"prompt": "a b", "max_tokens": 10})
        )
        result = await consumer.market.call(view.lease_id, {"prompt": "a b c", "max_tokens": 3})
        assert result.units == 3

        await trio.sleep(3.5)
        await _refused(ErrorCode.EXPIRED, consumer.market.call(view.lease_id, {"prompt": "a"}))
        # Expiry ended the lease on both sides and the provider claims the 3 words served.
        await wait_for(lambda: consumer.market.held[view.lease_id].ended_reason == "expired", 15)
        provider_lease = await provider.ledger.get_lease(view.lease_id)
        assert provider_lease.state == "lease_ended" and provider_lease.metered_units == 3


async def test_replayed_open_and_foreign_quotes_are_refused() -> None:
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}, {}]) as (nodes, _):
        provider, consumer, stranger = nodes
        # Trust the consumer post-paid so the raw protocol exchange below needs no escrow lock.
        provider.market.settings = provider.market.settings.model_copy(
            update={"trusted_peers": [_peer(consumer)], "postpaid_cap": WORD_PRICE * 100}
        )
        peer = ID.from_base58(_peer(provider))
        quote_request = w.QuoteRequest(capability=WORDS, expected_units=10, duration_s=60)
        quote = await request(consumer.host, peer, lease_module.LEASE_PROTOCOL, quote_request, QUOTE_REPLY)
        opening = w.LeaseOpen(quote=quote.envelope, lease_id="a" * 64, budget=WORD_PRICE * 10, mode="postpaid")
        envelope = base64.b64encode(
            seal(opening, consumer.market.key, domain=w.OPEN_DOMAIN, payload_type=w.OPEN_TYPE)
        ).decode()
        grant = await request(
            consumer.host, peer, lease_module.LEASE_PROTOCOL, w.OpenRequest(envelope=envelope), GRANT_REPLY
        )
        assert grant.token
        TOKENS.append(grant.token)
        # The same signed open again: the quote is spent.
        await _refused(
            ErrorCode.CONFLICT,
            request(consumer.host, peer, lease_module.LEASE_PROTOCOL, w.OpenRequest(envelope=envelope), GRANT_REPLY),
        )
        # A stranger replays the consumer's signed open: signed by someone else than the sender.
        await _refused(
            ErrorCode.FORBIDDEN,
            request(stranger.host, peer, lease_module.LEASE_PROTOCOL, w.OpenRequest(envelope=envelope), GRANT_REPLY),
        )
        # A quote the consumer signed itself, passed off as the provider's.
        forged_quote = w.Quote(
            quote_id="forged",
            provider=_peer(provider),
            consumer=_peer(consumer),
            capability=WORDS,
            price_per_unit=0,
            expected_units=10,
            duration_s=60,
            valid_until=2**40,
            postpaid_cap=10**30,
        )
        forged = base64.b64encode(
            seal(forged_quote, consumer.market.key, domain=w.QUOTE_DOMAIN, payload_type=w.QUOTE_TYPE)
        ).decode()
        opening = w.LeaseOpen(quote=forged, lease_id="b" * 64, budget=10, mode="postpaid")
        envelope = base64.b64encode(
            seal(opening, consumer.market.key, domain=w.OPEN_DOMAIN, payload_type=w.OPEN_TYPE)
        ).decode()
        await _refused(
            ErrorCode.FORBIDDEN,
            request(consumer.host, peer, lease_module.LEASE_PROTOCOL, w.OpenRequest(envelope=envelope), GRANT_REPLY),
        )
        # A stranger cannot open post-paid: it is not trusted, and the chain terms demand a lock.
        quote = await request(stranger.host, peer, lease_module.LEASE_PROTOCOL, quote_request, QUOTE_REPLY)
        opening = w.LeaseOpen(quote=quote.envelope, lease_id="c" * 64, budget=WORD_PRICE * 10, mode="postpaid")
        envelope = base64.b64encode(
            seal(opening, stranger.market.key, domain=w.OPEN_DOMAIN, payload_type=w.OPEN_TYPE)
        ).decode()
        await _refused(
            ErrorCode.FORBIDDEN,
            request(stranger.host, peer, lease_module.LEASE_PROTOCOL, w.OpenRequest(envelope=envelope), GRANT_REPLY),
        )
        # A quote for something the provider does not offer.
        await _refused(
            ErrorCode.NOT_FOUND,
            request(
                consumer.host,
                peer,
                lease_module.LEASE_PROTOCOL,
                w.QuoteRequest(capability="model:nothing", expected_units=1, duration_s=1),
                QUOTE_REPLY,
            ),
        )


async def test_a_consumer_that_never_countersigns_is_paused_then_dropped() -> None:
    # Paused 1 s after the unsigned receipt and dropped 3 s after the consumer's last word: the same
    # 2 s between the two as FAST gives (2 s and 4 s), in which the paused call is refused.
    market = FAST.model_copy(update={"countersign_timeout_s": 1, "abandon_after_s": 3})
    async with market_nodes([{"offers": (WORD_OFFER,), "market": market}, {}]) as (nodes, _):
        provider, consumer = nodes
        view = await consumer.market.open_lease(_peer(provider), WORDS, budget=WORD_PRICE * 100, duration_s=60)

        async def refuse(message: w.ReceiptPush, remote: str) -> w.Countersigned:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "not signing")

        TOKENS.append(consumer.market.held[view.lease_id].token)
        consumer.market._countersign = refuse  # type: ignore[method-assign]
        await consumer.market.call(view.lease_id, {"prompt": "one two three four five six"})
        served = provider.market.served[view.lease_id]
        await wait_for(lambda: served.session.state == "lease_paused", 10)
        error = await _refused(ErrorCode.CONFLICT, consumer.market.call(view.lease_id, {"prompt": "more"}))
        assert "paused" in error.message
        await wait_for(lambda: served.ended_reason == "abandoned", 15)
        receipts = await provider.ledger.list_receipts(view.lease_id)
        assert receipts and not any(r.countersigned for r in receipts)
        # Nothing countersigned, nothing claimable: no settlement was queued for the provider.
        assert await provider.ledger.list_settlements() == []


async def test_an_over_metering_provider_gets_no_countersignature() -> None:
    async with market_nodes([{"offers": (WORD_OFFER,), "market": FAST}, {}]) as (nodes, _):
        provider, consumer = nodes
        view = await consumer.market.open_lease(_peer(provider), WORDS, budget=WORD_PRICE * 100, duration_s=60)
        await consumer.market.call(view.lease_id, {"prompt": "one two"})
        # The provider writes 40 units it never delivered, then asks for a countersignature.
        await provider.ledger.record_usage(view.lease_id, writer=_peer(provider), units=40, idempotency_key="padding")
        provider.market.served[view.lease_id].session.meter(40, provider.market.clock())
        assert not await provider.market._push_receipt(view.lease_id)
        consumer_receipts = await consumer.ledger.list_receipts(view.lease_id)
        assert all(r.units <= 2 for r in consumer_receipts)
        provider_receipts = await provider.ledger.list_receipts(view.lease_id)
        assert not any(r.countersigned and r.units > 2 for r in provider_receipts)


async def test_oversized_frames_and_slow_loris_cost_one_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_handler, "LEASE_READ_TIMEOUT_S", 1.0)
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}]) as (nodes, _):
        provider, consumer = nodes
        peer = ID.from_base58(_peer(provider))

        async def raw_exchange(protocol: Any, data: bytes) -> bytes:
            stream = await consumer.host.new_stream(peer, [protocol])
            await stream.write(data)
            with trio.fail_after(10):
                reply = b""
                while True:
                    try:
                        chunk = await stream.read(65536)
                    except Exception:  # noqa: BLE001 - the provider closed the stream
                        break
                    if not chunk:
                        break
                    reply += chunk
            return reply

        too_big = encode_uvarint(lease_module.MAX_LEASE_FRAME + 1)
        reply = await raw_exchange(lease_module.LEASE_PROTOCOL, too_big)
        assert b"E_INVALID_ARGUMENT" in reply
        reply = await raw_exchange(lease_module.INFER_PROTOCOL, encode_uvarint(lease_module.MAX_CALL_FRAME + 1))
        assert b"E_INVALID_ARGUMENT" in reply
        # Slow loris: a length prefix promising 100 bytes, then silence.
        with trio.fail_after(5):
            reply = await raw_exchange(lease_module.LEASE_PROTOCOL, encode_uvarint(100) + b"{")
        assert b"E_TIMEOUT" in reply
        reply = await raw_exchange(lease_module.LEASE_PROTOCOL, encode_uvarint(5) + b"hello")
        assert b"E_INVALID_ARGUMENT" in reply
        # The provider still serves a well-behaved consumer.
        view = await consumer.market.open_lease(_peer(provider), WORDS, budget=WORD_PRICE * 10, duration_s=60)
        assert (await consumer.market.call(view.lease_id, {"prompt": "still here"})).units == 2


async def test_a_receipt_pushed_twice_is_countersigned_once() -> None:
    """A provider that crashed after the consumer signed (before it stored the signature) asks again:
    it gets the same countersigned receipt back, and the consumer's ledger holds it once."""
    async with market_nodes([{"offers": (WORD_OFFER,), "market": FAST}, {}]) as (nodes, _):
        provider, consumer = nodes
        view = await consumer.market.open_lease(_peer(provider), WORDS, budget=WORD_PRICE * 100, duration_s=60)
        TOKENS.append(consumer.market.held[view.lease_id].token)
        await consumer.market.call(view.lease_id, {"prompt": "one two three"})
        receipt = await provider.ledger.issue_receipt(view.lease_id, provider.market.receipt_key)
        push = w.ReceiptPush(receipt=receipt)
        consumer_id = ID.from_base58(_peer(consumer))
        replies = [
            await request(provider.host, consumer_id, lease_module.LEASE_PROTOCOL, push, TypeAdapter(w.Countersigned))
            for _ in range(2)
        ]
        assert replies[0].receipt == replies[1].receipt and replies[0].receipt.consumer_sig
        stored = await consumer.ledger.list_receipts(view.lease_id)
        assert [r.receipt.body.seq for r in stored].count(receipt.body.seq) == 1


def test_no_reply_error_or_log_line_carried_a_secret() -> None:
    """Runs after the tests above: their replies, errors and logs hold no token, path or key."""
    assert SEEN and TOKENS, "the tests above recorded nothing"
    for token in TOKENS:
        assert not any(token in text for text in SEEN)
    for text in SEEN:
        assert "/tmp/" not in text and "clawnode-market-" not in text, text
        assert "token_urlsafe" not in text
        assert "BEGIN" not in text and "private" not in text.lower(), text
