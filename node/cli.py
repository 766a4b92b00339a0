"""The ``clawnode`` command line."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import httpx
import trio

from node.datadir import ensure_data_dir, read_api_token, read_running
from node.paths import resolve_data_dir
from runtime.errors import ClawnodeError
from runtime.model_ids import MODEL_FEATURES

if TYPE_CHECKING:
    from node.config import Config

SHUTDOWN_GRACE_S = 5.0
EXIT_CONFIG = 2
EXIT_NOT_RUNNING = 3
EXIT_CANNOT_START = 4

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Data dir of the node (default: $CLAWNODE_DATA_DIR or ~/.clawnode).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group()
@click.version_option(package_name="clawnode")
def main() -> None:
    """clawnode: a peer-to-peer market for AI compute."""


# start


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # py-libp2p configures its logger on import (no propagation, WARNING) and then
    # warns on every normal DHT stream close and every peer that hangs up: noise,
    # not news, for someone running a node. Shown only when debugging.
    import libp2p  # noqa: F401

    libp2p_logger = logging.getLogger("libp2p")
    libp2p_logger.propagate = level == "debug"
    libp2p_logger.setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL)
    logging.getLogger("hypercorn").setLevel(logging.WARNING)
    # web3 and urllib3 log the RPC URL (and its key) at debug: never shown. Whatever else names a
    # URL, in a message or a traceback (debug only), is redacted on the way out.
    for name in ("web3", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redact_record)


def _redact_record(record: logging.LogRecord) -> bool:
    from runtime.escrow.errors import redact

    message = record.getMessage()
    cleaned = redact(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    return True


async def _run_until_signalled(config: Config, data_dir: Path) -> None:
    from node.daemon import Node

    node = Node(config, data_dir)
    async with trio.open_nursery() as outer:
        node_scope = trio.CancelScope()
        outer.start_soon(_stop_on_signals, node_scope)
        with node_scope:
            await node.run()
        outer.cancel_scope.cancel()
    logging.getLogger("clawnode").info("stopped")


async def _stop_on_signals(node_scope: trio.CancelScope) -> None:
    from node.yamux_writes import release_frame_writes  # libp2p: only the daemon's commands load it

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if node_scope.cancel_called:
                logging.getLogger("clawnode").warning("second signal: exiting now")
                os._exit(128 + signum)
            logging.getLogger("clawnode").info("stopping (signal %d)", signum)
            node_scope.cancel()
            release_frame_writes()  # a frame to a peer that stopped reading must not hold the shutdown
            # Shutdown is bounded: whatever still runs after the grace period is abandoned.
            watchdog = threading.Timer(SHUTDOWN_GRACE_S, os._exit, args=(1,))
            watchdog.daemon = True
            watchdog.start()


@main.command()
@data_dir_option
@click.option("--listen", multiple=True, help="Multiaddr to listen on (repeatable); port 0 picks a free port.")
@click.option("--bootstrap", multiple=True, help="Bootstrap peer multiaddr with /p2p/<id> (repeatable).")
@click.option("--api-port", type=str, default=None, help="Local API port on 127.0.0.1; 0 picks a free one.")
@click.option("--role", type=str, default=None, help="node | bootstrap | relay.")
def start(
    data_dir: str | None, listen: tuple[str, ...], bootstrap: tuple[str, ...], api_port: str | None, role: str | None
) -> None:
    """Run the node until SIGINT or SIGTERM."""
    # Imported here so that the client commands below start fast (no libp2p, web3, jsonschema).
    from node.config import CONFIG_FILE_NAME, ConfigError, default_config_text, load_config

    directory = ensure_data_dir(resolve_data_dir(data_dir))
    config_path = directory / CONFIG_FILE_NAME
    if not config_path.exists():
        config_path.write_text(default_config_text(), encoding="utf-8")
    flags: dict[tuple[str, str], Any] = {
        ("node", "listen"): list(listen) or None,
        ("node", "role"): role,
        ("api", "port"): api_port,
        ("bootstrap", "peers"): list(bootstrap) or None,
    }
    try:
        config = load_config(directory, flags)
    except ConfigError as error:
        click.echo(f"clawnode: {error}", err=True)
        sys.exit(EXIT_CONFIG)
    _configure_logging(config.log.level)
    try:
        trio.run(_run_until_signalled, config, directory)
    except* ClawnodeError as group:
        for known in _leaves(group):
            click.echo(f"clawnode: {known.code}: {known.message}", err=True)
        sys.exit(EXIT_CANNOT_START)
    except* Exception as group:
        # A traceback would print local paths; it is shown only when asked for.
        logging.getLogger("clawnode").debug("the daemon failed", exc_info=group)
        names = ", ".join(sorted({type(leaf).__name__ for leaf in _leaves(group)}))
        click.echo(f"clawnode: E_INTERNAL: the daemon failed ({names}); CLAWNODE_LOG_LEVEL=debug shows why", err=True)
        sys.exit(1)


def _leaves(group: BaseExceptionGroup[Any]) -> list[Any]:
    found: list[Any] = []
    for error in group.exceptions:
        found.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return found


# commands that talk to the running daemon


def _call_api(
    data_dir: str | None,
    path: str,
    *,
    params: dict[str, Any] | None = None,
    timeout: float = 10.0,
    method: str = "GET",
    body: Any = None,
) -> Any:
    directory = resolve_data_dir(data_dir)
    running = read_running(directory)
    if running is None:
        click.echo("clawnode: E_UNAVAILABLE: no clawnode daemon is running for this data dir", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    try:
        reply = httpx.request(
            method,
            f"{running.api_url}{path}",
            json=body,
            params={key: value for key, value in (params or {}).items() if value is not None},
            headers={"authorization": f"Bearer {read_api_token(directory)}"},
            timeout=timeout,
        )
        body = reply.json()
    except (httpx.HTTPError, ValueError):
        click.echo("clawnode: E_UNAVAILABLE: the daemon does not answer (did it stop?)", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    if reply.status_code != 200:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        click.echo(f"clawnode: {error.get('code', 'E_INTERNAL')}: {error.get('message', '')}", err=True)
        sys.exit(1)
    return body


def _print(body: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(body, indent=2))
    else:
        click.echo("\n".join(lines))


@main.command()
@data_dir_option
@json_option
def status(data_dir: str | None, as_json: bool) -> None:
    """Peer id, addresses, peers, routing table, uptime and alerts of the running node."""
    body = _call_api(data_dir, "/api/status")
    alerts = _call_api(data_dir, "/api/alerts")["alerts"]
    alert_lines = [f"{a['severity']} {a['name']} ({a['state']} since {a['since']})" for a in alerts] or ["none"]
    _print(
        {**body, "alerts": alerts},
        as_json,
        [
            f"peer id        {body['peer_id']}",
            f"role           {body['role']}  (clawnode {body['version']})",
            "listening on   " + "\n               ".join(body["listen_addrs"]),
            "observed as    " + ("\n               ".join(body["observed_addrs"]) or "-"),
            f"peers          {body['connected_peers']} connected, {body['routing_table_size']} in routing table",
            f"reachability   {body.get('reachability', 'unknown')}"
            + (f" ({body['reachability_reason']})" if body.get("reachability_reason") else ""),
            *_relay_lines(body),
            *_nat_traversal_lines(body),
            *_escrow_mismatch_lines(body),
            *_layer_lines(body),
            *_split_lines(body),
            f"uptime         {body['uptime_s']:.0f} s",
            "alerts         " + "\n               ".join(alert_lines),
        ],
    )


def _layer_lines(body: dict[str, Any]) -> list[str]:
    """The layer leases this node serves (market.layer_servers; docs/split.md)."""
    leases = body.get("layer_leases")
    if leases is None:
        return []
    if not leases:
        return ["layers         serving none yet"]
    return [
        f"layers         lease {v['lease_id']} for …{v['consumer']}: {v['state']}, {v['tunnels']} tunnel(s), "
        f"{v['tokens']} tokens, {v['bytes']} bytes"
        for v in leases
    ]


def _split_lines(body: dict[str, Any]) -> list[str]:
    """The split models this node runs (split.models; docs/split.md): which peer holds which layers."""
    seats = body.get("split_models")
    if seats is None:
        return []
    if not seats:
        return ["split          placed on no sellers yet"]
    return [
        f"split          {v['model']}: layers {v['layers']} on …{v['peer']} (lease {v['lease_id']}), "
        f"{v['tokens']} tokens, {v['state']}"
        for v in seats
    ]


def _escrow_mismatch_lines(body: dict[str, Any]) -> list[str]:
    """Escrows the chain does not know (the reconciliation flagged them; see docs/operations.md)."""
    mismatches = body.get("escrow_mismatches")
    if not mismatches or not mismatches.get("count"):
        return []
    ids = ", ".join(mismatches.get("escrow_ids", []))
    return [f"escrow flagged {mismatches['count']} escrow(s) the chain does not know, not retried ({ids})"]


def _nat_traversal_lines(body: dict[str, Any]) -> list[str]:
    """How others reach us, the UPnP mapping and the hole punches so far."""
    lines = []
    if body.get("reached_by"):
        lines.append(f"reached by     {body['reached_by']}")
    upnp = body.get("upnp")
    if upnp:
        mapped = ", ".join(
            f"{m['proto']} {m['internal_port']}->{upnp.get('external_ip') or '?'}:{m['external_port']}"
            for m in upnp.get("mappings", [])
        )
        error = f" ({upnp['last_error']})" if upnp.get("last_error") else ""
        lines.append(f"upnp           {upnp['state']}" + (f": {mapped}" if mapped else "") + error)
        if upnp.get("double_nat"):
            lines.append(f"double NAT     yes ({upnp.get('double_nat_reason')}): the mapping is not published")
    punch = body.get("hole_punch")
    if punch and punch.get("enabled"):
        lines.append(
            f"hole punching  {punch['direct']} direct, {punch['failed']} failed"
            + (f", {punch['in_progress']} in progress" if punch.get("in_progress") else "")
        )
    return lines


def _relay_lines(body: dict[str, Any]) -> list[str]:
    """Relays holding a reservation for us (while private), or the reservations a relay holds for others."""
    lines = []
    if body.get("relay_hop_reservations") is not None:
        lines.append(f"relay service  {body['relay_hop_reservations']} reservations held for others")
    reservations = body.get("relay_reservations") or []
    if reservations:
        lines.append(
            "relayed via    "
            + "\n               ".join(
                f"{r['relay']} until {time.strftime('%H:%M:%S', time.localtime(r['expires_at']))}"
                f" ({r['renewals']} renewals)"
                for r in reservations
            )
        )
    if body.get("relayed_addrs"):
        lines.append("relayed addrs  " + "\n               ".join(body["relayed_addrs"]))
    return lines


@main.command()
@data_dir_option
@json_option
def peers(data_dir: str | None, as_json: bool) -> None:
    """Peers the node is connected to or keeps in its routing table."""
    body = _call_api(data_dir, "/api/peers")
    lines = [
        f"{peer['peer_id']}  {'connected' if peer['connected'] else '         '}  "
        f"{'routing-table' if peer['in_routing_table'] else ''}"
        for peer in body["peers"]
    ]
    _print(body, as_json, lines or ["no peers"])


@main.command(name="id")
@data_dir_option
@json_option
def identity(data_dir: str | None, as_json: bool) -> None:
    """Peer id, listen multiaddrs and API URL of the running node."""
    body = _call_api(data_dir, "/api/id")
    _print(body, as_json, [body["peer_id"], *body["listen_addrs"], f"api {body['api_url']}"])


def _price(amount: int, asset: str) -> str:
    return f"{amount} (smallest unit of {asset})" if asset != "ETH" else f"{amount / 1e9:g} gwei"


def _offer_line(capability: dict[str, Any]) -> str:
    pricing = capability["pricing"]
    model = capability.get("model") or {}
    context = f"  ctx {model['context_length']}" if model else ""
    if model.get("features"):
        context += "  " + ",".join(model["features"])
    return f"{capability['name']:<40} {_price(pricing['price_per_unit'], pricing['asset'])}/{pricing['unit']}{context}"


@main.command()
@click.argument("capability")
@data_dir_option
@click.option("--max-price", type=str, default=None, help="Highest price per unit, in the asset's smallest unit.")
@click.option("--min-ctx", type=str, default=None, help="Smallest context length, tokens.")
@click.option("--min-vram", type=str, default=None, help="Smallest GPU memory, GB.")
@click.option("--reachable", is_flag=True, help="Only providers that are publicly reachable.")
@click.option(
    "--feature",
    "features",
    multiple=True,
    type=click.Choice(MODEL_FEATURES),
    help="Only providers whose model serves this (repeatable): tools, json_schema, logprobs, n.",
)
@click.option("--sha256", type=str, default=None, help="Only providers serving this GGUF file (its sha256, hex).")
@click.option("--limit", type=str, default=None, help="At most this many providers (default 20).")
@json_option
def find(
    capability: str,
    data_dir: str | None,
    max_price: str | None,
    min_ctx: str | None,
    min_vram: str | None,
    reachable: bool,
    features: tuple[str, ...],
    sha256: str | None,
    limit: str | None,
    as_json: bool,
) -> None:
    """Nodes that serve CAPABILITY (e.g. model:Qwen/Qwen2.5-0.5B-Instruct), cheapest and fastest first."""
    params = {
        "capability": capability,
        "max_price": max_price,
        "min_ctx": min_ctx,
        "min_vram_gb": min_vram,
        "reachable": "true" if reachable else None,
        "features": list(features) or None,
        "sha256": sha256.lower() if sha256 else None,
        "limit": limit,
    }
    body = _call_api(data_dir, "/api/discover", params=params, timeout=60.0)
    lines = []
    for provider in body["providers"]:
        hardware = provider["gpu_model"] or "cpu"
        context = f"ctx {provider['context_length']}" if provider["context_length"] else ""
        text_only = "text only" if provider["capability"].startswith("model:") else ""
        served = ",".join(provider.get("features") or []) or text_only
        lines.append(
            f"{provider['peer_id']}  {_price(provider['price_per_unit'], provider['asset'])}/{provider['unit']}  "
            f"{context}  {served}  {hardware}  {provider['reachability']}  rtt {provider['rtt_ms']:.1f} ms"
            + ("  (this node)" if provider["is_self"] else "")
        )
    for peer, checks in (body.get("verification") or {}).items():
        # This node's own spot-checks of the provider (verified inference).
        outcome = f"FAILED ({checks['last_reason']})" if checks["failed"] else "passed"
        lines.append(f"  {peer}  verification {outcome}: {checks['passed']} passed, {checks['failed']} failed")
    unpayable = body.get("unpayable") or []
    if not lines:
        lines.append(f"no provider of {capability} that this node can pay matches")
    if unpayable:
        # Listed so the owner sees them, never tried: this node cannot pay on their chain or contract.
        lines.append(f"{body.get('note') or len(unpayable)} (this node cannot pay them):")
        for item in unpayable:
            provider = item["provider"]
            lines.append(f"  {provider['peer_id']}  {provider['chain']}  unreachable for payment ({item['reason']})")
    _print(body, as_json, lines)


@main.command()
@data_dir_option
@json_option
def capabilities(data_dir: str | None, as_json: bool) -> None:
    """What this node offers, as published in its capability record."""
    body = _call_api(data_dir, "/api/capabilities")
    record = body["record"] or {"capabilities": [], "seq": "-"}
    lines = [f"record seq {record['seq']}", *(_offer_line(c) for c in record["capabilities"])]
    _print(body, as_json, lines if record["capabilities"] else ["this node offers nothing (see [[offers]] in config)"])


@main.command()
@click.argument("peer_id")
@data_dir_option
@json_option
def describe(peer_id: str, data_dir: str | None, as_json: bool) -> None:
    """The capability record of another node."""
    body = _call_api(data_dir, f"/api/describe/{peer_id}", timeout=60.0)
    record = body["record"]
    hardware = record["hardware"]
    reachable = f"yes, rtt {body['rtt_ms']:.1f} ms" if body["reachable"] else "no (record from the DHT)"
    lines = [
        f"peer id      {record['peer_id']}",
        f"reachable    {reachable}",
        f"hardware     {hardware['cores']} cores, {hardware['ram_mb']} MiB RAM, "
        f"{hardware['gpu_model'] or 'no GPU'} {hardware['vram_mb'] or ''}".rstrip(),
        f"payout       {record['wallet']['address']}",
        f"record seq   {record['seq']}",
        *(_offer_line(c) for c in record["capabilities"]),
    ]
    _print(body, as_json, lines)


# ledger


def _wei(amount: int) -> str:
    return f"{amount / 1e18:.9f} ETH" if amount else "0"


def _totals_lines(title: str, rows: list[dict[str, Any]]) -> list[str]:
    lines = [title]
    for row in rows:
        lines.append(f"  {row['key']:<54} {_wei(row['income']):>18} {_wei(row['spend']):>18} {_wei(row['net']):>18}")
    return lines if rows else [*lines, "  -"]


@main.group(invoke_without_command=True)
@data_dir_option
@click.option("--leases", "show", flag_value="leases", help="List leases.")
@click.option("--receipts", "show", flag_value="receipts", help="List usage receipts.")
@click.option("--settlements", "show", flag_value="settlements", help="List settlements and their state.")
@click.option("--limit", type=str, default=None, help="At most this many rows (default 100).")
@json_option
@click.pass_context
def ledger(ctx: click.Context, data_dir: str | None, show: str | None, limit: str | None, as_json: bool) -> None:
    """What this node sold and bought: income, spend and net per day and per peer (or leases, receipts, settlements)."""
    if ctx.invoked_subcommand is not None:
        return
    if show is not None:
        body = _call_api(data_dir, f"/api/ledger/{show}", params={"limit": limit})
        rows = body[show]
        if show == "leases":
            lines = [
                f"{r['lease_id']:<32} {r['role']:<8} {r['state']:<8} units {r['metered_units']:<8} "
                f"settled {_wei(r['settled_amount'])}  refunded {_wei(r['refunded_amount'])}  "
                f"{r['consumer'] if r['role'] == 'provider' else r['provider']}"
                for r in rows
            ]
        elif show == "receipts":
            lines = [
                f"{r['lease_id']:<32} #{r['seq']:<5} units {r['units']:<8} {_wei(r['amount']):>18}  "
                f"{'countersigned' if r['countersigned'] else 'provider-only'}  {'settled' if r['settled'] else ''}"
                for r in rows
            ]
        else:
            lines = [
                f"{r['settlement_id']:<48} {r['kind']:<8} {r['state']:<8} attempts {r['attempts']}"
                + (f"  last error {r['last_error']}" if r["last_error"] else "")
                for r in rows
            ]
        _print(body, as_json, lines or [f"no {show}"])
        return
    body = _call_api(data_dir, "/api/ledger/summary")
    total, queue, escrow = body["total"], body["settlement_queue"], body["escrow"]
    header = f"  {'':<54} {'income':>18} {'spend':>18} {'net':>18}"
    lines = [
        f"income {_wei(total['income'])}   spend {_wei(total['spend'])}   net {_wei(total['net'])}",
        f"leases {body['leases']}, receipts {body['receipts']}",
        f"settlement queue {queue['length']} pending"
        + (f", oldest {queue['oldest_age_s']} s" if queue["oldest_age_s"] is not None else ""),
        f"escrow {escrow['mode']}: {escrow['state']}"
        + (f", chain {escrow['chain_id']}, contract {escrow['contract']}" if escrow["contract"] else ""),
        header,
        *_totals_lines("per day", body["by_day"]),
        *_totals_lines("per peer", body["by_peer"]),
    ]
    _print(body, as_json, lines)


@ledger.command(name="ack-mismatches")
@data_dir_option
@json_option
@click.pass_context
def ledger_ack_mismatches(ctx: click.Context, data_dir: str | None, as_json: bool) -> None:
    """Acknowledge the escrows the chain does not know (see `clawnode status`): they stay flagged in the
    ledger, the EscrowLedgerMismatch alert resolves."""
    group = ctx.parent.params if ctx.parent is not None else {}
    body = _call_api(data_dir or group.get("data_dir"), "/api/ledger/mismatches/ack", method="POST")
    as_json = as_json or bool(group.get("as_json"))
    left = body["mismatches"]["count"]
    _print(body, as_json, [f"acknowledged {body['acknowledged']} flagged escrow(s); {left} left"])


@ledger.command(name="verify")
@data_dir_option
@json_option
@click.pass_context
def ledger_verify(ctx: click.Context, data_dir: str | None, as_json: bool) -> None:
    """Recompute the ledger's audit chain; exits 1 when it does not verify."""
    # `clawnode ledger --data-dir D --json verify` works too: fall back to the group's options.
    group = ctx.parent.params if ctx.parent is not None else {}
    body = _call_api(data_dir or group.get("data_dir"), "/api/ledger/verify")
    as_json = as_json or bool(group.get("as_json"))
    if body["ok"]:
        lines = [f"ok: {body['entries']} audit entries, head {body['head_hash']}"]
    else:
        lines = [f"BROKEN at entry {body['first_bad_seq']}: {body['problem']} ({body['entries']} entries verified)"]
    _print(body, as_json, lines)
    if not body["ok"]:
        sys.exit(1)


# the lease market


def _lease_line(lease: dict[str, Any]) -> str:
    other = lease["provider"] if lease["role"] == "consumer" else lease["consumer"]
    return (
        f"{lease['lease_id'][:16]}  {lease['role']:<8}  {lease['capability']}  with {other[:16]}…  "
        f"{lease['state']}  {lease['units']} units  budget {_wei(lease['budget'])}  {lease['mode']}"
    )


@main.group()
def lease() -> None:
    """Buy and sell access: open, list, use and revoke leases."""


@lease.command(name="open")
@click.argument("peer_id")
@click.argument("capability")
@click.option("--budget", type=str, default=None, help="Wei to lock in escrow (default: price x expected units).")
@click.option("--duration", type=str, default="3600", help="Seconds the lease lasts (default 3600).")
@click.option("--expected-units", type=str, default="1000", help="Units you expect to use (default 1000).")
@data_dir_option
@json_option
def lease_open(
    peer_id: str,
    capability: str,
    budget: str | None,
    duration: str,
    expected_units: str,
    data_dir: str | None,
    as_json: bool,
) -> None:
    """Lease CAPABILITY from PEER_ID: quote, escrow lock, grant."""
    request = {"peer_id": peer_id, "capability": capability, "duration_s": duration, "expected_units": expected_units}
    if budget is not None:
        request["budget"] = budget
    body = _call_api(data_dir, "/api/leases", method="POST", body=request, timeout=120.0)
    _print(body, as_json, [f"lease {body['lease_id']} open", _lease_line(body)])


@lease.command(name="list")
@data_dir_option
@json_option
def lease_list(data_dir: str | None, as_json: bool) -> None:
    """Leases this node holds or serves since it started."""
    body = _call_api(data_dir, "/api/leases")
    _print(body, as_json, [_lease_line(item) for item in body["leases"]] or ["no leases"])


@lease.command(name="revoke")
@click.argument("lease_id")
@data_dir_option
@json_option
def lease_revoke(lease_id: str, data_dir: str | None, as_json: bool) -> None:
    """End LEASE_ID: the provider claims what was countersigned, the rest is refunded."""
    body = _call_api(data_dir, f"/api/leases/{lease_id}", method="DELETE", timeout=60.0)
    _print(body, as_json, [f"lease {lease_id} ended", _lease_line(body)])


@lease.command(name="call")
@click.argument("lease_id")
@click.argument("request_json")
@data_dir_option
@json_option
def lease_call(lease_id: str, request_json: str, data_dir: str | None, as_json: bool) -> None:
    """Send one request (a JSON object) under LEASE_ID and print what came back."""
    try:
        request = json.loads(request_json)
    except ValueError:
        click.echo("clawnode: E_INVALID_ARGUMENT: REQUEST_JSON is not JSON", err=True)
        sys.exit(1)
    if not isinstance(request, dict):
        click.echo("clawnode: E_INVALID_ARGUMENT: REQUEST_JSON must be a JSON object", err=True)
        sys.exit(1)
    body = _call_api(data_dir, f"/api/leases/{lease_id}/call", method="POST", body=request, timeout=300.0)
    _print(body, as_json, [json.dumps(chunk) for chunk in body["chunks"]] + [f"{body['units']} units"])


# the task market


def _task_line(task: dict[str, Any]) -> str:
    price = f"  price {_wei(task['price'])}" if task.get("price") is not None else ""
    return (
        f"{task['task_id']}  {task['role']:<14}  {task['capability'] or '?'}  {task['state']}  "
        f"budget {_wei(task['budget'])}  bids {len(task['bids'])}{price}"
        + (f"  result {task['result_state']}" if task.get("result_state") else "")
        + (f"  dispute {task['dispute_state']}" if task.get("dispute_state") else "")
        + (f"  {task['kind']}" if task.get("kind") else "")
        + (f"  fuel {task['run']['fuel_used']} ({task['run']['outcome']})" if task.get("run") else "")
        + (f"  re-run {task['run_verdict']}" if task.get("run_verdict") else "")
    )


def _task_detail(task: dict[str, Any]) -> list[str]:
    lines = [_task_line(task)]
    lines.extend(f"  bid {b['bid_id']}  {b['bidder'][:16]}…  {_wei(b['price'])}  {b['state']}" for b in task["bids"])
    lines.extend(
        f"  evidence {e['evidence_id'][:12]}  from {e['submitted_by'][:16]}…  {e['size']} bytes  {e['note'][:60]}"
        for e in task.get("evidence", [])
    )
    if task.get("panel"):
        votes = task.get("panel_votes") or {}
        state = task.get("panel_state") or "no dispute"
        lines.append(f"  panel {task['panel']['threshold']} of {len(task['panel']['members'])}: {state}")
        lines.extend(
            f"    {m['peer'][:16]}…  "
            + (
                "not voted"
                if m["peer"] not in votes
                else "abstained"
                if votes[m["peer"]] is None
                else _wei(votes[m["peer"]])
            )
            for m in task["panel"]["members"]
        )
    return lines


@main.group()
def task() -> None:
    """Tasks: publish, bid, award, deliver, review, dispute, add evidence."""


@task.command(name="publish")
@click.argument("capability")
@click.option("--budget", required=True, help="Most you pay, wei.")
@click.option("--deadline", "deadline_s", default="3600", help="Seconds until bids and delivery close.")
@click.option("--summary", default="", help="One line bidders see.")
@click.option("--params", default="{}", help="JSON the winner receives.")
@click.option("--arbiter-peer", default=None, help="Peer id of the arbiter.")
@click.option("--arbiter-wallet", default=None, help="Wallet address of the arbiter.")
@click.option("--review-timeout", "review_timeout_s", default="600", help="Seconds you have to review a result.")
@click.option("--wasm", "wasm_file", default=None, help="A wasm module the seller runs in its sandbox.")
@click.option("--native", "native_file", default=None, help="A program the seller runs under bubblewrap.")
@click.option("--input", "input_file", default=None, help="The sandboxed program's stdin (at most 4 KiB).")
@click.option("--fuel", default=None, help="Sandbox: most wasm instructions (native: CPU-milliseconds).")
@click.option("--memory-mb", default=None, help="Sandbox: most memory, MiB.")
@click.option("--wall", "wall_s", default=None, help="Sandbox: most wall-clock seconds.")
@click.option("--arbitration", type=click.Choice(["rerun", "person"]), default="rerun", help="Who decides a dispute.")
@click.option("--panel", default=None, help="Sandbox: an arbiter panel instead of one arbiter, PEER:WALLET,...")
@click.option(
    "--panel-from",
    default=None,
    help="Sandbox: draw the panel from these arbiters, PEER,... (those that can re-run it).",
)
@click.option("--panel-size", type=int, default=3, help="With --panel-from: the panel's members.")
@click.option("--threshold", type=int, default=None, help="Votes that must agree (default: a strict majority).")
@click.option("--model", default=None, help="Inference: the served model that runs the --prompt batch.")
@click.option("--model-sha256", default="", help="Inference: its GGUF file's sha256 (as the seller's record states).")
@click.option("--prompt", "prompts", multiple=True, help="Inference: one prompt of the batch (repeat, at most 16).")
@click.option("--max-tokens", type=int, default=32, help="Inference: most tokens generated per prompt.")
@data_dir_option
@json_option
def task_publish(
    capability: str,
    budget: str,
    deadline_s: str,
    summary: str,
    params: str,
    arbiter_peer: str | None,
    arbiter_wallet: str | None,
    review_timeout_s: str,
    wasm_file: str | None,
    native_file: str | None,
    input_file: str | None,
    fuel: str | None,
    memory_mb: str | None,
    wall_s: str | None,
    arbitration: str,
    panel: str | None,
    panel_from: str | None,
    panel_size: int,
    threshold: int | None,
    model: str | None,
    model_sha256: str,
    prompts: tuple[str, ...],
    max_tokens: int,
    data_dir: str | None,
    as_json: bool,
) -> None:
    """Announce a task for CAPABILITY on the network (with --wasm/--native: a sandboxed one; with --panel:
    decided in a dispute by THRESHOLD of the panel's arbiters; with --model and --prompt: a prompt batch
    the seller runs on that model at temperature 0)."""
    request: dict[str, Any] = {
        "capability": capability,
        "budget": budget,
        "deadline_s": deadline_s,
        "summary": summary,
        "params": params,
        "review_timeout_s": review_timeout_s,
    }
    if arbiter_peer or arbiter_wallet:
        request.update(arbiter_peer=arbiter_peer, arbiter_wallet=arbiter_wallet)
    program = wasm_file or native_file
    if program:
        limits = {"fuel": fuel, "memory_bytes": int(memory_mb) * 1024 * 1024 if memory_mb else None, "wall_s": wall_s}
        request.update(
            kind="wasm" if wasm_file else "native",
            module_b64=base64.b64encode(Path(program).read_bytes()).decode(),
            input_b64=base64.b64encode(Path(input_file).read_bytes() if input_file else b"").decode(),
            limits={k: v for k, v in limits.items() if v is not None},
            arbitration=arbitration,
        )
    if model is not None:
        if program or not prompts:
            raise click.UsageError("--model takes one or more --prompt and no --wasm/--native")
        request["inference"] = {
            "model": model,
            "model_sha256": model_sha256,
            "prompts": list(prompts),
            "max_tokens": max_tokens,
            "arbitration": arbitration,
        }
    if panel is not None and panel_from is not None:
        raise click.UsageError("--panel and --panel-from do not go together")
    if panel is not None:
        if not program and model is None:
            raise click.UsageError("--panel needs a sandboxed task (--wasm or --native) or a prompt batch (--model)")
        members = [item.strip().rsplit(":", 1) for item in panel.split(",") if item.strip()]
        if not members or any(len(member) != 2 or not all(member) for member in members):
            raise click.UsageError("--panel takes PEER:WALLET pairs separated by commas")
        terms = {
            "members": [{"peer": peer, "wallet": wallet} for peer, wallet in members],
            "threshold": threshold if threshold is not None else len(members) // 2 + 1,
        }
        (request["inference"] if model is not None else request)["panel"] = terms
    elif panel_from is not None:
        if not program:
            raise click.UsageError("--panel-from needs a sandboxed task (--wasm or --native)")
        request.update(
            panel_from=[peer.strip() for peer in panel_from.split(",") if peer.strip()],
            panel_size=panel_size,
            panel_threshold=threshold,
        )
    elif threshold is not None:
        raise click.UsageError("--threshold goes with --panel or --panel-from")
    body = _call_api(data_dir, "/api/tasks", method="POST", body=request, timeout=60.0)
    _print(body, as_json, [f"task {body['task_id']} published", _task_line(body)])


@task.command(name="list")
@click.option("--watch", "capability", default=None, help="Also follow announcements for this capability.")
@data_dir_option
@json_option
def task_list(capability: str | None, data_dir: str | None, as_json: bool) -> None:
    """Tasks this node published, bid on, arbitrates or has seen announced."""
    if capability:
        body = _call_api(data_dir, "/api/tasks/watch", method="POST", body={"capability": capability})
    else:
        body = _call_api(data_dir, "/api/tasks")
    lines = [line for item in body["tasks"] for line in _task_detail(item)]
    _print(body, as_json, lines or ["no tasks"])


@task.command(name="bid")
@click.argument("task_id")
@click.argument("price")
@data_dir_option
@json_option
def task_bid(task_id: str, price: str, data_dir: str | None, as_json: bool) -> None:
    """Offer to do TASK_ID for PRICE wei."""
    body = _call_api(data_dir, f"/api/tasks/{task_id}/bids", method="POST", body={"price": price}, timeout=60.0)
    _print(body, as_json, [f"bid {body['bid_id']} on {task_id}: {_wei(body['price'])} ({body['state']})"])


@task.command(name="award")
@click.argument("task_id")
@click.argument("bid_id")
@data_dir_option
@json_option
def task_award(task_id: str, bid_id: str, data_dir: str | None, as_json: bool) -> None:
    """Award TASK_ID to BID_ID: its price is locked in escrow first."""
    body = _call_api(data_dir, f"/api/tasks/{task_id}/award", method="POST", body={"bid_id": bid_id}, timeout=120.0)
    _print(body, as_json, _task_detail(body))


@task.command(name="submit")
@click.argument("task_id")
@click.argument("artifact", type=click.File("rb"))
@data_dir_option
@json_option
def task_submit(task_id: str, artifact: Any, data_dir: str | None, as_json: bool) -> None:
    """Deliver ARTIFACT (a file, or - for stdin) as the result of TASK_ID."""
    encoded = base64.b64encode(artifact.read()).decode()
    body = _call_api(
        data_dir, f"/api/tasks/{task_id}/result", method="POST", body={"artifact_b64": encoded}, timeout=120.0
    )
    _print(body, as_json, _task_detail(body))


@task.command(name="review")
@click.argument("task_id")
@click.option("--accept/--reject", required=True, help="Accept (pay) or reject the result.")
@click.option("--reason", default="", help="Why (required to reject).")
@data_dir_option
@json_option
def task_review(task_id: str, accept: bool, reason: str, data_dir: str | None, as_json: bool) -> None:
    """Accept or reject the result delivered for TASK_ID."""
    request = {"accept": accept, "reason": reason}
    body = _call_api(data_dir, f"/api/tasks/{task_id}/review", method="POST", body=request, timeout=120.0)
    _print(body, as_json, _task_detail(body))


@task.command(name="dispute")
@click.argument("task_id")
@click.option("--reason", default="", help="What the arbiter should know.")
@data_dir_option
@json_option
def task_dispute(task_id: str, reason: str, data_dir: str | None, as_json: bool) -> None:
    """Dispute TASK_ID (after a rejection or a review timeout): the escrow freezes for the arbiter."""
    body = _call_api(data_dir, f"/api/tasks/{task_id}/dispute", method="POST", body={"reason": reason}, timeout=120.0)
    _print(body, as_json, _task_detail(body))


@task.command(name="evidence")
@click.argument("task_id")
@click.option("--note", default="", help="What the arbiter should read.")
@click.option(
    "--attach", "attachment", type=click.File("rb"), default=None, help="A file (at most 64 KiB), - for stdin."
)
@data_dir_option
@json_option
def task_evidence(task_id: str, note: str, attachment: Any, data_dir: str | None, as_json: bool) -> None:
    """Add a signed note (and a file) to the open dispute of TASK_ID; the arbiter and the other party get it."""
    request = {"note": note, "attachment_b64": base64.b64encode(attachment.read()).decode() if attachment else ""}
    body = _call_api(data_dir, f"/api/tasks/{task_id}/evidence", method="POST", body=request, timeout=120.0)
    _print(body, as_json, _task_detail(body))


@task.command(name="resolve")
@click.argument("task_id")
@click.argument("to_bidder")
@data_dir_option
@json_option
def task_resolve(task_id: str, to_bidder: str, data_dir: str | None, as_json: bool) -> None:
    """As the arbiter: pay TO_BIDDER wei of the disputed price to the bidder, the rest back."""
    request = {"to_bidder": to_bidder}
    body = _call_api(data_dir, f"/api/tasks/{task_id}/resolve", method="POST", body=request, timeout=120.0)
    _print(body, as_json, _task_detail(body))


@task.command(name="vote")
@click.argument("task_id")
@click.option("--to-bidder", default=None, help="Wei of the price to the seller (the rest back to the buyer).")
@click.option("--abstain", is_flag=True, help="Vote no split.")
@data_dir_option
@json_option
def task_vote(task_id: str, to_bidder: str | None, abstain: bool, data_dir: str | None, as_json: bool) -> None:
    """As a member of a disputed task's arbiter panel: vote a split, signed with this node's wallet."""
    if abstain == (to_bidder is not None):
        raise click.UsageError("give one of --to-bidder WEI or --abstain")
    body = _call_api(
        data_dir, f"/api/tasks/{task_id}/vote", method="POST", body={"to_bidder": to_bidder}, timeout=120.0
    )
    _print(body, as_json, _task_detail(body))


@task.command(name="cancel")
@click.argument("task_id")
@data_dir_option
@json_option
def task_cancel(task_id: str, data_dir: str | None, as_json: bool) -> None:
    """Cancel an open task you published."""
    body = _call_api(data_dir, f"/api/tasks/{task_id}/cancel", method="POST", timeout=60.0)
    _print(body, as_json, _task_detail(body))


# chat


def _stream_chat(data_dir: str | None, model: str, messages: list[dict[str, str]], max_tokens: int | None) -> str:
    directory = resolve_data_dir(data_dir)
    running = read_running(directory)
    if running is None:
        click.echo("clawnode: E_UNAVAILABLE: no clawnode daemon is running for this data dir", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    request: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    pieces: list[str] = []
    served_by: list[str] = []
    headers = {"authorization": f"Bearer {read_api_token(directory)}"}
    try:
        with httpx.stream(
            "POST", f"{running.api_url}/v1/chat/completions", json=request, headers=headers, timeout=300.0
        ) as reply:
            if reply.status_code != 200:
                error = json.loads(reply.read() or b"{}").get("error", {})
                click.echo(f"clawnode: {error.get('code', 'E_INTERNAL')}: {error.get('message', '')}", err=True)
                sys.exit(1)
            for line in reply.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    click.echo(f"\nclawnode: {event['error']['code']}: {event['error']['message']}", err=True)
                    sys.exit(1)
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content") or ""
                    pieces.append(text)
                    click.echo(text, nl=False)
                served_by = event.get("clawnode", {}).get("served_by", served_by)
    except httpx.HTTPError:
        click.echo("clawnode: E_UNAVAILABLE: the daemon does not answer (did it stop?)", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    click.echo()
    if served_by:
        click.echo(f"[served by {', '.join(who[:16] for who in served_by)}]", err=True)
    return "".join(pieces)


@main.command()
@click.argument("model")
@click.argument("prompt", required=False)
@click.option("--max-tokens", type=int, default=None, help="Most tokens per answer.")
@data_dir_option
def chat(model: str, prompt: str | None, max_tokens: int | None, data_dir: str | None) -> None:
    """Talk to MODEL (local or bought from the network): one PROMPT, or a conversation on stdin."""
    if prompt is not None:
        _stream_chat(data_dir, model, [{"role": "user", "content": prompt}], max_tokens)
        return
    messages: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        answer = _stream_chat(data_dir, model, messages, max_tokens)
        messages.append({"role": "assistant", "content": answer})


@main.command()
@click.option("--tiny", is_flag=True, help="Use the tiny random-weight model (fast; says nothing sensible).")
@click.option("--json", "as_json", is_flag=True, help="Write the final summary as JSON to stdout.")
def demo(tiny: bool, as_json: bool) -> None:
    """Play the whole market loop on a local swarm with an embedded chain and a small real model."""
    from node import demo as demo_module

    _configure_logging(os.environ.get("CLAWNODE_LOG_LEVEL", "error"))
    sys.exit(demo_module.run(tiny=tiny, as_json=as_json))


@main.command(name="nat-test")
@click.option(
    "--case",
    "cases",
    multiple=True,
    metavar="NAT_A:NAT_B[+upnp|+port-forward][/quic][@lan] | same-lan[:NAT] | relay-loss",
    help="A pair to run, NAT types full-cone | address-restricted | port-restricted | symmetric, "
    "cgn-NAT: behind a carrier-grade NAT too (double NAT); /quic: QUIC listeners beside TCP; same-lan: "
    "two nodes behind one router; relay-loss: a node's relays killed and one restarted "
    "(repeatable; default: the short matrix).",
)
@click.option(
    "--full",
    is_flag=True,
    help="Every pair of NAT types, UPnP on each, a port forward, double NAT, same LAN, relay loss.",
)
@click.option("--quic", is_flag=True, help="With --full: the 16 pairs and the UPnP cases again with QUIC listeners.")
@click.option("--repetitions", type=click.IntRange(1, 20), default=1, help="Runs per case (default 1).")
@click.option("--parallel", type=click.IntRange(1, 12), default=4, help="Cases run at once (default 4).")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the results here."
)
def nat_test(
    cases: tuple[str, ...], full: bool, quic: bool, repetitions: int, parallel: int, json_path: Path | None
) -> None:
    """Run real daemons behind namespace NATs and connect them to each other (Linux, root).

    Prints, per pair, both AutoNAT verdicts, the relay reservation, whether data was exchanged and
    how the connection was made (direct, hole punch, relay), with times.
    """
    from rich.console import Console

    from node import natmatrix

    try:
        chosen = [natmatrix.parse_case(text) for text in cases]
    except ValueError as error:
        click.echo(f"clawnode: E_INVALID_ARGUMENT: {error}", err=True)
        sys.exit(EXIT_CONFIG)
    if full:
        chosen += natmatrix.full_cases(quic=quic)
    chosen = chosen or list(natmatrix.SHORT_CASES)
    problem = natmatrix.requirements_problem(chosen)
    if problem is not None:
        click.echo(f"clawnode: E_UNAVAILABLE: nat-test needs Linux and root: {problem}", err=True)
        sys.exit(EXIT_CANNOT_START)
    try:
        results = natmatrix.run_matrix_with_progress(Console(stderr=True), chosen, repetitions, parallel=parallel)
    except (natmatrix.MatrixError, ValueError) as error:
        code, message = (
            (error.code, error.message)
            if isinstance(error, natmatrix.MatrixError)
            else ("E_INVALID_ARGUMENT", str(error))
        )
        click.echo(f"clawnode: {code}: {message}", err=True)
        sys.exit(EXIT_CANNOT_START if code == "E_UNAVAILABLE" else EXIT_CONFIG)
    Console().print(natmatrix.render_table(results))
    if json_path is not None:
        payload = {"summary": natmatrix.summarize(results), "results": [r.model_dump(mode="json") for r in results]}
        json_path.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    sys.exit(0 if all(r.ok for r in results) else 1)


# wallet and escrow tooling


def _passphrase(confirm: bool) -> str:
    """From ``CLAWNODE_WALLET_PASSPHRASE`` (scripts), else asked on the terminal (never echoed)."""
    given = os.environ.get("CLAWNODE_WALLET_PASSPHRASE")
    if given is not None:
        return given
    return str(click.prompt("passphrase", hide_input=True, confirmation_prompt=confirm, err=True))


@main.group(invoke_without_command=True)
@data_dir_option
@json_option
@click.pass_context
def wallet(ctx: click.Context, data_dir: str | None, as_json: bool) -> None:
    """The node's escrow wallet: address, chain, balance and escrow credit (withdraw, export, import below)."""
    if ctx.invoked_subcommand is not None:
        return
    body = _call_api(data_dir, "/api/wallet", timeout=30.0)
    lines = [
        f"address        {body['address']}",
        f"chain          {body['chain']}  (escrow.mode {body['mode']})",
        f"escrow         {body['contract']}",
        f"balance        {_wei(body['balance'])}",
        f"escrow credit  {_wei(body['escrow_credit'])}  (claimed income; clawnode wallet withdraw)",
    ]
    if body.get("stablecoin"):
        lines += [
            f"stablecoin     {body['stablecoin']}  (the network's ERC-20)",
            f"  balance      {body['stablecoin_balance']}  (smallest units)",
            f"  credit       {body['stablecoin_credit']}  (claimed income in it)",
        ]
    _print(body, as_json, lines)


@wallet.command(name="withdraw")
@click.option("--to", type=str, default=None, help="Address to pay out to (default: the node's own wallet).")
@click.option("--token", type=str, default=None, help="An ERC-20's credit instead of the coin's (0x… address).")
@data_dir_option
@json_option
def wallet_withdraw(to: str | None, token: str | None, data_dir: str | None, as_json: bool) -> None:
    """Move the escrow credit (what the node's claims earned) out of the escrow contract."""
    body = _call_api(data_dir, "/api/wallet/withdraw", method="POST", body={"to": to, "token": token}, timeout=150.0)
    amount = _wei(body["amount"]) if token is None else f"{body['amount']} (smallest units of {token})"
    _print(body, as_json, [f"withdrew {amount} to {body['to']} (tx {body['tx_hash']})"])


@wallet.command(name="export")
@click.argument("keystore", type=click.Path(dir_okay=False, path_type=Path))
@data_dir_option
def wallet_export(keystore: Path, data_dir: str | None) -> None:
    """Write the wallet key to KEYSTORE, encrypted with a passphrase (a v3 keystore any Ethereum wallet reads)."""
    from node.datadir import WALLET_FILE
    from runtime.escrow.wallet import export_keystore

    path = resolve_data_dir(data_dir) / WALLET_FILE
    if not path.exists():
        click.echo("clawnode: E_NOT_FOUND: this data dir has no wallet yet (start the node once)", err=True)
        sys.exit(1)
    key = bytes.fromhex(path.read_text().strip().removeprefix("0x"))
    try:
        exported = export_keystore(key, _passphrase(confirm=True))
    except ClawnodeError as error:
        click.echo(f"clawnode: {error.code}: {error.message}", err=True)
        sys.exit(1)
    try:
        fd = os.open(keystore, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        click.echo("clawnode: E_CONFLICT: the keystore file exists already", err=True)
        sys.exit(1)
    with os.fdopen(fd, "w") as file:
        json.dump(exported, file)
    click.echo(f"exported wallet 0x{exported['address']}")


@wallet.command(name="import")
@click.argument("keystore", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--replace", is_flag=True, help="Replace an existing wallet (kept as wallet.key.replaced-<time>).")
@data_dir_option
def wallet_import(keystore: Path, replace: bool, data_dir: str | None) -> None:
    """Make the key in KEYSTORE (a passphrase-encrypted v3 keystore) this node's wallet; the node must be stopped."""
    from eth_account import Account

    from node.datadir import WALLET_FILE
    from runtime.escrow.wallet import import_keystore

    directory = ensure_data_dir(resolve_data_dir(data_dir))
    if read_running(directory) is not None:
        click.echo("clawnode: E_CONFLICT: stop the node first (its wallet is in use)", err=True)
        sys.exit(1)
    path = directory / WALLET_FILE
    if path.exists() and not replace:
        click.echo("clawnode: E_CONFLICT: this data dir has a wallet already (--replace keeps it aside)", err=True)
        sys.exit(1)
    try:
        key = import_keystore(keystore.read_bytes(), _passphrase(confirm=False))
    except ClawnodeError as error:
        click.echo(f"clawnode: {error.code}: {error.message}", err=True)
        sys.exit(1)
    if path.exists():
        path.rename(directory / f"{WALLET_FILE}.replaced-{int(time.time())}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(key.hex())
    click.echo(f"imported wallet {Account.from_key(key).address}")


@main.command()
@data_dir_option
@json_option
def network(data_dir: str | None, as_json: bool) -> None:
    """Which chain and escrow contract this node pays on, and how it came to them."""
    body = _call_api(data_dir, "/api/network")
    how = {
        "serving": "serving the network's development chain (role bootstrap, escrow.mode auto)",
        "joined": f"joined through {body['joined_through']}",
        "private": "a private chain of its own: no other node can pay or be paid here",
        "configured": "the chain in escrow.rpc_url (escrow.mode rpc)",
        "starting": "connecting to its chain",
        "off": "no chain (escrow.mode off): post-paid with trusted peers only",
    }.get(body["state"], body["state"])
    lines = [f"network   {how}"]
    if body["chain"]:
        lines += [f"chain     {body['chain']}", f"escrow    {body['contract']}"]
    if body["arbiter"]:
        peer = body.get("arbiter_peer")  # a daemon from before it sends none
        lines.append(f"arbiter   {body['arbiter']}" + (f"  (peer {peer})" if peer else "  (peer id unknown)"))
    if body["rpc_url"]:
        lines.append(f"json-rpc  {body['rpc_url']}  (the dev chain this node serves)")
    if body["faucet"]:
        lines.append("faucet    funds each joining wallet once")
    _print(body, as_json, lines)


@main.group()
def escrow() -> None:
    """Escrow contract tooling."""


@escrow.command(name="deploy")
@click.option("--rpc-url", type=str, default=None, help="The chain's JSON-RPC URL (default: escrow.rpc_url).")
@data_dir_option
@json_option
def escrow_deploy(rpc_url: str | None, data_dir: str | None, as_json: bool) -> None:
    """Deploy the escrow contract, paid by this node's wallet; print what other nodes need to use it."""
    from libp2p.peer.id import ID

    from node.config import ConfigError, load_config
    from node.datadir import load_or_create_identity, load_or_create_wallet_key
    from runtime.escrow.wallet import deploy_escrow

    directory = ensure_data_dir(resolve_data_dir(data_dir))
    try:
        url = rpc_url or load_config(directory, {}).escrow.rpc_url
    except ConfigError as error:
        click.echo(f"clawnode: {error}", err=True)
        sys.exit(EXIT_CONFIG)
    if not url.startswith(("http://", "https://")):
        click.echo("clawnode: E_INVALID_ARGUMENT: give --rpc-url (http:// or https://) or set escrow.rpc_url", err=True)
        sys.exit(EXIT_CONFIG)
    try:
        deployed = deploy_escrow(url, load_or_create_wallet_key(directory))
    except ClawnodeError as error:  # the URL never appears in these
        click.echo(f"clawnode: {error.code}: {error.message}", err=True)
        sys.exit(1)
    # The arbiter is a (wallet, peer id) pair: a seller takes a single-arbiter task only when both are the
    # ones it trusts, and a dispute's case goes to the peer id. This node, run on this data dir, holds both.
    peer = str(ID.from_pubkey(load_or_create_identity(directory)[0].public_key))
    body = {
        "chain": f"eip155:{deployed.chain_id}",
        "contract": deployed.contract,
        "deployer": deployed.deployer,
        "arbiter": deployed.deployer,
        "arbiter_peer": peer,
    }
    lines = [
        f"escrow deployed at {deployed.contract} on eip155:{deployed.chain_id} (paid by {deployed.deployer})",
        "every node of this network needs in its config.toml:",
        "[escrow]",
        'mode = "rpc"',
        'rpc_url = "<this chain\'s JSON-RPC URL>"',
        f'contract = "{deployed.contract}"',
        f"chain_id = {deployed.chain_id}",
        "# whoever settles disputes, as a pair: here this node (its wallet and its peer id), if it runs on this",
        "# data dir; another arbiter's wallet and peer id otherwise (without arbiter_peer a seller refuses",
        "# single-arbiter tasks: no_trusted_arbiter).",
        f'arbiter = "{deployed.deployer}"',
        f'arbiter_peer = "{peer}"',
    ]
    _print(body, as_json, lines)


if __name__ == "__main__":
    main()
