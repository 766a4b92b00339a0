"""A call served without a commitment by design never uses up its provider's forgiven unproved cut.

Pure rules (``protocols.machines.lease_consumer``) and the predicate the consumer feeds them
(``runtime.verify.provider.verifiable``): an honest provider whose tool call (never proved: tools,
grammars, ``n`` > 1 carry no commitment) fails after its text must still have its one forgiven cut left
for a verifiable call it cannot prove (a broken connection).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocols.machines.lease_consumer import CUT_ENDINGS, CallEnding, cut_forgiven, unproved_cut
from runtime.verify.provider import verifiable

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
TOOLS = {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}


def test_a_tool_call_cut_after_its_text_leaves_the_forgiven_cut_to_the_next_verifiable_call() -> None:
    earlier = 0
    # The tool call's error frame after text, without a proof: not counted.
    if unproved_cut(CallEnding.ERROR, 5, False, committed=verifiable(TOOLS)):
        earlier += 1
    assert earlier == 0
    # A verifiable call then cut without a proof (a broken connection): still let go.
    assert unproved_cut(CallEnding.STOPPED, 5, False, committed=verifiable(CHAT))
    assert cut_forgiven(CallEnding.STOPPED, False, earlier)


@given(st.sampled_from(list(CallEnding)), st.integers(0, 50), st.booleans())
def test_an_uncommitted_call_is_never_an_unproved_cut(ending: CallEnding, tokens: int, proof: bool) -> None:
    assert not unproved_cut(ending, tokens, proof, committed=False)
    # A committed one is counted exactly as before.
    assert unproved_cut(ending, tokens, proof) == unproved_cut(ending, tokens, proof, committed=True)
    if ending in CUT_ENDINGS and not proof and tokens > 0:
        assert unproved_cut(ending, tokens, proof)
