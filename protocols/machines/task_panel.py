"""The k-of-m arbiter panel of a task: who may sit on it, which votes count, and when it has decided.

Pure: the adapter (``protocols/task/panel.py``) hands in the panel's terms and the votes it holds
as plain data and acts on the typed answer; the escrow contract applies the same rule on chain.

* A task names its panel at publication (its params, hashed into the signed announcement): ``k``
  members (peer id and wallet, 1 <= k <= :data:`MAX_PANEL`, no peer or wallet twice, neither party
  on it) and a threshold ``m`` that is a strict majority (``k // 2 < m <= k``), so two different
  splits can never both reach ``m`` and the decision does not depend on the order votes land in.
* Each member votes a split (``to_bidder`` of the price to the seller, the rest back) once, or
  abstains (it could not decide: the program could not be re-run, or was not reproducible). An
  abstention is not final: the member may vote a split later (a person deciding where its re-run
  could not). The same vote again is harmless (``merged``); a split after a split, or an abstention
  after one, is refused (``E_CONFLICT`` ``vote_final``), as is a vote from outside the panel
  (``E_FORBIDDEN`` ``not_on_panel``) or a split over the price (``E_INVALID_ARGUMENT`` ``bad_split``).
* The panel has *decided* once ``m`` votes name the same split. It *needs a person* once every
  member has voted without ``m`` agreeing, while the abstainers could still make a split reach ``m``
  by hand; it is *deadlocked* once no split can reach ``m`` even so (the members who have not voted
  a split cannot lift the best split to ``m``). Otherwise it is *open* (votes are missing).
* A creator may draw its panel from arbiters' capability records (:func:`draw_panel`): only members
  able to re-run the task sit on it (their record's ``sandbox`` accepts the kind, its caps cover the
  task's limits and program size), so a task whose limits are above one arbiter's caps is still
  decided by re-execution rather than by abstentions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from protocols.machines.verdict import Refusal
from runtime.errors import ErrorCode

__all__ = [
    "MAX_PANEL",
    "PanelCandidate",
    "PanelFacts",
    "PanelVerdict",
    "RunNeeds",
    "Vote",
    "VoteFacts",
    "draw_panel",
    "panel_lock_verdict",
    "panel_terms_verdict",
    "tally",
    "vote_notice_verdict",
    "vote_verdict",
]

# The contract keeps at most this many arbiter wallets per escrow (a bound on its loops and storage).
MAX_PANEL = 5


@dataclass(frozen=True)
class Vote:
    """One member's vote: ``to_bidder`` of the price to the seller, or ``None`` to abstain."""

    voter: str
    to_bidder: int | None


@dataclass(frozen=True)
class PanelFacts:
    members: tuple[str, ...]  # peer ids, in the order the task names them
    threshold: int
    price: int


@dataclass(frozen=True)
class PanelVerdict:
    state: Literal["open", "decided", "needs_person", "deadlocked"]
    to_bidder: int | None  # the decided split (``decided`` only)
    votes: dict[str, int | None] = field(default_factory=dict)  # member -> its counted vote
    refused: tuple[tuple[str, str], ...] = ()  # (voter, reason) of the votes that did not count

    @property
    def agreeing(self) -> int:
        """How many counted votes name the leading split."""
        splits = Counter(v for v in self.votes.values() if v is not None)
        return max(splits.values(), default=0)


def _refuse(code: ErrorCode, reason: str, message: str) -> Refusal:
    return Refusal(code, reason, message)


def panel_terms_verdict(
    members: Sequence[tuple[str, str]], threshold: int, parties: Iterable[str] = ()
) -> Refusal | None:
    """A panel as a task names it: ``members`` are ``(peer id, wallet)``; ``parties`` the creator (and,
    once known, the awarded seller), who may not judge their own task."""
    inv = ErrorCode.INVALID_ARGUMENT
    if not 1 <= len(members) <= MAX_PANEL:
        return _refuse(inv, "panel_size", f"a panel has 1 to {MAX_PANEL} members")
    peers = [peer for peer, _ in members]
    wallets = [wallet.lower() for _, wallet in members]
    if len(set(peers)) != len(peers) or len(set(wallets)) != len(wallets):
        return _refuse(inv, "panel_duplicate", "a panel names each member and each wallet once")
    if not len(members) // 2 < threshold <= len(members):
        return _refuse(inv, "panel_threshold", "a panel's threshold is a strict majority of its members")
    if set(peers) & set(parties):
        return _refuse(ErrorCode.FORBIDDEN, "panel_party", "a party to the task cannot sit on its panel")
    return None


@dataclass(frozen=True)
class RunNeeds:
    """What a re-run of the task asks of a member's sandbox: the task's kind, limits and program size."""

    kind: str
    fuel: int
    memory_bytes: int
    wall_s: float
    output_bytes: int
    module_size: int


@dataclass(frozen=True)
class PanelCandidate:
    """An arbiter as its capability record states it: its wallet, the kinds it runs and its caps."""

    peer: str
    wallet: str
    kinds: frozenset[str]
    max_fuel: int
    max_memory_bytes: int
    max_wall_s: float
    max_output_bytes: int
    max_module_bytes: int

    def can_rerun(self, needs: RunNeeds) -> bool:
        return (
            needs.kind in self.kinds
            and needs.fuel <= self.max_fuel
            and needs.memory_bytes <= self.max_memory_bytes
            and needs.wall_s <= self.max_wall_s
            and needs.output_bytes <= self.max_output_bytes
            and needs.module_size <= self.max_module_bytes
        )


def draw_panel(
    candidates: Sequence[PanelCandidate], needs: RunNeeds, size: int, threshold: int, parties: Iterable[str] = ()
) -> tuple[PanelCandidate, ...] | Refusal:
    """The first ``size`` candidates (in the caller's order of preference) able to re-run the task, none a
    party and no peer or wallet twice; ``E_NOT_FOUND`` ``panel_short`` when fewer are able, and the
    panel's own rules (:func:`panel_terms_verdict`) on the size and threshold."""
    excluded = set(parties)
    drawn: list[PanelCandidate] = []
    peers: set[str] = set()
    wallets: set[str] = set()
    for candidate in candidates:
        if len(drawn) == size:
            break
        if candidate.peer in excluded or candidate.peer in peers or candidate.wallet.lower() in wallets:
            continue
        if candidate.can_rerun(needs):
            drawn.append(candidate)
            peers.add(candidate.peer)
            wallets.add(candidate.wallet.lower())
    if 1 <= size <= MAX_PANEL and len(drawn) < size:
        return _refuse(
            ErrorCode.NOT_FOUND,
            "panel_short",
            f"{len(drawn)} of the {size} panel members needed can re-run a {needs.kind} task with these limits",
        )
    refusal = panel_terms_verdict([(c.peer, c.wallet) for c in drawn], threshold, excluded)
    if refusal is not None:
        return refusal
    return tuple(drawn)


def vote_verdict(facts: PanelFacts, counted: dict[str, int | None], vote: Vote) -> Refusal | Literal["merged"] | None:
    """Does ``vote`` count, given the votes already ``counted``? ``merged``: the same vote again."""
    if vote.voter not in facts.members:
        return _refuse(ErrorCode.FORBIDDEN, "not_on_panel", "only the task's panel members vote")
    if vote.to_bidder is not None and not 0 <= vote.to_bidder <= facts.price:
        return _refuse(ErrorCode.INVALID_ARGUMENT, "bad_split", "a vote splits the price: 0 to the price to the seller")
    if vote.voter in counted:
        if counted[vote.voter] == vote.to_bidder:
            return "merged"
        if counted[vote.voter] is None:
            return None  # an abstention gives way to a split voted later (by hand)
        return _refuse(ErrorCode.CONFLICT, "vote_final", "a panel member's split is final")
    return None


def tally(facts: PanelFacts, votes: Iterable[Vote]) -> PanelVerdict:
    """The panel's state after ``votes`` (in the order they arrived); refused votes are listed, not counted."""
    counted: dict[str, int | None] = {}
    refused: list[tuple[str, str]] = []
    decided: int | None = None
    for vote in votes:
        verdict = vote_verdict(facts, counted, vote)
        if isinstance(verdict, Refusal):
            refused.append((vote.voter, verdict.reason))
            continue
        if verdict == "merged":
            continue
        counted[vote.voter] = vote.to_bidder
        if decided is None and vote.to_bidder is not None:
            if sum(1 for v in counted.values() if v == vote.to_bidder) >= facts.threshold:
                decided = vote.to_bidder
    if decided is not None:
        return PanelVerdict("decided", decided, counted, tuple(refused))
    splits = Counter(v for v in counted.values() if v is not None)
    undecided = len(facts.members) - sum(splits.values())  # not voted yet, or abstained
    if max(splits.values(), default=0) + undecided < facts.threshold:
        return PanelVerdict("deadlocked", None, counted, tuple(refused))
    if len(counted) == len(facts.members):
        return PanelVerdict("needs_person", None, counted, tuple(refused))
    return PanelVerdict("open", None, counted, tuple(refused))


def panel_lock_verdict(
    wallets: Sequence[str], threshold: int, lock_arbiter: str, lock_threshold: int, lock_panel: Sequence[str]
) -> Refusal | None:
    """The escrow on chain is locked for the task's panel: no single arbiter, its wallets, its threshold."""
    named = [wallet.lower() for wallet in wallets]
    if int(lock_arbiter, 16) != 0 or lock_threshold != threshold or [w.lower() for w in lock_panel] != named:
        return _refuse(ErrorCode.FORBIDDEN, "lock_not_the_panel", "the escrow is not locked for the task's panel")
    return None


@dataclass(frozen=True)
class VoteFacts:
    """A vote as it arrived: who sealed it, who it names, and whom its chain signature recovers to."""

    sealed_by: str
    voter: str
    wallet: str
    panel_wallet: str | None  # the wallet the task's panel names for ``voter``
    abstains: bool
    has_signature: bool
    chain_signer: str | None  # the address the contract would recover from the signature


def vote_notice_verdict(f: VoteFacts) -> Refusal | None:
    """A signed vote is the voter's own, from its panel wallet; a split carries the contract's signature."""
    if f.sealed_by != f.voter:
        return _refuse(ErrorCode.FORBIDDEN, "vote_not_voters", "a vote is signed by the member who casts it")
    if f.panel_wallet is None:
        return _refuse(ErrorCode.FORBIDDEN, "not_on_panel", "only the task's panel members vote")
    if f.wallet.lower() != f.panel_wallet.lower():
        return _refuse(ErrorCode.FORBIDDEN, "vote_wrong_wallet", "the vote names another wallet than the panel's")
    if f.abstains:
        if f.has_signature:
            return _refuse(ErrorCode.INVALID_ARGUMENT, "bad_vote", "an abstention signs no split")
        return None
    if f.chain_signer is None or f.chain_signer.lower() != f.panel_wallet.lower():
        return _refuse(ErrorCode.FORBIDDEN, "bad_vote_signature", "the vote's signature is not the member's wallet's")
    return None
