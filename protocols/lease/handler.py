"""``/clawnode/lease/1.0.0``, ``/clawnode/infer/1.2.0`` (and older) and ``/clawnode/lease-dispute/1.0.0``: the market
that joins both sides of a lease (and its disputes), mounts the protocols, dispatches each request to the
side that handles it, picks leases up after a restart and runs the timer."""

from __future__ import annotations

from typing import Any

import trio
from libp2p.peer.id import ID
from pydantic import BaseModel, ValidationError

from protocols import lease_wire as w
from protocols.lease.arbiter import DISPUTE_PROTOCOL, DisputeRole
from protocols.lease.base import (
    INFER_PROTOCOLS,
    LEASE_PROTOCOL,
    LEASE_READ_TIMEOUT_S,
    MAX_LEASE_FRAME,
    REQUESTS,
    SWEEP_INTERVAL_S,
    log,
)
from protocols.lease.consumer import ConsumerRole
from protocols.lease.provider import ProviderRole
from runtime.errors import ClawnodeError
from wire.rpc import serve_requests


class LeaseMarket(ProviderRole, ConsumerRole, DisputeRole):
    """Both sides of the lease market for one node; mount with ``await nursery.start(market.run)``."""

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._recover()
            handler = serve_requests(self._handle_lease, max_frame=MAX_LEASE_FRAME, read_timeout_s=LEASE_READ_TIMEOUT_S)
            self.host.set_stream_handler(LEASE_PROTOCOL, handler)
            for protocol in INFER_PROTOCOLS:  # 1.1.0 and 1.0.0: each signs the proof its consumer reads
                self.host.set_stream_handler(protocol, self._handle_call)
            self.host.set_stream_handler(DISPUTE_PROTOCOL, self.dispute_handler())
            nursery.start_soon(self._sweep)
            nursery.start_soon(self.resume_cases)  # dispute cases a restart interrupted
            nursery.start_soon(self.stale_freeze_sweep)  # escrows frozen with no case sent
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
                await self._restore_served(lease, grant_json, now)
                continue
            await self.ledger.end_lease(lease.lease_id, idempotency_key=f"end/{lease.lease_id}")
            if lease.escrow is None or await self.channels.of_lease(lease.lease_id) is not None:
                continue  # a channel lease is settled with its channel (recover_channels, the channel timer)
            try:
                if lease.role == "provider":
                    await self.ledger.enqueue_claim(lease.lease_id)
                else:
                    await self.ledger.enqueue_refund(lease.lease_id)
            except ClawnodeError as error:
                log.info("lease %s ended at restart with nothing to settle (%s)", lease.lease_id[:12], error.code)
        # Leases that ended before the restart but whose claim never got queued (a crash between the
        # two writes, or a full disk at the end): countersigned service is still paid.
        for lease_id in await self.ledger.unclaimed_leases():
            try:
                await self.ledger.enqueue_claim(lease_id)
                log.info("lease %s: its claim is queued at restart", lease_id[:12])
            except ClawnodeError as error:
                log.warning("lease %s: its claim could not be queued at restart (%s)", lease_id[:12], error.code)
        await self.recover_channels()
        self.wake_settlement()

    async def _handle_lease(self, frame: bytes, remote: ID) -> BaseModel:
        try:
            return await self._handle_lease_message(frame, remote)
        except (ClawnodeError, ValidationError) as error:
            self._failed("serve_lease", error)
            raise

    async def _handle_lease_message(self, frame: bytes, remote: ID) -> BaseModel:
        message = REQUESTS.validate_json(frame)
        peer = str(remote)
        if isinstance(message, w.QuoteRequest):
            return await self._quote(message, peer)
        if isinstance(message, w.OpenRequest):
            return await self._grant(message, peer)
        if isinstance(message, w.RevokeRequest):
            return await self._revoked_by_peer(message, peer)
        if isinstance(message, w.RenewRequest):
            return await self._renew(message, peer)
        return await self._countersign(message, peer)

    async def _revoked_by_peer(self, message: w.RevokeRequest, remote: str) -> w.Ack:
        """The other side ended a lease: our consumer of a lease we serve, or the provider of one we hold."""
        if message.lease_id in self.served:
            return await self._revoked_by_consumer(message, remote)
        return await self._revoked_by_provider(message, remote)

    async def revoke(self, lease_id: str) -> w.LeaseView:
        """End a lease from either side; the provider claims what was countersigned, the rest is refunded."""
        if lease_id in self.served and self.served[lease_id].ended_reason is None:
            return await self.revoke_served(lease_id)
        return await self.revoke_held(lease_id)

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL_S)
            now = self.clock()
            self._forget_used_quotes(now)
            self._forget_finished()
            if self._unsettled and not self._settling:
                self._spawn(self._retry_settlements)
            self._sweep_held(now)
            self._sweep_served(now)
            self.sweep_channels(now)
