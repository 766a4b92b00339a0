"""The local API's outer wall: a pure ASGI middleware around the whole app.

Before any route, parser or framework code sees a request it checks, in this order:

1. the ``Host`` header names this machine's loopback API (``127.0.0.1``, ``localhost`` or
   ``[::1]``, with or without the API port), else 421 ``E_FORBIDDEN``: a web page whose DNS
   name was rebound to 127.0.0.1 cannot talk to the node, not even to the dashboard's files;
2. the bearer token (or the same token as ``x-api-key``, as Anthropic's clients send it), before a
   single byte of the body is read (401 ``E_UNAUTHENTICATED``), except for the dashboard's public files;
3. the body's size, from ``Content-Length`` and then counted as it streams in (413
   ``E_INVALID_ARGUMENT`` past ``api.max_body_bytes``);
4. the JSON nesting depth, scanned on the raw bytes (400 ``E_INVALID_ARGUMENT`` past
   ``api.max_json_depth``): no JSON decoder ever sees a deeper document, so none can run out of
   stack on one.

The body is then replayed to the app. An exception that escapes the app is answered with
``E_INTERNAL`` (when nothing was sent yet) and logged as its type only; the traceback, which
names local paths and may quote what the client sent, is logged only at debug level. Hypercorn's
own error log goes through :func:`quiet_error_logger` for the same reason.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable

import trio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.openai_api import error_type
from runtime.errors import ErrorCode
from runtime.jsonsafe import json_depth_exceeds

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_JSON_DEPTH = 64
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})

SCAN_OFF_THREAD_BYTES = 256 * 1024


def is_loopback_host(host: str, server_port: int | None) -> bool:
    """``host`` (a Host header) names a loopback address of ours: no port, or the API's port."""
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, rest = host.partition("]")
        name += bracket
        if rest and not rest.startswith(":"):
            return False
        has_port, port = bool(rest), rest[1:]
    else:
        name, colon, port = host.partition(":")
        has_port = bool(colon)
    if name not in LOOPBACK_HOSTS:
        return False
    if not has_port:
        return True
    if not port.isascii() or not port.isdigit() or len(port) > 5:
        return False
    return server_port is None or int(port) == server_port


def error_body(code: ErrorCode, message: str) -> bytes:
    """The API's error shape, ``{"error": {"code", "message", "type", "reason"}}`` (the guard's refusals
    name no finer reason than their code)."""
    error = {"code": code.value, "message": message, "type": error_type(code), "reason": None}
    return json.dumps({"error": error}).encode()


async def send_error(send: Send, status: int, code: ErrorCode, message: str) -> None:
    body = error_body(code, message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class HttpGuard:
    """Host, token, body size and JSON depth checks in front of ``app``; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str,
        is_public: Callable[[str, str], bool],
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
    ) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()
        self._is_public = is_public
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # no websocket routes; refused
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan
            return
        headers = _headers(scope)
        server = scope.get("server")
        server_port = server[1] if isinstance(server, tuple | list) and len(server) == 2 else None
        if not is_loopback_host(headers.get(b"host", b"").decode("latin-1"), server_port):
            await send_error(send, 421, ErrorCode.FORBIDDEN, "the Host header must name 127.0.0.1, localhost or [::1]")
            return
        if not self._is_public(scope["method"], scope["path"]) and not token_offered(headers, self._expected):
            await send_error(send, 401, ErrorCode.UNAUTHENTICATED, "missing or wrong bearer token")
            return
        body = await self._read_body(headers, receive, send)
        if body is None:
            return  # refused (the reply is sent) or the client went away
        await self._call_app(scope, _replay(body, receive), send)

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive, send: Send) -> bytes | None:
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or len(declared) > 19:
                await send_error(send, 400, ErrorCode.INVALID_ARGUMENT, "Content-Length is not a byte count")
                return None
            if int(declared) > self.max_body_bytes:
                await self._too_large(send)
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            if message["type"] != "http.request":
                continue
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if len(body) > SCAN_OFF_THREAD_BYTES:  # the scan is CPU work: off the event loop when it is long
            too_deep = await trio.to_thread.run_sync(json_depth_exceeds, body, self.max_json_depth)
        else:
            too_deep = json_depth_exceeds(body, self.max_json_depth)
        if too_deep:
            await send_error(
                send,
                400,
                ErrorCode.INVALID_ARGUMENT,
                f"the body nests deeper than {self.max_json_depth} levels (api.max_json_depth)",
            )
            return None
        return body

    async def _too_large(self, send: Send) -> None:
        await send_error(
            send,
            413,
            ErrorCode.INVALID_ARGUMENT,
            f"the body is larger than {self.max_body_bytes} bytes (api.max_body_bytes)",
        )

    async def _call_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as error:  # the one place every unexpected failure ends
            # The type only: a traceback names local paths, and exception texts may quote the request.
            log.error("an API request failed (%s)", type(error).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
            if not started:
                await send_error(send, 500, ErrorCode.INTERNAL, f"internal error ({type(error).__name__})")


def token_offered(headers: dict[bytes, bytes], expected: bytes) -> bool:
    """The API token as ``Authorization: Bearer <token>`` or, as Anthropic's clients send it, ``x-api-key``."""
    bearer = secrets.compare_digest(headers.get(b"authorization", b""), expected)
    api_key = secrets.compare_digest(b"Bearer " + headers.get(b"x-api-key", b""), expected)
    return bearer or api_key


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """Header names lower-cased; a repeated header keeps its first value."""
    found: dict[bytes, bytes] = {}
    for name, value in scope.get("headers", ()):
        found.setdefault(bytes(name).lower(), bytes(value))
    return found


def _replay(body: bytes, receive: Receive) -> Receive:
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: only the client's disconnect

    return replay


class _TypeOnlyBelowDebug(logging.Filter):
    """Hypercorn's error records without their traceback, naming the exception type instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not logging.getLogger().isEnabledFor(logging.DEBUG):
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(error).__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        return True


_FILTER = _TypeOnlyBelowDebug()


def quiet_error_logger(name: str = "hypercorn.error") -> logging.Logger:
    """The logger to give hypercorn as ``errorlog``: tracebacks only at debug level."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
