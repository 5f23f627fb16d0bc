"""End to end: a guest cannot pose as another (issue 8, class 6).

Two namespace guests on one network, each attached by its own client: a
victim, and an attacker that sends frames with the victim's MAC (its TAP's
far end changed to the victim's address inside its namespace), or claims the
victim's leased IPv4 address in ARP with its own MAC.  Without the bridge
filter the bridge learns the victim's MAC on the attacker's port, or the
gateway's neighbour cache learns the attacker's MAC for the victim's
address, and the gateway's frames for the victim go to the attacker.  With
it the forged frames are dropped and counted in the attacker's attachment
in ``status``, and the gateway keeps reaching the victim.
"""

from __future__ import annotations

import fcntl
import json
import signal
import struct
import subprocess
import textwrap
import time

import pytest

from vmnet_broker import Client
from vmnet_broker.backends.linux import guard
from vmnet_broker.guest import Guest
from vmnet_broker.sandbox import Namespace

from .conftest import require_services, wait_for
from .netlab import python

# Sends raw frames on eth0 until killed (or for a minute): "l2" frames whose
# source is another MAC (a broadcast, and a link-local LLDP frame, which the
# bridge learns from before any filter), or "arp" requests for the gateway
# that claim another's IPv4 address with our own MAC.
FORGER = textwrap.dedent(
    """
    import socket, sys, time
    mode, mac, ip, gateway = sys.argv[1:5]
    def raw(text):
        return bytes.fromhex(text.replace(":", ""))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind(("eth0", 0))
    ours = s.getsockname()[4]
    if mode == "l2":
        frames = [raw("ff:ff:ff:ff:ff:ff") + raw(mac) + b"\\x88\\xb5" + bytes(46),
                  raw("01:80:c2:00:00:0e") + raw(mac) + b"\\x88\\xcc" + bytes(46)]
    else:
        arp = (b"\\x00\\x01\\x08\\x00\\x06\\x04\\x00\\x01" + ours + socket.inet_aton(ip)
               + bytes(6) + socket.inet_aton(gateway))
        frames = [raw("ff:ff:ff:ff:ff:ff") + ours + b"\\x08\\x06" + arp + bytes(18)]
    print("sending", flush=True)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        for frame in frames:
            s.send(frame)
        time.sleep(0.002)
    """
)


def attachment(client: Client, name: str) -> dict:
    for net in client.status().raw["networks"]:
        for iface in net["attachments"]:
            if iface["name"] == name:
                return iface
    raise AssertionError(f"{name} not in status")


def forged(client: Client, name: str) -> int:
    return attachment(client, name).get("forged", {}).get("packets", 0)


def replies(ns: Namespace, address: str, count: int = 10) -> int:
    """Echo replies from ``address`` to ``count`` pings from ``ns`` (the gateway's side)."""
    out = ns.run("ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1", address, check=False).stdout
    for line in out.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    return 0


class Forger:
    def __init__(self, guest: Guest, mode: str, mac: str = "", ip: str = "0.0.0.0", gateway: str = "0.0.0.0") -> None:
        self.proc = python(guest.namespace, FORGER, mode, mac or "00:00:00:00:00:00", ip, gateway,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "sending"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)


def owners(broker) -> str:
    """The bridge filter's (MAC . address) pairs of leases and reservations, as nft lists them."""
    return broker.namespace.run("nft", "list", "set", "bridge", "vmnet_broker", "owner", check=False).stdout


def fdb_port(broker, mac: str) -> str | None:
    """The port the broker's bridges learned ``mac`` on."""
    out = broker.namespace.run("bridge", "-j", "fdb", "show").stdout
    for entry in json.loads(out or "[]"):
        if entry.get("mac") == mac and entry.get("master"):
            return entry.get("ifname")
    return None


@pytest.mark.parametrize("kind", ["tap", "dgram"])
def test_a_guest_sending_with_another_guests_mac_is_dropped_and_counted(broker, guests, kind):
    require_services()
    with Client(broker.socket_path) as victims, Client(broker.socket_path) as attackers:
        net = victims.acquire_network("shared")
        prefix = net.subnet.rsplit(".", 1)[0]
        victim = Guest(victims.attach("shared"))
        guests.append(victim)
        victim.start().configure(f"{prefix}.10/24", net.gateway)
        attacker = Guest(attackers.attach("shared", kind=kind))
        guests.append(attacker)
        attacker.start().configure(f"{prefix}.11/24", net.gateway)
        assert victim.ping(net.gateway) and attacker.ping(net.gateway)
        assert replies(broker.namespace, f"{prefix}.10", 3) == 3

        # The attacker's far end takes the victim's MAC (as a VM would),
        # and floods frames with it; the gateway keeps pinging the victim.
        attacker.namespace.ip("link", "set", "eth0", "address", victim.mac)
        forger = Forger(attacker, "l2", victim.mac)
        try:
            got = replies(broker.namespace, f"{prefix}.10")
            learned_on = fdb_port(broker, victim.mac)
        finally:
            forger.stop()
        print(f"\n{kind} attacker with the victim's MAC: {got}/10 pings from the gateway answered; "
              f"victim's MAC learned on {learned_on}")  # fmt: skip
        assert learned_on == victim.interface.name
        assert got >= 8, f"the gateway lost the victim: {got}/10"
        assert victim.ping(net.gateway)
        count = wait_for(lambda: forged(attackers, attacker.interface.name), 5)
        assert count > 20, f"forged frames counted: {count}"
        assert forged(victims, victim.interface.name) == 0


def set_tap_mac(fd: int, mac: str) -> None:
    """SIOCSIFHWADDR on a TAP fd: what any client holding one may do, no privilege needed."""
    ifreq = struct.pack("16sH6s8x", b"", 1, bytes.fromhex(mac.replace(":", "")))  # ARPHRD_ETHER
    fcntl.ioctl(fd, 0x8924, ifreq)  # SIOCSIFHWADDR


def test_a_client_that_gives_its_tap_another_guests_mac_gets_it_put_back(broker, guests):
    """The issue's attack: the bridge takes a port's own MAC for a local address on that port."""
    require_services()
    with Client(broker.socket_path) as victims, Client(broker.socket_path) as attackers:
        net = victims.acquire_network("shared")
        prefix = net.subnet.rsplit(".", 1)[0]
        victim = Guest(victims.attach("shared"))
        guests.append(victim)
        victim.start().configure(f"{prefix}.10/24", net.gateway)
        attacker = Guest(attackers.attach("shared"))
        guests.append(attacker)
        attacker.start()
        assert victim.ping(net.gateway) and replies(broker.namespace, f"{prefix}.10", 3) == 3

        for _ in range(3):
            set_tap_mac(attacker.interface.fds[0], victim.mac)
            time.sleep(0.2)
        got = replies(broker.namespace, f"{prefix}.10")
        tap_mac = broker.namespace.run("cat", f"/sys/class/net/{attacker.interface.name}/address").stdout.strip()
        print(f"\nattacker's TAP set to the victim's MAC 3 times: {got}/10 pings from the gateway answered")
        assert got >= 8, f"the gateway lost the victim: {got}/10"
        assert tap_mac != victim.mac and fdb_port(broker, victim.mac) == victim.interface.name
        assert victim.ping(net.gateway)
        assert attachment(attackers, attacker.interface.name)["forged"]["mac_changes"] == 3
        assert "changed its MAC to " + victim.mac in broker.log()


def test_a_guest_claiming_another_guests_leased_address_is_dropped_and_counted(broker, guests):
    require_services()
    with Client(broker.socket_path) as victims, Client(broker.socket_path) as attackers:
        net = victims.acquire_network("shared")
        victim = Guest(victims.attach("shared"))
        guests.append(victim)
        victim.start()
        leased = victim.dhcp()["ip"]
        attacker = Guest(attackers.attach("shared"))
        guests.append(attacker)
        attacker.start()
        attacker.dhcp()
        # Time for the broker to read the lease from dnsmasq's lease file (checked below).
        wait_for(lambda: leased in owners(broker), 5)
        assert replies(broker.namespace, leased, 3) == 3

        # ARP requests for the gateway from the victim's address, with the
        # attacker's own (assigned) MAC: the gateway would send the victim's
        # frames to the attacker.
        forger = Forger(attacker, "arp", ip=leased, gateway=net.gateway)
        try:
            got = replies(broker.namespace, leased)
            neighbour = broker.namespace.ip("-j", "neigh", "show", leased).stdout
        finally:
            forger.stop()
        print(f"\nattacker claiming {leased}: {got}/10 pings from the gateway answered; neighbour {neighbour}")
        assert attacker.mac not in neighbour
        assert got >= 8, f"the gateway lost the victim: {got}/10"
        assert victim.ping(net.gateway)
        assert f"{victim.mac} . {leased}" in owners(broker)
        count = wait_for(lambda: forged(attackers, attacker.interface.name), 5)
        assert count > 20, f"forged frames counted: {count}"
        assert forged(victims, victim.interface.name) == 0
        # The gateway's address is nobody's either.
        time.sleep(guard.COUNTERS_MAX_AGE)  # status shows counters at most this old: count is final now
        count = forged(attackers, attacker.interface.name)
        forger = Forger(attacker, "arp", ip=net.gateway, gateway=leased)
        time.sleep(1)
        forger.stop()
        assert wait_for(lambda: forged(attackers, attacker.interface.name) > count + 20, 5)


def test_guests_with_static_addresses_and_dhcp_still_work_under_the_filter(broker, guests):
    """What the filter must let through: DHCP from 0.0.0.0, ARP probes, a static address in the subnet."""
    require_services()
    with Client(broker.socket_path) as client:
        net = client.acquire_network("shared")
        prefix = net.subnet.rsplit(".", 1)[0]
        a = Guest(client.attach("shared"))
        guests.append(a)
        a.start()
        lease = a.dhcp()["ip"]
        b = Guest(client.attach("shared", kind="dgram"))
        guests.append(b)
        b.start().configure(f"{prefix}.200/24", net.gateway)
        assert a.ping(f"{prefix}.200", count=2) and b.ping(lease, count=2)
        assert b.run("busybox", "arping", "-D", "-c", "1", "-w", "1", "-I", "eth0", f"{prefix}.201",
                     check=False).returncode == 0  # fmt: skip  # a probe from 0.0.0.0, nobody answers
        # An address outside the subnet is dropped (and counted).
        b.namespace.ip("addr", "add", "10.99.0.5/24", "dev", "eth0")
        b.run("ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", "10.99.0.5", net.gateway, check=False)
        assert wait_for(lambda: forged(client, b.interface.name) >= 3, 5)
        assert forged(client, a.interface.name) == 0


def test_the_bridge_table_goes_at_exit_and_a_crashed_brokers_is_removed_at_start(start_broker, tmp_path, guests):
    require_services()
    workdir = tmp_path / "crash"
    dead = start_broker(workdir=workdir)
    with Client(dead.socket_path) as client:
        client.attach("shared").close()
        assert "table bridge vmnet_broker" in dead.namespace.run("nft", "list", "tables").stdout
        dead.stop(signal.SIGKILL)
    fresh = start_broker(workdir=workdir, namespace=dead.namespace)
    assert "vmnet_broker" not in fresh.namespace.run("nft", "list", "tables").stdout
    assert "removed leftover nftables table bridge vmnet_broker" in fresh.log()
    with Client(fresh.socket_path) as client:
        client.attach("shared").close()
        assert "table bridge vmnet_broker" in fresh.namespace.run("nft", "list", "tables").stdout
    assert fresh.stop() == 0
    assert "vmnet_broker" not in fresh.namespace.run("nft", "list", "tables").stdout
