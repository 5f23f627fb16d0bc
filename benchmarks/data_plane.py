"""Guest-to-guest TCP throughput through the broker, against a veth baseline.

    sudo .venv/bin/python benchmarks/data_plane.py [--seconds 3] [--repeat 3] [--streams 1]

Every path runs iperf3 between two namespace guests, all inside namespaces
made for the run:

- baseline: veth - bridge - veth, the kernel's own path (the ceiling)
- tap: each guest's TAP is pumped to a broker TAP fd (what a VMM holding the
  fd does with its own thread)
- dgram: as tap, plus the broker's native pump between the socketpair and its
  TAP: the file-handle path of vfkit/libkrun/QEMU dgram
- each with and without vnet_hdr (TSO: 64 KiB frames pass unsplit)

Prints Gbit/s (median of --repeat runs) and the ratio to the baseline of
the same run, since this machine is shared and noisy.  ``measure()`` gives
the same rows to benchmarks/vm_plane.py, which puts them beside real VMs'
in one table, JSON file and chart.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report  # noqa: E402
from vmnet_broker import Client  # noqa: E402
from vmnet_broker.guest import Guest  # noqa: E402
from vmnet_broker.sandbox import BrokerProcess, Namespace, unique_name  # noqa: E402

SERVER, CLIENT = "10.0.0.2", "10.0.0.1"


BASELINE = "veth-bridge-veth"


def iperf(client_ns: Namespace, server_ns: Namespace, server_ip: str, seconds: int, streams: int = 1) -> float:
    """Gbit/s received by the server in one TCP run."""
    server = server_ns.popen(["iperf3", "-s", "-1", "-B", server_ip], stdout=subprocess.DEVNULL)
    try:
        out = None
        for _ in range(50):  # the server needs a moment to listen
            run = client_ns.run("iperf3", "-c", server_ip, "-t", str(seconds), "-P", str(streams), "-J",
                                check=False, timeout=seconds + 30)  # fmt: skip
            try:
                result = json.loads(run.stdout)
            except ValueError:
                result = {"error": run.stderr}
            if "error" not in result:
                out = result
                break
            time.sleep(0.1)
        if out is None:
            raise RuntimeError(f"iperf3 failed: {run.stdout[-500:]}{run.stderr[-500:]}")
        return out["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.kill()
        server.wait()


def baseline(seconds: int, repeat: int, streams: int = 1) -> list[float]:
    hub, a, b = (Namespace(unique_name("vmbt")) for _ in range(3))
    try:
        for ns in (hub, a, b):
            ns.create()
        hub.ip("link", "add", "br0", "type", "bridge")
        hub.ip("link", "set", "br0", "up")
        for i, (ns, ip) in enumerate(((a, CLIENT), (b, SERVER))):
            hub.ip("link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns.name)
            hub.ip("link", "set", f"p{i}", "master", "br0", "up")
            ns.ip("addr", "add", f"{ip}/24", "dev", "eth0")
            ns.ip("link", "set", "eth0", "up")
        return [iperf(a, b, SERVER, seconds, streams) for _ in range(repeat)]
    finally:
        for ns in (hub, a, b):
            ns.close()


def through_broker(socket_path: str, kind: str, vnet_hdr: bool, seconds: int, repeat: int,
                   streams: int = 1) -> list[float]:  # fmt: skip
    with Client(socket_path) as client:
        net = client.acquire_network("shared")
        guests = []
        try:
            for host in (10, 11):
                guest = Guest(client.attach("shared", kind, vnet_hdr=vnet_hdr)).start()
                guests.append(guest)
                guest.configure(f"{net.subnet[:-1]}{host}/24")
            a, b = guests
            server_ip = f"{net.subnet[:-1]}11"
            return [iperf(a.namespace, b.namespace, server_ip, seconds, streams) for _ in range(repeat)]
        finally:
            for guest in guests:
                guest.close()
                guest.interface.close()
                client.detach(guest.interface)


def measure(seconds: int, repeat: int, streams: int = 1) -> list[report.Row]:
    """The namespace rows: the veth baseline, then tap and dgram with and without vnet_hdr."""
    results: dict[str, list[float]] = {BASELINE: baseline(seconds, repeat, streams)}
    with tempfile.TemporaryDirectory(prefix="vmb-bench-") as tmp:
        with BrokerProcess(tmp, log_level="warning") as broker:
            for kind in ("tap", "dgram"):
                for vnet_hdr in (True, False):
                    label = f"{kind} fd{' + vnet_hdr' if vnet_hdr else ''}"  # the names vm_plane.py uses
                    results[label] = through_broker(broker.socket_path, kind, vnet_hdr, seconds, repeat, streams)
    return report.rows("namespace", results, BASELINE, direction="guest->guest", streams=streams)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--streams", type=int, default=1, help="parallel TCP streams (iperf3 -P)")
    args = parser.parse_args()
    if shutil.which("iperf3") is None:
        print("needs iperf3 (apt-get install iperf3)", file=sys.stderr)
        return 1
    print(report.table(measure(args.seconds, args.repeat, args.streams)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
