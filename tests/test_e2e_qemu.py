"""End to end with real VMs: QEMU guests on a real broker's network.

The broker runs in its own namespace with an "internet" namespace behind it
(the world of test_e2e_services.py); QEMU runs inside the broker's
namespace too, so nothing here touches the host's network.  Guests boot the
Debian cloud kernel under TCG (see tests/vmimage.py and tests/qemu.py), so
tests assert behaviour, never speed.  The launcher's connection (``Client``)
stays open while QEMU runs: it is what keeps the interfaces alive.

How a VM's network ends with it: ``vmnet-broker run`` execs QEMU with the
connection inherited (no launcher process is left to die first), and a
launcher on the client API hands QEMU the connection and a death signal
(tests/qemu_launcher.py shows both, and what goes wrong without them).
Each test prints its wall time (``-s`` shows it).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from vmnet_broker import Client

from . import netlab, vmimage
from .conftest import wait_for
from .netlab import INTERNET, UPLINK
from .qemu import Nic, Vm, cpu_share, random_mac, require_qemu
from .test_e2e_services import World

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def vm_image():
    require_qemu()
    started = time.monotonic()
    image = vmimage.ensure_image(log=lambda msg: print(f"\n[vm image] {msg}", end=""))
    print(f"\n[vm image] {image.directory.name}: ready in {time.monotonic() - started:.1f} s "
          f"(built in {image.manifest.get('build_seconds', '?')} s)")  # fmt: skip
    return image


@pytest.fixture(autouse=True)
def wall_time(request):
    started = time.monotonic()
    yield
    print(f"\n[{request.node.name}] wall time {time.monotonic() - started:.1f} s")


@pytest.fixture
def world(vm_image):
    made = World()
    yield made
    made.close()


@pytest.fixture
def broker(world, start_broker):
    return start_broker(namespace=world.broker_ns)


@pytest.fixture
def make_vm(vm_image, world, tmp_path):
    """Vm factory: QEMU in the broker's namespace; every VM killed at teardown, passed or not."""
    made: list[Vm] = []

    def make(name: str, nic, **kwargs) -> Vm:
        vm = Vm(name, nic, image=vm_image, workdir=tmp_path, netns=world.broker_ns, hard_timeout=300, **kwargs)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.stop(timeout=5)


def boot_all(stack: ExitStack, vms: list[Vm]) -> None:
    """Start every VM, then wait for each (they boot in parallel); stopped when ``stack`` closes."""
    for vm in vms:
        stack.enter_context(vm)
    for vm in vms:
        vm.wait_ready()
        print(f"\n  {vm.name}: agent ready {vm.boot_seconds:.1f} s after QEMU started", end="")


def dhcp_all(vms: list[Vm]) -> dict[str, str]:
    """Leases for all VMs at once (dnsmasq serves one client at a time while it pings)."""
    leases: dict[str, str] = {}
    errors: list[BaseException] = []

    def one(vm: Vm) -> None:
        started = time.monotonic()
        try:
            leases[vm.name] = vm.dhcp()
            print(f"\n  {vm.name}: lease {leases[vm.name]} in {time.monotonic() - started:.1f} s", end="")
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(vm,)) for vm in vms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    assert len(leases) == len(vms), "a DHCP thread did not finish"
    return leases


def test_tap_and_dgram_vms_get_leases_and_ping_each_other_by_name(broker, make_vm):
    with Client(broker.socket_path) as client, ExitStack() as stack:
        net = client.acquire_network("shared")
        tap = client.attach("shared", kind="tap", vnet_hdr=True)
        dgram = client.attach("shared", kind="dgram")
        assert (tap.vnet_hdr, dgram.vnet_hdr) == (True, False)
        vm1 = make_vm("vm1", Nic.from_interface(tap))
        vm2 = make_vm("vm2", Nic.from_interface(dgram))
        boot_all(stack, [vm1, vm2])
        # QEMU holds the fds now; the client still holds the interfaces.
        tap.close()
        dgram.close()

        leases = dhcp_all([vm1, vm2])
        subnet = ipaddress.IPv4Network(f"{net.subnet}/{net.mask}")
        for vm in (vm1, vm2):
            assert ipaddress.IPv4Address(vm.lease["ip"]) in subnet and vm.lease["ip"] != net.gateway
            assert vm.lease["router"] == net.gateway and vm.lease["dns"] == net.gateway
            assert vm.lease["domain"] == f"{net.name}.internal"
        assert leases["vm1"] != leases["vm2"]

        # Each resolves the other's DHCP hostname through the broker's dnsmasq, and reaches it.
        for vm, other in ((vm1, vm2), (vm2, vm1)):
            for name in (other.name, f"{other.name}.{net.name}.internal"):
                status, out = vm.run(f"nslookup {name}", timeout=15)
                assert status == 0 and leases[other.name] in out, f"{vm.name}: nslookup {name}:\n{out}"
            status, out = vm.run(f"ping -c 2 -W 5 {other.name}", timeout=30)
            assert status == 0, f"{vm.name}: ping {other.name}:\n{out}"
            assert f"({leases[other.name]})" in out and " 0% packet loss" in out, out

        # Both attachments show up as the broker sees them.
        (shared,) = client.status().networks
        kinds = sorted(a["kind"] for a in shared.raw["attachments"])
        assert kinds == ["dgram", "tap"]


HTTP = """
import hashlib, http.server, socketserver, sys

BIG = bytes(range(256)) * 4096 * 4  # 4 MiB

class Handler(http.server.BaseHTTPRequestHandler):
    def reply(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.reply(BIG if self.path == "/big" else self.client_address[0].encode())

    def do_POST(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        self.reply(f"{len(data)}:{hashlib.sha256(data).hexdigest()}".encode())

    def log_message(self, *args):
        pass

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

server = Server((sys.argv[1], int(sys.argv[2])), Handler)
print("ready", flush=True)
server.serve_forever()
"""
BIG_SHA256 = hashlib.sha256(bytes(range(256)) * 4096 * 4).hexdigest()


def test_vm_reaches_an_outside_http_service_through_nat(broker, world, make_vm):
    server = netlab.python(world.internet, HTTP, INTERNET, "8080", stdout=subprocess.PIPE)
    assert server.stdout.readline().strip() == "ready"
    with Client(broker.socket_path) as client, ExitStack() as stack:
        tap = client.attach("shared", kind="tap", vnet_hdr=True)
        vm = make_vm("vm1", Nic.from_interface(tap))
        boot_all(stack, [vm])
        tap.close()
        dhcp_all([vm])

        # The outside sees the broker's uplink address, not the guest's: NAT.
        status, out = vm.run(f"wget -O - http://{INTERNET}:8080/ 2>/dev/null", timeout=30)
        assert (status, out.strip()) == (0, UPLINK), out
        # By name: the broker's dnsmasq forwards outside names to the broker namespace's resolver.
        status, out = vm.run("wget -O - http://outside.test:8080/ 2>/dev/null", timeout=30)
        assert (status, out.strip()) == (0, UPLINK), out
        # Bulk both ways through the NAT, with the TAP's vnet header offloads in play.
        status, out = vm.run(f"wget -O - http://{INTERNET}:8080/big 2>/dev/null | sha256sum", timeout=60)
        assert status == 0 and out.split()[0] == BIG_SHA256, out
        # Text: busybox wget sends strlen() of the --post-file's contents.
        status, out = vm.run(
            "head -c 1572864 /dev/urandom | base64 > /tmp/up && wc -c < /tmp/up && sha256sum /tmp/up && "
            f"wget -O - --post-file=/tmp/up http://{INTERNET}:8080/up 2>/dev/null",
            timeout=60,
        )
        size, digest, _, received = (out.split() + ["", "", "", ""])[:4]
        assert status == 0 and received == f"{size}:{digest}", out


# -- port forwards ---------------------------------------------------------------------------

WEB_MAC, WEB_IP = "52:54:00:77:00:10", "192.168.77.10"
WEB = {
    "mode": "shared",
    "subnet": "192.168.77.1",
    "reservations": [{"mac": WEB_MAC, "ip": WEB_IP, "hostname": "web"}],
    "port_forwards": [{"proto": "tcp", "host_port": 8080, "guest_ip": WEB_IP, "guest_port": 80}],
}
# busybox httpd in the guest: a CGI that answers with the client's address, and 1 MiB of noise.
WEB_SERVER = r"""
mkdir -p /www/cgi-bin
printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\necho "$REMOTE_ADDR"\n' > /www/cgi-bin/addr
chmod +x /www/cgi-bin/addr
head -c 1048576 /dev/urandom > /www/big
httpd -p 80 -h /www < /dev/null > /dev/null 2>&1
sha256sum /www/big
"""
FETCH = """
import hashlib, sys, urllib.request
body = urllib.request.urlopen(sys.argv[1], timeout=20).read()
print(hashlib.sha256(body).hexdigest() if sys.argv[1].endswith("/big") else body.decode().strip())
"""


def fetch(ns, url: str) -> str:
    """GET ``url`` from inside ``ns``: the body's text (or, for /big, its SHA-256)."""
    out = netlab.python(ns, FETCH, url)
    assert out.returncode == 0, f"GET {url} from {ns.name}: {out.stderr[-1000:]}"
    return out.stdout.strip().strip("[]").removeprefix("::ffff:")  # busybox httpd: "[::ffff:a.b.c.d]"


def test_port_forward_reaches_a_service_in_a_vm(world, start_broker, make_vm):
    broker = start_broker(namespace=world.broker_ns, config={"lab": WEB})
    with Client(broker.socket_path) as client, ExitStack() as stack:
        tap = client.attach("lab", kind="tap", vnet_hdr=True, mac=WEB_MAC)
        vm = make_vm("web", Nic.from_interface(tap))
        boot_all(stack, [vm])
        tap.close()
        assert vm.dhcp() == WEB_IP, "the reservation by MAC gives the forward's guest its address"
        status, out = vm.run(WEB_SERVER, timeout=30)
        assert status == 0, out
        big_sha256 = out.split()[0]

        # From the outside, to the broker's uplink address: DNAT only, the VM sees the real client.
        assert fetch(world.internet, f"http://{UPLINK}:8080/cgi-bin/addr") == INTERNET
        # Bulk inbound through the DNAT, with the TAP's vnet header offloads in play.
        assert fetch(world.internet, f"http://{UPLINK}:8080/big") == big_sha256
        # From the broker's host itself, to one of its own addresses (masqueraded to the gateway).
        assert fetch(world.broker_ns, f"http://{UPLINK}:8080/cgi-bin/addr") == "192.168.77.1"
        # A port nobody forwarded stays closed.
        assert "FAIL" in netlab.connect(world.internet, UPLINK, 8081, timeout=1)


# -- a VM's network ends with the VM -------------------------------------------------------------


def attachments(client: Client) -> dict[str, dict]:
    """The broker's interfaces by guest MAC, from ``status``."""
    return {a["mac"]: a for net in client.status().networks for a in net.raw["attachments"]}


def has_link(ns, name: str) -> bool:
    return ns.ip("link", "show", "dev", name, check=False).returncode == 0


def assert_released(client: Client, ns, mac: str, name: str, timeout: float = 10) -> None:
    """The broker forgot the interface and its link is gone from the broker's namespace."""
    gone = wait_for(lambda: mac not in attachments(client) and not has_link(ns, name), timeout, 0.1)
    assert gone, f"{name} ({mac}) still there {timeout} s after its VM ended: {attachments(client).get(mac)}"


def vmnet_broker_run(socket_path: str, mac: str) -> list[str]:
    """``vmnet-broker run`` with the NIC spelt by ``--qemu``; QEMU's argv follows."""
    program = Path(sys.executable).with_name("vmnet-broker")
    base = [str(program)] if program.exists() else [sys.executable, "-m", "vmnet_broker"]
    return [*base, "run", "--socket", socket_path, "-v",
            "--network", "shared", "--vnet-hdr", "--mac", mac, "--qemu", "--"]  # fmt: skip


def test_vm_started_with_vmnet_broker_run_loses_its_interface_when_qemu_ends(broker, world, make_vm):
    macs = {"vm1": random_mac(), "vm2": random_mac()}
    with Client(broker.socket_path) as client, ExitStack() as stack:
        vm1, vm2 = (make_vm(name, None, launcher=vmnet_broker_run(broker.socket_path, mac))
                    for name, mac in macs.items())  # fmt: skip
        boot_all(stack, [vm1, vm2])
        ifaces = attachments(client)
        for vm in (vm1, vm2):
            # `run` exec'd QEMU: the process we started is QEMU, alone in its group, and the broker's peer.
            assert os.path.basename(os.readlink(f"/proc/{vm.pid}/exe")).startswith("qemu-system"), vm.pid
            assert vm.group_pids() == [vm.pid]
            iface = ifaces[macs[vm.name]]
            assert (iface["kind"], iface["vnet_hdr"], iface["peer"]) == ("tap", True, vm.pid)
            assert has_link(world.broker_ns, iface["name"])
        # --qemu gave each NIC the broker's MAC: distinct leases (QEMU's default MAC would share one).
        leases = dhcp_all([vm1, vm2])
        assert leases["vm1"] != leases["vm2"]
        status, out = vm1.run(f"ping -c 1 -W 5 {leases['vm2']}", timeout=20)
        assert status == 0, out

        # The guest powers off: QEMU exits 0, `run`'s status, and only vm1's interface goes.
        assert vm1.stop() == 0
        assert_released(client, world.broker_ns, macs["vm1"], ifaces[macs["vm1"]]["name"])
        assert macs["vm2"] in attachments(client)

        # QEMU is killed: nothing of it is left to close anything, the kernel closes its fds.
        os.kill(vm2.pid, signal.SIGKILL)
        assert vm2.process.wait(10) == -signal.SIGKILL
        assert_released(client, world.broker_ns, macs["vm2"], ifaces[macs["vm2"]]["name"])
        assert attachments(client) == {}


def launched(make_vm, broker, net, lifetime: str) -> tuple[Vm, int, dict]:
    """A VM started by tests/qemu_launcher.py, online on ``shared``: (vm, QEMU's pid, its attachment)."""
    launcher = [sys.executable, str(TESTS / "qemu_launcher.py"), "--socket", broker.socket_path,
                "--lifetime", lifetime, "--"]  # fmt: skip
    vm = make_vm(f"vm-{lifetime}", None, launcher=launcher).boot()
    (qemu,) = [pid for pid in vm.group_pids() if pid != vm.pid]
    ping_gateway(vm, net)
    with Client(broker.socket_path) as client:
        (iface,) = [a for a in attachments(client).values() if a["peer"] == vm.pid]
    return vm, qemu, iface


def ping_gateway(vm: Vm, net, address: int = 200) -> None:
    """A static address in the subnet (no DHCP wait), then the gateway must answer."""
    ip = str(ipaddress.IPv4Address(net.subnet) + address)
    status, out = vm.run(f"ip addr add {ip}/24 dev eth0 2>/dev/null; ping -c 1 -W 5 {net.gateway}", timeout=20)
    assert status == 0, f"{vm.name}: no network:\n{out}"


def kill_launcher(vm: Vm) -> None:
    os.kill(vm.pid, signal.SIGKILL)
    assert vm.process.wait(10) == -signal.SIGKILL


IDLE = 0.25  # cores: an idle TCG guest's QEMU uses ~0.01, one spinning on a dead TAP ~1


def test_launcher_killed_with_sigkill_takes_its_vm_and_interface_with_it(broker, world, make_vm):
    """The pattern for a VM that belongs to its launcher: connection inherited + PR_SET_PDEATHSIG."""
    with Client(broker.socket_path) as client:
        net = client.acquire_network("shared")
        vm, qemu, iface = launched(make_vm, broker, net, "tied")
        kill_launcher(vm)
        # The death signal kills QEMU: nothing of the VM is left, spinning or not.
        assert wait_for(lambda: not vm.group_pids(), 10, 0.05), f"QEMU {qemu} outlived its launcher"
        assert_released(client, world.broker_ns, iface["mac"], iface["name"])


def test_vm_holding_the_connection_keeps_its_network_after_its_launcher_is_killed(broker, world, make_vm):
    """A VM meant to outlive its launcher: connection inherited, no death signal."""
    with Client(broker.socket_path) as client:
        net = client.acquire_network("shared")
        vm, qemu, iface = launched(make_vm, broker, net, "detached")
        kill_launcher(vm)
        # QEMU runs on, idle, and still holds the network: the TAP is there and still carries frames.
        assert vm.group_pids() == [qemu]
        assert cpu_share(qemu, 2) < IDLE
        assert iface["mac"] in attachments(client) and has_link(world.broker_ns, iface["name"])
        ping_gateway(vm, net)
        # When the VM itself ends, so does its interface.
        vm.stop()
        assert not vm.group_pids()
        assert_released(client, world.broker_ns, iface["mac"], iface["name"])


def test_vm_without_the_connection_spins_when_its_launcher_dies(broker, world, make_vm):
    """What the two patterns above prevent, shown so the CPU check is known to tell.

    The launcher keeps the connection to itself: its death ends the
    reference, the broker deletes the TAP (correctly), and QEMU 7.2 is left
    reading a dead fd in a loop at a full core.
    """
    with Client(broker.socket_path) as client:
        net = client.acquire_network("shared")
        vm, qemu, iface = launched(make_vm, broker, net, "unsafe")
        kill_launcher(vm)
        assert_released(client, world.broker_ns, iface["mac"], iface["name"])
        assert vm.group_pids() == [qemu]
        share = cpu_share(qemu, 2)
        vm.kill()
        assert share > IDLE, f"QEMU used {share:.2f} cores on a deleted TAP: did QEMU stop spinning on EBADFD?"
