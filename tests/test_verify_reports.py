"""Shared verification reports (issue 21): a node's signed report of its own failed check, fetched by
another node over /clawnode/verify-reports/1.0.0, lowers the provider's standing there but never
excludes it: only a node's own failed check does. Forged, relayed, stale or self-serving reports are
not taken, and a reporter counts once however often it reports."""

from __future__ import annotations

import time

import pytest
import trio
from libp2p.peer.id import ID

from dht.discovery import DiscoveryQuery
from protocols.lease.verifier import REPORTS_ANSWER, REPORTS_PROTOCOL, fetch_reports
from protocols.lease.verifying import Verifying
from protocols.machines.verify import REPORTED_FLOOR, standing, standing_with_reports
from runtime.errors import ClawnodeError, ErrorCode
from runtime.ledger.receipts import ReceiptKey
from runtime.verify.reports import MAX_AGE_S, ReportBook, SignedReport
from tests.support.market import WORD_OFFER, WORDS, market_nodes
from wire.framing import FrameReader, write_frame
from wire.peer_keys import ed25519_public_key, receipt_key
from wire.rpc import parse_reply
from wire.streams import open_stream

SHA = "ab" * 32


def test_reports_shift_standing_within_bounds_and_only_an_own_failure_excludes() -> None:
    assert standing_with_reports(0, 0, 0, 50, 0.0) == standing(0, 0)  # weight 0: ignored
    lowered = standing_with_reports(0, 0, 0, 1, 0.1)
    assert 0 < lowered < standing(0, 0)
    # Every reporter in the world says it failed, at the highest weight: still above 0.
    assert standing_with_reports(0, 0, 0, 10**6, 5.0) >= REPORTED_FLOOR > 0
    assert standing_with_reports(3, 0, 10, 0, 0.1) > standing(3, 0)
    assert standing_with_reports(5, 1, 100, 0, 0.9) == 0.0  # this node's own failed check decides


def _key(seed: int) -> ReceiptKey:
    from libp2p.crypto.ed25519 import create_new_key_pair

    return receipt_key(create_new_key_pair(bytes([seed]) * 32).private_key)


def test_a_report_is_taken_only_from_its_signer_fresh_about_a_third_party_and_once_per_reporter() -> None:
    alice, bob, carol = _key(1), _key(2), _key(3)
    provider = _key(4).peer_id
    theirs, mine = ReportBook(alice, ed25519_public_key), ReportBook(bob, ed25519_public_key)
    theirs.note(provider, "failed", "top", SHA)
    report = theirs.shared([provider], 10)[0]
    a = alice.peer_id
    assert not mine.take(report, carol.peer_id)  # relayed by another peer
    forged = SignedReport(body=report.body.model_copy(update={"outcome": "passed"}), sig=report.sig)
    assert not mine.take(forged, a)
    assert mine.take(report, a) and not mine.take(report, a)  # the same report twice counts once
    theirs.note(provider, "failed", "top", SHA, now=time.time() + 1)
    assert mine.take(theirs.shared([provider], 10)[0], a)  # a newer one replaces it
    assert mine.tally(provider).failed == 1
    old = ReportBook(alice, ed25519_public_key)
    old.note(_key(5).peer_id, "failed", "top", now=time.time() - MAX_AGE_S - 10)
    assert not mine.take(old.shared([], 10)[0], a)
    about_me = ReportBook(alice, ed25519_public_key)
    about_me.note(bob.peer_id, "failed", "top")
    assert not mine.take(about_me.shared([], 10)[0], a)  # nobody's report moves this node's view of itself


async def test_a_failed_report_the_arbiter_overruled_is_withdrawn_where_peers_took_it() -> None:
    # The consumer's check failed an honest call (a lying leased verifier): its signed failed report
    # spread; the arbiter's re-run finds the provider not at fault, and the peer that had taken the
    # failure takes the consumer's newer signed pass in its place.
    consumer, peer = _key(1), _key(2)
    provider = _key(4).peer_id
    verifying = Verifying(local_model=lambda sha256: None)
    verifying.share_reports(consumer, 0.1)
    await verifying._note(provider, "failed", "top", SHA)
    theirs = ReportBook(peer, ed25519_public_key)
    assert theirs.take(verifying.reports.shared([provider], 10)[0], consumer.peer_id)
    assert theirs.tally(provider).failed == 1
    await verifying.overruled(provider, "lease-1")
    withdrawn = verifying.reports.shared([provider], 10)[0]
    assert (withdrawn.body.outcome, withdrawn.body.reason) == ("passed", "overruled")
    assert theirs.take(withdrawn, consumer.peer_id)  # dated after the failure even within the same second
    assert (theirs.tally(provider).failed, theirs.tally(provider).passed) == (0, 1)
    assert not verifying.reports.withdraw(provider)  # nothing failed left to withdraw


async def test_a_peers_report_lowers_standing_but_never_excludes_while_an_own_failure_does() -> None:
    specs = [{}, {}, {"offers": (WORD_OFFER,)}]
    async with market_nodes(specs) as (nodes, _):
        reporter, receiver, provider = nodes
        provider_id, reporter_id = str(provider.host.get_id()), str(reporter.host.get_id())
        # The reporter's own check of the provider failed: it is out of the reporter's ranking.
        await reporter.market.verifying._note(provider_id, "failed", "top", SHA)
        query = DiscoveryQuery(capability=WORDS)
        with trio.fail_after(20):
            while provider_id not in {p.peer_id for p in await receiver.discover(query)}:
                await trio.sleep(0.2)
        assert provider_id not in [p.peer_id for p in reporter.router.rank(await reporter.discover(query))]

        # The receiver's first call to the provider asks its peers about it, in the background.
        before = receiver.market.verifying.standing(provider_id)
        lease = await receiver.market.open_lease(provider_id, WORDS, budget=10**9, duration_s=60)
        await receiver.market.call(lease.lease_id, {"prompt": "one two"})
        with trio.fail_after(10):
            while receiver.market.verifying.reports.tally(provider_id).failed < 1:
                await trio.sleep(0.05)
        after = receiver.market.verifying.standing(provider_id)
        assert 0 < after < before  # default verify.report_weight 0.1
        assert provider_id in [p.peer_id for p in receiver.router.rank(await receiver.discover(query))]
        assert receiver.verification_record(provider_id) is None  # no check of its own: no record shown
        # Asked again (by hand), the same report is not counted twice.
        assert await fetch_reports(receiver.host, receiver.market.verifying, reporter_id, [provider_id]) == 0
        assert receiver.market.verifying.standing(provider_id) == after

        # Garbage gets a clean error, never a crash or an internal error.
        for garbage in (b"[" * 5000, b'{"type":"reports_ask","providers":' + b'"x",' * 40 + b'"x"]}', b"\xff"):
            stream = await open_stream(receiver.host, ID.from_base58(reporter_id), [REPORTS_PROTOCOL])
            await write_frame(stream, garbage)
            frame = await FrameReader(stream, max_frame=1 << 16).read_frame(10)
            with pytest.raises(ClawnodeError) as refused:
                parse_reply(frame, REPORTS_ANSWER)
            assert refused.value.code == ErrorCode.INVALID_ARGUMENT
