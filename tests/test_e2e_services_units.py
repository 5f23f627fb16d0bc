"""End to end for the Linux backend's service units: nftables rules and dnsmasq.

Each test builds its own namespaces: a broker namespace holding the bridges
(plain ``ip`` bridges, not the broker's netlink code), an "internet" namespace
joined to it by a veth pair, and guest namespaces whose ``eth0`` is a veth
port of a bridge.  The units run inside the broker namespace through a small
``python -c`` under ``ip netns exec``; nothing touches the root namespace.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from vmnet_broker.guest import dhcp_lease
from vmnet_broker.sandbox import Namespace, unique_name

from . import netlab
from .conftest import require_services, wait_for
from .netlab import INTERNET, UPLINK

pytestmark = pytest.mark.network

SHARED_BR, HOST_BR = "vmb-br0", "vmb-br1"
SHARED_GW, HOST_GW, SHARED_V6GW = "192.168.105.1", "192.168.106.1", "fd00:1:2:3::1"

class Lab:
    """The namespaces of one test; ``close`` removes them all, killing what runs inside."""

    def __init__(self) -> None:
        self.namespaces: list[Namespace] = []
        self.broker = self.namespace()
        self.ports = 0

    def namespace(self) -> Namespace:
        ns = Namespace(unique_name("vmbt"))
        self.namespaces.append(ns)
        return ns.create()

    def bridge(self, name: str, cidr: str, cidr6: str | None = None) -> None:
        b = self.broker
        b.ip("link", "add", name, "type", "bridge")
        b.ip("addr", "add", cidr, "dev", name)
        if cidr6:
            # nodad: a bridge without ports has no carrier, and DAD would keep
            # the address tentative (unusable) until one is added.
            b.ip("addr", "add", cidr6, "dev", name, "nodad")
        b.ip("link", "set", name, "up")

    def guest(self, bridge: str, mac: str | None = None) -> Namespace:
        ns = self.namespace()
        self.ports += 1
        port = f"p{self.ports}"
        self.broker.ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        self.broker.ip("link", "set", port, "master", bridge, "up")
        if mac:
            ns.ip("link", "set", "eth0", "address", mac)
        ns.ip("link", "set", "eth0", "up")
        return ns

    def internet(self) -> Namespace:
        net = self.namespace()
        netlab.make_internet(self.broker, net)
        return net

    def python(self, ns: Namespace, code: str, *args: str, **popen):
        return netlab.python(ns, code, *args, **popen)

    def serve(self, ns: Namespace, port: int) -> None:
        netlab.serve(ns, port)

    def connect(self, ns: Namespace, host: str, port: int, timeout: float = 2) -> str:
        return netlab.connect(ns, host, port, timeout)

    def close(self) -> None:
        for ns in self.namespaces:
            ns.close()


@pytest.fixture
def lab():
    made = Lab()
    try:
        yield made
    finally:
        made.close()


FIREWALL = textwrap.dedent("""
    import ipaddress as ia, json, subprocess, sys
    from vmnet_broker.config import PortForward
    from vmnet_broker.backends.linux import firewall as fw
    shared = fw.FirewallNetwork("shared", "vmb-br0", "shared", ia.IPv4Network("192.168.105.0/24"),
        ia.IPv6Network("fd00:1:2:3::/64"), port_forwards=(PortForward("tcp", 8080, ia.IPv4Address("192.168.105.10"), 80),))
    host = fw.FirewallNetwork("host", "vmb-br1", "host", ia.IPv4Network("192.168.106.0/24"))
    for key, value in fw.sysctls([shared, host]).items():
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value)
    cmd = sys.argv[1]
    if cmd == "apply":
        fw.apply([shared, host])
    elif cmd == "delete":
        print(json.dumps(fw.delete_table()))
    elif cmd == "empty":
        fw.apply([])
""")


def tables(ns: Namespace) -> list[str]:
    listed = json.loads(ns.run("nft", "-j", "list", "tables").stdout)["nftables"]
    return [f"{t['table']['family']} {t['table']['name']}" for t in listed if "table" in t]


def test_the_table_is_replaced_whole_on_every_apply_and_removed_by_delete(lab):
    require_services()
    b = lab.broker
    lab.bridge(SHARED_BR, f"{SHARED_GW}/24")
    lab.python(b, FIREWALL, "apply")
    first = b.run("nft", "list", "table", "inet", "vmnet_broker").stdout
    lab.python(b, FIREWALL, "apply")
    assert b.run("nft", "list", "table", "inet", "vmnet_broker").stdout == first  # replaced, not appended
    assert "iifname . oifname @intra accept" in first
    assert lab.python(b, FIREWALL, "delete").stdout.strip() == "true"
    assert lab.python(b, FIREWALL, "delete").stdout.strip() == "false"
    lab.python(b, FIREWALL, "apply")
    lab.python(b, FIREWALL, "empty")
    assert tables(b) == []


def test_shared_network_reaches_out_through_nat_and_nothing_crosses_into_host_network(lab):
    require_services()
    b = lab.broker
    lab.bridge(SHARED_BR, f"{SHARED_GW}/24", f"{SHARED_V6GW}/64")
    lab.bridge(HOST_BR, f"{HOST_GW}/24")
    net = lab.internet()
    g1, g2, g3 = lab.guest(SHARED_BR), lab.guest(SHARED_BR), lab.guest(HOST_BR)
    for ns, addr, gw in ((g1, "192.168.105.10/24", SHARED_GW), (g2, "192.168.105.11/24", SHARED_GW),
                         (g3, "192.168.106.10/24", HOST_GW)):  # fmt: skip
        ns.ip("addr", "add", addr, "dev", "eth0")
        ns.ip("route", "add", "default", "via", gw)
    g1.ip("addr", "add", "fd00:1:2:3::10/64", "dev", "eth0", "nodad")
    g1.ip("-6", "route", "add", "default", "via", SHARED_V6GW)
    # The outside knows a way back to the guests, so only our rules stop it.
    net.ip("route", "add", "192.168.104.0/22", "via", UPLINK)
    net.ip("-6", "route", "add", "fd00:1:2:3::/64", "via", "2001:db8::1")
    lab.python(b, FIREWALL, "apply")
    lab.serve(g1, 80)
    lab.serve(net, 9000)

    # Out, masqueraded; guests of one bridge see each other (br_netfilter).
    assert lab.connect(g1, INTERNET, 9000) == UPLINK
    assert lab.connect(g1, "2001:db8::2", 9000) == "2001:db8::1"
    assert g1.run("ping", "-c1", "-W2", "192.168.105.11", check=False).returncode == 0
    # Port forward: from outside, from the host itself, from a neighbour (hairpin).
    assert lab.connect(net, UPLINK, 8080) == INTERNET
    assert lab.connect(b, UPLINK, 8080) == SHARED_GW
    assert lab.connect(g2, UPLINK, 8080) == SHARED_GW
    # Loopback is not forwarded (see firewall.py on route_localnet).
    assert lab.connect(b, "127.0.0.1", 8080).startswith("FAIL")
    # Host mode reaches the host, and nothing else.
    assert g3.run("ping", "-c1", "-W2", HOST_GW, check=False).returncode == 0
    assert g3.run("ping", "-c1", "-W2", UPLINK, check=False).returncode == 0
    blocked = [
        (net, "192.168.105.10", 80),  # no new connections into a shared network
        (net, "fd00:1:2:3::10", 80),
        (g3, INTERNET, 9000),  # host mode: not out
        (g3, "192.168.105.10", 80),  # not between networks
        (g3, HOST_GW, 8080),  # not even by a port forward
        (net, "192.168.106.10", 22),  # not into host mode
    ]
    with ThreadPoolExecutor(len(blocked)) as pool:
        answers = list(pool.map(lambda case: lab.connect(*case, timeout=1), blocked))
    for (ns, host, port), answer in zip(blocked, answers):
        assert answer.startswith("FAIL"), (ns.name, host, port, answer)


DNSMASQ = textwrap.dedent("""
    import ipaddress as ia, json, sys
    from pathlib import Path
    from vmnet_broker.config import Reservation
    from vmnet_broker.backends.linux import dnsmasq as d
    state = Path(sys.argv[1])
    shared = d.DnsmasqSpec("shared", "vmb-br0", ia.IPv4Network("192.168.105.0/24"), ia.IPv4Address("192.168.105.1"),
        reservations=(Reservation("52:54:00:00:00:0a", ia.IPv4Address("192.168.105.50"), "db"),),
        dns_servers=(ia.IPv4Address("203.0.113.2"),), domain="shared.internal",
        ipv6_prefix=ia.IPv6Network("fd00:1:2:3::/64"), mtu=1400)
    host = d.DnsmasqSpec("host", "vmb-br1", ia.IPv4Network("192.168.106.0/24"), ia.IPv4Address("192.168.106.1"),
        domain="host.internal", mode="host")
    units = [d.Dnsmasq(shared, state), d.Dnsmasq(host, state)]
    for unit in units:
        unit.start()
    print(json.dumps([unit.pid for unit in units]), flush=True)
    sys.stdin.readline()
    for unit in units:
        unit.stop()
    print(json.dumps([unit.alive() for unit in units]), flush=True)
""")


LEASE_KEYS = ("ip", "router", "dns", "domain", "mtu")


def lease(ns: Namespace, hostname: str | None = None) -> dict:
    got = dhcp_lease(ns, hostname)
    return {key: got.get(key, "") for key in LEASE_KEYS}


def test_dnsmasq_gives_leases_names_and_slaac_and_listens_only_on_its_bridge(lab, tmp_path):
    require_services()
    b = lab.broker
    lab.bridge(SHARED_BR, f"{SHARED_GW}/24", f"{SHARED_V6GW}/64")
    lab.bridge(HOST_BR, f"{HOST_GW}/24")
    net = lab.internet()
    # The configured upstream server, standing in for the world's DNS.
    net.popen(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
               "--bind-interfaces", f"--listen-address={INTERNET}", "--address=/example.test/198.51.100.7"],
              stderr=subprocess.DEVNULL)  # fmt: skip
    db = lab.guest(SHARED_BR, mac="52:54:00:00:00:0a")
    web = lab.guest(SHARED_BR)
    hostonly = lab.guest(HOST_BR)
    # What the broker writes from firewall.sysctls(): dnsmasq advertises a
    # default route (RA router lifetime > 0) only while forwarding is on.
    b.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    state = tmp_path / "state"
    units = lab.python(b, DNSMASQ, str(state), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        pids = json.loads(units.stdout.readline())
        assert len(pids) == 2

        sockets = b.run("ss", "-Hlnp", "-A", "inet").stdout.splitlines()
        dns = [line.split()[4] for line in sockets if "dnsmasq" in line and line.split()[4].endswith(":53")]
        assert dns and all(
            addr.rsplit(":", 1)[0] in (SHARED_GW, HOST_GW, f"[{SHARED_V6GW}]") or "%vmb-br" in addr for addr in dns
        ), dns
        dhcp = [line.split()[4] for line in sockets if "dnsmasq" in line and line.split()[4].endswith(":67")]
        assert sorted(dhcp) == ["0.0.0.0%vmb-br0:67", "0.0.0.0%vmb-br1:67"]

        got = lease(db)
        assert got == {"ip": "192.168.105.50", "router": SHARED_GW, "dns": SHARED_GW,
                       "domain": "shared.internal", "mtu": "1400"}  # fmt: skip
        # Two new clients at once (no-ping: neither waits for the other's offer).
        with ThreadPoolExecutor(2) as pool:
            dynamic = pool.submit(lease, web, "web")
            isolated = lease(hostonly, "lonely")
            assert dynamic.result()["ip"].startswith("192.168.105.")
        assert isolated["router"] == "" and isolated["dns"] == HOST_GW

        for name in ("db", "db.shared.internal"):
            assert "Address: 192.168.105.50" in web.run("busybox", "nslookup", name, SHARED_GW).stdout

        def slaac() -> bool:
            shown = web.ip("-6", "addr", "show", "dev", "eth0").stdout.splitlines()
            return any("inet6 fd00:1:2:3:" in line and "tentative" not in line for line in shown)

        # DNS over IPv6 needs the guest's SLAAC address, past duplicate address
        # detection: leases no longer take the ~3 s conflict ping that used to
        # leave time for it.
        assert wait_for(slaac, 10), web.ip("-6", "addr").stdout
        assert "Address: 192.168.105.50" in web.run("busybox", "nslookup", "db", SHARED_V6GW).stdout
        # Forwarded to the configured server (whose REFUSED for AAAA makes busybox exit 1).
        upstream = web.run("busybox", "nslookup", "www.example.test", SHARED_GW, check=False)
        assert "Address: 198.51.100.7" in upstream.stdout
        assert "Address: 192.168.106." in hostonly.run("busybox", "nslookup", "lonely", HOST_GW).stdout
        refused = hostonly.run("busybox", "nslookup", "www.example.test", HOST_GW, check=False)
        assert "198.51.100.7" not in refused.stdout  # host mode forwards nothing
        assert "default via fe80:" in web.ip("-6", "route").stdout
    finally:
        units.stdin.close()
    assert json.loads(units.stdout.readline()) == [False, False]
    assert units.wait(10) == 0
    assert sorted(p.name for p in state.iterdir() if p.suffix in (".pid", ".conf")) == []
    assert "192.168.105.50" in (state / "dnsmasq-shared.leases").read_text()  # kept for the next start
