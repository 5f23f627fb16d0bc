"""Network configuration: the builtins and ``<config-dir>/<name>.json`` or
``<name>.plist`` files.

Pure parsing and validation.  A file that does not validate is reported with
its path and reason and that network is not offered; the others still are.
Both formats fill one ``NetworkConfig``:

- ``.plist``: exactly upstream's keys (nirs/vmnet-broker PR #95,
  docs/configuration.md), which mirror vmnet's configuration API.
- ``.json``: upstream's original four keys plus our extensions.

What a file asks for must also be something this platform's backend can do:
``load_config_dir`` runs a per-platform check (backends/linux_config.py,
backends/darwin_config.py) and refuses the file otherwise, rather than
quietly doing less.  docs/configuration.md has the table.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import logging
import os
import plistlib
import pwd
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from . import files
from .protocol import normalize_mac, ProtocolError

log = logging.getLogger(__name__)

DEFAULT_CONFIG_DIR = "/etc/vmnet-broker.d"
DEFAULT_MTU = 1500
DEFAULT_LEASE_TIME = 3600
MODES = ("shared", "host")
PROTOS = ("tcp", "udp")
MIN_MTU = 68  # IPv4's minimum
MAX_MTU = 65521  # a TAP's maximum (the kernel refuses more): every attachment must take it
# A config file is a few hundred bytes; anything larger is a mistake.
MAX_CONFIG_FILE = 64 * 1024
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel, never a user

# Every value that reaches a generated file, an nftables batch, an interface
# name or a path is checked whole: fullmatch over explicit ASCII sets, never
# re.match(...$), whose $ also matches before a trailing newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # lowercase LDH
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")

_ULA = ipaddress.IPv6Network("fd00::/8")

KEYS = {
    "description", "mode", "subnet", "mask", "mtu", "dhcp", "dhcp_range",
    "lease_time", "reservations", "dns", "dns_servers", "domain", "ipv6",
    "ipv6_prefix", "port_forwards", "external_interface", "allowed_users",
    "allowed_groups",
}  # fmt: skip

# Upstream's plist keys (PR #95), each one vmnet_network_configuration_* call.
PLIST_KEYS = {
    "mode", "description", "subnet", "mask", "ipv6_prefix", "ipv6_prefix_length",
    "external_interface", "nat44", "nat66", "dhcp", "dns_proxy", "router_advertisement",
    "mtu", "port_forwarding_rules", "dhcp_reservations",
}  # fmt: skip


class ConfigError(ValueError):
    """A network's configuration is invalid; the message says which key and why."""


def valid_name(name: object) -> bool:
    """A network name: 1-64 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def valid_ifname(name: object) -> bool:
    """A Linux interface name we accept: 1-15 of ASCII letters, digits, '.', '_', '-'; not '.' or '..'."""
    return isinstance(name, str) and _IFNAME.fullmatch(name) is not None and name not in (".", "..")


def valid_hostname(name: object) -> bool:
    """One DNS label, lowercase letters, digits and inner hyphens (LDH), 1-63 long."""
    return isinstance(name, str) and _LABEL.fullmatch(name) is not None


def valid_domain(domain: object) -> bool:
    """Lowercase LDH labels joined by dots, at most 253 characters."""
    return isinstance(domain, str) and len(domain) <= 253 and all(map(valid_hostname, domain.split(".")))


@dataclass(frozen=True)
class Reservation:
    mac: str
    ip: ipaddress.IPv4Address
    hostname: str | None = None


@dataclass(frozen=True)
class PortForward:
    proto: str
    host_port: int
    guest_ip: ipaddress.IPv4Address | ipaddress.IPv6Address  # IPv6 only from a plist
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
    dns: bool = True  # plist: dns_proxy
    dns_servers: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    domain: str | None = None  # None: "<name>.internal"
    # A ULA prefix with router advertisements (and NAT66 when shared).  None:
    # not said; the Linux backend has none then, vmnet does as it does.
    ipv6: bool | None = None
    ipv6_prefix: ipaddress.IPv6Network | None = None  # None with ipv6: a stable ULA /64
    port_forwards: tuple[PortForward, ...] = ()
    external_interface: str | None = None
    # Only a plist sets these (upstream's keys); they matter for shared
    # networks (NAT) and networks with IPv6 (router advertisements).
    nat44: bool = True
    nat66: bool = True
    router_advertisement: bool = True
    allowed_uids: frozenset[int] | None = None  # None: everyone
    allowed_gids: frozenset[int] | None = None
    source: str = "builtin"  # where this came from, for messages

    @property
    def dns_domain(self) -> str:
        return self.domain or default_domain(self.name)

    def allows(self, uid: int, gids: set[int]) -> bool:
        """Root always; otherwise everyone unless users/groups are listed."""
        if uid == 0 or (self.allowed_uids is None and self.allowed_gids is None):
            return True
        if self.allowed_uids and uid in self.allowed_uids:
            return True
        return bool(self.allowed_gids and self.allowed_gids & gids)


def default_domain(name: str) -> str:
    """``<name>.internal`` as lowercase LDH: ``My_Lab`` gives ``my-lab.internal``.

    A network name may hold what a DNS label may not ('_', capitals, a
    leading or trailing '-', empty labels): each label is mapped, never the
    name passed through.
    """
    labels = []
    for label in name.lower().replace("_", "-").split("."):
        label = label[:63].strip("-")
        if label:
            labels.append(label)
    return ".".join([*labels, "internal"])


BUILTINS = {
    "shared": NetworkConfig("shared", mode="shared", description="NAT to the outside", ipv6=True),
    "host": NetworkConfig("host", mode="host", description="host-only"),
}

# What a backend cannot do with a config, one sentence per thing; [] if it
# can do all of it.
Check = Callable[[NetworkConfig], list[str]]


def parse_network(name: str, obj: Any, source: str = "builtin") -> NetworkConfig:
    """Validate one network's JSON object."""
    base = _base(name)
    if not isinstance(obj, dict):
        raise ConfigError("the file must hold a JSON object")
    _known_keys(obj, KEYS)
    cfg: dict[str, Any] = {"source": source, "mode": _mode(obj, base)}

    if "description" in obj:
        cfg["description"] = _typed(obj, "description", str)
    if "subnet" in obj or "mask" in obj:
        cfg["subnet"] = _subnet(obj)
    if "mtu" in obj:
        cfg["mtu"] = _int(obj, "mtu", MIN_MTU, MAX_MTU)
    for key in ("dhcp", "dns", "ipv6"):
        if key in obj:
            cfg[key] = _typed(obj, key, bool)
    if "lease_time" in obj:
        cfg["lease_time"] = _int(obj, "lease_time", 120, 10 * 365 * 86400)
    if "dns_servers" in obj:
        cfg["dns_servers"] = tuple(_ip(v, "dns_servers") for v in _list(obj, "dns_servers"))
    if "domain" in obj:
        cfg["domain"] = _ldh(_typed(obj, "domain", str), "domain", valid_domain, "a DNS domain")
    if "ipv6_prefix" in obj:
        cfg["ipv6_prefix"] = _ipv6_prefix(obj["ipv6_prefix"])
        cfg.setdefault("ipv6", True)
    if "external_interface" in obj:
        cfg["external_interface"] = _ifname(obj)
    if "allowed_users" in obj:
        cfg["allowed_uids"] = frozenset(_user(v) for v in _list(obj, "allowed_users"))
    if "allowed_groups" in obj:
        cfg["allowed_gids"] = frozenset(_group(v) for v in _list(obj, "allowed_groups"))

    config = replace(base, **cfg)
    _shared_only(obj, config.mode, "port_forwards", "external_interface")
    if "dhcp_range" in obj:
        config = replace(config, dhcp_range=_dhcp_range(obj["dhcp_range"], config.subnet))
    if "reservations" in obj:
        reservations = _reservations(obj["reservations"], config.subnet, "reservations", "mac", "ip", "hostname")
        config = replace(config, reservations=reservations)
    if "port_forwards" in obj:
        config = replace(config, port_forwards=_port_forwards(obj["port_forwards"], config, _JSON_FORWARD))
    return config


# plist key -> NetworkConfig field, for upstream's on/off switches.
_PLIST_SWITCHES = {
    "nat44": "nat44",
    "nat66": "nat66",
    "dhcp": "dhcp",
    "dns_proxy": "dns",
    "router_advertisement": "router_advertisement",
}


def parse_plist_network(name: str, obj: Any, source: str = "builtin") -> NetworkConfig:
    """Validate one network's property list: upstream's keys and meanings (PR #95)."""
    base = _base(name)
    if not isinstance(obj, dict):
        raise ConfigError("the file must hold a dictionary (<dict>)")
    _known_keys(obj, PLIST_KEYS)
    if "mode" not in obj:
        raise ConfigError("'mode' is required")
    mode = _mode(obj, base)
    # As vmnet: a shared network has IPv6 (NAT66, router advertisements)
    # unless switched off; a host network has it with an ipv6_prefix.
    cfg: dict[str, Any] = {"source": source, "mode": mode, "ipv6": True if mode == "shared" else base.ipv6}

    if "description" in obj:
        cfg["description"] = _typed(obj, "description", str)
    if "subnet" in obj or "mask" in obj:
        cfg["subnet"] = _subnet(obj)
    if "ipv6_prefix" in obj or "ipv6_prefix_length" in obj:
        cfg["ipv6_prefix"] = _plist_ipv6_prefix(obj)
        cfg["ipv6"] = True
    if "external_interface" in obj:
        cfg["external_interface"] = _ifname(obj)
    for key, field in _PLIST_SWITCHES.items():
        if key in obj:
            cfg[field] = _typed(obj, key, bool)
    if "mtu" in obj:
        cfg["mtu"] = _int(obj, "mtu", MIN_MTU, MAX_MTU)

    config = replace(base, **cfg)
    _shared_only(obj, mode, "port_forwarding_rules", "external_interface")
    for key in ("nat44", "nat66"):
        if mode != "shared" and obj.get(key) is True:
            raise ConfigError(f"'{key}' true needs mode 'shared': a host network has no NAT")
    if "dhcp_reservations" in obj:
        reservations = _reservations(
            obj["dhcp_reservations"], config.subnet, "dhcp_reservations", "mac_address", "ip_address"
        )
        config = replace(config, reservations=reservations)
    if "port_forwarding_rules" in obj:
        forwards = _port_forwards(obj["port_forwarding_rules"], config, _PLIST_FORWARD)
        config = replace(config, port_forwards=forwards)
    return config


def load_config_dir(path: str | Path | None, check: Check | None = None) -> dict[str, NetworkConfig]:
    """The builtins, overridden and extended by the ``<name>.json`` and
    ``<name>.plist`` files in ``path``.

    ``check`` says what of a config the backend cannot do (default: this
    platform's ``platform_check()``); a file asking for any of it is refused.
    Invalid and refused files are logged with their path and reason and their
    network is not offered, a builtin included; so is a network with both a
    ``.json`` and a ``.plist`` file.  Only regular files are read (no symlink
    is followed, a FIFO or device is refused unopened), each up to
    ``MAX_CONFIG_FILE`` bytes; time grows linearly with the number of files.
    """
    networks = dict(BUILTINS)
    if path is None:
        return networks
    directory = Path(path)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return networks
    except OSError as e:
        log.error("config dir %s: %s; offering builtins only", directory, e.strerror or e)
        return networks
    try:
        _warn_if_others_can_write(dir_fd, directory)
        found: dict[str, list[str]] = {}
        for entry in sorted(os.listdir(dir_fd)):
            stem, dot, suffix = entry.rpartition(".")
            if dot and stem and not entry.startswith(".") and suffix in ("json", "plist"):
                found.setdefault(stem, []).append(entry)
        check = check or platform_check()
        host_ports: dict[tuple[str, int], str] = {}  # (proto, port) -> the network forwarding it
        for name, entries in sorted(found.items()):
            if len(entries) > 1:
                shown = " and ".join(str(directory / e) for e in entries)
                log.error("config %s: network %r is defined twice; it is not offered", shown, name)
                networks.pop(name, None)
                continue
            file = directory / entries[0]
            try:
                config = _read(name, entries[0], dir_fd, str(file))
                problems = check(config)
                if problems:
                    raise ConfigError("; ".join(problems))
                _claim_host_ports(config, host_ports)
                networks[name] = config
            except (OSError, UnicodeDecodeError, ValueError) as e:
                # ConfigError and files.RefusedFile are a ValueError and an OSError.
                log.error("config %s: %s; network %r is not offered", file, _reason(e), name)
                networks.pop(name, None)
    finally:
        os.close(dir_fd)
    return networks


def platform_check() -> Check:
    """What the backend of the platform we run on cannot do (Linux or vmnet)."""
    if sys.platform == "darwin":
        from .backends.darwin_config import unsupported_on_darwin

        return unsupported_on_darwin
    from .backends.linux_config import unsupported_on_linux

    return unsupported_on_linux


def _warn_if_others_can_write(dir_fd: int, directory: Path) -> None:
    st = os.fstat(dir_fd)
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning(
            "config dir %s is owned by uid %d, mode %04o: whoever can write it decides which networks exist "
            "and who may use them", directory, st.st_uid, stat.S_IMODE(st.st_mode),
        )  # fmt: skip


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, files.RefusedFile) and e.strerror:
        return e.strerror
    return str(e)


def _read(name: str, entry: str, dir_fd: int, source: str) -> NetworkConfig:
    """One file, read only if it is a regular file of at most MAX_CONFIG_FILE bytes."""
    data = files.read_regular(entry, MAX_CONFIG_FILE, dir_fd=dir_fd)
    if entry.endswith(".plist"):
        try:
            obj = plistlib.loads(data)
        except Exception as e:  # plistlib raises more than InvalidFileException on a damaged binary plist
            raise ConfigError(f"not a property list: {e}") from None
        return parse_plist_network(name, obj, source=source)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"not UTF-8 JSON: {e}") from None
    return parse_network(name, obj, source=source)


def _claim_host_ports(config: NetworkConfig, owners: dict[tuple[str, int], str]) -> None:
    """One host port forwards to one guest: the first file (by name) keeps it.

    ``owners`` maps each (proto, port) claimed so far to its network: one
    lookup per forward, so loading many files stays linear.
    """
    for forward in config.port_forwards:
        owner = owners.get((forward.proto, forward.host_port))
        if owner is not None:
            raise ConfigError(f"port forward {forward.proto}/{forward.host_port} is already used by network {owner!r}")
    for forward in config.port_forwards:
        owners[(forward.proto, forward.host_port)] = config.name


# -- keys shared by both formats ----------------------------------------------


def _base(name: str) -> NetworkConfig:
    """What a file starts from: the builtin of that name, or the defaults."""
    if not valid_name(name):
        raise ConfigError(f"network name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return BUILTINS.get(name, NetworkConfig(name))


# The same setting under another name in the other format, for hints.
_PLIST_SPELLING = {"dns": "dns_proxy", "reservations": "dhcp_reservations", "port_forwards": "port_forwarding_rules"}
_JSON_SPELLING = {plist: json_key for json_key, plist in _PLIST_SPELLING.items()}


def _known_keys(obj: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(obj) - known, key=str)
    if not unknown:
        return
    here, there = (".plist", ".json") if known is PLIST_KEYS else (".json", ".plist")
    spelling, other_keys = (_PLIST_SPELLING, KEYS) if known is PLIST_KEYS else (_JSON_SPELLING, PLIST_KEYS)
    hints = []
    for key in unknown:
        if key in spelling:
            hints.append(f"a {here} file says '{spelling[key]}' for '{key}'")
        elif key in other_keys:
            hints.append(f"'{key}' exists only in {there} files")
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise ConfigError(f"unknown key(s): {', '.join(map(str, unknown))}{hint}")


def _mode(obj: dict[str, Any], base: NetworkConfig) -> str:
    mode = obj.get("mode", base.mode)
    if mode not in MODES:
        raise ConfigError(f"'mode' must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def _shared_only(obj: dict[str, Any], mode: str, *keys: str) -> None:
    for key in keys:
        if key in obj and mode != "shared":
            raise ConfigError(f"'{key}' needs mode 'shared'")


def _ifname(obj: dict[str, Any]) -> str:
    ifname = _typed(obj, "external_interface", str)
    if not valid_ifname(ifname):
        raise ConfigError(
            f"'external_interface' {_show(ifname)} is not an interface name (1-15 letters, digits, '.', '_', '-')"
        )
    return ifname


def _ldh(value: str, key: str, valid: Callable[[object], bool], what: str) -> str:
    """A DNS name, any case in the file, lowercase from here on."""
    lowered = value.lower() if value.isascii() else value
    if not valid(lowered):
        raise ConfigError(f"'{key}' {_show(value)} is not {what} (letters, digits and inner '-' per label)")
    return lowered


# -- field validators ---------------------------------------------------------


def _show(value: Any) -> str:
    """A value as the user wrote it, near enough: JSON where it can be."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _typed(obj: dict[str, Any], key: str, kind: type) -> Any:
    value = obj[key]
    if kind is not bool and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"'{key}' must be a {kind.__name__}, not {_show(value)}")
    return value


def _int(obj: dict[str, Any], key: str, low: int, high: int) -> int:
    value = _typed(obj, key, int)
    if not low <= value <= high:
        raise ConfigError(f"'{key}' must be between {low} and {high}, not {value}")
    return value


def _list(obj: dict[str, Any], key: str) -> list[Any]:
    return _typed(obj, key, list)


def _ip(value: Any, key: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address rebuilt from its number: nothing of the input text (a scope id) survives."""
    try:
        if not isinstance(value, str):
            raise ValueError
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"'{key}': {_show(value)} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address):
        return _ipv6_unscoped(address, value, key)
    return ipaddress.IPv4Address(int(address))


def _ipv6_unscoped(address: ipaddress.IPv6Address, value: Any, key: str) -> ipaddress.IPv6Address:
    if address.scope_id is not None:
        raise ConfigError(f"'{key}': {_show(value)} has a scope id ('%...'); only unscoped addresses are supported")
    return ipaddress.IPv6Address(int(address))


def _ipv4(value: Any, key: str) -> ipaddress.IPv4Address:
    try:
        if isinstance(value, str):
            return ipaddress.IPv4Address(int(ipaddress.IPv4Address(value)))
    except ValueError:
        pass
    raise ConfigError(f"'{key}': {_show(value)} is not an IPv4 address")


def _subnet(obj: dict[str, Any]) -> ipaddress.IPv4Network:
    if "subnet" not in obj:
        raise ConfigError("'mask' needs 'subnet'")
    address = _ipv4(obj["subnet"], "subnet")
    mask = obj.get("mask", "255.255.255.0")
    try:
        # The network address and the host's .1 address (vmnet's convention)
        # name the same network; strict=False accepts either.
        if not isinstance(mask, str):
            raise ValueError
        netmask = ipaddress.IPv4Address(mask)
        network = ipaddress.IPv4Network(f"{address}/{netmask}", strict=False)
        if network.netmask != netmask:  # not a prefix length or a host mask
            raise ValueError
    except ValueError:
        raise ConfigError(f"'mask' {_show(mask)} is not an IPv4 netmask like 255.255.255.0") from None
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
        if not isinstance(value, str):
            raise ValueError
        prefix = ipaddress.IPv6Network(value)
    except ValueError:
        raise ConfigError(f"'ipv6_prefix' {_show(value)} is not an IPv6 prefix like fd00:1:2:3::/64") from None
    _ipv6_unscoped(prefix.network_address, value, "ipv6_prefix")
    prefix = ipaddress.IPv6Network((int(prefix.network_address), prefix.prefixlen))
    if prefix.prefixlen != 64:
        raise ConfigError("'ipv6_prefix' must be a /64 (SLAAC needs 64-bit interface ids)")
    return prefix


def _plist_ipv6_prefix(obj: dict[str, Any]) -> ipaddress.IPv6Network:
    """Upstream spells a prefix as an address and a length: two keys."""
    if "ipv6_prefix" not in obj:
        raise ConfigError("'ipv6_prefix_length' needs 'ipv6_prefix'")
    value = obj["ipv6_prefix"]
    length = _int(obj, "ipv6_prefix_length", 8, 128) if "ipv6_prefix_length" in obj else 64
    try:
        if not isinstance(value, str):
            raise ValueError
        address = ipaddress.IPv6Address(value)
    except ValueError:
        raise ConfigError(
            f"'ipv6_prefix' {_show(value)} is not an IPv6 address like fd12:3456:789a:1:: "
            "(the length goes in 'ipv6_prefix_length')"
        ) from None
    address = _ipv6_unscoped(address, value, "ipv6_prefix")
    try:
        prefix = ipaddress.IPv6Network(f"{address}/{length}")
    except ValueError:
        raise ConfigError(f"'ipv6_prefix' {address} has bits set past its length /{length}") from None
    if not prefix.subnet_of(_ULA):
        raise ConfigError(f"'ipv6_prefix' {prefix} is not a unique local prefix (within fd00::/8)")
    return prefix


def _in_subnet(ip: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network | None, key: str) -> None:
    if subnet is None:
        raise ConfigError(f"'{key}' needs a fixed 'subnet'")
    usable = (subnet.network_address + 1, subnet.broadcast_address)
    if not subnet.network_address + 1 < ip < subnet.broadcast_address:
        raise ConfigError(f"'{key}': {ip} is not a guest address of {subnet} (gateway {usable[0]})")


def _in_prefix(ip: ipaddress.IPv6Address, prefix: ipaddress.IPv6Network | None, key: str) -> None:
    if prefix is None:
        raise ConfigError(f"'{key}' {ip} needs a fixed 'ipv6_prefix'")
    if ip not in prefix or ip in (prefix.network_address, prefix.network_address + 1):
        raise ConfigError(f"'{key}': {ip} is not a guest address of {prefix}")


def _dhcp_range(value: Any, subnet: ipaddress.IPv4Network | None) -> tuple[ipaddress.IPv4Address, ...]:
    if not isinstance(value, list) or len(value) != 2:
        raise ConfigError("'dhcp_range' must be [first, last]")
    first, last = (_ipv4(v, "dhcp_range") for v in value)
    for ip in (first, last):
        _in_subnet(ip, subnet, "dhcp_range")
    if first > last:
        raise ConfigError(f"'dhcp_range' {first} comes after {last}")
    return (first, last)


@contextmanager
def _entry(key: str, number: int) -> Iterator[None]:
    """Errors inside one entry of a list say which entry."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"'{key}' entry {number}: {e}") from None


def _entries(
    value: Any, key: str, required: set[str], optional: Iterable[str] = ()
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each entry of a list of dictionaries with these keys, numbered from 1."""
    if not isinstance(value, list):
        raise ConfigError(f"'{key}' must be a list, not {_show(value)}")
    for number, item in enumerate(value, 1):
        with _entry(key, number):
            if not isinstance(item, dict):
                raise ConfigError(f"must be a dictionary with {', '.join(sorted(required))}")
            missing = sorted(required - set(item))
            unknown = sorted(set(item) - required - set(optional), key=str)
            if missing:
                raise ConfigError(f"missing key(s): {', '.join(missing)}")
            if unknown:
                raise ConfigError(f"unknown key(s): {', '.join(map(str, unknown))}")
        yield number, item


def _reservations(
    value: Any,
    subnet: ipaddress.IPv4Network | None,
    key: str,
    mac_key: str,
    ip_key: str,
    hostname_key: str | None = None,
) -> tuple[Reservation, ...]:
    result: list[Reservation] = []
    optional = [hostname_key] if hostname_key else []
    for number, item in _entries(value, key, {mac_key, ip_key}, optional):
        with _entry(key, number):
            try:
                mac = normalize_mac(item[mac_key])
            except ProtocolError:
                shown = _show(item[mac_key])
                raise ConfigError(f"'{mac_key}' {shown} is not a unicast MAC address like 52:54:00:12:34:56") from None
            ip = _ipv4(item[ip_key], ip_key)
            _in_subnet(ip, subnet, key)
            hostname = item.get(hostname_key) if hostname_key else None
            if hostname is not None:
                if not isinstance(hostname, str):
                    raise ConfigError(f"'{hostname_key}' {_show(hostname)} is not a DNS label")
                hostname = _ldh(hostname, str(hostname_key), valid_hostname, "a DNS label")
            if any(r.mac == mac or r.ip == ip for r in result):
                raise ConfigError(f"{mac} {ip} repeats the MAC or the IP of an earlier entry")
            result.append(Reservation(mac, ip, hostname))
    return tuple(result)


class _ForwardKeys(NamedTuple):
    """How a format spells a port forward's four fields."""

    list: str
    proto: str
    host_port: str
    guest_ip: str
    guest_port: str


_JSON_FORWARD = _ForwardKeys("port_forwards", "proto", "host_port", "guest_ip", "guest_port")
_PLIST_FORWARD = _ForwardKeys("port_forwarding_rules", "protocol", "external_port", "internal_address", "internal_port")


def _port_forwards(value: Any, config: NetworkConfig, keys: _ForwardKeys) -> tuple[PortForward, ...]:
    result: list[PortForward] = []
    fields = {keys.proto, keys.host_port, keys.guest_ip, keys.guest_port}
    for number, item in _entries(value, keys.list, fields):
        with _entry(keys.list, number):
            proto = item[keys.proto]
            if proto not in PROTOS:
                raise ConfigError(f"'{keys.proto}' must be tcp or udp, not {_show(proto)}")
            host_port = _int(item, keys.host_port, 1, 65535)
            guest_port = _int(item, keys.guest_port, 1, 65535)
            # The address family follows the address (IPv6: a plist on macOS).
            guest_ip = _ip(item[keys.guest_ip], keys.guest_ip)
            if guest_ip.version == 4:
                _in_subnet(guest_ip, config.subnet, keys.list)
            else:
                _in_prefix(guest_ip, config.ipv6_prefix, keys.list)
            if any(f.proto == proto and f.host_port == host_port for f in result):
                raise ConfigError(f"{proto}/{host_port} is listed twice")
            result.append(PortForward(proto, host_port, guest_ip, guest_port))
    return tuple(result)


def _user(value: Any) -> int:
    return _account_id(value, "allowed_users", "user", lambda name: pwd.getpwnam(name).pw_uid)


def _group(value: Any) -> int:
    return _account_id(value, "allowed_groups", "group", lambda name: grp.getgrnam(name).gr_gid)


def _account_id(value: Any, key: str, kind: str, lookup: Callable[[str], int]) -> int:
    """A uid or gid given as a number or a name (looked up now, at load time)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID:
        return value
    if isinstance(value, str):
        try:
            return lookup(value)
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            raise ConfigError(f"'{key}': no {kind} named {_show(value)}") from None
    raise ConfigError(f"'{key}': {value!r} is neither a {kind} name nor an id")
