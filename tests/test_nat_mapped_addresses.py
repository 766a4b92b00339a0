"""An IPv4 address written as IPv4-mapped IPv6 (``::ffff:a.b.c.d``, what a dual-stack socket reports
for an IPv4 peer) is judged as that IPv4 address everywhere in ``nat``: Python 3.11's ``ipaddress``
calls ``::ffff:127.0.0.1`` neither loopback nor unspecified and ``::ffff:100.64.0.1`` (CGNAT) global,
so a hole punch could leave from loopback, a CGNAT address was published as public and a peer's own
IPv4 address cost it AutoNAT v2 dial data."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair as ed25519_key_pair
from multiaddr import Multiaddr

from nat.addresses import classify, dial_back_allowed, ip_bucket, is_loopback_ip, is_public_ip, parse_ip
from nat.autonat import AutoNat, AutoNatSettings, DialBackRequest
from nat.autonat_v2_rules import Target, choose_target
from nat.holepunch import punch_source
from node.host import build_dialer_host, build_host

PEER = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"


def test_mapped_loopback_unspecified_and_cgnat_are_what_their_ipv4_is() -> None:
    assert is_loopback_ip("::ffff:127.0.0.1")
    assert classify("/ip6/::ffff:127.0.0.1/tcp/4001") == "loopback"
    assert classify("/ip6/::ffff:0.0.0.0/tcp/4001") == "other"
    assert classify("/ip6/::ffff:192.168.1.5/tcp/4001") == "private"
    assert not is_public_ip("::ffff:100.64.0.1")  # CGNAT: never reachable from outside
    assert not is_public_ip("::ffff:224.0.0.1")
    assert is_public_ip("::ffff:203.0.113.5")  # the harness' "internet", as its IPv4 form
    assert classify("/ip6/::ffff:203.0.113.5/tcp/4001") == "public"
    assert parse_ip("::ffff:10.1.2.3") == parse_ip("10.1.2.3")
    assert parse_ip("no ip") is None


def test_a_hole_punch_never_leaves_from_mapped_loopback_for_a_peer_off_loopback() -> None:
    assert punch_source("::ffff:203.0.113.5", "::ffff:127.0.0.1", [("::", 4021)]) is None
    assert punch_source("::ffff:127.0.0.1", "::ffff:127.0.0.1", [("::", 4021)]) == ("::ffff:127.0.0.1", 4021)


def test_a_peer_seen_at_its_mapped_address_pays_no_dial_data_for_its_own_ipv4() -> None:
    chosen = choose_target(
        [Multiaddr("/ip4/81.2.69.5/tcp/4001").to_bytes()],
        requester=PEER,
        observed_ip="::ffff:81.2.69.5",
        families=frozenset({4, 6}),
        allow_private=False,
        max_addrs=4,
    )
    assert chosen == Target(0, "/ip4/81.2.69.5/tcp/4001", needs_dial_data=False)


def test_an_autonat_v1_server_dials_back_a_peer_seen_at_its_mapped_address() -> None:
    server = AutoNat(build_host(ed25519_key_pair()), AutoNatSettings(), build_dialer=build_dialer_host)
    asked = DialBackRequest(addrs=["/ip4/81.2.69.5/tcp/4021"], ports=[4022])
    assert server.validate(asked, "::ffff:81.2.69.5") == (["/ip4/81.2.69.5/tcp/4021", "/ip4/81.2.69.5/tcp/4022"], {})


@given(st.ip_addresses(v=4), st.ip_addresses(v=4), st.booleans())
def test_every_classification_of_a_mapped_address_is_its_ipv4_ones(ip: object, other: object, private: bool) -> None:
    plain, mapped = str(ip), f"::ffff:{ip}"
    assert is_public_ip(mapped) == is_public_ip(plain)
    assert is_loopback_ip(mapped) == is_loopback_ip(plain)
    assert ip_bucket(mapped) == ip_bucket(plain)
    assert classify(f"/ip6/{mapped}/tcp/1") == classify(f"/ip4/{plain}/tcp/1")
    for observed in (str(other), plain):
        allowed = dial_back_allowed(plain, observed, allow_private=private)
        assert dial_back_allowed(mapped, f"::ffff:{observed}", allow_private=private) == allowed
    via_mapped = punch_source(mapped, f"::ffff:{other}", [("::", 9)])
    assert (via_mapped is None) == (punch_source(plain, str(other), [("0.0.0.0", 9)]) is None)
