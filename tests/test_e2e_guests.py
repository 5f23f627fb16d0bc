"""End to end with traffic: namespace guests exchanging real frames via the broker."""

from __future__ import annotations

import ipaddress

import pytest

from vmnet_broker import Client
from vmnet_broker.guest import Guest


def address(net, host: int) -> str:
    subnet = ipaddress.IPv4Network(f"{net.subnet}/{net.mask}")
    return f"{subnet.network_address + host}/{subnet.prefixlen}"


def ip_of(cidr: str) -> str:
    return cidr.split("/")[0]


def start_guest(client, guests, network_name: str, host: int, **attach) -> tuple[Guest, str]:
    net = client.acquire_network(network_name)
    guest = Guest(client.attach(network_name, **attach))
    guests.append(guest)
    guest.start()
    cidr = address(net, host)
    guest.configure(cidr, net.gateway)
    return guest, ip_of(cidr)


@pytest.mark.parametrize(
    "a,b",
    [
        ({"kind": "tap"}, {"kind": "tap"}),
        ({"kind": "tap"}, {"kind": "dgram"}),
        ({"kind": "dgram"}, {"kind": "dgram"}),
        ({"kind": "tap", "vnet_hdr": True}, {"kind": "dgram", "vnet_hdr": True}),
        ({"kind": "tap", "queues": 2}, {"kind": "tap", "vnet_hdr": True}),
    ],
    ids=["tap-tap", "tap-dgram", "dgram-dgram", "vnet_hdr", "multiqueue"],
)
def test_two_guests_on_one_network_ping_each_other(broker, guests, a, b):
    with Client(broker.socket_path) as client:
        ga, ip_a = start_guest(client, guests, "shared", 10, **a)
        gb, ip_b = start_guest(client, guests, "shared", 11, **b)
        assert ga.ping(ip_b, count=2) and gb.ping(ip_a, count=2)
        # And both reach the host's gateway address on the bridge.
        gateway = client.acquire_network("shared").gateway
        assert ga.ping(gateway) and gb.ping(gateway)
        assert ga.stats()["a_to_b_frames"] > 0 and gb.stats()["b_to_a_frames"] > 0


def test_guests_of_different_clients_share_the_network(broker, guests):
    with Client(broker.socket_path) as one, Client(broker.socket_path) as two:
        ga, ip_a = start_guest(one, guests, "shared", 20)
        gb, ip_b = start_guest(two, guests, "shared", 21, kind="dgram")
        assert ga.ping(ip_b, count=2)
        assert one.status().networks[0].peers == 2


def test_guests_on_different_networks_cannot_reach_each_other(broker, guests):
    with Client(broker.socket_path) as client:
        ga, ip_a = start_guest(client, guests, "shared", 10)
        gb, ip_b = start_guest(client, guests, "host", 10)
        # Each reaches its own gateway, so the path to the host works...
        assert ga.ping(client.acquire_network("shared").gateway)
        assert gb.ping(client.acquire_network("host").gateway)
        # ...but nothing crosses from one network to the other.
        assert not ga.ping(ip_b, count=2, timeout=1)
        assert not gb.ping(ip_a, count=2, timeout=1)


def test_a_detached_guest_is_cut_off(broker, guests):
    with Client(broker.socket_path) as client:
        ga, ip_a = start_guest(client, guests, "shared", 10)
        gb, ip_b = start_guest(client, guests, "shared", 11)
        assert ga.ping(ip_b)
        client.detach(gb.interface)
        assert not ga.ping(ip_b, count=2, timeout=1)


def test_mtu_of_a_configured_network_reaches_every_attachment(start_broker, guests):
    broker = start_broker(config={"jumbo": {"mode": "host", "mtu": 9000}})
    with Client(broker.socket_path) as client:
        ga, _ = start_guest(client, guests, "jumbo", 10)
        gb, ip_b = start_guest(client, guests, "jumbo", 11, kind="dgram")
        assert ga.interface.mtu == gb.interface.mtu == 9000
        # A 8972-byte payload + 28 bytes of headers = 9000: no fragmentation.
        assert ga.run("ping", "-c", "1", "-W", "2", "-M", "do", "-s", "8972", ip_b, check=False).returncode == 0
