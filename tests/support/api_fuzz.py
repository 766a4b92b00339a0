"""Hostile HTTP requests against the local API app, in process, for ``tests/test_api_fuzz.py`` and
``bench/fuzz_api.py``.

Requests are drawn by hypothesis: paths from the app's own route table (path parameters replaced by
fuzz) or made up, any method, query strings with huge and malformed numbers, the right or a wrong
token and Host, odd content types and lengths, and bodies that are valid-looking route bodies with
one field replaced, arbitrary JSON, deep nesting, big strings or raw bytes. Each one is played
straight into the ASGI app (what hypercorn would hand it) and judged: no exception may escape the
app, no reply may be a 500 or ``E_INTERNAL``, every error must carry a stable code, no reply and no
log line may carry a traceback, a local path or the token.

Generation runs on a worker thread (hypothesis is synchronous); each request hops back to the trio
thread that runs the node. Failures are collected, not raised, so hypothesis never shrinks and the
run takes a bounded time.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from pydantic import BaseModel
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from runtime.errors import ErrorCode

STABLE_CODES = frozenset(code.value for code in ErrorCode)
SERVER_PORT = 7421
REQUEST_TIMEOUT_S = 20.0
FORBIDDEN_IN_REPLIES = ("Traceback", "site-packages", "/tmp/", "pytest-of-", 'File "')

HUGE_NUMBERS = [2**63, 2**63 - 1, 2**64, -(2**63) - 1, 2**256, 2**256 - 1, 10**100, -1, 0, 1, 10**4300]
WEIRD_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-0", "0x10", "1_000", "١٢٣", "1.5", " 1", "+1", ""]
QUERY_KEYS = ["limit", "offset", "since", "lease_id", "capability", "max_price", "min_ctx", "min_vram_gb", "reachable"]
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=utf-16",
    "application/merge-patch+json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "application/json;;;=",
]
ALLOWED_HOSTS = frozenset(f"{name}{port}" for name in ("127.0.0.1", "localhost", "[::1]") for port in ("", ":7421"))
PUBLIC_PATHS = frozenset({"/", "/app.js", "/style.css"})  # the dashboard's files, served without the token
TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"

# A plausible body per route template: fuzz replaces one field, so validation and handlers run deep.
SAMPLE_BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": "words",
        "messages": [{"role": "user", "content": "one two"}],
        "max_tokens": 4,
        "stream": False,
    },
    "/v1/completions": {"model": "words", "prompt": "one two", "max_tokens": 4},
    "/v1/embeddings": {"model": "words", "input": ["one"]},
    "/v1/responses": {
        "model": "words",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "one two"}]}],
        "max_output_tokens": 4,
    },
    "/v1/messages": {"model": "words", "max_tokens": 4, "messages": [{"role": "user", "content": "one two"}]},
    "/api/leases": {"peer_id": "12D3KooW" + "A" * 44, "capability": "model:words", "budget": 10},
    "/api/leases/{lease_id}/renew": {"duration_s": 60},
    "/api/leases/{lease_id}/call": {"prompt": "one two"},
    "/api/offers/{name}": {"name": "model:fuzz", "summary": "fuzz", "price_per_unit": 1},
    "/api/tasks": {
        "capability": "model:words",
        "budget": 1000,
        "deadline_s": 60,
        "arbiter_peer": "12D3KooW" + "B" * 44,
        "arbiter_wallet": "0x" + "1" * 40,
    },
    "/api/tasks/watch": {"capability": "model:words"},
    "/api/tasks/{task_id}/bids": {"price": 10},
    "/api/tasks/{task_id}/award": {"bid_id": "b" * 16},
    "/api/tasks/{task_id}/result": {"artifact_b64": "aGVsbG8="},
    "/api/tasks/{task_id}/review": {"accept": False, "reason": "no"},
    "/api/tasks/{task_id}/dispute": {"reason": "no"},
    "/api/tasks/{task_id}/evidence": {"note": "n", "attachment_b64": ""},
    "/api/tasks/{task_id}/resolve": {"to_bidder": 1},
}


@dataclass(frozen=True)
class FuzzRequest:
    method: str
    path: str  # decoded, as the ASGI scope carries it
    query: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    chunks: tuple[bytes, ...]

    def describe(self) -> str:
        size = sum(len(chunk) for chunk in self.chunks)
        return f"{self.method} {self.path[:80]!r}?{self.query[:80]!r} ({size} body bytes)"


@dataclass
class Outcome:
    status: int | None = None
    body: bytes = b""
    content_type: str = ""
    raised: str | None = None  # the type of an exception that escaped the app
    timed_out: bool = False


@dataclass
class FuzzReport:
    inputs: int = 0
    crashes: int = 0  # an exception escaped the app, or no reply came
    internal_errors: int = 0  # a 500 or E_INTERNAL
    problems: list[str] = field(default_factory=list)  # every finding, first ones kept
    statuses: dict[int, int] = field(default_factory=dict)

    def note(self, problem: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(problem)


# -- strategies --


def _number_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers().map(str),
        st.sampled_from(HUGE_NUMBERS).map(lambda n: str(n) if abs(n) < 10**200 else "9" * 5000),
        st.sampled_from(WEIRD_NUMBERS),
        st.floats().map(repr),
    )


def _fuzz_text(max_size: int = 40) -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=max_size), _number_text())


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from(HUGE_NUMBERS[:-1]),
        st.floats(),
        st.text(max_size=30),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
        max_leaves=12,
    )


def _dumps(value: Any) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except ValueError:
        return b"null"  # an int too long for str(): the sample is lost, not the run


@st.composite
def _nested(draw: st.DrawFn) -> bytes:
    depth = draw(st.sampled_from([10, 63, 64, 65, 100, 1000, 100_000]))
    if draw(st.booleans()):
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


@dataclass(frozen=True)
class Known:
    """Values of the node under test that take requests deeper: real peer ids, task ids, ..."""

    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)  # route template -> sample body
    path_values: dict[str, list[str]] = field(default_factory=dict)  # path parameter name -> values

    def body(self, template: str) -> dict[str, Any] | None:
        return self.bodies.get(template) or SAMPLE_BODIES.get(template)


@st.composite
def _mutated_sample(draw: st.DrawFn, template: str, known: Known) -> bytes:
    sample = dict(known.body(template) or {"x": 1})
    key = draw(st.sampled_from([*sample, "extra"]))
    sample[key] = draw(_json_values())
    return _dumps(sample)


def _bodies(template: str, known: Known) -> st.SearchStrategy[bytes]:
    sample = known.body(template)
    return st.one_of(
        st.just(_dumps(sample) if sample is not None else b""),
        _mutated_sample(template, known),
        _mutated_sample(template, known),
        _json_values().map(_dumps),
        _nested(),
        st.binary(max_size=200),
        st.sampled_from([b"", b"{", b'{"a":', b"\xff\xfe", b'"\\ud800"', b"[1,]", b"NaN", b"1" * 5000]),
        st.integers(min_value=1000, max_value=300_000).map(lambda n: b'{"prompt": "' + b"x" * n + b'"}'),
    )


@dataclass(frozen=True)
class RouteInfo:
    template: str  # e.g. /api/tasks/{task_id}/bids
    methods: frozenset[str]
    query: tuple[str, ...]  # its query parameters


@st.composite
def _path(draw: st.DrawFn, routes: list[RouteInfo], known: Known) -> tuple[RouteInfo, str, str]:
    """(route, path, method)."""
    if draw(st.integers(0, 9)) == 0:
        made_up = "/" + draw(st.text(max_size=30))
        return RouteInfo("", frozenset({"GET"}), ()), made_up, draw(st.sampled_from(["GET", "POST"]))
    with_query = [route for route in routes if route.query]
    route = draw(st.sampled_from(routes if draw(st.integers(0, 3)) else with_query or routes))
    template, methods = route.template, route.methods
    path = template
    for name in re.findall(r"\{(\w+)\}", template):
        real = known.path_values.get(name)
        if real and draw(st.booleans()):
            path = path.replace("{" + name + "}", draw(st.sampled_from(real)))
            continue
        value = draw(
            st.one_of(
                st.text(alphabet=string.hexdigits, min_size=1, max_size=70),
                st.text(min_size=1, max_size=40).filter(lambda t: "/" not in t),
                _number_text().filter(lambda t: t and "/" not in t),
            )
        )
        path = path.replace("{" + name + "}", value)
    if draw(st.integers(0, 4)) == 0:
        method = draw(
            st.one_of(
                st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
                st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=12),
            )
        )
    else:
        method = draw(st.sampled_from(sorted(methods)))
    return route, path, method


@st.composite
def _number_value(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 9))
    if kind < 3:
        number = draw(st.sampled_from(HUGE_NUMBERS))
        return str(number) if abs(number) < 10**200 else "9" * 5000
    if kind < 6:
        return str(draw(st.integers()))
    if kind < 8:
        return draw(st.sampled_from(WEIRD_NUMBERS))
    return repr(draw(st.floats()))


@st.composite
def _query(draw: st.DrawFn, own: tuple[str, ...]) -> bytes:
    """A query string, its keys mostly the route's own parameters, its values mostly odd numbers."""
    pairs = []
    for _ in range(draw(st.integers(0, 3))):
        pick = draw(st.integers(0, 9))
        if pick < 6 and own:
            key = draw(st.sampled_from(own))
        elif pick < 9:
            key = draw(st.sampled_from(QUERY_KEYS))
        else:
            key = draw(st.text(max_size=8))
        value = draw(_number_value()) if draw(st.integers(0, 3)) else draw(st.text(max_size=40))
        pairs.append((key, value))
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs).encode("ascii")


def _latin1(max_size: int = 40) -> st.SearchStrategy[str]:
    return st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=max_size
    )


@st.composite
def requests(draw: st.DrawFn, routes: list[RouteInfo], token: str, known: Known | None = None) -> FuzzRequest:
    """One hostile request for an app with these routes and this token."""
    known = known or Known()
    route, path, method = draw(_path(routes, known))
    body = draw(_bodies(route.template, known)) if draw(st.integers(0, 5)) else b""
    headers: list[tuple[bytes, bytes]] = []
    good_host = draw(st.integers(0, 9)) < 8
    host = (
        f"127.0.0.1:{SERVER_PORT}"
        if good_host
        else draw(
            st.one_of(
                st.sampled_from(
                    [
                        "localhost",
                        f"[::1]:{SERVER_PORT}",
                        f"LOCALHOST:{SERVER_PORT}",
                        "evil.example",
                        "127.0.0.1:1",
                        "127.0.0.1.nip.io",
                        "",
                        "[::1",
                        "127.0.0.1:99999999999",
                    ]
                ),
                _latin1(),
            )
        )
    )
    headers.append((b"host", host.encode("latin-1")))
    auth = draw(st.integers(0, 9))
    if auth < 8:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    elif auth == 8:
        headers.append((b"authorization", ("Bearer " + draw(_latin1())).encode("latin-1")))
    content_type = draw(st.one_of(st.none(), st.sampled_from(CONTENT_TYPES), _latin1(20)))
    if content_type is not None:
        headers.append((b"content-type", content_type.encode("latin-1")))
    length = draw(st.integers(0, 9))
    if length < 8:
        headers.append((b"content-length", str(len(body)).encode()))
    elif length == 8:
        headers.append((b"content-length", draw(st.sampled_from([b"abc", b"-1", b"9" * 30, b"0", b" 5", b"1e3"]))))
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12)).lower()
        headers.append((name.encode(), draw(_latin1()).encode("latin-1")))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=2)))
    chunks = tuple(body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)) or (b"",)
    return FuzzRequest(method, path, draw(_query(route.query)), tuple(headers), chunks)


def known_values(provider_peer_id: str, wallet: str) -> Known:
    """Sample bodies and path values that name a real provider (serving ``model:words``) and wallet."""
    return Known(
        bodies={
            "/api/leases": {"peer_id": provider_peer_id, "capability": "model:words", "budget": 10**12},
            "/api/tasks": {
                "capability": "model:words",
                "budget": 1000,
                "deadline_s": 60,
                "arbiter_peer": provider_peer_id,
                "arbiter_wallet": wallet,
            },
        },
        path_values={"peer_id": [provider_peer_id], "name": ["model:words", "model:fuzz"]},
    )


def route_table(app: Any) -> list[RouteInfo]:
    """Every route of a FastAPI app: path template, methods, query parameter names."""
    found = []
    for route in app.routes:
        if isinstance(route, Route):
            dependant = getattr(route, "dependant", None)
            params = getattr(dependant, "query_params", []) if dependant is not None else []
            names: set[str] = set()
            for param in params:
                annotation = param.field_info.annotation
                is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
                names.update(annotation.model_fields if is_model else [param.alias])  # a query model: its fields
            query = tuple(sorted(names))
            found.append(RouteInfo(route.path, frozenset(route.methods or {"GET"}), query))
    return sorted(found, key=lambda info: info.template)


# -- playing and judging --


async def play(app: ASGIApp, request: FuzzRequest) -> Outcome:
    """Hand ``request`` to the ASGI app as hypercorn would and collect the reply."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": quote(request.path, safe="/%").encode("ascii", "replace"),
        "query_string": request.query,
        "root_path": "",
        "headers": list(request.headers),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", SERVER_PORT),
        "extensions": {},
        "state": {},
    }
    pending = list(request.chunks)
    outcome = Outcome()
    body: list[bytes] = []

    async def receive() -> Message:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        await trio.sleep_forever()  # the client stays connected until the reply is complete
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            outcome.status = int(message["status"])
            for name, value in message.get("headers", []):
                if bytes(name).lower() == b"content-type":
                    outcome.content_type = bytes(value).decode("latin-1")
        elif message["type"] == "http.response.body":
            body.append(bytes(message.get("body", b"")))

    with trio.move_on_after(REQUEST_TIMEOUT_S) as scope_timer:
        try:
            await app(scope, receive, send)
        except Exception as error:  # noqa: BLE001 - what escapes the app is the finding
            outcome.raised = type(error).__name__
    outcome.timed_out = scope_timer.cancelled_caught
    outcome.body = b"".join(body)
    return outcome


def judge(request: FuzzRequest, outcome: Outcome, token: str, report: FuzzReport) -> None:
    report.inputs += 1
    if outcome.status is not None:
        report.statuses[outcome.status] = report.statuses.get(outcome.status, 0) + 1
    what = request.describe()
    if outcome.raised is not None or outcome.status is None:
        report.crashes += 1
        report.note(f"{what}: {'raised ' + outcome.raised if outcome.raised else 'no reply'}")
        return
    if outcome.timed_out:
        report.crashes += 1
        report.note(f"{what}: no complete reply within {REQUEST_TIMEOUT_S} s")
        return
    text = outcome.body.decode("utf-8", "replace")
    if outcome.status == 500 or "E_INTERNAL" in text:
        report.internal_errors += 1
        report.note(f"{what}: {outcome.status} {text[:200]}")
        return
    for forbidden in (*FORBIDDEN_IN_REPLIES, token):
        if forbidden in text:
            report.note(f"{what}: the reply carries {forbidden[:12]!r}")
            return
    if outcome.status < 400:
        headers = dict(reversed(request.headers))  # the first of repeated headers, as the server reads them
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if host not in ALLOWED_HOSTS:
            report.note(f"{what}: {outcome.status} for a foreign Host {host[:40]!r}")
        public = request.method in ("GET", "HEAD") and request.path in PUBLIC_PATHS
        if not public and headers.get(b"authorization") != f"Bearer {token}".encode():
            report.note(f"{what}: {outcome.status} without the token")
    elif request.method != "HEAD":
        try:
            code = json.loads(outcome.body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            report.note(f"{what}: {outcome.status} without an error code: {text[:200]}")
            return
        if code not in STABLE_CODES:
            report.note(f"{what}: {outcome.status} with an unknown code {code!r}")


class LogWatch(logging.Handler):
    """Counts log records (INFO and up) that carry a traceback, a local path or the token."""

    def __init__(self, token: str) -> None:
        super().__init__(logging.INFO)
        self.token = token
        self.findings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info or record.exc_text or record.stack_info:
            self.findings.append(f"{record.name}: a traceback with {text[:120]!r}")
        elif any(forbidden in text for forbidden in (*FORBIDDEN_IN_REPLIES, self.token)):
            self.findings.append(f"{record.name}: {text[:160]!r}")


@contextmanager
def watching_logs(token: str) -> Iterator[LogWatch]:
    root = logging.getLogger()
    watch = LogWatch(token)
    old_level = root.level
    root.addHandler(watch)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield watch
    finally:
        root.removeHandler(watch)
        root.setLevel(old_level)


BATCH = 1000  # examples per hypothesis run: its bookkeeping grows with each, and is dropped between runs


async def fuzz_app(
    app: ASGIApp, token: str, inputs: int, *, seed: int | None = None, known: Known | None = None
) -> FuzzReport:
    """Play ``inputs`` hypothesis-drawn requests against ``app`` (from a trio task) and judge them.

    Deterministic: batch ``i`` of up to ``BATCH`` examples runs with seed ``seed + i`` (``seed``
    defaults to 0), so the same inputs come each time for the same arguments.
    """
    report = FuzzReport()
    strategy = requests(route_table(app), token, known)
    base = seed or 0
    for batch, start in enumerate(range(0, inputs, BATCH)):

        @hypothesis_seed(base + batch)
        @settings(
            max_examples=min(BATCH, inputs - start),
            deadline=None,
            database=None,
            phases=(Phase.generate,),
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def one(request: FuzzRequest) -> None:
            outcome = trio.from_thread.run(play, app, request)
            judge(request, outcome, token, report)

        await trio.to_thread.run_sync(one)
    return report
