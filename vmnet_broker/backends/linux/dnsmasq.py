"""DHCP, DNS and IPv6 router advertisements: one dnsmasq per network.

Each dnsmasq is a child of the broker, started with only ``--conf-file`` on
its command line (which also keeps it from reading /etc/dnsmasq.conf), in the
foreground, with a pid file under the state directory so that a broker that
crashed leaves something the next one can find and kill.

Files for network NAME, all in the state directory:
``dnsmasq-NAME.conf`` and ``.pid`` (removed by ``stop``), ``.leases`` (kept, so
restarting a network keeps its guests' addresses) and ``.log`` (dnsmasq's
stderr, made afresh at each start).  None is ever opened through a symlink:
the config and log are created with ``O_EXCL|O_NOFOLLOW`` in a directory fd,
and what dnsmasq itself opens as root (leases) is checked to be a plain
regular file first (files.py).

The config text is generated from parsed values only, and ``config_text``
checks every value and every line against an explicit character set before
anything is written: a value that could carry a second option (a newline)
never reaches dnsmasq, whatever let it through before.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import logging
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ... import files
from ...config import DEFAULT_LEASE_TIME, DEFAULT_MTU, MAX_MTU, MIN_MTU, Reservation
from ...config import valid_domain, valid_hostname, valid_ifname, valid_name
from . import programs

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

log = logging.getLogger(__name__)

PREFIX = "dnsmasq-"
START_TIMEOUT = 5.0
READY_POLL = 0.01  # how often start and stop look whether dnsmasq is there (or gone)
STOP_TIMEOUT = 3.0
RESOLV_CONF = "/etc/resolv.conf"
# dnsmasq drops root after opening its sockets, lease and pid files; it keeps
# the capabilities it needs.  Named here because the compiled-in default
# differs between distributions (Debian: "dnsmasq", which may not exist).
USER = "nobody"
LOG_TAIL = 2000  # bytes of dnsmasq's stderr quoted in an error
# Characters of a state-directory path that dnsmasq's config parser takes
# literally (no whitespace, quotes, '#', backslash or ',').
_PATH = re.compile(r"/[A-Za-z0-9._/+@~-]*")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# Every line but the first (a comment): an option, '=' and a value of these.
_OPTION_LINE = re.compile(r"[a-z][a-z0-9-]*(=[A-Za-z0-9._,:/=\[\]@+~-]*)?")


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
    """The dnsmasq configuration for one network (pure).

    Raises ``DnsmasqError`` for a value outside its character set, and for
    any line that is not one option: defence in depth behind config.py.
    """
    _check_spec(spec, state_dir)
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
            # The only DHCP server on a bridge the broker owns: answer
            # unknown clients at once (a lost lease file costs no timeouts),
            # commit in two messages for a client that asks (RFC 4039), and
            # skip the ~3 s ping before each offer, which serialised DHCP
            # (4 guests booting together waited 12 s).  A guest with a static
            # address belongs outside dhcp_range or in reservations.
            "dhcp-authoritative",
            "dhcp-rapid-commit",
            "no-ping",
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
    for line in lines[1:]:
        if not _OPTION_LINE.fullmatch(line):
            raise DnsmasqError(f"dnsmasq config for {spec.name!r}: refusing line {line!r}")
    return "\n".join(lines) + "\n"


def usable_state_dir(state_dir: str | Path) -> bool:
    """Whether dnsmasq's config can name files in ``state_dir`` (checked at start-up too)."""
    return _PATH.fullmatch(str(Path(state_dir).absolute())) is not None


def _check_spec(spec: DnsmasqSpec, state_dir: Path) -> None:
    """Each value whole, against what it may be; parsed addresses without scope ids."""
    problems = []
    if not valid_name(spec.name):
        problems.append(f"network name {spec.name!r}")
    if not valid_ifname(spec.bridge):
        problems.append(f"bridge {spec.bridge!r}")
    if not usable_state_dir(state_dir):
        problems.append(f"state directory {str(state_dir)!r} (letters, digits and ._/+@~- only)")
    if spec.dns and not valid_domain(spec.domain):
        problems.append(f"domain {spec.domain!r}")
    if not (isinstance(spec.lease_time, int) and isinstance(spec.mtu, int) and MIN_MTU <= spec.mtu <= MAX_MTU):
        problems.append(f"lease time {spec.lease_time!r} or mtu {spec.mtu!r}")
    addresses: list[object] = [spec.gateway, *spec.dns_servers, *(spec.dhcp_range or ())]
    for r in spec.reservations:
        addresses.append(r.ip)
        if not (isinstance(r.mac, str) and _MAC.fullmatch(r.mac)):
            problems.append(f"MAC {r.mac!r}")
        if r.hostname is not None and not valid_hostname(r.hostname):
            problems.append(f"hostname {r.hostname!r}")
    for address in addresses:
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address) or getattr(address, "scope_id", None):
            problems.append(f"address {str(address)!r}")
    for network in (spec.subnet, spec.ipv6_prefix):
        if network is not None and getattr(network.network_address, "scope_id", None):
            problems.append(f"network {str(network)!r}")
    if problems:
        raise DnsmasqError(f"dnsmasq config for {spec.name!r}: refusing {'; '.join(problems)}")


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

    @property
    def returncode(self) -> int | None:
        """How the last dnsmasq ended (``Popen.returncode``: -9 for SIGKILL); None while it runs."""
        return None if self._proc is None else self._proc.returncode

    def start(self) -> None:
        """Start dnsmasq and return once it serves (its pid file is written after it bound its sockets).

        Blocks up to START_TIMEOUT: for start-up and tests; the broker,
        serving, uses ``start_async``.
        """
        if self.alive():
            return
        self._spawn()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._ready():
                return
            time.sleep(READY_POLL)
        self.stop()
        raise self._not_ready()

    async def start_async(self) -> None:
        """``start`` without blocking the event loop: the same steps, waiting with ``asyncio.sleep``.

        A dnsmasq that is not ready within START_TIMEOUT is stopped (and so
        is one whose caller is cancelled).
        """
        if self.alive():
            return
        self._spawn()
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if self._ready():
                    return
                await asyncio.sleep(READY_POLL)
        except BaseException:
            await self.stop_async()
            raise
        await self.stop_async()
        raise self._not_ready()

    def _spawn(self) -> None:
        """Write the config, start dnsmasq (fast: files and a fork)."""
        state_dir = self.paths["conf"].parent
        text = config_text(self.spec, state_dir)
        files.secure_directory(state_dir, "state")
        binary = programs.which("dnsmasq")
        with files.open_directory(state_dir) as dir_fd:
            files.write_atomically(dir_fd, self.paths["conf"].name, text.encode())
            files.unlink(dir_fd, self.paths["pid"].name)
            # dnsmasq opens the lease file as root, following symlinks.
            files.keep_regular(dir_fd, self.paths["leases"].name)
            log = files.create_fresh(dir_fd, self.paths["log"].name)
        try:
            # Own session: a Ctrl-C at the broker's terminal is the
            # broker's to handle; it stops dnsmasq in its cleanup.
            self._proc = subprocess.Popen(
                [binary, f"--conf-file={self.paths['conf']}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            raise DnsmasqError(f"dnsmasq for {self.spec.name!r}: cannot run {binary}: {e}") from e
        finally:
            os.close(log)

    def _ready(self) -> bool:
        """True once it serves; raises DnsmasqError if it exited."""
        assert self._proc is not None
        if self._proc.poll() is not None:
            code = self._proc.returncode
            self._cleanup_files()
            self._proc = None
            raise DnsmasqError(f"dnsmasq for {self.spec.name!r} exited with {code}: {self._log_tail()}")
        return _read_pid(self.paths["pid"]) == self._proc.pid

    def _not_ready(self) -> DnsmasqError:
        return DnsmasqError(f"dnsmasq for {self.spec.name!r} not ready after {START_TIMEOUT} s: {self._log_tail()}")

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

    async def stop_async(self) -> None:
        """``stop`` without blocking the event loop (a dnsmasq that ignores SIGTERM took 3 s)."""
        self._unwatch()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            deadline = time.monotonic() + STOP_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(READY_POLL)
            if proc.poll() is None:
                proc.kill()
                deadline = time.monotonic() + STOP_TIMEOUT
                while proc.poll() is None and time.monotonic() < deadline:  # SIGKILL: reaped in a moment
                    await asyncio.sleep(READY_POLL)
                if proc.poll() is None:  # stuck in the kernel (D state): not ours to wait for
                    log.error("dnsmasq pid %d survived SIGKILL for %g s; leaving it", proc.pid, STOP_TIMEOUT)
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

    def _log_tail(self, limit: int = LOG_TAIL) -> str:
        try:
            text = files.read_tail(self.paths["log"], limit).decode(errors="replace").strip()
        except OSError:
            return "(no log)"
        return text or "(nothing on stderr)"


def leftovers(state_dir: Path) -> list[tuple[Path, int | None]]:
    """Every pid file in ``state_dir`` and the live dnsmasq of ours it names, if any.

    A pid file counts only while its process is a dnsmasq started with that
    network's config file, so a recycled pid is never taken for ours.
    """
    found: list[tuple[Path, int | None]] = []
    for pid_file in sorted(Path(state_dir).glob(f"{PREFIX}*.pid")):
        pid = _read_pid(pid_file)
        conf = pid_file.with_suffix(".conf").absolute()
        ours = pid is not None and process_running(pid) and _is_our_dnsmasq(pid, conf)
        found.append((pid_file, pid if ours else None))
    return found


def kill_leftovers(state_dir: Path) -> list[int]:
    """Kill the dnsmasq processes an earlier broker left; returns their pids."""
    killed = []
    for pid_file, pid in leftovers(state_dir):
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
                killed.append(pid)
            except ProcessLookupError:
                pass
        pid_file.unlink(missing_ok=True)
        pid_file.with_suffix(".conf").absolute().unlink(missing_ok=True)
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
    """The pid in a pid file: a regular file (never a symlink or FIFO) of a few bytes."""
    try:
        pid = int(files.read_regular(path, 32).strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


