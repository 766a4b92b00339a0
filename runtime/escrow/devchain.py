"""A network's development chain: the in-process chain, the escrow on it, served over JSON-RPC.

The bootstrap node of a local network runs it (``escrow.mode = "auto"``, the default, on role
``bootstrap``): one py-evm chain with a chain id of its own (:func:`private_chain_id`), the escrow
contract deployed by its first dev account, and a JSON-RPC endpoint the nodes that join through
the bootstrap connect to as to any chain (``Chain.rpc``). A faucet gives each joining wallet coin
once.

The in-process chain starts with ten funded accounts whose keys are the same in every process
(eth-tester's): anyone who reaches the endpoint could spend them. So :meth:`DevChain.start` makes a
faucet account with a fresh random key, sweeps the known accounts' coin into it (each keeps
:data:`KNOWN_ACCOUNT_KEEP`, as a read without a sender is charged to the first of them), and keeps
the faucet's key in the bootstrap's memory only; the network's arbiter is the bootstrap's own wallet (a known
key as arbiter would let any buyer resolve its own disputed escrow to itself).

The endpoint is a small door into a process, so it opens little: loopback by default, POST only,
a body of at most :data:`MAX_RPC_BODY` bytes, no batches, only the methods the escrow client uses
(:data:`RPC_METHODS`), an ``eth_call``/``eth_estimateGas`` gas cap (:data:`MAX_CALL_GAS`) and a
sent transaction's gas limit at most :data:`MAX_SEND_GAS` (a creation: the escrow's deploy gas), so a caller
cannot make the chain's one thread loop for long. Every request runs under the chain's lock
on a worker thread, one at a time, like the node's own chain calls.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from eth_account import Account
from eth_account.signers.local import LocalAccount

from runtime.errors import ClawnodeError, ErrorCode
from runtime.escrow.chain import Chain, json_too_deep, private_chain_id
from runtime.escrow.client import GAS_LIMITS, EscrowClient
from runtime.escrow.errors import redact
from runtime.escrow.settings import fund_from_dev_account
from runtime.escrow.token import TokenClient

log = logging.getLogger(__name__)

MAX_RPC_BODY = 256 * 1024  # the deploy transaction (~20 KB of hex) with room to spare
MAX_CALL_GAS = GAS_LIMITS["deploy"]
# A sent transaction needs no more gas than the escrow client's largest call: a loop up to the
# block's gas limit held the chain (and every node's escrow calls) for ~11 s per transaction.
MAX_SEND_GAS = max(limit for name, limit in GAS_LIMITS.items() if name != "deploy")
MAX_ERROR_MESSAGE = 300
KEEP_ALIVE_S = 300.0
RPC_METHODS = frozenset(
    {
        "eth_chainId",
        "net_version",
        "eth_blockNumber",
        "eth_getBlockByNumber",
        "eth_getBalance",
        "eth_getCode",
        "eth_call",
        "eth_estimateGas",
        "eth_getTransactionCount",
        "eth_gasPrice",
        "eth_sendRawTransaction",
        "eth_getTransactionReceipt",
        "eth_getTransactionByHash",
    }
)

# What a faucet hands each new wallet, and how many wallets it funds at most (a stranger cannot
# drain the dev account by asking for fresh addresses forever).
FAUCET_AMOUNT = 100 * 10**18  # 1024 wallets take a tenth of the dev account's 10**6 ETH
FAUCET_MAX_WALLETS = 1024
# And of the network's mock stablecoin (MockERC20, 6 decimals: 1,000 test dollars), to price and pay in.
FAUCET_TOKENS = 1_000 * 10**6


KNOWN_ACCOUNT_KEEP = 10**18  # 10 ETH in all: less than one faucet grant is left to whoever knows the keys


def sweep_known_accounts(chain: Chain, to: str) -> None:
    """Blocking: move the coin of the chain's known dev accounts to ``to`` (their keys are public)."""
    with chain.lock:
        w3 = chain.w3
        gas_price = int(w3.eth.gas_price)
        for account in chain.dev_accounts():
            left = int(w3.eth.get_balance(account.address)) - 21_000 * gas_price - KNOWN_ACCOUNT_KEEP
            if left <= 0:
                continue
            tx: dict[str, Any] = {
                "to": w3.to_checksum_address(to),
                "value": left,
                "gas": 21_000,
                "gasPrice": gas_price,
                "nonce": int(w3.eth.get_transaction_count(account.address, "pending")),
                "chainId": chain.chain_id,
            }
            signed = account.sign_transaction(tx)
            w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction))


def _to_wire(value: Any) -> Any:
    """A web3 result as JSON-RPC writes it: quantities and bytes as 0x hex, keys as they are."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, str):
        return value
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(key): _to_wire(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_to_wire(item) for item in value]
    return str(value)


def _error(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message[:MAX_ERROR_MESSAGE]}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def _capped_call(params: list[Any]) -> list[Any]:
    """``eth_call``/``eth_estimateGas`` params with the transaction's gas at most :data:`MAX_CALL_GAS`."""
    if not params or not isinstance(params[0], dict):
        return params
    tx = dict(params[0])
    gas = tx.get("gas")
    try:
        asked = int(gas, 16) if isinstance(gas, str) else int(gas) if isinstance(gas, int) else MAX_CALL_GAS
    except ValueError:
        asked = MAX_CALL_GAS
    tx["gas"] = hex(min(max(asked, 21_000), MAX_CALL_GAS))
    return [tx, *params[1:]]


def _sent_gas_refusal(params: list[Any]) -> str | None:
    """Why an ``eth_sendRawTransaction`` is refused before the chain sees it, or None.

    Decoded by hand (legacy, EIP-2930 and EIP-1559 layouts): a gas limit above
    :data:`MAX_SEND_GAS` (a contract creation: :data:`MAX_CALL_GAS`, what deploying the escrow takes)."""
    import rlp  # eth-account's own dependency

    try:
        raw = bytes.fromhex(str(params[0]).removeprefix("0x"))
        if raw and raw[0] < 0x7F:  # typed: 0x01 (gasPrice at 2) or 0x02 (fee cap at 3), gas next
            if raw[0] not in (1, 2):
                return "unknown transaction type"
            fields = rlp.decode(raw[1:])
            gas_at = 3 if raw[0] == 1 else 4
        else:
            fields = rlp.decode(raw)
            gas_at = 2
        gas, to = int.from_bytes(fields[gas_at], "big"), fields[gas_at + 1]
    except Exception:  # noqa: BLE001 - anything undecodable is refused, never passed on
        return "undecodable transaction"
    cap = MAX_CALL_GAS if not to else MAX_SEND_GAS  # a creation may deploy an escrow, nothing larger
    if gas > cap:
        return f"gas limit above {cap}"
    return None


def answer_rpc(chain: Chain, body: bytes) -> dict[str, Any]:
    """Blocking: one JSON-RPC request against ``chain`` (its lock held); the JSON-RPC reply object."""
    if json_too_deep(body):  # 256 KB of "[" overflowed the decoder's C stack and killed the node
        return _error(None, -32600, "request nested too deep")
    try:
        request = json.loads(body)
    except ValueError:
        return _error(None, -32700, "parse error")
    if not isinstance(request, dict):
        return _error(None, -32600, "one request object per call (no batches)")
    request_id = request.get("id")
    if not isinstance(request_id, int | str | None) or (isinstance(request_id, str) and len(request_id) > 64):
        request_id = None
    method, params = request.get("method"), request.get("params", [])
    if not isinstance(method, str) or method not in RPC_METHODS:
        return _error(request_id, -32601, "method not served by this development chain")
    if not isinstance(params, list) or len(params) > 4:
        return _error(request_id, -32602, "params must be a list of at most 4 items")
    if method in ("eth_call", "eth_estimateGas"):
        params = _capped_call(params)
    if method == "eth_sendRawTransaction":
        refusal = _sent_gas_refusal(params) if params else "params must hold the raw transaction"
        if refusal is not None:
            return _error(request_id, -32602, f"transaction refused: {refusal}")
    with chain.lock:
        try:
            result = chain.w3.manager.request_blocking(method, params)  # type: ignore[arg-type]
        except Exception as error:  # noqa: BLE001 - every chain error goes back as a JSON-RPC error
            text = " ".join(str(part) for part in (getattr(error, "message", None), *error.args) if part)
            return _error(request_id, 3 if "revert" in text.lower() else -32000, redact(text) or type(error).__name__)
    return {"jsonrpc": "2.0", "id": request_id, "result": _to_wire(result)}


@dataclass
class DevChain:
    """A network's development chain: the chain, its escrow deployment, the faucet's book."""

    chain: Chain
    deployer: EscrowClient
    faucet: LocalAccount  # a fresh key, never served: the known dev accounts are swept into it
    token: str = ""  # the network's mock stablecoin (MockERC20): what ``fund`` also hands out
    funded: set[str] = field(default_factory=set)
    url: str = ""  # the JSON-RPC URL once served

    @classmethod
    def start(cls) -> DevChain:
        """Blocking: a fresh chain with a private id, the escrow deployed, the known accounts' coin
        swept into a faucet account of its own."""
        chain = Chain.embedded(chain_id=private_chain_id())
        deployer = EscrowClient.deploy(chain, chain.dev_accounts()[0])
        token = TokenClient.deploy(chain, chain.dev_accounts()[0]).address
        faucet: LocalAccount = Account.create()
        sweep_known_accounts(chain, faucet.address)
        return cls(chain, deployer, faucet, token)

    def fund(self, address: str) -> bool:
        """Blocking: give ``address`` :data:`FAUCET_AMOUNT` and :data:`FAUCET_TOKENS` of the mock stablecoin
        once; False when it had its share or the faucet is done."""
        key = address.lower()
        if key in self.funded or len(self.funded) >= FAUCET_MAX_WALLETS:
            return False
        self.funded.add(key)
        try:
            fund_from_dev_account(self.chain, address, FAUCET_AMOUNT, source=self.faucet)
            if self.token:
                TokenClient(self.chain, self.faucet, self.token).mint(address, FAUCET_TOKENS)
        except Exception:
            self.funded.discard(key)
            raise
        return True

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the chain over JSON-RPC on ``host:port`` (0: any free port) until cancelled; ``url`` is set."""
        from hypercorn.config import Config as HypercornConfig
        from hypercorn.trio import serve

        config = HypercornConfig()
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.accesslog = None
        config.errorlog = None
        # Longer than any client's idle gap (the health probe comes every few seconds): at hypercorn's
        # 5 s default the server closed an idle connection just as a probe reused it, and the node
        # took its chain for down.
        config.keep_alive_timeout = KEEP_ALIVE_S
        app = rpc_app(self.chain)

        outer = task_status

        class Started:
            """Sets ``url`` from the address hypercorn bound, then tells the caller."""

            def started(self_, bound: list[str]) -> None:
                self.url = bound[0]
                log.info("development chain %d served over JSON-RPC on %s", self.chain.chain_id, redact(self.url))
                outer.started(self.url)

        taken = ClawnodeError(
            ErrorCode.UNAVAILABLE,
            f"cannot serve the development chain on {host}:{port}: the port is in use (escrow.dev_rpc_listen)",
            "port_in_use",
        )
        try:
            await serve(app, config, task_status=Started())  # type: ignore[arg-type]
        except OSError:
            raise taken from None
        except BaseExceptionGroup as group:
            # Raised bare (not in a group), so the daemon's escrow connect loop retries it like any other.
            bind_failed, rest = group.split(OSError)
            if bind_failed is not None and rest is None:
                raise taken from None
            raise


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def rpc_app(chain: Chain) -> Callable[[dict[str, Any], Receive, Send], Awaitable[None]]:
    """The ASGI app of :func:`answer_rpc`: POST only, a bounded body read before anything is parsed."""

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":
            await _reply(send, 405, _error(None, -32600, "POST a JSON-RPC request"))
            return
        body = bytearray()
        while True:
            message = await receive()
            body.extend(message.get("body", b""))
            if len(body) > MAX_RPC_BODY:
                await _reply(send, 413, _error(None, -32600, f"request larger than {MAX_RPC_BODY} bytes"))
                return
            if not message.get("more_body"):
                break
        reply = await chain.run(answer_rpc, chain, bytes(body))
        await _reply(send, 200, reply)

    return app


async def _reply(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
