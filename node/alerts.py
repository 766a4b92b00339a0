"""P0/P1 alerts, evaluated inside the daemon over its own ``/metrics``.

The rules are a Prometheus rules file (``node/alerts.yml`` ships with the package; ``alerts.rules``
names another): ``groups`` → ``rules``, each with ``alert``, ``expr``, ``for``,
``labels: {severity: P0|P1}`` and ``annotations: {summary}``. The same file loads into Prometheus
unchanged; the daemon evaluates it too, so an operator without Prometheus still sees
``GET /api/alerts`` and a line in ``clawnode status``.

Every ``alerts.interval_s`` the daemon renders its metrics, parses them with prometheus_client's own
parser, keeps a bounded history of the samples the rules read (``History``), and evaluates each
rule: an expression that holds makes the alert ``pending``; once it has held for the rule's
``for:`` it is ``firing``; when it stops holding the alert is gone (no ``resolved`` state is kept).

The expression subset this evaluator computes (anything else is refused when the rules load)::

    expr      := [ "sum" "(" ] vector [ ")" ] op number
    vector    := selector
               | ("rate" | "increase") "(" selector "[" duration "]" ")"
    selector  := metric_name [ "{" matcher { "," matcher } "}" ]
    matcher   := label ("=" | "!=") '"' value '"'
    op        := ">" | ">=" | "<" | "<=" | "==" | "!="
    duration  := one or more of <int>("ms" | "s" | "m" | "h" | "d" | "w"), e.g. 90s, 5m, 1h30m

``metric_name`` is a sample name as ``/metrics`` writes it (counters end in ``_total``, histograms
in ``_bucket``/``_sum``/``_count``). ``increase`` is the rise of a counter over the samples kept in
the window (counter resets are handled, nothing is extrapolated); ``rate`` is that rise divided by
the time between the first and last sample of the window. Both need two samples in the window, so
a series that just appeared yields nothing yet. A metric that has not been set (no sample in
``/metrics``, or a NaN value) yields nothing either, so no rule fires on a value the node does not
know yet; ``clawnode_escrow_disconnected`` has no sample until the first connection attempt answers.
Without ``sum`` each matching series is its own
alert; ``sum`` adds the matching series (or the per-series rates) into one value. ``$value`` and
other templates in annotations are not expanded.
"""

from __future__ import annotations

import logging
import math
import operator
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

from runtime.errors import ClawnodeError, ErrorCode

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

SEVERITIES = ("P0", "P1")
Labels = frozenset[tuple[str, str]]
SeriesKey = tuple[str, Labels]

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
_UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_RANGE_SELECTOR = rf"(?P<metric>{_NAME})\s*(?:\{{(?P<matchers>[^}}]*)\}})?"
_INSTANT_SELECTOR = rf"(?P<i_metric>{_NAME})\s*(?:\{{(?P<i_matchers>[^}}]*)\}})?"
_EXPR = re.compile(
    r"^\s*(?P<sum>sum\s*\(\s*)?"
    rf"(?:(?P<func>rate|increase)\s*\(\s*{_RANGE_SELECTOR}\s*\[\s*(?P<window>[0-9a-z]+)\s*\]\s*\)"
    rf"|{_INSTANT_SELECTOR})"
    r"\s*(?P<close>\))?\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)
_MATCHER = re.compile(rf'^\s*(?P<label>{_NAME})\s*(?P<op>!=|=)\s*"(?P<value>(?:[^"\\]|\\.)*)"\s*$')
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w)")


def parse_duration(text: str | int | float) -> float:
    """A Prometheus duration (``90s``, ``5m``, ``1h30m``, ``0s``) in seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    text = str(text).strip()
    if not text or _DURATION_PART.sub("", text):
        raise ValueError(f"not a duration: {text!r}")
    return float(sum(int(n) * _UNITS_S[unit] for n, unit in _DURATION_PART.findall(text)))


@dataclass(frozen=True)
class Expr:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, "=" | "!=", value)
    op: str
    threshold: float
    func: Literal["rate", "increase"] | None = None
    window_s: float = 0.0
    summed: bool = False

    def selects(self, labels: Labels) -> bool:
        values = dict(labels)
        for label, op, value in self.matchers:
            if (values.get(label, "") == value) != (op == "="):
                return False
        return True


def parse_expr(text: str) -> Expr:
    """Parse one expression of the supported subset; ``ValueError`` names what is not supported."""
    match = _EXPR.match(text)
    if match is None or bool(match["sum"]) != bool(match["close"]):
        raise ValueError(f"unsupported expression (see node/alerts.py for the subset): {text!r}")
    func = match["func"]
    metric = match["metric"] if func else match["i_metric"]
    raw_matchers = match["matchers"] if func else match["i_matchers"]
    matchers: list[tuple[str, str, str]] = []
    for part in (raw_matchers or "").split(","):
        if not part.strip():
            continue
        found = _MATCHER.match(part)
        if found is None:
            raise ValueError(f"unsupported label matcher {part.strip()!r} in {text!r}")
        matchers.append((found["label"], found["op"], found["value"].replace('\\"', '"').replace("\\\\", "\\")))
    window_s = parse_duration(match["window"]) if func else 0.0
    if func and window_s <= 0:
        raise ValueError(f"a range must be longer than 0: {text!r}")
    return Expr(
        metric=metric,
        matchers=tuple(matchers),
        op=match["op"],
        threshold=float(match["number"]),
        func=cast(Literal["rate", "increase"] | None, func),
        window_s=window_s,
        summed=bool(match["sum"]),
    )


@dataclass(frozen=True)
class Rule:
    name: str
    expr_text: str
    expr: Expr
    for_s: float
    severity: str
    summary: str
    labels: Mapping[str, str] = field(default_factory=dict)


def parse_rules(text: str) -> list[Rule]:
    """The alerting rules of a Prometheus rules file; ``ValueError`` on anything malformed."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"the rules file is not valid YAML ({type(error).__name__})") from None
    if not isinstance(document, dict) or not isinstance(document.get("groups"), list):
        raise ValueError("a rules file needs a list of groups")
    rules: list[Rule] = []
    for group in document["groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("rules"), list):
            raise ValueError("every group needs a list of rules")
        for raw in group["rules"]:
            if not isinstance(raw, dict) or "alert" not in raw:
                raise ValueError("only alerting rules (with `alert`) are supported")
            name = str(raw["alert"])
            labels = {str(k): str(v) for k, v in (raw.get("labels") or {}).items()}
            if labels.get("severity") not in SEVERITIES:
                raise ValueError(f"rule {name}: labels.severity must be one of {', '.join(SEVERITIES)}")
            annotations = raw.get("annotations") or {}
            expr_text = str(raw.get("expr", ""))
            try:
                expr = parse_expr(expr_text)
                for_s = parse_duration(raw.get("for", "0s"))
            except ValueError as error:
                raise ValueError(f"rule {name}: {error}") from None
            rules.append(
                Rule(name, expr_text, expr, for_s, labels["severity"], str(annotations.get("summary", "")), labels)
            )
    if len({rule.name for rule in rules}) != len(rules):
        raise ValueError("two rules have the same alert name")
    return rules


def default_rules_text() -> str:
    return files("node").joinpath("alerts.yml").read_text(encoding="utf-8")


def load_rules(path: Path | None) -> list[Rule]:
    """The rules in ``path``, or the shipped ``node/alerts.yml`` when it is None."""
    try:
        text = default_rules_text() if path is None else path.read_text(encoding="utf-8")
        return parse_rules(text)
    except (OSError, ValueError) as error:
        # The message never carries the file's path.
        detail = str(error) if isinstance(error, ValueError) else type(error).__name__
        message = f"cannot load the alert rules (alerts.rules): {detail}"
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, message) from None


Sample = tuple[str, Labels, float]


def parse_samples(text: str) -> list[Sample]:
    """Every sample of a ``/metrics`` body: (sample name, labels, value)."""
    return [
        (sample.name, frozenset(sample.labels.items()), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _increase(points: Iterable[tuple[float, float]]) -> float:
    rise = 0.0
    previous: float | None = None
    for _, value in points:
        if previous is not None:
            rise += value - previous if value >= previous else value  # a reset restarts from 0
        previous = value
    return rise


# Points kept per series and window: a range of 1h evaluated every second keeps one point per
# ~14 s instead of 3600 (``increase`` over them differs from the full-resolution one by at most
# one step's rise at the window's start, the same as a slower scrape).
MAX_POINTS_PER_WINDOW = 256


class History:
    """The samples the rules read, and nothing else: bounded whatever the interval or the run time.

    Only metrics named by a ``rate``/``increase`` rule keep a history, each for the longest window a
    rule asks of it (plus one resolution step), at most ``max_points`` points per window: a point is
    added once ``window / max_points`` has passed since the one before the newest, otherwise it
    replaces the newest (unless the counter went down: a reset's rise must not be lost). Only
    metrics named by an instant rule are kept in ``latest``.
    """

    def __init__(
        self,
        ranges: Mapping[str, float],
        instant: Iterable[str] = (),
        *,
        max_points: int = MAX_POINTS_PER_WINDOW,
    ) -> None:
        self.ranges = dict(ranges)
        self.instant = frozenset(instant)
        self.max_points = max_points
        self.series: dict[SeriesKey, deque[tuple[float, float]]] = {}
        self.latest: dict[SeriesKey, float] = {}

    def points(self) -> int:
        """How many points are held in all (what the tests bound)."""
        return sum(len(points) for points in self.series.values()) + len(self.latest)

    def add(self, samples: Iterable[Sample], now: float) -> None:
        self.latest = {}
        for name, labels, value in samples:
            if math.isnan(value):  # not set yet: nothing to evaluate
                continue
            key = (name, labels)
            if name in self.instant:
                self.latest[key] = value
            window = self.ranges.get(name)
            if window is None:
                continue
            points = self.series.setdefault(key, deque())
            step = window / self.max_points
            # The newest point is provisional until it lies ``step`` after the one before it.
            if len(points) >= 2 and points[-1][0] - points[-2][0] < step and value >= points[-1][1]:
                points[-1] = (now, value)
            else:
                points.append((now, value))
        for key in list(self.series):
            points = self.series[key]
            horizon = now - self.ranges[key[0]] * (1 + 1 / self.max_points)
            while points and points[0][0] < horizon:
                points.popleft()
            if not points:
                del self.series[key]

    def vector(self, expr: Expr, now: float) -> dict[Labels, float]:
        """What ``expr`` (without its comparison) yields now, per series (one empty key when summed)."""
        values: dict[Labels, float] = {}
        if expr.func is None:
            for (name, labels), value in self.latest.items():
                if name == expr.metric and expr.selects(labels):
                    values[labels] = value
        else:
            for (name, labels), points in self.series.items():
                if name != expr.metric or not expr.selects(labels):
                    continue
                window = [p for p in points if p[0] >= now - expr.window_s]
                if len(window) < 2:
                    continue
                rise = _increase(window)
                span = window[-1][0] - window[0][0]
                if expr.func == "increase":
                    values[labels] = rise
                elif span > 0:
                    values[labels] = rise / span
        if expr.summed:
            return {frozenset(): math.fsum(values.values())} if values else {}
        return values


class AlertReply(BaseModel):
    name: str
    severity: str = Field(description="P0 | P1")
    state: Literal["pending", "firing"]
    summary: str
    since: str = Field(description="when the alert entered this state, ISO 8601 UTC")
    labels: dict[str, str] = Field(default_factory=dict, description="the labels of the series that triggered it")


class AlertsReply(BaseModel):
    alerts: list[AlertReply]


@dataclass
class _Active:
    pending_at: float
    firing_at: float | None = None
    value: float = 0.0


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class AlertEvaluator:
    """Rules over a sample history: ``step`` once per scrape, then read ``alerts``."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        ranges: dict[str, float] = {}
        for rule in rules:
            if rule.expr.func is not None:
                ranges[rule.expr.metric] = max(ranges.get(rule.expr.metric, 0.0), rule.expr.window_s)
        instant = {rule.expr.metric for rule in rules if rule.expr.func is None}
        self.history = History(ranges, instant)
        self.active: dict[tuple[str, Labels], _Active] = {}

    def step(self, samples: Iterable[Sample], now: float) -> None:
        self.history.add(samples, now)
        still: set[tuple[str, Labels]] = set()
        for rule in self.rules:
            compare = _OPS[rule.expr.op]
            for labels, value in self.history.vector(rule.expr, now).items():
                if not compare(value, rule.expr.threshold):
                    continue
                key = (rule.name, labels)
                still.add(key)
                active = self.active.setdefault(key, _Active(pending_at=now))
                active.value = value
                if active.firing_at is None and now - active.pending_at >= rule.for_s:
                    active.firing_at = now
        for key in set(self.active) - still:
            del self.active[key]

    def alerts(self) -> list[AlertReply]:
        by_name = {rule.name: rule for rule in self.rules}
        replies = []
        for (name, labels), active in self.active.items():
            rule = by_name[name]
            firing = active.firing_at is not None
            replies.append(
                AlertReply(
                    name=name,
                    severity=rule.severity,
                    state="firing" if firing else "pending",
                    summary=rule.summary,
                    since=_iso(active.firing_at if active.firing_at is not None else active.pending_at),
                    labels=dict(sorted(labels)),
                )
            )
        replies.sort(key=lambda a: (a.state != "firing", a.severity, a.name, sorted(a.labels.items())))
        return replies


class AlertService:
    """Evaluates the rules every ``interval_s`` over ``render()``'s ``/metrics`` body; a daemon service."""

    def __init__(
        self,
        render: Callable[[], Awaitable[bytes]],
        *,
        interval_s: float,
        rules_path: Path | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.render = render
        self.interval_s = interval_s
        self.rules_path = rules_path
        self.clock = clock
        self.evaluator = AlertEvaluator([])

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        rules = await trio.to_thread.run_sync(load_rules, self.rules_path)
        self.evaluator = AlertEvaluator(rules)
        task_status.started()
        while True:
            await self.evaluate_once()
            await trio.sleep(self.interval_s)

    async def evaluate_once(self) -> None:
        try:
            body = await self.render()
            self.evaluator.step(parse_samples(body.decode()), self.clock())
        except Exception as error:  # noqa: BLE001 - one bad evaluation must not stop the node
            log.warning("alert evaluation failed: %s", type(error).__name__)

    def reply(self) -> AlertsReply:
        return AlertsReply(alerts=self.evaluator.alerts())
