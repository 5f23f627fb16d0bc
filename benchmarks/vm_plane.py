"""Guest-to-guest TCP throughput between real QEMU VMs, beside the namespace rows.

    sudo .venv/bin/python benchmarks/vm_plane.py [--seconds 5] [--repeat 3] [--streams 1]
        [--json FILE] [--png FILE] [--vm-only]
    .venv/bin/python benchmarks/vm_plane.py --replot FILE.json --png FILE.png

Each VM path gets two guests (the test suite's image, tests/vmimage.py:
Debian's cloud kernel, busybox, iperf3; 1 vCPU, 256 MB each) on the broker's
``shared`` network with static addresses; all pairs boot first, then the
paths take turns running iperf3 from one guest to the other, --repeat
rounds:

- QEMU's own TAP (the baseline): what QEMU does without the broker, a TAP
  it opens by name (``-netdev tap,ifname=``) that we put on the broker's
  bridge; QEMU runs in the broker's namespace to see it
- tap fd + vnet_hdr, tap fd: a TAP fd from the broker (``-netdev tap,fd=``)
- dgram fd: a datagram socket from the broker (``-netdev dgram,local.type=fd``),
  frames cross the broker's pump (no vnet header on QEMU's side)

Everything runs inside a namespace made for the run; nothing touches the
host's network.  Unless --vm-only, benchmarks/data_plane.py's namespace rows
are measured first, so one table, one JSON file and one chart cover both.
Ratios are to each group's baseline from the same run.

Where there is no usable KVM (these machines: see tests/qemu.py), QEMU runs
under TCG and the guests are CPU-bound: the VM numbers measure how fast an
emulated CPU pushes packets through each path, and their ratios, not the
absolute numbers, are what to compare.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import data_plane, report  # noqa: E402
from tests import vmimage  # noqa: E402
from tests.qemu import QEMU, Nic, Vm, kvm_usable  # noqa: E402
from vmnet_broker import Client  # noqa: E402
from vmnet_broker.sandbox import BrokerProcess, Namespace  # noqa: E402

BASELINE = "QEMU's own TAP"
PATHS = (BASELINE, "tap fd + vnet_hdr", "tap fd", "dgram fd")
TCG_NOTE = "QEMU under TCG (no usable KVM): the guests are CPU-bound, so compare ratios, not Gbit/s"
RECEIVER = re.compile(r"^\[\s*(SUM|\d+)\].*?([\d.]+) Mbits/sec.*\breceiver\b", re.M)


def guest_iperf(client: Vm, server_ip: str, seconds: int, streams: int) -> float:
    """Gbit/s received in one iperf3 run from ``client`` to the guest at ``server_ip``."""
    # The server may still be starting: retry a refused connection for a few seconds.
    script = (f"for i in 1 2 3 4 5 6 7 8 9 10; do iperf3 -c {server_ip} -t {seconds} -P {streams} -f m "
              f"&& exit 0; sleep 1; done; exit 1")  # fmt: skip
    status, out = client.run(script, timeout=seconds * 3 + 30)
    found = dict((m.group(1), float(m.group(2))) for m in RECEIVER.finditer(out))
    mbits = found.get("SUM", next(iter(found.values()), None))
    if status != 0 or mbits is None:
        raise RuntimeError(f"{client.name}: iperf3 failed ({status}):\n{out[-2000:]}")
    return mbits / 1000


def nic_for(path: str, client: Client, ns: Namespace, bridge: str, index: int, stack: ExitStack) -> Nic:
    """One guest's NIC on ``path``; whatever it needs is undone when ``stack`` closes."""
    if path == BASELINE:
        name = f"qtap{index}"  # not vmb-*: the broker removes those as leftovers of its own
        ns.ip("tuntap", "add", "dev", name, "mode", "tap")
        stack.callback(ns.ip, "link", "del", name, check=False)
        ns.ip("link", "set", name, "master", bridge, "up")
        return Nic("ifname", ifname=name)
    kind = "dgram" if path.startswith("dgram") else "tap"
    iface = client.attach("shared", kind, vnet_hdr="vnet_hdr" in path)
    stack.callback(client.detach, iface)
    stack.callback(iface.close)
    return Nic.from_interface(iface)


def start_pair(path: str, index: int, client: Client, broker: BrokerProcess, image: vmimage.Image,
               workdir: Path, stack: ExitStack) -> tuple[Vm, str]:  # fmt: skip
    """Two guests on ``path``, addressed, the second running an iperf3 server: (sender, server's IP)."""
    net = client.acquire_network("shared")
    vms, ips = [], []
    for i in (2 * index, 2 * index + 1):
        nic = nic_for(path, client, broker.namespace, net.bridge, i, stack)
        vm = Vm(f"bench{i}", nic, image=image, workdir=workdir, netns=broker.namespace, hard_timeout=1800)
        vms.append(stack.enter_context(vm))  # started now; stopped (and killed) when the stack closes
        ips.append(str(ipaddress.IPv4Address(net.subnet) + 10 + i))
    sender, receiver = vms
    for vm, ip in zip(vms, ips):
        vm.wait_ready(180)
        vm.run(f"ip addr add {ip}/24 dev eth0", check=True)
    receiver.run(f"iperf3 -s -D -B {ips[1]} < /dev/null > /dev/null 2>&1", check=True)
    sender.run(f"ping -c 1 -W 10 {ips[1]}", timeout=20, check=True)
    return sender, ips[1]


def measure(seconds: int, repeat: int, streams: int) -> list[report.Row]:
    """Every path's pair is booted first, then the paths take turns, ``repeat`` rounds.

    Taking turns spreads whatever else the machine does over all paths alike.
    """
    image = vmimage.ensure_image(log=lambda msg: print(f"[vm image] {msg}", flush=True))
    results: dict[str, list[float]] = {path: [] for path in PATHS}
    with tempfile.TemporaryDirectory(prefix="vmb-bench-vm-") as tmp, ExitStack() as stack:
        broker = stack.enter_context(BrokerProcess(Path(tmp) / "broker", log_level="warning"))
        client = stack.enter_context(Client(broker.socket_path))
        started = time.monotonic()
        pairs = {path: start_pair(path, i, client, broker, image, Path(tmp) / "vms", stack)
                 for i, path in enumerate(PATHS)}  # fmt: skip
        print(f"{2 * len(pairs)} VMs up in {time.monotonic() - started:.0f} s", flush=True)
        for sender, server_ip in pairs.values():
            guest_iperf(sender, server_ip, 1, streams)  # warm-up: TCG translates the guests' code on first use
        for round_ in range(repeat):
            for path, (sender, server_ip) in pairs.items():
                results[path].append(guest_iperf(sender, server_ip, seconds, streams))
                print(f"  round {round_ + 1}: {path}: {results[path][-1]:.3f} Gbit/s", flush=True)
    return report.rows("vm", results, BASELINE, direction="guest->guest", streams=streams)


def machine() -> dict:
    qemu = subprocess.run([shutil.which(QEMU) or QEMU, "--version"], capture_output=True, text=True)
    version = re.search(r"version (\S+)", qemu.stdout)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())  # fmt: skip
    return {
        "date": datetime.date.today().isoformat(),
        "cpus": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "qemu": version.group(1) if version else "?",
        "accel": "kvm" if kvm_usable() else "tcg",
    }


def title(meta: dict) -> str:
    streams = f"{meta['streams']} stream{'s' if meta['streams'] != 1 else ''}"
    return (f"guest→guest TCP (iperf3 -t {meta['seconds']}, {streams}, median of {meta['repeat']}), "
            f"{meta['date']}, {meta['cpus']} cores, QEMU {meta['qemu']} {meta['accel'].upper()}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 -t (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per path; the median is reported (default 3)")
    parser.add_argument("--streams", type=int, default=1, help="parallel TCP streams, iperf3 -P (default 1)")
    parser.add_argument("--json", metavar="FILE", help="write the rows (and the machine) as JSON")
    parser.add_argument("--png", metavar="FILE", help="draw a bar chart (needs matplotlib: pip install '.[bench]')")
    parser.add_argument("--vm-only", action="store_true", help="skip the namespace rows")
    parser.add_argument("--replot", metavar="FILE", help="measure nothing: redraw --png from an earlier --json")
    args = parser.parse_args()

    if args.replot:
        rows, meta = report.read_json(args.replot)
    else:
        for tool in ("iperf3", QEMU):
            if shutil.which(tool) is None:
                print(f"needs {tool} (apt-get install --no-install-recommends iperf3 qemu-system-x86)", file=sys.stderr)
                return 1
        meta = {**machine(), "seconds": args.seconds, "repeat": args.repeat, "streams": args.streams}
        rows = []
        if not args.vm_only:
            rows += data_plane.measure(args.seconds, args.repeat, args.streams)
            print(report.table(rows), flush=True)
        rows += measure(args.seconds, args.repeat, args.streams)
        if args.json:
            report.write_json(args.json, rows, meta)
    print(title(meta))
    print(report.table(rows))
    note = TCG_NOTE if meta.get("accel") == "tcg" and any(r.group == "vm" for r in rows) else ""
    if note:
        print(f"({note})")
    if args.png:
        report.draw(rows, args.png, title(meta), note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
