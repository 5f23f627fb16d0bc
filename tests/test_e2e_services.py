"""End to end network services through a real broker: NAT, DHCP, DNS, IPv6,
port forwards, subnet choice, access control, crash leftovers.

The broker's namespace gets an "internet": a second namespace joined by a
veth pair, with a default route into it, TCP/UDP echo services and a DNS
server of its own.  Guests are namespace "VMs" attached through the broker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vmnet_broker import Client, CreateFailed
from vmnet_broker.backends.linux.dnsmasq import process_running
from vmnet_broker.guest import Guest
from vmnet_broker.sandbox import Namespace, unique_name

from . import netlab
from .conftest import broker_links, require_services, wait_for
from .netlab import INTERNET, UPLINK


class World:
    """A broker namespace with an internet behind it; removed by ``close``."""

    def __init__(self) -> None:
        self.broker_ns = Namespace(unique_name("vmbb")).create()
        self.internet = Namespace(unique_name("vmbo")).create()
        netlab.make_internet(self.broker_ns, self.internet)
        # `ip netns exec` bind-mounts this over /etc/resolv.conf for the broker
        # (and its dnsmasq): the broker namespace's resolver is the internet's.
        self.etc = Path("/etc/netns") / self.broker_ns.name
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / "resolv.conf").write_text(f"nameserver {INTERNET}\n")
        self.dns = netlab.start_dns(self.internet, INTERNET, {"outside.test": INTERNET})

    def close(self) -> None:
        self.dns.kill()
        self.dns.wait()
        shutil.rmtree(self.etc, ignore_errors=True)
        self.internet.close()
        self.broker_ns.close()


@pytest.fixture
def world(network):
    require_services()
    made = World()
    yield made
    made.close()


@pytest.fixture
def start(world, start_broker):
    """Start a broker inside the world's broker namespace."""

    def start_in_world(**kwargs):
        return start_broker(namespace=world.broker_ns, **kwargs)

    return start_in_world


def attach_guest(client, guests, network_name: str, **attach) -> Guest:
    guest = Guest(client.attach(network_name, **attach))
    guests.append(guest)
    return guest.start()


def nft_tables(ns: Namespace) -> str:
    return ns.run("nft", "list", "tables").stdout


def dnsmasq_pid(broker, name: str) -> int | None:
    try:
        return int((Path(broker.state_dir) / f"dnsmasq-{name}.pid").read_text())
    except (OSError, ValueError):
        return None


# -- NAT and isolation -------------------------------------------------------------


def test_shared_guest_reaches_the_outside_through_nat(start, world, guests):
    broker = start()
    netlab.serve(world.internet, 7000)
    netlab.serve(world.internet, 7001, udp=True)
    with Client(broker.socket_path) as client:
        guest = attach_guest(client, guests, "shared")
        lease = guest.dhcp()
        # The outside sees the broker's address, not the guest's.
        assert netlab.connect(guest.namespace, INTERNET, 7000) == UPLINK
        assert netlab.connect(guest.namespace, INTERNET, 7001, udp=True) == UPLINK
        net = client.acquire_network("shared")
        assert lease["router"] == net.gateway
        # Nothing from the outside reaches into the shared network unasked,
        # even for an outside that knows the route to it.
        netlab.serve(guest.namespace, 2222)
        world.internet.ip("route", "add", f"{net.subnet}/24", "via", UPLINK)
        assert "FAIL" in netlab.connect(world.internet, lease["ip"], 2222, timeout=1)


def test_host_guest_cannot_reach_the_outside(start, world, guests):
    broker = start()
    netlab.serve(world.internet, 7000)
    with Client(broker.socket_path) as client:
        # A shared network too, so forwarding is on: the rules must stop it.
        client.acquire_network("shared")
        net = client.acquire_network("host")
        guest = attach_guest(client, guests, "host")
        lease = guest.dhcp()
        assert not lease["router"], "a host-only network must not advertise a default route"
        guest.namespace.ip("route", "add", "default", "via", net.gateway)
        assert guest.ping(net.gateway)
        assert "FAIL" in netlab.connect(guest.namespace, INTERNET, 7000, timeout=1)
        # Nor in: an outside that routes to the host network gets nowhere.
        netlab.serve(guest.namespace, 2222)
        world.internet.ip("route", "add", f"{net.subnet}/24", "via", UPLINK)
        assert "FAIL" in netlab.connect(world.internet, lease["ip"], 2222, timeout=1)
        # The host's other addresses are the host: reachable.
        assert guest.ping(UPLINK)


def test_guests_on_two_networks_cannot_reach_each_other(start, world, guests):
    broker = start()
    with Client(broker.socket_path) as client:
        a = attach_guest(client, guests, "shared")
        b = attach_guest(client, guests, "host")
        ip_a, ip_b = a.dhcp()["ip"], b.dhcp()["ip"]
        b.namespace.ip("route", "add", "default", "via", client.acquire_network("host").gateway)
        assert not a.ping(ip_b, count=2, timeout=1)
        assert not b.ping(ip_a, count=2, timeout=1)


# -- DHCP and DNS ------------------------------------------------------------------------

LAB = {
    "mode": "shared",
    "subnet": "192.168.77.1",
    "reservations": [{"mac": "52:54:00:77:00:10", "ip": "192.168.77.10", "hostname": "web"}],
    "port_forwards": [
        {"proto": "tcp", "host_port": 8080, "guest_ip": "192.168.77.10", "guest_port": 80},
        {"proto": "udp", "host_port": 5353, "guest_ip": "192.168.77.10", "guest_port": 53},
    ],
    "lease_time": 600,
}


def test_dhcp_leases_in_the_subnet_and_reservations_get_their_ip(start, guests):
    broker = start(config={"lab": LAB})
    with Client(broker.socket_path) as client:
        net = client.acquire_network("lab")
        assert (net.subnet, net.gateway) == ("192.168.77.0", "192.168.77.1")
        dynamic = attach_guest(client, guests, "lab").dhcp()
        fixed = attach_guest(client, guests, "lab", mac="52:54:00:77:00:10").dhcp()
    assert dynamic["ip"].startswith("192.168.77.") and dynamic["ip"] not in ("192.168.77.1", "192.168.77.10")
    assert dynamic["subnet"] == "255.255.255.0" and dynamic["lease"] == "600"
    assert fixed["ip"] == "192.168.77.10"
    assert dynamic["dns"] == "192.168.77.1" and dynamic["domain"] == "lab.internal"


def test_eight_guests_booting_together_all_get_distinct_leases_within_seconds(start, guests):
    """dnsmasq's conflict ping (~3 s per offer, one at a time) made 8 guests wait ~24 s; no-ping serves them at once."""
    broker = start()
    with Client(broker.socket_path) as client:
        subnet = client.acquire_network("shared").subnet
        vms = [attach_guest(client, guests, "shared") for _ in range(8)]
        started = time.monotonic()
        with ThreadPoolExecutor(len(vms)) as pool:
            # udhcpc's -t 30: time enough to measure the old behaviour instead of failing.
            leases = list(pool.map(lambda vm: vm.dhcp(timeout=30)["ip"], vms))
        took = time.monotonic() - started
    print(f"\n8 guests asking at once: all leased in {took:.2f} s")
    assert len(set(leases)) == 8 and all(ip.startswith(subnet.rsplit(".", 1)[0] + ".") for ip in leases)
    assert took < 5, f"8 leases took {took:.1f} s"


def nslookup(guest: Guest, name: str, server: str) -> str:
    return guest.run("busybox", "nslookup", "-type=a", name, server, check=False).stdout


def test_dns_on_the_gateway_resolves_guests_and_forwards_outside_names(start, world, guests):
    broker = start()
    with Client(broker.socket_path) as client:
        gateway = client.acquire_network("shared").gateway
        vm1 = attach_guest(client, guests, "shared")
        vm2 = attach_guest(client, guests, "shared")
        ip1 = vm1.dhcp(hostname="vm1")["ip"]
        vm2.dhcp(hostname="vm2")
        assert ip1 in nslookup(vm2, "vm1", gateway)
        assert ip1 in nslookup(vm2, "vm1.shared.internal", gateway)
        # Names the network does not know go to the broker namespace's resolver.
        assert INTERNET in nslookup(vm2, "outside.test", gateway)
    # DNS listens on the networks' own addresses only, never on every interface.
    sockets = world.broker_ns.run("ss", "-H", "-lun", "sport", "= :53").stdout
    assert sockets and "0.0.0.0:53" not in sockets and "*:53" not in sockets
    assert UPLINK not in sockets


# -- IPv6 ---------------------------------------------------------------------------------


def global_v6(guest: Guest) -> str | None:
    out = guest.namespace.ip("-6", "-j", "addr", "show", "dev", "eth0", "scope", "global").stdout
    for iface in json.loads(out or "[]"):
        for addr in iface.get("addr_info", []):
            if not addr.get("tentative"):
                return addr["local"]
    return None


def test_shared_guests_get_slaac_addresses_and_ping6_each_other(start, world, guests):
    broker = start()
    with Client(broker.socket_path) as client:
        net = client.acquire_network("shared")
        assert net.ipv6_prefix.startswith("fd") and net.prefix_len == 64
        a = attach_guest(client, guests, "shared")
        b = attach_guest(client, guests, "shared")
        for guest in (a, b):
            guest.run("sysctl", "-q", "-w", "net.ipv6.conf.eth0.accept_dad=0")
            guest.run("sysctl", "-q", "-w", "net.ipv6.conf.eth0.router_solicitation_interval=1")
        addr_a = wait_for(lambda: global_v6(a), 15)
        addr_b = wait_for(lambda: global_v6(b), 15)
        assert addr_a and addr_b
        import ipaddress

        prefix = ipaddress.IPv6Network(f"{net.ipv6_prefix}/{net.prefix_len}")
        assert ipaddress.IPv6Address(addr_a) in prefix
        assert a.ping(addr_b, count=2) and b.ping(addr_a, count=2)
        # NAT66 to the outside, as for IPv4.
        netlab.serve(world.internet, 7006)
        assert netlab.connect(a.namespace, netlab.INTERNET6, 7006) == netlab.UPLINK6


def test_ipv6_can_be_switched_off(start, guests):
    broker = start(config={"shared": {"ipv6": False}})
    with Client(broker.socket_path) as client:
        net = client.acquire_network("shared")
    assert (net.ipv6_prefix, net.prefix_len) == ("", 0)


# -- port forwards -------------------------------------------------------------------------


def test_port_forward_reaches_a_guest_server_from_outside_and_from_the_host(start, world, guests):
    broker = start(config={"lab": LAB})
    with Client(broker.socket_path) as client:
        web = attach_guest(client, guests, "lab", mac="52:54:00:77:00:10")
        assert web.dhcp()["ip"] == "192.168.77.10"
        netlab.serve(web.namespace, 80)
        netlab.serve(web.namespace, 53, udp=True)
        # From the outside: the guest sees the real client.
        assert netlab.connect(world.internet, UPLINK, 8080) == INTERNET
        assert netlab.connect(world.internet, UPLINK, 5353, udp=True) == INTERNET
        # From the host itself, to one of its own addresses.
        assert netlab.connect(world.broker_ns, UPLINK, 8080) == "192.168.77.1"
        # A port nobody forwarded stays closed.
        assert "FAIL" in netlab.connect(world.internet, UPLINK, 8081, timeout=1)


# -- subnets -------------------------------------------------------------------------------


def test_routes_covering_pool_candidates_are_skipped(start, world):
    world.broker_ns.ip("route", "add", "192.168.105.0/24", "via", INTERNET)
    # A VPN's route in a policy table counts too.
    world.broker_ns.ip("route", "add", "192.168.106.0/23", "dev", "up0", "table", "100")
    broker = start()
    with Client(broker.socket_path) as client:
        assert client.acquire_network("shared").subnet == "192.168.108.0"


def test_overlapping_configured_subnet_is_refused_with_6(start, world):
    world.broker_ns.ip("route", "add", "10.8.0.0/16", "dev", "up0", "table", "200")
    broker = start(config={"clash": {"subnet": "203.0.113.0"}, "vpn": {"subnet": "10.8.3.1"}})
    with Client(broker.socket_path) as client:
        with pytest.raises(CreateFailed) as info:
            client.acquire_network("clash")
        assert info.value.code == 6 and "203.0.113.1/24 on up0" in str(info.value)
        with pytest.raises(CreateFailed) as info:
            client.acquire_network("vpn")
        assert "route 10.8.0.0/16 (table 200)" in str(info.value)
        # Nothing half-made is left, and the broker serves on.
        assert client.status().networks == [] and client.acquire_network("shared")


def test_a_network_keeps_its_subnet_and_leases_across_restarts(start, world, tmp_path, guests):
    workdir = tmp_path / "persistent"
    first = start(workdir=workdir)
    mac = "52:54:00:aa:bb:01"
    with Client(first.socket_path) as client:
        client.acquire_network("host")  # takes 192.168.105.0: shared is pushed on
        before = client.acquire_network("shared").subnet
        guest = attach_guest(client, guests, "shared", mac=mac)
        leased = guest.dhcp()["ip"]
    assert first.stop() == 0
    leases = Path(first.state_dir) / "dnsmasq-shared.leases"
    assert f"{mac} {leased}" in leases.read_text()

    second = start(workdir=workdir)
    with Client(second.socket_path) as client:
        assert client.acquire_network("shared").subnet == before
        # The new dnsmasq loaded the old lease: it is in the file it rewrote.
        assert f"{mac} {leased}" in leases.read_text()
        again = attach_guest(client, guests, "shared", mac=mac)
        assert again.dhcp()["ip"] == leased


# -- access control --------------------------------------------------------------------------

WIRE = textwrap.dedent(
    """
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sys.argv[1])
    for name in sys.argv[2:]:
        s.send(json.dumps({"command": "acquire", "network_name": name}).encode())
        print(json.dumps(json.loads(s.recv(65536))))
    """
)


def test_a_user_not_allowed_gets_3_and_others_are_served(start):
    # A world-traversable directory: the pytest tmp dir is private to root.
    workdir = Path(tempfile.mkdtemp(prefix="vmb-acl-"))
    try:
        os.chmod(workdir, 0o755)
        broker = start(
            workdir=workdir,
            config={"private": {"mode": "host", "allowed_users": ["root"]}, "team": {"mode": "host", "allowed_groups": ["nogroup"]}},
            extra_args=("--socket-group", "nogroup"),
        )
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"
        out = subprocess.run(
            [python, "-c", WIRE, broker.socket_path, "private", "team", "shared"],
            capture_output=True, text=True, timeout=20, user=65534, group=65534, extra_groups=[],
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        private, team, shared = (json.loads(line) for line in out.stdout.splitlines())
        assert private["error"] == 3 and "may not use" in private["message"]
        assert "network" in team and "network" in shared  # no root needed
        with Client(broker.socket_path) as client:
            names = {n.name for n in client.status().networks}
            assert "private" not in names and {"team", "shared"} <= names
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- crash leftovers and daemon restarts ------------------------------------------------------


def test_restart_after_kill_9_removes_everything_the_dead_broker_left(start, world, tmp_path, guests):
    workdir = tmp_path / "crash"
    dead = start(workdir=workdir)
    with Client(dead.socket_path) as client:
        attach_guest(client, guests, "shared")
        client.attach("host", kind="dgram").close()
        pids = [dnsmasq_pid(dead, "shared"), dnsmasq_pid(dead, "host")]
        dead.stop(signal.SIGKILL)
    assert all(pids) and all(process_running(p) for p in pids)
    assert "vmnet_broker" in nft_tables(world.broker_ns) and broker_links(world.broker_ns)

    fresh = start(workdir=workdir)
    assert broker_links(world.broker_ns) == []
    assert "vmnet_broker" not in nft_tables(world.broker_ns)
    assert wait_for(lambda: not any(process_running(p) for p in pids), 3)
    log = fresh.log()
    assert "removed leftover dnsmasq" in log and "removed leftover nftables table" in log
    with Client(fresh.socket_path) as client:
        assert client.acquire_network("shared")


def test_sigterm_leaves_no_bridge_table_or_dnsmasq(start, world, guests):
    broker = start()
    with Client(broker.socket_path) as client:
        attach_guest(client, guests, "shared").dhcp()
        client.acquire_network("host")
        pids = [dnsmasq_pid(broker, "shared"), dnsmasq_pid(broker, "host")]
        assert broker.stop() == 0
    assert broker_links(world.broker_ns) == []
    assert "vmnet_broker" not in nft_tables(world.broker_ns)
    assert not any(process_running(p) for p in pids)


def test_a_killed_dnsmasq_is_restarted_and_leases_keep_working(start, guests):
    broker = start()
    with Client(broker.socket_path) as client:
        guest = attach_guest(client, guests, "shared")
        first = guest.dhcp()["ip"]
        old = dnsmasq_pid(broker, "shared")
        os.kill(old, signal.SIGKILL)
        new = wait_for(lambda: (p := dnsmasq_pid(broker, "shared")) and p != old and process_running(p) and p, 5)
        assert new, broker.log()[-2000:]
        # The lease file survived the restart, and renewing works.
        leases = Path(broker.state_dir) / "dnsmasq-shared.leases"
        assert guest.mac in leases.read_text()
        assert guest.dhcp()["ip"] == first
        other = attach_guest(client, guests, "shared").dhcp()["ip"]
        assert other != first
    assert "dnsmasq (pid" in broker.log() and "restarting" in broker.log()


# -- configuration keys end to end ---------------------------------------------------------


def test_external_interface_pins_the_nat_uplink(start, world, guests):
    broker = start(config={"pinned": {"subnet": "192.168.81.0", "external_interface": "up0"},
                           "elsewhere": {"subnet": "192.168.82.0", "external_interface": "wan9"}})  # fmt: skip
    netlab.serve(world.internet, 7000)
    with Client(broker.socket_path) as client:
        pinned = attach_guest(client, guests, "pinned")
        elsewhere = attach_guest(client, guests, "elsewhere")
        pinned.dhcp()
        elsewhere.dhcp()
        assert netlab.connect(pinned.namespace, INTERNET, 7000) == UPLINK
        # Its uplink is wan9, not up0: nothing leaves by the default route.
        assert "FAIL" in netlab.connect(elsewhere.namespace, INTERNET, 7000, timeout=1)


def test_dns_servers_domain_and_switches_reach_the_network(start, world, guests):
    broker = start(
        config={
            "lab": {"mode": "host", "subnet": "192.168.83.0", "dns_servers": [INTERNET], "domain": "lab.example"},
            "quiet": {"mode": "host", "subnet": "192.168.84.0", "dhcp": False, "dns": False},
        }
    )
    with Client(broker.socket_path) as client:
        vm = attach_guest(client, guests, "lab")
        lease = vm.dhcp(hostname="db")
        assert lease["domain"] == "lab.example"
        # A host network forwards to its configured servers only.
        assert INTERNET in nslookup(vm, "outside.test", "192.168.83.1")
        assert lease["ip"] in nslookup(vm, "db.lab.example", "192.168.83.1")
        quiet = attach_guest(client, guests, "quiet")
        with pytest.raises(RuntimeError, match="no DHCP lease"):
            quiet.dhcp(timeout=2)
    sockets = world.broker_ns.run("ss", "-H", "-lun").stdout
    assert "192.168.83.1:53" in sockets and "192.168.84.1:53" not in sockets
