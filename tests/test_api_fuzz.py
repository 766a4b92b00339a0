"""Hypothesis-drawn hostile requests against every route of a real node's API (issue 14).

A full ``Node`` (libp2p host, DHT, ledger, embedded escrow chain, a served capability) runs in this
trio run; its API app, built by the same ``create_app`` as the daemon's, takes a few hundred
requests straight through ASGI: any path of its route table (or none), any method, query strings
with huge and malformed numbers, right and wrong tokens and Host headers, odd content types and
lengths, bodies from mutated route samples to deep nesting and raw bytes. Zero exceptions may
escape, zero 500s or ``E_INTERNAL``, every error has a stable code, no log line at INFO or above
carries a traceback. ``bench/fuzz_api.py`` runs the same with more inputs.
"""

from __future__ import annotations

import trio

from node.api import create_app
from node.datadir import read_api_token
from tests.support.api_fuzz import fuzz_app, known_values, route_table, watching_logs
from tests.support.market import WORD_OFFER, market_nodes

INPUTS = 600  # about 6 s here, under 20 s on a loaded 2-core machine


async def test_no_request_gets_a_500_a_traceback_or_an_unstable_code() -> None:
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}]) as (nodes, _):
        provider, node = nodes
        assert node.escrow_client is not None
        known = known_values(str(provider.host.get_id()), node.escrow_client.account.address)
        token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
        app = create_app(node, token)
        assert len(route_table(app)) >= 40  # every route of the API is a target
        with watching_logs(token) as logs:
            report = await fuzz_app(app, token, INPUTS, known=known)
    assert report.inputs == INPUTS
    assert report.crashes == 0, report.problems
    assert report.internal_errors == 0, report.problems
    assert report.problems == []
    assert logs.findings == []
    # The run reached the handlers, not only the guard's refusals.
    assert report.statuses.get(200, 0) > 10 and report.statuses.get(400, 0) > 10, report.statuses
