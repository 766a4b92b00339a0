"""Escrow settings and the one place that turns them into a client: "embedded", "rpc" or "off".

- ``embedded``: a fresh in-process py-evm chain per start with a random chain id of its own, the
  contract deployed on it, the node's wallet funded from a dev account (or a dev account itself
  when no wallet is given). Private: no other node can pay on it. Nothing survives a restart.
- ``rpc``: a JSON-RPC chain (anvil, hardhat, geth, a testnet) at ``rpc_url`` with the contract
  already deployed at ``contract``; the chain id is read from the chain.
- ``off``: no chain; trusted peers only, post-paid with a cap (enforced by the lease protocol).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from eth_account.signers.local import LocalAccount
from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.escrow.chain import Chain, private_chain_id
from runtime.escrow.client import EscrowClient
from runtime.escrow.errors import EscrowError

log = logging.getLogger(__name__)

EscrowMode = Literal["embedded", "rpc", "off"]


class EscrowSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: EscrowMode = Field("embedded", description="embedded | rpc | off")
    rpc_url: str | None = Field(None, description="JSON-RPC URL when mode = rpc (never logged or shown)")
    contract: str | None = Field(None, pattern=r"^0x[0-9a-fA-F]{40}$", description="escrow address when mode = rpc")
    rpc_timeout_s: float = Field(5.0, gt=0, le=300)
    rpc_retries: int = Field(1, ge=0, le=10)
    health_timeout_s: float = Field(2.0, gt=0, le=60)
    chain_id: int | None = Field(None, ge=1, description="refuse a chain with another id (None: any)")
    fallback_urls: tuple[str, ...] = Field(
        (), max_length=8, description="more JSON-RPC URLs of the same chain, tried in order when rpc_url fails"
    )
    max_fee_per_gas: int = Field(0, ge=0, description="the most a transaction offers per gas, wei (0: no cap)")
    confirmations: int = Field(1, ge=1, le=64, description="blocks deep a lock must be before it counts")

    @model_validator(mode="after")
    def _rpc_needs_url_and_contract(self) -> EscrowSettings:
        if self.mode == "rpc" and (not self.rpc_url or not self.contract):
            raise ValueError("mode = rpc needs rpc_url and contract")
        return self


EMBEDDED_WALLET_FUNDING = 1_000 * 10**18


def fund_from_dev_account(
    chain: Chain, address: str, amount: int = EMBEDDED_WALLET_FUNDING, *, source: LocalAccount | None = None
) -> None:
    """Give ``address`` coin from ``source``, by default the first dev account (development chains only)."""
    dev = source if source is not None else chain.dev_accounts()[0]
    with chain.lock:
        w3 = chain.w3
        tx: dict[str, Any] = {
            "to": w3.to_checksum_address(address),
            "value": amount,
            "gas": 21_000,
            "gasPrice": int(w3.eth.gas_price),
            "nonce": int(w3.eth.get_transaction_count(dev.address, "pending")),
            "chainId": chain.chain_id,
        }
        signed = dev.sign_transaction(tx)
        w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction))


def connect_escrow(settings: EscrowSettings, wallet: LocalAccount | None = None) -> EscrowClient | None:
    """Blocking (run it in a worker thread): the node's escrow client, or None when escrow is off; its
    fee cap and confirmation depth set from ``settings`` (see :func:`_connect`)."""
    client = _connect(settings, wallet)
    if client is not None:
        client.max_fee_per_gas = settings.max_fee_per_gas
        client.confirmations = settings.confirmations
    return client


def _connect(settings: EscrowSettings, wallet: LocalAccount | None) -> EscrowClient | None:
    """Blocking (run it in a worker thread): the node's escrow client, or None when escrow is off.

    ``wallet`` is the node's payout/payment key; the embedded chain uses its first dev account
    when none is given. Raises ``EscrowError`` (``chain_unavailable``) when the RPC chain is down, and
    (``no_escrow_contract``, ``wrong_chain``) when ``contract`` does not hold the committed escrow's
    runtime code on the chain (or the chain is not ``chain_id``).
    """
    if settings.mode == "off":
        return None
    if settings.mode == "embedded":
        # A chain id of its own: another node's private chain can never be taken for this one.
        chain = Chain.embedded(chain_id=private_chain_id())
        dev = chain.dev_accounts()[0]
        client = EscrowClient.deploy(chain, dev)
        if wallet is None or wallet.address == dev.address:
            return client
        fund_from_dev_account(chain, wallet.address)
        return client.for_account(wallet)
    assert settings.rpc_url is not None and settings.contract is not None  # checked by the model
    if wallet is None:
        raise ValueError("mode = rpc needs the node's wallet key")
    urls = [settings.rpc_url, *settings.fallback_urls]
    for index, url in enumerate(urls):
        try:
            chain = Chain.rpc(
                url,
                timeout_s=settings.rpc_timeout_s,
                retries=settings.rpc_retries,
                probe_timeout_s=settings.health_timeout_s,
            )
            client = EscrowClient(chain, wallet, settings.contract, expected_chain_id=settings.chain_id)
            client.verify_contract()  # E_UNAVAILABLE no_escrow_contract / wrong_chain: never lock there
            return client
        except EscrowError as error:
            # Only a URL that does not answer (or answers garbage) is passed over: another chain or no
            # escrow there is a configuration to fix, not an outage to route around.
            if error.reason not in ("chain_unavailable", "bad_reply") or index == len(urls) - 1:
                raise
            log.warning("escrow RPC URL %d of %d does not answer; trying the next", index + 1, len(urls))
    raise AssertionError("unreachable")
