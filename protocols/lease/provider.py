"""The provider's side of a lease: quote, grant (the consumer's signed open, its wallet binding and
its escrow lock read on chain), renewal, usage receipts pushed for countersignature (each checked for
the escrow payer's voucher), claims of what was countersigned, the escrow reread under a served
lease, and the end (final receipt, claim, notice to the consumer). The calls themselves are
``serving``. The rules: ``protocols.machines.lease`` (``LeaseSession``: metering rhythm, pause,
abandon, expiry; ``check_lock``, ``check_countersignature``, ``quotes_to_forget``)."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from libp2p.peer.id import ID

from dht.offers import Offer
from dht.records import wallet_binding_holds
from protocols import lease_wire as w
from protocols.confirmed import confirmed_lock
from protocols.lease.base import (
    ACK,
    CALL_READ_TIMEOUT_S,
    COUNTERSIGNED,
    ESCROW_CHECK_S,
    ESCROW_IDLE_CHECK_S,
    LEASE_PROTOCOL,
    MAX_LEASE_FRAME,
    PUSH_TIMEOUT_S,
    ServedLease,
    log,
    token_digest,
)
from protocols.lease.channels import ChannelRole
from protocols.lease.serving import ServingRole
from protocols.machines import lease_provider as rules
from protocols.machines.lease import (
    ASK_AGAIN,
    END_ABANDONED,
    END_FROZEN,
    EXPIRE,
    ISSUE_RECEIPT,
    PAUSE,
    LeaseSession,
    LeaseState,
    LockFacts,
    check_countersignature,
    check_lock,
)
from protocols.machines.lease import LeasePolicy as SessionPolicy
from protocols.machines.verdict import enforce
from runtime.errors import ClawnodeError, ErrorCode
from runtime.ledger import EscrowRef, LeaseOpen, SignedReceipt
from wire.rpc import request
from wire.signed import open_base64, seal, to_base64

if TYPE_CHECKING:
    from runtime.escrow import EscrowClient

T = TypeVar("T")

# How long a countersignature in hand waits for the escrow chain (connecting after a restart, or back
# from an outage) to check its voucher before it is dropped.
ESCROW_WAIT_S = 15.0


class ProviderRole(ServingRole, ChannelRole):
    def _offer(self, capability: str) -> Offer | None:
        return next((offer for offer in self.offers() if offer.name == capability), None)

    async def _quote(self, message: w.QuoteRequest, remote: str) -> w.QuoteReply:
        offer = self._offer(message.capability)
        terms = self.escrow_terms()
        trusted = remote in self.settings.trusted_peers
        ask = rules.QuoteAsk(
            capability=message.capability,
            offered=offer is not None,
            served=self.services.get(message.capability) is not None,
            duration_s=message.duration_s,
            max_lease_s=self.settings.max_lease_s,
            escrow_connected=terms is not None,
            trusted=trusted,
        )
        enforce(rules.quote_verdict(ask))
        assert offer is not None
        if terms is not None and offer.asset.startswith("erc20:"):
            from runtime.escrow.client import asset_token  # web3 is loaded once a chain is connected

            terms = terms.model_copy(update={"token": asset_token(offer.asset)})  # locked in the offer's token
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
        enforce(rules.open_signer_verdict(remote, str(signer)))
        opening = w.LeaseOpen.model_validate_json(payload)
        quote_signer, quote_payload = open_base64(opening.quote, domain=w.QUOTE_DOMAIN, payload_type=w.QUOTE_TYPE)
        quote = w.Quote.model_validate_json(quote_payload)
        now = int(self.clock())
        # Oldest first: what expired at the front goes at once (cheap); all of them when the set is full.
        while self._used_quotes and next(iter(self._used_quotes.values())) < now:
            del self._used_quotes[next(iter(self._used_quotes))]
        if len(self._used_quotes) >= self.used_quotes_max:
            self._forget_used_quotes(now)
        facts = rules.OpenFacts(
            sender=remote,
            me=self.peer_id,
            quote_signer=str(quote_signer),
            quote_consumer=quote.consumer,
            valid_until=quote.valid_until,
            now=now,
            quote_used=quote.quote_id in self._used_quotes,
            used_quotes_full=len(self._used_quotes) >= self.used_quotes_max,
            budget=opening.budget,
            price_per_unit=quote.price_per_unit,
        )
        enforce(rules.open_verdict(facts))
        escrow_ref = await self._check_payment(quote, opening, remote, now)
        channel_id = escrow_ref.escrow_id if escrow_ref is not None and opening.channel_base is not None else None
        try:
            reply = await self._granted(quote, opening, remote, now, escrow_ref)
        except BaseException:
            if channel_id is not None:
                self.channel_served_ended(channel_id, opening.lease_id)
            elif escrow_ref is not None:
                self.escrow_claims.dropped(escrow_ref.escrow_id, opening.lease_id, checking_only=True)
            raise
        if escrow_ref is not None and channel_id is None:
            self.escrow_claims.kept(escrow_ref.escrow_id, opening.lease_id)  # until the lease ends
        return reply

    async def _granted(
        self, quote: w.Quote, opening: w.LeaseOpen, remote: str, now: int, escrow_ref: EscrowRef | None
    ) -> w.GrantReply:
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
            grant,
            self._new_session(grant, now),
            escrow_ref,
            last_claim_at=self.clock(),
            escrow_checked_at=self.clock(),
            channel_base=opening.channel_base,
            sha256=getattr(self._offer(grant.capability), "sha256", "") or "",
        )
        log.info("lease %s granted to %s for %s", grant.lease_id[:12], remote[:16], grant.capability)
        envelope = seal(grant, self.key, domain=w.GRANT_DOMAIN, payload_type=w.GRANT_TYPE)
        return w.GrantReply(envelope=to_base64(envelope), token=token)

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
        terms, lock, client = quote.escrow, opening.lock, self.escrow()
        payment = rules.PaymentFacts(
            postpaid=opening.mode == "postpaid",
            quote_escrowed=terms is not None,
            trusted=remote in self.settings.trusted_peers,
            budget=opening.budget,
            postpaid_cap=quote.postpaid_cap,
            has_lock=lock is not None,
            # A lease on a payment channel has an id of its own: the channel's binding is checked instead.
            lease_id_is_escrow_id=lock is not None
            and (lock.escrow_id[2:] == opening.lease_id or opening.channel_base is not None),
            chain_connected=client is not None,
        )
        enforce(rules.payment_verdict(payment))
        if payment.postpaid:
            return None
        assert terms is not None and lock is not None and client is not None
        # The escrow must be the sender's (derived from its peer id and the open's salt) before it is claimed:
        # a stranger naming a buyer's lock it saw on chain would otherwise hold the claim through its chain
        # reads, and the buyer's own open (and its retries) would be refused ``escrow_in_use`` meanwhile.
        salt = None if opening.salt is None else bytes.fromhex(opening.salt)
        sender = ID.from_base58(remote).to_bytes()
        enforce(rules.escrow_bound_verdict(sender, salt, lock.escrow_id, channel=opening.channel_base is not None))
        if opening.channel_base is not None:
            wallet = opening.wallet
            await self.check_channel(
                client,
                terms,
                opening,
                remote,
                None if wallet is None else wallet.address,
                wallet is not None and wallet_binding_holds(wallet, remote),
                quote.duration_s,
            )
            return EscrowRef(contract=client.address, payer=lock.payer, escrow_id=lock.escrow_id)
        # Claimed before the first await: a channel open naming this escrow while we read is refused at
        # once (``escrow_claim_verdict``), as the ledger learns of this lease only when its row is written.
        self.claim_escrow(lock.escrow_id, "lease", opening.lease_id)
        try:
            await self._check_lock(client, terms, quote, opening, remote)
        except BaseException:
            self.escrow_claims.dropped(lock.escrow_id, opening.lease_id, checking_only=True)
            raise
        return EscrowRef(contract=client.address, payer=lock.payer, escrow_id=lock.escrow_id)

    async def _check_lock(
        self, client: EscrowClient, terms: w.EscrowTerms, quote: w.Quote, opening: w.LeaseOpen, remote: str
    ) -> None:
        """Read the lease's own lock on chain and ask ``check_lock``, with what our ledger knows of the escrow."""
        lock = opening.lock
        assert lock is not None
        state = await confirmed_lock(client, lock.payer, bytes.fromhex(lock.escrow_id[2:]))
        chain_now = await client.chain.run(client.chain.now)
        channel_escrow = await self.recorded_as(lock.escrow_id, "channel")
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
                token=state.token,
                quote_token=terms.token,
                channel_escrow=channel_escrow,
            )
        )

    def _served(self, lease_id: str, remote: str) -> ServedLease:
        served = self.served.get(lease_id)
        if served is None or served.grant.consumer != remote:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "no such lease with this peer")
        return served

    async def _renew(self, message: w.RenewRequest, remote: str) -> w.Ack:
        served = self._served(message.lease_id, remote)
        enforce(rules.renew_verdict(message.expires_at, int(self.clock()), self.settings.max_lease_s))
        if served.escrow is not None:
            client = self.escrow()
            deadline = None
            if client is not None:
                escrow_id = bytes.fromhex(served.escrow.escrow_id[2:])
                deadline = (await client.chain.run(client.get, served.escrow.payer, escrow_id)).deadline
            enforce(rules.renew_lock_verdict(client is not None, deadline, message.expires_at))
        served.session.renew(message.expires_at, "consumer")
        served.grant = served.grant.model_copy(update={"expires_at": message.expires_at})
        await self.ledger.update_grant(message.lease_id, served.grant.model_dump_json())
        return w.Ack(expires_at=message.expires_at)

    async def _push_receipt(self, lease_id: str) -> bool:
        """Sign a receipt for everything metered and get it countersigned; False if the consumer did not."""
        served = self.served.get(lease_id)
        if served is None:
            return False
        async with served.push_lock:
            receipt = await self.ledger.issue_receipt(lease_id, self.receipt_key)
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
                    COUNTERSIGNED,
                    timeout_s=PUSH_TIMEOUT_S,
                    max_frame=MAX_LEASE_FRAME,
                )
                signed = reply.receipt
                if signed.body != receipt.body or signed.provider_sig != receipt.provider_sig:
                    raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the consumer countersigned another receipt")
            except ClawnodeError as error:
                log.info("receipt %d of lease %s not countersigned: %s", receipt.body.seq, lease_id[:12], error.code)
                return False
            # The consumer has countersigned and counts this receipt as paid: it must reach the ledger
            # even when our caller stops waiting (the wind-down's push timeout), and its voucher waits
            # for an escrow chain that a just-restarted node is still connecting. Dropped, the claim
            # would miss what the consumer signed (the last receipt before a lease ends is never
            # superseded by a later one).
            with trio.CancelScope(shield=True):
                return await self._keep_countersigned(lease_id, served, signed)

    async def _keep_countersigned(self, lease_id: str, served: ServedLease, signed: SignedReceipt) -> bool:
        """Check a countersigned receipt's voucher and record it; False if it would not pay."""
        seq = signed.body.seq
        with trio.move_on_after(ESCROW_WAIT_S):
            while served.escrow is not None and self.escrow() is None:
                await trio.sleep(0.1)
        try:
            self._check_voucher(served, signed)
            await self.ledger.record_countersigned(signed)
        except ClawnodeError as error:
            # A countersignature that would not pay (no voucher, a forged one, a bad signature):
            # the lease serves nothing more until a valid one arrives.
            log.info("receipt %d of lease %s refused: %s", seq, lease_id[:12], error.code)
            if error.code in (ErrorCode.FORBIDDEN, ErrorCode.UNAUTHENTICATED):
                served.session.countersignature_refused(self.clock())
            return False
        served.session.countersigned(seq, self.clock())
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
                signed.body.amount + (served.channel_base or 0),  # a channel's vouchers are cumulative over it
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

    def _claim_if_due(self, lease_id: str, served: ServedLease) -> None:
        """Claim what was countersigned so far, every ``claim_every_s``: a long lease is paid as it goes."""
        now = self.clock()
        signed_seq = served.session.countersigned_seq
        if served.escrow is None or served.channel_base is not None or signed_seq <= served.claimed_seq:
            return  # a channel is claimed once, when it closes (protocols/lease/channels.py)
        if now - served.last_claim_at < self.settings.claim_every_s:
            return
        claimed_before = served.claimed_seq
        served.claimed_seq, served.last_claim_at = signed_seq, now

        async def claim() -> None:
            try:
                await self.ledger.enqueue_claim(lease_id)
            except ClawnodeError:
                served.claimed_seq = min(served.claimed_seq, claimed_before)  # the next sweep asks again
                raise
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
            if served.escrow is not None and served.channel_base is None:
                # The lease row stays: a channel naming this escrow is still refused (``recorded_as``).
                self.escrow_claims.dropped(served.escrow.escrow_id, lease_id)

    async def _wind_down_served(self, lease_id: str, served: ServedLease, reason: str, *, notify: bool) -> None:
        # New calls are refused from here; those under way are metered before the final receipt.
        with trio.move_on_after(CALL_READ_TIMEOUT_S):
            while served.in_flight:
                await trio.sleep(0.01)
        await self._settle_unsettled(lease_id)  # in the final receipt if the disk takes them now
        # The final receipt, while the consumer may still be there to countersign it.
        with trio.move_on_after(PUSH_TIMEOUT_S):
            await self._push_receipt(lease_id)
        try:
            await self._close_in_ledger(lease_id, served, retry=False)
        except ClawnodeError as error:
            if error.code != ErrorCode.UNAVAILABLE:
                raise
            # The disk refuses: the end and the claim wait for space in the background, so the peer
            # that revoked gets its answer now and countersigned service is still paid.
            self._spawn(self._close_in_ledger, lease_id, served)
        log.info("lease %s ended: %s", lease_id[:12], reason)
        if notify:
            with trio.move_on_after(PUSH_TIMEOUT_S):
                try:
                    await request(
                        self.host,
                        ID.from_base58(served.grant.consumer),
                        LEASE_PROTOCOL,
                        w.RevokeRequest(lease_id=lease_id, reason=reason),
                        ACK,
                        timeout_s=PUSH_TIMEOUT_S,
                    )
                except ClawnodeError:
                    pass

    async def _close_in_ledger(self, lease_id: str, served: ServedLease, *, retry: bool = True) -> None:
        """Record the lease's end and queue the claim of what was countersigned; with ``retry``, each
        write the full disk refuses is tried again until it lands."""

        async def write(step: Callable[[], Awaitable[T]]) -> T:
            return await (_until_the_disk_takes_it(step) if retry else step())

        await write(lambda: self.ledger.end_lease(lease_id, idempotency_key=f"end/{lease_id}"))
        if served.escrow is not None and served.channel_base is not None:
            self.channel_served_ended(served.escrow.escrow_id, lease_id)  # claimed when the channel closes
            return
        if served.escrow is None:
            return
        try:
            await write(lambda: self.ledger.enqueue_claim(lease_id))
        except ClawnodeError as error:
            if error.code == ErrorCode.UNAVAILABLE:
                raise
            log.info("lease %s ended with nothing to claim (%s)", lease_id[:12], error.code)
            return
        self.wake_settlement()

    async def _revoked_by_consumer(self, message: w.RevokeRequest, remote: str) -> w.Ack:
        served = self._served(message.lease_id, remote)
        if served.ended_reason is not None:
            return w.Ack()
        served.session.revoke("consumer")
        await self._end_served(message.lease_id, "revoked by the consumer", notify=False)
        return w.Ack()

    async def revoke_served(self, lease_id: str) -> w.LeaseView:
        """End a lease we provide: the final receipt, then the claim of what was countersigned."""
        served = self.served[lease_id]
        served.session.revoke("provider")
        view = self._view_served(served)
        await self._end_served(lease_id, "revoked by the provider")
        return view.model_copy(update={"state": LeaseState.ENDED.value})

    async def _restore_served(self, lease: Any, grant_json: str, now: int) -> None:
        """After a restart: a lease we provide whose grant was stored goes on from what the ledger kept."""
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
        served = ServedLease(grant, session, lease.escrow, last_claim_at=self.clock(), restored=True)
        drawn = await self.channels.of_lease(lease.lease_id)
        if drawn is not None:
            served.channel_base = drawn[1]
            self.channels  # noqa: B018 - the in-memory state exists
            self._channel_served[drawn[0]] = lease.lease_id
            self.escrow_claims.restored(drawn[0], "channel", drawn[0])
        elif lease.escrow is not None:
            self.escrow_claims.restored(lease.escrow.escrow_id, "lease", lease.lease_id)
        self.served[lease.lease_id] = served
        log.info("lease %s restored", lease.lease_id[:12])

    def _sweep_served(self, now: float) -> None:
        """The provider's timer step for every lease it serves: expiry, escrow rereads, claims, receipts."""
        for lease_id, served in list(self.served.items()):
            if served.ended_reason is not None:
                continue
            if served.session.state == LeaseState.ENDED:  # expired while authorizing a call
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
                elif action == PAUSE:
                    log.info("lease %s paused: a receipt waits for its countersignature", lease_id[:12])
                elif action in (END_ABANDONED, EXPIRE):
                    self._spawn(self._end_served, lease_id, "abandoned" if action == END_ABANDONED else "expired")


# A ledger write the full disk refuses at a lease's end is tried again this often at most, for as long
# as the node runs: a claim given up here would leave countersigned service unpaid (a restart finds
# what is left: ``LeaseMarket._recover``).
DISK_RETRY_MAX_S = 30.0


async def _until_the_disk_takes_it(write: Callable[[], Awaitable[T]]) -> T:
    """Run a ledger write again, with a capped backoff, while the disk refuses it (``E_UNAVAILABLE``)."""
    delay = min(1.0, DISK_RETRY_MAX_S)
    while True:
        try:
            return await write()
        except ClawnodeError as error:
            if error.code != ErrorCode.UNAVAILABLE:
                raise
        await trio.sleep(delay)
        delay = min(DISK_RETRY_MAX_S, delay * 2)
