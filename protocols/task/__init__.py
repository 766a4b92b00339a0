"""``/clawnode/task/1.0.0`` and task announcements: the trio adapters of the task market, one role a module.

Every decision that can refuse lives in ``protocols.machines``: the pure :class:`TaskBook`
(``machines/task.py``: bid, award, result, review, dispute, evidence, settle/refund) and the checks
of what was fetched (``machines/task_checks.py``: signatures, artifacts, the escrow lock through the
check the lease market shares in ``machines/escrow_lock.py``, the close-out's next step). Money
lives in the ledger and the escrow contract. These modules only fetch, ask and act, moving messages
between streams, gossip, the book, the ledger and the chain:

* ``base`` -- the shared state (book, signed evidence kept beside it), pushes and views;
* ``creator`` -- publish, bids in, award (lock then notify), result in, review, cancel;
* ``bidder`` -- announcements in, bid, award in (its lock checked on chain), deliver, review in;
* ``dispute`` -- either party: dispute, the other party's dispute in, evidence out and in;
* ``arbiter`` -- the dispute case in (the task rebuilt from its envelopes), resolve;
* ``closeout`` -- wait for the lock to close (sleeping until woken or the next deadline), book it;
  the sweep that expires open tasks and forgets finished ones;
* ``handler`` -- :class:`TaskMarket`, which joins the roles and dispatches each request;
* ``protocols.task_wire`` -- the wire models.

Every node keeps its own book and applies each event it learns of with the actor the event is
authenticated as: the stream's remote peer, or the signer of an envelope; ``SYSTEM`` for its own
timers and chain confirmations.

Flow (``C`` creator, ``B`` bidder, ``A`` arbiter)::

    C publish   -> gossip TaskAnnouncement (signed, names arbiter peer + wallet) -> B Publish
    B bid       -> C PlaceBid                      (B applies it too once C accepted it)
    C award     -> lock price on chain, C Award(lock_ref) -> signed AwardNotice -> B checks the
                   lock on chain (payee, arbiter, amount, window, phase) -> B Award
    B submit    -> signed ResultNotice + artifact -> C checks sha256/size -> C SubmitResult
    C review    -> C Accept|Reject -> signed ReviewNotice -> B Accept|Reject
                   accept: ledger release of the price (settlement queue); reject: the refund
                   is queued once the book's dispute window passed and the chain is not disputed
    B|C dispute -> chain dispute, ledger open_dispute, DisputeCase -> A, DisputeRequest -> other
    A resolve   -> chain resolve (arbiter wallet), ResolutionRequest -> C and B
    close-out   -> each party waits for the lock until the chain says ``closed``, then records the
                   outcome (ledger dispute resolution, a reconciling refund settlement that books
                   what the chain moved), applies Settle/Refund and closes the task.

Choices where the design was silent:

* The escrow of a task uses the ledger's lease rows (lease id = escrow id hex; creator =
  ``consumer``, bidder = ``provider``, price = budget = price per unit), so releases, refunds
  and withdrawals go through the ordinary settlement queue. The ledger row is written before the
  lock is sent (as the lease market does); a failed lock ends that row again.
* Each party closes out with a ``refund`` settlement once the chain says the lock is closed: the
  settler then sees ``closed`` and books what the chain moved (income for the bidder, spend and
  refund for the creator) without a transaction.
* The arbiter keeps no ledger rows (no money of its own moves); its book is rebuilt from the
  signed :class:`~protocols.task_wire.DisputeCase`, replaying Publish/PlaceBid/Award at the
  award's signed time, then the result, the review and the dispute.
* A party that sees the lock closed by ``resolve`` without having received the arbiter's
  resolution applies ``ResolveDispute`` for the arbiter from the chain's split (the chain only
  lets the arbiter's wallet resolve), so a lost message never blocks the close-out.
* The losing bidders are not pushed anything on award (their books keep the bid submitted until
  the deadline expires it); cancellation is pushed to every bidder.
* Task parameters are a JSON string kept by the creator (its sha256 is the announcement's
  ``params_hash``); the winning bidder receives them inside the signed award.
"""

from protocols.task.base import TASK_PROTOCOL, TaskLocal
from protocols.task.handler import TaskMarket

__all__ = ["TASK_PROTOCOL", "TaskLocal", "TaskMarket"]
