"""The dashboard's "Tasks and disputes" section in a real headless Chromium (Debian's ``chromium``,
driven by Playwright) against real ``clawnode start`` daemons sharing one anvil chain.

A creator, a bidder and an arbiter, each its own process with a funded anvil wallet, take a task
through the node API (publish → bid → award with an escrow lock → submit → reject) while the
creator's page is open: the task shows up and moves on without a reload; no dispute is offered
before something was delivered, and none without a reason; then the operator types a reason and
opens a dispute from the page. The page shows it open, and so do the creator's API, the escrow
contract (the lock is frozen on chain), the bidder, and the arbiter that received the signed case.
Then the operator adds evidence from the page, a note and a file: the arbiter holds both (the
file byte for byte), the bidder sees the note, and the page lists it.

Screenshots go to ``test-artifacts/dashboard/``. Skipped, with the install command, when no
chromium or playwright is found, or when anvil (npm) is not installed.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.datadir import read_api_token
from runtime.escrow import Chain, EscrowClient
from tests.runtime.support import anvil_daemon_env, anvil_process, anvil_skip_reason
from tests.support.processes import LOOPBACK_ANY_PORT, DaemonProcess, prepare_data_dir
from tests.test_dashboard import Browser, api, text, wait_until
from tests.test_dashboard import _skip as _browser_skip
from tests.test_dashboard import browser as _browser_fixture
from tests.test_dashboard import chromium as _chromium_fixture

_skip = _browser_skip or anvil_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

browser = _browser_fixture  # the same Chromium tab fixture as the dashboard tests
chromium = _chromium_fixture

CAPABILITY = "model:summaries"
PRICE = 4_000_000


@pytest.fixture(scope="module")
def chain() -> Iterator[tuple[dict[str, str], Chain, EscrowClient]]:
    with anvil_process() as url:
        chain = Chain.rpc(url)
        escrow = EscrowClient.deploy(chain, chain.dev_accounts()[0])
        # Long enough that the rejected task is not refunded before the page disputes it.
        env = anvil_daemon_env(url, escrow.address, dispute_window_s=600)
        yield env, chain, escrow


def _daemon(tmp: Path, name: str, env: dict[str, str], wallet_key: str, bootstrap: list[str]) -> DaemonProcess:
    data_dir = prepare_data_dir(tmp / name, wallet_key=wallet_key)
    args = [*LOOPBACK_ANY_PORT, *(arg for addr in bootstrap for arg in ("--bootstrap", addr))]
    return DaemonProcess(data_dir, args, env=env).start(wait_s=60)


def _task(daemon: DaemonProcess, task_id: str) -> dict[str, Any] | None:
    return next((t for t in api(daemon, "GET", "/api/tasks")["tasks"] if t["task_id"] == task_id), None)


def _escrow_state(daemon: DaemonProcess) -> str:
    return str(api(daemon, "GET", "/api/ledger/summary")["escrow"]["state"])


def _cells(browser: Browser, task_id: str) -> list[str]:
    row = browser.page.locator(f'#tasks-table tr[data-task-id="{task_id}"] td')
    return [cell.strip() for cell in row.all_inner_texts()]


def test_a_dispute_opened_from_the_page_reaches_the_chain_the_bidder_and_the_arbiter(
    chain: tuple[dict[str, str], Chain, EscrowClient],
    tmp_path: Path,
    daemons: list[DaemonProcess],
    browser: Browser,
) -> None:
    env, anvil, escrow = chain
    accounts = anvil.dev_accounts()
    creator = _daemon(tmp_path, "creator", env, accounts[1].key.hex(), [])
    daemons.append(creator)
    bootstrap = creator.identity()["listen_addrs"][:1]
    arbiter = _daemon(tmp_path, "arbiter", env, accounts[3].key.hex(), bootstrap)
    daemons.append(arbiter)
    # A seller takes awards only under the arbiter its node trusts, by peer id and wallet: on an rpc chain,
    # escrow.arbiter_peer with escrow.arbiter.
    trusting = {
        **env,
        "CLAWNODE_ESCROW_ARBITER": accounts[3].address,
        "CLAWNODE_ESCROW_ARBITER_PEER": arbiter.identity()["peer_id"],
    }
    bidder = _daemon(tmp_path, "bidder", trusting, accounts[2].key.hex(), bootstrap)
    daemons.append(bidder)
    creator_id = creator.identity()["peer_id"]
    for node in (bidder, arbiter):
        node.wait_for_peers({creator_id})
    for node in (creator, bidder):
        wait_until(lambda: _escrow_state(node) == "connected", "the escrow connection", timeout_s=60)  # noqa: B023

    page = browser.page
    browser.sign_in(creator)
    page.wait_for_selector("#tasks-table td.empty")
    page.evaluate("window.__notReloaded = true")

    api(bidder, "POST", "/api/tasks/watch", {"capability": CAPABILITY})
    api(creator, "POST", "/api/tasks/watch", {"capability": CAPABILITY})  # the creator relays its topic too
    time.sleep(2)  # a gossip heartbeat or two: the mesh forms
    published = api(
        creator,
        "POST",
        "/api/tasks",
        {
            "capability": CAPABILITY,
            "budget": 5_000_000,
            "deadline_s": 600,
            "summary": "summarise a <b>page</b>",
            "arbiter_peer": arbiter.identity()["peer_id"],
            "arbiter_wallet": accounts[3].address,
        },
    )
    task_id = published["task_id"]
    assert published["role"] == "creator" and published["state"] == "task_open"

    # The task appears without a reload; markup in its summary is shown as text.
    row = page.locator(f'#tasks-table tr[data-task-id="{task_id}"]')
    row.wait_for(timeout=15_000)
    cells = _cells(browser, task_id)
    assert cells[1:4] == ["creator", CAPABILITY, "summarise a <b>page</b>"] and cells[5] == "task_open"
    assert page.locator("#tasks-table b").count() == 0

    # Nothing awarded or delivered yet: nothing to dispute, so no dispute is offered.
    assert row.locator("button.open-dispute").count() == 0

    # Bid, award (the escrow lock), deliver and reject, all through the API.
    wait_until(lambda: _task(bidder, task_id), "the announcement reaching the bidder", timeout_s=60)
    bid = api(bidder, "POST", f"/api/tasks/{task_id}/bids", {"price": PRICE})
    wait_until(lambda: (_task(creator, task_id) or {}).get("bids"), "the bid reaching the creator", timeout_s=60)
    awarded = api(creator, "POST", f"/api/tasks/{task_id}/award", {"bid_id": bid["bid_id"]})
    assert awarded["state"] == "task_awarded" and awarded["price"] == PRICE
    wait_until(lambda: (_task(bidder, task_id) or {}).get("role") == "awarded_bidder", "the award notice", timeout_s=60)
    artifact = base64.b64encode(b"A summary that misses the point.").decode()
    api(bidder, "POST", f"/api/tasks/{task_id}/result", {"artifact_b64": artifact})
    wait_until(lambda: (_task(creator, task_id) or {}).get("result_state"), "the result", timeout_s=60)
    page.wait_for_function(
        "id => [...document.querySelectorAll(`#tasks-table tr[data-task-id='${id}'] td`)]"
        ".some((td) => td.textContent === 'result_submitted')",
        arg=task_id,
        timeout=15_000,
    )
    reviewed = api(creator, "POST", f"/api/tasks/{task_id}/review", {"accept": False, "reason": "off topic"})
    assert reviewed["result_state"] == "result_rejected"
    page.wait_for_function(
        "id => [...document.querySelectorAll(`#tasks-table tr[data-task-id='${id}'] td`)]"
        ".some((td) => td.textContent === 'result_rejected')",
        arg=task_id,
        timeout=15_000,
    )
    assert page.evaluate("window.__notReloaded") is True
    cells = _cells(browser, task_id)
    assert cells[5] == "task_awarded" and cells[6] == "result_rejected" and cells[7] == ""
    assert row.locator("button.open-dispute").count() == 1
    browser.shot("tasks-rejected")
    # A dispute needs a reason: the arbiter reads it.
    row.locator("button.open-dispute").click()
    page.wait_for_selector("#tasks-message.error:has-text('Say what went wrong')")

    # Open the dispute from the page.
    escrow_id = bytes.fromhex(awarded["escrow_id"][2:])
    assert escrow.get(accounts[1].address, escrow_id).phase == "active"
    row.locator("input.dispute-reason").fill("the bidder's summary is fine: the rejection was a mistake")
    row.locator("button.open-dispute").click()
    page.wait_for_selector(f"#tasks-message:has-text('Dispute opened on task {task_id[:8]}')", timeout=60_000)
    assert page.get_attribute("#tasks-message", "class") == "muted"
    page.wait_for_function(
        "id => [...document.querySelectorAll(`#tasks-table tr[data-task-id='${id}'] td`)]"
        ".some((td) => td.textContent === 'dispute_open')",
        arg=task_id,
        timeout=15_000,
    )
    assert row.locator("button.open-dispute").count() == 0  # no second dispute offered
    assert page.evaluate("window.__notReloaded") is True
    browser.shot("tasks-disputed")

    # The node, the chain, the other party and the arbiter agree.
    mine = _task(creator, task_id)
    assert mine is not None and mine["dispute_state"] == "dispute_open", mine
    assert escrow.get(accounts[1].address, escrow_id).phase == "disputed"
    wait_until(
        lambda: (_task(bidder, task_id) or {}).get("dispute_state") == "dispute_open",
        "the dispute notice at the bidder",
        timeout_s=60,
    )
    case = wait_until(lambda: _task(arbiter, task_id), "the dispute case at the arbiter", timeout_s=60)
    assert case["role"] == "arbiter" and case["dispute_state"] == "dispute_open", case
    assert case["result_state"] == "result_rejected" and case["price"] == PRICE

    # Evidence from the page: a note and a file go to the arbiter (and the bidder sees the note).
    evidence_form = page.locator(f'#tasks-table tr[data-evidence-for="{task_id}"]')
    evidence_form.locator("button.add-evidence").click()
    page.wait_for_selector("#tasks-message.error:has-text('Write a note or attach a file')")
    note = "The brief asked for <i>three</i> sentences; the summary has one."
    attachment = b"brief.txt: summarise the page in three sentences\n"
    evidence_form.locator("textarea.evidence-note").fill(note)
    evidence_form.locator("input.evidence-file").set_input_files(
        {"name": "brief.txt", "mimeType": "text/plain", "buffer": attachment}
    )
    evidence_form.locator("button.add-evidence").click()
    page.wait_for_selector(
        f"#tasks-message:has-text('Evidence sent to the arbiter of task {task_id[:8]}')", timeout=60_000
    )
    page.wait_for_selector(f'#tasks-table tr[data-evidence-for="{task_id}"] .evidence-text', timeout=15_000)
    assert text(page, f'#tasks-table tr[data-evidence-for="{task_id}"] .evidence-text') == note
    assert page.locator("#tasks-table i").count() == 0  # markup in a note is shown as text
    assert page.evaluate("window.__notReloaded") is True
    browser.shot("tasks-evidence")
    held = wait_until(
        lambda: (_task(arbiter, task_id) or {}).get("evidence"), "the evidence at the arbiter", timeout_s=60
    )
    (piece,) = held
    assert piece["note"] == note and piece["size"] == len(attachment)
    assert piece["submitted_by"] == creator_id
    stored = api(arbiter, "GET", f"/api/tasks/{task_id}/evidence/{piece['evidence_id']}")
    assert base64.b64decode(stored["attachment_b64"]) == attachment
    wait_until(
        lambda: [e["note"] for e in (_task(bidder, task_id) or {}).get("evidence", [])] == [note],
        "the evidence at the bidder",
        timeout_s=60,
    )

    browser.assert_no_secrets(creator, tmp_path)
    for node in (creator, bidder, arbiter):
        log = node.log()
        assert str(tmp_path) not in log
        assert all(read_api_token(other.data_dir) not in log for other in (creator, bidder, arbiter))
