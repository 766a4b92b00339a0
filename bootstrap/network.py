"""The network profile and ``/clawnode/network/1.1.0``: which chain and escrow a network pays on.

Nodes can only pay each other on one chain, in one escrow contract. A *network profile* names
them: the chain (CAIP-2), the escrow contract, the JSON-RPC URLs a node reaches the chain at, and
the arbiter of its escrows. On ``escrow.mode = "auto"`` (the default):

- a ``bootstrap`` node runs the network's development chain (``runtime/escrow/devchain.py``: the
  in-process chain with an id of its own, the escrow deployed, served over JSON-RPC on
  ``escrow.dev_rpc_listen``, loopback by default) and hands its profile to whoever asks;
- every other node asks its bootstrap peers for the profile when it starts, connects to that chain,
  and asks the bootstrap's faucet to fund its wallet (once per wallet); it then hands the same
  profile on to nodes that join through it. A node with no bootstrap peer, or whose bootstrap
  peers all answer that they have no shared chain, runs a private in-process chain (an id of its
  own: nobody can pay it, and discovery says so).

The protocol is one request, one reply (``wire.rpc``): ``profile`` → the profile or none;
``fund`` → whether coin was sent. A profile is only ever handed out by a node that serves or
joined a development chain; a node on an operator's chain (``mode = "rpc"``) names its chain and
contract but never its RPC URL (which may carry a key).

``/clawnode/network/1.1.0`` is ``1.0.0`` with one more profile field, ``arbiter_peer``: the peer id
of the node holding the arbiter wallet (a bootstrap serving its dev chain names itself), which a
task seller needs beside the wallet to take a single-arbiter award. ``NetworkProfile`` refuses
unknown fields, so a node from before 1.1.0 would refuse a profile naming it, find no chain and
run a private one: both ids are served, and a ``1.0.0`` asker gets the profile without
``arbiter_peer`` (``NetworkProfileV1``, the old shape). A node asks with both ids, newest first.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from runtime.errors import ClawnodeError, ErrorCode
from runtime.escrow import faucet as faucet_rule
from wire.rpc import request, serve_requests

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

NETWORK_PROTOCOL = TProtocol("/clawnode/network/1.1.0")
NETWORK_PROTOCOL_V1 = TProtocol("/clawnode/network/1.0.0")  # nodes before arbiter_peer; still served
MAX_FRAME = 4096
ADDRESS = r"^0x[0-9a-fA-F]{40}$"
CAIP2 = r"^[a-z0-9]{3,8}:[A-Za-z0-9-]{1,32}$"
PEER_ID = r"^[1-9A-HJ-NP-Za-km-z]{46,64}$"  # as escrow.arbiter_peer takes it
ASK_TIMEOUT_S = 5.0
FUND_TIMEOUT_S = 30.0


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def peer_id_valid(value: str) -> bool:
    """Whether ``value`` is a peer id in its canonical base58 text: a multihash of a public key, either the
    key itself (identity, at most 42 bytes, as an Ed25519 key's) or its sha2-256 (as an RSA key's)."""
    try:
        raw = ID.from_base58(value).to_bytes()
    except Exception:  # noqa: BLE001 - any undecodable text is the same mistake
        return False
    if ID(raw).to_base58() != value:
        return False
    identity = len(raw) >= 2 and raw[0] == 0x00 and raw[1] == len(raw) - 2 <= 42
    sha256 = len(raw) == 34 and raw[0] == 0x12 and raw[1] == 0x20
    return identity or sha256


class NetworkProfileV1(_Msg):
    """Where a network pays: chain, escrow contract, the chain's JSON-RPC URLs, the arbiter's wallet.

    The profile as ``/clawnode/network/1.0.0`` carries it, and as nodes before 1.1.0 read it (unknown
    fields refused): what a ``1.0.0`` asker is answered."""

    chain: str = Field(pattern=CAIP2, description="CAIP-2, e.g. eip155:31337")
    contract: str = Field(pattern=ADDRESS)
    rpc_urls: list[Annotated[str, Field(max_length=200, pattern=r"^https?://")]] = Field(
        default_factory=list, max_length=4, description="a development chain's JSON-RPC endpoints; empty otherwise"
    )
    arbiter: str | None = Field(None, pattern=ADDRESS)
    faucet: bool = Field(False, description="the node funds a joining wallet on request")
    stablecoin: str | None = Field(
        None, pattern=ADDRESS, description="an ERC-20 on the chain to price in (dev: a mock)"
    )

    @property
    def chain_id(self) -> int | None:
        namespace, _, reference = self.chain.partition(":")
        return int(reference) if namespace == "eip155" and reference.isdigit() else None

    @property
    def on_development_chain(self) -> bool:
        """Whether the chain is a development chain (a private id, as ``devchain`` gives one): the
        only kind a profile is handed out for, and the only kind a node joins. A transaction signed
        for such a chain can be replayed on no public one (EIP-155)."""
        from runtime.escrow.chain import PRIVATE_CHAIN_ID_MAX, PRIVATE_CHAIN_ID_MIN

        chain_id = self.chain_id
        return chain_id is not None and PRIVATE_CHAIN_ID_MIN <= chain_id < PRIVATE_CHAIN_ID_MAX


class NetworkProfile(NetworkProfileV1):
    """The profile as ``/clawnode/network/1.1.0`` carries it: the arbiter's peer id beside its wallet."""

    arbiter_peer: str | None = Field(
        None,
        pattern=PEER_ID,
        description="peer id of the node holding the arbiter wallet, where a dispute's case goes (a bootstrap "
        "serving its dev chain: itself); none: not known",
    )

    @field_validator("arbiter_peer")
    @classmethod
    def _peer_id(cls, value: str | None) -> str | None:
        if value is not None and not peer_id_valid(value):
            raise ValueError("arbiter_peer is not a peer id")
        return value

    @model_validator(mode="after")
    def _peer_with_wallet(self) -> NetworkProfile:
        if self.arbiter_peer is not None and self.arbiter is None:
            raise ValueError("arbiter_peer names the holder of the arbiter wallet: it needs arbiter")
        return self

    def v1(self) -> NetworkProfileV1:
        """The profile a ``1.0.0`` asker reads: the same, less ``arbiter_peer``."""
        return NetworkProfileV1.model_validate(self.model_dump(exclude={"arbiter_peer"}))

    def arbiter_pair(self, wallet: str) -> tuple[str, str] | None:
        """The arbiter this profile names as a (peer id, wallet) pair, when it names the peer of ``wallet``
        (the arbiter wallet the node uses, compared case-insensitively); None otherwise."""
        if self.arbiter_peer is None or self.arbiter is None or self.arbiter.lower() != wallet.lower():
            return None
        return self.arbiter_peer, wallet


class ProfileRequest(_Msg):
    type: Literal["profile"] = "profile"


class FundRequest(_Msg):
    type: Literal["fund"] = "fund"
    address: str = Field(pattern=ADDRESS)


class ProfileReply(_Msg):
    type: Literal["profile"] = "profile"
    profile: NetworkProfile | None = None


class ProfileReplyV1(_Msg):
    """The ``1.0.0`` reply: the profile in the shape nodes before 1.1.0 read."""

    type: Literal["profile"] = "profile"
    profile: NetworkProfileV1 | None = None


class FundReply(_Msg):
    type: Literal["funded"] = "funded"
    funded: bool


_REQUESTS: TypeAdapter[ProfileRequest | FundRequest] = TypeAdapter(
    Annotated[ProfileRequest | FundRequest, Field(discriminator="type")]
)
_PROFILE = TypeAdapter(ProfileReply)
_FUNDED = TypeAdapter(FundReply)

Faucet = Callable[[str], Awaitable[bool]]
_PROTOCOLS = (NETWORK_PROTOCOL, NETWORK_PROTOCOL_V1)  # newest first: the peer speaks the first it knows


class NetworkService:
    """Answers ``/clawnode/network/1.1.0`` (and ``1.0.0``) with this node's profile and, on a dev chain's
    node, its faucet."""

    def __init__(self, host: IHost, *, preparing: bool = False) -> None:
        self.host = host
        self.profile: NetworkProfile | None = None
        self.faucet: Faucet | None = None
        # While this node still starts or joins its chain it says so (``network_starting``), so a
        # node joining through it asks again instead of taking "no profile" for an answer.
        self.preparing = preparing
        # How this node came to its chain (``clawnode network``): serving (a bootstrap's dev chain),
        # joined (through ``joined_through``), private (its own in-process chain), or not known yet.
        self.state: Literal["starting", "serving", "joined", "private"] = "starting"
        self.joined_through: str | None = None
        self._nursery: trio.Nursery | None = None
        # When this node last granted fund requests: the faucet's rate (runtime/escrow/faucet.py).
        self._grants: deque[float] = deque(maxlen=faucet_rule.GRANTS_PER_WINDOW)

    async def run(self, *, task_status: TaskStatus[NetworkService] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer the protocol (and serve a development chain, once started) until cancelled."""
        self.host.set_stream_handler(NETWORK_PROTOCOL, serve_requests(self._handle, max_frame=MAX_FRAME))
        self.host.set_stream_handler(NETWORK_PROTOCOL_V1, serve_requests(self._handle_v1, max_frame=MAX_FRAME))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.host.remove_stream_handler(NETWORK_PROTOCOL)
            self.host.remove_stream_handler(NETWORK_PROTOCOL_V1)

    def forget(self) -> None:
        """The chain this node joined is gone: no profile to hand on until it joins again."""
        self.profile, self.faucet, self.joined_through = None, None, None
        self.state, self.preparing = "starting", True

    async def _handle(self, frame: bytes, remote: ID) -> BaseModel:
        message = _REQUESTS.validate_json(frame)
        if self.preparing:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "this node is still starting its chain", "network_starting")
        if isinstance(message, ProfileRequest):
            return ProfileReply(profile=self.profile)
        if self.faucet is None or self.profile is None or not self.profile.faucet:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "this node runs no faucet", "no_faucet")
        # Once per wallet, a bounded number of wallets (runtime/escrow/devchain.py), at a bounded rate.
        refusal = faucet_rule.faucet_verdict(trio.current_time(), self._grants)
        if refusal is not None:
            raise refusal
        self._grants.append(trio.current_time())  # counted before the await: concurrent asks see it
        return FundReply(funded=await self.faucet(message.address))

    async def _handle_v1(self, frame: bytes, remote: ID) -> BaseModel:
        """``1.0.0``: the same answers, the profile without ``arbiter_peer`` (which its askers refuse)."""
        reply = await self._handle(frame, remote)
        if isinstance(reply, ProfileReply):
            return ProfileReplyV1(profile=None if reply.profile is None else reply.profile.v1())
        return reply


async def ask_profile(host: IHost, peer: ID, *, timeout_s: float = ASK_TIMEOUT_S) -> NetworkProfile | None:
    """The peer's network profile; None when it has none. Raises ``ClawnodeError`` when it cannot say.

    Asked on ``1.1.0``, else ``1.0.0`` (a node before 1.1.0: its profile names no ``arbiter_peer``)."""
    reply = await request(host, peer, _PROTOCOLS, ProfileRequest(), _PROFILE, timeout_s=timeout_s, max_frame=MAX_FRAME)
    return reply.profile


async def ask_funds(host: IHost, peer: ID, address: str, *, timeout_s: float = FUND_TIMEOUT_S) -> bool:
    """Ask the peer's faucet to fund ``address``; whether it sent coin."""
    reply = await request(
        host, peer, _PROTOCOLS, FundRequest(address=address), _FUNDED, timeout_s=timeout_s, max_frame=MAX_FRAME
    )
    return reply.funded


def peer_of(addr: str) -> tuple[ID, str | None] | None:
    """The peer id a bootstrap multiaddr ends in, and its IP (None for a DNS name); None if malformed."""
    try:
        parsed = multiaddr.Multiaddr(addr)
        peer = ID.from_base58(parsed.value_for_protocol("p2p"))
    except Exception:  # noqa: BLE001 - a malformed address names no peer
        return None
    ip = None
    for protocol in ("ip4", "ip6"):
        try:
            ip = parsed.value_for_protocol(protocol)
            break
        except Exception:  # noqa: BLE001 - not this family
            continue
    return peer, ip


def reachable_url(url: str, peer_ip: str | None) -> str:
    """A dev chain URL bound to every interface (``0.0.0.0``, ``::``) names the bootstrap's own IP instead."""
    parts = urlsplit(url)
    if parts.hostname not in ("0.0.0.0", "::") or peer_ip is None:
        return url
    host = f"[{peer_ip}]" if ":" in peer_ip else peer_ip
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))


# -- escrow.mode = "auto": serve the network's chain, or join the one a bootstrap peer serves --

JOIN_RETRY_S = 1.0
DEV_CHAIN_TIMEOUT_S = 10.0


async def find_profile(
    host: IHost, bootstrap_addrs: list[str], *, timeout_s: float
) -> tuple[ID, NetworkProfile] | None:
    """Ask the bootstrap peers for a profile naming a chain's URL until one does (or ``timeout_s``).

    None when there is no bootstrap peer, when every one of them answered that it has none, or when
    none answered in time. The URLs come back reachable from here (:func:`reachable_url`).
    """
    pending: dict[ID, str | None] = {}
    for addr in bootstrap_addrs:
        parsed = peer_of(addr)
        if parsed is not None and parsed[0] != host.get_id():
            pending.setdefault(parsed[0], parsed[1])
    with trio.move_on_after(timeout_s):
        while pending:
            for peer, ip in list(pending.items()):
                try:
                    profile = await ask_profile(host, peer)
                except ClawnodeError as error:
                    log.debug("network profile from %s: %s", peer, error.code)
                    continue  # not reachable yet, or an older node: asked again
                if profile is None or not profile.rpc_urls:
                    del pending[peer]
                    continue
                if not profile.on_development_chain:
                    # A bootstrap naming eip155:1 would have this node sign its escrow transactions for
                    # mainnet and hand them to the bootstrap's URL: replayable there with an imported wallet.
                    log.warning("bootstrap peer %s names %s, not a development chain: not joined", peer, profile.chain)
                    del pending[peer]
                    continue
                urls = [reachable_url(url, ip) for url in profile.rpc_urls]
                return peer, profile.model_copy(update={"rpc_urls": urls})
            await trio.sleep(JOIN_RETRY_S)
    return None


class ChainTimeouts(BaseModel):
    model_config = ConfigDict(frozen=True)

    rpc_timeout_s: float = 5.0
    rpc_retries: int = 1
    health_timeout_s: float = 2.0


async def serve_network_chain(service: NetworkService, wallet_key: bytes, *, listen_host: str, listen_port: int) -> Any:
    """As the network's bootstrap: start the development chain, serve it in ``nursery``, fund our own
    wallet, publish the profile and the faucet; the node's ``EscrowClient``."""
    from eth_account import Account

    from runtime.escrow.devchain import DevChain

    if service._nursery is None:
        raise ClawnodeError(ErrorCode.UNAVAILABLE, "the network service is not running")
    dev: DevChain = await trio.to_thread.run_sync(DevChain.start)
    url: str = await service._nursery.start(dev.serve, listen_host, listen_port)
    wallet = Account.from_key(wallet_key)
    await trio.to_thread.run_sync(dev.fund, wallet.address)

    async def faucet(address: str) -> bool:
        return await dev.chain.run(dev.fund, address)

    service.faucet = faucet
    service.profile = NetworkProfile(
        chain=f"eip155:{dev.chain.chain_id}",
        contract=dev.deployer.address,
        rpc_urls=[url],
        arbiter=wallet.address,  # the bootstrap's own key: a dev account's is public
        # ... held by this node, which takes a dispute's case for that wallet as this peer (protocols/task/arbiter.py)
        arbiter_peer=str(service.host.get_id()),
        faucet=True,
        stablecoin=dev.token or None,
    )
    service.state = "serving"
    service.preparing = False
    log.info("serving the network's development chain eip155:%d, escrow %s", dev.chain.chain_id, dev.deployer.address)
    return dev.deployer.for_account(wallet)


async def join_network_chain(
    service: NetworkService,
    host: IHost,
    wallet_key: bytes,
    *,
    bootstrap_addrs: list[str],
    join_timeout_s: float,
    timeouts: ChainTimeouts,
) -> Any:
    """Join the chain a bootstrap peer's profile names (funded by its faucet), else a private chain.

    The node's ``EscrowClient``. Raises ``EscrowError`` when the named chain does not answer or holds
    no escrow at the named address (the caller retries).
    """
    from eth_account import Account

    from runtime.escrow import EscrowSettings, connect_escrow

    wallet = Account.from_key(wallet_key)
    found = await find_profile(host, bootstrap_addrs, timeout_s=join_timeout_s)
    if found is None:
        if bootstrap_addrs:
            log.warning("no bootstrap peer named a network chain: this node pays on a private chain of its own")
        service.preparing = False  # asked, it names no chain: nobody can pay on a private one
        service.state = "private"
        return await trio.to_thread.run_sync(connect_escrow, EscrowSettings(mode="embedded"), wallet)
    peer, profile = found
    client: Any = None
    for index, url in enumerate(profile.rpc_urls):  # the first that answers with the escrow on the named chain
        settings = EscrowSettings(
            mode="rpc",
            rpc_url=url,
            contract=profile.contract,
            chain_id=profile.chain_id,
            rpc_timeout_s=max(timeouts.rpc_timeout_s, DEV_CHAIN_TIMEOUT_S),
            rpc_retries=timeouts.rpc_retries,
            # A development chain answers from another Python process, which a busy machine can keep
            # off the CPU for seconds (4 ms a request when idle): a 2 s probe took it for down.
            health_timeout_s=max(timeouts.health_timeout_s, DEV_CHAIN_TIMEOUT_S),
        )
        try:
            client = await trio.to_thread.run_sync(connect_escrow, settings, wallet)
            break
        except ClawnodeError as error:
            if index == len(profile.rpc_urls) - 1:
                raise
            log.info(
                "the network's chain URL %d of %d failed (%s); trying the next",
                index + 1,
                len(profile.rpc_urls),
                error.reason,
            )
    assert client is not None  # mode rpc always connects or raises
    balance = await client.chain.run(lambda: int(client.chain.w3.eth.get_balance(wallet.address)))
    funded = False
    if balance == 0 and profile.faucet:
        try:
            funded = await ask_funds(host, peer, wallet.address)
        except ClawnodeError as error:
            log.warning("the network's faucet did not fund this wallet (%s %s)", error.code, error.reason or "")
    log.info("joined the network chain %s through %s%s", profile.chain, peer, ", wallet funded" if funded else "")

    # Nodes joining through this one learn the same chain (the URL as reached from here), and their
    # fund requests are passed on to the faucet this node was funded by.
    async def faucet(address: str) -> bool:
        return await ask_funds(host, peer, address)

    service.faucet = faucet if profile.faucet else None
    service.profile = profile
    service.state, service.joined_through = "joined", str(peer)
    service.preparing = False
    return client
