"""RFC 5780-style NAT behaviour discovery: does a router behave as its label says?

From a LAN host behind the router (``python -m nat.harness.stun probe`` inside its namespace), against
the helpers' responders (``Topology.start_stun``):

- mapping: one UDP socket asks helper 1 (``ip1:3478``), helper 2 (``ip2:3478``) and helper 1's
  other port (``ip1:3479``) which source they saw. All equal: endpoint-independent (EIM); equal for
  the same IP only: address-dependent (ADM); all different: address-and-port-dependent (APDM).
- filtering: from fresh sockets, helper 1 is asked to answer from helper 2's address (arrives:
  endpoint-independent filtering, EIF), and from its other port (arrives: address-dependent,
  ADF); neither arrives: address-and-port-dependent (APDF). A plain request is the control.
- TCP: two connections from the same local port to helper 1 and helper 2: mapping kept or not.

Labels: EIM+EIF full-cone, EIM+ADF address-restricted, EIM+APDF port-restricted, any other
mapping symmetric.
"""

from __future__ import annotations

import enum
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from nat.harness.netns import REPO_ROOT, STUN_ALT_PORT, STUN_PORT, HarnessError, NatType, Topology


class Mapping(enum.StrEnum):
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


class Filtering(enum.StrEnum):
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


@dataclass
class Classification:
    router: str
    nat_type: NatType
    mapping: Mapping
    filtering: Filtering
    tcp_mapping: Mapping | None  # None when the TCP probes got no answer
    external_ip: str | None
    evidence: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.router}: {self.nat_type} (mapping {self.mapping}, filtering {self.filtering}, "
            f"tcp mapping {self.tcp_mapping}, external ip {self.external_ip})"
        )


def _ip(addr: str | None) -> str | None:
    return addr.rpartition(":")[0] if addr else None


def mapping_behaviour(primary: str, other_ip: str, other_port: str) -> Mapping:
    if primary == other_ip == other_port:
        return Mapping.ENDPOINT_INDEPENDENT
    if primary == other_port:
        return Mapping.ADDRESS_DEPENDENT
    return Mapping.ADDRESS_AND_PORT_DEPENDENT


def label(mapping: Mapping, filtering: Filtering) -> NatType:
    if mapping is not Mapping.ENDPOINT_INDEPENDENT:
        return NatType.SYMMETRIC
    return {
        Filtering.ENDPOINT_INDEPENDENT: NatType.FULL_CONE,
        Filtering.ADDRESS_DEPENDENT: NatType.ADDRESS_RESTRICTED,
        Filtering.ADDRESS_AND_PORT_DEPENDENT: NatType.PORT_RESTRICTED,
    }[filtering]


def interpret(
    router: str, evidence: dict[str, Any], *, primary_ip: str, other_ip: str, alt_port: int
) -> Classification:
    """Turn the probe evidence into a Classification (raises HarnessError when it is unusable)."""
    m = evidence["mapping"]
    if not (m.get("primary") and m.get("other_ip") and m.get("other_port")):
        raise HarnessError(f"{router}: mapping probes unanswered: {m}")
    mapping = mapping_behaviour(m["primary"], m["other_ip"], m["other_port"])

    f = evidence["filtering"]
    if not f.get("control"):
        raise HarnessError(f"{router}: control probe unanswered: {f}")
    change_ip, change_port = f.get("change_ip"), f.get("change_port")
    # an answer only counts if it really came from where it was asked to come from
    if change_ip and _ip(change_ip["src"]) == other_ip:
        filtering = Filtering.ENDPOINT_INDEPENDENT
    elif change_port and change_port["src"] == f"{primary_ip}:{alt_port}":
        filtering = Filtering.ADDRESS_DEPENDENT
    else:
        filtering = Filtering.ADDRESS_AND_PORT_DEPENDENT

    t = evidence.get("tcp", {})
    tcp_mapping: Mapping | None = None
    if t.get("primary") and t.get("other_ip"):
        tcp_mapping = (
            Mapping.ENDPOINT_INDEPENDENT if t["primary"] == t["other_ip"] else Mapping.ADDRESS_AND_PORT_DEPENDENT
        )
    return Classification(
        router=router,
        nat_type=label(mapping, filtering),
        mapping=mapping,
        filtering=filtering,
        tcp_mapping=tcp_mapping,
        external_ip=_ip(m["primary"]),
        evidence=evidence,
    )


def classify(topology: Topology, router: str, *, host: int = 0, timeout: float = 1.0) -> Classification:
    """Classify ``router`` by probing from its LAN host number ``host``; ``.nat_type`` is the label.

    Blocking (runs a probe process in the host's namespace); from trio use ``trio.to_thread``.
    """
    topology.start_stun()
    r = topology.router(router)
    lan_host = r.hosts[host]
    h1, h2 = topology.helpers[0], topology.helpers[1]
    argv = [
        sys.executable,
        "-m",
        "nat.harness.stun",
        "probe",
        "--primary",
        f"{h1.ip}:{STUN_PORT}",
        "--alt-port",
        str(STUN_ALT_PORT),
        "--other",
        f"{h2.ip}:{STUN_PORT}",
        "--timeout",
        str(timeout),
    ]
    proc = topology.exec_in(lan_host.ns, ["env", f"PYTHONPATH={REPO_ROOT}", *argv], timeout=30)
    evidence = json.loads(proc.stdout)
    return interpret(router, evidence, primary_ip=h1.ip, other_ip=h2.ip, alt_port=STUN_ALT_PORT)
