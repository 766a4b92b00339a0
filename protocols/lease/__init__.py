"""``/clawnode/lease/1.0.0`` and ``/clawnode/infer/1.2.0`` (and ``1.1.0``, ``1.0.0``): the lease market's trio adapters.

Where the rules live: every decision that can refuse is a pure function or method in
``protocols.machines``, taking what the adapter fetched as plain data and answering with a typed
verdict; these modules only fetch, ask and act (streams, the ledger, the chain). The provider's rules
are ``protocols.machines.lease`` (``LeaseSession``: grant, reserve/authorize, metering, receipts,
countersignatures, pause, abandon, expiry, renewal; ``check_lock`` on the grant's escrow lock, through
the check both markets share in ``machines/escrow_lock.py``; ``check_countersignature``;
``quotes_to_forget``); the consumer's are ``protocols.machines.lease_consumer`` (``ConsumerLease``
and ``quote_verdict``, ``grant_verdict``, ``call_verdict``, ``end_frame_units``,
``countersign_verdict``, ``renew_verdict``, ``call_refused_event``, ``settled``).
``docs/architecture.md`` has the table: decision -> module -> function. Money lives in the ledger and
the escrow contract.

* ``base`` -- constants, the leases each side keeps (``ServedLease``, ``HeldLease``), retention, views;
* ``serving`` -- the provider's calls: reservation, the write-ahead meter, streaming, metering;
* ``provider`` -- quote, grant (the consumer's own escrow lock, read on chain), renewal, receipts
  pushed for countersignature, claims, the escrow reread under a served lease, the end;
* ``consumer`` -- quote and grant checked, lock, open, calls counted, countersignatures with a
  voucher, renewal, the end, the provider's claims booked as spend;
* ``handler`` -- :class:`LeaseMarket`, which joins both sides, dispatches each request, recovers
  after a restart and runs the timer;
* ``protocols.lease_wire`` -- the wire models.

Provider flow: quote -> verify the consumer's signed open, its wallet binding and its escrow lock
(the consumer's own wallet pays, enough, long enough, under an escrow id derived from its peer id)
-> signed grant with a fresh access token (only its sha256 is kept) -> serve calls that carry the
token, each holding a reservation of the budget while it runs and a durable pending row in the
ledger written before any of it leaves (a disk that refuses it refuses the call) -> push a signed
usage receipt every N units or T seconds and at the end -> claim from escrow what the consumer
countersigned with a valid voucher. A receipt left unsigned, or answered without a valid voucher,
pauses service; a consumer silent too long loses the lease; an escrow seen disputed or closed ends it.

Consumer flow: quote -> lock the budget under an escrow id derived from our peer id and a salt ->
open (wallet bound to the peer id) -> keep the token in memory only -> count each call's end frame
within what arrived -> countersign a receipt only for units counted -> when the lease ends, the rest
of the lock is refunded through the settlement queue.

Every exchange is one stream with one request and one reply (``wire.rpc``), so each side dials
the other when it has something to say: on the connection that already exists, which is what keeps a
node behind a NAT reachable by its provider.
"""

# What importers read. A value a test changes is patched in the module that reads it
# (``protocols.lease.provider.ESCROW_IDLE_CHECK_S``, ``protocols.lease.handler.LEASE_READ_TIMEOUT_S``,
# ``protocols.lease.consumer.write_frame``), and is not here, so a patch of this package fails loudly.
from protocols.lease.base import (
    ESCROW_CHECK_S,
    INFER_PROTOCOL,
    LEASE_PROTOCOL,
    MAX_CALL_FRAME,
    MAX_LEASE_FRAME,
    SWEEP_INTERVAL_S,
    HeldLease,
    ServedLease,
    token_digest,
)
from protocols.lease.handler import LeaseMarket

__all__ = [
    "ESCROW_CHECK_S",
    "INFER_PROTOCOL",
    "LEASE_PROTOCOL",
    "MAX_CALL_FRAME",
    "MAX_LEASE_FRAME",
    "SWEEP_INTERVAL_S",
    "HeldLease",
    "LeaseMarket",
    "ServedLease",
    "token_digest",
]
