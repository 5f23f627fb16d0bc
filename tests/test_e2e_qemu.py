"""End to end with real VMs: QEMU guests on a real broker's network.

The broker runs in its own namespace with an "internet" namespace behind it
(the world of test_e2e_services.py); QEMU runs inside the broker's
namespace too, so nothing here touches the host's network.  Guests boot the
Debian cloud kernel under TCG (see tests/vmimage.py and tests/qemu.py), so
tests assert behaviour, never speed.  The launcher's connection (``Client``)
stays open while QEMU runs: it is what keeps the interfaces alive.
"""

from __future__ import annotations

import hashlib
import ipaddress
import subprocess
import threading
import time
from contextlib import ExitStack

import pytest

from vmnet_broker import Client

from . import netlab, vmimage
from .netlab import INTERNET, UPLINK
from .qemu import Nic, Vm, require_qemu
from .test_e2e_services import World


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

    def make(name: str, nic) -> Vm:
        vm = Vm(name, nic, image=vm_image, workdir=tmp_path, netns=world.broker_ns, hard_timeout=300)
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
