"""Hypothesis-generated garbage on every protocol a node serves: no crash, no E_INTERNAL, and the
node still serves honest peers afterwards (issue 14).

A provider node (lease, infer, lease dispute, task, capability, and a gossip subscription) and a
consumer node run in one trio run with a stranger's bare libp2p host beside them (``tests.support.fuzz``).
Inputs are varint frames around JSON shaped like each protocol's wire models (wrong types, huge
numbers, deep nesting, long strings, lone surrogates, truncated text), garbage behind honest,
truncated and oversized length prefixes, and for gossip envelopes signed around such payloads.
Each protocol gets a sample over real streams (gossip: published on the topic) and the rest
through its registered handler on an in-memory stream. ``bench/fuzz.py`` runs the same with 10^4
inputs per protocol.
"""

from __future__ import annotations

from tests.support.fuzz import PROTOCOLS, fuzz_market

PER_PROTOCOL = 280
ON_STREAM = 30
SEED = 20261206


async def test_fuzzed_frames_on_every_protocol_neither_crash_nor_fail_internally() -> None:
    run = await fuzz_market(PER_PROTOCOL, ON_STREAM, SEED, progress=print)
    outcomes = run.outcomes
    assert {o.protocol for o in outcomes} == {*PROTOCOLS, "gossip"}
    assert all(o.inputs for o in outcomes)
    assert sum(o.inputs for o in outcomes) == PER_PROTOCOL * (len(PROTOCOLS) + 1)
    bad = [o for o in outcomes if o.crashes or o.internal_errors]
    assert not bad, "\n".join(f"{o.summary()}\n  " + "\n  ".join(o.failures) for o in bad)
    # The node kept answering honest peers on every protocol.
    assert run.problems == []
    # The gossip published for real reached the node's validator, which refused the garbage.
    published = next(o for o in outcomes if o.protocol == "gossip" and o.way == "stream")
    assert published.replies["rejected"] > 0
