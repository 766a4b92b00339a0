"""The provider's calls: admit a call on its lease (a reservation of the budget and a durable
pending row in the ledger, the write-ahead meter), stream it, meter it as its end frame leaves, and
settle its row (retried while the disk refuses). A cut call is billed the chunks it wrote and the
prompt tokens the engine had decoded by the cut; so is a call the engine failed on, in its error
frame. The rules: ``LeaseSession.reserve``, ``finish_call``, ``billable`` and ``aborted_call_units``
in ``protocols.machines.lease``."""

from __future__ import annotations

import contextlib
import functools
import hmac
import inspect
import secrets
import time
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import INetStream
from pydantic import BaseModel, ValidationError

from protocols import lease_wire as w
from protocols.lease.base import (
    CALL_ACK_TIMEOUT_S,
    CALL_READ_TIMEOUT_S,
    END_WRITE_TIMEOUT_S,
    MAX_CALL_FRAME,
    RESERVE_WAIT_S,
    LeaseCore,
    ServedLease,
    Ticket,
    body_version_read,
    ended_error,
    log,
    stop_on_cancel,
    token_digest,
)
from protocols.lease.verifying import prompt_ids
from protocols.machines.lease import BUDGET_BUSY_MESSAGE, aborted_call_units, chunk_tokens
from protocols.machines.model_features import required_features, serves
from protocols.machines.verdict import enforce
from runtime.errors import ClawnodeError, ErrorCode, Reason
from runtime.inference.admission import borrowing
from runtime.inference.service import ChatService, merge_chunks
from runtime.service import Usage
from runtime.verify import evidence
from runtime.verify.check import cached_index, index_for
from runtime.verify.commitment import K
from runtime.verify.evidence import CallProof, call_proof
from runtime.verify.identity import file_sha256
from runtime.verify.provider import CallRecorder, verifiable
from wire.framing import FrameReader, write_frame
from wire.rpc import error_reply
from wire.yamux_window import WindowedReader


@functools.cache
def _run_takes(kind: type, name: str) -> bool:
    """Whether a kind of service's ``run`` takes the keyword ``name``, as ``ChatService.run`` takes
    ``on_cut`` (what a cut call's prompt cost; one that does not bills a cut call its chunks alone),
    ``on_prompt`` and ``on_unsent`` (verified inference's prompt ids and a cut call's unsent chunks).
    Asked once a kind and name, not once a call: reading a signature is slow."""
    try:
        return name in inspect.signature(kind.run).parameters  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return False


def _record_unsent(recorder: CallRecorder, unsent: list[dict[str, Any]], streamed: int) -> None:
    """A call cut (or failed above the engine) after its text: hand ``recorder`` the ``commit`` entries of
    the chunks the engine produced that never left (``ChatService.run``'s ``on_unsent``), as far as
    they cover the ``streamed`` tokens whose text was written and whose top k it has not seen yet (a
    block is handed out after its last token's text: the cancel can land in between, or in the middle
    of a block, which the engine hands out as the cancel ends it). Their text is not recorded: it
    never left. The proof then covers exactly the reply written (``_failed_call_proof``)."""
    missing = streamed - len(recorder.tokens)
    for chunk in unsent:
        for block in chunk.get("commit") or ():
            if missing <= 0:
                return
            if isinstance(block, tuple):  # one position, (token, top), as Pick.top has it
                part, size = [block], 1
            elif len(block) <= missing:  # a CommitBlock, as the engine hands it out
                part, size = [block], len(block)
            else:  # its first positions only, as (token, top) tuples: the same bytes in the commitment
                part, size = block.entries()[:missing], missing
            recorder.see({"commit": part})
            missing -= size


async def _rendered_prompt_tokens(model: Any, body: dict[str, Any]) -> int:
    """The prompt tokens the engine makes of ``body`` on this file, as ``LlamaModel.stream_generate``
    renders it: a chat through its template, with a BOS token added unless the template is the GGUF's
    own (llama-cpp-python's Jinja formatter says it adds the special tokens itself); a text prompt with
    a BOS token; token ids as they are. 0 when it cannot tell (then no proof is signed)."""
    messages, prompt = body.get("messages"), body.get("prompt")
    if model is None:
        return 0
    if messages is not None:
        text = await model.format_chat(messages)
        add_bos = getattr(model, "chat_family", "") != "gguf-template"
        return len(await model.tokenize(text, add_bos=add_bos, special=True))
    if isinstance(prompt, str):
        return len(await model.tokenize(prompt, add_bos=True))
    return len(prompt) if isinstance(prompt, list) else 0


class ServingRole(LeaseCore):
    async def _settle_left_pending(self) -> None:
        """Calls a crash left pending are settled before any call is served, at 0 units
        (``LedgerStore.settle_pending_calls`` says why); on a full disk, as soon as it takes them."""
        try:
            left = await self.ledger.settle_pending_calls()
        except ClawnodeError as error:
            if error.code != ErrorCode.UNAVAILABLE:
                raise
            left = await self.ledger.pending_calls()
            self._unsettled.update(((lease_id, call_id), 0) for lease_id, call_id, _ in left)
        if left:
            log.info("%d call(s) cut by a restart settled at 0 units", len(left))

    async def _handle_call(self, stream: INetStream) -> None:
        remote = str(stream.muxed_conn.peer_id)
        reader = FrameReader(WindowedReader(stream), max_frame=MAX_CALL_FRAME)
        end: w.CallEnd | None = None
        counted: ServedLease | None = None
        # The proof this call's consumer reads: by the call protocol it negotiated (1.1.0 v3, 1.0.0 v2).
        ticket = Ticket(body_version=body_version_read(stream.get_protocol()))
        try:
            try:
                request = await reader.read_first_frame(self.call_read_timeout_s)
                if request is None:  # a spare stream closed unused by its consumer: no call, no failure
                    return
                call = w.CallRequest.model_validate_json(request)
                counted = self.served.get(call.lease_id)
                if counted is not None:
                    counted.in_flight += 1
                end = await self._serve_call(call, remote, stream, ticket, reader)
                reply: BaseModel = end
            except Exception as error:  # noqa: BLE001 - every failure becomes an error frame
                if not isinstance(error, ClawnodeError | ValidationError):
                    log.warning("call failed: %s", type(error).__name__)
                self._failed("serve_call", error)
                reply = error_reply(error)
                if ticket.served is not None and (ticket.streamed > 0 or ticket.prompt > 0):
                    # Its error frame says what it is billed: the chunks written and the prompt the engine
                    # had decoded (a request the engine refused only after its prompt, e.g. a grammar
                    # llama.cpp cannot parse, would have had the prefill for nothing). The consumer counts
                    # it within what arrived and the prompt's estimate (``error_frame_units``).
                    billed = aborted_call_units(ticket.reserved, ticket.streamed, ticket.prompt)
                    # With the proof of the reply it streamed, where it recorded one (verified inference).
                    reply = w.CallError(**reply.model_dump(), units=billed, verify=ticket.proof)
            written = False
            with trio.move_on_after(CALL_READ_TIMEOUT_S if end is None else END_WRITE_TIMEOUT_S) as writing:
                # An end frame that may have left is metered even if the node is shutting down meanwhile.
                writing.shield = end is not None
                try:
                    await write_frame(stream, reply.model_dump_json().encode(), max_frame=MAX_CALL_FRAME)
                    written = True
                except Exception:  # noqa: BLE001 - the consumer went away before the end frame
                    written = False
                if end is not None and written:
                    # Metered as the end frame leaves, not when (or whether) the consumer acknowledges
                    # it: the consumer counts the same units from that frame, so receipts stay honest.
                    await self._meter(call.lease_id, ticket, end.units)
            if ticket.served is not None and (ticket.streamed > 0 or ticket.prompt > 0):
                # Failed (its error frame named these units) or cut before its end frame left (the
                # consumer reset or hung up): billed the chunks written and the prompt the engine had
                # decoded (none after the engine's own failure); a consumer that got no last frame
                # counts what arrived and allows for its prompt (``protocols.machines.left_calls``).
                units = aborted_call_units(ticket.reserved, ticket.streamed, ticket.prompt)
                with trio.move_on_after(END_WRITE_TIMEOUT_S) as metering:
                    metering.shield = True
                    await self._meter(call.lease_id, ticket, units)
            if counted is not None:  # counted: the lease may end now, whatever the ack does
                counted.in_flight -= 1
                counted = None
            if end is not None and written:
                with trio.move_on_after(CALL_ACK_TIMEOUT_S), contextlib.suppress(Exception):
                    w.CallAck.model_validate_json(await reader.read_frame(CALL_ACK_TIMEOUT_S))
        finally:
            if ticket.served is not None:  # a failed or cut call: its reservation goes back, unmetered
                with trio.move_on_after(END_WRITE_TIMEOUT_S) as releasing:
                    releasing.shield = True
                    await self._meter(ticket.served.grant.lease_id, ticket, 0)
            if counted is not None:
                counted.in_flight -= 1
            with trio.move_on_after(1):
                await stream.close()

    async def _serve_call(
        self, call: w.CallRequest, remote: str, stream: INetStream, ticket: Ticket, reader: FrameReader
    ) -> w.CallEnd:
        served = self.served.get(call.lease_id)
        if (
            served is None
            or served.grant.consumer != remote
            or not hmac.compare_digest(token_digest(call.token), served.grant.token_sha256)
        ):
            raise ClawnodeError(ErrorCode.FORBIDDEN, "unknown lease or wrong access token", Reason.UNKNOWN_LEASE)
        if served.ended_reason is not None:
            raise ended_error(served.ended_reason)
        served.session.consumer_seen(self.clock())
        service = self.services.get(served.grant.capability)
        if service is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, f"{served.grant.capability} is not being served right now")
        # A request for what this model does not serve (tools, a JSON Schema, logprobs, n > 1) is refused
        # before anything is reserved or generated, never answered with free text that drops it.
        capability = served.grant.capability
        offer = next((offer for offer in self.offers() if offer.name == capability), None)
        enforce(serves(required_features(call.body), offer.model_facts() if offer else None, capability=capability))
        # The file this call is proved for: the one the lease was granted for (``ServedLease.sha256``);
        # after a restart, the one this node loaded (hashed at load: a cached read).
        path = getattr(getattr(service, "model", None), "path", None)
        if served.restored and not served.sha256 and path is not None:
            with contextlib.suppress(OSError):  # the file gone since its load: the offer's, as before
                served.sha256 = await trio.to_thread.run_sync(file_sha256, Path(path))
        sha256 = served.sha256 or (offer.sha256 if offer is not None else "")
        # Units held for this call until it is metered, so calls in flight never overshoot the budget.
        give_up_at = trio.current_time() + RESERVE_WAIT_S
        while True:
            try:
                plan = served.session.reserve(self.clock(), call.body)
                break
            except ClawnodeError as error:
                if error.code == ErrorCode.EXPIRED:
                    self._spawn(self._end_served, call.lease_id, "expired")
                if error.code != ErrorCode.RATE_LIMITED or error.message != BUDGET_BUSY_MESSAGE:
                    raise
                released = served.released
                with trio.move_on_at(give_up_at) as waited:
                    await released.wait()
                if waited.cancelled_caught:
                    raise
        ticket.served, ticket.reserved = served, plan.reserve
        # The write-ahead meter: nothing of the call leaves before the ledger holds a durable row for it
        # (a disk that refuses it refuses the call, E_UNAVAILABLE disk_full, before any chunk); every way
        # out of the call settles that row (``_meter``). The row is written while the engine starts (its
        # prefill and first token): the first chunk, or the end frame, waits for it.
        call_id = secrets.token_hex(12)
        written = trio.Event()
        unwritten: list[Exception] = []
        # Chunks the engine produced before the row was written: sent, as one frame where they merge,
        # as soon as it is (a refused row drops them unsent, uncounted).
        held: list[dict[str, Any]] = []
        frames = trio.Lock()  # the held chunks' frames and the next ones never interleave
        cut: list[Exception] = []  # the held chunks could not be written: the consumer went away
        merges = isinstance(service, ChatService)
        started = time.monotonic()
        first_chunk = True

        async def send(chunks: list[dict[str, Any]]) -> None:
            nonlocal first_chunk
            # A chunk is written whole or not at all (a cancel never cuts a frame), then counted.
            with trio.CancelScope(shield=True), trio.fail_after(CALL_READ_TIMEOUT_S):
                async with frames:
                    for data in merge_chunks(chunks) if merges and len(chunks) > 1 else chunks:
                        await write_frame(
                            stream, w.Chunk(data=data).model_dump_json().encode(), max_frame=MAX_CALL_FRAME
                        )
                        ticket.streamed += chunk_tokens(data)
                        if first_chunk:
                            first_chunk = False
                            self.serve_first_chunk_s.observe(time.monotonic() - started)

        async def write_ahead() -> None:
            try:
                with trio.CancelScope(shield=True):  # a row being written is known either way
                    await self.ledger.reserve_call(call.lease_id, call_id, reserved_units=plan.reserve)
            except Exception as error:  # noqa: BLE001 - the call is refused with it, below
                unwritten.append(error)
                held.clear()
                written.set()
                return
            ticket.call_id = call_id
            written.set()
            if held:
                chunks = held.copy()
                held.clear()
                try:
                    await send(chunks)
                except Exception as error:  # noqa: BLE001 - as a failed write in emit: the call is cut
                    cut.append(error)

        def metered() -> None:
            if unwritten:
                raise unwritten[0]
            if cut:
                raise cut[0]

        # The engine is told to stop where the reservation ends.
        body = {**call.body, "max_tokens": plan.max_tokens}
        # Verified inference: a model call whose record names its file is served with a commitment.
        recorder = await self._recorder(service, sha256, body)
        commit = 0
        if recorder is not None:
            if recorder.asked or not isinstance(service, ChatService):
                body = recorder.body
            else:  # the top K kept for the commitment alone, a block of tokens at a time (no logprobs)
                commit = K

        async def emit(data: dict[str, Any]) -> None:
            if recorder is not None:
                data = recorder.see(data)
                if commit and not data.get("text") and not data.get("tokens") and len(data) <= 2:
                    return  # only the commitment's positions: nothing for the consumer
            if not written.is_set():
                held.append(data)  # the engine goes on meanwhile; bounded by the call's max_tokens
                return
            metered()
            chunks = [*held, data]
            held.clear()
            await send(chunks)

        # A cut call's prompt tokens, as far as the engine decoded them before the cut (``on_cut``).
        decoded: list[int] = []
        run: dict[str, Any] = {"on_cut": decoded.append} if _run_takes(type(service), "on_cut") else {}
        # The prompt ids the engine decoded (a proof binds them: no tokenizing again behind the engine's
        # queue) and a cut call's chunks that never left (their commit entries complete its proof).
        prompt: list[list[int]] = []
        unsent: list[dict[str, Any]] = []
        if recorder is not None and _run_takes(type(service), "on_prompt"):
            run["on_prompt"] = prompt.append
        if commit:
            run["commit"] = commit
            if _run_takes(type(service), "on_unsent"):
                run["on_unsent"] = unsent.extend
        outcome: Usage | Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_ahead)
            # The consumer's cancel frame, or its hanging up, stops the engine.
            nursery.start_soon(stop_on_cancel, reader, nursery.cancel_scope)
            try:
                # The engine queues the call as its consumer's: admitted in turn with other consumers'.
                with borrowing(remote):
                    assert isinstance(service, ChatService) or "commit" not in run
                    outcome = await service.run(body, emit, **run)
            except Exception as error:  # noqa: BLE001 - re-raised below, outside the nursery
                outcome = error
            nursery.cancel_scope.cancel()
        if decoded and not unwritten:  # a call its row refused is billed nothing, whatever it decoded
            ticket.prompt = max(0, decoded[-1])
        metered()  # written by now (the nursery waited for it): a refused row refuses the call
        ids = prompt[-1] if prompt else None
        if not isinstance(outcome, Usage) and recorder is not None and unsent:
            _record_unsent(recorder, unsent, ticket.streamed)
        if isinstance(outcome, Exception):
            if recorder is not None and ticket.streamed > 0:
                # Failed after writing a reply it recorded: the error frame carries its proof, so the
                # consumer can check what it was handed (``_failed_call_proof``).
                ticket.proof = await self._failed_call_proof(recorder, service, sha256, call, call_id, ticket, ids)
            raise outcome
        self.serve_duration_s.observe(time.monotonic() - started)
        if outcome is None:
            # Cancelled by the consumer: the end frame bills the chunks written and the prompt the engine
            # had decoded (a call cut before its first chunk still pays the prefill it cost).
            units = aborted_call_units(plan.reserve, ticket.streamed, ticket.prompt)
            usage = {"prompt_tokens": min(ticket.prompt, units), "completion_tokens": ticket.streamed}
            cut_proof = None
            if recorder is not None and ticket.streamed > 0:
                # With the proof of the text it streamed, as a failed call's error frame: a consumer that
                # left because this side went silent (or sent too much) checks the reply it was handed
                # (``protocols.machines.lease_consumer.ending_checked``), so a cheat that stalls at the
                # end of every reply is checked too, and an honest provider can prove its reply.
                cut_proof = await self._failed_call_proof(recorder, service, sha256, call, call_id, ticket, ids)
            return w.CallEnd(units=units, usage=usage, served_by=self.peer_id, verify=cut_proof)
        # Its end frame may yet not leave: then it is billed as a cut call (``_handle_call``).
        ticket.prompt = max(0, int(outcome.detail.get("prompt_tokens", 0)))
        # An engine that counts more than the call reserved costs the provider, never the consumer.
        units = served.session.billable(plan.reserve, max(0, outcome.units))
        proof = None
        if recorder is not None:
            proof = await self._call_proof(
                recorder, service, sha256, call, call_id, outcome.detail, ticket.body_version, ids
            )
        return w.CallEnd(units=units, usage=outcome.detail, served_by=self.peer_id, verify=proof)

    async def _call_proof(
        self,
        recorder: CallRecorder,
        service: Any,
        sha256: str,
        call: w.CallRequest,
        call_id: str,
        usage: dict[str, int],
        reads: int,
        decoded: list[int] | None = None,
    ) -> CallProof | None:
        """The signed proof of a recorded call (``call_proof``), for its end frame or its error frame;
        ``usage``: the engine's count (its ``prompt_tokens`` is what the body signs); ``reads``: the newest
        body version its consumer reads (``Ticket.body_version``); ``decoded``: the prompt ids the engine
        built for the call (``ChatService.run``'s ``on_prompt``), None when it told none."""
        ids = None
        if evidence.SIGNED_VERSION >= 2:  # a v2 body binds the prompt as this file renders the request
            # The engine's own ids are that rendering (``prompt_ids``: the chat template, then its tokenizer
            # with the BOS the template leaves to it, as the engine builds a prompt) and cost nothing; the
            # rendering again is for a service that tells none. It tokenizes on the engine's worker,
            # admitted in turn: behind a long generation it could hold the end frame that long.
            ids = decoded
            claimed = int(usage.get("prompt_tokens", 0))
            if ids is None or len(ids) != claimed:  # none told, or not the prompt billed: rendered again
                ids = await prompt_ids(getattr(service, "model", None), call.body, claimed)
        # The chat format it rendered with, which a verifier renders the request in too (a v4 body signs it).
        chat_format = getattr(getattr(service, "model", None), "signed_chat_format", None)
        # The request as received, before the reservation's max_tokens: what the consumer sent and hashes.
        # Built on a worker thread: encoding the chunks and hashing a request of up to 1 MiB (~30 ms) would
        # hold every other call's stream on the trio loop (the engine is done with the recorder by now).
        build = functools.partial(
            call_proof,
            recorder,
            self.receipt_key,
            call.lease_id,
            call_id,
            sha256,
            usage,
            ids,
            reads,
            call.body,
            chat_format,
        )
        return await trio.to_thread.run_sync(build)

    async def _failed_call_proof(
        self,
        recorder: CallRecorder,
        service: Any,
        sha256: str,
        call: w.CallRequest,
        call_id: str,
        ticket: Ticket,
        decoded: list[int] | None = None,
    ) -> CallProof | None:
        """The proof of what a call that failed after its text chunks had recorded, for its error frame
        (or of what a call its consumer cancelled after them had, for the end frame that answers the
        cancel): the positions seen so far (every chunk seen was written before the error frame: the engine's
        chunks are sent as they come, and those held for the write-ahead row before it ends). Its
        prompt count is the engine's where the failure told it (``ticket.prompt``: a failure of the
        request's own, a cut), else the prompt ids the engine built (``decoded``), else this file's
        rendering of the request (the engine's own failure bills no prompt, so it reports 0). None when
        it cannot be built: then the error frame goes without one, never hiding the call's own error (a
        consumer that draws the call fails it ``no_proof``, as an end frame without one). None too when
        the positions recorded cover fewer tokens than the chunks written: a proof of a shorter reply
        than the one streamed would fail ``text_mismatch``, which a v2 body makes disputable, where no
        proof fails only ``no_proof`` (not disputed). The engine does not leave it so: it hands the
        commitment's top k a block of tokens at a time (``CommitRows``), after their text, the block in
        progress before its error (``_Choice.abandon``) or as a cancel ends it (``_Choice.end``), and a
        call cut or failed above the engine hands the recorder the blocks that never left
        (``_record_unsent``). It stays as the guard for a service that tells no unsent chunks."""
        if len(recorder.tokens) < ticket.streamed:
            log.info("a failed call's proof would not cover the %d tokens it streamed: sent without", ticket.streamed)
            return None
        try:
            claimed = ticket.prompt or (len(decoded) if decoded else 0)
            if not claimed:
                claimed = await _rendered_prompt_tokens(getattr(service, "model", None), call.body)
            usage = {"prompt_tokens": claimed}
            return await self._call_proof(recorder, service, sha256, call, call_id, usage, ticket.body_version, decoded)
        except Exception as error:  # noqa: BLE001 - the call's own error is what the consumer is told
            log.warning("the failed call's proof was not built: %s", type(error).__name__)
            return None

    async def _recorder(self, service: Any, sha256: str, body: dict[str, Any]) -> CallRecorder | None:
        model = getattr(service, "model", None)
        path = getattr(model, "path", None)
        if not sha256 or path is None or not verifiable(body):
            return None
        index = cached_index(path)
        if index is None:  # built once per file, on a thread (a vocabulary's detokenizing); then no hop a call
            index = await trio.to_thread.run_sync(index_for, path)
        return CallRecorder(body, index)

    async def _meter(self, lease_id: str, ticket: Ticket, units: int) -> None:
        """A call ended (``units``: its end frame's, the chunks a cut call wrote, 0 for a failed one): its
        reservation becomes metered units and its pending row in the ledger is settled with them."""
        served = ticket.served
        if served is None:
            return
        # Counted at once (no await before): the reservation turns into metered units in one step.
        ticket.served = None
        billed = served.session.billable(ticket.reserved, units)
        due = served.session.finish_call(ticket.reserved, billed, self.clock())
        served.reservation_returned()
        if ticket.call_id is not None:
            # Counted above: its row is settled too, whatever deadline the caller's scope has left (a
            # settlement dropped there stayed pending until a restart settled it at 0: served unpaid).
            with trio.CancelScope(shield=True):
                await self._settle(lease_id, ticket.call_id, billed)
        if due:
            self._spawn(self._push_receipt, lease_id)

    async def _settle(self, lease_id: str, call_id: str, units: int) -> None:
        """Settle a call's pending row; one the disk refuses is kept and retried (``_settle_unsettled``)."""
        try:
            await self.ledger.settle_call(lease_id, call_id, units=units)
        except ClawnodeError as error:
            if error.code == ErrorCode.UNAVAILABLE:
                self._unsettled[(lease_id, call_id)] = units
            else:
                log.warning("the call on lease %s could not be settled: %s", lease_id[:12], error.code)

    async def _settle_unsettled(self, lease_id: str | None = None) -> None:
        """Retry the settlements the disk refused (of one lease, or all), oldest first, until one fails."""
        for key, units in list(self._unsettled.items()):
            if lease_id is not None and key[0] != lease_id:
                continue
            try:
                await self.ledger.settle_call(*key, units=units)
            except ClawnodeError as error:
                if error.code == ErrorCode.UNAVAILABLE:
                    return
                if error.code != ErrorCode.NOT_FOUND:  # not found: settled meanwhile by another retry
                    log.warning("the call on lease %s could not be settled: %s", key[0][:12], error.code)
            else:
                log.info("a call on lease %s is settled now that the disk takes writes again", key[0][:12])
            self._unsettled.pop(key, None)

    async def _retry_settlements(self) -> None:
        if self._settling:
            return
        self._settling = True
        try:
            await self._settle_unsettled()
        finally:
            self._settling = False
