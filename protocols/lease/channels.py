"""Payment channels, the adapter: both sides' channel work for the lease market (issue 20).

The consumer draws each lease with a provider on the pair's channel (``draw_channel``): it reads the
channel on chain, asks ``draw_verdict`` (draw, top up, open a new one, or a lock of the lease's own),
and acts, writing down before every chain action (the channel row before its lock; the lock journal
as every lock; ``channel_leases`` before the lease row). A lease's vouchers are ``base + amount``.
The provider checks a lease on a channel (``check_channel``: ``channel_lock_verdict``), and closes
an idle or ending channel with one ``settle`` of its highest voucher (``claim_verdict``). The
consumer stops drawing on an idle, ending or replaced channel (``close_verdict``) and queues its
refund: it lands at once when the provider closed the channel, else after deadline + window.
The rules are ``protocols/machines/channel.py``; storage is ``runtime/ledger/channels.py``.

One escrow, one use (the provider): every open naming an escrow, a lease's own lock or a channel, is
first checked to be the sender's (``lease_provider.escrow_bound_verdict``, pure: a stranger naming a buyer's
escrow is refused holding nothing), then claims its id in memory before any chain or ledger read
(``claim_escrow``, asking ``lease_provider.escrow_claim_verdict``), in the node's one claim table
(``protocols.escrow_claims``), which its task market's award check claims in too; the claim goes when
the check refuses, stays while the lease is served or the channel is open, and is rebuilt from the ledger
at restart (``_restore_served``, ``recover_channels``). Both checks then also ask the ledger
(``recorded_as``) for what ended before.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Literal

import trio
from libp2p.peer.id import ID

from protocols import lease_wire as w
from protocols.confirmed import confirmed_lock
from protocols.lease.base import DEADLINE_SLACK_S, LeaseCore, log
from protocols.machines import channel as ch
from protocols.machines.lease import LEASE_SALT_BYTES, lease_id_for
from protocols.machines.lease_consumer import arbiter_verdict
from protocols.machines.lease_provider import EscrowUse
from protocols.machines.verdict import enforce
from runtime.errors import ClawnodeError
from runtime.ledger.channels import Channel, ChannelLedger, escrow_recorded

if TYPE_CHECKING:
    from runtime.escrow import EscrowClient

# How often the sweep looks at channels to close (consumer) or claim (provider).
CHANNEL_CHECK_S = 5.0
# How long a lease waits for the one before it on the channel to end before it locks its own escrow.
CHANNEL_BUSY_WAIT_S = 5.0


class ChannelDraw:
    """Where a lease draws: the channel, its salt (the provider checks the binding) and the base."""

    def __init__(self, channel_id: str, salt: str, base: int, amount: int) -> None:
        self.channel_id = channel_id
        self.salt = salt
        self.base = base
        self.amount = amount


class ChannelRole(LeaseCore):
    """Channel state in memory: which lease draws on which channel now (one at a time), per side; and
    the provider's claims on the escrows it checks or serves on (one escrow, one use), in the node's one
    claim table (``self.escrow_claims``, shared with the task market)."""

    def claim_escrow(self, escrow_id: str, wanted_as: EscrowUse, holder: str) -> bool:
        """Claim the escrow an open names, before any read, or raise the refusal; False when a live
        channel already holds it (the claim is the channel's, kept when this lease's check fails)."""
        self.channels  # noqa: B018 - the channel state exists
        return self.escrow_claims.claim(escrow_id, wanted_as, holder, drawn=escrow_id in self._channel_served)

    async def recorded_as(self, escrow_id: str, use: Literal["lease", "channel"]) -> bool:
        """Whether the ledger holds this escrow, in any state, as a lease's own lock (a lease row under its
        id: the lease market's or a task's) or as a payment channel (the channel book)."""
        return await escrow_recorded(self.ledger, escrow_id, use)

    @property
    def channels(self) -> ChannelLedger:
        found: ChannelLedger | None = getattr(self, "_channel_ledger", None)
        if found is None:
            found = ChannelLedger(self.ledger)
            self._channel_ledger = found
            self._channel_drawn: dict[str, str] = {}  # consumer: channel -> lease drawing on it now
            self._channel_last: dict[str, str] = {}  # consumer: channel -> the lease drawn last
            self._channel_served: dict[str, str] = {}  # provider: channel -> lease we serve on it
            self._channel_locks: dict[str, trio.Lock] = {}
            self._channel_checked_at = 0.0
            self._channel_checking = False
            self.channels_opened = 0
            self.channel_draws = 0
            self.channel_top_ups = 0
        return found

    def channel_policy(self) -> ch.ChannelPolicy:
        s = self.settings
        return ch.ChannelPolicy(
            leases_per_lock=s.channel_leases_per_lock,
            duration_s=s.channel_duration_s,
            idle_close_s=s.channel_idle_close_s,
            claim_idle_s=s.channel_claim_idle_s,
            margin_s=s.channel_margin_s,
        )

    # -- the consumer --

    async def draw_channel(
        self, client: EscrowClient, terms: w.EscrowTerms, provider: str, lease_id: str, budget: int, duration_s: int
    ) -> ChannelDraw | None:
        """The channel ``lease_id`` draws on (opened, topped up or reused), or None: lock per lease."""
        book = self.channels
        async with self._channel_locks.setdefault(provider, trio.Lock()):
            found = await book.list(role="consumer", peer=provider, states=("channel_open",))
            newest = found[0] if found else None
            if newest is not None and newest.channel_id in self._channel_drawn:
                # The lease before is still ending (the router retires it after its last call): wait a
                # moment for it rather than lock a second escrow.
                with trio.move_on_after(CHANNEL_BUSY_WAIT_S):
                    while newest.channel_id in self._channel_drawn:
                        await trio.sleep(0.02)
                found = await book.list(role="consumer", peer=provider, states=("channel_open",))
                newest = found[0] if found else None  # read again: the lease before signed its last vouchers
            chain_now = await client.chain.run(client.chain.next_timestamp)
            view: ch.ChannelView | None = None
            if newest is not None:
                view = await self._channel_view(client, terms, newest)
                if view is None:  # gone, frozen or not for these terms on chain: no more leases on it
                    await self._close_channel(newest.channel_id, "not usable on chain")
            verdict = ch.draw_verdict(
                ch.DrawFacts(
                    channel=view,
                    budget=budget,
                    duration_s=duration_s,
                    chain_now=chain_now,
                    top_up_supported=hasattr(client, "top_up"),
                    policy=self.channel_policy(),
                )
            )
            if isinstance(verdict, ch.PerLease):
                log.info("lease %s locks its own escrow (%s)", lease_id[:12], verdict.reason)
                return None
            if isinstance(verdict, ch.OpenChannel):
                if newest is not None and view is not None:
                    await self._close_channel(newest.channel_id, verdict.reason)
                opened = await self._open_channel(client, terms, provider, verdict.amount, chain_now)
                channel_id, salt, base, amount = opened.channel_id, opened.salt or "", 0, opened.amount
            else:
                assert newest is not None and view is not None
                channel_id, salt, base, amount = newest.channel_id, newest.salt or "", verdict.base, view.amount
                if isinstance(verdict, ch.TopUp):
                    amount = await self._top_up(client, newest, verdict.amount, chain_now)
            # Before the lease row and before the open leaves: where this lease starts on the channel.
            await book.attach(lease_id, channel_id, base)
            self._channel_drawn[channel_id] = lease_id
            self._channel_last[channel_id] = lease_id
            self.channel_draws += 1
            return ChannelDraw(channel_id, salt, base, amount)

    async def _channel_view(self, client: EscrowClient, terms: w.EscrowTerms, row: Channel) -> ch.ChannelView | None:
        state = await client.chain.run(client.get, client.account.address, bytes.fromhex(row.channel_id[2:]))
        if (
            state.phase != "active"
            or state.payee.lower() != terms.payee.lower()
            or state.arbiter.lower() != terms.arbiter.lower()
            or state.window != terms.dispute_window_s
            or int(state.token, 16) != int(terms.token or "0x0", 16)  # a channel in another asset
        ):
            return None
        busy = row.channel_id in self._channel_drawn
        return ch.ChannelView(
            state=ch.ChannelState.BUSY if busy else ch.ChannelState.OPEN,
            amount=state.amount,
            committed=max(row.committed, state.released),
            deadline=state.deadline,
        )

    async def _open_channel(
        self, client: EscrowClient, terms: w.EscrowTerms, provider: str, amount: int, chain_now: int
    ) -> Channel:
        ours = self.escrow_terms()  # never a lock under an arbiter the provider picked
        enforce(arbiter_verdict(terms.arbiter, None if ours is None else ours.arbiter))
        salt = secrets.token_bytes(LEASE_SALT_BYTES)
        escrow_id = lease_id_for(self.host.get_id().to_bytes(), salt)
        channel_id = "0x" + escrow_id.hex()
        deadline = chain_now + self.settings.channel_duration_s + DEADLINE_SLACK_S
        # Written down before the lock is sent (and the lock journal writes it again): a crash from here on
        # finds the channel at restart and queues its refund.
        await self.channels.record(
            channel_id=channel_id,
            role="consumer",
            peer=provider,
            contract=client.address,
            payer=client.account.address,
            payee=terms.payee,
            salt=salt.hex(),
            amount=amount,
            deadline=deadline,
            window=terms.dispute_window_s,
            state="channel_opening",
        )
        try:
            await client.chain.run(
                lambda: client.lock(
                    escrow_id,
                    payee=terms.payee,
                    arbiter=terms.arbiter,
                    amount=amount,
                    deadline=deadline,
                    window=terms.dispute_window_s,
                    token=terms.token,
                )
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                # It may still land (no receipt in time): the refund finds it then; else it fails as not_found.
                await self.channels.enqueue_refund(channel_id)
                self.wake_settlement()
            raise
        self.channels_opened += 1
        log.info("payment channel %s opened with %s for %d wei", channel_id[:14], provider[:16], amount)
        return await self.channels.move(channel_id, "channel_open")

    async def _top_up(self, client: EscrowClient, row: Channel, add: int, chain_now: int) -> int:
        """Add ``add`` wei to the channel (the chain is the record: its refund returns whatever is locked)."""
        deadline = max(row.deadline, chain_now + self.settings.channel_duration_s + DEADLINE_SLACK_S)
        escrow_id = bytes.fromhex(row.channel_id[2:])
        top_up = client.top_up  # type: ignore[attr-defined]
        await client.chain.run(lambda: top_up(escrow_id, amount=add, deadline=deadline))
        state = await client.chain.run(client.get, client.account.address, escrow_id)
        await self.channels.move(row.channel_id, "channel_open", amount=state.amount, deadline=state.deadline)
        self.channel_top_ups += 1
        return state.amount

    async def _close_channel(self, channel_id: str, reason: str) -> None:
        """No new lease on it; its rest comes back (at once after the provider's close, else after the window)."""
        await self.channels.enqueue_refund(channel_id)
        self.wake_settlement()
        log.info("payment channel %s closes: %s", channel_id[:14], reason)

    def channel_returned(self, channel_id: str, lease_id: str) -> None:
        """The consumer's lease on the channel ended: the channel is free for the next one."""
        self.channels  # noqa: B018 - the state exists
        if self._channel_drawn.get(channel_id) == lease_id:
            del self._channel_drawn[channel_id]
            self._spawn(self.channels.touch, channel_id)

    def voucher_amount(self, channel_id: str, lease_id: str, base: int, amount: int, channel_amount: int) -> int:
        """The cumulative a voucher of a channel lease names, if the lease may still sign on the channel."""
        self.channels  # noqa: B018
        current = self._channel_last.get(channel_id) == lease_id
        enforce(ch.voucher_verdict(current=current, base=base, amount=amount, channel_amount=channel_amount))
        return base + amount

    # -- the provider --

    async def check_channel(
        self,
        client: EscrowClient,
        terms: w.EscrowTerms,
        opening: w.LeaseOpen,
        remote: str,
        wallet: str | None,
        wallet_bound: bool,
        duration_s: int,
    ) -> None:
        """Accept a lease on the consumer's channel, or raise the refusal; written down before the grant."""
        assert opening.lock is not None and opening.channel_base is not None
        book = self.channels
        channel_id = opening.lock.escrow_id
        escrow_id = bytes.fromhex(channel_id[2:])
        # Claimed before the first await: the escrow (a lease open naming it is refused) and the channel's
        # one lease at a time (another lease on it is refused ``channel_busy``). Only the channel's own
        # consumer gets here (``_check_payment`` asked ``escrow_bound_verdict`` first): a stranger naming a
        # buyer's idle channel can neither mark it busy through its reads nor touch its idle clock.
        claimed = self.claim_escrow(channel_id, "channel", channel_id)
        self._channel_served[channel_id] = opening.lease_id
        try:
            state = await confirmed_lock(client, opening.lock.payer, escrow_id)
            chain_now = await client.chain.run(client.chain.now)
            try:
                high_water = (await book.get(channel_id)).committed
            except ClawnodeError:
                high_water = 0
            lease_escrow = await self.recorded_as(channel_id, "lease")
            enforce(
                ch.channel_lock_verdict(
                    ch.ChannelLockFacts(
                        escrow_id=channel_id,
                        consumer=ID.from_base58(remote).to_bytes(),
                        salt=None if opening.salt is None else bytes.fromhex(opening.salt),
                        lock_payer=opening.lock.payer,
                        wallet=wallet,
                        wallet_bound=wallet_bound,
                        base=opening.channel_base,
                        high_water=high_water,
                        busy=False,
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
                        duration_s=duration_s,
                        margin_s=self.settings.channel_margin_s,
                        token=state.token,
                        quote_token=terms.token,
                        lease_escrow=lease_escrow,
                    )
                )
            )
            await book.record(
                channel_id=channel_id,
                role="provider",
                peer=remote,
                contract=client.address,
                payer=opening.lock.payer,
                payee=state.payee,
                salt=opening.salt,
                amount=state.amount,
                deadline=state.deadline,
                window=state.window,
                state="channel_open",
            )
            self.escrow_claims.kept(channel_id, channel_id)  # the channel is in the book: open until it closes
            await book.attach(opening.lease_id, channel_id, opening.channel_base)
        except BaseException:
            if claimed:
                self.escrow_claims.dropped(channel_id, channel_id, checking_only=True)
            self.channel_served_ended(channel_id, opening.lease_id)
            raise

    def channel_served_ended(self, channel_id: str, lease_id: str) -> None:
        self.channels  # noqa: B018
        if self._channel_served.get(channel_id) == lease_id:
            del self._channel_served[channel_id]
            self._spawn(self.channels.touch, channel_id)

    # -- both: restart and the timer --

    async def recover_channels(self) -> None:
        """After a restart: the consumer's channels take no new lease (queued for their refund: the drawn
        lease's token is gone, and the provider may still count it live); the provider's are claimed by the
        timer as usual, and a lease it still serves on one is restored by ``_restore_served``; each open channel
        holds its escrow claim again."""
        for row in await self.channels.list(role="consumer", states=("channel_opening", "channel_open")):
            await self._close_channel(row.channel_id, "restart")
        for row in await self.channels.list(role="provider", states=("channel_open",)):
            self.escrow_claims.restored(row.channel_id, "channel", row.channel_id)

    def sweep_channels(self, now: float) -> None:
        self.channels  # noqa: B018
        if self._channel_checking or now - self._channel_checked_at < CHANNEL_CHECK_S:
            return
        self._channel_checking = True
        self._spawn(self._channel_pass)

    async def _channel_pass(self) -> None:
        try:
            client = self.escrow()
            rows = await self.channels.list(states=("channel_open",))
            if client is None or not rows:
                return
            chain_now = await client.chain.run(client.chain.now)
            now = self.clock()
            policy = self.channel_policy()
            newest: dict[tuple[str, str], str] = {}
            for row in rows:  # newest first
                newest.setdefault((row.role, row.peer), row.channel_id)
            for row in rows:
                idle_s = now - row.last_used_at
                if row.role == "consumer":
                    drawn = row.channel_id in self._channel_drawn
                    verdict = ch.close_verdict(
                        ch.CloseFacts(
                            state=ch.ChannelState.BUSY if drawn else ch.ChannelState.OPEN,
                            amount=row.amount,
                            committed=row.committed,
                            deadline=row.deadline,
                            chain_now=chain_now,
                            idle_s=idle_s,
                            newer_channel=newest[(row.role, row.peer)] != row.channel_id,
                            policy=policy,
                        )
                    )
                    if verdict is not None:
                        await self._close_channel(row.channel_id, verdict.reason)
                    continue
                busy = row.channel_id in self._channel_served
                claim = ch.claim_verdict(
                    ch.ClaimFacts(
                        high_water=row.committed,
                        claimed=row.claimed,
                        busy=busy,
                        idle_s=idle_s,
                        deadline=row.deadline,
                        window=row.window,
                        chain_now=chain_now,
                        policy=policy,
                    )
                )
                if claim is not None or (not busy and row.committed == 0 and idle_s >= policy.claim_idle_s):
                    # The highest voucher and the rest back to the payer, in one settle: the channel closes.
                    await self.channels.enqueue_claim(row.channel_id, close=True)
                    self.escrow_claims.dropped(row.channel_id, row.channel_id)  # closing: the book keeps it
                    self.wake_settlement()
                    log.info("payment channel %s: closing (%s)", row.channel_id[:14], "claim" if claim else "unused")
        except ClawnodeError as error:
            log.info("channel pass skipped: %s", error.code)
        finally:
            self._channel_checking = False
            self._channel_checked_at = self.clock()
