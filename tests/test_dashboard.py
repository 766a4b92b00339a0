"""The operator's dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright)
against real ``clawnode start`` daemons.

The page signs in with the API token, shows the node's own figures, changes a price, picks up a
lease opened from the CLI without a reload and shows a stalled settlement queue's alert; neither
the page nor any reply it fetched carries the token or the data dir's path. Screenshots go to
``test-artifacts/dashboard/``. Skipped, with the install command, when no chromium is found.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from node.datadir import load_or_create_identity, read_api_token, read_running
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.ledger import EscrowRef, LeaseOpen, Ledger
from runtime.ledger.verifications import VerificationRow
from tests.runtime.support import free_port
from tests.support.processes import LOOPBACK_ANY_PORT, DaemonProcess, run_cli
from tests.test_ledger_daemon import PRICE, _write_money
from wire.peer_keys import peer_id_of

try:
    from playwright.sync_api import Page, Response, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None  # type: ignore[assignment]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INSTALL = "apt-get install -y chromium && pip install playwright (no `playwright install` needed)"
_skip = (
    f"playwright is not installed: {INSTALL}"
    if sync_playwright is None
    else (f"no chromium binary found: {INSTALL}" if CHROMIUM is None else None)
)
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
BASE_ENV = {"CLAWNODE_BOOTSTRAP_USE_DEFAULTS": "false"}


def api_url(daemon: DaemonProcess) -> str:
    running = read_running(daemon.data_dir)
    assert running is not None
    return running.api_url


def api(daemon: DaemonProcess, method: str, path: str, body: Any = None) -> Any:
    reply = httpx.request(
        method,
        f"{api_url(daemon)}{path}",
        json=body,
        headers={"authorization": f"Bearer {read_api_token(daemon.data_dir)}"},
        timeout=30.0,
    )
    assert reply.status_code < 300, reply.text
    return reply.json()


def text(page: Page, selector: str) -> str:
    return page.text_content(selector) or ""


def wait_until(check: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


@dataclass
class Browser:
    """One Chromium tab, recording every response the page received (URL, request headers, body)."""

    page: Page
    seen: list[tuple[str, dict[str, str], str]] = field(default_factory=list)

    def record(self, response: Response) -> None:
        try:
            body = response.text()
        except Exception:  # noqa: BLE001 - a redirect or a dropped body: nothing to scan
            body = ""
        self.seen.append((response.url, response.request.headers, body))

    def sign_in(self, daemon: DaemonProcess) -> None:
        self.page.goto(f"{api_url(daemon)}/")
        self.page.fill("#token-input", read_api_token(daemon.data_dir))
        self.page.click("#login-button")
        self.page.wait_for_selector("#app:not([hidden])")

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.evaluate("window.scrollTo(0, 0)")  # the sticky header stays on top of a full-page shot
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    def assert_no_secrets(self, daemon: DaemonProcess, *paths: Path) -> None:
        token = read_api_token(daemon.data_dir)
        texts = [self.page.content(), *(body for _, _, body in self.seen)]
        texts += [url for url, _, _ in self.seen]
        assert any(url.endswith("/app.js") for url, _, _ in self.seen)
        assert any("/api/" in url for url, _, _ in self.seen)
        for text in texts:
            assert token not in text, "the token reached the page"
            for path in (daemon.data_dir, *paths):
                assert str(path) not in text, "a local path reached the page"
            assert "wallet.key" not in text
        for url, headers, _ in self.seen:
            if "/api/" in url:
                assert headers.get("authorization", "").startswith("Bearer "), url  # (or the wrong one tried)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One Chromium per test module (a launch costs about a second); each test gets a tab of its own."""
    assert sync_playwright is not None and CHROMIUM is not None
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def browser(chromium: Any) -> Iterator[Browser]:
    # A page of its own browser context: no cookie, storage or cache is left from another test.
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    try:
        tab = Browser(page)
        page.on("response", tab.record)
        yield tab
    finally:
        page.context.close()


def _daemon(
    data_dir: Path, mode: str = "embedded", args: list[str] | None = None, env: dict[str, str] | None = None
) -> DaemonProcess:
    env = {**BASE_ENV, "CLAWNODE_ESCROW_MODE": mode, **(env or {})}
    return DaemonProcess(data_dir, [*LOOPBACK_ANY_PORT, *(args or [])], env=env)


def test_the_page_and_its_files_load_without_the_token_and_the_data_does_not(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    node = _daemon(tmp_path / "node", mode="off").start()
    daemons.append(node)
    base = api_url(node)
    for path, kind in (("/", "text/html"), ("/app.js", "text/javascript"), ("/style.css", "text/css")):
        reply = httpx.get(f"{base}{path}")
        assert reply.status_code == 200 and reply.headers["content-type"].startswith(kind), path
        assert "script-src 'self'" in reply.headers["content-security-policy"]
    for path in ("/api/status", "/api/capabilities", "/api/ledger/summary", "/metrics", "/v1/models"):
        reply = httpx.get(f"{base}{path}")
        assert reply.status_code == 401, path
        assert reply.json()["error"]["code"] == "E_UNAUTHENTICATED"
    assert httpx.get(f"{base}/?body=<script>").text == httpx.get(f"{base}/").text
    assert httpx.put(f"{base}/api/offers/model:x", json={}).status_code == 401


CAUGHT = "12D3KooWPu9mDMxJtpfKmTAkrmevSCKia7Kx1J5qt1Zhmzpxop1e"


async def _write_verification(data_dir: Path) -> None:
    ledger = await Ledger.open(data_dir / "ledger.db")
    try:
        await ledger.save_verification(VerificationRow(CAUGHT, 2, 1, 0, "logprob"))
    finally:
        await ledger.aclose()


def test_overview_shows_the_nodes_figures_and_a_price_change_republishes(
    tmp_path: Path, daemons: list[DaemonProcess], browser: Browser
) -> None:
    data_dir = tmp_path / "node"
    first = _daemon(data_dir, mode="off").start()
    first.stop()
    trio.run(_write_money, data_dir, tmp_path)
    trio.run(_write_verification, data_dir)
    node = _daemon(data_dir, mode="off").start()
    daemons.append(node)
    offer = {"name": "model:demo", "summary": "a demo <b>model</b>", "unit": "token", "price_per_unit": 1000}
    api(node, "PUT", "/api/offers/model:demo", offer)
    summary = api(node, "GET", "/api/ledger/summary")
    assert summary["total"]["income"] == 350 * PRICE

    page = browser.page
    page.goto(f"{api_url(node)}/")
    page.fill("#token-input", "not-the-token")
    page.click("#login-button")
    page.wait_for_selector("#login:not([hidden])")
    assert "not accepted" in text(page, "#login-error")
    browser.sign_in(node)

    peer_id = node.identity()["peer_id"]
    page.wait_for_function("id => document.getElementById('peer-id').textContent === id", arg=peer_id, timeout=15_000)
    assert text(page, "#offers-count") == "1"
    assert text(page, "#capabilities-list") == "model:demo"
    assert text(page, "#reachability") in ("public", "private", "unknown")
    status = api(node, "GET", "/api/status")
    assert text(page, "#reached-by").startswith(status["reached_by"])  # how others reach it, from the node
    assert "relay reservation(s)" in text(page, "#nat-traversal")
    for key in ("income", "spend", "net"):
        assert page.get_attribute(f"#{key}", "data-wei") == str(summary["total"][key]), key
    assert text(page, "#income") == "0.000000350 ETH"
    assert page.locator("#chart svg rect.income").count() == len(summary["by_day"]) >= 1
    assert page.locator("#by-peer-table tbody tr").count() == len(summary["by_peer"])
    assert page.locator("#receipts-table tbody tr").count() == 3
    settlements = api(node, "GET", "/api/ledger/settlements")["settlements"]
    assert page.locator("#settlements-table tbody tr").count() == len(settlements) >= 2
    assert "No split model runs here" in text(page, "#layers-table")  # docs/split.md: none here
    # A provider caught before the restart is still shown caught (verified inference, kept in the ledger).
    caught = page.locator(f'#verification-table tr[data-peer="{CAUGHT}"]')
    caught.wait_for()
    assert "FAILED (logprob)" in caught.inner_text()
    # Markup in data is shown as text, never parsed.
    assert page.locator("#offers-table b").count() == 0
    assert "a demo <b>model</b>" in text(page, "#offers-table")
    browser.shot("overview")

    row = page.locator('#offers-table tr[data-offer="model:demo"]')
    row.locator("input.price-input").fill("4242")
    row.locator("button.save-price").click()
    page.wait_for_selector("#offers-message:has-text('4242')")

    def republished() -> bool:
        record = api(node, "GET", "/api/capabilities")["record"]
        pricing = next(c["pricing"] for c in record["capabilities"] if c["name"] == "model:demo")
        return bool(pricing["price_per_unit"] == 4242)

    wait_until(republished, "the record republished with the new price")
    assert page.input_value('#offers-table tr[data-offer="model:demo"] input.price-input') == "4242"
    browser.shot("resources")

    # Publish from the form, then withdraw it again (after the confirmation dialog).
    page.fill("#pub-name", "model:extra")
    page.select_option("#pub-unit", "request")
    page.fill("#pub-price", "7")
    page.click("#publish-form button[type=submit]")
    offered = lambda: {o["name"]: o for o in api(node, "GET", "/api/capabilities")["offers"]}  # noqa: E731
    wait_until(lambda: offered().get("model:extra", {}).get("price_per_unit") == 7, "the published offer")
    page.locator('#offers-table tr[data-offer="model:extra"]').wait_for()
    assert text(page, "#offers-count") == "2"
    page.once("dialog", lambda dialog: dialog.accept())
    page.click('#offers-table tr[data-offer="model:extra"] button.unpublish')
    wait_until(lambda: "model:extra" not in offered(), "the offer withdrawn")
    page.wait_for_function("() => document.getElementById('offers-count').textContent === '1'")

    # The token stays in the tab: a reload signs in again by itself; it is never in a URL.
    page.reload()
    page.wait_for_selector("#app:not([hidden])")
    page.wait_for_function("() => document.getElementById('peer-id').textContent.length > 20")
    browser.assert_no_secrets(node, tmp_path)


def test_a_lease_opened_from_the_cli_appears_without_a_reload(
    tmp_path: Path, daemons: list[DaemonProcess], browser: Browser
) -> None:
    # Two embedded chains cannot share an escrow: the provider trusts the consumer post-paid.
    consumer_dir, provider_dir = tmp_path / "consumer", tmp_path / "provider"
    consumer_dir.mkdir(mode=0o700)
    provider_dir.mkdir(mode=0o700)
    consumer_key, _ = load_or_create_identity(consumer_dir)
    consumer_id = peer_id_of(consumer_key.private_key)
    model = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(model)
    (provider_dir / "config.toml").write_text(
        f'[market]\ntrusted_peers = ["{consumer_id}"]\npostpaid_cap = {10**15}\n\n'
        f'[[models]]\nname = "tiny"\npath = "{model}"\nprice_per_unit = 1000\nn_threads = 1\n'
    )
    provider = _daemon(provider_dir).start(wait_s=60)
    daemons.append(provider)
    provider_id = provider.identity()["peer_id"]
    consumer = _daemon(consumer_dir, args=["--bootstrap", provider.identity()["listen_addrs"][0]]).start()
    daemons.append(consumer)
    consumer.wait_for_peers({provider_id})

    page = browser.page
    browser.sign_in(provider)
    page.wait_for_selector("#leases-table td.empty")
    assert text(page, "#offers-count") == "1"
    page.evaluate("window.__notReloaded = true")

    opened = run_cli("lease", "open", provider_id, "model:tiny", "--json", "--data-dir", str(consumer_dir), timeout=120)
    assert opened.returncode == 0, f"{opened.stderr}\n{provider.log()[-2000:]}"
    lease_id = re.search(r'"lease_id":\s*"([0-9a-f]+)"', opened.stdout)
    assert lease_id is not None, opened.stdout
    row = page.locator(f'#leases-table tr[data-lease-id="{lease_id.group(1)}"]')
    row.wait_for(timeout=15_000)
    assert page.evaluate("window.__notReloaded") is True
    assert "provider" in row.inner_text()
    assert "post-paid" in row.inner_text()
    browser.shot("leases")
    browser.assert_no_secrets(provider, tmp_path)


async def _pending_release(data_dir: Path) -> None:
    """A bought lease with a release still to land: what the settlement queue keeps retrying."""
    ledger = await Ledger.open(data_dir / "ledger.db")
    try:
        consumer = peer_id_of(load_or_create_identity(data_dir)[0].private_key)
        await ledger.open_lease(
            LeaseOpen(
                lease_id="lease-stuck",
                role="consumer",
                provider="12D3KooW" + "A" * 44,
                consumer=consumer,
                price_per_unit=PRICE,
                budget=10**18,
                escrow=EscrowRef(contract="0x" + "11" * 20, payer="0x" + "22" * 20, escrow_id="0x" + "ab" * 32),
            ),
            idempotency_key="open-stuck",
        )
        await ledger.enqueue_release("lease-stuck", 120 * PRICE)
    finally:
        await ledger.aclose()


def test_a_stalled_settlement_queue_raises_an_alert_on_the_page(
    tmp_path: Path, daemons: list[DaemonProcess], browser: Browser
) -> None:
    data_dir = tmp_path / "node"
    dead = f"http://127.0.0.1:{free_port()}"
    rpc = {"CLAWNODE_ESCROW_RPC_URL": dead, "CLAWNODE_ESCROW_CONTRACT": "0x" + "11" * 20}
    # The shipped rule waits 3 hours and 10 minutes; the same rule with a test-sized threshold.
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "groups:\n  - name: clawnode-settlement\n    rules:\n      - alert: SettlementQueueStalled\n"
        "        expr: clawnode_settlement_queue_oldest_age_seconds > 1\n        for: 1s\n"
        "        labels:\n          severity: P0\n        annotations:\n"
        "          summary: The oldest pending settlement is waiting; money is not landing.\n"
    )
    first = _daemon(data_dir, mode="off").start()
    first.stop()
    trio.run(_pending_release, data_dir)
    node = _daemon(
        data_dir,
        mode="rpc",
        env={
            "CLAWNODE_ESCROW_SETTLE_INTERVAL_S": "0.2",
            "CLAWNODE_ALERTS_RULES": str(rules),
            "CLAWNODE_ALERTS_INTERVAL_S": "0.2",
            **rpc,
        },
    ).start()
    daemons.append(node)
    probe = httpx.get(f"{api_url(node)}/api/alerts", headers={"authorization": f"Bearer {read_api_token(data_dir)}"})
    assert probe.status_code == 200, probe.text

    def firing() -> list[dict[str, Any]]:
        alerts = api(node, "GET", "/api/alerts")["alerts"]
        return [a for a in alerts if a["name"] == "SettlementQueueStalled" and a["state"] == "firing"]

    alert = wait_until(firing, "a settlement alert", timeout_s=90)[0]
    page = browser.page
    browser.sign_in(node)
    item = page.locator(f'#alerts-list li[data-alert="{alert["name"]}"]')
    item.wait_for(timeout=15_000)
    assert alert["summary"] in item.inner_text() and "firing" in item.inner_text()
    assert text(page, "#alerts-badge") != ""
    browser.shot("alerts")
    browser.assert_no_secrets(node, tmp_path)
    assert dead not in page.content()
