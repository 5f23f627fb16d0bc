"""A VM stand-in: a network namespace whose ``eth0`` is an attachment's far end.

The guest's ``eth0`` is a TAP device inside its own namespace; a native pump
moves frames between that TAP and the fd the broker handed out (a TAP queue
or a dgram socket) — the same path a VMM's virtio-net backend takes.  Used by
the demo, the tests and the benchmarks; ``close()`` removes all of it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from . import _native
from .client import Interface
from .sandbox import Namespace, unique_name


class Guest:
    """A namespace "VM" on ``interface``; its MAC and MTU come from the reply."""

    def __init__(self, interface: Interface, name: str | None = None) -> None:
        self.interface = interface
        self.namespace = Namespace(name or unique_name("vmbg"))
        self._tap: Any = None  # _native.Tap in the guest namespace
        self._pumps: list[Any] = []
        self._etc = Path("/etc/netns") / self.namespace.name

    @property
    def name(self) -> str:
        return self.namespace.name

    @property
    def mac(self) -> str:
        return self.interface.mac

    def start(self) -> Guest:
        try:
            self.namespace.create()
            self._tap = _native.Tap("eth0", vnet_hdr=self.interface.vnet_hdr, netns=self.namespace.path)
            self.namespace.ip(
                "link", "set", "eth0", "address", self.mac, "mtu", str(self.interface.mtu), "up"
            )
            # One pump per queue: a multiqueue TAP spreads flows over its
            # queues, and a queue nobody reads loses its frames.
            frame_size = _native.pump_frame_size(self.interface.mtu, self.interface.vnet_hdr)
            self._pumps = [_native.Pump(fd, self._tap.fds()[0], frame_size) for fd in self.interface.fds]
        except BaseException:
            self.close()
            raise
        return self

    def configure(self, address: str, gateway: str | None = None) -> None:
        """A static address (``"192.168.105.10/24"``) and optional default route."""
        self.namespace.ip("addr", "add", address, "dev", "eth0")
        if gateway:
            self.namespace.ip("route", "add", "default", "via", gateway)

    def dhcp(self, hostname: str | None = None, timeout: int = 10) -> dict[str, str]:
        """``dhcp_lease`` on ``eth0``, plus the lease's resolver for the guest."""
        lease = dhcp_lease(self.namespace, hostname, timeout)
        if lease.get("dns"):
            self._write_resolv_conf(lease["dns"].split(), lease.get("domain", ""))
        return lease

    def _write_resolv_conf(self, servers: list[str], domain: str) -> None:
        # `ip netns exec` bind-mounts /etc/netns/NAME/resolv.conf over
        # /etc/resolv.conf for what runs in the guest: its own resolver, like
        # a VM's.  Removed by close().
        lines = [f"nameserver {server}" for server in servers]
        if domain:
            lines.append(f"search {domain}")
        self._etc.mkdir(parents=True, exist_ok=True)
        (self._etc / "resolv.conf").write_text("\n".join(lines) + "\n")

    def run(self, *cmd: str, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.namespace.run(*cmd, timeout=timeout, check=check)

    def ping(self, address: str, count: int = 1, timeout: float = 2, check: bool = False) -> bool:
        """One or more pings; True if any got an answer."""
        flag = "-6" if ":" in address else "-4"
        cmd = ["ping", flag, "-n", "-q", "-c", str(count), "-W", str(timeout), address]
        return self.run(*cmd, timeout=count * timeout + 10, check=check).returncode == 0

    def stats(self) -> dict[str, int]:
        """The pumps' counters, summed over queues (a = the attachment side)."""
        total: dict[str, int] = {}
        for pump in self._pumps:
            for key, value in pump.stats().items():
                total[key] = total.get(key, 0) + value
        return total

    def close(self) -> None:
        for pump in self._pumps:
            pump.stop()
        self._pumps = []
        if self._tap is not None:
            self._tap.close()
            self._tap = None
        self.namespace.close()
        shutil.rmtree(self._etc, ignore_errors=True)

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def dhcp_lease(namespace: Namespace, hostname: str | None = None, timeout: int = 10) -> dict[str, str]:
    """Get a lease on ``eth0`` with busybox ``udhcpc`` (a real DHCP client) and apply it.

    Returns the lease's variables (``ip``, ``subnet``, ``router``, ``dns``,
    ``domain``, ``lease``, ``mtu``).  Raises ``RuntimeError`` if none came.
    """
    with tempfile.TemporaryDirectory(prefix="vmb-udhcpc-") as tmp:
        script = os.path.join(tmp, "script")
        with open(script, "w") as f:
            f.write(_UDHCPC_SCRIPT)
        os.chmod(script, 0o755)
        cmd = ["busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", str(timeout), "-T", "1", "-A", "1",
               "-O", "mtu", "-s", script]  # fmt: skip
        if hostname:
            cmd += ["-x", f"hostname:{hostname}"]
        out = namespace.run(*cmd, timeout=timeout + 10, check=False)
    match = re.search(r"^lease (.*)$", out.stdout, re.M)
    if out.returncode != 0 or not match:
        raise RuntimeError(f"{namespace.name}: no DHCP lease: {out.stdout}{out.stderr}")
    return dict(item.split("=", 1) for item in match.group(1).split("|") if "=" in item)


# udhcpc calls this with the lease in the environment (busybox's contract).
_UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/$subnet" dev "$interface"
        if [ -n "$router" ]; then ip route replace default via "${router%% *}" dev "$interface"; fi
        echo "lease ip=$ip|subnet=$subnet|router=$router|dns=$dns|domain=$domain|lease=$lease|mtu=$mtu"
        ;;
esac
"""
