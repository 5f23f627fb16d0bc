"""Arbitrary text in any config value: a ConfigError, or generated files of the valid shape.

Every value of a config file that validates ends up in a dnsmasq config, an
nftables batch, an interface name or a path.  Here each value of a config
using every key (JSON and plist) is replaced by arbitrary text — random
Unicode, the valid value with a newline or an option appended, known
injections such as ``fe80::1%lo\\nenable-tftp`` — and the result must be
either refused (``ConfigError``, or a key the Linux backend refuses) or
produce exactly the dnsmasq option lines and nftables batch structure the
valid config produces, every value within plain printable ASCII.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmnet_broker.backends.linux import LinuxNetwork, dnsmasq, firewall, subnets
from vmnet_broker.backends.linux_config import unsupported_on_linux
from vmnet_broker.config import ConfigError, parse_network, parse_plist_network

STATE = Path("/var/lib/vmnet-broker")
ULA = ipaddress.IPv6Network("fd00:1:2:3::/64")

JSON_EVERY_KEY: dict[str, Any] = {
    "description": "database lab",
    "mode": "shared",
    "subnet": "192.168.42.1",
    "mask": "255.255.255.0",
    "mtu": 9000,
    "dhcp": True,
    "dhcp_range": ["192.168.42.100", "192.168.42.200"],
    "lease_time": 600,
    "reservations": [{"mac": "52:54:00:00:42:10", "ip": "192.168.42.10", "hostname": "db"}],
    "dns": True,
    "dns_servers": ["9.9.9.9", "fd00::53"],
    "domain": "lab.internal",
    "ipv6": True,
    "ipv6_prefix": "fd42:42:42:42::/64",
    "port_forwards": [{"proto": "tcp", "host_port": 5432, "guest_ip": "192.168.42.10", "guest_port": 5432}],
    "external_interface": "eth1",
    "allowed_users": ["root"],
    "allowed_groups": ["root"],
}
PLIST_EVERY_KEY: dict[str, Any] = {
    "mode": "shared",
    "description": "lab",
    "subnet": "192.168.42.1",
    "mask": "255.255.255.0",
    "ipv6_prefix": "fd12:3456:789a:1::",
    "ipv6_prefix_length": 64,
    "external_interface": "en0",
    "nat44": True,
    "nat66": True,
    "dhcp": True,
    "dns_proxy": True,
    "router_advertisement": True,
    "mtu": 9000,
    "port_forwarding_rules": [
        {"protocol": "tcp", "external_port": 8080, "internal_address": "192.168.42.2", "internal_port": 80}
    ],
    "dhcp_reservations": [{"mac_address": "AA:BB:CC:DD:EE:FE", "ip_address": "192.168.42.10"}],
}
FORMATS = {"json": (parse_network, JSON_EVERY_KEY), "plist": (parse_plist_network, PLIST_EVERY_KEY)}
NAME = ("<file name>",)  # the network's name comes from the file name

# Known ways in: a second option after a newline, dnsmasq comments and
# quoting, IPv6 scope ids, nftables wildcards, NULs, path tricks.
INJECTIONS = [
    "fe80::1%lo\nenable-tftp",
    "fd00::53%eth0",
    "fd42:42:42:42::%lo\nenable-tftp/64",
    "9.9.9.9\nserver=1.1.1.1",
    "lab.internal\nenable-tftp",
    "db\ndhcp-boot=pxelinux.0",
    "eth1\n",
    "eth*",
    "../../etc/passwd",
    "lab/../x",
    "..",
    ".",
    "a b",
    "a#b",
    '"quoted"',
    "\x00",
    "ETH1",
    "Lab.Internal",
    "x" * 300,
    "",
]
SUFFIXES = ["\n", "\nenable-tftp", "\r", "\r\nconf-file=/etc/passwd", " ", "\t", "#", "\x00", ",", "*", "%lo", "\u0085"]


def leaves(obj: Any, path: tuple = ()) -> list[tuple]:
    """The path of every scalar in a config object."""
    if isinstance(obj, dict):
        return [p for key, value in obj.items() for p in leaves(value, (*path, key))]
    if isinstance(obj, list):
        return [p for i, value in enumerate(obj) for p in leaves(value, (*path, i))]
    return [path]


def original(obj: Any, path: tuple) -> Any:
    for step in path:
        obj = obj[step]
    return obj


def replaced(obj: Any, path: tuple, value: Any) -> Any:
    copy = json.loads(json.dumps(obj))
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return copy


def texts(valid: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from(INJECTIONS),
        st.sampled_from(SUFFIXES).map(lambda suffix: valid + suffix),
        st.sampled_from(SUFFIXES).map(lambda prefix: prefix + valid),
        st.tuples(st.text(max_size=3), st.sampled_from(SUFFIXES)).map(lambda t: valid + t[1] + t[0]),
    )


def generated(fmt: str, name: str, obj: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The dnsmasq config and nftables batch a config file leads to; None if it is refused."""
    parse, _ = FORMATS[fmt]
    try:
        cfg = parse(name, obj)
    except ConfigError:
        return None
    if unsupported_on_linux(cfg):
        return None
    net = LinuxNetwork(cfg, cfg.subnet or subnets.POOL_FIRST, cfg.ipv6_prefix or (ULA if cfg.ipv6 else None), "vmb-br0")
    return dnsmasq.config_text(net.dnsmasq_spec(), STATE), firewall.ruleset([net.firewall_spec()])


def option_keys(text: str) -> list[str]:
    """Each line's option name, after the first line (a comment naming the network)."""
    return [line.split("=", 1)[0] for line in text.split("\n")[1:]]


def shape(value: Any) -> Any:
    """A batch with its strings and numbers blanked: commands, objects and keys only."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in (key, *strings(item))]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


def printable(text: str) -> bool:
    return all(" " <= c <= "~" for c in text)


def assert_valid_shape(fmt: str, name: str, obj: dict[str, Any]) -> None:
    result = generated(fmt, name, obj)
    if result is None:
        return
    conf, batch = result
    _, every_key = FORMATS[fmt]
    valid_conf, valid_batch = generated(fmt, "lab", every_key)
    assert option_keys(conf) == option_keys(valid_conf), conf
    header, *options = conf.split("\n")
    assert header.startswith("# vmnet-broker network ") and printable(header), header
    for line in options[:-1]:  # the text ends with a newline
        assert line and printable(line) and " " not in line and "#" not in line, line
    assert options[-1] == ""
    assert shape(batch) == shape(valid_batch)
    for text in strings(batch):
        assert printable(text) and "*" not in text and "\\" not in text, text


def test_every_key_is_covered_and_the_valid_configs_render():
    assert set(JSON_EVERY_KEY) == {
        "description", "mode", "subnet", "mask", "mtu", "dhcp", "dhcp_range", "lease_time", "reservations", "dns",
        "dns_servers", "domain", "ipv6", "ipv6_prefix", "port_forwards", "external_interface", "allowed_users",
        "allowed_groups",
    }  # fmt: skip
    for fmt, (_, every_key) in FORMATS.items():
        assert generated(fmt, "lab", every_key) is not None, fmt


CASES = [(fmt, path) for fmt, (_, every_key) in FORMATS.items() for path in [NAME, *leaves(every_key)]]


@pytest.mark.parametrize("fmt,path", CASES, ids=lambda v: "/".join(map(str, v)) if isinstance(v, tuple) else v)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_text_in_any_value_is_refused_or_renders_the_valid_lines(fmt, path, data):
    _, every_key = FORMATS[fmt]
    if path == NAME:
        name = data.draw(texts("lab"), label="name")
        assert_valid_shape(fmt, name, every_key)
    else:
        value = data.draw(texts(str(original(every_key, path))), label="/".join(map(str, path)))
        assert_valid_shape(fmt, "lab", replaced(every_key, path, value))


@pytest.mark.parametrize(
    "path,value",
    [
        (("dns_servers", 1), "fe80::1%lo\nenable-tftp"),
        (("domain",), "lab.internal\n"),
        (("domain",), "lab.internal\nenable-tftp"),
        (("reservations", 0, "hostname"), "db\n"),
        (("reservations", 0, "mac"), "52:54:00:00:42:10\n"),
        (("external_interface",), "eth1\n"),
        (("external_interface",), "eth*"),
        (("ipv6_prefix",), "fd42:42:42:42::%lo\nenable-tftp/64"),
    ],
)
def test_the_known_injections_are_refused_at_load(path, value):
    with pytest.raises(ConfigError):
        parse_network("lab", replaced(JSON_EVERY_KEY, path, value))


@pytest.mark.parametrize("name", ["lab\n", "lab\nenable-tftp", "../lab", "lab lab"])
def test_a_file_name_that_is_no_network_name_is_refused(name):
    with pytest.raises(ConfigError, match="network name"):
        parse_network(name, JSON_EVERY_KEY)
