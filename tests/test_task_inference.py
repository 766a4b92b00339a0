"""``inference`` tasks end to end: real nodes serving the tiny model, gossip, task streams, ledgers and
the embedded chain. The seller's node runs the prompt batch on its loaded model and submits the
outputs with the tokens it generated; a dispute is decided by the arbiter re-running the batch at
temperature 0 on its own copy of the same model file: a correct result rejected goes to the seller,
a wrong one back to the buyer, and a batch the arbiter cannot re-run waits for a person.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner, Result

from node.cli import main
from node.daemon import Node
from protocols.gossip import task_topic
from protocols.machines import task_inference as rules
from protocols.machines.task import TaskState
from protocols.task.inference import InferenceTerms, inference_terms, outputs_bytes
from protocols.task_wire import PanelMember, PanelTerms, RunUsage
from runtime.errors import ErrorCode
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.sandbox import sha256_hex
from runtime.verify.identity import file_sha256
from tests.support.market import SharedChain, market_nodes, wait_for

CAPABILITY = "model:tiny"
ETH = 10**18
PRICE = ETH // 2
PROMPTS = ["The quick brown fox", "Once upon a time"]

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")


def _peer(node: Node) -> str:
    return str(node.host.get_id())


def test_the_run_rules_refuse_what_the_node_cannot_or_will_not_run() -> None:
    base = rules.InferenceRunFacts(
        accepted=True,
        automatic=True,
        model="tiny",
        loaded_sha256="a" * 64,
        wanted_sha256="a" * 64,
        prompts=2,
        batch_bytes=40,
        max_tokens=8,
    )
    assert rules.inference_run_verdict(base) is None
    assert rules.inference_run_verdict(dataclasses.replace(base, wanted_sha256="")) is None  # any file of that name
    cases = {
        "not_automatic": dataclasses.replace(base, automatic=False),
        "kind_not_accepted": dataclasses.replace(base, accepted=False),
        "batch_too_large": dataclasses.replace(base, batch_bytes=rules.MAX_BATCH_BYTES + 1),
        "max_tokens_out_of_range": dataclasses.replace(base, max_tokens=rules.MAX_TOKENS + 1),
        "model_not_loaded": dataclasses.replace(base, loaded_sha256=None),
        "model_file_differs": dataclasses.replace(base, loaded_sha256="b" * 64),
    }
    for reason, facts in cases.items():
        refusal = rules.inference_run_verdict(facts)
        assert refusal is not None and refusal.reason == reason
    assert rules.inference_run_verdict(dataclasses.replace(base, prompts=rules.MAX_PROMPTS + 1)) is not None
    assert rules.inference_run_verdict(cases["model_file_differs"]).code == ErrorCode.NOT_FOUND  # type: ignore[union-attr]

    rerun = rules.InferenceRerunFacts(price=10, temperature=0.0, claimed_sha256="c" * 64, rerun_sha256="c" * 64)
    assert rules.inference_rerun_verdict(rerun) == rules.RerunVerdict("resolve", 10, "rerun_matches")
    other = dataclasses.replace(rerun, rerun_sha256="d" * 64)
    assert rules.inference_rerun_verdict(other) == rules.RerunVerdict("resolve", 0, "output_differs")
    sampled = dataclasses.replace(other, temperature=0.7)
    assert rules.inference_rerun_verdict(sampled).action == "escalate"  # sampled text proves nothing
    unnamed = dataclasses.replace(other, model_named=False)  # the seller may have run another file of that name
    assert rules.inference_rerun_verdict(unnamed) == rules.RerunVerdict("escalate", 0, "model_file_unnamed")
    missing = dataclasses.replace(rerun, rerun_sha256=None, rerun_refusal="model_not_loaded")
    assert rules.inference_rerun_verdict(missing) == rules.RerunVerdict("escalate", 0, "model_not_loaded")


def test_a_busy_model_is_asked_again_after_its_hint_until_the_deadline() -> None:
    busy = rules.BusyFacts(busy=True, waited_s=0.0, retry_after_s=0.4)
    assert rules.busy_retry_verdict(busy) == 0.4
    assert rules.busy_retry_verdict(dataclasses.replace(busy, retry_after_s=None)) == 1.0  # no hint: a second
    assert rules.busy_retry_verdict(dataclasses.replace(busy, retry_after_s=0.0)) == rules.BUSY_MIN_WAIT_S
    # Past the deadline, or any other failure, the failure stands (a person, or no result, as before).
    late = dataclasses.replace(busy, waited_s=rules.BUSY_DEADLINE_S - 0.1)
    assert rules.busy_retry_verdict(late) is None
    assert rules.busy_retry_verdict(dataclasses.replace(busy, busy=False)) is None


def test_terms_are_bounded_and_other_kinds_are_not_inference() -> None:
    assert inference_terms('{"kind": "wasm"}') is None and inference_terms(None) is None
    terms = InferenceTerms(model="tiny", prompts=["hi"])
    assert terms.temperature == 0.0 and inference_terms(terms.model_dump_json()) == terms
    with pytest.raises(ValueError):
        InferenceTerms(model="tiny", prompts=["x"] * (rules.MAX_PROMPTS + 1))
    with pytest.raises(ValueError):
        InferenceTerms(model="tiny", prompts=[])


async def _publish(creator: Node, seller: Node, arbiter: Node, shared: SharedChain, terms: InferenceTerms) -> str:
    topic = task_topic(CAPABILITY)
    await wait_for(lambda: seller.host.get_id() in creator.announcements.pubsub.peer_topics.get(topic, ()), 30, "sub")
    view = await creator.tasks.publish_inference(
        CAPABILITY,
        ETH,
        120,
        terms=terms,
        summary="complete these",
        arbiter_peer=_peer(arbiter),
        arbiter_wallet=shared.arbiter.address,
        review_timeout_s=60,
    )
    await wait_for(lambda: view.task_id in seller.tasks.book.tasks, 30, "announcement")
    bid = await seller.tasks.bid(view.task_id, PRICE)
    await creator.tasks.award(view.task_id, bid.bid_id)
    return view.task_id


async def _closed_with(node: Node, task_id: str, to_bidder: int) -> None:
    await wait_for(lambda: str(node.tasks.book.get(task_id).state) == TaskState.CLOSED, 30, "task closed")
    view = node.tasks.view(task_id)
    assert (view.to_bidder, view.to_creator) == (to_bidder, PRICE - to_bidder)


async def test_inference_tasks_run_by_the_seller_and_disputes_decided_by_re_running_the_batch(tmp_path: Path) -> None:
    seller_file = write_tiny_llama_gguf(tmp_path / "seller.gguf")
    arbiter_file = write_tiny_llama_gguf(tmp_path / "arbiter.gguf")  # the same bytes, the arbiter's copy
    digest = file_sha256(seller_file)

    def spec(path: Path) -> ModelSpec:
        return ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]

    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [
        {},
        # The seller trusts the arbiter and the member with a copy on a panel (escrow.trusted_arbiters: their
        # PEER:WALLET): two of the panel's three, its threshold.
        {"models": (spec(seller_file),), "trusts": (2, 3), "arbiter": 2},  # escrow.arbiter_peer: node 2
        {"wallet_key": shared.arbiter.key.hex(), "models": (spec(arbiter_file),)},
        {"models": (spec(write_tiny_llama_gguf(tmp_path / "member.gguf")),)},
        {},  # a panel member that serves no model
    ]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        creator, seller, arbiter, *others = nodes
        for node in (seller, arbiter, *others):
            node.sandbox.policy = dataclasses.replace(node.sandbox.policy, kinds=frozenset({"wasm", "inference"}))
        await seller.tasks.watch(CAPABILITY)
        terms = InferenceTerms(model="tiny", model_sha256=digest, prompts=PROMPTS, max_tokens=6)

        # 1. The seller ran the batch on its model by itself; the buyer rejects it and disputes:
        # the arbiter's re-run at temperature 0 gives the same text and pays the seller.
        # The seller's model is busy when the batch starts (its slots held, no queue): the prompt the
        # model refuses (E_RATE_LIMITED busy) is asked again after the hint, not given up.
        model = seller.model_host.get("tiny")
        assert model is not None
        queue, model.admission.max_queue = model.admission.max_queue, 0
        held = [await model.admission.acquire(borrower="someone else") for _ in range(model.admission.slots)]
        task_id = await _publish(creator, seller, arbiter, shared, terms)
        await wait_for(lambda: model.admission.refused >= 1, 20, "a busy refusal")
        for ticket in held:
            model.admission.release(ticket)
        model.admission.max_queue = queue
        await wait_for(lambda: creator.tasks.view(task_id).result_state == "result_submitted", 20, "result")
        delivered = creator.tasks.artifact(task_id)
        assert delivered is not None
        outputs = json.loads(delivered)["outputs"]
        assert len(outputs) == len(PROMPTS) and all(isinstance(text, str) and text for text in outputs)
        view = creator.tasks.view(task_id)
        assert view.kind == "inference" and seller.tasks.view(task_id).kind == "inference"
        assert view.run is not None and view.run.outcome == "inference" and 0 < view.run.fuel_used <= 12
        await creator.tasks.review(task_id, False, "I do not like it")
        await creator.tasks.dispute(task_id, "wrong, surely")
        for node in (creator, seller):
            await _closed_with(node, task_id, PRICE)
        assert arbiter.tasks.view(task_id).run_verdict == "rerun_matches"
        assert seller.sandbox.stats.runs["inference"] == arbiter.sandbox.stats.runs["inference"] == 1
        (piece,) = [e for e in await creator.ledger.list_evidence(task_id) if e.submitted_by == _peer(arbiter)]
        assert "rerun_matches" in piece.note and sha256_hex(delivered) in piece.note

        # 2. A seller that submits other text than the model writes is refunded away by the re-run.
        seller.sandbox.policy = dataclasses.replace(seller.sandbox.policy, auto_run=False)  # delivers by hand
        task_id = await _publish(creator, seller, arbiter, shared, terms)
        await seller.tasks.submit(
            task_id, outputs_bytes(["made up", "text"]), RunUsage(fuel_used=4, outcome="inference")
        )
        await wait_for(lambda: creator.tasks.view(task_id).result_state == "result_submitted", 20, "result")
        await creator.tasks.review(task_id, False, "not the model's text")
        await creator.tasks.dispute(task_id, "the outputs are not what the model writes")
        for node in (creator, seller):
            await _closed_with(node, task_id, 0)
        assert arbiter.tasks.view(task_id).run_verdict == "output_differs"

        # 3. A model file the arbiter does not hold: nothing is decided without a person.
        # Published through the CLI (which posts an ``inference`` object to ``POST /api/tasks``).
        cli = ["task", "publish", CAPABILITY, "--budget", str(ETH), "--deadline", "120", "--model", "tiny"]
        cli += ["--model-sha256", "e" * 64, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-tokens", "6"]
        cli += ["--arbiter-peer", _peer(arbiter), "--arbiter-wallet", shared.arbiter.address, "--review-timeout", "60"]

        def run_cli() -> Result:
            return CliRunner().invoke(
                main, [*cli, "--data-dir", str(creator.data_dir), "--json"], catch_exceptions=False
            )

        published = await trio.to_thread.run_sync(run_cli)
        assert published.exit_code == 0, published.output
        task_id = json.loads(published.output)["task_id"]
        assert json.loads(published.output)["kind"] == "inference"
        await wait_for(lambda: task_id in seller.tasks.book.tasks, 30, "announcement")
        bid = await seller.tasks.bid(task_id, PRICE)
        await creator.tasks.award(task_id, bid.bid_id)
        await seller.tasks.submit(task_id, delivered, RunUsage(fuel_used=4, outcome="inference"))
        await wait_for(lambda: creator.tasks.view(task_id).result_state == "result_submitted", 20, "result")
        await creator.tasks.review(task_id, False, "no")
        await creator.tasks.dispute(task_id, "no")
        await wait_for(lambda: arbiter.tasks.view(task_id).run_verdict is not None, 20, "arbiter looked")
        assert arbiter.tasks.view(task_id).run_verdict == "model_file_differs"
        assert arbiter.tasks.view(task_id).dispute_state == "dispute_open"

        # 4. A task that names a 2-of-3 panel (the arbiter, a member with a copy of the file, one with no
        # model, which abstains: model_not_loaded): the buyer locks the price for the panel's wallets, the
        # seller checks that lock and disputes the rejection of its honest result, and two agreeing re-runs
        # pay the seller on chain with no single arbiter.
        seller.sandbox.policy = dataclasses.replace(seller.sandbox.policy, auto_run=True)
        members = [arbiter, *others]
        panel = PanelTerms(
            members=[PanelMember(peer=_peer(n), wallet=n.escrow_client.account.address) for n in members],  # type: ignore[union-attr]
            threshold=2,
        )
        view = await creator.tasks.publish_inference(
            CAPABILITY, ETH, 120, terms=terms.model_copy(update={"panel": panel}), review_timeout_s=60
        )
        task_id = view.task_id
        assert view.panel == panel
        await wait_for(lambda: task_id in seller.tasks.book.tasks, 30, "announcement")
        bid = await seller.tasks.bid(task_id, PRICE)
        await creator.tasks.award(task_id, bid.bid_id)
        await wait_for(lambda: creator.tasks.view(task_id).result_state == "result_submitted", 20, "result")
        await creator.tasks.review(task_id, False, "I do not like it")
        await wait_for(lambda: seller.tasks.view(task_id).result_state == "result_rejected", 20, "rejection")
        await seller.tasks.dispute(task_id, "the outputs are the model's text")  # the seller disputes this time
        for node in (creator, seller):
            await _closed_with(node, task_id, PRICE)
        view = creator.tasks.view(task_id)
        assert view.panel_state == "decided"
        assert view.panel_votes is not None and [view.panel_votes.get(_peer(m)) for m in members[:2]] == [PRICE] * 2
        assert others[1].tasks.view(task_id).run_verdict == "model_not_loaded"
