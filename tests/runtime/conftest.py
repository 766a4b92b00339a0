"""Fixtures for the runtime tests: one in-process chain with the escrow deployed per module, reset between tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from eth_account.signers.local import LocalAccount

from runtime.escrow import Chain, EscrowClient


@dataclass
class Deployed:
    chain: Chain
    escrow: EscrowClient  # as the deployer
    accounts: list[LocalAccount]

    def as_(self, account: LocalAccount) -> EscrowClient:
        return self.escrow.for_account(account)


@pytest.fixture(scope="module")
def _embedded_deployment() -> Deployed:
    chain = Chain.embedded()
    accounts = chain.dev_accounts()
    return Deployed(chain, EscrowClient.deploy(chain, accounts[9]), accounts)


@pytest.fixture
def embedded(_embedded_deployment: Deployed) -> Iterator[Deployed]:
    """The deployed escrow on the in-process chain; every test starts from the same state."""
    chain = _embedded_deployment.chain
    snapshot = chain.snapshot()
    yield _embedded_deployment
    chain.revert(snapshot)
