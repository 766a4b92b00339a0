"""Is the configured escrow really there, and is its chain answering? Pure verdicts on plain data.

A lock sent to an address that holds no escrow code is mined as a plain transfer: the budget is gone
and nothing can refund it. So the client never sends value before ``judge_contract`` said ``ok`` for
the code at that address now, and the daemon's health watch (``Chain.watch``) keeps asking the chain
cheap questions (block number, code hash) with a short timeout, off the chain's one lane.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ContractVerdictKind = Literal["ok", "wrong_chain", "no_escrow_contract"]
HealthState = Literal["ok", "unreachable", "wrong_chain", "no_escrow_contract"]


@dataclass(frozen=True)
class ContractVerdict:
    kind: ContractVerdictKind
    message: str

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


def judge_contract(
    *, chain_id: int, expected_chain_id: int | None, address: str, code_hash: bytes, escrow_code_hash: bytes
) -> ContractVerdict:
    """Whether ``address`` on chain ``chain_id`` holds the escrow's runtime code (and the chain is the expected one).

    ``code_hash`` is keccak256 of the code at ``address`` (of empty code for an account with none);
    ``escrow_code_hash`` that of the committed artifact's runtime bytecode. ``expected_chain_id``
    None accepts any chain.
    """
    if expected_chain_id is not None and chain_id != expected_chain_id:
        return ContractVerdict(
            "wrong_chain", f"the escrow RPC serves chain {chain_id}, escrow.chain_id expects {expected_chain_id}"
        )
    if code_hash != escrow_code_hash:
        message = f"escrow.contract {address} holds no escrow contract on chain {chain_id}"
        return ContractVerdict("no_escrow_contract", message)
    return ContractVerdict("ok", f"escrow contract {address} on chain {chain_id}")


@dataclass(frozen=True)
class ChainHealth:
    """The last verdict of the health watch; ``since`` is the monotonic time it last changed."""

    state: HealthState
    message: str
    since: float
    block_number: int | None = None

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def next_health(
    previous: ChainHealth,
    *,
    now: float,
    answered: bool,
    block_number: int | None = None,
    verdict: ContractVerdict | None = None,
) -> ChainHealth:
    """Fold one probe into the health: unreachable when it did not answer, else the contract verdict.

    A block number lower than the last one seen means the chain was reset (a dev chain restarted):
    the probe then re-checks the contract, which is what ``verdict`` carries.
    """
    if not answered:
        state: HealthState = "unreachable"
        message = "the escrow chain does not answer"
    elif verdict is not None and not verdict.ok:
        state, message = verdict.kind, verdict.message
    else:
        state, message = "ok", "connected"
    since = previous.since if state == previous.state else now
    return ChainHealth(state, message, since, block_number if answered else previous.block_number)
