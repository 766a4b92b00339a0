"""Chain faults an operator meets: a wrong contract address, a reset dev chain, a frozen chain.

On a real anvil process (skipped with the install hint when it is missing):
- a wrong ``escrow.contract`` (or a chain reset under a connected node) never takes a lock's value:
  nothing is sent, the error is E_UNAVAILABLE with a clear message, the daemon's status and the
  ``EscrowContractInvalid`` alert show it;
- a frozen chain (SIGSTOP) is seen by the health probe within seconds: ``clawnode_escrow_connected``
  goes to 0, ``EscrowChainDisconnected`` fires, chain calls are refused at once with E_UNAVAILABLE,
  and a voucher is still signed at once (local crypto never waits behind chain I/O); after SIGCONT
  everything resumes.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from node.config import AlertsSection, EscrowSection
from node.daemon import Node
from node.datadir import read_api_token
from runtime.errors import ClawnodeError, ErrorCode
from runtime.escrow import Chain, EscrowClient, EscrowError, EscrowSettings, connect_escrow
from runtime.escrow.health import ChainHealth, judge_contract, next_health
from runtime.service import ServiceRegistry
from tests.runtime.support import anvil_popen, anvil_skip_reason, free_port
from tests.support.market import market_config

_skip = anvil_skip_reason()
needs_anvil = pytest.mark.skipif(_skip is not None, reason=_skip or "")

WRONG = "0x" + "11" * 20
ESCROW_ID = b"\x07" * 32


@pytest.fixture
def anvil() -> Iterator[tuple[str, Any]]:
    with anvil_popen() as (url, proc):
        yield url, proc


def _payer_nonce_and_balance(chain: Chain, address: str) -> tuple[int, int]:
    w3 = chain.w3
    return int(w3.eth.get_transaction_count(address, "pending")), int(w3.eth.get_balance(address))  # type: ignore[arg-type]


def _lock(client: EscrowClient, payee: str, arbiter: str) -> Any:
    return client.lock(
        ESCROW_ID, payee=payee, arbiter=arbiter, amount=10**15, deadline=client.chain.now() + 3600, window=60
    )


# -- pure verdicts --


def test_judge_contract_verdicts() -> None:
    good, bad = b"\x01" * 32, b"\x02" * 32
    ok = judge_contract(chain_id=5, expected_chain_id=None, address=WRONG, code_hash=good, escrow_code_hash=good)
    assert ok.ok
    empty = judge_contract(chain_id=5, expected_chain_id=5, address=WRONG, code_hash=bad, escrow_code_hash=good)
    assert empty.kind == "no_escrow_contract"
    assert empty.message == f"escrow.contract {WRONG} holds no escrow contract on chain 5"
    other = judge_contract(chain_id=5, expected_chain_id=1, address=WRONG, code_hash=good, escrow_code_hash=good)
    assert other.kind == "wrong_chain" and "chain 5" in other.message


def test_health_folds_probes() -> None:
    start = ChainHealth("ok", "connected", 0.0, block_number=3)
    down = next_health(start, now=5.0, answered=False)
    assert (down.state, down.since, down.block_number) == ("unreachable", 5.0, 3)
    still = next_health(down, now=9.0, answered=False)
    assert still.since == 5.0  # since the state changed, not since the last probe
    back = next_health(still, now=10.0, answered=True, block_number=4)
    assert (back.state, back.since, back.block_number) == ("ok", 10.0, 4)


# -- a wrong address, a reset chain --


@needs_anvil
def test_a_wrong_contract_address_never_takes_the_lock(anvil: tuple[str, Any]) -> None:
    url, _ = anvil
    chain = Chain.rpc(url)
    dev = chain.dev_accounts()
    deployed = EscrowClient.deploy(chain, dev[0])
    payer = dev[3]

    # At connect: refused with a stable code and a clear message, nothing sent.
    before = _payer_nonce_and_balance(chain, payer.address)
    for address in (WRONG, dev[5].address):  # an empty account, a funded one: neither is the escrow
        with pytest.raises(EscrowError) as refused:
            connect_escrow(EscrowSettings(mode="rpc", rpc_url=url, contract=address), payer)  # type: ignore[call-arg]
        assert refused.value.code == ErrorCode.UNAVAILABLE and refused.value.reason == "no_escrow_contract"
        assert refused.value.message.endswith("holds no escrow contract on chain 31337")
    with pytest.raises(EscrowError) as other_chain:
        settings = EscrowSettings(mode="rpc", rpc_url=url, contract=deployed.address, chain_id=1)  # type: ignore[call-arg]
        connect_escrow(settings, payer)
    assert other_chain.value.reason == "wrong_chain" and other_chain.value.code == ErrorCode.UNAVAILABLE
    assert connect_escrow(EscrowSettings(mode="rpc", rpc_url=url, contract=deployed.address), payer)  # type: ignore[call-arg]

    # A client built on the wrong address anyway: its lock is refused before anything is signed.
    wrong = EscrowClient(chain, payer, WRONG)
    with pytest.raises(EscrowError) as locked:
        _lock(wrong, dev[1].address, dev[2].address)
    assert locked.value.reason == "no_escrow_contract"
    assert _payer_nonce_and_balance(chain, payer.address) == before
    assert int(chain.w3.eth.get_balance(WRONG)) == 0  # type: ignore[arg-type]


@needs_anvil
def test_a_reset_dev_chain_refuses_the_lock_and_the_probe_sees_it(anvil: tuple[str, Any]) -> None:
    url, _ = anvil
    chain = Chain.rpc(url)
    dev = chain.dev_accounts()
    snapshot = chain.snapshot()
    escrow = EscrowClient.deploy(chain, dev[0]).for_account(dev[3])
    health = escrow.probe_health(chain.health)
    assert health.ok and health.block_number is not None
    chain.revert(snapshot)  # the dev chain restarts from before the deploy: the address holds no code
    before = _payer_nonce_and_balance(chain, dev[3].address)
    with pytest.raises(EscrowError) as locked:
        _lock(escrow, dev[1].address, dev[2].address)
    assert locked.value.reason == "no_escrow_contract"
    # Reads and settlements say why too, and a refund never "lands" on an address without code.
    with pytest.raises(EscrowError) as read:
        escrow.get(dev[3].address, ESCROW_ID)
    assert read.value.reason == "no_escrow_contract" and read.value.code == ErrorCode.UNAVAILABLE
    with pytest.raises(EscrowError) as refunded:
        escrow.refund(dev[3].address, ESCROW_ID)
    assert refunded.value.reason == "no_escrow_contract"
    assert _payer_nonce_and_balance(chain, dev[3].address) == before
    # The block number went back: the probe re-reads the code and says what is wrong.
    after = escrow.probe_health(health)
    assert after.state == "no_escrow_contract" and "holds no escrow contract on chain 31337" in after.message


async def _get(node: Node, path: str) -> httpx.Response:
    token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
    async with httpx.AsyncClient() as client:
        return await client.get(f"{node.api_url}{path}", headers={"authorization": f"Bearer {token}"})


def _gauge(metrics: str, name: str) -> float | None:
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


async def _alert_states(node: Node) -> dict[str, str]:
    reply = await _get(node, "/api/alerts")
    assert reply.status_code == 200
    return {a["name"]: a["state"] for a in reply.json()["alerts"]}


TEST_RULES = """
groups:
  - name: test
    rules:
      - alert: EscrowChainDisconnected
        expr: clawnode_escrow_disconnected > 0
        for: 1s
        labels: {severity: P0}
        annotations: {summary: the escrow chain is unreachable}
"""


def _rpc_node(tmp_path: Path, url: str, contract: str, rules: str) -> Node:
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(rules)
    section = EscrowSection(  # type: ignore[call-arg]
        mode="rpc",
        rpc_url=url,
        contract=contract,
        rpc_timeout_s=1.0,
        rpc_retries=0,
        health_interval_s=0.2,
        health_timeout_s=0.5,
        settle_interval_s=0.5,
    )
    config = market_config(bootstrap=[]).model_copy(
        update={"escrow": section, "alerts": AlertsSection(interval_s=0.2, rules=str(rules_file))}
    )
    return Node(config, tmp_path / "node", services=ServiceRegistry())


@needs_anvil
async def test_a_node_on_a_wrong_contract_says_so_and_alerts(anvil: tuple[str, Any], tmp_path: Path) -> None:
    url, _ = anvil
    shipped = (Path(__file__).resolve().parent.parent / "node" / "alerts.yml").read_text()
    node = _rpc_node(tmp_path, url, WRONG, shipped)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        with trio.fail_after(15):
            while (await _alert_states(node)).get("EscrowContractInvalid") != "firing":
                await trio.sleep(0.2)
        assert node.escrow_status.state == "unavailable" and node.escrow_client is None
        assert node.escrow_problem == "no_escrow_contract"
        metrics = (await _get(node, "/metrics")).text
        assert _gauge(metrics, "clawnode_escrow_contract_invalid") == 1
        assert _gauge(metrics, "clawnode_escrow_connected") == 0
        nursery.cancel_scope.cancel()


@needs_anvil
async def test_a_frozen_chain_is_seen_signing_goes_on_and_it_heals(anvil: tuple[str, Any], tmp_path: Path) -> None:
    url, proc = anvil
    chain = await trio.to_thread.run_sync(Chain.rpc, url)
    deployed = await trio.to_thread.run_sync(EscrowClient.deploy, chain, chain.dev_accounts()[0])
    node = _rpc_node(tmp_path, url, deployed.address, TEST_RULES)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        with trio.fail_after(15):
            while node.escrow_status.state != "connected":
                await trio.sleep(0.1)
        client = node.escrow_client
        assert _gauge((await _get(node, "/metrics")).text, "clawnode_escrow_connected") == 1

        proc.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            # A call already in the chain's lane waits out its timeout; signing does not wait for it.
            stuck = trio.Event()

            async def stuck_read() -> None:
                with pytest.raises(ClawnodeError):
                    await client.chain.run(client.get, client.account.address, b"\x01" * 32)
                stuck.set()

            nursery.start_soon(stuck_read)
            await trio.sleep(0.05)
            started = time.monotonic()
            signature = await client.chain.run(client.sign_voucher, b"\x02" * 32, 123)
            assert len(signature) == 65 and time.monotonic() - started < 0.5

            with trio.fail_after(6):  # probe every 0.2 s, 0.5 s timeout; the rule's for: 1s
                while (await _alert_states(node)).get("EscrowChainDisconnected") != "firing":
                    await trio.sleep(0.1)
            seen_after = time.monotonic() - frozen_at
            metrics = (await _get(node, "/metrics")).text
            assert _gauge(metrics, "clawnode_escrow_connected") == 0
            assert _gauge(metrics, "clawnode_escrow_disconnected") == 1
            assert node.escrow_status.state == "unavailable"

            # While the chain is down a call fails at once with a stable code (no 52 s wait, no E_INTERNAL).
            started = time.monotonic()
            with pytest.raises(ClawnodeError) as refused:
                await client.chain.run(client.get, client.account.address, b"\x01" * 32)
            assert refused.value.code == ErrorCode.UNAVAILABLE and time.monotonic() - started < 0.5
            assert stuck.is_set()  # the stuck call gave up within its own 1 s timeout
            await trio.sleep(max(0.0, 4.0 - (time.monotonic() - frozen_at)))  # stay frozen a few seconds
        finally:
            proc.send_signal(signal.SIGCONT)
        thawed_at = time.monotonic()
        with trio.fail_after(10):
            while node.escrow_status.state != "connected":
                await trio.sleep(0.1)
        healed_after = time.monotonic() - thawed_at
        state = await client.chain.run(client.get, client.account.address, b"\x01" * 32)
        assert state.phase == "none"
        with trio.fail_after(5):
            while (await _alert_states(node)).get("EscrowChainDisconnected") == "firing":
                await trio.sleep(0.1)
        assert _gauge((await _get(node, "/metrics")).text, "clawnode_escrow_connected") == 1
        print(f"frozen chain: alert firing after {seen_after:.1f} s, connected {healed_after:.1f} s after SIGCONT")
        nursery.cancel_scope.cancel()


# -- a hostile or broken RPC endpoint, and failing over to the next URL --


class _Hostile:
    """A loopback HTTP server whose every reply is one kind of bad: "huge" (declares and sends 64 MiB),
    "endless" (chunked, never ends), "deep" (JSON nested 200,000 deep), "trickle" (a byte every 50 ms)."""

    def __init__(self, kind: str) -> None:
        import socketserver

        kind_ = kind

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    self.rfile.read1(65536)  # the request body (small)
                    if kind_ == "huge":
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 67108864\r\n\r\n")
                        for _ in range(1024):
                            self.wfile.write(b"[" * 65536)
                    elif kind_ == "endless":
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                        while True:
                            self.wfile.write(b"10000\r\n" + b" " * 65536 + b"\r\n")
                    elif kind_ == "deep":
                        body = b"[" * 200_000 + b"]" * 200_000
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                    else:
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                        for _ in range(1000):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            time.sleep(0.05)
                except OSError:
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> str:
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("huge", "bad_reply"), ("endless", "bad_reply"), ("deep", "bad_reply"), ("trickle", "chain_unavailable")],
)
def test_a_hostile_rpc_reply_is_bounded_in_size_and_time(kind: str, reason: str) -> None:
    import resource

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with _Hostile(kind) as url, pytest.raises(EscrowError) as caught:
        Chain.rpc(url, timeout_s=1.0, retries=0)
    assert (caught.value.reason, caught.value.code) == (reason, ErrorCode.UNAVAILABLE)
    assert "127.0.0.1" not in caught.value.message
    assert time.monotonic() - started < 5  # the trickle is cut at its 1 s timeout, not after its 50 s
    # Nothing near the 64 MiB offered was held (ru_maxrss is in KiB on Linux).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 32 * 1024


@needs_anvil
def test_connect_fails_over_to_the_next_rpc_url_that_serves_the_chain(anvil: tuple[str, Any]) -> None:
    url, _ = anvil
    chain = Chain.rpc(url)
    deployed = EscrowClient.deploy(chain, chain.dev_accounts()[0])
    payer = chain.dev_accounts()[3]
    dead = f"http://127.0.0.1:{free_port()}"
    with _Hostile("deep") as hostile:
        settings = EscrowSettings(  # type: ignore[call-arg]
            mode="rpc", rpc_url=dead, contract=deployed.address, fallback_urls=(hostile, url), rpc_timeout_s=1.0
        )
        client = connect_escrow(settings, payer)
    assert client is not None
    result = _lock(client, chain.dev_accounts()[1].address, chain.dev_accounts()[2].address)
    assert client.get(payer.address, ESCROW_ID).amount == 10**15 and result.gas_used > 0
    # Every URL down: the last one's outage is the answer, with no URL in it.
    with pytest.raises(EscrowError) as down:
        connect_escrow(
            EscrowSettings(mode="rpc", rpc_url=dead, contract=deployed.address, fallback_urls=(dead,)), payer
        )  # type: ignore[call-arg]
    assert down.value.reason == "chain_unavailable" and "127.0.0.1" not in down.value.message


def test_json_depth_is_judged_without_recursing() -> None:
    from runtime.escrow.chain import MAX_JSON_DEPTH, json_too_deep

    assert not json_too_deep(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    assert json_too_deep(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    assert json_too_deep(b"[" * 1_000_000)  # unbalanced: refused, never handed to the decoder
    # Brackets inside strings do not count; a receipt-like reply passes.
    assert not json_too_deep(b'{"result": {"logs": [{"topics": ["0x00"], "data": "[[[[[[[[\\"[[["}]}}')


def test_the_dev_chain_refuses_a_request_nested_to_crash_it() -> None:
    """The bootstrap's JSON-RPC endpoint takes 256 KB: that many "[" killed the process (SIGSEGV)."""
    from runtime.escrow.devchain import MAX_RPC_BODY, answer_rpc

    reply = answer_rpc(None, b"[" * MAX_RPC_BODY)  # type: ignore[arg-type]  # refused before the chain is used
    assert reply["error"]["code"] == -32600 and "deep" in reply["error"]["message"]


@needs_anvil
async def test_a_running_node_fails_over_when_its_rpc_url_goes_down(anvil: tuple[str, Any], tmp_path: Path) -> None:
    """escrow.fallback_rpc_urls at run time: the first URL (a relay to anvil) goes down; after the
    node's rejoin delay its settlement service connects again through the fallback and works."""
    from tests.runtime.support import Relay

    url, _ = anvil
    chain = await trio.to_thread.run_sync(Chain.rpc, url)
    deployed = await trio.to_thread.run_sync(EscrowClient.deploy, chain, chain.dev_accounts()[0])
    relay = Relay(int(url.rsplit(":", 1)[1]))
    node = _rpc_node(tmp_path, relay.url, deployed.address, TEST_RULES)
    node.config = node.config.model_copy(
        update={"escrow": node.config.escrow.model_copy(update={"fallback_rpc_urls": [url]})}
    )
    node.rejoin_after_s = 1.0
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            with trio.fail_after(15):
                while node.escrow_status.state != "connected":
                    await trio.sleep(0.1)
            first = node.escrow_client
            relay.down()
            with trio.fail_after(20):
                while node.escrow_client is first or node.escrow_status.state != "connected":
                    await trio.sleep(0.1)
            client = node.escrow_client
            assert client is not None
            state = await client.chain.run(client.get, client.account.address, b"\x01" * 32)  # through the fallback
            assert state.phase == "none"
            nursery.cancel_scope.cancel()
    finally:
        relay.close()
