"""What both sides of the lease market share: the protocol's constants, the leases each side keeps,
the retention of finished ones, and the views the API shows.

:class:`LeaseCore` holds the state; the role mixins add what each side does (``serving``: the calls a
provider serves; ``provider``: quote, grant, receipts, claims, ending; ``consumer``: open, calls,
countersignatures, renewal, ending) and ``handler.LeaseMarket`` joins them and dispatches the
protocol's requests. Nothing here decides: the rules are in ``protocols.machines.lease`` (the
provider's) and ``protocols.machines.lease_consumer`` (the consumer's).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import PrivateKey
from libp2p.custom_types import TProtocol
from pydantic import TypeAdapter, ValidationError

from dht.offers import Offer
from protocols import lease_wire as w
from protocols.background import spawn_guarded
from protocols.escrow_claims import EscrowClaims
from protocols.lease.verifying import Verifying
from protocols.machines import left_calls
from protocols.machines.history import finished_to_evict
from protocols.machines.lease import FINISHED_KEEP, FINISHED_KEEP_S, USED_QUOTES_MAX, LeaseSession, quotes_to_forget
from protocols.machines.lease_calls import call_units_needed
from protocols.machines.lease_consumer import CONSUMER, ConsumerEvent, ConsumerLease
from protocols.settings import MarketSection
from runtime.errors import ClawnodeError, ErrorCode, Reason
from runtime.jsonsafe import loads_bounded
from runtime.ledger import EscrowRef, Ledger
from runtime.service import ServiceRegistry
from runtime.telemetry import LatencyHistogram
from runtime.verify.evidence import CallProof
from wire.framing import FrameReader
from wire.peer_keys import receipt_key

if TYPE_CHECKING:
    from runtime.escrow import EscrowClient

log = logging.getLogger("protocols.lease")

LEASE_PROTOCOL = TProtocol("/clawnode/lease/1.0.0")
# The call protocol, one id per commitment body version its consumer reads (``runtime.verify.evidence``),
# newest first: a consumer proposes both and multistream-select picks the first the provider serves, so
# an older provider answers on 1.0.0 as before. A provider serves both and signs, on each stream, the
# newest body its consumer reads (``Ticket.body_version``): v4 on 1.2.0, v3 on 1.1.0, v2 on 1.0.0, exactly
# what the release before each version signs, so an upgraded provider never hands an older consumer a
# proof it reads as none. A new body version needs a new protocol id here.
INFER_PROTOCOL = TProtocol("/clawnode/infer/1.2.0")  # its consumer reads v4 bodies (the signed request hash)
INFER_PROTOCOL_V3 = TProtocol("/clawnode/infer/1.1.0")  # consumers before v4 bodies; still served
INFER_PROTOCOL_V1 = TProtocol("/clawnode/infer/1.0.0")  # consumers before v3 bodies; still served
INFER_PROTOCOLS = (INFER_PROTOCOL, INFER_PROTOCOL_V3, INFER_PROTOCOL_V1)
BODY_VERSION_READ: dict[str, int] = {INFER_PROTOCOL: 4, INFER_PROTOCOL_V3: 3, INFER_PROTOCOL_V1: 2}
# The body version a provider that answered on each id signs at least (``body_version_owed``): every
# release that serves 1.2.0 signs v4, every one that serves 1.1.0 v3 (each id came with its version), so
# a lower one there is a provider leaving out what the consumer's dispute needs (a v3 body on 1.2.0
# binds no request: its substitute's prompt could not be refunded). On 1.0.0 releases before v2 sign v1.
BODY_VERSION_OWED: dict[str, int] = {protocol: read for protocol, read in BODY_VERSION_READ.items() if read >= 3}
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

REQUESTS: TypeAdapter[Any] = TypeAdapter(w.LeaseRequest)
QUOTE_REPLY = TypeAdapter(w.QuoteReply)
GRANT_REPLY = TypeAdapter(w.GrantReply)
ACK = TypeAdapter(w.Ack)
COUNTERSIGNED = TypeAdapter(w.Countersigned)
CALL_FRAMES: TypeAdapter[Any] = TypeAdapter(w.Chunk | w.CallEnd)

EscrowSource = Callable[[], "EscrowClient | None"]


def body_version_read(protocol: str | None) -> int:
    """The newest commitment body version a consumer reads, by the call protocol it negotiated
    (``BODY_VERSION_READ``); a stream without one (none negotiated) gets v2, which every release since
    v2 reads."""
    return BODY_VERSION_READ.get(str(protocol), 2)


def body_version_owed(protocol: str | None) -> int:
    """The lowest commitment body version a provider answering on ``protocol`` signs
    (``BODY_VERSION_OWED``; 1 on 1.0.0 and where none was negotiated)."""
    return BODY_VERSION_OWED.get(str(protocol), 1)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def granted_machine() -> ConsumerLease:
    """The consumer's machine of a lease whose grant checked out (post-paid: no lock before it)."""
    machine = ConsumerLease()
    machine.apply(ConsumerEvent.GRANT, CONSUMER)
    return machine


@dataclass
class Ticket:
    """One call's hold on its lease's budget, from authorisation until it is metered or released."""

    served: ServedLease | None = None
    reserved: int = 0
    streamed: int = 0  # tokens of the chunks written (``chunk_tokens``): what a cut call is billed
    prompt: int = 0  # prompt tokens the engine decoded (by the cut, for a cut call): billed with them
    call_id: str | None = None  # its pending row in the ledger (the write-ahead meter), once written
    # A call that failed after writing a reply it recorded: the signed proof its error frame carries.
    proof: CallProof | None = None
    # The newest commitment body version the consumer reads, by the stream's protocol (``body_version_read``).
    body_version: int = 2


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
    channel_base: int | None = None  # drawn on a payment channel (escrow.escrow_id): vouchers are base + amount
    # The model file its offer named when it was granted (the consumer's record of it too): its calls are
    # proved for that file whatever the offer says later (edited without it, withdrawn to drain the node),
    # since the consumer fails an end frame that owes a proof and carries none. "" after a restart: the
    # loaded file's (``restored``).
    sha256: str = ""
    # Restored from the ledger after a restart: the offer may have been edited or withdrawn since the
    # grant, so its calls are proved for the file this node loaded for the capability.
    restored: bool = False

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
    aborted_calls: int = 0  # calls left without the provider's end or error frame
    # Those calls' allowances while their bill may still come, and what was billed for the others.
    left: left_calls.LeftCalls = field(default_factory=left_calls.LeftCalls)
    ended_reason: str | None = None
    last_countersigned_seq: int = 0
    committed: int = 0  # wei: the newest voucher we signed
    booked: int = 0  # wei: what the escrow showed released to the provider, booked as spend
    observed_at: float = 0.0
    observing: bool = False
    channel_id: str | None = None  # drawn on this payment channel (0x escrow id) from channel_base
    channel_base: int = 0
    channel_amount: int = 0  # what the channel held when the lease drew on it
    # Its state, moved only by the consumer's machine (``protocols.machines.lease_consumer``).
    machine: ConsumerLease = field(default_factory=granted_machine)

    def apply(self, event: ConsumerEvent, actor: str = CONSUMER) -> None:
        self.machine.apply(event, actor)

    def count(self, now: float, units: int) -> None:
        """Count ``units`` of a call that ended with the provider's end or error frame."""
        self.seen_units += units
        self.left = left_calls.counted(self.left, now, units)

    def count_left(self, now: float, received: int, body: Any) -> int:
        """Count a call left without the provider's last frame: the ``received`` units that arrived,
        and its allowance until a receipt bills past it (``left_calls``); never more than the call could be
        reserved (``call_units_needed``): the chunks' ``tokens`` are the provider's word. Returns the units
        counted (what a failed check of the call takes back)."""
        received = min(received, call_units_needed(body))
        self.seen_units += received
        self.aborted_calls += 1
        self.left = left_calls.left(self.left, now, received, body)
        return received


class LeaseCore:
    """What both sides of the lease market share for one node: the leases, the chain, retention, views."""

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
        escrow_claims: EscrowClaims | None = None,
    ) -> None:
        self.host = host
        self.key = key
        self.receipt_key = receipt_key(key)  # the same key, as the ledger signs receipts with it
        self.peer_id = str(host.get_id())
        self.ledger = ledger
        self.settings = settings
        self.offers = offers
        self.services = services
        self.escrow = escrow
        self.escrow_terms = escrow_terms
        self.wake_settlement = wake_settlement
        self.clock = clock
        # The node's one claim table on escrow ids (shared with its task market: ``protocols.escrow_claims``).
        self.escrow_claims = escrow_claims if escrow_claims is not None else EscrowClaims()
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
        # Verified inference: the consumer's spot-checks and their outcomes per provider.
        self.verifying = Verifying()

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        spawn_guarded(self._nursery, log, fn, *args)

    # What one role asks of another (the roles are joined in ``handler.LeaseMarket``).
    async def _end_served(self, lease_id: str, reason: str, *, notify: bool = True) -> None:
        raise NotImplementedError  # provider

    async def _push_receipt(self, lease_id: str) -> bool:
        raise NotImplementedError  # provider

    async def _settle_unsettled(self, lease_id: str | None = None) -> None:
        raise NotImplementedError  # serving

    async def dispute_lease(self, lease_id: str, call_units: int) -> Any:
        raise NotImplementedError  # the dispute's roles (arbiter.DisputeRole)

    async def revoke_held(self, lease_id: str) -> w.LeaseView:
        raise NotImplementedError  # consumer

    def _failed(self, op: str, error: BaseException) -> None:
        if isinstance(error, ClawnodeError):
            code = error.code
        else:
            code = ErrorCode.INVALID_ARGUMENT if isinstance(error, ValidationError) else ErrorCode.INTERNAL
        self.failures[(op, code.value)] += 1

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

    # ================= views =================

    def _view_held(self, held: HeldLease) -> w.LeaseView:
        return lease_view(held.grant, "consumer", str(held.machine.state), held.seen_units)

    def _view_served(self, served: ServedLease) -> w.LeaseView:
        return lease_view(served.grant, "provider", str(served.session.state), served.session.units_metered)

    def leases(self) -> list[w.LeaseView]:
        """Live leases and those finished lately (``FINISHED_KEEP``, ``FINISHED_KEEP_S``); the ledger has all."""
        views = [self._view_served(s) for s in self.served.values()]
        views.extend(self._view_held(h) for h in self.held.values())
        return sorted(views, key=lambda view: view.lease_id)


async def stop_on_cancel(reader: FrameReader, scope: trio.CancelScope) -> None:
    """While a call streams, the consumer says nothing until the end frame: any frame it sends (a
    cancel), its hanging up or a reset stops the call."""
    with contextlib.suppress(Exception):
        await reader.read_frame(math.inf)
    scope.cancel()


def ended_error(why: str) -> ClawnodeError:
    """The refusal of a call on a lease that has ended (``why``: expired, abandoned, revoked by …)."""
    if why == "expired":
        return ClawnodeError(ErrorCode.EXPIRED, "the lease has ended (expired)", Reason.EXPIRED)
    return ClawnodeError(ErrorCode.CONFLICT, f"the lease has ended ({why})", Reason.ENDED)


def call_frame(raw: bytes) -> w.Chunk | w.CallEnd | None:
    """A chunk or an end frame; None for anything else (an error frame, something unreadable)."""
    try:
        frame: w.Chunk | w.CallEnd = CALL_FRAMES.validate_json(raw)
    except ValidationError:
        return _end_without_proof(raw)
    return frame


CALL_ERROR: TypeAdapter[w.CallError] = TypeAdapter(w.CallError)
_Proved = TypeVar("_Proved", w.CallEnd, w.CallError)  # the frames that carry a proof


def error_frame(raw: bytes) -> w.CallError | None:
    """A call's error frame as ``CallError`` reads it (its billed units, its proof); None for anything
    else. A proof that does not parse is read as none, as an end frame's is (``_end_without_proof``):
    a call drawn for a check then fails as ``no_proof``, and the frame's units still count."""
    try:
        return CALL_ERROR.validate_json(raw)
    except ValidationError:
        return _without_proof(raw, "error", w.CallError)


def error_frame_units(raw: bytes) -> int | None:
    """The units a call's error frame bills (``CallError.units``); None for a frame that names none (an
    older provider's) or is no error frame."""
    frame = error_frame(raw)
    return None if frame is None else frame.units


def _end_without_proof(raw: bytes) -> w.CallEnd | None:
    """An end frame whose verified-inference proof does not parse is an end frame without one: a call
    drawn for a check then fails as ``no_proof`` instead of being paid its chunks unchecked."""
    return _without_proof(raw, "end", w.CallEnd)


def _without_proof(raw: bytes, kind: str, model: type[_Proved]) -> _Proved | None:
    """A ``kind`` frame (``end``, ``error``) that did not parse as ``model`` read again with its proof
    (``verify``) stripped; None when it has none to strip or still does not parse."""
    try:
        data = loads_bounded(raw, what="a call frame")
        if isinstance(data, dict) and data.get("type") == kind and data.get("verify") is not None:
            return model.model_validate({**data, "verify": None})
    except (ValueError, ClawnodeError):  # pydantic's ValidationError is a ValueError
        pass
    return None


def lease_view(grant: w.LeaseGrant, role: str, state: str, units: int) -> w.LeaseView:
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
