"""``vmnet-broker demo``: the whole story in one command, inside namespaces.

A broker starts in a fresh network namespace; two namespace guests attach to
the ``shared`` network (one by TAP fd, one by datagram socket, as QEMU and
vfkit would), get addresses by DHCP and ping each other by name through the
network's DNS; ``vmnet-broker status`` shows the network; then everything is
removed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from .client import Client
from .guest import Guest
from .sandbox import BrokerProcess


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo() -> int:
    if os.geteuid() != 0:
        print("vmnet-broker demo: needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    ok = True
    with tempfile.TemporaryDirectory(prefix="vmnet-broker-demo-") as workdir:
        broker = BrokerProcess(workdir, log_level="info")
        try:
            broker.start()
            _say(f"broker pid {broker.pid} ready in {broker.ready_seconds * 1000:.0f} ms "
                 f"(namespace {broker.namespace.name}, socket {broker.socket_path})")
            with Client(broker.socket_path) as client:
                net = client.acquire_network("shared")
                _say(f"network {net.name!r}: {net.subnet}/{net.mask}, gateway {net.gateway}, bridge {net.bridge}")
                guests = []
                try:
                    for name, kind in (("vm1", "tap"), ("vm2", "dgram")):
                        iface = client.attach("shared", kind)
                        guest = Guest(iface).start()
                        guests.append(guest)
                        lease = guest.dhcp(hostname=name)
                        _say(f"{name} ({guest.name}): {kind} interface {iface.name}, mac {iface.mac}, "
                             f"DHCP lease {lease['ip']}, dns {lease['dns']}, domain {lease['domain']}")
                    a, b = guests
                    for src, src_name, dst_name in ((a, "vm1", "vm2"), (b, "vm2", "vm1")):
                        reached = src.ping(dst_name, count=3)
                        ok &= reached
                        _say(f"{src_name} -> {dst_name} (by name): {'reply' if reached else 'NO REPLY'}")
                    _say("\n$ vmnet-broker status")
                    status = subprocess.run(
                        [sys.executable, "-m", "vmnet_broker", "status", "--socket", broker.socket_path],
                        capture_output=True, text=True, timeout=10,
                    )  # fmt: skip
                    _say(status.stdout.rstrip() or status.stderr.rstrip())
                finally:
                    for guest in guests:
                        guest.close()
                        guest.interface.close()
        except Exception as e:
            print(f"demo failed: {e}", file=sys.stderr)
            ok = False
        finally:
            code = broker.stop()
            broker.namespace.close()
            _say(f"\nbroker stopped (exit {code}); namespaces and links removed")
    _say("demo ok" if ok else "demo FAILED")
    return 0 if ok else 1
