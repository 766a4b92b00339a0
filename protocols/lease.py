"""``/clawnode/lease/1.0.0`` and ``/clawnode/infer/1.0.0``: the trio adapters of the lease market.

The rules live elsewhere: the lease lifecycle and metering rhythm in ``protocols.machines.lease``
(pure), money in the ledger and the escrow contract. This module only moves messages between
streams, those machines, the ledger and the chain.

Provider side (``LeaseDesk``): quote → verify the consumer's signed open, its wallet binding and
its escrow lock on chain (``check_lock``: the consumer's own wallet pays, enough, long enough, under
an escrow id derived from its peer id) → signed grant with a fresh access token (only its sha256 is
kept) → serve calls that carry the token, each holding a reservation of the budget while it runs
(the engine is told ``max_tokens``) and a durable pending row in the ledger, written before the
engine runs (the write-ahead meter: a disk that refuses it refuses the call, before any chunk), then
settled as its end frame leaves (a call cut before it, for the chunks written; a cancel frame stops
the engine and gets an end frame billing those; a settlement the disk refuses is retried until it
lands, and a restart settles what a crash left at 0 units) → push a
signed usage receipt every N units or T seconds and at the end → claim from escrow what the
consumer countersigned with a valid voucher. A receipt left unsigned, or answered without a valid
voucher, pauses service; a consumer silent too long loses the lease; an escrow seen disputed or
closed on chain ends it.

Consumer side (``LeaseHolder``): ask for a quote, check it is the provider's and addressed to us,
lock the budget under an escrow id derived from our peer id and a salt (``lease_id_for``), open
(with its wallet bound to its peer id), keep the token in memory only, count the units each call's
end frame reports when they are consistent with what arrived (``check_end_frame``), leave a call by
a cancel frame and reading on to its end frame (counting the chunks received when the provider does
not answer, with a small in-flight tolerance: ``receipt_tolerance``), and countersign a receipt only
for units counted (with an escrow voucher for that total). The provider's claims are booked as
spend when seen on chain; when a lease ends, the rest of the lock is refunded through the
settlement queue.

Every exchange is one stream with one request and one reply (``protocols.rpc``), so each side
dials the other when it has something to say: on the connection that already exists, which is
what keeps a node behind a NAT reachable by its provider.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import PrivateKey
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from pydantic import BaseModel, TypeAdapter, ValidationError

from dht.offers import Offer
from dht.records import bind_wallet, wallet_binding_holds
from protocols import lease_wire as w
from protocols.background import spawn_guarded
from protocols.machines.history import finished_to_evict
from protocols.machines.lease import (
    ASK_AGAIN,
    BUDGET_BUSY_MESSAGE,
    END_FROZEN,
    FINISHED_KEEP,
    FINISHED_KEEP_S,
    ISSUE_RECEIPT,
    LEASE_SALT_BYTES,
    USED_QUOTES_MAX,
    LeaseSession,
    LockFacts,
    aborted_call_units,
    check_countersignature,
    check_end_frame,
    check_lock,
    check_receipt_claim,
    chunk_tokens,
    escrow_frozen,
    lease_id_for,
    quotes_to_forget,
    receipt_tolerance,
)
from protocols.machines.lease import LeasePolicy as SessionPolicy
from protocols.rpc import error_reply, parse_reply, request, serve_requests
from protocols.settings import MarketSection
from protocols.signed import open_base64, seal, to_base64
from protocols.streams import open_stream
from protocols.wire import FrameReader, write_frame
from runtime.errors import ClawnodeError, ErrorCode, Reason
from runtime.ledger import EscrowRef, LeaseOpen, Ledger, SignedReceipt
from runtime.service import ServiceRegistry, Usage
from runtime.telemetry import LatencyHistogram

if TYPE_CHECKING:
    from runtime.escrow import EscrowClient

log = logging.getLogger(__name__)

LEASE_PROTOCOL = TProtocol("/clawnode/lease/1.0.0")
INFER_PROTOCOL = TProtocol("/clawnode/infer/1.0.0")
MAX_LEASE_FRAME = 64 * 1024
MAX_CALL_FRAME = 1 << 20
CALL_READ_TIMEOUT_S = 10.0
CALL_ACK_TIMEOUT_S = 5.0
LEASE_READ_TIMEOUT_S = 10.0
PUSH_TIMEOUT_S = 10.0
SWEEP_INTERVAL_S = 1.0
# A receipt may arrive a moment before the consumer has read the end frame of the call it covers.
RECEIPT_CATCH_UP_S = 2.0
# Chain time and our clock differ by a block or two; the lock must still outlive the lease.
DEADLINE_SLACK_S = 30
# How often a provider rereads the escrow behind each lease it serves calls on (a disputed one stops
# service), and behind an idle one; a consumer the escrow of a lease whose voucher it signed (the
# claim it sees is booked as spend). An embedded-chain read costs ~8 ms of the one chain thread.
ESCROW_CHECK_S = 2.0
ESCROW_IDLE_CHECK_S = 30.0
# A call the budget cannot cover while other calls hold reservations waits this long for them to be
# metered (a client's next call often arrives a moment before its previous one is counted).
RESERVE_WAIT_S = 2.0
# The end frame's write and the metering after it are shielded from cancellation this long at most.
END_WRITE_TIMEOUT_S = 3.0
# A consumer leaving a call asks the provider to stop and reads on to its end frame this long at most.
CANCEL_DRAIN_S = 1.0

_REQUESTS: TypeAdapter[Any] = TypeAdapter(w.LeaseRequest)
_QUOTE_REPLY = TypeAdapter(w.QuoteReply)
_GRANT_REPLY = TypeAdapter(w.GrantReply)
_ACK = TypeAdapter(w.Ack)
_COUNTERSIGNED = TypeAdapter(w.Countersigned)
_CALL_FRAMES: TypeAdapter[Any] = TypeAdapter(w.Chunk | w.CallEnd)

EscrowSource = Callable[[], "EscrowClient | None"]


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class _Ticket:
    """One call's hold on its lease's budget, from authorisation until it is metered or released."""

    served: ServedLease | None = None
    reserved: int = 0
    streamed: int = 0  # tokens of the chunks written (``chunk_tokens``): what a cut call is billed
    call_id: str | None = None  # its pending row in the ledger (the write-ahead meter), once written


@dataclass
class ServedLease:
    """A lease this node provides: the grant, the token's hash and the metering session."""

    grant: w.LeaseGrant
    session: LeaseSession
    escrow: EscrowRef | None
    push_lock: trio.Lock = field(default_factory=trio.Lock)
    ended_reason: str | None = None
    claimed_seq: int = 0
    last_claim_at: float = 0.0
    in_flight: int = 0  # calls being served or metered; the lease ends after they are counted
    escrow_checked_at: float = 0.0
    escrow_checked_requests: int = 0  # requests served when the escrow was last read
    escrow_checking: bool = False
    released: trio.Event = field(default_factory=trio.Event)  # set whenever a reservation is given back

    def reservation_returned(self) -> None:
        self.released.set()
        self.released = trio.Event()


@dataclass
class HeldLease:
    """A lease this node consumes. The token lives here, in memory, and nowhere else."""

    grant: w.LeaseGrant
    token: str
    escrow_id: bytes | None
    seen_units: int = 0
    aborted_calls: int = 0  # calls left without the provider's end or error frame (in-flight tolerance)
    ended_reason: str | None = None
    last_countersigned_seq: int = 0
    committed: int = 0  # wei: the newest voucher we signed
    booked: int = 0  # wei: what the escrow showed released to the provider, booked as spend
    observed_at: float = 0.0
    observing: bool = False


class LeaseMarket:
    """Both sides of the lease market for one node; mount with ``start`` in the node's nursery."""

    def __init__(
        self,
        host: IHost,
        key: PrivateKey,
        ledger: Ledger,
        settings: MarketSection,
        *,
        offers: Callable[[], list[Offer]],
        services: ServiceRegistry,
        escrow: EscrowSource,
        escrow_terms: Callable[[], w.EscrowTerms | None],
        wake_settlement: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.key = key
        self.peer_id = str(host.get_id())
        self.ledger = ledger
        self.settings = settings
        self.offers = offers
        self.services = services
        self.escrow = escrow
        self.escrow_terms = escrow_terms
        self.wake_settlement = wake_settlement
        self.clock = clock
        self.served: dict[str, ServedLease] = {}
        self.held: dict[str, HeldLease] = {}
        self._used_quotes: dict[str, int] = {}  # quote id -> valid_until, until it has passed
        # Finished leases, oldest first: (side, lease id) -> when they finished. Kept for the API and
        # late messages for a while (``finished_to_evict``), then forgotten; the ledger keeps them.
        self._finished: dict[tuple[str, str], float] = {}
        self.finished_keep = FINISHED_KEEP
        self.finished_keep_s = FINISHED_KEEP_S
        self.used_quotes_max = USED_QUOTES_MAX
        # Calls served whose settlement the disk refused: (lease id, call id) -> units, retried by the sweep
        # until the ledger takes them. At most the calls in flight when the disk filled: a call whose
        # pending row cannot be written is refused, so nothing new joins while the disk is full.
        self._unsettled: dict[tuple[str, str], int] = {}
        self._settling = False
        self._nursery: trio.Nursery | None = None
        self.call_read_timeout_s = CALL_READ_TIMEOUT_S
        # For /metrics: refusals and failures by (operation, error code); durations of calls served.
        self.failures: Counter[tuple[str, str]] = Counter()
        self.serve_first_chunk_s = LatencyHistogram()
        self.serve_duration_s = LatencyHistogram()

    # -- mounting --

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._recover()
            handler = serve_requests(self._handle_lease, max_frame=MAX_LEASE_FRAME, read_timeout_s=LEASE_READ_TIMEOUT_S)
            self.host.set_stream_handler(LEASE_PROTOCOL, handler)
            self.host.set_stream_handler(INFER_PROTOCOL, self._handle_call)
            nursery.start_soon(self._sweep)
            task_status.started(self)

    async def _recover(self) -> None:
        """After a restart: keep serving the leases whose grant was stored; wind down the rest.

        A consumer's access tokens lived in memory only, so the leases it held cannot be used
        again: they end, and the rest of their locks goes back through the settlement queue.
        """
        await self._settle_left_pending()
        now = int(self.clock())
        for lease, grant_json in await self.ledger.open_leases():
            if lease.role == "provider" and grant_json is not None:
                grant = w.LeaseGrant.model_validate_json(grant_json)
                session = self._new_session(grant, min(now, grant.expires_at - 1))
                last_seq, receipted, signed_seq, signed = await self.ledger.receipt_progress(lease.lease_id)
                session.restore(
                    units_metered=lease.metered_units,
                    last_seq=last_seq,
                    units_receipted=receipted,
                    countersigned_seq=signed_seq,
                    units_countersigned=signed,
                    now=now,
                )
                self.served[lease.lease_id] = ServedLease(grant, session, lease.escrow, last_claim_at=self.clock())
                log.info("lease %s restored", lease.lease_id[:12])
                continue
            await self.ledger.end_lease(lease.lease_id, idempotency_key=f"end/{lease.lease_id}")
            if lease.escrow is None:
                continue
            try:
                if lease.role == "provider":
                    await self.ledger.enqueue_claim(lease.lease_id)
                else:
                    await self.ledger.enqueue_refund(lease.lease_id)
            except ClawnodeError as error:
                log.info("lease %s ended at restart with nothing to settle (%s)", lease.lease_id[:12], error.code)
        self.wake_settlement()

    async def _settle_left_pending(self) -> None:
        """Calls a crash left pending are settled before any call is served, at 0 units
        (``LedgerStore.settle_pending_calls`` says why); on a full disk, as soon as it takes them."""
        try:
            left = await self.ledger.settle_pending_calls()
        except ClawnodeError as error:
            if error.code != ErrorCode.UNAVAILABLE:
                raise
            left = await self.ledger.pending_calls()
            self._unsettled.update(((lease_id, call_id), 0) for lease_id, call_id, _ in left)
        if left:
            log.info("%d call(s) cut by a restart settled at 0 units", len(left))

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        spawn_guarded(self._nursery, log, fn, *args)

    def _failed(self, op: str, error: BaseException) -> None:
        if isinstance(error, ClawnodeError):
            code = error.code
        else:
            code = ErrorCode.INVALID_ARGUMENT if isinstance(error, ValidationError) else ErrorCode.INTERNAL
        self.failures[(op, code.value)] += 1

    async def _handle_lease(self, frame: bytes, remote: ID) -> BaseModel:
        try:
            return await self._handle_lease_message(frame, remote)
        except (ClawnodeError, ValidationError) as error:
            self._failed("serve_lease", error)
            raise

    async def _handle_lease_message(self, frame: bytes, remote: ID) -> BaseModel:
        message = _REQUESTS.validate_json(frame)
        if isinstance(message, w.QuoteRequest):
            return await self._quote(message, str(remote))
        if isinstance(message, w.OpenRequest):
            return await self._grant(message, str(remote))
        if isinstance(message, w.RevokeRequest):
            return await self._revoked_by_peer(message, str(remote))
        if isinstance(message, w.RenewRequest):
            return await self._renew(message, str(remote))
        return await self._countersign(message, str(remote))

    # ================= provider =================

    def _offer(self, capability: str) -> Offer:
        for offer in self.offers():
            if offer.name == capability:
                return offer
        raise ClawnodeError(ErrorCode.NOT_FOUND, f"this node does not offer {capability}")

    async def _quote(self, message: w.QuoteRequest, remote: str) -> w.QuoteReply:
        offer = self._offer(message.capability)
        if self.services.get(message.capability) is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, f"{message.capability} is offered but not being served")
        if message.duration_s > self.settings.max_lease_s:
            raise ClawnodeError(
                ErrorCode.INVALID_ARGUMENT, f"leases last at most {self.settings.max_lease_s} s on this node"
            )
        terms = self.escrow_terms()
        trusted = remote in self.settings.trusted_peers
        if terms is None and not trusted:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "this node's escrow chain is not connected; try again later")
        quote = w.Quote(
            quote_id=secrets.token_hex(16),
            provider=self.peer_id,
            consumer=remote,
            capability=offer.name,
            price_per_unit=offer.price_per_unit,
            expected_units=message.expected_units,
            duration_s=message.duration_s,
            valid_until=int(self.clock()) + self.settings.quote_valid_s,
            escrow=None if trusted else terms,
            postpaid_cap=self.settings.postpaid_cap if trusted else 0,
        )
        envelope = seal(quote, self.key, domain=w.QUOTE_DOMAIN, payload_type=w.QUOTE_TYPE)
        return w.QuoteReply(envelope=to_base64(envelope))

    async def _grant(self, message: w.OpenRequest, remote: str) -> w.GrantReply:
        signer, payload = open_base64(message.envelope, domain=w.OPEN_DOMAIN, payload_type=w.OPEN_TYPE)
        if str(signer) != remote:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the lease open is signed by another peer than the sender")
        opening = w.LeaseOpen.model_validate_json(payload)
        quote_signer, quote_payload = open_base64(opening.quote, domain=w.QUOTE_DOMAIN, payload_type=w.QUOTE_TYPE)
        if str(quote_signer) != self.peer_id:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the quote was not signed by this node")
        quote = w.Quote.model_validate_json(quote_payload)
        now = int(self.clock())
        if quote.consumer != remote:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the quote was made out to another peer")
        if quote.valid_until < now:
            raise ClawnodeError(ErrorCode.EXPIRED, "the quote has expired; ask for a new one")
        if quote.quote_id in self._used_quotes:
            raise ClawnodeError(ErrorCode.CONFLICT, "this quote was already used to open a lease")
        # Oldest first: what expired at the front goes at once (cheap); all of them when the set is full.
        while self._used_quotes and next(iter(self._used_quotes.values())) < now:
            del self._used_quotes[next(iter(self._used_quotes))]
        if len(self._used_quotes) >= self.used_quotes_max:
            self._forget_used_quotes(now)
            if len(self._used_quotes) >= self.used_quotes_max:
                raise ClawnodeError(ErrorCode.UNAVAILABLE, "too many leases opened lately; try again later")
        if opening.budget < quote.price_per_unit:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the budget does not cover a single unit")
        escrow_ref = await self._check_payment(quote, opening, remote, now)
        # Claimed before the first await that could interleave a second open of the same quote.
        self._used_quotes[quote.quote_id] = quote.valid_until
        token = secrets.token_urlsafe(32)
        grant = w.LeaseGrant(
            lease_id=opening.lease_id,
            quote_id=quote.quote_id,
            provider=self.peer_id,
            consumer=remote,
            capability=quote.capability,
            price_per_unit=quote.price_per_unit,
            budget=opening.budget,
            expires_at=now + quote.duration_s,
            token_sha256=token_digest(token),
            policy=w.LeasePolicy(
                max_requests=self.settings.max_requests,
                budget_cap=opening.budget,
                rate_per_minute=self.settings.rate_per_minute,
            ),
            mode=opening.mode,
        )
        try:
            await self.ledger.open_lease(
                LeaseOpen(
                    lease_id=grant.lease_id,
                    role="provider",
                    provider=self.peer_id,
                    consumer=remote,
                    price_per_unit=grant.price_per_unit,
                    budget=grant.budget,
                    escrow=escrow_ref,
                    grant=grant.model_dump_json(),
                ),
                idempotency_key=f"grant/{grant.lease_id}",
            )
        except ClawnodeError:
            del self._used_quotes[quote.quote_id]
            raise
        self.served[grant.lease_id] = ServedLease(
            grant, self._new_session(grant, now), escrow_ref, last_claim_at=self.clock(), escrow_checked_at=self.clock()
        )
        log.info("lease %s granted to %s for %s", grant.lease_id[:12], remote[:16], grant.capability)
        envelope = seal(grant, self.key, domain=w.GRANT_DOMAIN, payload_type=w.GRANT_TYPE)
        return w.GrantReply(envelope=to_base64(envelope), token=token)

    def _forget_used_quotes(self, now: float) -> None:
        for quote_id in quotes_to_forget(self._used_quotes, now):
            del self._used_quotes[quote_id]

    def _finished_now(self, side: str, lease_id: str) -> None:
        """A lease's end work is done (final receipt, claim or refund queued): start its retention."""
        self._finished[(side, lease_id)] = self.clock()
        self._forget_finished()

    def _forget_finished(self) -> None:
        """Drop finished leases past their retention (``finished_to_evict``); a message about one later
        gets ``E_NOT_FOUND``, like any lease this node does not know."""
        entries = [(key, at, self._settled(*key)) for key, at in self._finished.items()]
        for side, lease_id in finished_to_evict(
            entries, self.clock(), keep=self.finished_keep, keep_s=self.finished_keep_s
        ):
            del self._finished[(side, lease_id)]
            (self.served if side == "served" else self.held).pop(lease_id, None)

    def _settled(self, side: str, lease_id: str) -> bool:
        """Whether nothing more waits on a finished lease's entry: a consumer books the provider's claims
        as it sees them on chain; a provider's claim is in the ledger's settlement queue."""
        if side == "served":
            return True
        held = self.held.get(lease_id)
        return held is None or held.escrow_id is None or held.booked >= held.committed

    def _new_session(self, grant: w.LeaseGrant, now: int) -> LeaseSession:
        s = self.settings
        session = LeaseSession(
            SessionPolicy(
                max_requests=grant.policy.max_requests,
                budget_cap=grant.policy.budget_cap,
                rate_per_minute=grant.policy.rate_per_minute,
                expires_at=grant.expires_at,
            ),
            grant.price_per_unit,
            receipt_every_units=s.receipt_every_units,
            receipt_every_s=s.receipt_every_s,
            countersign_timeout_s=s.countersign_timeout_s,
            abandon_after_s=s.abandon_after_s,
        )
        session.grant(now)
        return session

    async def _check_payment(self, quote: w.Quote, opening: w.LeaseOpen, remote: str, now: int) -> EscrowRef | None:
        if opening.mode == "postpaid":
            if quote.escrow is not None or remote not in self.settings.trusted_peers:
                raise ClawnodeError(ErrorCode.FORBIDDEN, "post-paid leases are for trusted peers only")
            if opening.budget > quote.postpaid_cap:
                raise ClawnodeError(ErrorCode.INSUFFICIENT_FUNDS, "the budget exceeds the post-paid cap")
            return None
        terms, lock = quote.escrow, opening.lock
        if terms is None or lock is None:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "an escrowed lease needs the quote's terms and a lock")
        client = self.escrow()
        if client is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "this node's escrow chain is not connected")
        if lock.escrow_id[2:] != opening.lease_id:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the lease id must be the escrow id")
        state = await client.chain.run(client.get, lock.payer, bytes.fromhex(lock.escrow_id[2:]))
        chain_now = await client.chain.run(client.chain.now)
        wallet = opening.wallet
        check_lock(
            LockFacts(
                lease_id=opening.lease_id,
                escrow_id=lock.escrow_id,
                consumer=ID.from_base58(remote).to_bytes(),
                salt=None if opening.salt is None else bytes.fromhex(opening.salt),
                lock_payer=lock.payer,
                wallet=None if wallet is None else wallet.address,
                wallet_bound=wallet is not None and wallet_binding_holds(wallet, remote),
                phase=state.phase,
                payee=state.payee,
                arbiter=state.arbiter,
                amount=state.amount,
                released=state.released,
                deadline=state.deadline,
                window=state.window,
                chain_now=chain_now,
                quote_payee=terms.payee,
                quote_arbiter=terms.arbiter,
                quote_window=terms.dispute_window_s,
                budget=opening.budget,
                duration_s=quote.duration_s,
            )
        )
        return EscrowRef(contract=client.address, payer=lock.payer, escrow_id=lock.escrow_id)

    def _served(self, lease_id: str, remote: str) -> ServedLease:
        served = self.served.get(lease_id)
        if served is None or served.grant.consumer != remote:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "no such lease with this peer")
        return served

    async def _renew(self, message: w.RenewRequest, remote: str) -> w.Ack:
        served = self._served(message.lease_id, remote)
        limit = int(self.clock()) + self.settings.max_lease_s
        if message.expires_at > limit:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"leases last at most {self.settings.max_lease_s} s")
        if served.escrow is not None:
            client = self.escrow()
            if client is None:
                raise ClawnodeError(ErrorCode.UNAVAILABLE, "this node's escrow chain is not connected")
            state = await client.chain.run(client.get, served.escrow.payer, bytes.fromhex(served.escrow.escrow_id[2:]))
            if state.deadline < message.expires_at:
                raise ClawnodeError(ErrorCode.INSUFFICIENT_FUNDS, "the escrow lock ends before the renewed lease")
        served.session.renew(message.expires_at, "consumer")
        served.grant = served.grant.model_copy(update={"expires_at": message.expires_at})
        await self.ledger.update_grant(message.lease_id, served.grant.model_dump_json())
        return w.Ack(expires_at=message.expires_at)

    async def _handle_call(self, stream: INetStream) -> None:
        remote = str(stream.muxed_conn.peer_id)
        reader = FrameReader(stream, max_frame=MAX_CALL_FRAME)
        end: w.CallEnd | None = None
        counted: ServedLease | None = None
        ticket = _Ticket()
        try:
            try:
                call = w.CallRequest.model_validate_json(await reader.read_frame(self.call_read_timeout_s))
                counted = self.served.get(call.lease_id)
                if counted is not None:
                    counted.in_flight += 1
                end = await self._serve_call(call, remote, stream, ticket, reader)
                reply: BaseModel = end
            except Exception as error:  # noqa: BLE001 - every failure becomes an error frame
                if not isinstance(error, ClawnodeError | ValidationError):
                    log.warning("call failed: %s", type(error).__name__)
                self._failed("serve_call", error)
                reply = error_reply(error)
            written = False
            with trio.move_on_after(CALL_READ_TIMEOUT_S if end is None else END_WRITE_TIMEOUT_S) as writing:
                # An end frame that may have left is metered even if the node is shutting down meanwhile.
                writing.shield = end is not None
                try:
                    await write_frame(stream, reply.model_dump_json().encode(), max_frame=MAX_CALL_FRAME)
                    written = True
                except Exception:  # noqa: BLE001 - the consumer went away before the end frame
                    written = False
                if end is not None and written:
                    # Metered as the end frame leaves, not when (or whether) the consumer acknowledges
                    # it: the consumer counts the same units from that frame, so receipts stay honest.
                    await self._meter(call.lease_id, ticket, end.units)
            if ticket.served is not None and ticket.streamed > 0:
                # Cut before its end frame (the consumer reset or hung up, the engine failed after
                # streaming): billed the chunks written, no prompt; the consumer counts what arrived.
                with trio.move_on_after(END_WRITE_TIMEOUT_S) as metering:
                    metering.shield = True
                    await self._meter(call.lease_id, ticket, aborted_call_units(ticket.reserved, ticket.streamed))
            if counted is not None:  # counted: the lease may end now, whatever the ack does
                counted.in_flight -= 1
                counted = None
            if end is not None and written:
                with trio.move_on_after(CALL_ACK_TIMEOUT_S), contextlib.suppress(Exception):
                    w.CallAck.model_validate_json(await reader.read_frame(CALL_ACK_TIMEOUT_S))
        finally:
            if ticket.served is not None:  # a failed or cut call: its reservation goes back, unmetered
                with trio.move_on_after(END_WRITE_TIMEOUT_S) as releasing:
                    releasing.shield = True
                    await self._meter(ticket.served.grant.lease_id, ticket, 0)
            if counted is not None:
                counted.in_flight -= 1
            with trio.move_on_after(1):
                await stream.close()

    async def _serve_call(
        self, call: w.CallRequest, remote: str, stream: INetStream, ticket: _Ticket, reader: FrameReader
    ) -> w.CallEnd:
        served = self.served.get(call.lease_id)
        if (
            served is None
            or served.grant.consumer != remote
            or not hmac.compare_digest(token_digest(call.token), served.grant.token_sha256)
        ):
            raise ClawnodeError(ErrorCode.FORBIDDEN, "unknown lease or wrong access token", Reason.UNKNOWN_LEASE)
        if served.ended_reason is not None:
            raise _ended(served.ended_reason)
        served.session.consumer_seen(self.clock())
        service = self.services.get(served.grant.capability)
        if service is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, f"{served.grant.capability} is not being served right now")
        # Units held for this call until it is metered, so calls in flight never overshoot the budget.
        give_up_at = trio.current_time() + RESERVE_WAIT_S
        while True:
            try:
                plan = served.session.reserve(self.clock(), call.body)
                break
            except ClawnodeError as error:
                if error.code == ErrorCode.EXPIRED:
                    self._spawn(self._end_served, call.lease_id, "expired")
                if error.code != ErrorCode.RATE_LIMITED or error.message != BUDGET_BUSY_MESSAGE:
                    raise
                released = served.released
                with trio.move_on_at(give_up_at) as waited:
                    await released.wait()
                if waited.cancelled_caught:
                    raise
        ticket.served, ticket.reserved = served, plan.reserve
        # The write-ahead meter: the call is served only once the ledger holds a durable row for it (a
        # disk that refuses it refuses the call, E_UNAVAILABLE disk_full, before any chunk); every way
        # out of the call settles that row (``_meter``).
        call_id = secrets.token_hex(12)
        await self.ledger.reserve_call(call.lease_id, call_id, reserved_units=plan.reserve)
        ticket.call_id = call_id
        # The engine is told to stop where the reservation ends.
        body = {**call.body, "max_tokens": plan.max_tokens}

        started = time.monotonic()
        first_chunk = True

        async def emit(data: dict[str, Any]) -> None:
            nonlocal first_chunk
            if first_chunk:
                first_chunk = False
                self.serve_first_chunk_s.observe(time.monotonic() - started)
            chunk = w.Chunk(data=data).model_dump_json().encode()
            # A chunk is written whole or not at all (a cancel never cuts a frame), then counted.
            with trio.CancelScope(shield=True), trio.fail_after(CALL_READ_TIMEOUT_S):
                await write_frame(stream, chunk, max_frame=MAX_CALL_FRAME)
            ticket.streamed += chunk_tokens(data)

        outcome: Usage | Exception | None = None
        async with trio.open_nursery() as nursery:
            # The consumer's cancel frame, or its hanging up, stops the engine.
            nursery.start_soon(_stop_on_cancel, reader, nursery.cancel_scope)
            try:
                outcome = await service.run(body, emit)
            except Exception as error:  # noqa: BLE001 - re-raised below, outside the nursery
                outcome = error
            nursery.cancel_scope.cancel()
        if isinstance(outcome, Exception):
            raise outcome
        self.serve_duration_s.observe(time.monotonic() - started)
        if outcome is None:
            # Cancelled by the consumer: the end frame bills the chunks written, no prompt.
            units = aborted_call_units(plan.reserve, ticket.streamed)
            return w.CallEnd(units=units, usage={"completion_tokens": units}, served_by=self.peer_id)
        # An engine that counts more than the call reserved costs the provider, never the consumer.
        units = served.session.billable(plan.reserve, max(0, outcome.units))
        return w.CallEnd(units=units, usage=outcome.detail, served_by=self.peer_id)

    async def _meter(self, lease_id: str, ticket: _Ticket, units: int) -> None:
        """A call ended (``units``: its end frame's, the chunks a cut call wrote, 0 for a failed one): its
        reservation becomes metered units and its pending row in the ledger is settled with them."""
        served = ticket.served
        if served is None:
            return
        # Counted at once (no await before): the reservation turns into metered units in one step.
        ticket.served = None
        billed = served.session.billable(ticket.reserved, units)
        due = served.session.finish_call(ticket.reserved, billed, self.clock())
        served.reservation_returned()
        if ticket.call_id is not None:
            await self._settle(lease_id, ticket.call_id, billed)
        if due:
            self._spawn(self._push_receipt, lease_id)

    async def _settle(self, lease_id: str, call_id: str, units: int) -> None:
        """Settle a call's pending row; one the disk refuses is kept and retried (``_settle_unsettled``)."""
        try:
            await self.ledger.settle_call(lease_id, call_id, units=units)
        except ClawnodeError as error:
            if error.code == ErrorCode.UNAVAILABLE:
                self._unsettled[(lease_id, call_id)] = units
            else:
                log.warning("the call on lease %s could not be settled: %s", lease_id[:12], error.code)

    async def _settle_unsettled(self, lease_id: str | None = None) -> None:
        """Retry the settlements the disk refused (of one lease, or all), oldest first, until one fails."""
        for key, units in list(self._unsettled.items()):
            if lease_id is not None and key[0] != lease_id:
                continue
            try:
                await self.ledger.settle_call(*key, units=units)
            except ClawnodeError as error:
                if error.code == ErrorCode.UNAVAILABLE:
                    return
                if error.code != ErrorCode.NOT_FOUND:  # not found: settled meanwhile by another retry
                    log.warning("the call on lease %s could not be settled: %s", key[0][:12], error.code)
            else:
                log.info("a call on lease %s is settled now that the disk takes writes again", key[0][:12])
            self._unsettled.pop(key, None)

    async def _retry_settlements(self) -> None:
        if self._settling:
            return
        self._settling = True
        try:
            await self._settle_unsettled()
        finally:
            self._settling = False

    async def _push_receipt(self, lease_id: str) -> bool:
        """Sign a receipt for everything metered and get it countersigned; False if the consumer did not."""
        served = self.served.get(lease_id)
        if served is None:
            return False
        async with served.push_lock:
            receipt = await self.ledger.issue_receipt(lease_id, self.key)
            if receipt.countersigned:
                return True
            if receipt.body.seq > served.session.last_seq:
                served.session.receipt_issued(receipt.body.seq, receipt.body.units, self.clock())
            try:
                reply = await request(
                    self.host,
                    ID.from_base58(served.grant.consumer),
                    LEASE_PROTOCOL,
                    w.ReceiptPush(receipt=receipt),
                    _COUNTERSIGNED,
                    timeout_s=PUSH_TIMEOUT_S,
                    max_frame=MAX_LEASE_FRAME,
                )
                signed = reply.receipt
                if signed.body != receipt.body or signed.provider_sig != receipt.provider_sig:
                    raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the consumer countersigned another receipt")
            except ClawnodeError as error:
                log.info("receipt %d of lease %s not countersigned: %s", receipt.body.seq, lease_id[:12], error.code)
                return False
            try:
                self._check_voucher(served, signed)
                await self.ledger.record_countersigned(signed)
            except ClawnodeError as error:
                # A countersignature that would not pay (no voucher, a forged one, a bad signature):
                # the lease serves nothing more until a valid one arrives.
                log.info("receipt %d of lease %s refused: %s", receipt.body.seq, lease_id[:12], error.code)
                if error.code in (ErrorCode.FORBIDDEN, ErrorCode.UNAUTHENTICATED):
                    served.session.countersignature_refused(self.clock())
                return False
            served.session.countersigned(receipt.body.seq, self.clock())
            return True

    def _check_voucher(self, served: ServedLease, signed: SignedReceipt) -> None:
        """The voucher in a countersignature must be the escrow payer's, for exactly the receipt's amount."""
        signer: str | None = None
        escrow = served.escrow
        client = self.escrow()
        if escrow is not None and signed.voucher is not None:
            if client is None:
                raise ClawnodeError(ErrorCode.UNAVAILABLE, "this node's escrow chain is not connected")
            from runtime.escrow import voucher_signer

            signer = voucher_signer(
                client.chain.chain_id,
                escrow.contract,
                escrow.payer,
                bytes.fromhex(escrow.escrow_id[2:]),
                signed.body.amount,
                signed.voucher,
            )
        check_countersignature(
            escrowed=escrow is not None,
            amount=signed.body.amount,
            voucher=signed.voucher,
            voucher_signer=signer,
            payer=None if escrow is None else escrow.payer,
        )

    async def _check_escrow(self, lease_id: str) -> None:
        """Reread a served lease's escrow: one disputed (frozen) or closed under us ends the lease."""
        served = self.served.get(lease_id)
        client = self.escrow()
        if served is None or served.escrow is None or client is None or served.escrow_checking:
            return
        served.escrow_checking = True
        served.escrow_checked_requests = served.session.requests_served
        try:
            state = await client.chain.run(client.get, served.escrow.payer, bytes.fromhex(served.escrow.escrow_id[2:]))
        except ClawnodeError as error:
            log.info("escrow of lease %s unreadable: %s", lease_id[:12], error.code)
            return
        finally:
            served.escrow_checking = False
            served.escrow_checked_at = self.clock()
        if served.ended_reason is None and END_FROZEN in served.session.escrow_observed(state.phase):
            log.info("lease %s ends: its escrow is %s", lease_id[:12], state.phase)
            await self._end_served(lease_id, f"escrow {state.phase}")

    async def _observe_spend(self, lease_id: str) -> None:
        """As the consumer: book as spend what the escrow shows released to the provider (its claims)."""
        held = self.held.get(lease_id)
        client = self.escrow()
        if held is None or held.escrow_id is None or client is None or held.observing:
            return
        held.observing = True
        try:
            state = await client.chain.run(client.get, client.account.address, held.escrow_id)
            if state.released > held.booked:
                await self.ledger.book_released(lease_id, state.released)
                held.booked = state.released
            if escrow_frozen(state.phase):
                held.committed = held.booked  # refunded or resolved: nothing more will move
        except ClawnodeError as error:
            log.info("escrow of lease %s not observed: %s", lease_id[:12], error.code)
        finally:
            held.observing = False
            held.observed_at = self.clock()

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL_S)
            now = self.clock()
            self._forget_used_quotes(now)
            self._forget_finished()
            if self._unsettled and not self._settling:
                self._spawn(self._retry_settlements)
            for lease_id, held in list(self.held.items()):
                if held.escrow_id is not None and held.booked < held.committed and not held.observing:
                    if now - held.observed_at >= ESCROW_CHECK_S:
                        self._spawn(self._observe_spend, lease_id)
            for lease_id, served in list(self.served.items()):
                if served.ended_reason is not None:
                    continue
                if served.session.state == "lease_ended":  # expired while authorizing a call
                    self._spawn(self._end_served, lease_id, "expired")
                    continue
                if served.escrow is not None and not served.escrow_checking:
                    busy = served.session.requests_served != served.escrow_checked_requests
                    if now - served.escrow_checked_at >= (ESCROW_CHECK_S if busy else ESCROW_IDLE_CHECK_S):
                        self._spawn(self._check_escrow, lease_id)
                self._claim_if_due(lease_id, served)
                for action in served.session.tick(self.clock()):
                    if action in (ISSUE_RECEIPT, ASK_AGAIN):
                        self._spawn(self._push_receipt, lease_id)
                    elif action == "pause":
                        log.info("lease %s paused: a receipt waits for its countersignature", lease_id[:12])
                    elif action in ("end_abandoned", "expire"):
                        self._spawn(self._end_served, lease_id, "abandoned" if action == "end_abandoned" else "expired")

    def _claim_if_due(self, lease_id: str, served: ServedLease) -> None:
        """Claim what was countersigned so far, every ``claim_every_s``: a long lease is paid as it goes."""
        now = self.clock()
        signed_seq = served.session.countersigned_seq
        if served.escrow is None or signed_seq <= served.claimed_seq:
            return
        if now - served.last_claim_at < self.settings.claim_every_s:
            return
        served.claimed_seq, served.last_claim_at = signed_seq, now

        async def claim() -> None:
            await self.ledger.enqueue_claim(lease_id)
            self.wake_settlement()

        self._spawn(claim)

    async def _end_served(self, lease_id: str, reason: str, *, notify: bool = True) -> None:
        served = self.served.get(lease_id)
        if served is None or served.ended_reason is not None:
            return
        served.ended_reason = reason
        try:
            await self._wind_down_served(lease_id, served, reason, notify=notify)
        finally:
            self._finished_now("served", lease_id)

    async def _wind_down_served(self, lease_id: str, served: ServedLease, reason: str, *, notify: bool) -> None:
        # New calls are refused from here; those under way are metered before the final receipt.
        with trio.move_on_after(CALL_READ_TIMEOUT_S):
            while served.in_flight:
                await trio.sleep(0.01)
        await self._settle_unsettled(lease_id)  # in the final receipt if the disk takes them now
        # The final receipt, while the consumer may still be there to countersign it.
        with trio.move_on_after(PUSH_TIMEOUT_S):
            await self._push_receipt(lease_id)
        await self.ledger.end_lease(lease_id, idempotency_key=f"end/{lease_id}")
        if served.escrow is not None:
            try:
                await self.ledger.enqueue_claim(lease_id)
                self.wake_settlement()
            except ClawnodeError as error:
                log.info("lease %s ended with nothing to claim (%s)", lease_id[:12], error.code)
        log.info("lease %s ended: %s", lease_id[:12], reason)
        if notify:
            with trio.move_on_after(PUSH_TIMEOUT_S):
                try:
                    await request(
                        self.host,
                        ID.from_base58(served.grant.consumer),
                        LEASE_PROTOCOL,
                        w.RevokeRequest(lease_id=lease_id, reason=reason),
                        _ACK,
                        timeout_s=PUSH_TIMEOUT_S,
                    )
                except ClawnodeError:
                    pass

    async def _revoked_by_peer(self, message: w.RevokeRequest, remote: str) -> w.Ack:
        if message.lease_id in self.served:
            served = self._served(message.lease_id, remote)
            if served.ended_reason is not None:
                return w.Ack()
            served.session.revoke("consumer")
            await self._end_served(message.lease_id, "revoked by the consumer", notify=False)
            return w.Ack()
        held = self.held.get(message.lease_id)
        if held is None or held.grant.provider != remote:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "no such lease with this peer")
        await self._end_held(message.lease_id, message.reason)
        return w.Ack()

    # ================= consumer =================

    async def open_lease(
        self,
        provider: str,
        capability: str,
        *,
        budget: int | None = None,
        duration_s: int = 3600,
        expected_units: int = 1000,
    ) -> w.LeaseView:
        try:
            return await self._open_lease(
                provider, capability, budget=budget, duration_s=duration_s, expected_units=expected_units
            )
        except ClawnodeError as error:
            self._failed("open", error)
            raise

    async def _open_lease(
        self, provider: str, capability: str, *, budget: int | None, duration_s: int, expected_units: int
    ) -> w.LeaseView:
        try:
            peer = ID.from_base58(provider)
        except Exception:  # noqa: BLE001 - base58 and multihash errors alike
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "not a peer id") from None
        if provider == self.peer_id:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "a node cannot lease from itself")
        quote_reply = await request(
            self.host,
            peer,
            LEASE_PROTOCOL,
            w.QuoteRequest(capability=capability, expected_units=expected_units, duration_s=duration_s),
            _QUOTE_REPLY,
        )
        signer, payload = open_base64(quote_reply.envelope, domain=w.QUOTE_DOMAIN, payload_type=w.QUOTE_TYPE)
        if str(signer) != provider:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the quote is signed by another peer than the provider")
        quote = w.Quote.model_validate_json(payload)
        if quote.consumer != self.peer_id or quote.capability != capability or quote.provider != provider:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the quote is not the one asked for")
        amount = budget if budget is not None else quote.price_per_unit * quote.expected_units
        # Bound to our peer id: nobody else can lock under this id and take the lease first.
        salt = secrets.token_bytes(LEASE_SALT_BYTES)
        escrow_id = lease_id_for(self.host.get_id().to_bytes(), salt)
        lease_id = escrow_id.hex()
        lock: w.EscrowLock | None = None
        escrow_ref: EscrowRef | None = None
        if quote.escrow is not None:
            client = self._our_escrow_for(quote.escrow)
            escrow_ref = EscrowRef(contract=client.address, payer=client.account.address, escrow_id="0x" + lease_id)
        else:
            if amount > quote.postpaid_cap:
                raise ClawnodeError(ErrorCode.INSUFFICIENT_FUNDS, "the budget exceeds the provider's post-paid cap")
        # In the ledger before any money moves: a lock that never becomes a lease is refunded from here.
        await self.ledger.open_lease(
            LeaseOpen(
                lease_id=lease_id,
                role="consumer",
                provider=provider,
                consumer=self.peer_id,
                price_per_unit=quote.price_per_unit,
                budget=amount,
                escrow=escrow_ref,
            ),
            idempotency_key=f"open/{lease_id}",
        )
        try:
            if quote.escrow is not None:
                lock = await self._lock(quote, escrow_id, amount)
            wallet = None
            if lock is not None:
                account = self._our_escrow_for(quote.escrow).account if quote.escrow else None
                wallet = None if account is None else bind_wallet(bytes(account.key), self.peer_id)
            opening = w.LeaseOpen(
                quote=quote_reply.envelope,
                lease_id=lease_id,
                budget=amount,
                mode="escrow" if lock else "postpaid",
                lock=lock,
                wallet=wallet,
                salt=salt.hex(),
            )
            envelope = seal(opening, self.key, domain=w.OPEN_DOMAIN, payload_type=w.OPEN_TYPE)
            grant_reply = await request(
                self.host, peer, LEASE_PROTOCOL, w.OpenRequest(envelope=to_base64(envelope)), _GRANT_REPLY
            )
            grant = self._check_grant(grant_reply, provider, quote, opening)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._abandon_opening(lease_id, escrowed=lock is not None)
            raise
        self.held[lease_id] = HeldLease(grant, grant_reply.token, escrow_id if lock else None)
        log.info("lease %s opened with %s for %s", lease_id[:12], provider[:16], capability)
        return self._view_held(self.held[lease_id])

    def _our_escrow_for(self, terms: w.EscrowTerms) -> EscrowClient:
        client = self.escrow()
        if client is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "this node's escrow chain is not connected; cannot lock")
        if client.chain.chain_id != terms.chain_id or client.address.lower() != terms.contract.lower():
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "the provider's escrow is on another chain or contract")
        return client

    async def _lock(self, quote: w.Quote, escrow_id: bytes, amount: int) -> w.EscrowLock:
        assert quote.escrow is not None
        terms = quote.escrow
        client = self._our_escrow_for(terms)
        chain_now = await client.chain.run(client.chain.next_timestamp)
        result = await client.chain.run(
            lambda: client.lock(
                escrow_id,
                payee=terms.payee,
                arbiter=terms.arbiter,
                amount=amount,
                deadline=chain_now + quote.duration_s + DEADLINE_SLACK_S,
                window=terms.dispute_window_s,
            )
        )
        return w.EscrowLock(payer=client.account.address, escrow_id="0x" + escrow_id.hex(), tx_hash=result.tx_hash)

    def _check_grant(self, reply: w.GrantReply, provider: str, quote: w.Quote, opening: w.LeaseOpen) -> w.LeaseGrant:
        signer, payload = open_base64(reply.envelope, domain=w.GRANT_DOMAIN, payload_type=w.GRANT_TYPE)
        if str(signer) != provider:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the grant is signed by another peer than the provider")
        grant = w.LeaseGrant.model_validate_json(payload)
        if (
            grant.lease_id != opening.lease_id
            or grant.consumer != self.peer_id
            or grant.quote_id != quote.quote_id
            or grant.price_per_unit != quote.price_per_unit
            or grant.budget != opening.budget
        ):
            raise ClawnodeError(ErrorCode.CONFLICT, "the grant does not match the lease we opened")
        if not hmac.compare_digest(token_digest(reply.token), grant.token_sha256):
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the access token does not match the signed grant")
        return grant

    async def _abandon_opening(self, lease_id: str, *, escrowed: bool) -> None:
        try:
            await self.ledger.end_lease(lease_id, idempotency_key=f"end/{lease_id}")
            if escrowed:
                await self.ledger.enqueue_refund(lease_id)
                self.wake_settlement()
        except ClawnodeError as error:
            log.warning("could not wind down the failed lease %s: %s", lease_id[:12], error.code)

    def _held(self, lease_id: str) -> HeldLease:
        held = self.held.get(lease_id)
        if held is None:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "no lease with this id")
        if held.ended_reason is not None:
            raise _ended(held.ended_reason)
        return held

    async def call(self, lease_id: str, body: dict[str, Any], *, timeout_s: float = 120.0) -> w.CallResult:
        """Use a lease: send one request, collect the streamed chunks and the exact usage."""
        chunks: list[dict[str, Any]] = []

        async def collect(data: dict[str, Any]) -> None:
            chunks.append(data)

        end = await self.stream_call(lease_id, body, collect, timeout_s=timeout_s)
        return w.CallResult(chunks=chunks, units=end.units, usage=end.usage, served_by=end.served_by)

    async def stream_call(
        self,
        lease_id: str,
        body: dict[str, Any],
        on_chunk: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        timeout_s: float = 300.0,
        stall_s: float = 30.0,
    ) -> w.CallEnd:
        """Use a lease, handing each chunk to ``on_chunk`` as it arrives; the end frame's exact usage.

        A provider silent for ``stall_s`` between frames counts as gone (``E_TIMEOUT``), so a router
        can move on; leaving early (cancellation) closes the stream, which stops the provider.
        """
        held = self._held(lease_id)
        request_frame = w.CallRequest(lease_id=lease_id, token=held.token, body=body).model_dump_json().encode()
        try:
            with trio.fail_after(timeout_s):
                stream = await open_stream(self.host, ID.from_base58(held.grant.provider), [INFER_PROTOCOL])
                reader = FrameReader(stream, max_frame=MAX_CALL_FRAME)
                tokens_received = 0
                last_frame = False  # the provider's end or error frame arrived: nothing is left in flight
                requested = False
                try:
                    await write_frame(stream, request_frame, max_frame=MAX_CALL_FRAME)
                    requested = True
                    while True:
                        raw = await reader.read_frame(stall_s)
                        frame = _call_frame(raw)
                        if frame is None:
                            # An error frame (after the chunks it follows, all counted below) or garbage.
                            last_frame = True
                            parse_reply(raw, _CALL_FRAMES)
                            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the peer sent an unreadable reply")
                        if isinstance(frame, w.Chunk):
                            tokens_received += chunk_tokens(frame.data)
                            await on_chunk(frame.data)
                            continue
                        # Only units consistent with what arrived and what was asked are counted (and
                        # later countersigned); an inflated end frame is refused, unacknowledged.
                        last_frame, received, tokens_received = True, tokens_received, 0
                        held.seen_units += check_end_frame(frame.units, received, body)
                        with trio.move_on_after(CALL_ACK_TIMEOUT_S) as ack_scope:
                            ack_scope.shield = True
                            with contextlib.suppress(Exception):
                                await write_frame(stream, w.CallAck().model_dump_json().encode())
                        return frame
                finally:
                    with trio.move_on_after(CANCEL_DRAIN_S + 1) as cleanup:
                        cleanup.shield = True
                        if last_frame:
                            held.seen_units += tokens_received  # delivered before the provider's error
                        elif requested:
                            await self._leave_call(held, stream, reader, body, tokens_received)
                        await stream.close()
        except trio.TooSlowError:
            self.failures[("call", ErrorCode.TIMEOUT.value)] += 1
            raise ClawnodeError(ErrorCode.TIMEOUT, "the provider did not finish in time") from None
        except ClawnodeError as error:
            self._failed("call", error)
            raise
        except Exception as error:  # noqa: BLE001 - dial and stream failures come in many types
            self.failures[("call", ErrorCode.UNAVAILABLE.value)] += 1
            raise ClawnodeError(
                ErrorCode.UNAVAILABLE, f"the provider is unreachable ({type(error).__name__})"
            ) from None

    async def _leave_call(
        self, held: HeldLease, stream: INetStream, reader: FrameReader, body: dict[str, Any], tokens: int
    ) -> None:
        """We leave a call before its end frame (cancelled, stalled, the sink failed): what was delivered
        is paid. Ask the provider to stop and read on to its end frame, which bills the chunks it wrote,
        so both sides count the same; a provider that does not answer in ``CANCEL_DRAIN_S`` (stalled,
        gone, the stream cut) leaves the tokens received counted and this call's in-flight tolerance."""
        try:
            await write_frame(stream, w.Cancel().model_dump_json().encode())
            with trio.fail_after(CANCEL_DRAIN_S):
                while True:
                    raw = await reader.read_frame(CANCEL_DRAIN_S)
                    frame = _call_frame(raw)
                    if frame is None:  # the provider's error frame: everything before it arrived
                        held.seen_units += tokens
                        return
                    if isinstance(frame, w.Chunk):
                        tokens += chunk_tokens(frame.data)
                        continue
                    with contextlib.suppress(ClawnodeError):  # an inflated end frame counts nothing
                        held.seen_units += check_end_frame(frame.units, tokens, body)
                    with contextlib.suppress(Exception):
                        await write_frame(stream, w.CallAck().model_dump_json().encode())
                    return
        except Exception:  # noqa: BLE001 - a stalled, gone or cut provider
            pass
        held.seen_units += tokens
        held.aborted_calls += 1

    async def _countersign(self, message: w.ReceiptPush, remote: str) -> w.Countersigned:
        receipt = message.receipt
        held = self.held.get(receipt.body.lease_id)
        if held is None or held.grant.provider != remote or receipt.body.provider != remote:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "no such lease with this peer")
        with trio.move_on_after(RECEIPT_CATCH_UP_S):
            while held.seen_units + receipt_tolerance(held.aborted_calls) < receipt.body.units:
                await trio.sleep(0.05)
        check_receipt_claim(
            receipt.body.units,
            receipt.body.amount,
            held.seen_units,
            held.grant.price_per_unit,
            tolerance_units=receipt_tolerance(held.aborted_calls),
        )
        voucher = await self._voucher(held, receipt.body.amount)
        try:
            signed: SignedReceipt = await self.ledger.countersign_receipt(receipt, self.key, voucher=voucher)
        except ClawnodeError as error:
            # The provider asks again for a receipt we already signed (it crashed before storing our
            # signature): the same countersigned receipt, not a second one.
            if error.code != ErrorCode.CONFLICT:
                raise
            stored = await self.ledger.get_receipt(receipt.body.lease_id, receipt.body.seq)
            if stored.receipt.body != receipt.body or not stored.countersigned:
                raise
            signed = stored.receipt
        held.last_countersigned_seq = receipt.body.seq
        held.committed = max(held.committed, receipt.body.amount if held.escrow_id is not None else 0)
        return w.Countersigned(receipt=signed)

    async def _voucher(self, held: HeldLease, amount: int) -> str | None:
        if held.escrow_id is None:
            return None
        client = self.escrow()
        if client is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "this node's escrow chain is not connected")
        escrow_id = held.escrow_id
        signature = await client.chain.run(client.sign_voucher, escrow_id, amount)
        return "0x" + signature.hex()

    async def revoke(self, lease_id: str) -> w.LeaseView:
        """End a lease from either side; the provider claims what was countersigned, the rest is refunded."""
        if lease_id in self.served and self.served[lease_id].ended_reason is None:
            served = self.served[lease_id]
            served.session.revoke("provider")
            view = self._view_served(served)
            await self._end_served(lease_id, "revoked by the provider")
            return view.model_copy(update={"state": "lease_ended"})
        held = self._held(lease_id)
        with trio.move_on_after(PUSH_TIMEOUT_S):
            try:
                await request(
                    self.host,
                    ID.from_base58(held.grant.provider),
                    LEASE_PROTOCOL,
                    w.RevokeRequest(lease_id=lease_id),
                    _ACK,
                    timeout_s=PUSH_TIMEOUT_S,
                )
            except ClawnodeError as error:
                log.info("the provider did not acknowledge the revocation of %s (%s)", lease_id[:12], error.code)
        await self._end_held(lease_id, "revoked by the consumer")
        return self._view_held(held)

    async def renew(self, lease_id: str, duration_s: int) -> w.LeaseView:
        held = self._held(lease_id)
        expires_at = held.grant.expires_at + duration_s
        await request(
            self.host,
            ID.from_base58(held.grant.provider),
            LEASE_PROTOCOL,
            w.RenewRequest(lease_id=lease_id, expires_at=expires_at),
            _ACK,
        )
        held.grant = held.grant.model_copy(update={"expires_at": expires_at})
        return self._view_held(held)

    async def _end_held(self, lease_id: str, reason: str) -> None:
        held = self.held.get(lease_id)
        if held is None or held.ended_reason is not None:
            return
        held.ended_reason = reason
        try:
            await self.ledger.end_lease(lease_id, idempotency_key=f"end/{lease_id}")
            if held.escrow_id is not None:
                await self.ledger.enqueue_refund(lease_id)
                self.wake_settlement()
        finally:
            self._finished_now("held", lease_id)

    # ================= views =================

    def _view_held(self, held: HeldLease) -> w.LeaseView:
        state = "lease_active" if held.ended_reason is None else "lease_ended"
        return _view(held.grant, "consumer", state, held.seen_units)

    def _view_served(self, served: ServedLease) -> w.LeaseView:
        return _view(served.grant, "provider", str(served.session.state), served.session.units_metered)

    def leases(self) -> list[w.LeaseView]:
        """Live leases and those finished lately (``FINISHED_KEEP``, ``FINISHED_KEEP_S``); the ledger has all."""
        views = [self._view_served(s) for s in self.served.values()]
        views.extend(self._view_held(h) for h in self.held.values())
        return sorted(views, key=lambda view: view.lease_id)


async def _stop_on_cancel(reader: FrameReader, scope: trio.CancelScope) -> None:
    """While a call streams, the consumer says nothing until the end frame: any frame it sends (a
    cancel), its hanging up or a reset stops the call."""
    with contextlib.suppress(Exception):
        await reader.read_frame(math.inf)
    scope.cancel()


def _ended(why: str) -> ClawnodeError:
    """The refusal of a call on a lease that has ended (``why``: expired, abandoned, revoked by …)."""
    if why == "expired":
        return ClawnodeError(ErrorCode.EXPIRED, "the lease has ended (expired)", Reason.EXPIRED)
    return ClawnodeError(ErrorCode.CONFLICT, f"the lease has ended ({why})", Reason.ENDED)


def _call_frame(raw: bytes) -> w.Chunk | w.CallEnd | None:
    """A chunk or an end frame; None for anything else (an error frame, something unreadable)."""
    try:
        frame: w.Chunk | w.CallEnd = _CALL_FRAMES.validate_json(raw)
    except ValidationError:
        return None
    return frame


def _view(grant: w.LeaseGrant, role: str, state: str, units: int) -> w.LeaseView:
    """A lease as the API shows it: the grant's terms, our side, its state and units; never the token."""
    return w.LeaseView(
        lease_id=grant.lease_id,
        role=role,
        provider=grant.provider,
        consumer=grant.consumer,
        capability=grant.capability,
        price_per_unit=grant.price_per_unit,
        budget=grant.budget,
        expires_at=grant.expires_at,
        mode=grant.mode,
        state=state,
        units=units,
    )
