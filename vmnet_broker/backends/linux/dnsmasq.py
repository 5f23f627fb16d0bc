"""DHCP, DNS and IPv6 router advertisements: one dnsmasq per network.

Each dnsmasq is a child of the broker, started with only ``--conf-file`` on
its command line (which also keeps it from reading /etc/dnsmasq.conf), in the
foreground, with a pid file under the state directory so that a broker that
crashed leaves something the next one can find and kill.

Files for network NAME, all in the state directory:
``dnsmasq-NAME.conf`` and ``.pid`` (removed by ``stop``), ``.leases`` (kept, so
restarting a network keeps its guests' addresses) and ``.log`` (dnsmasq's
stderr, truncated at each start).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...config import DEFAULT_LEASE_TIME, DEFAULT_MTU, Reservation
from .state import write_atomically

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

PREFIX = "dnsmasq-"
START_TIMEOUT = 5.0
STOP_TIMEOUT = 3.0
RESOLV_CONF = "/etc/resolv.conf"
# dnsmasq drops root after opening its sockets, lease and pid files; it keeps
# the capabilities it needs.  Named here because the compiled-in default
# differs between distributions (Debian: "dnsmasq", which may not exist).
USER = "nobody"


class DnsmasqError(Exception):
    """dnsmasq did not start (or could not be stopped); the message has its own words."""


@dataclass(frozen=True)
class DnsmasqSpec:
    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    dhcp: bool = True
    dhcp_range: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = None
    lease_time: int = DEFAULT_LEASE_TIME
    reservations: tuple[Reservation, ...] = ()
    dns: bool = True
    dns_servers: tuple[IP, ...] = ()
    domain: str = "internal"
    ipv6_prefix: ipaddress.IPv6Network | None = None
    mode: str = "shared"
    mtu: int = DEFAULT_MTU

    @property
    def ipv6_gateway(self) -> ipaddress.IPv6Address | None:
        """The bridge's address in the prefix (``::1``), which the caller assigns."""
        return None if self.ipv6_prefix is None else self.ipv6_prefix.network_address + 1


def paths(state_dir: Path, name: str) -> dict[str, Path]:
    base = Path(state_dir).absolute() / f"{PREFIX}{name}"
    return {kind: base.with_name(f"{base.name}.{kind}") for kind in ("conf", "pid", "leases", "log")}


def default_range(subnet: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """Every guest address: after the gateway (.1) up to before the broadcast address."""
    return subnet.network_address + 2, subnet.broadcast_address - 1


def config_text(spec: DnsmasqSpec, state_dir: Path) -> str:
    """The dnsmasq configuration for one network (pure)."""
    files = paths(state_dir, spec.name)
    v6 = spec.ipv6_gateway
    lines = [
        f"# vmnet-broker network {spec.name!r}; generated, rewritten at each start.",
        "keep-in-foreground",
        f"pid-file={files['pid']}",
        "log-facility=-",  # stderr, which goes to the .log file
        f"user={USER}",
        # DNS on the bridge's own addresses only, never a wildcard socket on
        # port 53: other dnsmasq instances (other networks, libvirt's) and the
        # host's resolver keep theirs.  interface= rather than listen-address=:
        # RA and DHCPv6 are enabled by interface name only, and it makes the
        # DHCP socket bound to the bridge (SO_BINDTODEVICE).  bind-dynamic
        # rather than bind-interfaces: an address that appears later (IPv6 is
        # unusable until DAD ends) is bound then instead of failing the start.
        f"interface={spec.bridge}",
        "bind-dynamic",
        "except-interface=lo",
        "no-hosts",
    ]

    if spec.dns:
        # domain-needed: a bare guest name that is not ours is not sent upstream.
        lines += [f"domain={spec.domain}", f"local=/{spec.domain}/", "expand-hosts", "domain-needed"]
        if spec.dns_servers:
            lines += ["no-resolv"] + [f"server={server}" for server in spec.dns_servers]
        elif spec.mode == "host":
            lines.append("no-resolv")  # host-only: answer our own names, forward nothing
        else:
            lines.append(f"resolv-file={RESOLV_CONF}")
    else:
        lines.append("port=0")

    if spec.dhcp:
        first, last = spec.dhcp_range or default_range(spec.subnet)
        lines += [
            f"dhcp-range={first},{last},{spec.subnet.netmask},{spec.lease_time}",
            f"dhcp-lease-max={int(last) - int(first) + 1 + len(spec.reservations)}",
            f"dhcp-leasefile={files['leases']}",
            "dhcp-authoritative",
        ]
        lines += [_dhcp_host(r) for r in spec.reservations]
        if spec.mode == "shared":
            lines.append(f"dhcp-option=option:router,{spec.gateway}")
        else:
            lines.append("dhcp-option=option:router")  # empty: no default route
        v4_servers = [s for s in spec.dns_servers if s.version == 4]
        if spec.dns:
            lines.append(f"dhcp-option=option:dns-server,{spec.gateway}")
        elif v4_servers:
            lines.append(f"dhcp-option=option:dns-server,{','.join(map(str, v4_servers))}")
        if spec.mtu != DEFAULT_MTU:
            lines.append(f"dhcp-option=option:mtu,{spec.mtu}")

    if v6 is not None:
        # SLAAC from the prefix on the bridge (constructor: needs the bridge's
        # ::1 in it).  ra-stateless adds DHCPv6 information replies for DNS.
        # dnsmasq advertises a default route only while the namespace forwards
        # IPv6 (see firewall.sysctls); host mode must say lifetime 0 itself.
        lines += ["enable-ra", f"dhcp-range=::,constructor:{spec.bridge},{'ra-stateless' if spec.dns else 'ra-only'}"]
        if spec.dns:
            # The default RDNSS is our link-local address, which a resolver
            # can use only with a scope (%eth0); the global ::1 needs none.
            lines.append(f"dhcp-option=option6:dns-server,[{v6}]")
        if spec.mode == "host":
            lines.append(f"ra-param={spec.bridge},0,0")  # router lifetime 0: a prefix, no default route
    return "\n".join(lines) + "\n"


def _dhcp_host(r: Reservation) -> str:
    return f"dhcp-host={r.mac},{r.ip}" + (f",{r.hostname}" if r.hostname else "")


class Dnsmasq:
    """One dnsmasq process serving one network."""

    def __init__(self, spec: DnsmasqSpec, state_dir: Path) -> None:
        self.spec = spec
        self.paths = paths(state_dir, spec.name)
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Start dnsmasq and return once it serves (its pid file is written after it bound its sockets)."""
        if self.alive():
            return
        self.paths["conf"].parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.paths["conf"], config_text(self.spec, self.paths["conf"].parent))
        self.paths["pid"].unlink(missing_ok=True)
        binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        with open(self.paths["log"], "wb") as log:
            try:
                # Own session: a Ctrl-C at the broker's terminal is the
                # broker's to handle; it stops dnsmasq in its cleanup.
                self._proc = subprocess.Popen(
                    [binary, f"--conf-file={self.paths['conf']}"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                )  # fmt: skip
            except OSError as e:
                raise DnsmasqError(f"dnsmasq for {self.spec.name!r}: cannot run {binary}: {e}") from e
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._cleanup_files()
                self._proc = None
                raise DnsmasqError(f"dnsmasq for {self.spec.name!r} exited with {code}: {self._log_tail()}")
            if _read_pid(self.paths["pid"]) == self._proc.pid:
                return
            time.sleep(0.01)
        self.stop()
        raise DnsmasqError(f"dnsmasq for {self.spec.name!r} not ready after {START_TIMEOUT} s: {self._log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; removes config and pid file, keeps the leases."""
        self._unwatch()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._cleanup_files()

    def alive(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            return False
        return process_running(self._proc.pid)

    def watch(self, loop: asyncio.AbstractEventLoop, on_exit: Callable[[], None]) -> None:
        """Call ``on_exit`` on ``loop`` as soon as dnsmasq exits (not after ``stop``)."""
        if self._proc is None:
            raise DnsmasqError(f"dnsmasq for {self.spec.name!r} is not running")
        self._unwatch()
        self._pidfd = os.pidfd_open(self._proc.pid)
        self._loop = loop

        def exited() -> None:
            self._unwatch()
            if self._proc is not None:
                self._proc.poll()  # reap it
            on_exit()

        loop.add_reader(self._pidfd, exited)

    def _unwatch(self) -> None:
        if self._pidfd is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = self._loop = None

    def _cleanup_files(self) -> None:
        for kind in ("pid", "conf"):
            self.paths[kind].unlink(missing_ok=True)

    def _log_tail(self, limit: int = 2000) -> str:
        try:
            text = self.paths["log"].read_text(errors="replace").strip()
        except OSError:
            return "(no log)"
        return text[-limit:] or "(nothing on stderr)"


def kill_leftovers(state_dir: Path) -> list[int]:
    """Kill the dnsmasq processes an earlier broker left; returns their pids.

    A pid file counts only while its process is a dnsmasq started with that
    network's config file, so a recycled pid is never killed.
    """
    killed = []
    for pid_file in sorted(Path(state_dir).glob(f"{PREFIX}*.pid")):
        pid = _read_pid(pid_file)
        conf = pid_file.with_suffix(".conf").absolute()
        if pid is not None and process_running(pid) and _is_our_dnsmasq(pid, conf):
            try:
                os.kill(pid, signal.SIGTERM)
                killed.append(pid)
            except ProcessLookupError:
                pass
        pid_file.unlink(missing_ok=True)
        conf.unlink(missing_ok=True)
    deadline = time.monotonic() + STOP_TIMEOUT
    while any(process_running(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in killed:
        if process_running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return killed


def _is_our_dnsmasq(pid: int, conf: Path) -> bool:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return comm == "dnsmasq" and f"--conf-file={conf}".encode() in argv


def process_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may linger before init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The command name, in parentheses, may hold spaces: the state follows the last ")".
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


