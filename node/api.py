"""The local HTTP API (127.0.0.1 only), guarded by the bearer token in the data dir.

Replies never carry a secret or a local file path: the token is compared, never
echoed, and errors are ``{"error": {"code", "message", "type", "reason"}}`` with a stable code and,
where one applies, a stable machine-readable reason (null otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from dht.discovery import DescribeResult, DiscoveryQuery, ProviderResult
from dht.offers import Offer
from dht.records import CAPABILITY_NAME, CapabilityRecord
from node.alerts import AlertsReply
from node.anthropic_api import mount_anthropic
from node.dashboard import is_public as is_dashboard_file
from node.dashboard import mount_dashboard
from node.http_guard import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_DEPTH, HttpGuard, token_offered
from node.openai_api import (
    HTTP_STATUS,
    OpenAINode,
    error_type,
    mount_completions,
    mount_openai,
    param_of,
    retry_headers,
)
from node.responses_api import mount_responses
from node.task_api import TaskNode, mount_tasks
from protocols.lease_wire import MAX_DURATION_S, CallResult, LeaseView
from protocols.machines.payable import unpayable_summary
from runtime.errors import ClawnodeError, ErrorCode, clean_reason
from runtime.ledger.audit import AuditReport
from runtime.ledger.models import EscrowMismatches, Lease, QueueStats, ReceiptRecord, Settlement, Totals
from runtime.ledger.receipts import MAX_AMOUNT


class IdentityReply(BaseModel):
    peer_id: str
    role: str
    listen_addrs: list[str]
    api_url: str
    kad_protocol: str


class RelayReservationView(BaseModel):
    relay: str  # the relay's peer id
    expires_at: float  # unix time, as the relay said
    renewals: int
    addrs: list[str]  # <relay addr>/p2p/<relay id>/p2p-circuit


class HolePunchAttemptView(BaseModel):
    outcome: Literal["direct", "failed"]
    seconds: float
    finished_at: float  # unix time


class LayerLeaseView(BaseModel):
    """A layer lease this node serves (docs/split.md): its RPC server runs while ``serving``."""

    lease_id: str  # the first 12 characters
    consumer: str  # the peer id's last 8 characters
    state: str  # serving | idle | ended
    tunnels: int
    tokens: int  # tokens its layers ran, over the tunnels that ended
    bytes: int


class SplitSeatView(BaseModel):
    """One seller's part of a split model this node runs (docs/split.md): which layers it holds."""

    model: str
    peer: str  # the seller's peer id, last 8 characters
    lease_id: str  # the first 12 characters
    layers: str  # "0-9": the layers it holds
    tokens: int  # tokens its layers ran through our tunnel
    state: str  # loading | running | lost | closed


class HolePunchView(BaseModel):
    enabled: bool
    direct: int  # attempts that ended on a verified direct connection
    failed: int  # attempts after which only the relayed connection remained
    in_progress: int
    recent: list[HolePunchAttemptView] = Field(default_factory=list)


class UpnpMappingView(BaseModel):
    proto: Literal["TCP", "UDP"]
    internal_port: int
    external_port: int
    expires_at: float
    renewals: int


class UpnpView(BaseModel):
    state: str  # disabled | searching | no-igd | mapped | failed
    external_ip: str | None = None  # what the router reports as its external address
    # the router is itself behind another NAT (nat.double_nat): its mapping is not published
    double_nat: bool = False
    double_nat_reason: str | None = None  # igd_address_private | igd_address_differs | mapping_unreachable
    mappings: list[UpnpMappingView] = Field(default_factory=list)
    last_error: str | None = None  # a stable code, never a path or an address of ours


class StatusReply(BaseModel):
    peer_id: str
    role: str
    version: str
    listen_addrs: list[str]
    observed_addrs: list[str]
    connected_peers: int
    routing_table_size: int
    peer_book_size: int
    offers: int
    record_seq: int | None
    records_rejected: dict[str, int]
    uptime_s: float
    # Added with AutoNAT; defaults keep older replies readable.
    reachability: str = "unknown"  # public | private | unknown, as the capability record declares it
    reachability_reason: str = ""  # e.g. "autonat: 3/3 dial-backs", or "configured (node.reachability)"
    reachability_checked_at: float | None = None  # unix time of the last AutoNAT check
    autonat_server: bool = False  # this node answers /clawnode/autonat/1.0.0 now
    # Added with circuit relay v2 (nat/relay.py).
    relay_reservations: list[RelayReservationView] = Field(default_factory=list)  # relays holding one for us
    relayed_addrs: list[str] = Field(default_factory=list)  # in the capability record while private
    relay_hop_reservations: int | None = None  # relay role: reservations held for others now
    # Added with hole punching (nat/holepunch.py) and UPnP (nat/upnp.py).
    hole_punch: HolePunchView | None = None
    upnp: UpnpView | None = None
    reached_by: str = ""  # how others reach us: e.g. "direct (upnp)", "relay + hole punch", "direct"
    # Added with the chain reconciliation: escrows whose ledger rows the chain does not know (flagged,
    # no longer retried); None while no escrow chain is connected.
    escrow_mismatches: EscrowMismatches | None = None
    layer_leases: list[LayerLeaseView] | None = None  # with market.layer_servers > 0 (docs/split.md)
    split_models: list[SplitSeatView] | None = None  # with split.models (docs/split.md): placements


class PeerReply(BaseModel):
    peer_id: str
    addrs: list[str]
    connected: bool
    in_routing_table: bool
    connection: Literal["direct", "relayed"] | None = None  # how we are connected now (None: not connected)
    hole_punched: bool = False  # the direct connection came from a hole punch
    transport: Literal["tcp", "quic"] | None = None  # of the direct connection


class PeersReply(BaseModel):
    peers: list[PeerReply]


class CapabilitiesReply(BaseModel):
    offers: list[Offer]
    record: CapabilityRecord | None


class Unpayable(BaseModel):
    """A provider this node cannot pay (protocols/machines/payable.py): listed, never tried."""

    provider: ProviderResult
    reason: str = Field(description="other_chain | other_contract")
    message: str


class VerificationView(BaseModel):
    """This node's verification checks of one provider (docs/verified-inference.md)."""

    passed: int
    failed: int
    unverifiable: int
    last_reason: str = Field("", description="why the last failed check failed (logprob, not_sampled, ...)")
    standing: float = Field(description="0 after a failed check; else from 0.5 toward 1 with checks passed")


class VerificationReply(BaseModel):
    providers: dict[str, VerificationView] = Field(
        description="peer id -> this node's verification checks of that provider, most recently checked first"
    )


class DiscoverReply(BaseModel):
    providers: list[ProviderResult] = Field(description="the providers this node can pay, ranked")
    verification: dict[str, VerificationView] = Field(
        default_factory=dict, description="peer id -> this node's verification checks of that provider, if any"
    )
    unpayable: list[Unpayable] = Field(default_factory=list, description="providers on another chain or contract")
    note: str | None = Field(None, description="e.g. '3 providers on other chains'; null when none is left out")


class LeasesReply(BaseModel):
    leases: list[Lease]


class ReceiptsReply(BaseModel):
    receipts: list[ReceiptRecord]


class SettlementsReply(BaseModel):
    settlements: list[Settlement]


class MoneyTotals(BaseModel):
    income: int
    spend: int
    net: int


class EscrowStatus(BaseModel):
    """How this node reaches its escrow; never the RPC URL."""

    mode: str = Field(description="embedded | rpc | off")
    state: str = Field(description="off | connecting | connected | unavailable")
    chain_id: int | None = None
    contract: str | None = None
    wallet: str | None = Field(None, description="the node's escrow wallet address")


class LedgerSummaryReply(BaseModel):
    """Income, spend and net (wei) per UTC day and per counterparty, from settled money."""

    total: MoneyTotals
    by_day: list[Totals]
    by_peer: list[Totals]
    leases: int
    receipts: int
    settlement_queue: QueueStats
    escrow: EscrowStatus


class LedgerVerifyReply(AuditReport):
    """The audit chain recomputed from its first entry."""


class WalletReply(BaseModel):
    """The node's escrow wallet on its chain (never its key)."""

    address: str
    chain: str = Field(description="CAIP-2, e.g. eip155:31337")
    contract: str = Field(description="the escrow contract")
    balance: int = Field(description="wei in the wallet")
    escrow_credit: int = Field(description="wei the escrow holds for this wallet (claimed income), withdrawable")
    mode: str = Field(description="escrow.mode")
    stablecoin: str | None = Field(None, description="the ERC-20 the network's profile names (a dev chain: a mock)")
    stablecoin_balance: int | None = Field(None, description="its smallest units in the wallet")
    stablecoin_credit: int | None = Field(None, description="its smallest units the escrow holds for this wallet")


class NetworkReply(BaseModel):
    """Which chain and escrow this node pays on, and how it came to them (bootstrap/network.py)."""

    mode: str = Field(description="escrow.mode")
    state: str = Field(description="serving | joined | private | configured | starting | off")
    chain: str | None = Field(None, description="CAIP-2")
    contract: str | None = None
    arbiter: str | None = Field(None, description="the network's arbiter (mode auto)")
    arbiter_peer: str | None = Field(
        None, description="the peer id a task's arbiter is trusted under: escrow.arbiter_peer, else the profile's"
    )
    joined_through: str | None = Field(None, description="the peer whose profile this node joined")
    faucet: bool = Field(False, description="this node funds (or passes on funding for) joining wallets")
    rpc_url: str | None = Field(None, description="only while serving: this node's own dev chain endpoint")


class WithdrawBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str | None = Field(None, pattern=r"^0x[0-9a-fA-F]{40}$", description="default: the node's own wallet")
    token: str | None = Field(
        None, pattern=r"^0x[0-9a-fA-F]{40}$", description="an ERC-20's credit; default: the coin's"
    )


class WithdrawReply(BaseModel):
    amount: int = Field(description="wei (or the token's smallest units) moved out of the escrow")
    to: str
    tx_hash: str


class MismatchAckReply(BaseModel):
    """The operator acknowledged the flagged escrows: they stay flagged in the ledger, no longer alert."""

    acknowledged: int = Field(description="escrows acknowledged by this call")
    mismatches: EscrowMismatches = Field(description="what still counts as a mismatch (flagged since)")


class ErrorBody(BaseModel):
    code: ErrorCode
    message: str
    type: str = Field(description="the OpenAI error type, so OpenAI clients read our errors too")
    reason: str | None = Field(None, description="the stable machine-readable reason (e.g. paused, disk_full)")
    param: str | None = Field(None, description="the request field the error is about, as OpenAI names it")


class ErrorReply(BaseModel):
    error: ErrorBody


class NodeView(OpenAINode, TaskNode, Protocol):
    """What the API reads from the running node."""

    def identity(self) -> IdentityReply: ...

    def status(self) -> StatusReply: ...

    def peers(self) -> PeersReply: ...

    def capabilities(self) -> CapabilitiesReply: ...

    async def set_offer(self, offer: Offer) -> CapabilitiesReply: ...

    async def remove_offer(self, name: str) -> CapabilitiesReply: ...

    async def discover(self, query: DiscoveryQuery) -> list[ProviderResult]: ...

    async def discover_split(self, query: DiscoveryQuery) -> tuple[list[ProviderResult], list[Unpayable]]: ...

    async def describe(self, peer_id: str) -> DescribeResult: ...

    def verification_record(self, peer_id: str) -> VerificationView | None: ...

    def verification_records(self, limit: int) -> dict[str, VerificationView]: ...

    async def ledger_leases(self, limit: int, offset: int) -> LeasesReply: ...

    async def ledger_receipts(self, lease_id: str | None, limit: int, offset: int) -> ReceiptsReply: ...

    async def ledger_settlements(self, limit: int, offset: int) -> SettlementsReply: ...

    async def ledger_summary(self, since_day: str | None) -> LedgerSummaryReply: ...

    async def ledger_verify(self) -> LedgerVerifyReply: ...

    async def ack_escrow_mismatches(self) -> MismatchAckReply: ...

    async def wallet(self) -> WalletReply: ...

    def network_view(self) -> NetworkReply: ...

    async def withdraw(self, to: str | None, token: str | None = None) -> WithdrawReply: ...

    async def open_lease(self, body: OpenLeaseBody) -> LeaseView: ...

    def leases(self) -> list[LeaseView]: ...

    async def revoke_lease(self, lease_id: str) -> LeaseView: ...

    async def renew_lease(self, lease_id: str, duration_s: int) -> LeaseView: ...

    async def call_lease(self, lease_id: str, body: dict[str, Any]) -> CallResult: ...

    async def metrics(self) -> bytes: ...

    def alerts(self) -> AlertsReply: ...


class OpenLeaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    peer_id: str = Field(min_length=32, max_length=128)
    capability: str = Field(pattern=CAPABILITY_NAME)
    budget: int | None = Field(None, ge=1, le=MAX_AMOUNT, description="wei to lock; default: price x expected_units")
    duration_s: int = Field(3600, ge=1, le=MAX_DURATION_S)
    expected_units: int = Field(1000, ge=1, le=2**62)


class RenewLeaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    duration_s: int = Field(ge=1, le=MAX_DURATION_S, description="seconds to add to the expiry")


class LeaseListReply(BaseModel):
    leases: list[LeaseView]


def error_response(code: ErrorCode, message: str, reason: str | None = None) -> JSONResponse:
    body = ErrorReply(
        error=ErrorBody(
            code=code, message=message, type=error_type(code), reason=clean_reason(reason), param=param_of(message)
        )
    )
    reply = body.model_dump(mode="json")
    if reply["error"]["param"] is None:
        del reply["error"]["param"]  # only where a request field is at fault
    return JSONResponse(reply, status_code=HTTP_STATUS[code])


def _bearer_token_check(token: str) -> Callable[[Request], None]:
    expected = f"Bearer {token}".encode()

    def check(request: Request) -> None:
        if is_dashboard_file(request.method, request.url.path):
            return  # the dashboard's page and assets hold no data; its /api calls carry the token
        offered = {name.lower(): value for name, value in request.headers.raw}
        if not token_offered(offered, expected):
            raise ClawnodeError(ErrorCode.UNAUTHENTICATED, "missing or wrong bearer token")

    return check


# Every numeric query parameter is bounded: a value SQLite or the chain cannot hold is a 400, not a 500.
MAX_OFFSET = 1_000_000_000
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]


class DiscoverParams(DiscoveryQuery):
    """``GET /api/discover``'s query string: DiscoveryQuery with bounds on every number."""

    max_price: int | None = Field(None, ge=0, le=MAX_AMOUNT, description="highest price per unit, smallest asset unit")
    min_ctx: int | None = Field(None, ge=1, le=2**31, description="smallest context length in tokens")
    min_vram_gb: int | None = Field(None, ge=0, le=2**20)


class GuardedFastAPI(FastAPI):
    """FastAPI with a wrapper outside all of its own middleware, ServerErrorMiddleware included."""

    outermost: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        inner = super().build_middleware_stack()
        return inner if self.outermost is None else self.outermost(inner)


def create_app(
    node: NodeView,
    token: str,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
) -> FastAPI:
    """The API app; ``HttpGuard`` checks Host, token, body size and JSON depth before anything else."""
    app = GuardedFastAPI(
        title="clawnode",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(_bearer_token_check(token))],
    )
    app.outermost = partial(
        HttpGuard,
        token=token,
        is_public=is_dashboard_file,
        max_body_bytes=max_body_bytes,
        max_json_depth=max_json_depth,
    )

    @app.exception_handler(ClawnodeError)
    async def _known(_: Request, error: ClawnodeError) -> JSONResponse:
        reply = error_response(error.code, error.message, error.reason)
        reply.headers.update(retry_headers(error))  # a busy model: when to retry (429 Retry-After)
        return reply

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in error.errors())
        return error_response(ErrorCode.INVALID_ARGUMENT, f"invalid request: {fields}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = ErrorCode.NOT_FOUND if error.status_code == 404 else ErrorCode.INVALID_ARGUMENT
        return error_response(code, "no such endpoint" if error.status_code == 404 else str(error.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        return error_response(ErrorCode.INTERNAL, f"internal error ({type(error).__name__})")

    @app.get("/api/id")
    async def identity() -> IdentityReply:
        return node.identity()

    @app.get("/api/status")
    async def status() -> StatusReply:
        return node.status()

    @app.get("/api/peers")
    async def peers() -> PeersReply:
        return node.peers()

    @app.get("/api/capabilities")
    async def capabilities() -> CapabilitiesReply:
        return node.capabilities()

    @app.put("/api/offers/{name:path}")
    async def set_offer(name: str, offer: Offer) -> CapabilitiesReply:
        if offer.name != name:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the offer's name differs from the one in the path")
        return await node.set_offer(offer)

    @app.delete("/api/offers/{name:path}")
    async def remove_offer(name: str) -> CapabilitiesReply:
        return await node.remove_offer(name)

    @app.get("/api/discover")
    async def discover(query: Annotated[DiscoverParams, Query()]) -> DiscoverReply:
        found = await node.discover_split(DiscoveryQuery.model_validate(query.model_dump()))
        checks = {p.peer_id: view for p in found[0] if (view := node.verification_record(p.peer_id)) is not None}
        return DiscoverReply(
            providers=found[0],
            verification=checks,
            unpayable=found[1],
            note=unpayable_summary([item.reason for item in found[1]]),
        )

    @app.get("/api/describe/{peer_id}")
    async def describe(peer_id: str) -> DescribeResult:
        return await node.describe(peer_id)

    @app.get("/api/ledger/leases")
    async def ledger_leases(limit: Limit = 100, offset: Offset = 0) -> LeasesReply:
        return await node.ledger_leases(limit, offset)

    @app.get("/api/ledger/receipts")
    async def ledger_receipts(
        lease_id: Annotated[str | None, Query(max_length=128)] = None, limit: Limit = 100, offset: Offset = 0
    ) -> ReceiptsReply:
        return await node.ledger_receipts(lease_id, limit, offset)

    @app.get("/api/ledger/settlements")
    async def ledger_settlements(limit: Limit = 100, offset: Offset = 0) -> SettlementsReply:
        return await node.ledger_settlements(limit, offset)

    @app.get("/api/ledger/summary")
    async def ledger_summary(
        since: Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}-\d{2}$")] = None,
    ) -> LedgerSummaryReply:
        return await node.ledger_summary(since)

    @app.get("/api/ledger/verify")
    async def ledger_verify() -> LedgerVerifyReply:
        return await node.ledger_verify()

    @app.post("/api/ledger/mismatches/ack")
    async def ack_escrow_mismatches() -> MismatchAckReply:
        return await node.ack_escrow_mismatches()

    @app.get("/api/network")
    async def network() -> NetworkReply:
        return node.network_view()

    @app.get("/api/wallet")
    async def wallet() -> WalletReply:
        return await node.wallet()

    @app.post("/api/wallet/withdraw")
    async def withdraw(body: WithdrawBody) -> WithdrawReply:
        return await node.withdraw(body.to, body.token)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await node.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/api/verification")
    async def verification(limit: int = Query(100, ge=1, le=4096)) -> VerificationReply:
        return VerificationReply(providers=node.verification_records(limit))

    @app.get("/api/alerts")
    async def alerts() -> AlertsReply:
        return node.alerts()

    @app.post("/api/leases")
    async def open_lease(body: OpenLeaseBody) -> LeaseView:
        try:
            return await node.open_lease(body)
        except ValidationError:
            # The quote's price times expected_units left what a lease can hold (a uint256 of wei).
            raise ClawnodeError(
                ErrorCode.INVALID_ARGUMENT, "the lease's budget (price x expected_units) is out of range"
            ) from None

    @app.get("/api/leases")
    async def leases() -> LeaseListReply:
        return LeaseListReply(leases=node.leases())

    @app.delete("/api/leases/{lease_id}")
    async def revoke_lease(lease_id: str) -> LeaseView:
        return await node.revoke_lease(lease_id)

    @app.post("/api/leases/{lease_id}/renew")
    async def renew_lease(lease_id: str, body: RenewLeaseBody) -> LeaseView:
        return await node.renew_lease(lease_id, body.duration_s)

    @app.post("/api/leases/{lease_id}/call")
    async def call_lease(lease_id: str, body: dict[str, Any]) -> CallResult:
        return await node.call_lease(lease_id, body)

    mount_openai(app, node)
    mount_completions(app, node)
    mount_responses(app, node)
    mount_anthropic(app, node)
    mount_tasks(app, node)
    mount_dashboard(app)
    return app
