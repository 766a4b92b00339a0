"""AutoNAT v1's dial-back rule (``nat.autonat_rules.dial_back_targets``) over plain data."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nat.addresses import parse_ip
from nat.autonat_rules import dial_back_targets
from runtime.errors import ClawnodeError, ErrorCode

PUBLIC = "81.2.69.5"


def test_only_the_requesters_own_ip_is_dialed() -> None:
    targets, refused = dial_back_targets(
        [f"/ip4/{PUBLIC}/tcp/4021/p2p/QmPeer", "/ip4/81.2.69.6/tcp/4021"],
        [4022],
        PUBLIC,
        max_addrs=8,
        allow_private=False,
    )
    assert targets == [f"/ip4/{PUBLIC}/tcp/4021", f"/ip4/{PUBLIC}/tcp/4022"]
    assert refused == {"/ip4/81.2.69.6/tcp/4021": "not the requester's observed IP"}


@pytest.mark.parametrize(
    ("addrs", "ports", "observed", "code"),
    [
        ([], [], PUBLIC, ErrorCode.INVALID_ARGUMENT),  # nothing asked
        (["/dns4/example.com/tcp/1"], [], PUBLIC, ErrorCode.INVALID_ARGUMENT),  # not ip/tcp
        ([], list(range(1, 10)), PUBLIC, ErrorCode.INVALID_ARGUMENT),  # over the bound
        ([], [4021], "", ErrorCode.FORBIDDEN),  # a relayed stream: no observed address
        (["/ip4/10.0.0.2/tcp/4021"], [], "10.0.0.2", ErrorCode.FORBIDDEN),  # private, not allowed
        (["/ip4/1.1.1.1/tcp/4021"], [], PUBLIC, ErrorCode.FORBIDDEN),  # only a third party
    ],
)
def test_refusals_carry_a_stable_code(addrs: list[str], ports: list[int], observed: str, code: ErrorCode) -> None:
    with pytest.raises(ClawnodeError) as refused:
        dial_back_targets(addrs, ports, observed, max_addrs=8, allow_private=False)
    assert refused.value.code is code


@given(
    st.lists(st.sampled_from([PUBLIC, "81.2.69.6", "10.0.0.2", "127.0.0.1", "::ffff:81.2.69.5"]), max_size=4),
    st.lists(st.integers(1, 65535), max_size=3),
    st.sampled_from([PUBLIC, "::ffff:81.2.69.5", "10.0.0.2"]),
    st.booleans(),
)
def test_never_a_third_party_or_an_unallowed_private_address(
    ips: list[str], ports: list[int], observed: str, allow_private: bool
) -> None:
    addrs = [f"/ip{'6' if ':' in ip else '4'}/{ip}/tcp/4021" for ip in ips]
    try:
        targets, _ = dial_back_targets(addrs, ports, observed, max_addrs=8, allow_private=allow_private)
    except ClawnodeError:
        return
    # an IPv4-mapped IPv6 address is the same host as its IPv4 address
    for target in targets:
        assert parse_ip(target.split("/")[2]) == parse_ip(observed)
        assert allow_private or not str(parse_ip(observed)).startswith("10.")
