"""The daemon: one nursery holding the libp2p host, the DHT, the local API and the settlement queue.

The ledger (``ledger.db`` in the data dir) is opened before anything else runs and closed after
everything stopped. The escrow chain is connected in the background (the embedded chain's deploy
and web3's imports take about a second; ``rpc`` chains may be down): until it is there, settlements
simply wait in the ledger, which is where they live anyway.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from bootstrap.defaults import DEFAULT_BOOTSTRAP_PEERS
from bootstrap.network import ChainTimeouts, NetworkService, join_network_chain, serve_network_chain
from bootstrap.peer_book import PeerBook
from dht.discovery import DescribeResult, Discovery, DiscoveryQuery, ProviderResult
from dht.offers import Offer
from dht.protocol_id import use_kad_protocol_id
from dht.publisher import CapabilityPublisher
from dht.record_validator import RECORD_NAMESPACE, CapabilityRecordValidator, RejectionCounter
from dht.records import Reachability, SandboxOffer, bind_wallet
from dht.seq_book import SeqBook
from dht.service import DhtService
from nat.addresses import DHT_CLIENT_BEFORE_VERDICT_S, is_relayed, listen_addrs, serves_dht, wants_relays
from nat.autonat import AutoNat, AutoNatSettings, listen_ports, quic_listen_ports
from nat.autonat_v2 import AutoNatV2, AutoNatV2Settings
from nat.double_nat import OutsideView
from nat.holepunch import HolePunchService, HolePunchSettings
from nat.reachability import ReachabilityState
from nat.relay import RelayService, RelaySettings
from nat.upnp import UpnpService, UpnpSettings
from node.alerts import AlertService, AlertsReply
from node.api import (
    CapabilitiesReply,
    EscrowStatus,
    HolePunchView,
    IdentityReply,
    LayerLeaseView,
    LeasesReply,
    LedgerSummaryReply,
    LedgerVerifyReply,
    MismatchAckReply,
    MoneyTotals,
    NetworkReply,
    OpenLeaseBody,
    PeerReply,
    PeersReply,
    ReceiptsReply,
    RelayReservationView,
    SettlementsReply,
    SplitSeatView,
    StatusReply,
    Unpayable,
    UpnpView,
    VerificationView,
    WalletReply,
    WithdrawReply,
    create_app,
)
from node.config import Config
from node.conn_budget import keep_in_routing_table, protect_connections
from node.conn_guard import ConnLimits
from node.datadir import (
    RunningNode,
    clear_running,
    ensure_data_dir,
    load_or_create_api_token,
    load_or_create_identity,
    load_or_create_wallet_key,
    publish_running,
)
from node.hardware import detect_hardware
from node.host import build_dialer_host, build_host, clawnode_version, ensure_tcp_ports_free, parse_multiaddrs
from node.http_guard import quiet_error_logger
from node.mdns import MdnsDiscovery, connect_found
from node.metrics import render_metrics
from node.offer_book import OFFER_BOOK_FILE, OfferBook
from node.router import Router, fetch_live_load
from protocols.background import Supervisor
from protocols.escrow_claims import EscrowClaims
from protocols.gossip import TaskAnnouncements
from protocols.lease import LeaseMarket
from protocols.lease.layers import (
    LayerSeller,
    layer_capacity_of,
    layer_offer_fields,
    market_billing,
    market_facts,
    register_layer_services,
)
from protocols.lease.split import SplitRunner
from protocols.lease.verifier import (
    REPORTS_PROTOCOL,
    RemoteVerifier,
    ReportPuller,
    discovery_verifiers,
    register_verifiers,
    reports_handler,
    verify_offer_fields,
)
from protocols.lease_wire import CallResult, EscrowTerms, LeaseView
from protocols.machines.payable import PaymentNetwork, ProviderTerms, caip2, payable_verdict, unpayable_summary
from protocols.machines.task import RiskLimits
from protocols.task import TaskMarket
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.models import ModelHost
from runtime.ledger import Ledger
from runtime.ledger.vocabulary import LeaseState
from runtime.sandbox import Limits, Sandboxes, SandboxPolicy, SandboxStats
from runtime.service import ServiceRegistry
from runtime.telemetry import LatencyHistogram
from wire.peer_keys import ed25519_public_key

if TYPE_CHECKING:
    # py-libp2p depends on trio-typing, whose stale trio-stubs hide trio's own TaskStatus from mypy.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

# How often a node that started on a full disk tries again to write its running card.
RUNNING_CARD_RETRY_S = 5.0

LEDGER_FILE = "ledger.db"
ESCROW_RETRY_MAX_S = 60.0
# A joined network chain that stays unreachable (or turns into another chain) this long is given up
# and the network joined again: its bootstrap restarted, with a fresh development chain.
REJOIN_AFTER_S = 30.0
# What connecting an escrow imports (web3, eth_account: ~0.5 CPU-s); loaded in a worker thread so the
# trio loop keeps answering meanwhile, and never by a start that connects no escrow.
ESCROW_MODULES = ("eth_account", "runtime.escrow.settings", "runtime.escrow.chain", "runtime.escrow.client")
LIVE_LEASE_STATES = frozenset({LeaseState.QUOTED, LeaseState.ACTIVE, LeaseState.PAUSED})


EscrowConnector = Callable[[bytes], Any]


def _import_escrow_modules() -> None:
    for name in ESCROW_MODULES:
        importlib.import_module(name)


class Node:
    """One clawnode: start it with ``await nursery.start(node.run)``.

    ``escrow_connector`` (blocking, called on a worker thread with the wallet key) replaces the
    configured chain: in-process tests give several nodes one shared embedded chain this way.
    """

    def __init__(
        self,
        config: Config,
        data_dir: Path,
        *,
        services: ServiceRegistry | None = None,
        escrow_connector: EscrowConnector | None = None,
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.services = services or ServiceRegistry()
        # A model named in split.models runs over leased layers (docs/split.md), never loaded whole here.
        self.model_host = ModelHost([m for m in config.models if m.name not in config.split.models])
        self._escrow_connector = escrow_connector
        self.escrow_client: Any = None  # a runtime.escrow.EscrowClient once the chain is there
        self._market: LeaseMarket | None = None
        self.layers: LayerSeller | None = None  # /clawnode/layers/1.0.0 with market.layer_servers (docs/split.md)
        self._router: Router | None = None
        self._announcements: TaskAnnouncements | None = None
        self._tasks: TaskMarket | None = None
        box = config.sandbox
        self.sandbox = Sandboxes(
            SandboxPolicy(
                kinds=frozenset(box.kinds),
                auto_run=box.auto_run,
                auto_arbitrate=box.auto_arbitrate,
                cap=Limits(
                    fuel=box.max_fuel,
                    memory_bytes=box.max_memory_mb * 1024 * 1024,
                    wall_s=box.max_wall_s,
                    output_bytes=box.max_output_bytes,
                ),
                max_module_bytes=box.max_module_bytes,
                concurrency=box.concurrency,
            )
        )
        self.started_at = time.monotonic()
        self.api_url = ""
        self._host: IHost | None = None
        self._dht: DhtService | None = None
        self._publisher: CapabilityPublisher | None = None
        self._discovery: Discovery | None = None
        self.reachability = ReachabilityState()  # measured by AutoNAT; see effective_reachability()
        self._autonat: AutoNat | None = None
        self._relay: RelayService | None = None
        self._holepunch: HolePunchService | None = None
        self._upnp: UpnpService | None = None
        self.rejections = RejectionCounter()
        self.seq_book = SeqBook.in_data_dir(data_dir)  # the newest record seen per peer (replays refused)
        # Every service below runs supervised: one that fails is restarted, the node keeps running.
        self.supervisor = Supervisor()
        self.offer_book = OfferBook(data_dir / OFFER_BOOK_FILE)
        self._ledger: Ledger | None = None
        self.escrow_status = EscrowStatus(mode=config.escrow.mode, state="off")
        # "no_escrow_contract" / "wrong_chain" while the configured address holds no escrow (metrics, alert).
        self.escrow_problem: str | None = None
        self.settlement_queue: Any = None  # a runtime.settlement.SettlementQueue once the chain is there
        self.network: NetworkService | None = None  # /clawnode/network/1.1.0, once running
        self._unpayable_notes: dict[str, str] = {}  # capability -> "3 providers on other chains"
        self.rejoin_after_s = REJOIN_AFTER_S
        self.reconciler: Any = None  # a runtime.settlement.reconcile.Reconciler once the chain is there
        self._arbiter = ""
        self.dht_lookup_s = LatencyHistogram()
        rules = config.alerts.rules
        self.alerting = AlertService(
            self.metrics,
            interval_s=config.alerts.interval_s,
            rules_path=(data_dir / rules) if rules else None,  # relative to the data dir; absolute as is
        )

    @property
    def host(self) -> IHost:
        if self._host is None:
            raise RuntimeError("the node is not running")
        return self._host

    @property
    def dht(self) -> DhtService:
        if self._dht is None:
            raise RuntimeError("the node is not running")
        return self._dht

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise RuntimeError("the node is not running")
        return self._ledger

    @property
    def market(self) -> LeaseMarket:
        if self._market is None:
            raise RuntimeError("the node is not running")
        return self._market

    @property
    def announcements(self) -> TaskAnnouncements:
        if self._announcements is None:
            raise RuntimeError("the node is not running")
        return self._announcements

    @property
    def tasks(self) -> TaskMarket:
        if self._tasks is None:
            raise RuntimeError("the node is not running")
        return self._tasks

    @property
    def sandbox_stats(self) -> SandboxStats:
        return self.sandbox.stats

    def _sandbox_offer(self) -> SandboxOffer | None:
        """What the record says of the sandboxed task kinds this node runs ([sandbox])."""
        box = self.config.sandbox
        kinds = sorted(set(box.kinds) & {"wasm", "native"})
        if "inference" in box.kinds and self.config.models:  # prompt batches need a served model
            kinds.append("inference")
        if not kinds or not box.auto_run:
            return None
        return SandboxOffer(
            kinds=kinds,  # type: ignore[arg-type]
            max_fuel=box.max_fuel,
            max_memory_mb=box.max_memory_mb,
            max_wall_s=max(1, int(box.max_wall_s)),
            max_output_bytes=box.max_output_bytes,
            max_module_bytes=box.max_module_bytes,
        )

    @property
    def router(self) -> Router:
        if self._router is None:
            raise RuntimeError("the node is not running")
        return self._router

    def local_models(self) -> list[str]:
        """The models this node answers itself: those it serves, and those it runs split (split.models)."""
        served = [name.removeprefix("model:") for name in self.services.names() if name.startswith("model:")]
        return served + [name for name in self.config.split.models if name not in served]

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        """Embeddings from the first model this node serves (consensus compares answers with them)."""
        model = self.model_host.get(self.config.models[0].name)
        if model is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "no local model is loaded for embeddings")
        return await model.embed(texts)

    async def _provider_rtt(self, peer: str) -> float:
        started = time.monotonic()
        await self.describe(peer)
        return time.monotonic() - started

    @property
    def publisher(self) -> CapabilityPublisher:
        if self._publisher is None:
            raise RuntimeError("the node is not running")
        return self._publisher

    @property
    def discovery(self) -> Discovery:
        if self._discovery is None:
            raise RuntimeError("the node is not running")
        return self._discovery

    def _keeps_connection(self, peer_id: ID) -> bool:
        """The connection budget never closes the connection to a peer we hold a live lease with, a relay
        holding our reservation, or a peer reached by a hole punch (``node.conn_budget``)."""
        text = str(peer_id)
        if self._relay is not None and text in self._relay.reservations:
            return True
        if self._holepunch is not None and self._holepunch.punched(peer_id):
            return True
        if self._market is None:
            return False
        return any(
            text in (view.provider, view.consumer) and view.state in LIVE_LEASE_STATES for view in self._market.leases()
        )

    def bootstrap_addrs(self) -> list[str]:
        addrs = list(self.config.bootstrap.peers)
        if self.config.bootstrap.use_defaults:
            addrs.extend(DEFAULT_BOOTSTRAP_PEERS)
        return addrs

    async def run(self, *, task_status: TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        use_kad_protocol_id(self.config.dht.protocol_id)
        key_pair, token, wallet_key = await trio.to_thread.run_sync(self._load_secrets)
        self._ledger = await Ledger.open(self.data_dir / LEDGER_FILE, peer_keys=ed25519_public_key)
        try:
            try:
                await self._load_models()
                await self._run_with_ledger(key_pair, token, wallet_key, task_status=task_status)
            finally:
                with trio.CancelScope(shield=True):
                    self.model_host.unregister(self.services)
                    await self.model_host.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await self._ledger.aclose()

    async def _run_with_ledger(
        self, key_pair: KeyPair, token: str, wallet_key: bytes, *, task_status: TaskStatus[Node]
    ) -> None:
        peer_book = PeerBook.in_data_dir(self.data_dir)
        await peer_book.load()
        await self.offer_book.load()
        await self.seq_book.load()
        listen_addrs = parse_multiaddrs(self.config.node.listen)
        ensure_tcp_ports_free(listen_addrs)
        self._host = build_host(
            key_pair,
            max_connections=self.config.node.max_connections,
            connection_budget=min(self.config.node.connection_budget, self.config.node.max_connections) or None,
            conn_limits=ConnLimits.of(self.config.node),
            listen_addrs=listen_addrs,
            extra_addrs=self._external_addrs,
        )
        try:
            async with self._host.run(listen_addrs):
                async with trio.open_nursery() as nursery:
                    # Before the DHT dials anyone, so pubsub sees every connection as it opens.
                    self._announcements = TaskAnnouncements(self._host)
                    await nursery.start(self.supervisor.run, "announcements", self._announcements.run)
                    # escrow.mode auto: the network's chain is served or learnt over /clawnode/network/1.1.0.
                    auto = self.config.escrow.mode == "auto" and self._escrow_connector is None
                    self.network = NetworkService(self._host, preparing=auto)
                    await nursery.start(self.supervisor.run, "network", self.network.run)
                    self._dht = DhtService(
                        self._host,
                        bootstrap_addrs=self.bootstrap_addrs(),
                        peer_book=peer_book,
                        refresh_interval_s=self.config.dht.refresh_interval_s,
                        dial_timeout_s=self.config.dht.dial_timeout_s,
                        server_mode=self._serves_dht(),
                    )
                    self._dht.add_validator(
                        RECORD_NAMESPACE,
                        CapabilityRecordValidator(
                            self.rejections, held_value=self._dht.held_value, seq_book=self.seq_book
                        ),
                    )
                    keep_in_routing_table(self._host, self._dht)
                    protect_connections(self._host, self._keeps_connection)
                    await nursery.start(self.supervisor.run, "dht", self._dht.run)
                    if self.config.node.mdns:
                        mdns = MdnsDiscovery(
                            self._host.get_id(),
                            lambda: self.listen_addrs() if self._host else [],
                            connect_found(self._host),
                        )
                        await nursery.start(self.supervisor.run, "mdns", mdns.run)
                    nursery.start_soon(self._serve_dht_after_grace)
                    self._publisher = CapabilityPublisher(
                        self._host,
                        self._dht,
                        key_pair.private_key,
                        wallet=bind_wallet(wallet_key, str(self._host.get_id())),
                        hardware=detect_hardware(self.config.hardware),
                        offers=self._advertised_offers(),
                        record_ttl_s=self.config.capabilities.record_ttl_s,
                        reachability=self.effective_reachability,
                        extra_addrs=self.relayed_addrs,
                        addrs_pending=lambda: self._wants_relays() and not self.relayed_addrs(),
                        sandbox=self._sandbox_offer(),
                        load=self.model_host.load,
                    )
                    await nursery.start(self.supervisor.run, "publisher", self._publisher.run)
                    # AutoNAT v2, which js and go nodes speak, beside ours: served whenever ours is.
                    # Its own check loop stays off (check_interval_s=0): ours asks the servers that
                    # speak only v2 through it, and their answers count in the node's verdict.
                    nat = self.config.nat
                    autonat_v2 = AutoNatV2(
                        self._host,
                        AutoNatV2Settings(
                            allow_private=nat.autonat_allow_private,
                            min_servers=nat.autonat_min_servers,
                            distinct_by=nat.autonat_distinct_by,
                            max_running=nat.autonat_max_concurrent,
                            peer_interval_s=nat.autonat_peer_interval_s,
                            check_interval_s=0,
                        ),
                        build_dialer=build_dialer_host,
                        should_serve=lambda: self._autonat is not None and self._autonat.serving,
                    )
                    await nursery.start(self.supervisor.run, "autonat_v2", autonat_v2.run)
                    self._autonat = AutoNat(
                        self._host,
                        self._autonat_settings(),
                        state=self.reachability,
                        serves_by_role=self.config.node.role in ("relay", "bootstrap"),
                        build_dialer=build_dialer_host,
                        v2=autonat_v2,
                    )
                    # A new measured verdict is a change of the record: republish at once.
                    self.reachability.on_change(self._reachability_changed)
                    await nursery.start(self.supervisor.run, "autonat", self._autonat.run)
                    self._upnp = UpnpService(
                        UpnpSettings(enabled=self._wants_upnp(listen_addrs), lease_s=self.config.nat.upnp_lease_s),
                        ports=lambda: listen_ports([str(a) for a in self.host.get_transport_addrs()]),
                        quic_ports=lambda: quic_listen_ports([str(a) for a in self.host.get_transport_addrs()]),
                        on_change=self._upnp_changed,
                        outside=self._outside_view,
                    )
                    await nursery.start(self.supervisor.run, "upnp", self._upnp.run)
                    self._holepunch = HolePunchService(
                        self._host, HolePunchSettings(enabled=self.config.nat.hole_punch)
                    )
                    await nursery.start(self.supervisor.run, "holepunch", self._holepunch.run)
                    # Circuit relay v2: the hop service on a relay; reservations while private.
                    self._relay = RelayService(
                        self._host,
                        self._relay_settings(),
                        serve_hop=self.config.node.role == "relay",
                        wants_reservations=self._wants_relays,
                        on_change=self._relays_changed,
                        on_relayed_dial=self._holepunch.relayed_dial,
                    )
                    await nursery.start(self.supervisor.run, "relay", self._relay.run)
                    if self.config.node.reachability == "private":
                        self._reachability_changed()  # configured private: a DHT client from the start
                    self._discovery = Discovery(
                        self._host,
                        self._dht,
                        self.rejections,
                        lambda: self.publisher.record,
                        cache_ttl_s=self.config.capabilities.cache_ttl_s,
                        seq_book=self.seq_book,
                    )
                    # One claim table on escrow ids for both markets: a task award and a lease open naming
                    # one escrow at the same moment must see each other's check (protocols.escrow_claims).
                    escrow_claims = EscrowClaims()
                    self._market = LeaseMarket(
                        self._host,
                        key_pair.private_key,
                        self.ledger,
                        self.config.market,
                        offers=lambda: self.publisher.offers,
                        services=self.services,
                        escrow=lambda: self.escrow_client,
                        escrow_terms=self._escrow_terms,
                        wake_settlement=self._wake_settlement,
                        escrow_claims=escrow_claims,
                    )
                    self._market.verifying.local_model = self._model_by_sha256
                    self._market.verifying.advertised = self._advertised_sha256
                    await self._market.verifying.attach(self.ledger)
                    self._market.verifying.sample_rate = self.config.verify.sample_rate
                    self._market.verifying.second_opinion_rate = self.config.verify.second_opinion_rate
                    self._market.verifying.positions = self.config.verify.positions
                    self._market.verifying.remote = RemoteVerifier(
                        self._market, discovery_verifiers(self.discover), self_id=str(self._host.get_id())
                    )
                    self._market.verifying.share_reports(self._market.receipt_key, self.config.verify.report_weight)
                    self._host.set_stream_handler(REPORTS_PROTOCOL, reports_handler(self._market.verifying))
                    self._market.verifying.pull_reports = ReportPuller(self._market, self._market.verifying)
                    # Asked at each use: the network profile arrives after start and changes with a fresh chain.
                    self._market.arbiter_peer_source = self._lease_arbiter_peer
                    await nursery.start(self.supervisor.run, "market", self._market.run)
                    if self.config.market.layer_servers:
                        self.layers = LayerSeller(
                            self._host,
                            facts=market_facts(self._market),
                            bill=market_billing(self._market),
                            max_servers=self.config.market.layer_servers,
                            # ggml-rpc's tensor cache, a folder per consumer (docs/split.md)
                            cache_root=self.data_dir / "layer-cache",
                        )
                        self.layers.mount()
                    self._router = Router(
                        self._market,
                        self.services,
                        self.discover,
                        self.config.router,
                        fetch_rtt=self._provider_rtt,
                        fetch_load=partial(fetch_live_load, self.host),
                        embed=self._embed if self.config.models else None,
                        unpayable_note=self._unpayable_notes.get,
                    )
                    await nursery.start(self.supervisor.run, "router", self._router.run)
                    if self.config.split.models:
                        self._router.split = SplitRunner(
                            self._host,
                            self._market,
                            self.discover,
                            [],
                            specs=[m for m in self.config.models if m.name in self.config.split.models],
                            sellers=self.config.split.sellers,
                            prefer=self.config.split.prefer,
                            max_tries=self.config.split.max_tries,
                            lease_units=self.config.router.lease_units,
                            lease_duration_s=self.config.router.lease_duration_s,
                            stall_s=self.config.router.stall_timeout_s,
                        )
                        await nursery.start(self.supervisor.run, "split", self._router.split.run)
                    self._tasks = TaskMarket(
                        self._host,
                        key_pair.private_key,
                        self.ledger,
                        announcements=self._announcements,
                        limits=RiskLimits(dispute_window_s=self.config.escrow.dispute_window_s),
                        escrow=lambda: self.escrow_client,
                        wake_settlement=self._wake_settlement,
                        locate=self.dht.find_peer_addrs,
                        sandbox=self.sandbox,
                        models=self.model_host,
                        arbiter=self._task_arbiter,
                        escrow_terms=self._escrow_terms,  # a seller takes awards under our arbiter only
                        trusted_arbiters=self.config.escrow.trusted_arbiter_pairs(),  # ... or panels it trusts
                        escrow_claims=escrow_claims,
                    )
                    await nursery.start(self.supervisor.run, "tasks", self._tasks.run)
                    await nursery.start(self.supervisor.run, "api", partial(self._serve_api, token))
                    settlement = partial(self._run_settlement, wallet_key)
                    nursery.start_soon(partial(self.supervisor.run, "settlement", settlement, reports_ready=False))
                    await nursery.start(self.supervisor.run, "seq_book", self.seq_book.run)
                    await nursery.start(self.supervisor.run, "alerts", self.alerting.run)
                    if not await trio.to_thread.run_sync(publish_running, self.data_dir, self._running_card()):
                        # Started on a full disk: the old card would name a dead process and port, and
                        # every CLI command would lose this node; keep trying until space returns.
                        nursery.start_soon(self._publish_running_when_possible)
                    self.started_at = time.monotonic()
                    log.info(
                        "clawnode %s running as %s, peer id %s, API %s",
                        clawnode_version(),
                        self.config.node.role,
                        self._host.get_id(),
                        self.api_url,
                    )
                    task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                if self.layers is not None:
                    await self.layers.aclose()  # its layer servers end with the node
                await trio.to_thread.run_sync(clear_running, self.data_dir)

    async def _publish_running_when_possible(self) -> None:
        while not await trio.to_thread.run_sync(publish_running, self.data_dir, self._running_card()):
            await trio.sleep(RUNNING_CARD_RETRY_S)

    def _autonat_settings(self) -> AutoNatSettings:
        nat = self.config.nat
        return AutoNatSettings(
            min_servers=nat.autonat_min_servers,
            distinct_by=nat.autonat_distinct_by,
            allow_private=nat.autonat_allow_private,
            check_interval_s=nat.autonat_interval_s,
            retry_interval_s=min(30.0, nat.autonat_interval_s),
            serve=nat.autonat_serve,
            server_max_concurrent=nat.autonat_max_concurrent,
            server_peer_interval_s=nat.autonat_peer_interval_s,
        )

    def effective_reachability(self) -> Reachability:
        """What the capability record declares: ``node.reachability`` when set, else AutoNAT's verdict."""
        return self.reachability.effective(self.config.node.reachability)

    def _relay_settings(self) -> RelaySettings:
        relay = self.config.relay
        return RelaySettings(
            max_reservations=relay.max_reservations,
            reservation_ttl_s=relay.reservation_ttl_s,
            max_circuits=relay.max_circuits,
            max_circuit_duration_s=relay.max_circuit_duration_s,
            max_circuit_bytes=relay.max_circuit_bytes,
            static_relays=tuple(relay.static_relays),
            min_relays=relay.min_relays,
            renew_fraction=relay.renew_fraction,
            probe_interval_s=relay.probe_interval_s,
            probe_timeout_s=relay.probe_timeout_s,
        )

    def _wants_relays(self) -> bool:
        """While private, and before AutoNAT's first verdict when none of our own addresses is public."""
        if self.config.node.role == "relay" or self._host is None:
            return False
        return wants_relays(self.effective_reachability(), listen_addrs(self._host))

    def _serves_dht(self) -> bool:
        """Serve the DHT unless private (``nat.dht_client_when_private``), or before AutoNAT's first
        verdict with no public address of our own (``nat.addresses.serves_dht``)."""
        if not self.config.nat.dht_client_when_private or self._host is None:
            return True
        if self.config.node.role != "node" and self.effective_reachability() == "unknown":
            return True  # relays and bootstrap nodes serve from the start, as their role says
        waited_s = time.monotonic() - self.started_at
        return serves_dht(self.effective_reachability(), listen_addrs(self._host), waited_s=waited_s)

    async def _serve_dht_after_grace(self) -> None:
        """Still no verdict ``DHT_CLIENT_BEFORE_VERDICT_S`` after the start: serve the DHT (``serves_dht``)."""
        await trio.sleep(max(0.0, self.started_at + DHT_CLIENT_BEFORE_VERDICT_S - time.monotonic()))
        if self._dht is not None and self._dht.kad is not None:
            self._dht.serve(self._serves_dht())

    @property
    def relay(self) -> RelayService | None:
        return self._relay

    @property
    def holepunch(self) -> HolePunchService | None:
        return self._holepunch

    @property
    def upnp(self) -> UpnpService | None:
        return self._upnp

    def relayed_addrs(self) -> list[str]:
        """``<relay addr>/p2p/<relay id>/p2p-circuit`` for each relay holding a reservation for us, while private."""
        if self._relay is None or not self._wants_relays():
            return []
        return self._relay.relayed_addrs()

    def _relays_changed(self) -> None:
        if self._publisher is not None:
            self._publisher.republish()

    def _wants_upnp(self, listen_addrs: list[multiaddr.Multiaddr]) -> bool:
        """A mapping can only point at a listener on a LAN address: none for loopback-only nodes."""
        if not self.config.nat.upnp or self.config.node.role != "node":
            return False
        return any(not str(addr).startswith(("/ip4/127.", "/ip6/::1/")) for addr in listen_addrs)

    def _mapped_addrs(self) -> list[str]:
        return self._upnp.external_addrs() if self._upnp is not None else []

    def _external_addrs(self) -> list[str]:
        """Advertised ahead of the listen addresses: UPnP mappings, then what AutoNAT servers reached."""
        confirmed = self._autonat.confirmed_addrs() if self._autonat is not None else []
        return self._mapped_addrs() + confirmed

    def _outside_view(self) -> OutsideView:
        """What AutoNAT saw of us, for telling a double NAT (``nat.double_nat``)."""
        autonat = self._autonat
        return OutsideView(
            observed_ips=tuple(autonat.observed_ips()) if autonat is not None else (),
            reachability=self.reachability.verdict,
            tested=tuple(autonat.tested_addrs()) if autonat is not None else (),
        )

    def _upnp_changed(self, addrs: list[str]) -> None:
        """A new or lost mapping: measure reachability again (the mapping should make us public)."""
        log.info("upnp: %s", ", ".join(addrs) if addrs else "no mapping")
        if self._autonat is not None:
            self._autonat.recheck_soon()
            self._autonat.push_identify_soon()  # peers (and the DHT answers they give) learn the address
        self._reachability_changed()

    def _reachability_changed(self) -> None:
        if self._relay is not None:
            self._relay.wake()
        # A private node only queries the DHT: in others' tables it would cost every lookup
        # a dial timeout to its LAN address. serve() tells the connected peers (identify push).
        if self._dht is not None and self._dht.kad is not None:
            self._dht.serve(self._serves_dht())
        if self._publisher is not None and self.config.node.reachability == "unknown":
            self._publisher._changed.set()  # the publisher's own "republish now" signal

    async def _load_models(self) -> None:
        """Load the configured models (each on its own worker thread) and serve them as model:<name>."""
        if not self.config.models:
            return
        await self.model_host.start()
        self.model_host.register(self.services)
        if self.config.verify.serve:
            # verify:<sha256> (docs/verified-inference.md)
            register_verifiers(self.model_host, self.services, self.config.verify.positions)
        if self.config.market.layer_servers:
            register_layer_services(self.model_host, self.services)  # layers:<sha256> (docs/split.md)

    def _advertised_offers(self) -> list[Offer]:
        """The loaded models' offers, then the configured offers (same name: config wins), then the API's."""
        fields = self.model_host.offer_fields()
        if self.config.verify.serve:
            fields += verify_offer_fields(fields, self.config.verify.price_per_token)
        if self.config.market.layer_servers:
            models = self.model_host.offer_fields()
            fields += layer_offer_fields(models, layer_capacity_of(self.model_host))
        merged = {offer.name: offer for offer in map(Offer.model_validate, fields)}
        merged.update((offer.name, offer) for offer in self.config.offers)
        return self.offer_book.effective(list(merged.values()))

    async def _run_settlement(self, wallet_key: bytes) -> None:
        """Connect the escrow chain (retrying while it is down), then run the settlement queue."""
        if self.config.escrow.mode == "off":
            return
        self.escrow_status = EscrowStatus(mode=self.config.escrow.mode, state="connecting")
        delay = 1.0
        while True:
            try:
                # Nothing is committed while connecting, so a shutdown need not wait for it.
                client = await self._open_escrow(wallet_key)
                break
            except ClawnodeError as error:  # EscrowError: a stable reason, never the URL
                self.escrow_status = EscrowStatus(mode=self.config.escrow.mode, state="unavailable")
                reason = getattr(error, "reason", None)
                self.escrow_problem = reason if reason in ("no_escrow_contract", "wrong_chain") else None
                log.warning("escrow chain unavailable (%s); retrying in %.0f s", error.message, delay)
            await trio.sleep(delay)
            delay = min(ESCROW_RETRY_MAX_S, delay * 2)
        self.escrow_problem = None
        client.max_gas_share = self.config.escrow.max_gas_share  # runtime/escrow/fees.py
        self._stamp_offers(client)
        from runtime.settlement import EscrowSettler, SettlementQueue
        from runtime.settlement.reconcile import Reconciler

        self._arbiter = self.config.escrow.arbiter or await trio.to_thread.run_sync(self._default_arbiter, client)
        self.escrow_client = client
        self.escrow_status = EscrowStatus(
            mode=self.config.escrow.mode,
            state="connected",
            chain_id=client.chain.chain_id,
            contract=client.address,
            wallet=client.account.address,
        )
        log.info("escrow on chain %d, contract %s", client.chain.chain_id, client.address)
        self.settlement_queue = SettlementQueue(
            self.ledger, client.chain, EscrowSettler(client), interval_s=self.config.escrow.settle_interval_s
        )
        client.lock_journal = self.ledger.lock_journal()  # every lock is in the ledger before it is sent
        self.reconciler = Reconciler(
            self.ledger, client, every_s=self.config.escrow.reconcile_every_s, wake_settlement=self._wake_settlement
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(client.watch, interval_s=self.config.escrow.health_interval_s, on_change=self._on_chain_health)
            )
            nursery.start_soon(self.reconciler.run)
            failover = self.config.escrow.mode == "rpc" and bool(self.config.escrow.fallback_rpc_urls)
            if failover or (self.network is not None and self.network.state == "joined"):
                nursery.start_soon(self._rejoin_when_lost, client)
            await self.settlement_queue.run()

    async def _rejoin_when_lost(self, client: Any) -> None:
        """A joined dev chain lives in its bootstrap's process: once it is gone (unreachable, or another
        chain answers at its URL) for ``rejoin_after_s``, the network is joined again (raising restarts
        the settlement service, whose connect asks the bootstrap peers anew). On ``rpc`` with
        ``fallback_rpc_urls`` the same restart connects through the first URL that answers."""
        lost_since: float | None = None
        while True:
            await trio.sleep(self.config.escrow.health_interval_s)
            if client.chain.health.state == "ok":
                lost_since = None
                continue
            now = time.monotonic()
            lost_since = now if lost_since is None else lost_since
            if now - lost_since >= self.rejoin_after_s:
                if self.network is not None and self.network.state == "joined":
                    self.network.forget()
                log.warning("the escrow chain is gone (%s); connecting again", client.chain.health.state)
                raise ClawnodeError(ErrorCode.UNAVAILABLE, "the escrow chain is gone", "chain_lost")

    def _on_chain_health(self, health: Any) -> None:
        """The health watch's verdict changed (a runtime.escrow.health.ChainHealth)."""
        connected = health.state == "ok"
        self.escrow_status = self.escrow_status.model_copy(
            update={"state": "connected" if connected else "unavailable"}
        )
        self.escrow_problem = health.state if health.state in ("no_escrow_contract", "wrong_chain") else None
        if connected:
            log.info("escrow chain answers again")
            self._wake_settlement()
        else:
            log.warning("escrow chain: %s", health.message)

    def _wake_settlement(self) -> None:
        if self.settlement_queue is not None:
            self.settlement_queue.wake()

    def _default_arbiter(self, client: Any) -> str:
        """Development chains only: their second funded account arbitrates."""
        profile = self.network.profile if self.network is not None else None
        if profile is not None and profile.arbiter:
            return profile.arbiter  # the network's (mode auto, joined or served)
        if self.config.escrow.mode not in ("embedded", "auto") and self._escrow_connector is None:
            return ""
        return str(client.chain.dev_accounts()[1].address)

    def verification_record(self, peer_id: str) -> VerificationView | None:
        record = self.market.verifying.book.get(peer_id) if self._market is not None else None
        if record is None:
            return None
        return VerificationView(
            passed=record.passed,
            failed=record.failed,
            unverifiable=record.unverifiable,
            last_reason=record.last_reason,
            standing=self.market.verifying.standing(peer_id),
        )

    def verification_records(self, limit: int) -> dict[str, VerificationView]:
        """This node's checks of the providers it checked most recently (the dashboard's table)."""
        if self._market is None:
            return {}
        peers = list(reversed(self._market.verifying.book.records))[:limit]
        return {peer: view for peer in peers if (view := self.verification_record(peer)) is not None}

    async def _advertised_sha256(self, provider: str, lease_id: str) -> str:
        """The GGUF sha256 the provider's signed record states for the lease's model ("" if none)."""
        held = self.market.held.get(lease_id)
        if held is None:
            return ""
        record, _ = await self.discovery.fetch_live(ID.from_base58(provider))
        capability = record.capability(held.grant.capability)
        return capability.model.sha256 if capability is not None and capability.model is not None else ""

    def _model_by_sha256(self, sha256: str) -> Any:
        """A model this node loaded from the file with this sha256 (verified inference), or None."""
        name = next((name for name, known in self.model_host.sha256s.items() if known == sha256), None)
        return self.model_host.get(name) if name is not None else None

    def _task_arbiter(self) -> tuple[str, str] | None:
        """This node's own task arbiter as a (peer id, wallet) pair: what a task it publishes names when the
        request names none, and the pair it trusts as a seller (beside escrow.trusted_arbiters). The
        configured escrow.arbiter_peer with this node's arbiter wallet; else, on mode auto, the peer id the
        network profile names for that wallet (a bootstrap serving its dev chain: itself), unless
        escrow.arbiter names another wallet; else None (a publish is refused ``no_arbiter``, a
        single-arbiter award ``no_trusted_arbiter``)."""
        if not self._arbiter:
            return None
        peer = self.config.escrow.arbiter_peer
        if peer:
            return peer, self._arbiter
        profile = self.network.profile if self.network is not None else None
        if self.config.escrow.mode != "auto" or profile is None:
            return None
        return profile.arbiter_pair(self._arbiter)

    def _lease_arbiter_peer(self) -> str:
        """The lease market's arbiter peer (``DisputeRole.arbiter_peer``): where a failed verification's case
        goes, whom this node shows its receipts to and whose outcomes it believes. The rule of
        :meth:`_task_arbiter`: the configured escrow.arbiter_peer, else on mode auto the peer id the network
        profile names for this node's arbiter wallet; "" when neither is known (read at each use, so a fresh
        profile is followed and a chain that is gone leaves none)."""
        peer = self.config.escrow.arbiter_peer
        if peer:
            return peer
        pair = self._task_arbiter()
        return pair[0] if pair is not None else ""

    def _escrow_terms(self) -> EscrowTerms | None:
        """What this node asks a buyer to lock; None while there is no chain (or no arbiter)."""
        client = self.escrow_client
        if client is None or not self._arbiter:
            return None
        return EscrowTerms(
            chain_id=client.chain.chain_id,
            contract=client.address,
            payee=client.account.address,
            arbiter=self._arbiter,
            dispute_window_s=self.config.escrow.dispute_window_s,
        )

    def _connect_escrow(self, wallet_key: bytes) -> Any:
        if self._escrow_connector is not None:
            return self._escrow_connector(wallet_key)
        # Imported here, on the worker thread: web3 takes about a second to import.
        from eth_account import Account

        from runtime.escrow import EscrowSettings, connect_escrow

        section = self.config.escrow
        settings = EscrowSettings(
            mode=section.mode,
            rpc_url=section.rpc_url or None,
            contract=section.contract or None,
            rpc_timeout_s=section.rpc_timeout_s,
            rpc_retries=section.rpc_retries,
            health_timeout_s=section.health_timeout_s,
            chain_id=section.chain_id or None,
            fallback_urls=tuple(section.fallback_rpc_urls),
            max_fee_per_gas=round(section.max_fee_gwei * 10**9),
            confirmations=section.confirmations,
        )
        return connect_escrow(settings, Account.from_key(wallet_key))

    def _load_secrets(self) -> tuple[KeyPair, str, bytes]:
        ensure_data_dir(self.data_dir)
        key_pair, _ = load_or_create_identity(self.data_dir)
        return key_pair, load_or_create_api_token(self.data_dir), load_or_create_wallet_key(self.data_dir)

    async def _serve_api(self, token: str, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        hypercorn_config = HypercornConfig()
        hypercorn_config.bind = [f"127.0.0.1:{self.config.api.port}"]
        hypercorn_config.accesslog = None
        hypercorn_config.errorlog = quiet_error_logger()  # no traceback below debug (node/http_guard.py)
        api = self.config.api
        app = create_app(self, token, max_body_bytes=api.max_body_bytes, max_json_depth=api.max_json_depth)

        async def serve_and_report(*, task_status: TaskStatus[list[str]]) -> None:
            try:
                await serve(app, hypercorn_config, task_status=task_status)  # type: ignore[arg-type]
            except* OSError:
                raise ClawnodeError(
                    ErrorCode.UNAVAILABLE,
                    f"cannot serve the API on 127.0.0.1:{self.config.api.port}: the port is in use (api.port)",
                ) from None

        async with trio.open_nursery() as nursery:
            bound: list[str] = await nursery.start(serve_and_report)
            self.api_url = bound[0]
            task_status.started()

    def _running_card(self) -> RunningNode:
        return RunningNode(
            pid=os.getpid(),
            peer_id=str(self.host.get_id()),
            listen_addrs=self.listen_addrs(),
            api_url=self.api_url,
            role=self.config.node.role,
        )

    def listen_addrs(self) -> list[str]:
        """Our direct addresses (the host also advertises its relays' circuit addresses while it holds
        reservations: ``nat.addresses.advertise_relayed``; status shows those as ``relayed_addrs``)."""
        return [str(addr) for addr in self.host.get_addrs() if not is_relayed(str(addr))]

    # NodeView, read by the API

    def identity(self) -> IdentityReply:
        return IdentityReply(
            peer_id=str(self.host.get_id()),
            role=self.config.node.role,
            listen_addrs=self.listen_addrs(),
            api_url=self.api_url,
            kad_protocol=self.dht.protocol_id,
        )

    def status(self) -> StatusReply:
        transport = {str(addr) for addr in self.host.get_transport_addrs()}
        own = [addr.split("/p2p/")[0] for addr in self.listen_addrs()]
        return StatusReply(
            peer_id=str(self.host.get_id()),
            role=self.config.node.role,
            version=clawnode_version(),
            listen_addrs=self.listen_addrs(),
            observed_addrs=[addr for addr in own if addr not in transport],
            connected_peers=len(self.host.get_connected_peers()),
            routing_table_size=self.dht.routing_table_size(),
            peer_book_size=len(self.dht.peer_book),
            offers=len(self.publisher.offers),
            record_seq=self.publisher.record.seq if self.publisher.record else None,
            records_rejected=self.rejections.snapshot(),
            uptime_s=round(time.monotonic() - self.started_at, 3),
            reachability=self.effective_reachability(),
            reachability_reason=self.reachability.explain(self.config.node.reachability),
            reachability_checked_at=self.reachability.checked_at,
            autonat_server=self._autonat.serving if self._autonat is not None else False,
            relay_reservations=[
                RelayReservationView.model_validate(item) for item in (self._relay.summary() if self._relay else [])
            ],
            relayed_addrs=self.relayed_addrs(),
            relay_hop_reservations=(
                self._relay.hop_reservations() if self._relay is not None and self._relay.serve_hop else None
            ),
            hole_punch=HolePunchView.model_validate(self._holepunch.summary()) if self._holepunch else None,
            upnp=UpnpView.model_validate(self._upnp.summary()) if self._upnp is not None else None,
            reached_by=self.reached_by(),
            escrow_mismatches=self.reconciler.mismatches if self.reconciler is not None else None,
            layer_leases=(
                [LayerLeaseView.model_validate(view) for view in self.layers.summary()] if self.layers else None
            ),
            split_models=(
                [SplitSeatView.model_validate(view) for view in self._router.split.status()]
                if self._router is not None and self._router.split is not None
                else None
            ),
        )

    def reached_by(self) -> str:
        """How other nodes reach this one, in words (status, dashboard)."""
        reachability = self.effective_reachability()
        if reachability == "public":
            return "direct (upnp mapping)" if self._mapped_addrs() else "direct"
        if reachability == "private":
            if not self.relayed_addrs():
                return "unreachable (no relay reservation yet)"
            punched = self._holepunch.counts["direct"] if self._holepunch else 0
            return "relay, upgraded by hole punch" if punched else "relay"
        return "not known yet"

    def peers(self) -> PeersReply:
        connected = set(self.host.get_connected_peers())
        in_table = set(self.dht.dht.routing_table.get_peer_ids())
        peerstore = self.host.get_peerstore()
        replies = []
        for peer_id in sorted(connected | in_table, key=str):
            try:
                addrs = [str(addr) for addr in peerstore.addrs(peer_id)]
            except Exception:  # noqa: BLE001 - a peer whose addresses expired
                addrs = []
            replies.append(
                PeerReply(
                    peer_id=str(peer_id),
                    addrs=addrs,
                    connected=peer_id in connected,
                    in_routing_table=peer_id in in_table,
                    connection=self._holepunch.path_to(peer_id) if self._holepunch else None,
                    hole_punched=self._holepunch.punched(peer_id) if self._holepunch else False,
                    transport=self._holepunch.direct_transport(peer_id) if self._holepunch else None,
                )
            )
        return PeersReply(peers=replies)

    def skipped_offers(self) -> dict[str, str]:
        """Offers stored or configured but not published, each with the reason its record cannot be sealed."""
        skipped = dict(self.offer_book.unreadable)
        if self._publisher is not None:
            skipped.update(self._publisher.skipped)
        return skipped

    def capabilities(self) -> CapabilitiesReply:
        return CapabilitiesReply(offers=self.publisher.offers, record=self.publisher.record)

    async def set_offer(self, offer: Offer) -> CapabilitiesReply:
        try:
            self.publisher.set_offer(self._stamped(offer))
        except ValueError as error:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, str(error)) from None
        await self.offer_book.record(offer.name, offer)
        return self.capabilities()

    async def remove_offer(self, name: str) -> CapabilitiesReply:
        if not self.publisher.remove_offer(name):
            raise ClawnodeError(ErrorCode.NOT_FOUND, f"this node does not offer {name}")
        await self.offer_book.record(name, None)
        return self.capabilities()

    async def discover(self, query: DiscoveryQuery) -> list[ProviderResult]:
        """The providers this node can pay (the router's candidates); see :meth:`discover_split`."""
        return (await self.discover_split(query))[0]

    async def discover_split(self, query: DiscoveryQuery) -> tuple[list[ProviderResult], list[Unpayable]]:
        """Discovery's providers split by ``payable_verdict``: those this node can pay, and the others."""
        ours = self.payment_network()
        payable: list[ProviderResult] = []
        others: list[Unpayable] = []
        for provider in await self._discover_all(query):
            capability = provider.record.capability(provider.capability)
            prerequisites = capability.prerequisites if capability is not None else None
            terms = ProviderTerms(
                prerequisites.escrow_chain if prerequisites else None,
                prerequisites.escrow_contract if prerequisites else None,
            )
            refusal = payable_verdict(ours, terms)
            if refusal is None:
                payable.append(provider)
            else:
                others.append(Unpayable(provider=provider, reason=refusal.reason, message=refusal.message))
        # For the router's "no provider" answer: the last word per capability, a bounded few kept.
        self._unpayable_notes.pop(query.capability, None)
        note = unpayable_summary([other.reason for other in others])
        if note is not None and not payable:
            self._unpayable_notes[query.capability] = note
            while len(self._unpayable_notes) > 256:
                del self._unpayable_notes[next(iter(self._unpayable_notes))]
        return payable, others

    def payment_network(self, client: Any = None) -> PaymentNetwork | None:
        """The chain and contract this node (or ``client``) pays and is paid on; None while none is connected."""
        client = client if client is not None else self.escrow_client
        if client is None:
            return None
        return PaymentNetwork(chain=caip2(client.chain.chain_id), contract=client.address)

    def _stamped(self, offer: Offer, client: Any = None) -> Offer:
        """``offer`` naming the chain and escrow contract this node is paid on (every record says where)."""
        network = self.payment_network(client)
        if network is None:
            return offer
        return offer.model_copy(update={"chain": network.chain, "escrow_contract": network.contract})

    def _stamp_offers(self, client: Any) -> None:
        """The escrow just connected: republish every offer naming its chain and contract."""
        if self._publisher is None:
            return
        for offer in self._publisher.offers:
            try:
                self._publisher.set_offer(self._stamped(offer, client))
            except ClawnodeError as error:
                log.warning("offer %s keeps its old chain: %s", offer.name, error.message)

    async def _open_escrow(self, wallet_key: bytes) -> Any:
        """The escrow client; ``escrow.mode = "auto"`` serves or joins the network's chain (bootstrap/network.py)."""
        escrow, network = self.config.escrow, self.network
        await trio.to_thread.run_sync(_import_escrow_modules, abandon_on_cancel=True)  # type: ignore[call-arg]  # stale trio-stubs
        if self._escrow_connector is None and escrow.mode == "auto" and network is not None:
            if self.config.node.role == "bootstrap":
                host, _, port = escrow.dev_rpc_listen.rpartition(":")
                return await serve_network_chain(
                    network, wallet_key, listen_host=host.strip("[]"), listen_port=int(port)
                )
            timeouts = ChainTimeouts(
                rpc_timeout_s=escrow.rpc_timeout_s,
                rpc_retries=escrow.rpc_retries,
                health_timeout_s=escrow.health_timeout_s,
            )
            return await join_network_chain(
                network,
                self.host,
                wallet_key,
                bootstrap_addrs=self.bootstrap_addrs(),
                join_timeout_s=escrow.join_timeout_s,
                timeouts=timeouts,
            )
        # Nothing is committed while connecting, so a shutdown need not wait for it.
        return await trio.to_thread.run_sync(  # type: ignore[call-arg]  # stale trio-stubs
            self._connect_escrow, wallet_key, abandon_on_cancel=True
        )

    def network_view(self) -> NetworkReply:
        """The chain and escrow this node pays on and how it came to them (``clawnode network``)."""
        mode, network, ours = self.config.escrow.mode, self.network, self.payment_network()
        if mode == "off":
            return NetworkReply(mode=mode, state="off")
        state = {"embedded": "private", "rpc": "configured"}.get(mode, "starting")
        profile = network.profile if network is not None else None
        if mode == "auto" and network is not None and network.state != "starting":
            state = network.state
        if ours is None:
            state = "starting"
        return NetworkReply(
            mode=mode,
            state=state,
            chain=ours.chain if ours else None,
            contract=ours.contract if ours else None,
            arbiter=self._arbiter or None,
            arbiter_peer=pair[0] if (pair := self._task_arbiter()) is not None else None,
            joined_through=network.joined_through if network is not None else None,
            faucet=network is not None and network.faucet is not None,
            rpc_url=profile.rpc_urls[0] if state == "serving" and profile and profile.rpc_urls else None,
        )

    def _connected_escrow(self) -> Any:
        client = self.escrow_client
        if client is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "this node's escrow chain is not connected", "chain_unavailable")
        return client

    async def wallet(self) -> WalletReply:
        """The escrow wallet: address, chain, contract, balance and the escrow's credit for it."""
        client = self._connected_escrow()
        address = client.account.address
        balance = await client.chain.run(lambda: int(client.chain.w3.eth.get_balance(address)))
        credit = await client.chain.run(client.credit_of, address)
        profile = self.network.profile if self.network is not None else None
        token = profile.stablecoin if profile is not None and profile.chain == caip2(client.chain.chain_id) else None
        token_balance = token_credit = None
        if token is not None:
            from runtime.escrow.token import TokenClient

            token_balance = await client.chain.run(TokenClient(client.chain, client.account, token).balance_of, address)
            token_credit = await client.chain.run(client.credit_of, address, token)
        return WalletReply(
            address=address,
            chain=caip2(client.chain.chain_id),
            contract=client.address,
            balance=balance,
            escrow_credit=credit,
            mode=self.config.escrow.mode,
            stablecoin=token,
            stablecoin_balance=token_balance,
            stablecoin_credit=token_credit,
        )

    async def withdraw(self, to: str | None, token: str | None = None) -> WithdrawReply:
        """Move this wallet's whole escrow credit (claimed income) in ``token`` (None: the coin) to ``to``
        (default: the wallet itself)."""
        from runtime.escrow import EscrowError

        client = self._connected_escrow()
        credit = await client.chain.run(client.credit_of, client.account.address, token)
        if credit == 0:
            raise EscrowError("nothing_to_withdraw")
        result = await client.chain.run(lambda: client.withdraw(to, token=token))
        log.info("withdrew %d %s of escrow credit", credit, "wei" if token is None else "token units")
        return WithdrawReply(amount=credit, to=to or client.account.address, tx_hash=result.tx_hash)

    async def _discover_all(self, query: DiscoveryQuery) -> list[ProviderResult]:
        started = time.monotonic()
        try:
            return await self.discovery.find(query)
        finally:
            self.dht_lookup_s.observe(time.monotonic() - started)

    async def describe(self, peer_id: str) -> DescribeResult:
        try:
            parsed = ID.from_base58(peer_id)
        except Exception:  # noqa: BLE001 - base58 and multihash errors alike
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "not a peer id") from None
        return await self.discovery.describe(parsed)

    # the ledger, read by the API

    async def ledger_leases(self, limit: int, offset: int) -> LeasesReply:
        return LeasesReply(leases=await self.ledger.list_leases(limit=limit, offset=offset))

    async def ledger_receipts(self, lease_id: str | None, limit: int, offset: int) -> ReceiptsReply:
        return ReceiptsReply(receipts=await self.ledger.list_receipts(lease_id, limit=limit, offset=offset))

    async def ledger_settlements(self, limit: int, offset: int) -> SettlementsReply:
        return SettlementsReply(settlements=await self.ledger.list_settlements(limit=limit, offset=offset))

    async def ledger_summary(self, since_day: str | None) -> LedgerSummaryReply:
        by_day = await self.ledger.totals_by_day(since_day=since_day)
        income = sum(t.income for t in by_day)
        spend = sum(t.spend for t in by_day)
        counts = await self.ledger.counts()
        return LedgerSummaryReply(
            total=MoneyTotals(income=income, spend=spend, net=income - spend),
            by_day=by_day,
            by_peer=await self.ledger.totals_by_peer(since_day=since_day),
            leases=counts["leases"],
            receipts=counts["receipts"],
            settlement_queue=await self.ledger.queue_stats(),
            escrow=self.escrow_status,
        )

    async def ledger_verify(self) -> LedgerVerifyReply:
        report = await self.ledger.verify_audit()
        return LedgerVerifyReply.model_validate(report.model_dump())

    async def ack_escrow_mismatches(self) -> MismatchAckReply:
        """The operator has looked at the flagged escrows: they stop counting (gauge, alert, status)."""
        acknowledged = await self.ledger.acknowledge_mismatches()
        mismatches = await self.ledger.escrow_mismatches()
        if self.reconciler is not None:
            self.reconciler.mismatches = mismatches
        log.info("%d flagged escrow(s) acknowledged by the operator", acknowledged)
        return MismatchAckReply(acknowledged=acknowledged, mismatches=mismatches)

    # the lease market, driven by the API

    async def open_lease(self, body: OpenLeaseBody) -> LeaseView:
        return await self.market.open_lease(
            body.peer_id,
            body.capability,
            budget=body.budget,
            duration_s=body.duration_s,
            expected_units=body.expected_units,
        )

    def leases(self) -> list[LeaseView]:
        return self.market.leases()

    async def revoke_lease(self, lease_id: str) -> LeaseView:
        return await self.market.revoke(lease_id)

    async def renew_lease(self, lease_id: str, duration_s: int) -> LeaseView:
        return await self.market.renew(lease_id, duration_s)

    async def call_lease(self, lease_id: str, body: dict[str, Any]) -> CallResult:
        return await self.market.call(lease_id, body)

    async def metrics(self) -> bytes:
        return await render_metrics(self)

    def alerts(self) -> AlertsReply:
        return self.alerting.reply()
