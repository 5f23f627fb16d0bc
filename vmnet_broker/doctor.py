"""``vmnet-broker doctor``: what is wrong with this host's broker setup.

It looks and reports; it never changes anything.  Every check yields
findings; the exit status is 0 when none is a problem.  The checks are the
things users of VM networking tools trip over: leftovers of a crashed
broker (links, the nftables table, dnsmasq daemons), subnets that collide
with routes (a VPN), networks the running broker marks degraded, directories
others could write to while root writes in them, config files that are
refused, and missing tools.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .client import Client, default_socket_path
from .config import NetworkConfig, load_config_dir
from .errors import BrokerError

PROBE_TIMEOUT = 1.0
TOOLS = ("nft", "dnsmasq")


@dataclass(frozen=True)
class Finding:
    problem: bool
    topic: str
    text: str

    def __str__(self) -> str:
        return f"{'problem' if self.problem else 'ok':<8} {self.topic:<9} {self.text}"


def ok(topic: str, text: str) -> Finding:
    return Finding(False, topic, text)


def problem(topic: str, text: str) -> Finding:
    return Finding(True, topic, text)


def diagnose(socket_path: str | None, state_dir: str, config_dir: str | None) -> list[Finding]:
    socket_path = socket_path or default_socket_path()
    status = _broker_status(socket_path)
    findings = list(_tools())
    findings += _directory("socket", Path(socket_path).parent)
    findings += _socket(socket_path, status)
    findings += _directory("state", Path(state_dir))
    configs, config_findings = _configs(config_dir)
    findings += config_findings
    if status is None:
        findings += _leftovers(Path(state_dir))
    else:
        findings += _degraded(status)
    findings += _overlaps(configs, status)
    return findings


def _broker_status(socket_path: str) -> dict | None:
    """The running broker's status, or None if nobody answers."""
    try:
        with Client(socket_path, timeout=PROBE_TIMEOUT) as client:
            return client.status().raw
    except (BrokerError, OSError):
        return None


def _tools() -> Iterator[Finding]:
    for tool in TOOLS:
        path = shutil.which(tool)
        yield ok("tools", f"{tool}: {path}") if path else problem("tools", f"{tool} is not installed")
    if os.path.exists("/dev/net/tun"):
        yield ok("tools", "/dev/net/tun present")
    else:
        yield problem("tools", "/dev/net/tun is missing (modprobe tun)")


def _directory(topic: str, path: Path) -> Iterator[Finding]:
    """A directory root writes in must be root's and writable by nobody else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        yield ok(topic, f"{path} does not exist yet (the broker creates it)")
        return
    if stat.S_ISLNK(st.st_mode):
        yield problem(topic, f"{path} is a symlink: the broker must not follow it")
        return
    if not stat.S_ISDIR(st.st_mode):
        yield problem(topic, f"{path} is not a directory")
        return
    if st.st_uid != 0:
        yield problem(topic, f"{path} is owned by uid {st.st_uid}, not root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        yield problem(topic, f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
                             "they could swap files the broker writes for symlinks")  # fmt: skip
    elif st.st_uid == 0:
        yield ok(topic, f"{path} is root's, mode {stat.S_IMODE(st.st_mode):04o}")
    if topic == "state":
        for entry in sorted(path.iterdir()):
            if entry.is_symlink():
                yield problem(topic, f"{entry} is a symlink")


def _socket(socket_path: str, status: dict | None) -> Iterator[Finding]:
    try:
        st = os.lstat(socket_path)
    except FileNotFoundError:
        yield ok("broker", f"no broker at {socket_path} (none running, or socket activation not yet started)")
        return
    if not stat.S_ISSOCK(st.st_mode):
        yield problem("broker", f"{socket_path} is not a socket")
    elif status is None:
        yield problem("broker", f"{socket_path} exists but no broker answers (a crashed broker's socket file)")
    else:
        yield ok("broker", f"broker {status.get('version')} answers at {socket_path}, "
                           f"{len(status.get('networks', []))} network(s), {status.get('connections', '?')} connection(s)")  # fmt: skip


def _configs(config_dir: str | None) -> tuple[dict[str, NetworkConfig], list[Finding]]:
    """Load the config dir as the broker would, collecting what it would log."""
    errors: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    config_log = logging.getLogger("vmnet_broker.config")
    handler = Collect()
    config_log.addHandler(handler)
    propagate, config_log.propagate = config_log.propagate, False
    try:
        configs = load_config_dir(config_dir)
    finally:
        config_log.removeHandler(handler)
        config_log.propagate = propagate
    findings = [problem("config", e) for e in errors]
    findings.append(ok("config", f"networks offered: {', '.join(sorted(configs))}"))
    return configs, findings


def _leftovers(state_dir: Path) -> Iterator[Finding]:
    """With no broker running, anything of ours is a crash's leftover."""
    from . import _native
    from .backends.linux import dnsmasq, names

    links = [link.name for link in _native.list_links(names.PREFIX)]
    for name in links:
        yield problem("leftover", f"link {name} (the next broker start removes it)")
    tables = []  # the NAT table and the bridge filter's (guard.py)
    for family in ("inet", "bridge") if shutil.which("nft") else ():
        listed = subprocess.run(["nft", "list", "table", family, names.NFT_TABLE], capture_output=True, timeout=10)
        if listed.returncode == 0:
            tables.append(family)
            yield problem("leftover", f"nftables table {family} {names.NFT_TABLE} (the next broker start removes it)")
    pids = []
    if state_dir.is_dir():
        for pid_file, pid in dnsmasq.leftovers(state_dir):
            if pid is not None:
                pids.append(pid)
                yield problem("leftover", f"dnsmasq pid {pid} from {pid_file} (the next broker start stops it)")
    if not links and not pids and not tables:
        yield ok("leftover", "no links, nftables table or dnsmasq left by a broker")


def _degraded(status: dict) -> Iterator[Finding]:
    bad = False
    for net in status.get("networks", []):
        reason = net.get("degraded")
        if reason:
            bad = True
            yield problem("network", f"{net.get('name')!r} is degraded: {reason}")
    if not bad:
        yield ok("network", "no network of the running broker is degraded")


def _overlaps(configs: dict[str, NetworkConfig], status: dict | None) -> Iterator[Finding]:
    """Configured and live subnets against this namespace's routes (all tables)."""
    from . import _native

    live = {}
    for net in (status or {}).get("networks", []):
        try:
            live[net["name"]] = ipaddress.IPv4Network(f"{net['subnet']}/{net['mask']}")
        except (KeyError, ValueError):
            continue
    wanted = {name: c.subnet for name, c in configs.items() if c.subnet is not None}
    wanted.update(live)
    routes = []
    for dest, length, table in _native.list_routes(socket.AF_INET):
        try:
            routes.append((ipaddress.IPv4Network(f"{dest}/{length}", strict=False), table))
        except ValueError:
            continue
    found = False
    for name, subnet in sorted(wanted.items()):
        for route, table in routes:
            # A live network's own route is its bridge's; anything else overlapping is a clash.
            if route.prefixlen == 0 or table == 255 or (name in live and route == subnet):
                continue
            if subnet.overlaps(route):
                found = True
                yield problem("subnet", f"network {name!r} {subnet} overlaps route {route} (table {table})")
    if not found:
        yield ok("subnet", f"no configured or live subnet overlaps a route ({len(routes)} routes checked)")


def run_doctor(socket_path: str | None, state_dir: str, config_dir: str | None) -> int:
    """Print every finding; 0 if none is a problem, 1 otherwise."""
    findings = diagnose(socket_path, state_dir, config_dir)
    for finding in findings:
        print(finding)
    problems = sum(f.problem for f in findings)
    print(f"{problems} problem(s)" if problems else "all well")
    return 1 if problems else 0
