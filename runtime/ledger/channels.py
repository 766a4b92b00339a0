"""Payment channels in the ledger (issue 20): one escrow per consumer–provider pair, many leases.

``channels`` holds each channel (its escrow, amount, deadline, state) and ``channel_leases`` where
each lease starts on the channel's cumulative voucher line (``base``). What a channel has committed
(the consumer) or holds (the provider) is never stored twice: it is the highest ``base + amount``
over the countersigned receipts (with a voucher) of its leases, which the receipts table already
keeps durably before any voucher leaves the node. So a restart finds every voucher, and the next
lease starts above all of them.

Settlements of a channel are rows of the one queue with no lease: a ``claim`` (the provider's highest
voucher; ``close`` in its params: the cooperative close, ``settle`` on chain) and a ``refund`` (the
consumer's rest after deadline + window, or seen already paid back by the provider's close). When
one lands, :meth:`ChannelRecords._book_channel` books each lease's share of what the chain released
(``max(0, min(released - base, final))``), once, through the lease's own money rows.

The rules (draw, top up, close, claim) are ``protocols/machines/channel.py``; this is storage.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from runtime.errors import ClawnodeError, ErrorCode
from runtime.ledger import errors
from runtime.ledger.models import Lease, Settlement, SettlementKind
from runtime.ledger.vocabulary import LeaseState

if TYPE_CHECKING:
    from runtime.ledger.ledger import Ledger

ChannelRole = Literal["provider", "consumer"]
ChannelRowState = Literal["channel_opening", "channel_open", "channel_closing", "channel_closed", "channel_failed"]

_COLUMNS = (
    "channel_id, role, peer, contract, payer, payee, salt, amount, deadline, dispute_window, state, refunded,"
    " last_used_at, created_at, closed_at"
)

# The moves a stored channel may make (busy and topping-up live in memory: protocols/machines/channel.py).
_MOVES: dict[str, tuple[str, ...]] = {
    "channel_opening": ("channel_open", "channel_failed", "channel_closing"),
    "channel_open": ("channel_closing", "channel_closed"),
    "channel_closing": ("channel_closed",),
}


class Channel(BaseModel):
    channel_id: str  # the escrow id, 0x + 64 hex
    role: ChannelRole
    peer: str  # the other side's peer id
    contract: str
    payer: str
    payee: str
    salt: str | None
    amount: int  # locked, top-ups included
    deadline: int
    window: int
    state: ChannelRowState
    refunded: int
    last_used_at: int
    created_at: int
    closed_at: int | None
    committed: int = 0  # the highest voucher over its leases (consumer: signed; provider: held)
    claimed: int = 0  # provider: the highest claim queued or landed
    leases: int = 0


def _channel(row: tuple[Any, ...]) -> Channel:
    (
        cid,
        role,
        peer,
        contract,
        payer,
        payee,
        salt,
        amount,
        deadline,
        window,
        state,
        refunded,
        used,
        created,
        closed,
    ) = row
    return Channel(
        channel_id=cid,
        role=role,
        peer=peer,
        contract=contract,
        payer=payer,
        payee=payee,
        salt=salt,
        amount=int(amount),
        deadline=int(deadline),
        window=int(window),
        state=state,
        refunded=int(refunded),
        last_used_at=int(used),
        created_at=int(created),
        closed_at=None if closed is None else int(closed),
    )


class ChannelRecords:
    """Mixed into ``LedgerStore``: the channel tables, each method one transaction."""

    _clock: Callable[[], int]
    _lock: Any

    if TYPE_CHECKING:  # provided by LedgerStore

        def _tx(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _read(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _audit(self, conn: sqlite3.Connection, kind: str, subject: str, data: dict[str, Any]) -> None: ...
        def _lease(self, conn: sqlite3.Connection, lease_id: str) -> Lease: ...
        def _move_lease(
            self, conn: sqlite3.Connection, lease: Lease, to: LeaseState, *, ended_at: int | None = None
        ) -> None: ...
        def _book_released(
            self, conn: sqlite3.Connection, lease: Lease, released_total: int, entry_id: str, now: int | None
        ) -> int: ...
        def _enqueue(
            self,
            conn: sqlite3.Connection,
            settlement_id: str,
            lease_id: str | None,
            kind: SettlementKind,
            amount: int,
            params: dict[str, Any],
        ) -> Settlement: ...

    # -- rows --

    def channel_record(
        self,
        *,
        channel_id: str,
        role: ChannelRole,
        peer: str,
        contract: str,
        payer: str,
        payee: str,
        salt: str | None,
        amount: int,
        deadline: int,
        window: int,
        state: ChannelRowState,
    ) -> Channel:
        """Write a channel down (the consumer: before its lock is sent); a second call with the same id
        only raises amount and deadline to what the chain shows (a top-up seen by the provider)."""
        if amount < 0:
            raise errors.invalid("bad_amount", "a channel's amount cannot be negative")
        with self._tx() as conn:
            now = self._clock()
            row = conn.execute("SELECT role, amount, deadline FROM channels WHERE channel_id = ?", (channel_id,))
            found = row.fetchone()
            if found is None:
                conn.execute(
                    f"INSERT INTO channels ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '0', ?, ?, NULL)",
                    (
                        channel_id,
                        role,
                        peer,
                        contract,
                        payer,
                        payee,
                        salt,
                        str(amount),
                        deadline,
                        window,
                        state,
                        now,
                        now,
                    ),
                )
                self._audit(conn, "channel.recorded", channel_id, {"role": role, "peer": peer, "amount": amount})
            else:
                if found[0] != role:
                    raise errors.conflict("channel_exists", "a channel with this id exists for the other side")
                conn.execute(
                    "UPDATE channels SET amount = ?, deadline = ? WHERE channel_id = ?",
                    (str(max(amount, int(found[1]))), max(deadline, int(found[2])), channel_id),
                )
            return self._channel_row(conn, channel_id)

    def channel_move(
        self, channel_id: str, to: ChannelRowState, *, amount: int | None = None, deadline: int | None = None
    ) -> Channel:
        """Move a channel's stored state (the same state again is a no-op), with a top-up's new figures."""
        with self._tx() as conn:
            current = self._channel_row(conn, channel_id)
            if to != current.state and to not in _MOVES.get(current.state, ()):
                raise errors.invariant("channel_transition", f"a channel cannot go from {current.state} to {to}")
            now = self._clock()
            conn.execute(
                "UPDATE channels SET state = ?, amount = ?, deadline = ?, closed_at = ? WHERE channel_id = ?",
                (
                    to,
                    str(current.amount if amount is None else max(amount, current.amount)),
                    current.deadline if deadline is None else max(deadline, current.deadline),
                    now if to in ("channel_closed", "channel_failed") else current.closed_at,
                    channel_id,
                ),
            )
            if to != current.state:
                self._audit(conn, "channel.moved", channel_id, {"from": current.state, "to": to})
            return self._channel_row(conn, channel_id)

    def channel_touch(self, channel_id: str) -> None:
        """A lease drew on it or returned: the idle clock starts again."""
        with self._tx() as conn:
            conn.execute("UPDATE channels SET last_used_at = ? WHERE channel_id = ?", (self._clock(), channel_id))

    def channel_attach(self, lease_id: str, channel_id: str, base: int) -> None:
        """Before the lease row: this lease draws on ``channel_id`` from ``base`` (idempotent)."""
        if base < 0:
            raise errors.invalid("bad_amount", "a base cannot be negative")
        with self._tx() as conn:
            found = conn.execute(
                "SELECT channel_id, base FROM channel_leases WHERE lease_id = ?", (lease_id,)
            ).fetchone()
            if found is not None:
                if (found[0], int(found[1])) != (channel_id, base):
                    raise errors.conflict("channel_lease_exists", "this lease draws on another channel or base")
                return
            self._channel_row(conn, channel_id)
            conn.execute(
                "INSERT INTO channel_leases (lease_id, channel_id, base) VALUES (?, ?, ?)",
                (lease_id, channel_id, str(base)),
            )
            conn.execute("UPDATE channels SET last_used_at = ? WHERE channel_id = ?", (self._clock(), channel_id))

    def channel_of_lease(self, lease_id: str) -> tuple[str, int] | None:
        """(channel id, base) of a lease drawn on a channel, else None."""
        with self._lock:
            row = self._conn_execute(
                "SELECT channel_id, base FROM channel_leases WHERE lease_id = ?", (lease_id,)
            ).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    def get_channel(self, channel_id: str) -> Channel:
        with self._read() as conn:
            return self._channel_row(conn, channel_id)

    def list_channels(
        self,
        *,
        role: ChannelRole | None = None,
        peer: str | None = None,
        states: tuple[str, ...] = (),
        limit: int = 256,
    ) -> list[Channel]:
        """Channels, newest first: of one side, with one peer, in some states."""
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        if role is not None:
            where.append("role = ?")
            args.append(role)
        if peer is not None:
            where.append("peer = ?")
            args.append(peer)
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            args.extend(states)
        with self._read() as conn:
            ids = conn.execute(
                f"SELECT channel_id FROM channels WHERE {' AND '.join(where)}"
                " ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [self._channel_row(conn, row[0]) for row in ids]

    # -- settlements --

    def enqueue_channel_claim(self, channel_id: str, *, close: bool) -> Settlement | None:
        """As the provider: claim the highest voucher held (``close``: and give the rest back, ``settle``).
        None when no voucher is held and nothing is to be closed."""
        with self._tx() as conn:
            ch = self._channel_row(conn, channel_id)
            if ch.role != "provider":
                raise errors.forbidden("not_provider", "only the provider of a channel claims from it")
            top = self._top_voucher(conn, channel_id)
            if top is None and not close:
                return None
            cumulative, voucher = top if top is not None else (0, None)
            params: dict[str, Any] = {"payer": ch.payer, "escrow_id": channel_id, "channel_id": channel_id}
            if voucher is not None:
                params["voucher"] = voucher
            if close:
                params["close"] = True
            verb = "settle" if close else "claim"
            settlement = self._enqueue(
                conn, f"channel/{channel_id}/{verb}/{cumulative}", None, "claim", cumulative, params
            )
            if close and ch.state == "channel_open":
                conn.execute("UPDATE channels SET state = 'channel_closing' WHERE channel_id = ?", (channel_id,))
            return settlement

    def enqueue_channel_refund(self, channel_id: str) -> Settlement:
        """As the consumer: the rest goes back (after deadline + window, or at once when the provider
        closed it); the channel takes no new lease from here."""
        with self._tx() as conn:
            ch = self._channel_row(conn, channel_id)
            if ch.role != "consumer":
                raise errors.forbidden("not_consumer", "only the payer of a channel asks for its refund")
            if ch.state in ("channel_opening", "channel_open"):
                conn.execute("UPDATE channels SET state = 'channel_closing' WHERE channel_id = ?", (channel_id,))
                self._audit(conn, "channel.moved", channel_id, {"from": ch.state, "to": "channel_closing"})
            params = {"payer": ch.payer, "escrow_id": channel_id, "channel_id": channel_id}
            return self._enqueue(conn, f"channel/{channel_id}/refund", None, "refund", 0, params)

    def _book_channel(
        self,
        conn: sqlite3.Connection,
        settlement: Settlement,
        released_total: int | None,
        refunded: int | None,
        now: int,
    ) -> int:
        """A channel settlement landed: book each lease's share of ``released_total`` once; a refund or a
        close settles the channel and its ended leases."""
        channel_id = str(settlement.params["channel_id"])
        ch = self._channel_row(conn, channel_id)
        moved = 0
        if released_total is not None:
            rows = conn.execute(
                "SELECT cl.lease_id, cl.base FROM channel_leases cl JOIN leases l ON l.lease_id = cl.lease_id"
                " WHERE cl.channel_id = ? ORDER BY CAST(cl.base AS INTEGER), l.created_at",
                (channel_id,),
            ).fetchall()
            for lease_id, base in rows:
                final = self._final_amount(conn, lease_id)
                share = max(0, min(released_total - int(base), final))
                lease = self._lease(conn, lease_id)
                moved += self._book_released(conn, lease, share, f"{settlement.settlement_id}/{lease_id}", now)
        closes = settlement.kind == "refund" or bool(settlement.params.get("close"))
        if closes:
            for (lease_id,) in conn.execute(
                "SELECT cl.lease_id FROM channel_leases cl JOIN leases l ON l.lease_id = cl.lease_id"
                " WHERE cl.channel_id = ? AND l.state = ?",
                (channel_id, LeaseState.ENDED.value),
            ).fetchall():
                self._move_lease(conn, self._lease(conn, lease_id), LeaseState.SETTLED, ended_at=now)
            conn.execute(
                "UPDATE channels SET state = 'channel_closed', closed_at = ?, refunded = ? WHERE channel_id = ?",
                (now, str(refunded if refunded is not None else ch.refunded), channel_id),
            )
            self._audit(conn, "channel.closed", channel_id, {"released": released_total, "refunded": refunded})
        return moved

    # -- derived figures --

    def _final_amount(self, conn: sqlite3.Connection, lease_id: str) -> int:
        row = conn.execute(
            "SELECT amount FROM receipts WHERE lease_id = ? AND consumer_sig IS NOT NULL AND voucher IS NOT NULL"
            " ORDER BY seq DESC LIMIT 1",
            (lease_id,),
        ).fetchone()
        return 0 if row is None else int(row[0])

    def _top_voucher(self, conn: sqlite3.Connection, channel_id: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for lease_id, base in conn.execute(
            "SELECT lease_id, base FROM channel_leases WHERE channel_id = ?", (channel_id,)
        ).fetchall():
            row = conn.execute(
                "SELECT amount, voucher FROM receipts WHERE lease_id = ? AND consumer_sig IS NOT NULL"
                " AND voucher IS NOT NULL ORDER BY seq DESC LIMIT 1",
                (lease_id,),
            ).fetchone()
            if row is not None and (best is None or int(base) + int(row[0]) > best[0]):
                best = (int(base) + int(row[0]), str(row[1]))
        return best

    def _channel_row(self, conn: sqlite3.Connection, channel_id: str) -> Channel:
        row = conn.execute(f"SELECT {_COLUMNS} FROM channels WHERE channel_id = ?", (channel_id,)).fetchone()
        if row is None:
            raise errors.not_found("channel_not_found", "no channel with this id")
        ch = _channel(row)
        committed = 0
        leases = 0
        for lease_id, base in conn.execute(
            "SELECT lease_id, base FROM channel_leases WHERE channel_id = ?", (channel_id,)
        ).fetchall():
            leases += 1
            committed = max(committed, int(base) + self._final_amount(conn, lease_id))
        claimed = 0
        for (amount,) in conn.execute(
            "SELECT amount FROM settlements WHERE kind = 'claim' AND settlement_id LIKE ? AND state IN"
            " ('pending', 'landed')",
            (f"channel/{channel_id}/%",),
        ).fetchall():
            claimed = max(claimed, int(amount))
        return ch.model_copy(update={"committed": committed, "claimed": claimed, "leases": leases})

    def _conn_execute(self, sql: str, args: tuple[Any, ...]) -> sqlite3.Cursor:
        conn: sqlite3.Connection = self._conn  # type: ignore[attr-defined]
        return conn.execute(sql, args)


class ChannelLedger:
    """The async face of the channel tables (each call in the ledger's worker lane, as ``Ledger``'s)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def record(self, **fields: Any) -> Channel:
        return await self.ledger._run(self.ledger.store.channel_record, **fields)

    async def move(
        self, channel_id: str, to: ChannelRowState, *, amount: int | None = None, deadline: int | None = None
    ) -> Channel:
        return await self.ledger._run(self.ledger.store.channel_move, channel_id, to, amount=amount, deadline=deadline)

    async def touch(self, channel_id: str) -> None:
        await self.ledger._run(self.ledger.store.channel_touch, channel_id)

    async def attach(self, lease_id: str, channel_id: str, base: int) -> None:
        await self.ledger._run(self.ledger.store.channel_attach, lease_id, channel_id, base)

    async def of_lease(self, lease_id: str) -> tuple[str, int] | None:
        return await self.ledger._run(self.ledger.store.channel_of_lease, lease_id)

    async def get(self, channel_id: str) -> Channel:
        return await self.ledger._run(self.ledger.store.get_channel, channel_id)

    async def list(
        self, *, role: ChannelRole | None = None, peer: str | None = None, states: tuple[str, ...] = ()
    ) -> list[Channel]:
        return await self.ledger._run(self.ledger.store.list_channels, role=role, peer=peer, states=states)

    async def enqueue_claim(self, channel_id: str, *, close: bool) -> Settlement | None:
        return await self.ledger._run(self.ledger.store.enqueue_channel_claim, channel_id, close=close)

    async def enqueue_refund(self, channel_id: str) -> Settlement:
        return await self.ledger._run(self.ledger.store.enqueue_channel_refund, channel_id)


async def escrow_recorded(ledger: Ledger, escrow_id: str, use: Literal["lease", "channel"]) -> bool:
    """Whether ``ledger`` holds this escrow, in any state, as a lease's own lock (a lease row under its id:
    the lease market's or a task's) or as a payment channel (the channel book)."""
    try:
        if use == "lease":
            await ledger.get_lease(escrow_id[2:])
        else:
            await ChannelLedger(ledger).get(escrow_id)
    except ClawnodeError as error:
        if error.code != ErrorCode.NOT_FOUND:
            raise
        return False
    return True
