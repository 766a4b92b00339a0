"""One EVM chain connection: the in-process py-evm chain ("embedded") or a JSON-RPC URL ("rpc").

web3.py's synchronous API is used from worker threads only: its calls block, AsyncWeb3 does not
run under trio, and the in-process chain is not thread-safe. So every use of ``w3`` holds
``Chain.lock`` (any thread, synchronous callers such as benchmarks) and async callers go through
``Chain.run``, which queues them one at a time on a worker thread (a trio limiter of one).

Two things never wait in that line: functions marked ``@local`` (they need no RPC, e.g. signing a
voucher) run on their own worker thread without the lock, and the health probe (``Chain.probe``)
talks to a JSON-RPC chain through its own connection with a short timeout and no retry. While the
last probe found the chain unreachable, ``Chain.run`` refuses at once with ``chain_unavailable``
instead of queueing behind calls that wait out their timeouts.

A JSON-RPC reply is read in chunks up to :data:`MAX_RPC_REPLY` bytes and within its timeout as a
whole (not per chunk), so a hostile or broken endpoint can neither fill the node's memory nor hold a
call forever by trickling bytes: a reply too large or not JSON is ``bad_reply`` (E_UNAVAILABLE).
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import trio
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from runtime.errors import ClawnodeError
from runtime.escrow.errors import EscrowError, is_chain_error, normalise
from runtime.escrow.health import ChainHealth

# How deep a JSON-RPC reply may nest (a receipt's logs are 4 deep): runtime/jsonsafe.py says why it matters.
from runtime.jsonsafe import MAX_JSON_DEPTH as MAX_JSON_DEPTH
from runtime.jsonsafe import json_too_deep as json_too_deep

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_LOCAL_MARK = "__clawnode_chain_local__"


def local(fn: F) -> F:
    """Mark ``fn`` as needing no RPC (pure local crypto): ``Chain.run`` never queues it behind chain I/O."""
    setattr(fn, _LOCAL_MARK, True)
    return fn


def is_local(fn: Callable[..., Any]) -> bool:
    return bool(getattr(fn, _LOCAL_MARK, False))


ChainMode = Literal["embedded", "rpc"]

# The largest JSON-RPC reply read: the escrow's code (~30 KB of hex), a block with its transaction
# hashes, a receipt with logs are far below; a log query of a long soak is the largest (~1 MB).
MAX_RPC_REPLY = 4 * 1024 * 1024
_CHUNK = 64 * 1024


def read_bounded(response: Any, *, limit: int, deadline: float) -> bytes:
    """The body of a streamed ``requests`` response: ``bad_reply`` beyond ``limit`` bytes or when
    compressed (a small gzip body can inflate without bound), a ``requests.Timeout`` once
    ``time.monotonic()`` passes ``deadline`` (a reply trickled byte by byte: each read is one receive,
    bounded by the socket timeout, so the whole reply ends within about deadline + one timeout)."""
    import requests

    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise EscrowError("bad_reply")
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        raise EscrowError("bad_reply")
    body = bytearray()
    while True:
        chunk = response.raw.read1(_CHUNK, decode_content=False)
        if not chunk:
            return bytes(body)
        body.extend(chunk)
        if len(body) > limit:
            raise EscrowError("bad_reply")
        if time.monotonic() > deadline:
            raise requests.Timeout("the reply took longer than the request's timeout")


def _bounded_provider(url: str, *, timeout_s: float, retry: Any, max_reply: int) -> Any:
    """web3's HTTPProvider, reading each reply with :func:`read_bounded` and refusing one that is not JSON."""
    from web3 import HTTPProvider
    from web3._utils.http_session_manager import HTTPSessionManager

    class Sessions(HTTPSessionManager):
        def make_post_request(self, endpoint_uri: Any, data: Any, **kwargs: Any) -> bytes:
            timeout = float(kwargs.setdefault("timeout", timeout_s))
            kwargs["stream"] = True
            kwargs["headers"] = {**kwargs.get("headers", {}), "Accept-Encoding": "identity"}
            deadline = time.monotonic() + timeout
            with self.get_response_from_post_request(endpoint_uri, data=data, **kwargs) as response:
                response.raise_for_status()
                return read_bounded(response, limit=max_reply, deadline=deadline)

    class Provider(HTTPProvider):
        def decode_rpc_response(self, raw_response: bytes) -> Any:  # type: ignore[override]
            if json_too_deep(raw_response):
                raise EscrowError("bad_reply")
            try:
                return HTTPProvider.decode_rpc_response(raw_response)
            except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested to blow the stack
                raise EscrowError("bad_reply") from None

    provider = Provider(url, request_kwargs={"timeout": timeout_s}, exception_retry_configuration=retry)
    provider._request_session_manager = Sessions()
    return provider


# anvil's and hardhat's default dev accounts come from this public test mnemonic; they are only
# ever funded on local development chains.
LOCAL_DEV_MNEMONIC = "test test test test test test test test test test test junk"
LOCAL_DEV_ACCOUNTS = 10


# Chain ids of private in-process chains: random in [2**32, 2**48), far above the ids public and test
# chains use (chainlist's largest are below 2**32, anvil's 31337, eth-tester's fixed 131277322940537 is
# above the range), and below 2**53 so a JavaScript client reads them exactly. Two private chains
# share an id with probability about 2**-47.
PRIVATE_CHAIN_ID_MIN = 2**32
PRIVATE_CHAIN_ID_MAX = 2**48


def private_chain_id() -> int:
    return PRIVATE_CHAIN_ID_MIN + secrets.randbelow(PRIVATE_CHAIN_ID_MAX - PRIVATE_CHAIN_ID_MIN)


class Chain:
    """A connected chain; ``chain_id`` is read from it, never assumed."""

    def __init__(self, w3: Web3, mode: ChainMode, *, tester: Any = None, probe_w3: Web3 | None = None) -> None:
        self.w3 = w3
        self.mode = mode
        self.lock = threading.RLock()
        self._tester = tester
        self._limiter: trio.CapacityLimiter | None = None
        # A second connection for the health probe (JSON-RPC only): it never waits for the lock.
        self._probe_w3 = probe_w3
        self.health = ChainHealth("ok", "connected", time.monotonic())
        self.watched = False  # True while a health watch keeps ``health`` current
        with self.lock:
            try:
                self.chain_id: int = int(w3.eth.chain_id)
            except Exception as error:  # noqa: BLE001 - every transport error means the same here
                raise normalise(error) from None

    @classmethod
    def embedded(cls, chain_id: int | None = None) -> Chain:
        """A fresh in-process chain (py-evm via eth-tester) with ten funded dev accounts.

        ``chain_id`` replaces eth-tester's fixed id (131277322940537, the same in every process):
        a node's private chain gets one of its own (``devchain.private_chain_id``), so no other
        node's chain can be mistaken for it, and the chain signs and checks transactions with it.
        """
        from eth_tester import EthereumTester, PyEVMBackend
        from web3 import EthereumTesterProvider
        from web3.providers.eth_tester.defaults import static_return

        backend = PyEVMBackend()
        if chain_id is not None:
            # eth-tester builds its chain class per backend: the id is set on that class alone.
            type(backend.chain).chain_id = chain_id
        tester = EthereumTester(backend)
        provider = EthereumTesterProvider(tester)
        if chain_id is not None:
            endpoints: dict[str, Any] = dict(provider.api_endpoints or {})
            endpoints["eth"] = {**endpoints["eth"], "chainId": static_return(chain_id)}  # type: ignore[arg-type]
            provider.api_endpoints = endpoints
        w3 = Web3(provider)
        # A read (eth_call, gas estimate) naming no sender makes eth-tester's middleware guess one by
        # listing the accounts, twice, on every read: a third of an escrow-heavy run. The account it
        # would guess, named once.
        w3.eth.default_account = tester.get_accounts()[0]
        return cls(w3, "embedded", tester=tester)

    @classmethod
    def rpc(
        cls,
        url: str,
        *,
        timeout_s: float = 10.0,
        retries: int = 1,
        probe_timeout_s: float = 2.0,
        max_reply: int = MAX_RPC_REPLY,
    ) -> Chain:
        """A JSON-RPC chain: each read waits ``timeout_s`` and is retried ``retries`` times, so a chain
        that stopped answering fails a call within about ``(retries + 1) * timeout_s``, not after web3's
        default five tries (~52 s at 10 s); a raw transaction is sent once. A reply is at most
        ``max_reply`` bytes (``bad_reply`` beyond)."""
        import requests
        from web3.providers.rpc.utils import REQUEST_RETRY_ALLOWLIST, ExceptionRetryConfiguration

        # web3's own choice of errors to retry (an HTTP error, a timeout), and a connection refused or
        # dropped: web3 names the built-in ConnectionError, which requests' own is not a subclass of, so a
        # keep-alive connection the chain's side had closed failed the read at its first try.
        errors = (ConnectionError, requests.ConnectionError, requests.HTTPError, requests.Timeout)
        # A send whose answer timed out may have landed: resending it would only be refused ("already
        # known", "nonce too low"); its fate is read from the chain instead (``tx_status``).
        reads = [method for method in REQUEST_RETRY_ALLOWLIST if method != "eth_sendRawTransaction"]
        retry = ExceptionRetryConfiguration(
            errors=errors, retries=retries + 1, backoff_factor=0.1, method_allowlist=reads
        )
        provider = _bounded_provider(url, timeout_s=timeout_s, retry=retry, max_reply=max_reply)
        probe = _bounded_provider(url, timeout_s=probe_timeout_s, retry=None, max_reply=max_reply)
        return cls(Web3(provider), "rpc", probe_w3=Web3(probe))

    def dev_accounts(self) -> list[LocalAccount]:
        """Funded accounts of a development chain (the in-process one, or anvil/hardhat defaults)."""
        if self._tester is not None:
            return [Account.from_key(key.to_hex()) for key in self._tester.backend.account_keys]
        Account.enable_unaudited_hdwallet_features()
        return [
            Account.from_mnemonic(LOCAL_DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}")
            for index in range(LOCAL_DEV_ACCOUNTS)
        ]

    def sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` holding the chain lock (for code already on a worker thread)."""
        with self.lock:
            try:
                return fn(*args, **kwargs)
            except ClawnodeError:
                raise
            except Exception as error:
                # A raw web3 or HTTP error names the RPC URL (and its key): only a stable reason leaves.
                if is_chain_error(error):
                    raise normalise(error) from None
                raise

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on a worker thread, one call at a time per chain.

        Not abandoned on cancellation: a transaction that was handed to the chain is seen through,
        so the caller learns its outcome. A ``@local`` function runs on its own thread at once; any
        other call is refused with ``chain_unavailable`` while the health watch finds the chain
        unreachable.
        """
        if is_local(fn):
            return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
        if self.watched and self.health.state == "unreachable":
            raise EscrowError("chain_unavailable")
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(1)
        return await trio.to_thread.run_sync(functools.partial(self.sync, fn, *args, **kwargs), limiter=self._limiter)

    def probe(self, fn: Callable[[Web3], T]) -> T:
        """Blocking: ``fn(w3)`` on the probe connection (JSON-RPC: own socket, short timeout, no retry).

        The in-process chain has no second connection; its probe takes the lock (its calls are short).
        """
        if self._probe_w3 is not None:
            try:
                return fn(self._probe_w3)
            except Exception as error:  # noqa: BLE001 - normalised to a stable code
                raise normalise(error) from None
        return self.sync(fn, self.w3)

    # -- development-chain helpers (tests, demo, benchmarks) --

    def now(self) -> int:
        """The latest block's timestamp."""
        return self.sync(lambda: int(self.w3.eth.get_block("latest")["timestamp"]))

    def next_timestamp(self) -> int:
        """The timestamp the next transaction will run at (on wall-clock chains: at least)."""
        return self.sync(lambda: int(self.w3.eth.get_block("pending")["timestamp"]))

    def time_travel(self, seconds: int) -> None:
        """Move chain time forward by ``seconds`` and mine a block there."""
        with self.lock:
            if self._tester is not None:
                pending = int(self._tester.get_block_by_number("pending")["timestamp"])
                self._tester.time_travel(max(pending, self.now()) + seconds)
            else:
                self.w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
                self.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]

    def snapshot(self) -> Any:
        with self.lock:
            if self._tester is not None:
                return self._tester.take_snapshot()
            return self.w3.provider.make_request("evm_snapshot", [])["result"]  # type: ignore[arg-type]

    def revert(self, snapshot: Any) -> None:
        """Return to ``snapshot``; on JSON-RPC chains a snapshot can be reverted to only once."""
        with self.lock:
            if self._tester is not None:
                self._tester.revert_to_snapshot(snapshot)
            else:
                self.w3.provider.make_request("evm_revert", [snapshot])  # type: ignore[arg-type]
