"""The consumer's side of a lease: ask for a quote and check it, lock the budget under an escrow id
derived from our peer id (``lease_id_for``), open, check the grant, keep the token in memory only,
call (counting each end frame only within what arrived and the proof it carries, leaving a call by
a cancel frame and reading on to its end frame), countersign receipts for what was counted (with an
escrow voucher for the total), renew, end, and book the provider's claims as spend when seen on chain.

Its state is :class:`~protocols.machines.lease_consumer.ConsumerLease` (one table); its decisions
are the verdicts of ``protocols.machines.lease_consumer`` (``quote_verdict``, ``grant_verdict``,
``call_verdict``, ``end_frame_units``, ``call_ending``, ``ending_checked``, ``countersign_verdict``, ``renew_verdict``,
``call_refused_event``, ``escrow_seen``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from dht.records import bind_wallet
from protocols import lease_wire as w
from protocols.lease.base import (
    ACK,
    CALL_ACK_TIMEOUT_S,
    CALL_FRAMES,
    CANCEL_DRAIN_S,
    DEADLINE_SLACK_S,
    ESCROW_CHECK_S,
    ESCROW_IDLE_CHECK_S,
    GRANT_REPLY,
    INFER_PROTOCOLS,
    LEASE_PROTOCOL,
    MAX_CALL_FRAME,
    PUSH_TIMEOUT_S,
    QUOTE_REPLY,
    RECEIPT_CATCH_UP_S,
    HeldLease,
    body_version_owed,
    call_frame,
    error_frame,
    log,
    token_digest,
)
from protocols.lease.channels import ChannelDraw, ChannelRole
from protocols.machines import lease_consumer as c
from protocols.machines import left_calls
from protocols.machines.channel import lease_share
from protocols.machines.escrow_lock import LOCK_UNCONFIRMED
from protocols.machines.lease import LEASE_SALT_BYTES, chunk_tokens, lease_id_for
from protocols.machines.lease_calls import (
    END_FRAME_OVER_PROOF,
    call_bytes_bound,
    call_bytes_verdict,
    proved_counts,
    reply_tokens,
)
from protocols.machines.verdict import Refusal, enforce
from runtime.errors import ClawnodeError, ErrorCode
from runtime.ledger import EscrowRef, LeaseOpen, SignedReceipt
from runtime.verify.evidence import CallProof
from runtime.verify.provider import verifiable
from wire.framing import FrameReader, write_frame
from wire.rpc import parse_reply, request
from wire.signed import open_base64, seal, to_base64
from wire.spare_streams import SpareStreams
from wire.yamux_window import WindowedReader

if TYPE_CHECKING:
    from runtime.escrow import EscrowClient

# A request frame larger than this is parsed back on a worker thread, not on the trio loop.
PARSE_ON_LOOP_BYTES = 256 * 1024

# Waits before sending an open again that the provider refused lock_unconfirmed (~15 s in all).
UNCONFIRMED_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0)
# The most a call's spot-check that started keeps its caller, whatever the call's own deadline or its
# caller's cancel (a leased verifier's tries and a second opinion's: 2 × 3 × 60 s at worst).
SPOT_CHECK_S = 600.0


@dataclass(frozen=True)
class _Drained:
    """What the provider answered this side's cancel with (``ConsumerRole._leave_call``)."""

    last: str | None = None  # its last frame: "end", "error", or None when none came in time
    proof: CallProof | None = None  # that frame's proof of the text it wrote, if it sent one
    counted: int = 0  # the units counted for the call (taken back if it then fails its check)
    text: str = ""  # reply text in chunks that came after this side left (not handed to its caller)
    text_tokens: int = 0  # the tokens those chunks add to the reply (``reply_tokens``), text or not
    left_at: float | None = None  # when it was counted as a left call (its allowance), if it was
    overbilled: bool = False  # that frame billed past its own proof: the lease ends after the call's check


class ConsumerRole(ChannelRole):
    @functools.cached_property
    def spare_streams(self) -> SpareStreams:
        """A call stream to each provider called lately, negotiated ahead of the next call (a call
        still uses a stream of its own: ``wire.spare_streams``). Both call protocols, newest first: a
        provider that serves 1.1.0 signs this node v3 proofs, an older one answers on 1.0.0."""
        return SpareStreams(self.host, INFER_PROTOCOLS)

    async def open_lease(
        self,
        provider: str,
        capability: str,
        *,
        budget: int | None = None,
        duration_s: int = 3600,
        expected_units: int = 1000,
        channel: bool = False,
    ) -> w.LeaseView:
        """Open a lease; ``channel``: draw it on the pair's payment channel (``protocols/lease/channels.py``)."""
        try:
            return await self._open_lease(
                provider,
                capability,
                budget=budget,
                duration_s=duration_s,
                expected_units=expected_units,
                channel=channel,
            )
        except ClawnodeError as error:
            self._failed("open", error)
            raise

    async def _open_lease(
        self,
        provider: str,
        capability: str,
        *,
        budget: int | None,
        duration_s: int,
        expected_units: int,
        channel: bool = False,
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
            QUOTE_REPLY,
        )
        signer, payload = open_base64(quote_reply.envelope, domain=w.QUOTE_DOMAIN, payload_type=w.QUOTE_TYPE)
        if str(signer) != provider:  # before reading a payload someone else signed
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the quote is signed by another peer than the provider")
        quote = w.Quote.model_validate_json(payload)
        amount = budget if budget is not None else quote.price_per_unit * quote.expected_units
        ours = self.escrow_terms()  # the arbiter we trust is the one our own terms name
        enforce(
            c.quote_verdict(
                c.QuoteFacts(
                    signer=str(signer),
                    provider=provider,
                    me=self.peer_id,
                    quote_provider=quote.provider,
                    quote_consumer=quote.consumer,
                    quote_capability=quote.capability,
                    capability=capability,
                    escrowed=quote.escrow is not None,
                    budget=amount,
                    postpaid_cap=quote.postpaid_cap,
                    quote_arbiter=quote.escrow.arbiter if quote.escrow is not None else "",
                    trusted_arbiter=None if ours is None else ours.arbiter,
                )
            )
        )
        machine = c.ConsumerLease()  # lease_opening
        # Bound to our peer id: nobody else can lock under this id and take the lease first.
        salt = secrets.token_bytes(LEASE_SALT_BYTES)
        escrow_id = lease_id_for(self.host.get_id().to_bytes(), salt)
        lease_id = escrow_id.hex()
        lock: w.EscrowLock | None = None
        escrow_ref: EscrowRef | None = None
        drawn: ChannelDraw | None = None
        if quote.escrow is not None:
            client = self._our_escrow_for(quote.escrow)
            if channel:
                # A channel lease has an id of its own; its escrow is the pair's channel (one lock for many).
                lease_id = secrets.token_bytes(32).hex()
                drawn = await self.draw_channel(client, quote.escrow, provider, lease_id, amount, quote.duration_s)
                if drawn is None:
                    lease_id = escrow_id.hex()
            escrow_key = lease_id if drawn is None else drawn.channel_id[2:]
            escrow_ref = EscrowRef(contract=client.address, payer=client.account.address, escrow_id="0x" + escrow_key)
        # In the ledger before any money moves: a lock that never becomes a lease is refunded from here.
        try:
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
        except BaseException:
            if drawn is not None:
                self.channel_returned(drawn.channel_id, lease_id)
            raise
        try:
            if drawn is not None and quote.escrow is not None:
                payer = self._our_escrow_for(quote.escrow).account.address
                lock = w.EscrowLock(payer=payer, escrow_id=drawn.channel_id)
                salt = bytes.fromhex(drawn.salt)
                machine.apply(c.ConsumerEvent.LOCK, c.CONSUMER)
            elif quote.escrow is not None:
                lock = await self._lock(quote, escrow_id, amount)
                machine.apply(c.ConsumerEvent.LOCK, c.CONSUMER)
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
                channel_base=None if drawn is None else drawn.base,
            )
            envelope = seal(opening, self.key, domain=w.OPEN_DOMAIN, payload_type=w.OPEN_TYPE)
            grant_reply = await self._ask_grant(peer, w.OpenRequest(envelope=to_base64(envelope)))
            grant = self._check_grant(grant_reply, provider, quote, opening)
            machine.apply(c.ConsumerEvent.GRANT, c.CONSUMER)
        except BaseException:
            if machine.may(c.ConsumerEvent.FAIL, c.CONSUMER):
                machine.apply(c.ConsumerEvent.FAIL, c.CONSUMER)
            with trio.CancelScope(shield=True):
                if drawn is not None:
                    self.channel_returned(drawn.channel_id, lease_id)
                await self._abandon_opening(lease_id, escrowed=lock is not None and drawn is None)
            raise
        held = HeldLease(grant, grant_reply.token, escrow_id if lock else None, machine=machine)
        if drawn is not None:
            held.escrow_id = bytes.fromhex(drawn.channel_id[2:])
            held.channel_id, held.channel_base, held.channel_amount = drawn.channel_id, drawn.base, drawn.amount
        self.held[lease_id] = held
        log.info("lease %s opened with %s for %s", lease_id[:12], provider[:16], capability)
        # Known before its first call: a provider that hangs up after it cannot leave it unknown.
        self._spawn(self.verifying.learn_advertised, provider, lease_id)
        return self._view_held(self.held[lease_id])

    async def _ask_grant(self, peer: ID, message: w.OpenRequest) -> w.GrantReply:
        """Send the open; while the provider counts our lock as not yet ``escrow.confirmations`` blocks deep
        on its side (``lock_unconfirmed``), send the same open again a little later (bounded): the money is
        locked for this provider, so another provider is no answer."""
        for delay in (*UNCONFIRMED_RETRY_S, None):
            try:
                return await request(self.host, peer, LEASE_PROTOCOL, message, GRANT_REPLY)
            except ClawnodeError as error:
                if error.reason != LOCK_UNCONFIRMED or delay is None:
                    raise
                log.info("the provider does not count our lock yet (lock_unconfirmed); asking again in %.1f s", delay)
                await trio.sleep(delay)
        raise AssertionError("unreachable")

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
                token=terms.token,
            )
        )
        return w.EscrowLock(payer=client.account.address, escrow_id="0x" + escrow_id.hex(), tx_hash=result.tx_hash)

    def _check_grant(self, reply: w.GrantReply, provider: str, quote: w.Quote, opening: w.LeaseOpen) -> w.LeaseGrant:
        signer, payload = open_base64(reply.envelope, domain=w.GRANT_DOMAIN, payload_type=w.GRANT_TYPE)
        if str(signer) != provider:  # before reading a payload someone else signed
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the grant is signed by another peer than the provider")
        grant = w.LeaseGrant.model_validate_json(payload)
        facts = c.GrantFacts(
            signer=str(signer),
            provider=provider,
            me=self.peer_id,
            lease_id=opening.lease_id,
            quote_id=quote.quote_id,
            price_per_unit=quote.price_per_unit,
            budget=opening.budget,
            token=reply.token,
            grant_lease_id=grant.lease_id,
            grant_consumer=grant.consumer,
            grant_quote_id=grant.quote_id,
            grant_price_per_unit=grant.price_per_unit,
            grant_budget=grant.budget,
            grant_token_sha256=grant.token_sha256,
        )
        enforce(c.grant_verdict(facts, token_digest(reply.token)))
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
        enforce(c.call_verdict(held.machine.state, held.ended_reason))
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
        # Used, checked and hashed as the provider reads it (a NaN the frame writes as null is null here too);
        # a large frame is parsed on a thread (a 0.9 MB logit_bias takes ~40 ms).
        if len(request_frame) > PARSE_ON_LOOP_BYTES:
            body = (await trio.to_thread.run_sync(json.loads, request_frame))["body"]
        else:
            body = json.loads(request_frame)["body"]
        provider = ID.from_base58(held.grant.provider)
        byte_bound = call_bytes_bound(body)  # the chunks' bytes in all, checked at every frame
        try:
            with trio.fail_after(timeout_s):
                stream = await self.spare_streams.take(provider)
                owed = body_version_owed(stream.get_protocol())  # the proof body its answer owes
                reader = FrameReader(WindowedReader(stream), max_frame=MAX_CALL_FRAME)
                tokens_received = bytes_received = 0
                texts: list[str] = []  # the reply as received (bounded by call_bytes_verdict), for its check
                generated = 0  # the tokens of the reply's chunks, text or not (``reply_tokens``), for its check
                last_frame = False  # the provider's end or error frame arrived: nothing is left in flight
                requested = False
                stopped = False  # this side leaves because of the provider (its frames stopped coming)
                drained: _Drained | None = None  # what the provider answered this side's cancel with
                try:
                    await write_frame(stream, request_frame, max_frame=MAX_CALL_FRAME)
                    requested = True
                    while True:
                        try:
                            raw = await reader.read_frame(stall_s)
                        except Exception:  # silent ``stall_s``, its stream closed or cut, an oversized frame
                            stopped = True
                            raise
                        frame = call_frame(raw)
                        if frame is None:
                            # An error frame (after the chunks it follows, all counted below, and the
                            # prompt it bills within their bound) or garbage.
                            last_frame = True
                            failed = error_frame(raw)
                            billed = None if failed is None else failed.units
                            received, proof = tokens_received, None if failed is None else failed.verify
                            counted = c.error_frame_count(billed, received, body, proved_counts(proof))
                            overbilled = isinstance(counted, Refusal)
                            if isinstance(counted, Refusal):  # billed past its own proof: nothing is counted
                                tokens_received = 0
                                self._overbilled(held, lease_id, counted, revoke=False)
                            else:
                                tokens_received = counted
                            ending = c.call_ending("error", left=False, provider_stopped=False)
                            if c.ending_checked(ending, generated):
                                # A reply was handed on before it failed: checked as if it had ended
                                # (a failed check refuses the call and takes its units back), unless it
                                # is a first unproved cut (an older provider's error frame has no proof).
                                paid, tokens_received = tokens_received, 0
                                held.count(self.clock(), paid)
                                text = "".join(texts)
                                if not self._cut_let_go(held, body, ending, generated, proof):
                                    await self._spot_check(
                                        held, lease_id, body, proof, {}, text, paid, generated, ending=ending, owed=owed
                                    )
                            if overbilled:  # its check passed or was not drawn: revoked now
                                self._revoke_undisputed(lease_id)
                            try:
                                parse_reply(raw, CALL_FRAMES)
                            except ClawnodeError as refusal:
                                self._call_refused(held, refusal)
                                raise
                            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the peer sent an unreadable reply")
                        if isinstance(frame, w.Chunk):
                            bytes_received += len(raw)
                            refused = call_bytes_verdict(bytes_received, byte_bound)
                            stopped = refused is not None  # more than the call allows: the provider's doing
                            enforce(refused)
                            tokens_received += chunk_tokens(frame.data)
                            # A reply's tokens are checked as they are paid, text or not; an embedding's are not.
                            generated += reply_tokens(body, frame.data)
                            if isinstance(frame.data.get("text"), str):
                                texts.append(frame.data["text"])
                            await on_chunk(frame.data)
                            continue
                        # Only units consistent with what arrived, what was asked and the proof that
                        # came are counted (and later countersigned); an inflated end frame is refused,
                        # unacknowledged, and one billing past its own proof ends the lease too.
                        last_frame, received, tokens_received = True, tokens_received, 0
                        counted = c.end_frame_units(frame.units, received, body, proved_counts(frame.verify))
                        if isinstance(counted, Refusal):
                            self._overbilled(held, lease_id, counted, count=False)
                            raise counted.error()
                        held.count(self.clock(), counted)
                        if held.machine.may(c.ConsumerEvent.RESUME, c.PROVIDER):
                            held.apply(c.ConsumerEvent.RESUME, c.PROVIDER)  # it served: no longer paused
                        with trio.move_on_after(CALL_ACK_TIMEOUT_S) as ack_scope:
                            ack_scope.shield = True
                            with contextlib.suppress(Exception):
                                await write_frame(stream, w.CallAck().model_dump_json().encode())
                        # The next call's stream is negotiated now, not in front of its first token.
                        self._spawn(self.spare_streams.refill, provider)
                        proof, text = frame.verify, "".join(texts)
                        if c.ending_checked(c.call_ending("end", left=False, provider_stopped=False), generated):
                            await self._spot_check(
                                held, lease_id, body, proof, frame.usage, text, counted, generated, owed=owed
                            )
                        return frame
                finally:
                    with trio.move_on_after(CANCEL_DRAIN_S + 1) as cleanup:
                        cleanup.shield = True
                        if last_frame:
                            held.count(self.clock(), tokens_received)  # delivered before the provider's error
                        elif requested:
                            drained = _Drained()  # kept if the drain is cut short: nothing was counted
                            drained = await self._leave_call(held, stream, reader, body, tokens_received) or drained
                        await stream.close()
                    if drained is not None:
                        ending = c.call_ending(drained.last, left=True, provider_stopped=stopped)
                        checked = c.ending_checked(ending, generated + drained.text_tokens)
                        if checked and not self._cut_let_go(
                            held, body, ending, generated + drained.text_tokens, drained.proof
                        ):
                            # The provider stopped after a reply was handed on: checked as if it had ended,
                            # with the proof of the end or error frame that answered the cancel, if one
                            # came (a failed check refuses the call, instead of its E_TIMEOUT, and takes its
                            # units back).
                            text, generated = "".join(texts) + drained.text, generated + drained.text_tokens
                            await self._spot_check(
                                held,
                                lease_id,
                                body,
                                drained.proof,
                                {},
                                text,
                                drained.counted,
                                generated,
                                left_at=drained.left_at,
                                ending=ending,
                                owed=owed,
                            )
                        if drained.overbilled:  # its check passed or was not drawn: revoked now
                            self._revoke_undisputed(lease_id)
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

    def _cut_let_go(
        self, held: HeldLease, body: dict[str, Any], ending: c.CallEnding, text_tokens: int, proof: CallProof | None
    ) -> bool:
        """Whether a checked call that ended so without a proof is let go unchecked: its provider's first
        unproved cut since its last passed check (``unproved_cut``, ``cut_forgiven``), counted here; a call
        served without a commitment by design (``verifiable``) is never counted (its check skips it)."""
        if not c.unproved_cut(ending, text_tokens, proof is not None, committed=verifiable(body)):
            return False
        earlier = self.verifying.unproved_cut(held.grant.provider)
        return c.cut_forgiven(ending, False, earlier)

    async def _spot_check(
        self,
        held: HeldLease,
        lease_id: str,
        body: dict[str, Any],
        proof: CallProof | None,
        usage: dict[str, int],
        text: str,
        counted: int,
        generated: int,
        *,
        left_at: float | None = None,
        ending: c.CallEnding = c.CallEnding.END,
        owed: int = 1,
    ) -> None:
        """Verified inference: a call that fails its check ends the lease, so nothing more is countersigned,
        and its own units leave what this side agrees it owes (a receipt pushed while the check ran may
        still have been countersigned for them: the check is not awaited before the provider's ack); a
        call left without the provider's last frame (``left_at``) also loses its allowance.
        ``proof`` and ``usage``: the end frame's, or the error frame's proof of a reply that failed
        after its chunks (``reply_tokens``), or the proof of the end or error frame that answered this
        side's cancel of a provider that stopped after them, or none (``ending_checked``; no usage: the
        chunks received say what was produced); ``ending``: which of those (``Verifying.check`` fails an
        end frame's missing proof on every call, a cut's only when drawn); ``owed``: the proof body version
        the call protocol the provider answered on owes (``body_version_owed``).

        The check runs as a task of the market's own nursery (bounded by ``SPOT_CHECK_S``), which applies
        its consequences as soon as it has the outcome, and the caller waits for it shielded from the
        call's deadline and its own cancel: a check that started lands its outcome (a reply whose last
        frame came just before the deadline was otherwise checked, and its failure thrown away at the
        next checkpoint), while the node's shutdown, which cancels that nursery, still ends it."""
        provider = held.grant.provider
        outcome: list[str] = []
        done = trio.Event()

        async def check_and_apply() -> None:
            try:
                with trio.move_on_after(SPOT_CHECK_S) as bound:
                    found = await self.verifying.check(
                        provider,
                        lease_id,
                        body,
                        proof,
                        text=text,
                        usage=usage,
                        received_tokens=generated,
                        ending=ending,
                        owed=owed,
                    )
                if bound.cancelled_caught:
                    log.warning("a check of %s took over %.0f s: left undecided", provider[:16], SPOT_CHECK_S)
                    return
                outcome.append(found)
                if found.startswith("failed:"):  # applied at once: nothing between the outcome and its effects
                    self._check_failed(held, lease_id, counted, left_at)
            finally:
                done.set()

        with trio.CancelScope(shield=True):
            if self._nursery is None:  # a role not started (no nursery to run it in): checked in place
                await check_and_apply()
            else:
                self._spawn(check_and_apply)  # a failing check is logged by its code, the call left as is
                await done.wait()
        if outcome and outcome[0].startswith("failed:"):
            reason = outcome[0].removeprefix("failed:")
            raise ClawnodeError(
                ErrorCode.FORBIDDEN, f"the provider failed verification ({reason})", f"verification_{reason}"
            )

    def _check_failed(self, held: HeldLease, lease_id: str, counted: int, left_at: float | None) -> None:
        """A call of ``held`` failed its check: its units are not owed (nor a left call's allowance), and
        the lease ends, disputed when signed evidence binds the failure."""
        held.seen_units = max(0, held.seen_units - counted)
        if left_at is not None:
            held.left = left_calls.refused(held.left, left_at)
        if lease_id in self.verifying.evidence:  # signed evidence: end it, freeze the escrow, ask the arbiter
            self._spawn(self.dispute_lease, lease_id, counted)
            return
        if held.machine.may(c.ConsumerEvent.CLOSE, c.CONSUMER):
            # Closed now, not when the revocation's task first runs: no further call is sent on it.
            held.apply(c.ConsumerEvent.CLOSE)
        self._spawn(self.revoke_held, lease_id)

    def _overbilled(
        self, held: HeldLease, lease_id: str, refusal: Refusal, *, count: bool = True, revoke: bool = True
    ) -> None:
        """A call's last frame was refused for billing more than arrived, or more than its own proof
        commits: counted in ``failures`` (``count``: not where the refusal is raised, which counts it
        there). One billing past its proof
        (``proof_meter_verdict``) also ends the lease, as a failed check does: the chunks' tokens, the
        units and the proof all came on the provider's own stream, so it billed more than it says it
        produced; no further call is sent on it (closed now), and its revocation tells the provider and
        refunds the rest of the lock. Not disputed (the chunks' counts are not signed: nothing an
        arbiter can re-check) and not a failed check in the provider's standing (that records the
        spot checks of its replies, shared with peers); the router counts the call as a failure.
        ``revoke`` False: the frame's proof is still to be checked (an error frame's, a cancel's answer),
        so the revocation waits for that check (``_revoke_undisputed``): a failed one with signed
        evidence disputes the lease instead, which must freeze the escrow before anything settles it."""
        if count:
            self._failed("call", refusal.error())
        if refusal.reason != END_FRAME_OVER_PROOF:
            return
        log.warning("the provider of lease %s billed past its own proof: the lease ends", lease_id[:12])
        if held.machine.may(c.ConsumerEvent.CLOSE, c.CONSUMER):
            held.apply(c.ConsumerEvent.CLOSE)
        if revoke:
            self._spawn(self.revoke_held, lease_id)

    def _revoke_undisputed(self, lease_id: str) -> None:
        """Revoke a lease closed for overbilling once its call's check is over, unless that check (or an
        earlier one) left signed evidence: then its dispute settles the escrow."""
        if lease_id not in self.verifying.evidence:
            self._spawn(self.revoke_held, lease_id)

    async def _leave_call(
        self, held: HeldLease, stream: INetStream, reader: FrameReader, body: dict[str, Any], tokens: int
    ) -> _Drained | None:
        """We leave a call before its end frame (cancelled, stalled, the sink failed): what was delivered
        is paid, and so is the prompt the provider's engine decoded. Ask the provider to stop and read on
        to its end frame, which bills the chunks it wrote and that prompt (counted within what arrived
        and the prompt's estimate, ``end_frame_units``), so both sides count the same; a provider that
        does not answer in ``CANCEL_DRAIN_S`` (stalled, gone, the stream cut) leaves the tokens received
        counted and this call's tolerance: what was in flight and its prompt's estimate. What it
        answered is returned (None, from a stand-in that tells nothing, reads as no answer): the caller
        spot-checks a call the provider stopped after its reply's chunks, whatever answered the cancel
        (``call_ending``, ``ending_checked``), with the proof of that answer's end or error frame, over
        the reply's text including what came meanwhile (kept within the call's byte bound,
        ``call_bytes_bound``)."""
        texts: list[str] = []
        text_tokens, room = 0, call_bytes_bound(body)
        ended: _Drained | None = None  # the end frame that answered, counted: acknowledged below
        try:
            with trio.fail_after(CANCEL_DRAIN_S):  # the cancel's write too: a blocked one leaves the call counted
                await write_frame(stream, w.Cancel().model_dump_json().encode())
                while True:
                    raw = await reader.read_frame(CANCEL_DRAIN_S)
                    frame = call_frame(raw)
                    if frame is None:  # the provider's error frame: everything before it arrived
                        failed = error_frame(raw)
                        proof = None if failed is None else failed.verify
                        billed = c.error_frame_count(
                            None if failed is None else failed.units, tokens, body, proved_counts(proof)
                        )
                        units = 0
                        if isinstance(billed, Refusal):  # billed past its own proof: nothing is counted
                            self._overbilled(held, held.grant.lease_id, billed, revoke=False)
                        else:
                            units = billed
                        held.count(self.clock(), units)
                        text = "".join(texts)
                        return _Drained(
                            "error", proof, units, text, text_tokens, overbilled=isinstance(billed, Refusal)
                        )
                    if isinstance(frame, w.Chunk):
                        tokens += chunk_tokens(frame.data)
                        room -= len(raw)
                        if room >= 0:
                            text_tokens += reply_tokens(body, frame.data)
                            if isinstance(frame.data.get("text"), str):
                                texts.append(frame.data["text"])
                        continue
                    counted = c.end_frame_units(frame.units, tokens, body, proved_counts(frame.verify))
                    over = isinstance(counted, Refusal) and counted.reason == END_FRAME_OVER_PROOF
                    if not isinstance(counted, Refusal):  # an inflated end frame counts nothing
                        held.count(self.clock(), counted)
                    else:
                        self._overbilled(held, held.grant.lease_id, counted, revoke=False)
                    units = 0 if isinstance(counted, Refusal) else counted
                    ended = _Drained("end", frame.verify, units, "".join(texts), text_tokens, overbilled=over)
                    break
        except Exception:  # noqa: BLE001 - a stalled, gone or cut provider
            pass
        if ended is not None:
            # Acknowledged outside the drain's deadline, in a bounded scope of its own (as ``stream_call``
            # does): a deadline passing during this write counted the call a second time as a left one,
            # and lost the answer (its proof, and a revocation owed after the call's check).
            with trio.move_on_after(CALL_ACK_TIMEOUT_S) as ack_scope:
                ack_scope.shield = True
                with contextlib.suppress(Exception):
                    await write_frame(stream, w.CallAck().model_dump_json().encode())
            return ended
        left_at = self.clock()
        counted = held.count_left(left_at, tokens, body)
        return _Drained(None, None, counted, "".join(texts), text_tokens, left_at)

    async def _countersign(self, message: w.ReceiptPush, remote: str) -> w.Countersigned:
        receipt = message.receipt
        held = self.held.get(receipt.body.lease_id)
        if held is None or held.grant.provider != remote or receipt.body.provider != remote:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "no such lease with this peer")

        def facts() -> c.ReceiptFacts:
            return c.ReceiptFacts(
                state=held.machine.state,
                units=receipt.body.units,
                amount=receipt.body.amount,
                seen_units=held.seen_units,
                left_units=held.left.tolerance,
                price_per_unit=held.grant.price_per_unit,
            )

        with trio.move_on_after(RECEIPT_CATCH_UP_S):
            while not c.receipt_counted(facts()):
                await trio.sleep(0.05)
        enforce(c.countersign_verdict(facts()))
        voucher = await self._voucher(held, receipt.body.amount)
        try:
            signed: SignedReceipt = await self.ledger.countersign_receipt(receipt, self.receipt_key, voucher=voucher)
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
        # The calls left long enough ago are billed past: what this receipt claimed for them is all they keep.
        held.left = left_calls.countersigned(held.left, self.clock(), receipt.body.units, held.seen_units)
        if held.machine.may(c.ConsumerEvent.COUNTERSIGN, c.CONSUMER):
            held.apply(c.ConsumerEvent.COUNTERSIGN)  # a paused lease serves again
        held.committed = max(held.committed, receipt.body.amount if held.escrow_id is not None else 0)
        return w.Countersigned(receipt=signed)

    async def _voucher(self, held: HeldLease, amount: int) -> str | None:
        if held.escrow_id is None:
            return None
        client = self.escrow()
        if client is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "this node's escrow chain is not connected")
        escrow_id = held.escrow_id
        if held.channel_id is not None:
            lease_id = held.grant.lease_id
            amount = self.voucher_amount(held.channel_id, lease_id, held.channel_base, amount, held.channel_amount)
        signature = await client.chain.run(client.sign_voucher, escrow_id, amount)
        return "0x" + signature.hex()

    async def revoke_held(self, lease_id: str) -> w.LeaseView:
        """End a lease we hold: tell the provider (it claims what was countersigned), then the rest of
        the lock is refunded."""
        held = self.held.get(lease_id)
        if held is None:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "no lease with this id")
        # A second revoke while the first waits goes on; so does one of a lease a refused call spent
        # (ended in the machine, its end work not done yet): the provider is told, the rest refunded.
        spent = held.machine.state == c.ConsumerState.ENDED and held.ended_reason is None
        if held.machine.state != c.ConsumerState.ENDING and not spent:
            enforce(c.call_verdict(held.machine.state, held.ended_reason))
            held.apply(c.ConsumerEvent.CLOSE)
        with trio.move_on_after(PUSH_TIMEOUT_S):
            try:
                await request(
                    self.host,
                    ID.from_base58(held.grant.provider),
                    LEASE_PROTOCOL,
                    w.RevokeRequest(lease_id=lease_id),
                    ACK,
                    timeout_s=PUSH_TIMEOUT_S,
                )
            except ClawnodeError as error:
                log.info("the provider did not acknowledge the revocation of %s (%s)", lease_id[:12], error.code)
        await self._end_held(lease_id, "revoked by the consumer")
        return self._view_held(held)

    async def renew(self, lease_id: str, duration_s: int) -> w.LeaseView:
        held = self._held(lease_id)
        expires_at = held.grant.expires_at + duration_s
        enforce(c.renew_verdict(held.machine.state, held.grant.expires_at, expires_at))
        await request(
            self.host,
            ID.from_base58(held.grant.provider),
            LEASE_PROTOCOL,
            w.RenewRequest(lease_id=lease_id, expires_at=expires_at),
            ACK,
        )
        held.grant = held.grant.model_copy(update={"expires_at": expires_at})
        if held.machine.may(c.ConsumerEvent.RENEW, c.CONSUMER):
            held.apply(c.ConsumerEvent.RENEW)
        return self._view_held(held)

    async def _end_held(self, lease_id: str, reason: str, event: c.ConsumerEvent | None = None) -> None:
        """The held lease's end work, once: its ledger row closed and the rest of the lock refunded.
        ``event``: the machine's event when a verdict named one (``freeze``); else the provider ended it
        or our revocation is done."""
        held = self.held.get(lease_id)
        if held is None or held.ended_reason is not None:
            return
        held.ended_reason = reason
        if event is not None and held.machine.may(event, c.SYSTEM):
            held.apply(event, c.SYSTEM)
        elif held.machine.state == c.ConsumerState.ENDING:
            held.apply(c.ConsumerEvent.END)  # our revocation is done
        elif held.machine.may(c.ConsumerEvent.REVOKE, c.PROVIDER):
            held.apply(c.ConsumerEvent.REVOKE, c.PROVIDER)
        try:
            await self.ledger.end_lease(lease_id, idempotency_key=f"end/{lease_id}")
            if held.channel_id is not None:
                self.channel_returned(held.channel_id, lease_id)  # the channel's rest stays for the next lease
            elif held.escrow_id is not None:
                await self.ledger.enqueue_refund(lease_id)
                self.wake_settlement()
        finally:
            self._finished_now("held", lease_id)

    async def _observe_spend(self, lease_id: str) -> None:
        """As the consumer: book as spend what the escrow shows released to the provider (its claims or
        the arbiter's resolution), and end the held lease when the escrow is frozen: the provider's
        notice may have been lost, the chain has the last word (``escrow_seen``)."""
        held = self.held.get(lease_id)
        client = self.escrow()
        if held is None or held.escrow_id is None or client is None or held.observing:
            return
        held.observing = True
        try:
            state = await client.chain.run(client.get, client.account.address, held.escrow_id)
            released = state.released
            if held.channel_id is not None:  # the channel's total: this lease's share of it
                released = lease_share(released, held.channel_base, held.committed)
            seen = c.escrow_seen(
                state=held.machine.state,
                ended=held.ended_reason is not None,
                phase=state.phase,
                released=released,
                booked=held.booked,
                committed=held.committed,
            )
            if seen.book:
                await self.ledger.book_released(lease_id, seen.book)
                held.booked = seen.book
            held.committed = seen.committed
            if seen.end:
                log.info("lease %s ends: its escrow is %s", lease_id[:12], state.phase)
                await self._end_held(lease_id, f"escrow {state.phase}", seen.event)
            if seen.settle and held.machine.may(c.ConsumerEvent.SETTLE, c.SYSTEM):
                held.apply(c.ConsumerEvent.SETTLE, c.SYSTEM)
        except ClawnodeError as error:
            log.info("escrow of lease %s not observed: %s", lease_id[:12], error.code)
        finally:
            held.observing = False
            held.observed_at = self.clock()

    async def _revoked_by_provider(self, message: w.RevokeRequest, remote: str) -> w.Ack:
        held = self.held.get(message.lease_id)
        if held is None or held.grant.provider != remote:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "no such lease with this peer")
        await self._end_held(message.lease_id, message.reason)
        return w.Ack()

    def _call_refused(self, held: HeldLease, refusal: ClawnodeError) -> None:
        """The provider refused a call: a ``paused`` refusal pauses the held lease (our countersignature
        resumes it); one that spends or expires it (``should_abandon``) ends it in the machine, so no
        further call is sent on it. Its end work is left to the holder's revoke, which tells the
        provider and refunds the rest of the lock (or to the escrow sweep, once the lock is frozen)."""
        event = c.call_refused_event(refusal.code, refusal.reason)
        if event is not None and held.machine.may(event, c.PROVIDER):
            held.apply(event, c.PROVIDER)

    def _sweep_held(self, now: float) -> None:
        """The consumer's timer step: reread the escrow of a lease whose vouchers are not all booked
        (every ``ESCROW_CHECK_S``), and of every other escrowed lease not ended yet (every
        ``ESCROW_IDLE_CHECK_S``): a dispute ends it even if the provider's notice was lost."""
        if self.spare_streams:  # spare call streams idle too long are closed
            self._spawn(self.spare_streams.close_stale)
        for lease_id, held in list(self.held.items()):
            if held.escrow_id is None or held.observing:
                continue
            unbooked = held.booked < held.committed
            if (not unbooked or held.channel_id is not None) and held.ended_reason is not None:
                continue  # a channel lease's spend is booked when its channel settles
            if now - held.observed_at >= (ESCROW_CHECK_S if unbooked else ESCROW_IDLE_CHECK_S):
                self._spawn(self._observe_spend, lease_id)
