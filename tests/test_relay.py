"""Circuit relay v2 on loopback: two relay nodes, a node forced private, a client that knows only circuits."""

from __future__ import annotations

import time
from pathlib import Path

import multiaddr
import trio
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

from dht.capability import fetch_sealed_record
from dht.offers import Offer
from dht.records import verify_record
from nat.relay import RelayRefused, RelayService, RelaySettings, is_circuit, reserve
from node.config import ApiSection, BootstrapSection, Config, EscrowSection, NodeSection, RelaySection
from node.daemon import Node
from node.host import build_host
from tests.support.market import metric_samples

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


def config(role: str, reachability: str = "unknown", relay: RelaySection | None = None) -> Config:
    return Config(
        node=NodeSection(listen=["/ip4/127.0.0.1/tcp/0"], role=role, reachability=reachability),  # type: ignore[call-arg, arg-type]
        api=ApiSection(port=0),
        bootstrap=BootstrapSection(peers=[], use_defaults=False),
        escrow=EscrowSection(mode="off"),  # type: ignore[call-arg]
        relay=relay or RelaySection(),  # type: ignore[call-arg]
    )


async def _samples(node: Node) -> dict[str, float]:
    """The node's /metrics body, parsed by Prometheus's own parser: sample name{labels} → value."""
    return metric_samples((await node.metrics()).decode())


async def test_private_node_is_reached_through_relays(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        # Relay 1 takes one reservation at most; both hand out 3 s reservations.
        relay1 = Node(
            config("relay", relay=RelaySection(max_reservations=1, reservation_ttl_s=3)),  # type: ignore[call-arg]
            tmp_path / "relay1",
        )
        relay2 = Node(config("relay", relay=RelaySection(reservation_ttl_s=3)), tmp_path / "relay2")  # type: ignore[call-arg]
        for relay in (relay1, relay2):
            await nursery.start(relay.run)
        relays = [relay1.listen_addrs()[0], relay2.listen_addrs()[0]]
        private = Node(
            config("node", "private", RelaySection(static_relays=relays, renew_fraction=0.5)),  # type: ignore[call-arg]
            tmp_path / "private",
        )
        await nursery.start(private.run)
        relay_ids = {str(relay1.host.get_id()), str(relay2.host.get_id())}

        # Reservations on both relays, renewed before their 3 s TTL runs out.
        with trio.fail_after(15):
            while {r.relay for r in private.status().relay_reservations if r.renewals >= 2} != relay_ids:
                await trio.sleep(0.1)
        status = private.status()
        assert all(r.expires_at > time.time() for r in status.relay_reservations)
        assert relay1.status().relay_hop_reservations == 1 and status.relay_hop_reservations is None
        # The same, as an operator graphs it.
        private_metrics = await _samples(private)
        assert private_metrics["clawnode_relay_reservations"] == 2
        assert private_metrics['clawnode_reachability{verdict="private"}'] == 1
        assert private_metrics["clawnode_relay_reservation_renewals"] >= 4
        assert (await _samples(relay1))["clawnode_relay_hop_reservations"] == 1
        expected = {f"{addr}/p2p-circuit" for addr in relays}
        assert set(status.relayed_addrs) == expected
        assert private.publisher.record is not None and expected <= set(private.publisher.record.addrs)
        # Identify names them too (pushed as reservations change): peers, and the DHT answers they
        # give, can reach the private node through a relay before its record is out.
        private_id = private.host.get_id()
        with trio.fail_after(10):
            while not expected <= {
                str(a).removesuffix(f"/p2p/{private_id}") for a in relay2.host.get_peerstore().addrs(private_id)
            }:
                await trio.sleep(0.1)

        # A client that knows the private node only by one relayed address reaches it through relay 2.
        client = build_host(create_new_key_pair())
        async with client.run(LOOPBACK):
            await nursery.start(RelayService(client, RelaySettings(), serve_hop=False).run)
            private_id = private.host.get_id()
            via_relay2 = multiaddr.Multiaddr(f"{relays[1]}/p2p-circuit")
            client.get_peerstore().add_addrs(private_id, [via_relay2], 60)
            assert all(is_circuit(addr) for addr in client.get_peerstore().addrs(private_id))
            sealed, _rtt = await fetch_sealed_record(client, private_id)
            record = verify_record(sealed, now=time.time())
            assert record.peer_id == str(private_id) and expected <= set(record.addrs)
            assert client.get_network().get_connections(private_id)

            # Relay 1 is full: one more reservation than it allows is refused.
            relay1_info = info_from_p2p_addr(multiaddr.Multiaddr(relays[0]))
            await client.connect(relay1_info)
            try:
                await reserve(client, relay1_info.peer_id)
            except RelayRefused as refused:
                assert refused.status == int(StatusCode.RESOURCE_LIMIT_EXCEEDED)
            else:
                raise AssertionError("relay 1 accepted a reservation over its limit")
            assert (await reserve(client, ID.from_base58(str(relay2.host.get_id())))).expires_at > time.time()
        nursery.cancel_scope.cancel()


async def test_a_relayed_connection_is_upgraded_by_hole_punching(tmp_path: Path) -> None:
    """A consumer that knows a private provider only from its signed record reaches it through a
    relay, then DCUtR turns that into a direct connection which new streams use (loopback: every
    address is dialable, so the punch always succeeds here; the NAT matrix shows where it fails)."""
    async with trio.open_nursery() as nursery:
        relays = []
        for name in ("relay1", "relay2"):
            relay = Node(config("relay"), tmp_path / name)
            await nursery.start(relay.run)
            relays.append(relay.listen_addrs()[0])
        private_config = config("node", "private", RelaySection(static_relays=relays)).model_copy(  # type: ignore[call-arg]
            update={
                "bootstrap": BootstrapSection(peers=relays, use_defaults=False),
                "offers": [Offer(name="model:probe", price_per_unit=1)],  # type: ignore[call-arg]
            }
        )
        private = Node(private_config, tmp_path / "private")
        await nursery.start(private.run)
        # Private too, so it is a DHT client: the provider's own DHT queries never dial it.
        consumer_config = config("node", "private").model_copy(
            update={"bootstrap": BootstrapSection(peers=relays, use_defaults=False)}
        )
        consumer = Node(consumer_config, tmp_path / "consumer")
        await nursery.start(consumer.run)
        private_id = private.host.get_id()
        with trio.fail_after(30):
            while not (private.publisher.published_at and len(private.relayed_addrs()) == 2):
                await trio.sleep(0.1)
        assert not private.dht.serving  # private: it asks the DHT, nobody routes through it

        # On loopback the provider's own address works too: a consumer that learned it elsewhere
        # (DHT answers) would simply dial it, and py-libp2p's auto-connectors dial every known
        # peer until they hold 8 connections (behind a NAT that would give a direct connection,
        # and no punch would be needed). Not connected and knowing nothing, the consumer goes by
        # the signed record: relays first, as it must behind a real NAT. A background dial can
        # still win the race on loopback: then the precondition is set up again (3 tries).
        for node in (private, consumer):
            await node.host.get_network().auto_connector.stop()  # type: ignore[attr-defined]
        assert consumer.relay is not None
        for _attempt in range(3):
            if consumer.host.get_network().get_connections(private_id):
                await consumer.host.disconnect(private_id)
            consumer.host.get_peerstore().clear_addrs(private_id)
            described = await consumer.describe(str(private_id))
            assert described.reachable and described.record.peer_id == str(private_id)
            if consumer.relay.dials["ok"] >= 1:
                break
        assert consumer.relay.dials["ok"] >= 1, "every try found a direct connection already there"
        with trio.fail_after(20):
            while consumer.holepunch is None or consumer.holepunch.counts["direct"] < 1:
                await trio.sleep(0.1)
        entry = next(p for p in consumer.peers().peers if p.peer_id == str(private_id))
        assert entry.connection == "direct" and entry.hole_punched
        # As the DCUtR spec says: the private node, which received the relayed connection, started
        # the exchange; the consumer, which dialed through the relay, answered (a js-libp2p dialer
        # only answers).
        assert private.holepunch is not None and private.holepunch.initiated >= 1
        assert consumer.holepunch.answered >= 1 and consumer.holepunch.initiated == 0
        # New streams take the direct connection.
        sealed, _rtt = await fetch_sealed_record(consumer.host, private_id)
        assert verify_record(sealed, now=time.time()).peer_id == str(private_id)
        metrics = await _samples(consumer)
        assert metrics['clawnode_relay_dials_total{outcome="ok"}'] >= 1
        assert metrics['clawnode_hole_punches_total{outcome="direct"}'] == 1
        assert metrics['clawnode_hole_punches_total{outcome="failed"}'] == 0
        assert metrics["clawnode_hole_punch_seconds_count"] == 1
        assert metrics['clawnode_connections{path="direct"}'] >= 1
        status = consumer.status()
        assert status.hole_punch is not None and status.hole_punch.direct == 1
        assert private.status().reached_by.startswith("relay")
        nursery.cancel_scope.cancel()


async def test_a_relay_cuts_a_circuit_at_its_data_limit_and_counts_it(tmp_path: Path) -> None:
    """A relay that lets a circuit carry 1 KiB: reaching a private node through it (Noise,
    identify and a record fetch are several KiB) fails, and the relay's /metrics says why."""
    async with trio.open_nursery() as nursery:
        relay = Node(config("relay", relay=RelaySection(max_circuit_bytes=1024)), tmp_path / "relay")  # type: ignore[call-arg]
        await nursery.start(relay.run)
        relay_addr = relay.listen_addrs()[0]
        private = Node(
            config("node", "private", RelaySection(static_relays=[relay_addr], min_relays=1)),  # type: ignore[call-arg]
            tmp_path / "private",
        )
        await nursery.start(private.run)
        with trio.fail_after(15):
            while not private.relayed_addrs():
                await trio.sleep(0.1)
        client = build_host(create_new_key_pair())
        async with client.run(LOOPBACK):
            await nursery.start(RelayService(client, RelaySettings(), serve_hop=False).run)
            private_id = private.host.get_id()
            client.get_peerstore().add_addrs(private_id, [multiaddr.Multiaddr(f"{relay_addr}/p2p-circuit")], 60)
            with trio.fail_after(60):
                while (await _samples(relay)).get('clawnode_relay_circuits_cut_total{limit="data"}', 0) < 1:
                    with trio.move_on_after(10):
                        try:
                            await fetch_sealed_record(client, private_id)
                        except Exception:  # noqa: BLE001 - the cut circuit fails the fetch, as it should
                            pass
                    await trio.sleep(0.2)
        metrics = await _samples(relay)
        assert metrics['clawnode_relay_circuits_cut_total{limit="data"}'] >= 1
        assert metrics['clawnode_relay_circuits_cut_total{limit="duration"}'] == 0
        assert 0 < metrics["clawnode_relay_circuit_bytes_total"]
        nursery.cancel_scope.cancel()
