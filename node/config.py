"""Node configuration: ``config.toml`` in the data dir, then ``CLAWNODE_*`` environment
variables, then command-line flags, validated once by pydantic.

Every key is addressed as ``section.field``; its environment variable is
``CLAWNODE_SECTION_FIELD`` (lists are comma-separated). A bad value is reported
with the key, where it came from and what is allowed.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import multiaddr
from pydantic import Field, ValidationError, field_validator, model_validator

from dht.offers import Offer
from dht.records import Reachability
from protocols.settings import MarketSection
from protocols.settings import Section as _Section
from runtime.inference.models import ModelSpec

CONFIG_FILE_NAME = "config.toml"
ENV_PREFIX = "CLAWNODE_"

Role = Literal["node", "bootstrap", "relay"]
LogLevel = Literal["debug", "info", "warning", "error"]


def _check_multiaddrs(values: list[str]) -> list[str]:
    for value in values:
        try:
            multiaddr.Multiaddr(value)
        except Exception as error:  # noqa: BLE001 - multiaddr raises several unrelated types
            raise ValueError(f"not a multiaddr: {value!r} ({error})") from None
    return values


class NodeSection(_Section):
    role: Role = Field("node", description="node | bootstrap | relay")
    listen: list[str] = Field(
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/4021"],
        description="multiaddrs to listen on; port 0 picks a free port",
    )
    max_connections: int = Field(
        300, ge=1, le=10_000, description="open connections at most (upgraded: after Noise and Yamux)"
    )
    connection_budget: int = Field(
        64,
        ge=0,
        le=10_000,
        description="connections kept: above it the longest idle ones are closed (never one carrying a stream, "
        "a live lease, a relay reservation or a hole-punched link); 0: off (every connection kept up to "
        "node.max_connections)",
    )
    mdns: bool = Field(
        True,
        description="find peers on the LAN by mDNS (_p2p._udp.local) with no bootstrap peer; "
        "only while the node listens on a non-loopback address",
    )
    handshake_timeout_s: float = Field(
        10.0, ge=0.1, le=120.0, description="an inbound connection not upgraded (Noise + Yamux) by then is closed"
    )
    max_pending_connections_per_ip: int = Field(
        8, ge=1, le=1000, description="inbound connections still in their handshake from one IP (IPv6: one /64)"
    )
    max_pending_connections: int = Field(
        256, ge=1, le=10_000, description="inbound connections still in their handshake, from all IPs"
    )
    reachability: Reachability = Field(
        "unknown",
        description="unknown | public | private: what the capability record declares; unknown: measured by AutoNAT",
    )

    _listen_are_multiaddrs = field_validator("listen")(_check_multiaddrs)

    @field_validator("listen")
    @classmethod
    def _at_least_one(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("at least one listen multiaddr is needed")
        return values


class ApiSection(_Section):
    port: int = Field(7421, ge=0, le=65535, description="local HTTP API port on 127.0.0.1; 0 picks a free one")
    max_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        le=1 << 30,
        description="largest request body the API reads, bytes (larger: 413 E_INVALID_ARGUMENT, unread)",
    )
    max_json_depth: int = Field(
        64,
        ge=2,
        le=1000,
        description="deepest JSON nesting a request body may have (deeper: 400 E_INVALID_ARGUMENT, never parsed)",
    )


class BootstrapSection(_Section):
    peers: list[str] = Field(default_factory=list, description="bootstrap peers, /ip4/.../tcp/.../p2p/<peer-id>")
    use_defaults: bool = Field(True, description="also use the list shipped in bootstrap/")

    _peers_are_multiaddrs = field_validator("peers")(_check_multiaddrs)

    @field_validator("peers")
    @classmethod
    def _name_their_peer_id(cls, values: list[str]) -> list[str]:
        for value in values:
            if "/p2p/" not in value:
                raise ValueError(f"a bootstrap multiaddr must end in /p2p/<peer-id>: {value!r}")
        return values


class DhtSection(_Section):
    protocol_id: str = Field("/clawnode/kad/1.0.0", pattern=r"^/\S+$", description="Kademlia protocol id")
    refresh_interval_s: float = Field(60.0, ge=1.0, le=86_400.0, description="routing-table refresh period")
    dial_timeout_s: float = Field(
        4.0,
        ge=0.5,
        le=60.0,
        description="seconds a DHT query or join waits to reach a peer; one not reached is not asked for 60 s",
    )


class NatSection(_Section):
    autonat_min_servers: int = Field(
        3,
        ge=1,
        le=16,
        description="distinct AutoNAT servers that must agree on public or private",
    )
    autonat_distinct_by: Literal["ip", "peer"] = Field(
        "ip", description="ip | peer: what makes two AutoNAT servers distinct (peer: loopback tests only)"
    )
    autonat_allow_private: bool = Field(
        False, description="ask about and dial back private/loopback addresses (tests and LANs)"
    )
    autonat_interval_s: float = Field(
        300.0, ge=1.0, le=86_400.0, description="re-check period of the measured reachability"
    )
    autonat_serve: Literal["auto", "always", "never"] = Field(
        "auto", description="auto (relay/bootstrap roles and public nodes) | always | never: serve AutoNAT dial-backs"
    )
    autonat_max_concurrent: int = Field(4, ge=1, le=64, description="AutoNAT dial-backs this node runs at once")
    autonat_peer_interval_s: float = Field(
        30.0, ge=0.0, le=86_400.0, description="one AutoNAT request per peer per this many seconds"
    )
    hole_punch: bool = Field(True, description="upgrade connections dialed through a relay to direct ones (DCUtR)")
    upnp: bool = Field(
        True, description="map the listen port on the home router by UPnP IGD (listeners on a LAN address only)"
    )
    dht_client_when_private: bool = Field(
        True, description="a node AutoNAT finds private queries the DHT but stays out of others' routing tables"
    )
    upnp_lease_s: int = Field(3600, ge=60, le=604_800, description="UPnP mapping lease; renewed at half of it")


class RelaySection(_Section):
    max_reservations: int = Field(16, ge=1, le=1024, description="relay role: reservations held for others at once")
    reservation_ttl_s: int = Field(
        3600, ge=2, le=86_400, description="relay role: how long a reservation lasts before it must be renewed"
    )
    max_circuits: int = Field(8, ge=1, le=1024, description="relay role: circuits per reserved peer at once")
    max_circuit_duration_s: int = Field(120, ge=1, le=86_400, description="relay role: a circuit is cut after this")
    max_circuit_bytes: int = Field(
        1 << 20, ge=1024, le=1 << 34, description="relay role: a circuit is cut after relaying this many bytes"
    )
    static_relays: list[str] = Field(
        default_factory=list, description="relays to reserve on while private, /ip4/.../tcp/.../p2p/<peer-id>"
    )
    min_relays: int = Field(2, ge=1, le=8, description="relays to hold reservations on while private")
    renew_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="renew a reservation once this fraction of its TTL has passed"
    )
    probe_interval_s: float = Field(
        5.0, ge=0.1, le=3600.0, description="while private: each relay reserved on is pinged this often"
    )
    probe_timeout_s: float = Field(
        4.0, ge=0.1, le=600.0, description="two pings in a row unanswered this long: the relay is taken for gone"
    )

    _static_are_multiaddrs = field_validator("static_relays")(_check_multiaddrs)


class CapabilitiesSection(_Section):
    record_ttl_s: int = Field(
        600, ge=10, le=86_400, description="lifetime of the published record; republished at half of it"
    )
    cache_ttl_s: float = Field(2.0, ge=0.0, le=3600.0, description="how long discovery reuses a fetched record")


class HardwareSection(_Section):
    gpu_model: str = Field("", max_length=64, description="GPU model to advertise; empty for none")
    vram_mb: int = Field(0, ge=0, description="GPU memory to advertise, MiB")


# An escrow.trusted_arbiters entry: PEER:WALLET, the member's peer id (as escrow.arbiter_peer) and its wallet.
TRUSTED_ARBITER_PATTERN = r"[1-9A-HJ-NP-Za-km-z]{46,64}:0x[0-9a-fA-F]{40}"


class EscrowSection(_Section):
    mode: Literal["auto", "embedded", "rpc", "off"] = Field(
        "auto",
        description="auto (a bootstrap serves its network's dev chain, other nodes join it through their "
        "bootstrap peers, else a private chain) | embedded (a private in-process chain) | rpc (a JSON-RPC "
        "chain) | off (no chain)",
    )
    rpc_url: str = Field(
        "", repr=False, description="JSON-RPC URL for mode rpc, http:// or https:// (never logged or shown)"
    )
    contract: str = Field(
        "", pattern=r"^(0x[0-9a-fA-F]{40})?$", description="address of the deployed escrow contract, for mode rpc"
    )
    fallback_rpc_urls: list[str] = Field(
        default_factory=list,
        max_length=8,
        repr=False,
        description="more JSON-RPC URLs of the same chain, tried in order when rpc_url does not answer (never shown)",
    )
    rpc_timeout_s: float = Field(5.0, gt=0.0, le=300.0, description="timeout of one JSON-RPC request, seconds")
    rpc_retries: int = Field(1, ge=0, le=10, description="retries of a JSON-RPC request that timed out or failed")
    chain_id: int = Field(0, ge=0, description="the chain id the escrow must be on; 0 accepts the chain's own")
    health_interval_s: float = Field(
        5.0, ge=0.1, le=3600.0, description="how often the chain's block number (and, after a reset, code) is read"
    )
    health_timeout_s: float = Field(2.0, gt=0.0, le=60.0, description="timeout of one health probe, seconds")
    settle_interval_s: float = Field(
        5.0, ge=0.1, le=3600.0, description="how often the settlement queue retries pending settlements, seconds"
    )
    reconcile_every_s: float = Field(
        60.0,
        ge=0.1,
        le=86_400.0,
        description="how often the ledger's escrow rows are compared with the chain (seconds)",
    )
    arbiter: str = Field(
        "",
        pattern=r"^(0x[0-9a-fA-F]{40})?$",
        description="arbiter of the escrows this node sells under; empty: the embedded chain's second dev account",
    )
    trusted_arbiters: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="more arbiters this node trusts, as a seller, alone or on a task's panel (besides its own "
        "arbiter), each PEER:WALLET (its peer id and its wallet): an award whose panel fewer than m of these decide, "
        "or whose single arbiter is no trusted pair, is refused",
    )
    arbiter_peer: str = Field(
        "",
        pattern=r"^([1-9A-HJ-NP-Za-km-z]{46,64})?$",
        description="peer id of the node that holds the escrows' arbiter wallet: where this node, as a buyer,"
        " sends the signed evidence of a failed verification, and, as a task's seller, the peer id its arbiter must"
        " be announced under; empty: such a failure ends the lease undisputed, and awards naming its arbiter alone"
        " are refused",
    )
    dispute_window_s: int = Field(600, ge=0, le=30 * 86_400, description="dispute window after a lease's deadline")
    dev_rpc_listen: str = Field(
        "127.0.0.1:0",
        pattern=r"^(\[[0-9a-fA-F:]+\]|[0-9.]+):[0-9]{1,5}$",
        description="mode auto, role bootstrap: where the network's dev chain answers JSON-RPC (IP:port, 0: any)",
    )
    join_timeout_s: float = Field(
        20.0, ge=0.0, le=600.0, description="mode auto: how long to ask the bootstrap peers for the network's chain"
    )
    max_gas_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="refuse to lock a lease whose gas (lock + claim + refund) would exceed this share of the "
        "amount locked, at the chain's gas price; 0: no limit",
    )
    max_fee_gwei: float = Field(
        0.0, ge=0.0, le=1e6, description="the most a transaction offers per gas (EIP-1559 fee cap), gwei; 0: no cap"
    )
    confirmations: int = Field(
        1, ge=1, le=64, description="blocks deep a lock must be before it is counted (1: the block that holds it)"
    )

    @field_validator("rpc_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        # The message never repeats the value: an RPC URL often carries an API key.
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("trusted_arbiters")
    @classmethod
    def _peer_wallet_pairs(cls, values: list[str]) -> list[str]:
        for value in values:
            if re.fullmatch(TRUSTED_ARBITER_PATTERN, value) is not None:
                continue
            if re.fullmatch(r"0x[0-9a-fA-F]{40}", value) is not None:
                # What this key took before: a wallet alone is not safe to trust, as a panel pairs each
                # wallet with a peer id its creator chooses, and the case goes to that peer.
                raise ValueError(
                    "every entry must be PEER:WALLET, the arbiter's peer id and its wallet; a wallet alone is no "
                    "longer taken, since a panel could pair that wallet with a peer id the task's creator holds, "
                    "and the arbiter would never get the case"
                )
            raise ValueError("every entry must be PEER:WALLET: a peer id, a colon, and a wallet (0x and 40 hex digits)")
        return values

    def trusted_arbiter_pairs(self) -> tuple[tuple[str, str], ...]:
        """``trusted_arbiters`` as (peer id, wallet) pairs."""
        return tuple((peer, wallet) for peer, _, wallet in (value.partition(":") for value in self.trusted_arbiters))

    @field_validator("fallback_rpc_urls")
    @classmethod
    def _http_urls(cls, values: list[str]) -> list[str]:
        if any(not value.startswith(("http://", "https://")) for value in values):
            raise ValueError("every URL must start with http:// or https://")
        return values

    @model_validator(mode="after")
    def _rpc_needs_url_and_contract(self) -> EscrowSection:
        if self.mode == "rpc" and (not self.rpc_url or not self.contract):
            raise ValueError("escrow.mode = rpc needs escrow.rpc_url and escrow.contract")
        return self


class SandboxSection(_Section):
    kinds: list[Literal["wasm", "native", "inference"]] = Field(
        default_factory=lambda: ["wasm"],  # type: ignore[arg-type]
        description="task kinds this node runs (native: bubblewrap, only for sellers who opt in; "
        "inference: a prompt batch on a model this node serves)",
    )
    auto_run: bool = Field(True, description="run an awarded sandboxed task and submit its result without a person")
    auto_arbitrate: bool = Field(True, description="as an arbiter, decide a sandboxed task's dispute by re-running it")
    max_fuel: int = Field(10**10, ge=1, le=10**13, description="most fuel (wasm instructions) one run may ask for")
    max_memory_mb: int = Field(256, ge=1, le=4096, description="most memory one run may ask for, MiB")
    max_wall_s: float = Field(60.0, gt=0, le=3600, description="most wall-clock seconds one run may ask for")
    max_output_bytes: int = Field(256 * 1024, ge=0, le=256 * 1024, description="most output one run may write")
    max_module_bytes: int = Field(256 * 1024, ge=1, le=256 * 1024, description="largest module or program fetched")
    concurrency: int = Field(2, ge=1, le=64, description="sandboxed runs at once")


class RouterSection(_Section):
    upstream_url: str = Field("", description="an OpenAI-compatible base URL (…/v1) to fall back to; empty: none")
    upstream_api_key: str = Field("", repr=False, description="its API key (never logged or shown)")
    upstream_timeout_s: float = Field(120.0, gt=0)
    lease_units: int = Field(20_000, ge=1, description="units a router-opened lease budgets for")
    lease_duration_s: int = Field(3600, ge=10)
    channels: bool = Field(
        False, description="draw the router's leases on one payment channel per provider (market.channel_* keys)"
    )
    max_providers: int = Field(3, ge=1, le=20, description="providers tried per request before the upstream")
    health_interval_s: float = Field(5.0, gt=0)
    failures_to_failover: int = Field(3, ge=1)
    stall_timeout_s: float = Field(30.0, gt=0, description="a provider silent this long mid-stream is dropped")
    busy_wait_s: float = Field(
        10.0, ge=0, le=600, description="how long a request waits out busy providers (their hints) before a 429"
    )
    consensus_majority: float = Field(0.66, gt=0, le=1, description="share of replicas the winning cluster needs")
    consensus_similarity: float = Field(0.85, gt=0, le=1, description="cosine at which two answers agree")


class VerifySection(_Section):
    sample_rate: float = Field(
        0.02,
        ge=0,
        le=1,
        description="share of calls a consumer spot-checks when it holds the provider's GGUF file "
        "(besides each provider's first call and every call after a failed check)",
    )
    serve: bool = Field(
        False,
        description="also sell checks of calls served with each loaded model's file (capability "
        "verify:<sha256>); off by default: releases before it refuse a record naming that kind",
    )
    price_per_token: int = Field(
        0, ge=0, le=10**30, description="price of a token checked as a verifier (0: the model's own price per token)"
    )
    report_weight: float = Field(
        0.1,
        ge=0,
        le=0.9,
        description="how far other nodes' signed verification reports move a provider's standing "
        "(0: ignored); they never exclude a provider",
    )
    positions: int = Field(
        0,
        ge=0,
        le=4096,
        description="reply positions a check draws at random besides the first 8 and those the commitment "
        "itself flags (0: every position); 32 made a 200-token gemma check about 0.23 of its generation time "
        "instead of 0.36-0.43, but then catches one forged foreign token only where it draws it",
    )
    second_opinion_rate: float = Field(
        0.25,
        ge=0,
        le=1,
        description="share of a leased verifier's passes checked again by a second, different verifier "
        "(docs/verified-inference.md); two that disagree both lose standing",
    )


class SplitSection(_Section):
    models: list[str] = Field(
        default_factory=list,
        description="names of [[models]] this node runs split (docs/split.md): it holds the GGUF file and keeps "
        "the embeddings and output head, the layers run on peers selling layers:<sha256>; not loaded whole",
    )
    sellers: int = Field(2, ge=1, le=8, description="layer sellers a split model is placed on at most")
    prefer: bool = Field(
        False, description="ask for a split model before whole-model providers (default: only when none answers)"
    )
    max_tries: int = Field(3, ge=1, le=10, description="placements tried per request when layer sellers are lost")


class AlertsSection(_Section):
    interval_s: float = Field(15.0, ge=0.05, le=3600.0, description="how often the daemon evaluates its alert rules")
    rules: str = Field(
        "", description="a Prometheus rules file (YAML) to evaluate; empty: the rules shipped as node/alerts.yml"
    )


class LogSection(_Section):
    level: LogLevel = Field("info", description="debug | info | warning | error")


class Config(_Section):
    node: NodeSection = Field(default_factory=NodeSection)  # type: ignore[arg-type]
    api: ApiSection = Field(default_factory=ApiSection)  # type: ignore[arg-type]
    bootstrap: BootstrapSection = Field(default_factory=BootstrapSection)  # type: ignore[arg-type]
    dht: DhtSection = Field(default_factory=DhtSection)  # type: ignore[arg-type]
    nat: NatSection = Field(default_factory=NatSection)  # type: ignore[arg-type]
    relay: RelaySection = Field(default_factory=RelaySection)  # type: ignore[arg-type]
    capabilities: CapabilitiesSection = Field(default_factory=CapabilitiesSection)  # type: ignore[arg-type]
    hardware: HardwareSection = Field(default_factory=HardwareSection)  # type: ignore[arg-type]
    escrow: EscrowSection = Field(default_factory=EscrowSection)  # type: ignore[arg-type]
    market: MarketSection = Field(default_factory=MarketSection)  # type: ignore[arg-type]
    router: RouterSection = Field(default_factory=RouterSection)  # type: ignore[arg-type]
    sandbox: SandboxSection = Field(default_factory=SandboxSection)  # type: ignore[arg-type]
    verify: VerifySection = Field(default_factory=VerifySection)  # type: ignore[arg-type]
    split: SplitSection = Field(default_factory=SplitSection)  # type: ignore[arg-type]
    log: LogSection = Field(default_factory=LogSection)  # type: ignore[arg-type]
    alerts: AlertsSection = Field(default_factory=AlertsSection)  # type: ignore[arg-type]
    offers: list[Offer] = Field(default_factory=list, description="what this node sells ([[offers]] tables)")
    models: list[ModelSpec] = Field(
        default_factory=list, description="GGUF models served as model:<name> ([[models]] tables)"
    )

    @field_validator("models")
    @classmethod
    def _unique_model_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        names = [model.name for model in models]
        if len(set(names)) != len(names):
            raise ValueError("two [[models]] have the same name")
        return models

    @model_validator(mode="after")
    def _split_models_are_models(self) -> Config:
        unknown = sorted(set(self.split.models) - {model.name for model in self.models})
        if unknown:
            raise ValueError(f"split.models names no [[models]] entry: {', '.join(unknown)}")
        return self


class ConfigError(Exception):
    """A configuration value is bad; the message names key, source and what is allowed."""


def _sections() -> dict[str, type[_Section]]:
    return {
        name: field.annotation
        for name, field in Config.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, _Section)
    }


def _is_list_field(section: str, key: str) -> bool:
    annotation = _sections()[section].model_fields[key].annotation
    return getattr(annotation, "__origin__", None) is list


def _from_environment(environ: Mapping[str, str]) -> dict[tuple[str, str], tuple[Any, str]]:
    found: dict[tuple[str, str], tuple[Any, str]] = {}
    for section, model in _sections().items():
        for key in model.model_fields:
            name = f"{ENV_PREFIX}{section}_{key}".upper()
            if name in environ:
                raw = environ[name]
                value: Any = [p.strip() for p in raw.split(",") if p.strip()] if _is_list_field(section, key) else raw
                found[(section, key)] = (value, f"environment variable {name}")
    return found


def load_config(
    data_dir: Path,
    flags: Mapping[tuple[str, str], Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge file, environment and flags (later wins) and validate the result."""
    environ = os.environ if environ is None else environ
    file_path = data_dir / CONFIG_FILE_NAME
    merged: dict[str, dict[str, Any]] = {}
    sources: dict[tuple[str, ...], str] = {}
    if file_path.exists():
        try:
            from_file = tomllib.loads(file_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{CONFIG_FILE_NAME} is not valid TOML: {error}") from None
        for section, values in from_file.items():
            if section in ("offers", "models"):
                merged[section] = values
                sources[(section,)] = CONFIG_FILE_NAME
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: expected a [{section}] table in {CONFIG_FILE_NAME}")
            merged[section] = dict(values)
            for key in values:
                sources[(section, key)] = CONFIG_FILE_NAME
    overrides = dict(_from_environment(environ))
    for (section, key), value in (flags or {}).items():
        if value is not None:
            overrides[(section, key)] = (value, "command-line flag")
    for (section, key), (value, source) in overrides.items():
        merged.setdefault(section, {})[key] = value
        sources[(section, key)] = source
    try:
        return Config.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(_describe(error, sources)) from None


def _describe(error: ValidationError, sources: Mapping[tuple[str, ...], str]) -> str:
    lines = []
    for problem in error.errors():
        location = tuple(str(part) for part in problem["loc"])
        key = ".".join(location)
        source = sources.get(location[:2], CONFIG_FILE_NAME)
        allowed = _allowed_values(location)
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
            allowed = _known_keys(location)
        detail = f"; expected: {allowed}" if allowed else ""
        lines.append(f"config key {key} ({source}): {message}{detail}")
    return "\n".join(lines)


def _known_keys(location: tuple[str, ...]) -> str:
    if len(location) == 1:
        return ", ".join(_sections())
    model = _sections().get(location[0])
    return ", ".join(f"{location[0]}.{key}" for key in model.model_fields) if model else ""


def _allowed_values(location: tuple[str, ...]) -> str:
    if location[0] == "offers" and len(location) >= 3:
        offer_field = Offer.model_fields.get(location[2])
        return (offer_field.description or "") if offer_field else ""
    if location[0] == "models" and len(location) >= 3:
        model_field = ModelSpec.model_fields.get(location[2])
        return (model_field.description or "") if model_field else ""
    if len(location) < 2 or location[0] not in _sections():
        return ""
    field = _sections()[location[0]].model_fields.get(location[1])
    return field.description or "" if field else ""


def default_config_text() -> str:
    """The commented ``config.toml`` written on first start: every key at its default."""
    lines = [
        "# clawnode configuration. Every key is shown at its default, commented out.",
        "# Environment variables CLAWNODE_<SECTION>_<KEY> and command-line flags override this file.",
        "",
    ]
    defaults = Config()
    for section, model in _sections().items():
        lines.append(f"[{section}]")
        values = getattr(defaults, section)
        for key, field in model.model_fields.items():
            lines.append(f"# {field.description}")
            lines.append(f"# {key} = {_toml_value(getattr(values, key))}")
        lines.append("")
    lines.extend(OFFERS_EXAMPLE)
    return "\n".join(lines)


OFFERS_EXAMPLE = [
    OFFERS_MARKER := "# --- offers ---",
    "# What this node sells, one [[offers]] table each (none by default). Prices are integers in",
    "# the asset's smallest unit (wei for ETH). Offers changed through the API are kept in offers.json.",
    "#",
    "# [[offers]]",
    '# name = "model:gemma3-270m-q4_k_m"',
    '# summary = "Gemma 3 270M (Q4_K_M), chat"',
    '# unit = "token"                 # token | request | second',
    "# price_per_unit = 1000000000    # 1 gwei per token",
    '# asset = "ETH"',
    '# chain = "eip155:31337"',
    "# context_length = 8192",
    '# family = "gemma3"',
    "# parameters = 270000000",
    '# quantisation = "Q4_K_M"',
    "",
]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return str(value)
