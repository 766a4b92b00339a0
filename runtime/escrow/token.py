"""ERC-20 tokens an escrow can hold: a read/transfer view of any token, and the mock one of development chains.

``MockERC20`` (``MockERC20.vy``, committed build ``MockERC20.json``) is a plain ERC-20 with an open
``mint``: a stand-in stablecoin for a development network and the escrow's tests. Its ABI is the
standard ERC-20 one plus ``mint`` and ``set_fee``, so :func:`token_contract` reads any ERC-20 with it.
"""

from __future__ import annotations

from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3.contract import Contract

from runtime.escrow import artifacts
from runtime.escrow.chain import Chain
from runtime.escrow.errors import EscrowError, normalise


def token_contract(chain: Chain, address: str) -> Contract:
    """Any ERC-20 at ``address`` (the mock's ABI is a superset of the standard one)."""
    return chain.w3.eth.contract(address=to_checksum_address(address), abi=artifacts.load("MockERC20").abi)


class TokenClient:
    """One wallet's view of one ERC-20 token (synchronous: call it on a worker thread)."""

    def __init__(self, chain: Chain, account: LocalAccount, address: str) -> None:
        self.chain = chain
        self.account = account
        self.address = to_checksum_address(address)
        self.contract = token_contract(chain, self.address)

    @classmethod
    def deploy(cls, chain: Chain, account: LocalAccount) -> TokenClient:
        """Deploy a fresh :file:`MockERC20.vy` (development chains and tests only)."""
        artifact = artifacts.load("MockERC20")
        factory = chain.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
        receipt = _send(chain, account, factory.constructor(), 1_500_000)
        return cls(chain, account, str(receipt["contractAddress"]))

    def for_account(self, account: LocalAccount) -> TokenClient:
        return TokenClient(self.chain, account, self.address)

    def balance_of(self, address: str) -> int:
        with self.chain.lock:
            try:
                return int(self.contract.functions.balanceOf(to_checksum_address(address)).call())
            except Exception as error:  # noqa: BLE001 - normalised to a stable code
                raise normalise(error) from None

    def mint(self, to: str, amount: int) -> None:
        """Mock token only: create ``amount`` for ``to``."""
        _send(self.chain, self.account, self.contract.functions.mint(to_checksum_address(to), amount), 100_000)

    def approve(self, spender: str, amount: int) -> None:
        _send(self.chain, self.account, self.contract.functions.approve(to_checksum_address(spender), amount), 80_000)

    def set_fee(self, bps: int) -> None:
        """Mock token only: burn ``bps``/10,000 of every transfer (a fee-on-transfer token)."""
        _send(self.chain, self.account, self.contract.functions.set_fee(bps), 80_000)


def _send(chain: Chain, account: LocalAccount, call: Any, gas: int) -> Any:
    with chain.lock:
        w3 = chain.w3
        try:
            tx = call.build_transaction(
                {
                    "from": account.address,
                    "gas": gas,
                    "gasPrice": int(w3.eth.gas_price),
                    "nonce": int(w3.eth.get_transaction_count(account.address, "pending")),
                    "chainId": chain.chain_id,
                }
            )
            signed = account.sign_transaction(tx)
            receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction))
        except Exception as error:  # noqa: BLE001 - normalised to a stable code
            raise normalise(error) from None
    if receipt["status"] != 1:
        raise EscrowError("reverted")
    return receipt
