"""Is the UPnP router itself behind another NAT (a carrier-grade NAT, a second home router)?

A pure rule over plain facts (``judge_double_nat``): what the IGD says its external address is,
whether it holds a live mapping of our listen port and since when, and what the outside saw of us
(the IPs AutoNAT servers saw our requests come from, the measured verdict and when it was made).

- the IGD's external address is not public (RFC 1918, carrier-grade 100.64.0.0/10, link-local,
  loopback): the router is behind another NAT (``igd_address_private``);
- the IGD's external address is public but AutoNAT servers saw us come from another one: something
  between the router and the internet translates again (``igd_address_differs``);
- the IGD holds a mapping, AutoNAT servers dialed its address since it was made, and the verdict
  is private: the
  mapped port does not reach us from outside (``mapping_unreachable``; an upstream NAT that keeps
  the address, e.g. miniupnpd behind a carrier NAT learning its external address by STUN, or a
  firewall in front of the router).

The mapping is never published as a public address unless AutoNAT confirms it (``nat.addresses``);
for the first two reasons it is not even offered to AutoNAT (servers dial only the address they
see us at, so asking about the IGD's would only be refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nat.addresses import Reachability, is_public_ip

DoubleNatReason = Literal["igd_address_private", "igd_address_differs", "mapping_unreachable"]


@dataclass(frozen=True)
class OutsideView:
    """What the outside told us about ourselves (AutoNAT)."""

    observed_ips: tuple[str, ...] = ()  # the IPs servers saw our requests come from
    reachability: Reachability = "unknown"  # the measured verdict (not a configured one)
    # (address, unix time) for each address a server dialed for that verdict, the latest dial
    tested: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class DoubleNatFacts:
    igd_external_ip: str | None  # what the IGD reports (None: no IGD, or it reports none)
    # (/ip4/<external ip>/tcp/<port>, unix time it was made) for each live TCP mapping
    mapped: tuple[tuple[str, float], ...] = ()
    outside: OutsideView = OutsideView()


@dataclass(frozen=True)
class DoubleNat:
    detected: bool
    reason: DoubleNatReason | None = None

    @property
    def offer_mapping(self) -> bool:
        """Whether the IGD's mappings may be offered as our addresses (to AutoNAT, which must
        confirm one before peers see it)."""
        return self.reason not in ("igd_address_private", "igd_address_differs")


def judge_double_nat(facts: DoubleNatFacts) -> DoubleNat:
    """The rule in the module docstring."""
    external = facts.igd_external_ip
    if not external:
        return DoubleNat(False)
    if not is_public_ip(external):
        return DoubleNat(True, "igd_address_private")
    outside = facts.outside
    observed = {ip for ip in outside.observed_ips if is_public_ip(ip)}
    if observed and external not in observed:
        return DoubleNat(True, "igd_address_differs")
    # A dial made before the mapping existed says nothing about it.
    tested = dict(outside.tested)
    if outside.reachability == "private" and any(tested.get(addr, -1.0) >= made for addr, made in facts.mapped):
        return DoubleNat(True, "mapping_unreachable")
    return DoubleNat(False)
