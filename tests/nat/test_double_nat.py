"""Double NAT: the pure rule (nat.double_nat) and what UpnpService shows and offers because of it.

No root needed: the IGD is a stand-in ``PortMapper`` (the real miniupnpd behind a carrier-grade NAT
is in the NAT matrix, ``tests/nat/test_matrix.py``).
"""

from __future__ import annotations

import pytest
import trio

from nat.double_nat import DoubleNatFacts, OutsideView, judge_double_nat
from nat.upnp import PortMapper, UpnpService, UpnpSettings

CARRIER = "203.0.113.151"  # the carrier's public address: what AutoNAT servers see
MAPPED = f"/ip4/{CARRIER}/tcp/4021"


@pytest.mark.parametrize(
    ("external", "reason"),
    [
        ("100.64.1.2", "igd_address_private"),  # carrier-grade NAT (RFC 6598)
        ("100.127.255.254", "igd_address_private"),
        ("10.0.0.2", "igd_address_private"),
        ("172.16.5.1", "igd_address_private"),
        ("192.168.0.254", "igd_address_private"),
        ("169.254.1.1", "igd_address_private"),
        ("81.2.69.5", None),  # public, nothing else known
        (None, None),  # no IGD
    ],
)
def test_the_igds_own_word(external: str | None, reason: str | None) -> None:
    verdict = judge_double_nat(DoubleNatFacts(igd_external_ip=external))
    assert verdict.detected is (reason is not None)
    assert verdict.reason == reason
    assert verdict.offer_mapping is (reason is None)


def test_an_igd_address_the_outside_does_not_see_us_at() -> None:
    seen_elsewhere = OutsideView(observed_ips=(CARRIER,), reachability="private")
    verdict = judge_double_nat(DoubleNatFacts(igd_external_ip="81.2.69.5", outside=seen_elsewhere))
    assert (verdict.detected, verdict.reason, verdict.offer_mapping) == (True, "igd_address_differs", False)
    # the same address outside and on the IGD: one NAT
    same = OutsideView(observed_ips=("81.2.69.5",), reachability="public")
    assert not judge_double_nat(DoubleNatFacts(igd_external_ip="81.2.69.5", outside=same)).detected
    # private observed addresses (a server on our LAN) say nothing about the internet
    lan = OutsideView(observed_ips=("192.168.1.10",))
    assert not judge_double_nat(DoubleNatFacts(igd_external_ip="81.2.69.5", outside=lan)).detected


def test_a_mapping_the_servers_could_not_reach() -> None:
    mapped = ((MAPPED, 100.0),)
    tested_after = OutsideView(observed_ips=(CARRIER,), reachability="private", tested=((MAPPED, 105.0),))
    verdict = judge_double_nat(DoubleNatFacts(igd_external_ip=CARRIER, mapped=mapped, outside=tested_after))
    assert (verdict.detected, verdict.reason) == (True, "mapping_unreachable")
    assert verdict.offer_mapping  # AutoNAT keeps asking about it (peers see it only once confirmed)
    # dialed before the mapping existed: says nothing about it
    tested_before = OutsideView(observed_ips=(CARRIER,), reachability="private", tested=((MAPPED, 99.0),))
    assert not judge_double_nat(DoubleNatFacts(igd_external_ip=CARRIER, mapped=mapped, outside=tested_before)).detected
    # reached: public, one NAT
    reached = OutsideView(observed_ips=(CARRIER,), reachability="public", tested=((MAPPED, 105.0),))
    assert not judge_double_nat(DoubleNatFacts(igd_external_ip=CARRIER, mapped=mapped, outside=reached)).detected
    # another port was dialed, not the mapping
    other = OutsideView(reachability="private", tested=((f"/ip4/{CARRIER}/tcp/9999", 105.0),))
    assert not judge_double_nat(DoubleNatFacts(igd_external_ip=CARRIER, mapped=mapped, outside=other)).detected


class _Igd(PortMapper):
    """An IGD that maps anything and reports ``external`` as its external address."""

    def __init__(self, external: str) -> None:  # no miniupnpc: nothing is sent anywhere
        self.external = external
        self.lan_ip = "192.168.1.10"

    def search(self) -> None:
        return None

    def select(self) -> str:
        return "192.168.1.10"

    def external_ip(self) -> str:
        return self.external

    def map(
        self, proto: str, internal_port: int, lease_s: int, *, preferred: int | None = None, attempts: int = 4
    ) -> int:  # type: ignore[override]
        return preferred or internal_port

    def refresh(self, proto: str, external_port: int, internal_port: int, lease_s: int) -> None:  # type: ignore[override]
        return None

    def delete(self, proto: str, external_port: int) -> None:  # type: ignore[override]
        return None


async def _mapped_service(external: str, outside: OutsideView) -> tuple[dict[str, object], list[str]]:
    service = UpnpService(
        UpnpSettings(),
        lambda: [4021],
        mapper_factory=lambda settings: _Igd(external),
        outside=lambda: outside,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        with trio.fail_after(5):
            while service.state != "mapped":
                await trio.sleep(0.01)
        summary, addrs = service.summary(), service.external_addrs()
        nursery.cancel_scope.cancel()
    return summary, addrs


@pytest.mark.parametrize(
    ("external", "observed", "double", "reason"),
    [
        ("100.64.1.2", (), True, "igd_address_private"),
        ("81.2.69.5", (CARRIER,), True, "igd_address_differs"),
        (CARRIER, (CARRIER,), False, None),
    ],
)
def test_status_shows_it_and_the_mapping_is_not_offered(
    external: str, observed: tuple[str, ...], double: bool, reason: str | None
) -> None:
    summary, addrs = trio.run(_mapped_service, external, OutsideView(observed_ips=observed))
    assert summary["double_nat"] is double and summary["double_nat_reason"] == reason
    assert summary["external_ip"] == external  # what the IGD said, shown as it is
    assert addrs == ([] if double else [f"/ip4/{external}/tcp/4021"])
