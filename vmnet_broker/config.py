"""Network configuration: the builtins and ``<config-dir>/<name>.json`` files.

Pure parsing and validation.  A file that does not validate is reported with
its path and reason and that network is not offered; the others still are.
Keys are upstream's (``description``, ``mode``, ``subnet``, ``mask``) plus the
extensions documented in docs/configuration.md.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import logging
import pwd
import re
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

from .protocol import normalize_mac, ProtocolError

log = logging.getLogger(__name__)

DEFAULT_CONFIG_DIR = "/etc/vmnet-broker.d"
DEFAULT_MTU = 1500
DEFAULT_LEASE_TIME = 3600
MODES = ("shared", "host")
PROTOS = ("tcp", "udp")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_DOMAIN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")

KEYS = {
    "description", "mode", "subnet", "mask", "mtu", "dhcp", "dhcp_range",
    "lease_time", "reservations", "dns", "dns_servers", "domain", "ipv6",
    "ipv6_prefix", "port_forwards", "external_interface", "allowed_users",
    "allowed_groups",
}  # fmt: skip


class ConfigError(ValueError):
    """A network's configuration is invalid; the message says which key and why."""


@dataclass(frozen=True)
class Reservation:
    mac: str
    ip: ipaddress.IPv4Address
    hostname: str | None = None


@dataclass(frozen=True)
class PortForward:
    proto: str
    host_port: int
    guest_ip: ipaddress.IPv4Address
    guest_port: int


@dataclass(frozen=True)
class NetworkConfig:
    """Everything the broker needs to know to create one network."""

    name: str
    mode: str = "shared"
    description: str = ""
    subnet: ipaddress.IPv4Network | None = None  # None: pick a free one
    mtu: int = DEFAULT_MTU
    dhcp: bool = True
    dhcp_range: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = None
    lease_time: int = DEFAULT_LEASE_TIME
    reservations: tuple[Reservation, ...] = ()
    dns: bool = True
    dns_servers: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    domain: str | None = None  # None: "<name>.internal"
    ipv6: bool = False
    ipv6_prefix: ipaddress.IPv6Network | None = None  # None with ipv6: a stable ULA /64
    port_forwards: tuple[PortForward, ...] = ()
    external_interface: str | None = None
    allowed_uids: frozenset[int] | None = None  # None: everyone
    allowed_gids: frozenset[int] | None = None
    source: str = "builtin"  # where this came from, for messages

    @property
    def dns_domain(self) -> str:
        return self.domain or f"{self.name}.internal"

    def allows(self, uid: int, gids: set[int]) -> bool:
        """Root always; otherwise everyone unless users/groups are listed."""
        if uid == 0 or (self.allowed_uids is None and self.allowed_gids is None):
            return True
        if self.allowed_uids and uid in self.allowed_uids:
            return True
        return bool(self.allowed_gids and self.allowed_gids & gids)


BUILTINS = {
    "shared": NetworkConfig("shared", mode="shared", description="NAT to the outside", ipv6=True),
    "host": NetworkConfig("host", mode="host", description="host-only"),
}


def parse_network(name: str, obj: Any, source: str = "builtin") -> NetworkConfig:
    """Validate one network's JSON object."""
    if not _NAME.match(name):
        raise ConfigError(f"network name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if not isinstance(obj, dict):
        raise ConfigError("the file must hold a JSON object")
    unknown = sorted(set(obj) - KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s): {', '.join(unknown)}")

    base = BUILTINS.get(name, NetworkConfig(name))
    cfg: dict[str, Any] = {"source": source}

    if "description" in obj:
        cfg["description"] = _typed(obj, "description", str)
    mode = obj.get("mode", base.mode)
    if mode not in MODES:
        raise ConfigError(f"'mode' must be one of {', '.join(MODES)}, not {mode!r}")
    cfg["mode"] = mode

    if "subnet" in obj or "mask" in obj:
        cfg["subnet"] = _subnet(obj)
    if "mtu" in obj:
        cfg["mtu"] = _int(obj, "mtu", 68, 65535)
    for key in ("dhcp", "dns", "ipv6"):
        if key in obj:
            cfg[key] = _typed(obj, key, bool)
    if "lease_time" in obj:
        cfg["lease_time"] = _int(obj, "lease_time", 120, 10 * 365 * 86400)
    if "dns_servers" in obj:
        cfg["dns_servers"] = tuple(_ip(v, "dns_servers") for v in _list(obj, "dns_servers"))
    if "domain" in obj:
        domain = _typed(obj, "domain", str)
        if not _DOMAIN.match(domain):
            raise ConfigError(f"'domain' {domain!r} is not a DNS domain")
        cfg["domain"] = domain
    if "ipv6_prefix" in obj:
        cfg["ipv6_prefix"] = _ipv6_prefix(obj["ipv6_prefix"])
        cfg.setdefault("ipv6", True)
    if "external_interface" in obj:
        ifname = _typed(obj, "external_interface", str)
        if not _IFNAME.match(ifname):
            raise ConfigError(f"'external_interface' {ifname!r} is not an interface name")
        cfg["external_interface"] = ifname
    if "allowed_users" in obj:
        cfg["allowed_uids"] = frozenset(_user(v) for v in _list(obj, "allowed_users"))
    if "allowed_groups" in obj:
        cfg["allowed_gids"] = frozenset(_group(v) for v in _list(obj, "allowed_groups"))

    config = replace(base, **cfg)
    subnet = config.subnet
    if "dhcp_range" in obj:
        config = replace(config, dhcp_range=_dhcp_range(obj["dhcp_range"], subnet))
    if "reservations" in obj:
        config = replace(config, reservations=_reservations(obj["reservations"], subnet))
    if "port_forwards" in obj:
        if config.mode != "shared":
            raise ConfigError("'port_forwards' needs mode 'shared'")
        config = replace(config, port_forwards=_port_forwards(obj["port_forwards"], subnet))
    return config


def load_config_dir(path: str | Path | None) -> dict[str, NetworkConfig]:
    """The builtins, overridden and extended by ``*.json`` files in ``path``.

    Invalid files are logged with their path and reason and skipped.
    """
    networks = dict(BUILTINS)
    if path is None:
        return networks
    directory = Path(path)
    if not directory.is_dir():
        if directory.exists():
            log.error("config dir %s is not a directory; offering builtins only", directory)
        return networks
    for file in sorted(directory.glob("*.json")):
        try:
            obj = json.loads(file.read_text(encoding="utf-8"))
            config = parse_network(file.stem, obj, source=str(file))
            _check_host_ports(config, (n for name, n in networks.items() if name != file.stem))
            networks[file.stem] = config
        except (OSError, UnicodeDecodeError, ValueError) as e:
            # ConfigError and json.JSONDecodeError are both ValueErrors.
            log.error("config %s: %s; network %r is not offered", file, e, file.stem)
            networks.pop(file.stem, None)
    return networks


def _check_host_ports(config: NetworkConfig, others: Iterable[NetworkConfig]) -> None:
    """One host port forwards to one guest: the first file (by name) keeps it."""
    for other in others:
        for mine in config.port_forwards:
            for theirs in other.port_forwards:
                if (mine.proto, mine.host_port) == (theirs.proto, theirs.host_port):
                    raise ConfigError(
                        f"port forward {mine.proto}/{mine.host_port} is already used by network {other.name!r}"
                    )


# -- field validators ---------------------------------------------------------


def _typed(obj: dict[str, Any], key: str, kind: type) -> Any:
    value = obj[key]
    if kind is not bool and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"'{key}' must be a {kind.__name__}, not {json.dumps(value)}")
    return value


def _int(obj: dict[str, Any], key: str, low: int, high: int) -> int:
    value = _typed(obj, key, int)
    if not low <= value <= high:
        raise ConfigError(f"'{key}' must be between {low} and {high}, not {value}")
    return value


def _list(obj: dict[str, Any], key: str) -> list[Any]:
    return _typed(obj, key, list)


def _ip(value: Any, key: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"'{key}': {value!r} is not an IP address") from None


def _ipv4(value: Any, key: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise ConfigError(f"'{key}': {value!r} is not an IPv4 address") from None


def _subnet(obj: dict[str, Any]) -> ipaddress.IPv4Network:
    if "subnet" not in obj:
        raise ConfigError("'mask' needs 'subnet'")
    address = _ipv4(obj["subnet"], "subnet")
    mask = obj.get("mask", "255.255.255.0")
    try:
        # The network address and the host's .1 address (vmnet's convention)
        # name the same network; strict=False accepts either.
        network = ipaddress.IPv4Network(f"{address}/{mask}", strict=False)
    except ValueError:
        raise ConfigError(f"'mask' {mask!r} is not an IPv4 netmask") from None
    if network.prefixlen > 30:
        raise ConfigError(f"subnet {network} is too small: a /30 or larger is needed")
    if address not in (network.network_address, network.network_address + 1):
        raise ConfigError(
            f"'subnet' {address} must be the network address {network.network_address} "
            f"or the host address {network.network_address + 1}"
        )
    if not (network.is_private or network.is_reserved) or network.is_loopback or network.is_link_local:
        raise ConfigError(f"subnet {network} is not a private IPv4 range")
    return network


def _ipv6_prefix(value: Any) -> ipaddress.IPv6Network:
    try:
        prefix = ipaddress.IPv6Network(value)
    except (ValueError, TypeError):
        raise ConfigError(f"'ipv6_prefix' {value!r} is not an IPv6 prefix like fd00:1:2:3::/64") from None
    if prefix.prefixlen != 64:
        raise ConfigError("'ipv6_prefix' must be a /64 (SLAAC needs 64-bit interface ids)")
    return prefix


def _in_subnet(ip: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network | None, key: str) -> None:
    if subnet is None:
        raise ConfigError(f"'{key}' needs a fixed 'subnet'")
    usable = (subnet.network_address + 1, subnet.broadcast_address)
    if not subnet.network_address + 1 < ip < subnet.broadcast_address:
        raise ConfigError(f"'{key}': {ip} is not a guest address of {subnet} (gateway {usable[0]})")


def _dhcp_range(value: Any, subnet: ipaddress.IPv4Network | None) -> tuple[ipaddress.IPv4Address, ...]:
    if not isinstance(value, list) or len(value) != 2:
        raise ConfigError("'dhcp_range' must be [first, last]")
    first, last = (_ipv4(v, "dhcp_range") for v in value)
    for ip in (first, last):
        _in_subnet(ip, subnet, "dhcp_range")
    if first > last:
        raise ConfigError(f"'dhcp_range' {first} comes after {last}")
    return (first, last)


def _reservations(value: Any, subnet: ipaddress.IPv4Network | None) -> tuple[Reservation, ...]:
    if not isinstance(value, list):
        raise ConfigError("'reservations' must be a list")
    result: list[Reservation] = []
    for item in value:
        if not isinstance(item, dict) or not {"mac", "ip"} <= set(item) <= {"mac", "ip", "hostname"}:
            raise ConfigError("each reservation is {'mac', 'ip'} with an optional 'hostname'")
        try:
            mac = normalize_mac(item["mac"])
        except ProtocolError as e:
            raise ConfigError(f"reservation: {e}") from None
        ip = _ipv4(item["ip"], "reservations")
        _in_subnet(ip, subnet, "reservations")
        hostname = item.get("hostname")
        if hostname is not None and (not isinstance(hostname, str) or not _HOSTNAME.match(hostname)):
            raise ConfigError(f"reservation hostname {hostname!r} is not a DNS label")
        if any(r.mac == mac or r.ip == ip for r in result):
            raise ConfigError(f"reservation {mac} {ip} repeats a MAC or an IP")
        result.append(Reservation(mac, ip, hostname))
    return tuple(result)


def _port_forwards(value: Any, subnet: ipaddress.IPv4Network | None) -> tuple[PortForward, ...]:
    if not isinstance(value, list):
        raise ConfigError("'port_forwards' must be a list")
    result: list[PortForward] = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"proto", "host_port", "guest_ip", "guest_port"}:
            raise ConfigError("each port forward is {'proto', 'host_port', 'guest_ip', 'guest_port'}")
        proto = item["proto"]
        if proto not in PROTOS:
            raise ConfigError(f"port forward 'proto' must be tcp or udp, not {proto!r}")
        host_port = _int(item, "host_port", 1, 65535)
        guest_port = _int(item, "guest_port", 1, 65535)
        guest_ip = _ipv4(item["guest_ip"], "guest_ip")
        _in_subnet(guest_ip, subnet, "port_forwards")
        if any(f.proto == proto and f.host_port == host_port for f in result):
            raise ConfigError(f"port forward {proto}/{host_port} is listed twice")
        result.append(PortForward(proto, host_port, guest_ip, guest_port))
    return tuple(result)


def _user(value: Any) -> int:
    return _account_id(value, "allowed_users", "user", lambda name: pwd.getpwnam(name).pw_uid)


def _group(value: Any) -> int:
    return _account_id(value, "allowed_groups", "group", lambda name: grp.getgrnam(name).gr_gid)


def _account_id(value: Any, key: str, kind: str, lookup: Callable[[str], int]) -> int:
    """A uid or gid given as a number or a name (looked up now, at load time)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return lookup(value)
        except KeyError:
            raise ConfigError(f"'{key}': no {kind} named {value!r}") from None
    raise ConfigError(f"'{key}': {value!r} is neither a {kind} name nor an id")
