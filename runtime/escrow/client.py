"""The escrow client: typed calls to the escrow contract with explicit gas and one nonce manager.

Synchronous (web3.py's sync API): call it from a worker thread, e.g. through ``Chain.run``. Every
state-changing call is first tried with ``eth_call`` so a revert surfaces with the contract's
reason on every chain (a mined failing transaction carries none), then signed locally with an
explicit gas limit (py-evm's estimation triples the cost of a call) and sent. Amounts are integers
in wei; escrow ids are 32 bytes.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import trio
from eth_abi import encode as abi_encode
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from web3.contract import Contract

from runtime.escrow import artifacts
from runtime.escrow.chain import Chain, local
from runtime.escrow.errors import EscrowError, normalise
from runtime.escrow.fees import Fees, choose_fees, gas_share_refusal
from runtime.escrow.health import ChainHealth, ContractVerdict, judge_contract, next_health

log = logging.getLogger(__name__)

# Gas limits per call: the measured cost (bench/ledger.py prints it) with headroom. Explicit so
# nothing depends on a chain's estimator.
GAS_LIMITS: dict[str, int] = {
    "deploy": 3_600_000,
    "lock": 250_000,
    "lock_token": 300_000,
    "lock_panel": 400_000,
    "top_up": 150_000,
    "release": 120_000,
    "claim": 150_000,
    "draw": 150_000,
    "settle": 170_000,
    "refund": 120_000,
    "dispute": 120_000,
    "resolve": 150_000,
    "resolve_by_panel": 250_000,
    "withdraw": 120_000,
    "withdraw_token": 120_000,
    "approve": 80_000,
}

ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"

RECEIPT_TIMEOUT_S = 120.0
# After this long without a receipt, look whether the transaction can still be mined at all: the chain
# dropped it (a reset under it) or its nonce lies beyond the chain's pending count (a gap, never mined).
STALL_CHECK_S = 3.0


class LockJournal(Protocol):
    """Where the client records a lock before it sends it and what became of it (the ledger).

    Called on the chain's worker thread; ``lock_intent`` raising (a full disk) stops the send.
    ``escrow_id`` is ``0x`` + 64 hex digits.
    """

    def lock_intent(self, *, contract: str, payer: str, escrow_id: str, amount: int) -> None: ...

    def lock_signed(self, *, payer: str, escrow_id: str, tx_hash: str) -> None: ...

    def lock_outcome(self, *, payer: str, escrow_id: str, outcome: LockOutcome, tx_hash: str | None) -> None: ...


# "landed": mined; "failed": nothing was sent, or it was mined and reverted (no value moved);
# "unknown": sent, but no receipt came (it may still land: the reconciliation looks for it).
LockOutcome = Literal["landed", "failed", "unknown"]

EscrowPhase = Literal["none", "active", "disputed", "closed"]
_PHASES: tuple[EscrowPhase, ...] = ("none", "active", "disputed", "closed")


@dataclass(frozen=True)
class EscrowState:
    payee: str
    arbiter: str
    amount: int
    released: int
    deadline: int
    window: int
    phase: EscrowPhase
    token: str = ZERO_ADDRESS  # the ERC-20 it holds; ZERO_ADDRESS: the chain's native coin
    threshold: int = 0  # m of a panel escrow (its arbiter is then ZERO_ADDRESS); 0: one arbiter

    @property
    def native(self) -> bool:
        return int(self.token, 16) == 0

    @property
    def remaining(self) -> int:
        """What is still locked (0 once closed)."""
        return 0 if self.phase in ("none", "closed") else self.amount - self.released


@dataclass(frozen=True)
class TxResult:
    tx_hash: str
    gas_used: int
    block_number: int


def escrow_key(payer: str, escrow_id: bytes) -> bytes:
    """The contract's storage key for (payer, id)."""
    return keccak(abi_encode(["address", "bytes32"], [to_checksum_address(payer), escrow_id]))


def voucher_digest(chain_id: int, contract: str, payer: str, escrow_id: bytes, cumulative: int) -> bytes:
    """What the payer's EIP-191 voucher signs: (chain id, contract, escrow key, cumulative amount)."""
    return keccak(
        abi_encode(
            ["uint256", "address", "bytes32", "uint256"],
            [chain_id, to_checksum_address(contract), escrow_key(payer, escrow_id), cumulative],
        )
    )


# secp256k1's group order halved: the contract refuses signatures with a higher s (malleable twins).
_HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


def voucher_signer(
    chain_id: int, contract: str, payer: str, escrow_id: bytes, cumulative: int, signature: str | bytes
) -> str | None:
    """Who signed a voucher for exactly ``cumulative`` wei, as the contract's ``claim`` would recover it.

    Off-chain and pure (no chain access): ``None`` for a malformed or high-s signature, which the
    contract would refuse; otherwise the recovered address (the payer's only if the voucher holds).
    """
    return _recover(lambda: voucher_digest(chain_id, contract, payer, escrow_id, cumulative), signature)


# What a panel vote's digest starts with, so a vote can never be taken for a voucher (the contract's PANEL_TAG).
PANEL_TAG = keccak(text="clawnode.escrow.panel_vote")


def panel_vote_digest(chain_id: int, contract: str, payer: str, escrow_id: bytes, to_payee: int) -> bytes:
    """What a panel arbiter's EIP-191 vote signs: the payee gets ``to_payee`` of what is still locked."""
    return keccak(
        abi_encode(
            ["bytes32", "uint256", "address", "bytes32", "uint256"],
            [PANEL_TAG, chain_id, to_checksum_address(contract), escrow_key(payer, escrow_id), to_payee],
        )
    )


def panel_vote_signer(
    chain_id: int, contract: str, payer: str, escrow_id: bytes, to_payee: int, signature: str | bytes
) -> str | None:
    """Who signed a panel vote for exactly ``to_payee``, as ``resolve_by_panel`` would recover it (pure);
    ``None`` for a malformed or high-s signature. Count it only if the address is on the escrow's panel."""
    return _recover(lambda: panel_vote_digest(chain_id, contract, payer, escrow_id, to_payee), signature)


# What a lease dispute case's digest starts with, so a case can never be taken for a voucher or a vote.
CASE_TAG = keccak(text="clawnode.lease_dispute.case")


def dispute_case_digest(chain_id: int, contract: str, payer: str, escrow_id: bytes, owed: int) -> bytes:
    """What the payer's EIP-191 signature on a lease dispute case signs: the escrow and the consumer's
    ``owed_if_honest`` (so only the payer, not the payee that can also freeze the escrow, states it)."""
    return keccak(
        abi_encode(
            ["bytes32", "uint256", "address", "bytes32", "uint256"],
            [CASE_TAG, chain_id, to_checksum_address(contract), escrow_key(payer, escrow_id), owed],
        )
    )


def dispute_case_signer(
    chain_id: int, contract: str, payer: str, escrow_id: bytes, owed: int, signature: str | bytes
) -> str | None:
    """Who signed a dispute case for exactly ``owed`` (pure); ``None`` for a malformed or high-s signature."""
    return _recover(lambda: dispute_case_digest(chain_id, contract, payer, escrow_id, owed), signature)


def _recover(digest: Callable[[], bytes], signature: str | bytes) -> str | None:
    from eth_account import Account

    try:
        raw = bytes.fromhex(signature.removeprefix("0x")) if isinstance(signature, str) else bytes(signature)
    except ValueError:
        return None
    if len(raw) != 65 or int.from_bytes(raw[32:64], "big") > _HALF_N:
        return None
    v = raw[64] + 27 if raw[64] < 27 else raw[64]
    try:
        signer = Account.recover_message(encode_defunct(primitive=digest()), vrs=(v, raw[:32], raw[32:64]))
    except Exception:  # noqa: BLE001 - any malformed signature is simply nobody's
        return None
    return str(signer)


def asset_id(chain_id: int, token: str | None = None) -> str:
    """The CAIP-19 name of what an escrow holds: the chain's native coin, or an ERC-20 token on it."""
    if token is None or int(token, 16) == 0:
        return f"eip155:{chain_id}/slip44:60"
    return f"eip155:{chain_id}/erc20:{to_checksum_address(token)}"


_ASSET = re.compile(r"^eip155:([1-9][0-9]{0,19})/(?:slip44:60|erc20:(0x[0-9a-fA-F]{40}))$")


NATIVE_ASSET = "ETH"  # what a capability record's price names for the chain's own coin
_RECORD_TOKEN = re.compile(r"^erc20:(0x[0-9a-fA-F]{40})$")


def record_asset(token: str | None = None) -> str:
    """What a capability record's ``pricing.asset`` says for an escrow in ``token`` (the record's
    ``pricing.chain`` names the chain): ``ETH`` for the native coin, ``erc20:<checksummed address>``."""
    if token is None or int(token, 16) == 0:
        return NATIVE_ASSET
    return f"erc20:{to_checksum_address(token)}"


def asset_token(asset: str) -> str | None:
    """The ERC-20 address a record's ``pricing.asset`` names, or None for a coin symbol (``ETH``)."""
    match = _RECORD_TOKEN.match(asset)
    return to_checksum_address(match.group(1)) if match else None


def parse_asset(asset: str) -> tuple[int, str | None]:
    """(chain id, token address or None for the native coin) of a CAIP-19 :func:`asset_id`; ValueError otherwise."""
    match = _ASSET.match(asset)
    if match is None:
        raise ValueError("an asset is eip155:<chain id>/slip44:60 or eip155:<chain id>/erc20:<address>")
    token = match.group(2)
    return int(match.group(1)), to_checksum_address(token) if token else None


class NonceManager:
    """The next nonce of one account, re-read from the chain's ``pending`` count before every send.

    All of an account's sends go through the chain's one write lane and each waits for its receipt,
    so the chain's pending count is the right nonce every time; a cached count would be stale after
    a chain reset (an anvil restart puts every account back at 0, and a transaction sent with the
    old nonce waits behind a gap forever). ``resyncs`` counts the times the chain disagreed with the
    count kept here (a reset, another sender with the same key, a transaction dropped by the chain).
    """

    def __init__(self, chain: Chain, address: str) -> None:
        self._chain = chain
        self._address = address
        self._next: int | None = None
        self.resyncs = 0

    def pending_count(self) -> int:
        return int(self._chain.w3.eth.get_transaction_count(self._address, "pending"))  # type: ignore[arg-type]

    def take(self) -> int:
        nonce = self.pending_count()
        if self._next is not None and nonce != self._next:
            self.resyncs += 1
            log.info("nonce resynced from the chain: expected %d, the chain's pending count is %d", self._next, nonce)
        self._next = nonce + 1
        return nonce

    def forget(self) -> None:
        """A send failed or its fate is unknown: expect nothing of the next count."""
        self._next = None


def is_nonce_error(error: BaseException) -> bool:
    """The chain refused a transaction for its nonce (too low: already used; too high: a gap)."""
    text = " ".join(str(part) for part in (getattr(error, "message", None), *error.args) if part).lower()
    return "nonce too low" in text or "nonce too high" in text


class EscrowClient:
    """One wallet's view of one deployed escrow contract."""

    def __init__(
        self, chain: Chain, account: LocalAccount, address: str, *, expected_chain_id: int | None = None
    ) -> None:
        self.chain = chain
        self.account = account
        self.address = to_checksum_address(address)
        self.expected_chain_id = expected_chain_id
        self.contract: Contract = chain.w3.eth.contract(address=self.address, abi=artifacts.load().abi)
        self._init_sender()

    def _init_sender(self) -> None:
        self._nonces = NonceManager(self.chain, self.account.address)
        self.receipt_timeout_s = RECEIPT_TIMEOUT_S
        self.stall_check_s = STALL_CHECK_S
        # The ledger, set by the daemon: each lock is recorded before it is sent.
        self.lock_journal: LockJournal | None = None
        # escrow.max_gas_share, set by the daemon: a lock whose lease gas would exceed this share of
        # its amount is refused before anything is sent (runtime/escrow/fees.py); 0: no limit.
        self.max_gas_share = 0.0
        # escrow.max_fee_gwei in wei: the most any transaction offers per gas (0: no cap); a chain
        # whose base fee is above it is refused with fee_cap before anything is signed.
        self.max_fee_per_gas = 0
        # escrow.confirmations: a lock returns (and get_confirmed sees an escrow) only once its block
        # is this deep (1: the block that holds it).
        self.confirmations = 1
        self.confirmation_poll_s = 0.5

    @property
    def nonce_resyncs(self) -> int:
        """How often the chain's nonce differed from the one this client expected (a reset, another sender)."""
        return self._nonces.resyncs

    @classmethod
    def deploy(cls, chain: Chain, account: LocalAccount) -> EscrowClient:
        artifact = artifacts.load()
        factory = chain.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
        client = cls.__new__(cls)
        client.chain, client.account, client.expected_chain_id = chain, account, None
        client._init_sender()
        with chain.lock:
            receipt = client._send(factory.constructor(), "deploy", 0, None)
            address = receipt["contractAddress"]
        return cls(chain, account, address)

    def for_account(self, account: LocalAccount) -> EscrowClient:
        """The same contract seen from another wallet (tests, demo)."""
        client = EscrowClient(self.chain, account, self.address, expected_chain_id=self.expected_chain_id)
        client.max_gas_share = self.max_gas_share
        client.max_fee_per_gas = self.max_fee_per_gas
        client.confirmations = self.confirmations
        return client

    # -- is the escrow there? --

    def judge(self, w3: Any) -> ContractVerdict:
        """Blocking: whether ``self.address`` holds the escrow's runtime code on the expected chain, read via ``w3``."""
        chain_id = int(w3.eth.chain_id)
        code = bytes(w3.eth.get_code(self.address))
        return judge_contract(
            chain_id=chain_id,
            expected_chain_id=self.expected_chain_id,
            address=self.address,
            code_hash=bytes(keccak(code)),
            escrow_code_hash=artifacts.load().runtime_code_hash,
        )

    def verify_contract(self) -> None:
        """Blocking: raise ``EscrowError`` (E_UNAVAILABLE, ``no_escrow_contract`` or ``wrong_chain``) unless
        the configured address holds the escrow on the expected chain. Nothing is sent."""
        with self.chain.lock:
            try:
                verdict = self.judge(self.chain.w3)
            except Exception as error:  # noqa: BLE001 - normalised to a stable code
                raise normalise(error) from None
        if not verdict.ok:
            raise EscrowError(verdict.kind, verdict.message)

    def _explain(self, error: Exception) -> EscrowError:
        """A read that returned nothing: say so when the address holds no escrow (else normalise)."""
        from web3.exceptions import BadFunctionCallOutput

        if isinstance(error, BadFunctionCallOutput):
            try:
                verdict = self.judge(self.chain.w3)
            except Exception:  # noqa: BLE001 - the original error is the better report then
                return normalise(error)
            if not verdict.ok:
                return EscrowError(verdict.kind, verdict.message)
        return normalise(error)

    def probe_health(self, previous: ChainHealth) -> ChainHealth:
        """Blocking: one health probe (block number, then the contract's code when the chain looks reset
        or was not ``ok``) on the chain's probe connection, folded into ``previous``."""
        now = time.monotonic()
        try:
            block = self.chain.probe(lambda w3: int(w3.eth.block_number))
            verdict = None
            if not previous.ok or previous.block_number is None or block < previous.block_number:
                verdict = self.chain.probe(self.judge)
        except EscrowError:
            return next_health(previous, now=now, answered=False)
        return next_health(previous, now=now, answered=True, block_number=block, verdict=verdict)

    async def watch(self, *, interval_s: float, on_change: Callable[[ChainHealth], None] | None = None) -> None:
        """Probe the chain every ``interval_s`` forever, keeping ``chain.health`` current (runs in a nursery)."""
        self.chain.watched = True
        try:
            while True:
                previous = self.chain.health
                # The probe has its own short timeout; abandoning it on cancellation loses nothing.
                health = await trio.to_thread.run_sync(  # type: ignore[call-arg]  # stale trio-stubs
                    self.probe_health, previous, abandon_on_cancel=True
                )
                self.chain.health = health
                if on_change is not None and (health.state, health.message) != (previous.state, previous.message):
                    on_change(health)
                await trio.sleep(interval_s)
        finally:
            self.chain.watched = False

    # -- reads --

    def get(self, payer: str, escrow_id: bytes) -> EscrowState:
        """The escrow as the latest block has it."""
        return self._get(payer, escrow_id, "latest")

    def get_confirmed(self, payer: str, escrow_id: bytes) -> EscrowState:
        """The escrow as it stands ``confirmations`` blocks deep: what a seller counts a buyer's lock by
        (a lock in a block that may still be replaced is "none" here)."""
        if self.confirmations <= 1:
            return self._get(payer, escrow_id, "latest")
        with self.chain.lock:
            try:
                head = int(self.chain.w3.eth.block_number)
            except Exception as error:  # noqa: BLE001
                raise normalise(error) from None
        return self._get(payer, escrow_id, max(0, head - (self.confirmations - 1)))

    def _get(self, payer: str, escrow_id: bytes, block: int | str) -> EscrowState:
        with self.chain.lock:
            try:
                call = self.contract.functions.escrows(escrow_key(payer, escrow_id))
                raw = call.call(block_identifier=block)  # type: ignore[arg-type]
            except Exception as error:  # noqa: BLE001 - normalised to a stable code
                raise self._explain(error) from None
        payee, arbiter, amount, released, deadline, window, state, token, threshold = raw
        return EscrowState(payee, arbiter, amount, released, deadline, window, _PHASES[state], token, threshold)

    def credit_of(self, address: str, token: str | None = None) -> int:
        """What ``address`` may withdraw in ``token`` (None: the native coin)."""
        with self.chain.lock:
            try:
                asset = to_checksum_address(token or ZERO_ADDRESS)
                return int(self.contract.functions.credit(to_checksum_address(address), asset).call())
            except Exception as error:  # noqa: BLE001
                raise self._explain(error) from None

    def panel_of(self, payer: str, escrow_id: bytes) -> tuple[str, ...]:
        """The arbiters of a panel escrow (empty for a single-arbiter one)."""
        with self.chain.lock:
            try:
                members = self.contract.functions.panel(to_checksum_address(payer), escrow_id).call()
            except Exception as error:  # noqa: BLE001
                raise self._explain(error) from None
        return tuple(str(member) for member in members)

    def contract_balance(self) -> int:
        with self.chain.lock:
            return int(self.chain.w3.eth.get_balance(self.address))

    def tx_status(self, tx_hash: str) -> Literal["success", "failed", "unknown"]:
        """The fate of a transaction sent earlier (e.g. before a crash)."""
        from web3.exceptions import TransactionNotFound

        with self.chain.lock:
            try:
                receipt = self.chain.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
            except TransactionNotFound:
                return "unknown"
            except Exception as error:  # noqa: BLE001
                raise normalise(error) from None
        return "success" if receipt["status"] == 1 else "failed"

    def resolved_by(self, tx_hash: str, payer: str, escrow_id: bytes) -> str | None:
        """Who sent ``tx_hash``, when it is a transaction that resolved this contract's escrow (payer, id)
        (its ``Resolved`` log); None when it is unknown, failed, or resolved no such escrow."""
        from web3.exceptions import TransactionNotFound
        from web3.logs import DISCARD

        if not re.fullmatch(r"0x[0-9a-fA-F]{64}", tx_hash):
            return None
        key = escrow_key(payer, escrow_id)
        with self.chain.lock:
            try:
                receipt = self.chain.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
            except TransactionNotFound:
                return None
            except Exception as error:  # noqa: BLE001
                raise normalise(error) from None
            if receipt["status"] != 1:
                return None
            events = self.contract.events.Resolved().process_receipt(receipt, errors=DISCARD)
        for event in events:
            if str(event["address"]).lower() == self.address.lower() and bytes(event["args"]["key"]) == key:
                return str(receipt["from"])
        return None

    # -- vouchers --

    @local
    def sign_voucher(self, escrow_id: bytes, cumulative: int) -> bytes:
        """As the payer: let the payee claim up to ``cumulative`` wei in total."""
        digest = voucher_digest(self.chain.chain_id, self.address, self.account.address, escrow_id, cumulative)
        return bytes(self.account.sign_message(encode_defunct(primitive=digest)).signature)

    @local
    def sign_dispute_case(self, escrow_id: bytes, owed: int) -> bytes:
        """As the payer: the signature that makes a lease dispute case (and its ``owed``) its own."""
        digest = dispute_case_digest(self.chain.chain_id, self.address, self.account.address, escrow_id, owed)
        return bytes(self.account.sign_message(encode_defunct(primitive=digest)).signature)

    @local
    def sign_panel_vote(self, payer: str, escrow_id: bytes, to_payee: int) -> bytes:
        """As a panel arbiter: vote that the payee gets ``to_payee`` of what is still locked, the payer the rest."""
        digest = panel_vote_digest(self.chain.chain_id, self.address, payer, escrow_id, to_payee)
        return bytes(self.account.sign_message(encode_defunct(primitive=digest)).signature)

    # -- transactions --

    def lock(
        self,
        escrow_id: bytes,
        *,
        payee: str,
        arbiter: str,
        amount: int,
        deadline: int,
        window: int,
        token: str | None = None,
        on_signed: Callable[[str], None] | None = None,
    ) -> TxResult:
        """Lock ``amount`` (wei, or the smallest unit of ERC-20 ``token``) under ``escrow_id``; with a
        ``lock_journal`` the intent is recorded first. A token lock first approves the escrow for ``amount``.

        The journal learns the outcome: "landed", "failed" (nothing sent, or reverted), or "unknown"
        (sent, no receipt in time: the reconciliation refunds it if it lands later).
        """
        if token is None or int(token, 16) == 0:
            call = self.contract.functions.lock(
                escrow_id, to_checksum_address(payee), to_checksum_address(arbiter), deadline, window
            )
            return self._lock(call, "lock", escrow_id, amount, amount, on_signed)
        call = self.contract.functions.lock_token(
            escrow_id,
            to_checksum_address(token),
            amount,
            to_checksum_address(payee),
            to_checksum_address(arbiter),
            deadline,
            window,
        )
        return self._lock(call, "lock_token", escrow_id, amount, 0, on_signed, token=token)

    def lock_panel(
        self,
        escrow_id: bytes,
        *,
        payee: str,
        panel: Sequence[str],
        threshold: int,
        amount: int,
        deadline: int,
        window: int,
        token: str | None = None,
        on_signed: Callable[[str], None] | None = None,
    ) -> TxResult:
        """Lock like :meth:`lock`, decided if disputed by ``threshold`` of the ``panel`` arbiters' signed
        votes (:meth:`resolve_by_panel`) instead of one arbiter; at most 5 arbiters."""
        if amount <= 0:
            raise EscrowError("bad_amount")
        if not 1 <= threshold <= len(panel) <= 5:
            raise EscrowError("bad_panel")
        asset = to_checksum_address(token or ZERO_ADDRESS)
        call = self.contract.functions.lock_panel(
            escrow_id,
            asset,
            amount,
            to_checksum_address(payee),
            [to_checksum_address(member) for member in panel],
            threshold,
            deadline,
            window,
        )
        native = int(asset, 16) == 0
        return self._lock(call, "lock_panel", escrow_id, amount, amount if native else 0, on_signed, token=token)

    def _lock(
        self,
        call: Any,
        name: str,
        escrow_id: bytes,
        amount: int,
        value: int,
        on_signed: Callable[[str], None] | None,
        *,
        token: str | None = None,
    ) -> TxResult:
        if self.max_gas_share > 0 and token is None:
            # A token's value in wei is unknown here: the share is judged for the native coin only.
            gas_price = self.chain.sync(lambda: int(self.chain.w3.eth.gas_price))
            refusal = gas_share_refusal(amount=amount, gas_price=gas_price, max_share=self.max_gas_share)
            if refusal is not None:
                raise EscrowError("gas_share", refusal[2])
        if token is not None and int(token, 16) != 0:
            self._token_funds(token, amount)
            self.approve(token, amount)
        journal = self.lock_journal
        if journal is None:
            return self._await_confirmations(self._transact(call, name, value, on_signed))
        payer, key = self.account.address, "0x" + escrow_id.hex()
        journal.lock_intent(contract=self.address, payer=payer, escrow_id=key, amount=amount)
        signed: list[str] = []

        def record_signed(tx_hash: str) -> None:
            journal.lock_signed(payer=payer, escrow_id=key, tx_hash=tx_hash)
            signed.append(tx_hash)
            if on_signed is not None:
                on_signed(tx_hash)

        try:
            result = self._transact(call, name, value, record_signed)
            self._await_confirmations(result)
        except EscrowError as error:
            sent = bool(signed) and error.reason != "reverted"
            outcome: LockOutcome = "unknown" if sent else "failed"
            journal.lock_outcome(payer=payer, escrow_id=key, outcome=outcome, tx_hash=signed[-1] if signed else None)
            raise
        journal.lock_outcome(payer=payer, escrow_id=key, outcome="landed", tx_hash=result.tx_hash)
        return result

    def _await_confirmations(self, result: TxResult) -> TxResult:
        """Blocking: return ``result`` once its block is ``confirmations`` deep; else ``unconfirmed`` (E_TIMEOUT)
        after ``receipt_timeout_s``, or at once when the block that held it was replaced."""
        if self.confirmations <= 1:
            return result
        deadline = time.monotonic() + self.receipt_timeout_s
        while True:
            with self.chain.lock:
                try:
                    head = int(self.chain.w3.eth.block_number)
                    if head >= result.block_number + self.confirmations - 1:
                        receipt = self.chain.w3.eth.get_transaction_receipt(result.tx_hash)  # type: ignore[arg-type]
                        if int(receipt["blockNumber"]) != result.block_number or receipt["status"] != 1:
                            # A reorg: it may land again, so its fate is "unknown" to the journal, never "failed".
                            raise EscrowError("unconfirmed", "the block that held the transaction was replaced")
                        return result
                except EscrowError:
                    raise
                except Exception as error:  # noqa: BLE001 - a transaction gone after a reorg, a transport error
                    raise normalise(error) from None
            if time.monotonic() >= deadline:
                raise EscrowError("unconfirmed")
            time.sleep(self.confirmation_poll_s)

    def _token_funds(self, token: str, amount: int) -> None:
        """``insufficient_funds`` before anything is sent when the wallet holds less than ``amount`` of
        ``token`` (the token's transferFrom would revert the lock with no reason a user could read)."""
        from runtime.escrow.token import TokenClient

        if TokenClient(self.chain, self.account, token).balance_of(self.account.address) < amount:
            raise EscrowError("insufficient_funds", "the wallet holds less of the escrow's token than the lock")

    def approve(self, token: str, amount: int) -> TxResult:
        """Let the escrow pull ``amount`` of ERC-20 ``token`` from this wallet (before a token lock or top-up)."""
        from runtime.escrow.token import token_contract

        call = token_contract(self.chain, token).functions.approve(self.address, amount)
        return self._transact(call, "approve", 0)

    def top_up(
        self, escrow_id: bytes, *, amount: int, deadline: int, on_signed: Callable[[str], None] | None = None
    ) -> TxResult:
        """As the payer: add ``amount`` (0: none) to an open escrow and move its deadline to ``deadline``
        (never earlier). A token escrow's top-up first approves the escrow for ``amount``. Returns, like
        :meth:`lock`, once the top-up is ``confirmations`` deep: what a seller counts it by."""
        if amount < 0:
            raise EscrowError("bad_amount")
        state = self.get(self.account.address, escrow_id)
        value = amount if state.native else 0
        if amount > 0 and not state.native:
            self._token_funds(state.token, amount)
            self.approve(state.token, amount)
        call = self.contract.functions.top_up(escrow_id, amount, deadline)
        return self._await_confirmations(self._transact(call, "top_up", value, on_signed))

    def release(self, escrow_id: bytes, cumulative: int, *, on_signed: Callable[[str], None] | None = None) -> TxResult:
        """As the payer: raise the payee's total to ``cumulative``."""
        return self._transact(self.contract.functions.release(escrow_id, cumulative), "release", 0, on_signed)

    def claim(
        self,
        payer: str,
        escrow_id: bytes,
        cumulative: int,
        signature: bytes,
        *,
        on_signed: Callable[[str], None] | None = None,
    ) -> TxResult:
        """As anyone (the payee): raise the payee's total to ``cumulative`` with the payer's voucher."""
        call = self.contract.functions.claim(to_checksum_address(payer), escrow_id, cumulative, signature)
        return self._transact(call, "claim", 0, on_signed)

    def draw(
        self,
        payer: str,
        escrow_id: bytes,
        cumulative: int,
        signature: bytes,
        *,
        on_signed: Callable[[str], None] | None = None,
    ) -> TxResult:
        """As :meth:`claim`, but the escrow stays open when all of it is paid (a channel the payer may top up)."""
        call = self.contract.functions.draw(to_checksum_address(payer), escrow_id, cumulative, signature)
        return self._transact(call, "draw", 0, on_signed)

    def settle(
        self,
        payer: str,
        escrow_id: bytes,
        cumulative: int = 0,
        signature: bytes = b"",
        *,
        on_signed: Callable[[str], None] | None = None,
    ) -> TxResult:
        """As the payee: take ``cumulative`` in total with the payer's voucher (when above what was
        released), give the rest back to the payer now, and close the escrow."""
        call = self.contract.functions.settle(to_checksum_address(payer), escrow_id, cumulative, signature)
        return self._transact(call, "settle", 0, on_signed)

    def refund(self, payer: str, escrow_id: bytes, *, on_signed: Callable[[str], None] | None = None) -> TxResult:
        call = self.contract.functions.refund(to_checksum_address(payer), escrow_id)
        return self._transact(call, "refund", 0, on_signed)

    def dispute(self, payer: str, escrow_id: bytes) -> TxResult:
        return self._transact(self.contract.functions.dispute(to_checksum_address(payer), escrow_id), "dispute", 0)

    def resolve(self, payer: str, escrow_id: bytes, to_payee: int) -> TxResult:
        call = self.contract.functions.resolve(to_checksum_address(payer), escrow_id, to_payee)
        return self._transact(call, "resolve", 0)

    def resolve_by_panel(
        self,
        payer: str,
        escrow_id: bytes,
        to_payee: int,
        signatures: Sequence[bytes],
        *,
        on_signed: Callable[[str], None] | None = None,
    ) -> TxResult:
        """As anyone: split a disputed panel escrow as ``to_payee`` with the panel arbiters' signed votes."""
        if len(signatures) > 5:
            raise EscrowError("bad_signature", "at most 5 votes (a panel has at most 5 arbiters)")
        call = self.contract.functions.resolve_by_panel(
            to_checksum_address(payer), escrow_id, to_payee, [bytes(s) for s in signatures]
        )
        return self._transact(call, "resolve_by_panel", 0, on_signed)

    def withdraw(
        self, to: str | None = None, *, token: str | None = None, on_signed: Callable[[str], None] | None = None
    ) -> TxResult:
        """Pay out this wallet's whole credit in ``token`` (None: the native coin) to ``to`` (default: itself)."""
        receiver = to_checksum_address(to or self.account.address)
        if token is None or int(token, 16) == 0:
            return self._transact(self.contract.functions.withdraw(receiver), "withdraw", 0, on_signed)
        call = self.contract.functions.withdraw_token(to_checksum_address(token), receiver)
        return self._transact(call, "withdraw_token", 0, on_signed)

    def _transact(self, call: Any, name: str, value: int, on_signed: Callable[[str], None] | None = None) -> TxResult:
        with self.chain.lock:
            # Only to the escrow's code, checked now: an address with none (a typo, a reset dev chain,
            # another network) would take a lock's budget as a plain transfer, and "land" a claim or a
            # refund that did nothing.
            self.verify_contract()
            try:
                # Against the pending block: the timestamp the transaction itself will see.
                call.call({"from": self.account.address, "value": value}, block_identifier="pending")
            except Exception as error:  # noqa: BLE001 - a revert or a transport error; both normalised
                raise normalise(error) from None
            receipt = self._send(call, name, value, on_signed)
        return TxResult(receipt["transactionHash"].to_0x_hex(), int(receipt["gasUsed"]), int(receipt["blockNumber"]))

    def _send(self, call: Any, name: str, value: int, on_signed: Callable[[str], None] | None) -> Any:
        w3 = self.chain.w3
        signed, nonce = self._sign(call, name, value)
        try:
            w3.eth.send_raw_transaction(signed.raw_transaction)
        except Exception as error:  # noqa: BLE001
            self._nonces.forget()
            if not is_nonce_error(error):
                raise normalise(error) from None
            # The nonce was taken before we asked (another sender with this key, a reset between the
            # read and the send): the transaction was refused, so one more try with a fresh count
            # cannot pay twice.
            log.info("the chain refused nonce %d; resending with a fresh one", nonce)
            signed, nonce = self._sign(call, name, value)
            try:
                w3.eth.send_raw_transaction(signed.raw_transaction)
            except Exception as again:  # noqa: BLE001
                self._nonces.forget()
                raise normalise(again) from None
        if on_signed is not None:
            # Lets the caller persist the hash before the transaction can land (crash recovery).
            on_signed(signed.hash.to_0x_hex())
        receipt = self._wait(signed, nonce)
        if receipt["status"] != 1:
            # Mined but reverted: the state changed between our eth_call and the block.
            raise EscrowError("reverted")
        return receipt

    def _sign(self, call: Any, name: str, value: int) -> tuple[Any, int]:
        try:
            fees = self._fees()
            nonce = self._nonces.take()
            tx = call.build_transaction(
                {
                    "from": self.account.address,
                    "value": value,
                    "gas": GAS_LIMITS[name],
                    **fees.tx_fields(),  # type: ignore[typeddict-item]
                    "nonce": nonce,
                    "chainId": self.chain.chain_id,
                }
            )
            signed = self.account.sign_transaction(tx)
        except Exception as error:  # noqa: BLE001
            self._nonces.forget()
            raise normalise(error) from None
        return signed, nonce

    def _fees(self) -> Fees:
        """EIP-1559 fees from the latest base fee and the chain's suggested price, within ``max_fee_per_gas``."""
        w3 = self.chain.w3
        base = w3.eth.get_block("latest").get("baseFeePerGas")
        chosen = choose_fees(
            base_fee=None if base is None else int(base),
            gas_price=int(w3.eth.gas_price),
            max_fee_cap=self.max_fee_per_gas,
        )
        if not isinstance(chosen, Fees):
            raise EscrowError(chosen[1], chosen[2])
        return chosen

    def _wait(self, signed: Any, nonce: int) -> Any:
        """The receipt of ``signed``; after ``stall_check_s`` without one, give up at once when the chain
        can no longer mine it (dropped, or behind a nonce gap after a reset), else wait out the timeout."""
        from web3.exceptions import TimeExhausted, TransactionNotFound

        w3 = self.chain.w3
        deadline = time.monotonic() + self.receipt_timeout_s
        first = min(self.stall_check_s, self.receipt_timeout_s)
        try:
            return w3.eth.wait_for_transaction_receipt(signed.hash, timeout=first, poll_latency=0.05)
        except TimeExhausted:
            pass
        except Exception as error:  # noqa: BLE001
            self._nonces.forget()
            raise normalise(error) from None
        try:
            try:
                w3.eth.get_transaction(signed.hash)
                known = True
            except TransactionNotFound:
                known = False
            if not known or nonce > self._nonces.pending_count():
                # Never mined as things stand: the chain forgot it, or a reset left a gap before its nonce.
                self._nonces.forget()
                log.warning("a sent transaction cannot be mined (the chain was reset under it); nonce resynced")
                self._nonces.resyncs += 1
                raise EscrowError("receipt_timeout", "the transaction was dropped by the chain (reset?)")
            left = max(0.0, deadline - time.monotonic())
            return w3.eth.wait_for_transaction_receipt(signed.hash, timeout=left, poll_latency=0.05)
        except EscrowError:
            raise
        except Exception as error:  # noqa: BLE001
            self._nonces.forget()
            raise normalise(error) from None
