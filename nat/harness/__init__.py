"""Network-namespace NAT harness: topology, STUN-like responder, RFC 5780-style classifier.

See docs/nat.md. Linux only; needs root, iproute2 and nftables.
"""

from nat.harness.netns import NatType, Topology, cleanup_stale, missing_requirements, run_in

__all__ = ["NatType", "Topology", "cleanup_stale", "missing_requirements", "run_in"]
