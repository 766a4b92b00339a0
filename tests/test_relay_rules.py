"""The relay's per-IP reservation bound as a pure rule (``nat.relay_rules.reservation_per_ip``): the
adapter in ``nat.relay`` only fetches where the asker and the holders connected from
(tests/test_relay_reservations_per_ip.py runs it on real hosts)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

from nat.relay_rules import Peer, Refused, reservation_per_ip

FULL = Refused(StatusCode.RESOURCE_LIMIT_EXCEEDED, "reservations_per_ip")


def test_the_bound_counts_the_other_holders_in_the_askers_bucket() -> None:
    def ask(asker: Peer, holders: list[Peer], *, renewal: bool = False, exempt: bool = True) -> Refused | None:
        return reservation_per_ip(asker, holders, renewal=renewal, per_ip=2, loopback_exempt=exempt)

    home, loop = Peer("81.2.69.5"), Peer("127.0.0.1", on_loopback=True)
    holders = [home, home, Peer("81.2.69.6"), Peer(None), loop]
    assert ask(home, holders) == FULL
    assert ask(home, holders[1:]) is None
    assert ask(home, holders, renewal=True) is None
    # no IP of its own (relayed) and, while loopback is exempt, loopback: never counted
    assert ask(Peer(None), [Peer(None)] * 5) is None
    assert ask(loop, [loop] * 5) is None
    assert ask(loop, [loop] * 2, exempt=False) == FULL


_PEERS = st.one_of(
    st.none().map(Peer),
    st.sampled_from(["81.2.69.5", "81.2.69.6", "2001:db8::/64"]).map(Peer),
    st.sampled_from(["127.0.0.1", "::/64"]).map(lambda bucket: Peer(bucket, on_loopback=True)),
)


@given(arrivals=st.lists(_PEERS, max_size=30), per_ip=st.integers(1, 5), exempt=st.booleans())
def test_each_ip_gets_at_most_per_ip_and_nobody_else_is_held_back(
    arrivals: list[Peer], per_ip: int, exempt: bool
) -> None:
    """Peers arrive one by one, each a new identity asking once: every counted IP ends with exactly
    min(its arrivals, per_ip) reservations; an uncounted asker is always granted; a holder that
    renews is always granted."""
    holders: list[Peer] = []
    for peer in arrivals:
        verdict = reservation_per_ip(peer, holders, renewal=False, per_ip=per_ip, loopback_exempt=exempt)
        assert verdict in (None, FULL)
        if verdict is None:
            holders.append(peer)

    def by_ip(peers: list[Peer]) -> Counter[str]:
        return Counter(p.bucket for p in peers if p.bucket is not None and not (exempt and p.on_loopback))

    counted, granted = by_ip(arrivals), by_ip(holders)
    assert granted == Counter({bucket: min(n, per_ip) for bucket, n in counted.items()})
    assert len(holders) - sum(granted.values()) == len(arrivals) - sum(counted.values())
    for held in holders:
        others = list(holders)
        others.remove(held)
        crowded = others + [held] * 9
        assert reservation_per_ip(held, crowded, renewal=True, per_ip=per_ip, loopback_exempt=exempt) is None
