"""Issue 14: nothing a stranger sends to the local API crashes the node, freezes it or gets served.

Most tests talk to one real ``clawnode start`` over TCP (its hypercorn, its logging setup); the
streamed-body and unexpected-error cases drive the same ``create_app`` in process, and the RPC-URL
case runs two full nodes on a shared embedded chain with the consumer's chain reached through a
JSON-RPC endpoint whose URL carries a key.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from node.api import create_app
from node.datadir import read_api_token
from node.http_guard import json_depth_exceeds, quiet_error_logger
from runtime.errors import ErrorCode
from runtime.escrow import Chain, EscrowClient
from tests.support.api_fuzz import FuzzRequest, play
from tests.support.market import WORD_OFFER, WORDS, market_nodes, wait_for
from tests.support.processes import LOOPBACK_ANY_PORT, DaemonProcess

NESTED = b"[" * 100_000 + b"]" * 100_000  # 200 KB; a stack overflow in the C JSON decoder before the fix
HOSTILE_MARKER = "zz-hostile-input-zz"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One real daemon (no chain) for the module; killed at its end."""
    process = DaemonProcess(
        tmp_path_factory.mktemp("hardening") / "node",
        LOOPBACK_ANY_PORT,
        env={"CLAWNODE_BOOTSTRAP_USE_DEFAULTS": "false", "CLAWNODE_ESCROW_MODE": "off"},
    ).start()
    yield process
    process.kill()


def _api(daemon: DaemonProcess) -> tuple[str, dict[str, str]]:
    url = daemon.identity()["api_url"]
    return url, {"authorization": f"Bearer {read_api_token(daemon.data_dir)}"}


def _still_serving(daemon: DaemonProcess) -> None:
    assert daemon.process is not None and daemon.process.poll() is None, daemon.log()[-2000:]
    assert daemon.api("/api/status")["peer_id"]


def _code(reply: httpx.Response) -> str:
    return str(reply.json()["error"]["code"])


def _raw_exchange(url: str, head: str, timeout_s: float = 5.0) -> bytes:
    """Send request headers only (no body) and return what the server answers within ``timeout_s``."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as conn:
        conn.sendall(head.encode())
        answer = b""
        try:
            while True:
                chunk = conn.recv(4096)
                answer += chunk
                headers, _, body = answer.partition(b"\r\n\r\n")
                length = [line for line in headers.lower().split(b"\r\n") if line.startswith(b"content-length:")]
                if not chunk or (length and len(body) >= int(length[0].split(b":")[1])):
                    return answer
        except TimeoutError:
            return answer


def test_deeply_nested_json_is_refused_before_parsing(daemon: DaemonProcess) -> None:
    url, auth = _api(daemon)
    json_type = {"content-type": "application/json"}
    for path in ("/v1/chat/completions", "/api/tasks", "/api/leases/abc/call"):
        reply = httpx.post(f"{url}{path}", content=NESTED, headers={**auth, **json_type}, timeout=30)
        assert reply.status_code == 400, reply.text
        assert _code(reply) == ErrorCode.INVALID_ARGUMENT and "api.max_json_depth" in reply.json()["error"]["message"]
    objects = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    reply = httpx.post(f"{url}/v1/chat/completions", content=objects, headers={**auth, **json_type}, timeout=30)
    assert reply.status_code == 400 and _code(reply) == ErrorCode.INVALID_ARGUMENT
    # Without the token the body is never looked at.
    reply = httpx.post(f"{url}/v1/chat/completions", content=NESTED, headers=json_type, timeout=30)
    assert reply.status_code == 401 and _code(reply) == ErrorCode.UNAUTHENTICATED
    # 64 levels still reach the handler (which finds the request malformed).
    shallow = b"[" * 64 + b"]" * 64
    reply = httpx.post(f"{url}/v1/chat/completions", content=shallow, headers={**auth, **json_type}, timeout=30)
    assert reply.status_code == 400 and "api.max_json_depth" not in reply.text
    _still_serving(daemon)


def test_body_is_not_read_before_the_token_check(daemon: DaemonProcess) -> None:
    url, auth = _api(daemon)
    host = url.removeprefix("http://")
    # 200 MB announced, none sent: the refusal comes at once, from the headers alone.
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        "Content-Length: 200000000\r\n\r\n"
    )
    answer = _raw_exchange(url, head)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"E_UNAUTHENTICATED" in answer
    # With the token, a body over api.max_body_bytes is refused unread too.
    answer = _raw_exchange(url, head.replace("\r\n\r\n", f"\r\nAuthorization: {auth['authorization']}\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"E_INVALID_ARGUMENT" in answer and b"api.max_body_bytes" in answer
    _still_serving(daemon)


async def test_a_streamed_body_over_the_limit_is_cut_off() -> None:
    app = create_app(_Failing(), "t0ken", max_body_bytes=64 * 1024)  # type: ignore[arg-type]
    headers = ((b"host", b"127.0.0.1:7421"), (b"authorization", b"Bearer t0ken"))
    # No Content-Length: the bytes are counted as they arrive.
    chunks = tuple(b"x" * 16 * 1024 for _ in range(8))
    outcome = await play(app, FuzzRequest("POST", "/api/tasks", b"", headers, chunks))
    assert outcome.status == 413 and json.loads(outcome.body)["error"]["code"] == ErrorCode.INVALID_ARGUMENT
    outcome = await play(app, FuzzRequest("POST", "/api/tasks", b"", headers, chunks[:3]))
    assert outcome.status == 400  # under the limit: the handler's own validation answers


def test_huge_offset_is_a_400_not_a_500(daemon: DaemonProcess) -> None:
    url, auth = _api(daemon)
    huge = [2**63, 2**64, 10**100, -1]
    queries = [f"/api/ledger/{table}?offset={n}" for table in ("leases", "settlements", "receipts") for n in huge]
    queries += [f"/api/ledger/{table}?limit={n}" for table in ("leases", "settlements", "receipts") for n in huge]
    queries += [
        f"/api/discover?capability=model:words&max_price={2**300}",
        f"/api/discover?capability=model:words&min_ctx={2**64}",
        f"/api/discover?capability=model:words&min_vram_gb={2**64}",
        f"/api/discover?capability=model:words&limit={2**63}",
    ]
    for query in queries:
        reply = httpx.get(f"{url}{query}", headers=auth, timeout=10)
        assert reply.status_code == 400, (query, reply.text)
        assert _code(reply) == ErrorCode.INVALID_ARGUMENT
    assert httpx.get(f"{url}/api/ledger/leases?offset=1000000", headers=auth, timeout=10).json() == {"leases": []}
    _still_serving(daemon)


def test_foreign_host_header_is_refused(daemon: DaemonProcess) -> None:
    url, auth = _api(daemon)
    port = url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1:1", f"127.0.0.1.nip.io:{port}", "0.0.0.0"):
        for path, headers in (("/", {}), ("/app.js", {}), ("/api/status", auth), ("/metrics", auth)):
            reply = httpx.get(f"{url}{path}", headers={**headers, "host": host}, timeout=10)
            assert reply.status_code == 421, (host, path, reply.text)
            assert _code(reply) == ErrorCode.FORBIDDEN
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(f"{url}/", headers={"host": host}, timeout=10).status_code == 200, host
        assert httpx.get(f"{url}/api/status", headers={**auth, "host": host}, timeout=10).status_code == 200, host


def test_no_traceback_in_logs_below_debug(daemon: DaemonProcess) -> None:
    url, auth = _api(daemon)
    for query in (f"offset={2**63}&{HOSTILE_MARKER}=1", f"limit={10**100}&lease_id={HOSTILE_MARKER}"):
        reply = httpx.get(f"{url}/api/ledger/receipts?{query}", headers=auth, timeout=10)
        assert reply.status_code == 400 and HOSTILE_MARKER not in reply.text
    reply = httpx.post(f"{url}/api/tasks", content=NESTED, headers=auth, timeout=30)
    assert reply.status_code == 400
    _still_serving(daemon)
    log = daemon.log()
    assert "Traceback" not in log and "site-packages" not in log and 'File "' not in log, log[-3000:]
    assert HOSTILE_MARKER not in log
    assert str(daemon.data_dir.parent) not in log


class _Failing:
    """A NodeView whose every read fails with an exception text quoting the request and a path."""

    def status(self) -> Any:
        raise RuntimeError(f"{HOSTILE_MARKER} at /tmp/somewhere/site-packages/x.py")


async def test_unexpected_errors_answer_e_internal_and_log_the_type_only(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(_Failing(), "t0ken")  # type: ignore[arg-type]
    request = FuzzRequest(
        "GET", "/api/status", b"", ((b"host", b"127.0.0.1:7421"), (b"authorization", b"Bearer t0ken")), (b"",)
    )
    caplog.set_level(logging.INFO)
    outcome = await play(app, request)
    assert outcome.raised is None and outcome.status == 500
    assert json.loads(outcome.body)["error"] == {
        "code": "E_INTERNAL",
        "message": "internal error (RuntimeError)",
        "type": "server_error",
        "reason": None,
    }
    assert "an API request failed (RuntimeError)" in caplog.text
    assert HOSTILE_MARKER not in caplog.text and "Traceback" not in caplog.text
    assert not any(record.exc_info for record in caplog.records)
    # At debug the traceback is there, for whoever asked for it.
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    await play(app, request)
    assert any(record.exc_info for record in caplog.records)


def test_hypercorn_errors_carry_no_traceback_below_debug(caplog: pytest.LogCaptureFixture) -> None:
    logger = quiet_error_logger()
    caplog.set_level(logging.INFO)
    try:
        raise ValueError(f"{HOSTILE_MARKER} /tmp/x")
    except ValueError:
        logger.exception("Error in ASGI Framework")
    assert "Error in ASGI Framework (ValueError)" in caplog.text
    assert HOSTILE_MARKER not in caplog.text and "Traceback" not in caplog.text


def test_json_depth_scan_ignores_brackets_inside_strings() -> None:
    assert not json_depth_exceeds(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', 3)
    assert not json_depth_exceeds(b'["\\"[[[[[[", [[1]]]', 3)
    assert json_depth_exceeds(b'["\\"[[[[[[", [[[1]]]]', 3)
    assert json_depth_exceeds(b'"unterminated \\" [[[[' + b"[" * 10, 3) is False  # all inside the string
    assert json_depth_exceeds(b"\xff\xfe[[[[", 3)


# -- the RPC URL and its key --

RPC_KEY = "sEcReT-rpc-key-4242"


class _ChainIdOnly(BaseHTTPRequestHandler):
    """A JSON-RPC endpoint that answers eth_chainId and fails everything else (a provider outage)."""

    chain_id = 0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if body.get("method") == "eth_chainId":
            reply = json.dumps({"jsonrpc": "2.0", "id": body.get("id"), "result": hex(self.chain_id)}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
        else:
            self.send_response(502)
            self.send_header("content-length", "0")
            self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


async def test_rpc_url_never_logged_when_a_lock_fails(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO)
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}]) as (nodes, shared):
        provider, consumer = nodes
        _ChainIdOnly.chain_id = shared.chain.chain_id
        server = ThreadingHTTPServer(("127.0.0.1", 0), _ChainIdOnly)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            rpc_url = f"http://127.0.0.1:{server.server_address[1]}/?key={RPC_KEY}"
            rpc_chain = await trio.to_thread.run_sync(Chain.rpc, rpc_url)
            ours = consumer.escrow_client
            assert ours is not None
            consumer.escrow_client = EscrowClient(rpc_chain, ours.account, ours.address)
            await wait_for(lambda: provider.publisher.record is not None)
            token = await trio.to_thread.run_sync(read_api_token, consumer.data_dir)
            async with httpx.AsyncClient(timeout=60) as client:
                reply = await client.post(
                    f"{consumer.api_url}/api/leases",
                    json={"peer_id": str(provider.host.get_id()), "capability": WORDS, "budget": 10**12},
                    headers={"authorization": f"Bearer {token}"},
                )
            await trio.sleep(0.5)  # whatever the server logs after replying is logged by now
        finally:
            server.shutdown()
    assert reply.status_code == 503, reply.text
    assert _code(reply) == ErrorCode.UNAVAILABLE
    assert RPC_KEY not in reply.text and "127.0.0.1:" not in reply.text
    assert RPC_KEY not in caplog.text, [r.getMessage() for r in caplog.records if RPC_KEY in caplog.text]
    assert "Traceback" not in caplog.text


async def test_lease_budgets_out_of_range_are_a_400_or_a_402_not_a_500() -> None:
    dear = WORD_OFFER.model_copy(update={"price_per_unit": 10**30})  # the most an offer may ask
    async with market_nodes([{"offers": (dear,)}, {}]) as (nodes, _):
        provider, consumer = nodes
        await wait_for(lambda: provider.publisher.record is not None)
        token = await trio.to_thread.run_sync(read_api_token, consumer.data_dir)
        peer = str(provider.host.get_id())
        cases = [
            ({"budget": 2**256}, 400, ErrorCode.INVALID_ARGUMENT),  # more than a uint256
            ({"expected_units": 2**63}, 400, ErrorCode.INVALID_ARGUMENT),
            ({"expected_units": 1}, 402, ErrorCode.INSUFFICIENT_FUNDS),  # 10^30 wei: more than the wallet holds
        ]
        async with httpx.AsyncClient(timeout=60) as client:
            for extra, status, code in cases:
                reply = await client.post(
                    f"{consumer.api_url}/api/leases",
                    json={"peer_id": peer, "capability": WORDS, **extra},
                    headers={"authorization": f"Bearer {token}"},
                )
                assert reply.status_code == status, (extra, reply.text)
                assert _code(reply) == code


def test_rpc_url_never_logged_even_at_debug(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    # Nothing listens on port 1: every JSON-RPC request fails, with the URL in web3's and requests' texts.
    url = f"http://127.0.0.1:1/v3/{RPC_KEY}?key={RPC_KEY}"
    node = DaemonProcess(
        tmp_path / "node",
        LOOPBACK_ANY_PORT,
        env={
            "CLAWNODE_BOOTSTRAP_USE_DEFAULTS": "false",
            "CLAWNODE_ESCROW_MODE": "rpc",
            "CLAWNODE_ESCROW_RPC_URL": url,
            "CLAWNODE_ESCROW_CONTRACT": "0x" + "11" * 20,
            "CLAWNODE_LOG_LEVEL": "debug",
        },
    ).start()
    daemons.append(node)
    deadline = time.monotonic() + 20
    while "escrow chain unavailable" not in node.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert node.api("/api/ledger/summary")["escrow"]["state"] == "unavailable"
    node.stop()
    log = node.log()
    assert "escrow chain unavailable" in log and "chain error: " in log  # the debug lines are there ...
    assert RPC_KEY not in log  # ... without the key
