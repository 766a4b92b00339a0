"""Which of our addresses we publish, and in which order (identify and the signed capability record).

py-libp2p dials one TCP address per peer, the first it stores, so the order is what peers try.
``rank_addrs`` decides it from plain data (a pure function, tested with hypothesis):

1. addresses AutoNAT servers reached us on (``confirmed``): known to work from outside;
2. while private, the relayed ``/p2p-circuit`` addresses (the only way in from outside);
3. public listen addresses not (yet) confirmed;
4. private (LAN, CGNAT) listen addresses: peers on the same LAN reach us there;
5. loopback only for a peer on loopback, or when we have no other direct address (a node listening
   on 127.0.0.1 only: every multi-node test): a peer elsewhere that dials our 127.0.0.1 reaches itself.

Before AutoNAT's first verdict, a node none of whose own addresses is public (``looks_private``)
already reserves on relays (``wants_relays``); its circuit addresses then come after the direct ones.

A UPnP mapping (``mapped``) is published only once AutoNAT confirms it: behind a double NAT the
home router maps a port on an address nobody outside can reach, and it used to stay first.

``install_identify_hook`` lets identify answer per asking peer: identify builds its message from
``host.get_addrs()``, which cannot know who asks; the hook tells it whether the asker is on loopback.
"""

from __future__ import annotations

import contextvars
import ipaddress
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from libp2p.abc import IHost

Reachability = Literal["public", "private", "unknown"]
AddrClass = Literal["confirmed", "relayed", "public", "private", "loopback", "mapped", "other"]

_ASKER_ON_LOOPBACK: contextvars.ContextVar[bool] = contextvars.ContextVar("asker_on_loopback", default=False)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def unmapped(ip: IPAddress) -> IPAddress:
    """``ip``, or the IPv4 address an IPv4-mapped IPv6 one (``::ffff:a.b.c.d``) stands for: what a
    dual-stack socket reports for an IPv4 peer. Python 3.11's ``ipaddress`` judges the mapped form as
    IPv6 (``::ffff:127.0.0.1`` is not loopback, ``::ffff:100.64.0.1`` is global), so every address
    classification in ``nat`` parses with ``parse_ip``, which goes through this."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_ip(text: str) -> IPAddress | None:
    """``text`` as an IP address, IPv4-mapped ones as their IPv4 address (``unmapped``); None when it is no IP."""
    try:
        return unmapped(ipaddress.ip_address(text))
    except ValueError:
        return None


def is_public_ip(ip: str) -> bool:
    parsed = parse_ip(ip)
    if parsed is None:
        return False
    if isinstance(parsed, ipaddress.IPv4Address):
        if parsed in ipaddress.ip_network("100.64.0.0/10"):
            return False  # carrier-grade NAT: is_private misses it on older Pythons
        if any(parsed in net for net in _DOCUMENTATION_V4):
            # Never routed on the internet, so harmless to accept; the netns NAT harness
            # (nat/harness) uses 203.0.113.0/24 as its "internet".
            return True
    return parsed.is_global and not parsed.is_multicast


_DOCUMENTATION_V4 = tuple(ipaddress.ip_network(net) for net in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"))


def dial_back_allowed(target_ip: str, observed_ip: str, *, allow_private: bool) -> bool:
    """Whether an AutoNAT server may dial ``target_ip`` back for a requester seen at ``observed_ip``:
    public ones always; private ones only with ``allow_private`` (tests, LANs), and even then never
    an unspecified or multicast address (``0.0.0.0`` reaches this host), a loopback one unless the
    requester itself connects over loopback (a LAN peer must not make the server dial its own
    ``127.0.0.1:<port>``), nor a link-local one other than the requester's own. IPv4-mapped IPv6
    addresses are judged as the IPv4 address they map."""
    target, observed = parse_ip(target_ip), parse_ip(observed_ip)
    if target is None or observed is None:
        return False
    if is_public_ip(str(target)):
        return True
    if not allow_private or target.is_unspecified or target.is_multicast:
        return False
    if target.is_loopback:
        return observed.is_loopback
    if target.is_link_local:
        return target == observed
    return True


def ip_of(addr: str) -> str | None:
    """The IP text of an ``/ip4|ip6/<ip>/…`` address, else None."""
    parts = addr.split("/")
    if len(parts) >= 3 and parts[1] in ("ip4", "ip6"):
        return parts[2]
    return None


def classify(addr: str) -> AddrClass:
    """What kind of address ``addr`` is by itself (``confirmed``/``mapped`` are known only from where it came)."""
    if "/p2p-circuit" in addr:
        return "relayed"
    ip = ip_of(addr)
    parsed = parse_ip(ip) if ip is not None else None
    if parsed is None:
        return "other"
    if parsed.is_loopback:
        return "loopback"
    if parsed.is_unspecified:
        return "other"
    # is_public_ip: the harness' documentation ranges count as public there too
    return "public" if is_public_ip(str(parsed)) else "private"


@dataclass(frozen=True)
class AddressInputs:
    """Plain data in: our candidate addresses by origin, the AutoNAT verdict, who asks."""

    listen: tuple[str, ...] = ()  # listen addresses, 0.0.0.0 already expanded to each interface
    mapped: tuple[str, ...] = ()  # UPnP mappings on the home router (unconfirmed unless also in confirmed)
    confirmed: tuple[str, ...] = ()  # reached by AutoNAT dial-backs (manual port forwards, working mappings)
    relayed: tuple[str, ...] = ()  # <relay>/p2p/<id>/p2p-circuit, while private
    reachability: Reachability = "unknown"
    asker_on_loopback: bool = False


def rank_addrs(inputs: AddressInputs) -> list[str]:
    """The addresses to publish, best first, each once (see the module docstring)."""
    confirmed = [a for a in inputs.confirmed if classify(a) in ("public", "private")]
    relayed = [a for a in inputs.relayed if classify(a) == "relayed"]
    # Listen addresses and whatever else came in, by class; unconfirmed mappings are left out.
    by_class: dict[AddrClass, list[str]] = {"public": [], "private": [], "loopback": [], "other": []}
    for addr in [*inputs.confirmed, *inputs.listen]:
        if addr in confirmed:
            continue
        kind = classify(addr)
        if kind in by_class:
            by_class[kind].append(addr)
    if inputs.reachability == "private":
        ordered = confirmed + relayed + by_class["public"] + by_class["private"] + by_class["other"]
    else:
        ordered = confirmed + by_class["public"] + by_class["private"] + by_class["other"] + relayed
    direct = confirmed + by_class["public"] + by_class["private"] + by_class["other"]
    if inputs.asker_on_loopback or not direct:  # relayed addresses of a loopback-only node lead to loopback
        ordered += by_class["loopback"]
    seen: set[str] = set()
    return [a for a in ordered if not (a in seen or seen.add(a))]  # type: ignore[func-returns-value]


def looks_private(addrs: Sequence[str]) -> bool:
    """Whether nothing among our own addresses (the listen addresses, 0.0.0.0 expanded: ``listen_addrs``)
    could be reached from outside: each is loopback or private (RFC 1918, CGNAT, link-local, ULA)
    and at least one is private. A loopback-only node (tests, a local dev setup) is not taken for a
    node behind a NAT; an address of another kind (a DNS name, say) may be public."""
    kinds = {classify(addr) for addr in addrs if classify(addr) != "relayed"}
    return "private" in kinds and kinds <= {"private", "loopback"}


# Before AutoNAT's first verdict a node none of whose addresses is public queries the DHT without
# serving it for at most this long (``serves_dht``).
DHT_CLIENT_BEFORE_VERDICT_S = 30.0


def wants_relays(reachability: Reachability, own_addrs: Sequence[str]) -> bool:
    """Whether to hold relay reservations (and publish their circuit addresses): while AutoNAT says
    private, and before its first verdict when ``looks_private(own_addrs)``: a home node behind a NAT
    is reachable through a relay seconds after start instead of after the verdict. Ranked after the
    direct addresses while the verdict is unknown (``rank_addrs``); dropped once it says public."""
    if reachability == "unknown":
        return looks_private(own_addrs)
    return reachability == "private"


def serves_dht(reachability: Reachability, own_addrs: Sequence[str], *, waited_s: float) -> bool:
    """Whether to serve the DHT (be in others' routing tables) rather than only query it: unless AutoNAT
    says private, and, before its first verdict, not while ``looks_private(own_addrs)`` for the first
    ``DHT_CLIENT_BEFORE_VERDICT_S`` (``waited_s``: seconds since the start). A home node that served
    from its start until its verdict (~5-15 s) was handed out in routing answers with its LAN address,
    and every lookup meanwhile (the other home nodes' first publish among them) waited out a dial to
    it. After the bound it serves as before (a network of LAN nodes only, where no AutoNAT server
    ever answers, still has a DHT); a node with a working UPnP mapping serves once AutoNAT confirms it."""
    if reachability == "unknown":
        return not looks_private(own_addrs) or waited_s >= DHT_CLIENT_BEFORE_VERDICT_S
    return reachability == "public"


# --- where the inputs come from, per host ----------------------------------------------------------


@dataclass
class AddressSources:
    """What a running node knows about its addresses; the NAT services fill it in as they start."""

    confirmed: Callable[[], list[str]] | None = None  # None: no AutoNAT runs, the extra addresses are vouched for
    reachability: Callable[[], Reachability] = lambda: "unknown"
    last_listen: list[str] = field(default_factory=list)  # what the host's address factory saw last
    # circuit addresses of our relay reservations (``nat.relay``): sent in identify beside the
    # direct ones, so peers (and the DHT answers they give) can reach a private node through its
    # relays before its signed record is out (go-libp2p's autorelay does the same)
    relayed: Callable[[], list[str]] = lambda: []
    last_extra: list[str] = field(default_factory=list)

    def candidates(self) -> list[str]:
        """Every address we might be reached on, unranked and unfiltered: what AutoNAT asks about."""
        seen: set[str] = set()
        both = self.last_extra + self.last_listen
        return [a for a in both if not (a in seen or seen.add(a))]  # type: ignore[func-returns-value]


_SOURCES: weakref.WeakKeyDictionary[IHost, AddressSources] = weakref.WeakKeyDictionary()


def sources_for(host: IHost) -> AddressSources:
    found = _SOURCES.get(host)
    if found is None:
        found = _SOURCES[host] = AddressSources()
    return found


def asker_on_loopback() -> bool:
    """Whether the peer we are answering right now (identify) reached us over loopback."""
    return _ASKER_ON_LOOPBACK.get()


def published(
    host: IHost,
    listen: Sequence[str],
    extra: Sequence[str],
    relayed: Sequence[str] = (),
    *,
    remember: bool = True,
    reachability: Reachability | None = None,
) -> list[str]:
    """Ranked addresses for ``host`` (``node.host``'s address factory: identify): ``listen`` with 0.0.0.0
    expanded, ``extra`` the mapped and confirmed ones, ``relayed`` circuit addresses (the record)."""
    sources = sources_for(host)
    if remember:
        sources.last_listen, sources.last_extra = list(listen), list(extra)
    if sources.confirmed is None:
        confirmed, mapped = list(extra), []
    else:
        known = set(sources.confirmed())
        confirmed = [a for a in extra if a in known]
        mapped = [a for a in extra if a not in known]
    return rank_addrs(
        AddressInputs(
            listen=tuple(listen),
            mapped=tuple(mapped),
            confirmed=tuple(confirmed),
            relayed=tuple(relayed),
            reachability=reachability or sources.reachability(),
            asker_on_loopback=asker_on_loopback(),
        )
    )


def record_addrs(host: IHost, relayed: Sequence[str], reachability: Reachability | None = None) -> list[str]:
    """The addresses for the signed capability record: as identify ranks them for a peer that is not
    on loopback, with the relayed ones where they belong (first while private). ``reachability``:
    what the record declares (a configured ``node.reachability`` wins over AutoNAT's verdict)."""
    token = _ASKER_ON_LOOPBACK.set(False)
    try:
        plain = [str(addr).split("/p2p/")[0] for addr in host.get_addrs() if not is_relayed(str(addr))]
        sources = sources_for(host)
        if not (sources.last_listen or sources.last_extra):  # a host without node.host's factory
            return rank_addrs(
                AddressInputs(listen=tuple(plain), relayed=tuple(relayed), reachability=reachability or "unknown")
            )
        return published(
            host, sources.last_listen, sources.last_extra, relayed, remember=False, reachability=reachability
        )
    finally:
        _ASKER_ON_LOOPBACK.reset(token)


_HOOKED = False


def install_identify_hook() -> None:
    """Make py-libp2p's identify (and identify push) build its message knowing whether the asking
    peer is on loopback: its observed address, which identify computes anyway, says so."""
    global _HOOKED
    if _HOOKED:
        return
    from libp2p.identity.identify import identify as identify_module
    from libp2p.identity.identify_push import identify_push as push_module

    original = identify_module._mk_identify_protobuf

    def per_asker(host: IHost, observed_multiaddr: Any) -> Any:
        on_loopback = observed_multiaddr is not None and classify(str(observed_multiaddr)) == "loopback"
        token = _ASKER_ON_LOOPBACK.set(on_loopback)
        try:
            return original(host, observed_multiaddr)
        finally:
            _ASKER_ON_LOOPBACK.reset(token)

    identify_module._mk_identify_protobuf = per_asker
    push_module._mk_identify_protobuf = per_asker  # type: ignore[attr-defined]
    _HOOKED = True


def advertise_relayed(host: IHost) -> None:
    """Make ``host.get_addrs()`` end with our circuit addresses (at most ``MAX_RELAYED_ADVERTISED``),
    as go-libp2p's autorelay advertises them: identify, identify push and the signed peer record
    py-libp2p sends with DHT messages then name them, so peers (and the DHT answers they give) can
    reach a private node through its relays before its capability record is out. Last, so the first
    address stays a direct one (``host.connect`` never dials a circuit address; py-libp2p's swarm
    dials one address per transport kind at once). Added after py-libp2p's own ``get_addrs``, which
    would cut a circuit address at the relay's ``/p2p/`` part."""
    original = host.get_addrs
    sources = sources_for(host)

    def get_addrs() -> list[Any]:
        import multiaddr

        addrs = list(original())
        seen = {str(addr) for addr in addrs}
        suffix = f"/p2p/{host.get_id()}"
        for circuit in sources.relayed()[:MAX_RELAYED_ADVERTISED]:
            text = circuit if circuit.endswith(suffix) else circuit + suffix
            if text in seen:
                continue
            try:
                addrs.append(multiaddr.Multiaddr(text))
            except Exception:  # noqa: BLE001 - a relay's bad address is not advertised
                continue
            seen.add(text)
        return addrs

    host.get_addrs = get_addrs  # type: ignore[method-assign]


def is_relayed(addr: str) -> bool:
    return "/p2p-circuit" in addr


MAX_RELAYED_ADVERTISED = 8


def listen_addrs(host: IHost) -> list[str]:
    """``host``'s own listen addresses (0.0.0.0 expanded), without mappings or confirmed ones: what
    ``wants_relays`` judges (an unconfirmed UPnP mapping may lead nowhere, e.g. behind a double NAT)."""
    advertised = [str(addr).split("/p2p/")[0] for addr in host.get_addrs() if not is_relayed(str(addr))]
    return list(sources_for(host).last_listen) or advertised  # (the call refreshed the factory's view)


def candidate_addrs(host: IHost) -> list[str]:
    """Every address ``host`` might be reached on, unranked (mapped ones included): what AutoNAT
    asks servers to dial back, so that an unconfirmed mapping can become a confirmed one."""
    advertised = [str(addr).split("/p2p/")[0] for addr in host.get_addrs() if not is_relayed(str(addr))]
    found = sources_for(host).candidates()  # (the call above refreshed the factory's view)
    return found or advertised


def ip_bucket(address: str) -> str | None:
    """The bucket one remote address is counted in by per-IP bounds: the IPv4 address (an IPv4-mapped IPv6
    address counts as its IPv4 one) or the IPv6 /64, since one home or host usually holds a whole /64;
    None when ``address`` is no IP."""
    ip = parse_ip(address.split("%")[0])
    if ip is None:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def is_loopback_ip(address: str) -> bool:
    """Whether ``address`` is a loopback IP (an IPv4-mapped one included); False when it is no IP."""
    ip = parse_ip(address.split("%")[0])
    return ip is not None and ip.is_loopback
