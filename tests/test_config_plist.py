"""``<name>.plist`` network files: upstream's keys (nirs/vmnet-broker PR #95),
their mapping onto NetworkConfig, and what each platform refuses."""

import datetime
import json
import logging
import plistlib
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmnet_broker import config
from vmnet_broker.backends.darwin_config import unsupported_on_darwin
from vmnet_broker.backends.linux_config import unsupported_on_linux
from vmnet_broker.config import BUILTINS, PLIST_KEYS, ConfigError, parse_network, parse_plist_network

# Upstream's example, as PR #95's docs/configuration.md writes it.
UPSTREAM_EXAMPLE = b"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN"
  "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>description</key>
  <string>My testing network</string>
  <key>mode</key>
  <string>shared</string>
  <key>subnet</key>
  <string>192.168.42.0</string>
  <key>mask</key>
  <string>255.255.255.0</string>
  <!-- VMs use static IP addresses. -->
  <key>dhcp</key>
  <false/>
  <key>dns_proxy</key>
  <false/>
</dict>
</plist>
"""

EVERY_KEY = {
    "mode": "shared",
    "description": "lab",
    "subnet": "192.168.42.1",
    "mask": "255.255.255.0",
    "ipv6_prefix": "fd12:3456:789a:1::",
    "ipv6_prefix_length": 64,
    "external_interface": "en0",
    "nat44": False,
    "nat66": False,
    "dhcp": False,
    "dns_proxy": False,
    "router_advertisement": False,
    "mtu": 9000,
    "port_forwarding_rules": [
        {"protocol": "tcp", "external_port": 8080, "internal_address": "192.168.42.2", "internal_port": 80},
        {"protocol": "udp", "external_port": 5353, "internal_address": "fd12:3456:789a:1::10", "internal_port": 53},
    ],
    "dhcp_reservations": [{"mac_address": "AA:BB:CC:DD:EE:FE", "ip_address": "192.168.42.10"}],
}


def no_check(cfg):
    return []


def write_plist(path, obj, fmt=plistlib.FMT_XML):
    path.write_bytes(plistlib.dumps(obj, fmt=fmt))


def test_the_example_of_upstreams_docs_parses():
    cfg = parse_plist_network("my-network", plistlib.loads(UPSTREAM_EXAMPLE))
    assert cfg.mode == "shared" and cfg.description == "My testing network"
    assert cfg.subnet == IPv4Network("192.168.42.0/24")
    assert not cfg.dhcp and not cfg.dns
    assert unsupported_on_linux(cfg) == [] and unsupported_on_darwin(cfg) == []


def test_every_key_maps_onto_the_network_config(tmp_path):
    write_plist(tmp_path / "lab.plist", EVERY_KEY)
    cfg = config.load_config_dir(tmp_path, check=no_check)["lab"]
    assert cfg.source == str(tmp_path / "lab.plist")
    assert (cfg.mode, cfg.description, cfg.mtu) == ("shared", "lab", 9000)
    assert cfg.subnet == IPv4Network("192.168.42.0/24")
    assert cfg.ipv6 and cfg.ipv6_prefix == IPv6Network("fd12:3456:789a:1::/64")
    assert cfg.external_interface == "en0"
    assert (cfg.nat44, cfg.nat66, cfg.dhcp, cfg.dns, cfg.router_advertisement) == (False,) * 5
    tcp, udp = cfg.port_forwards
    assert (tcp.proto, tcp.host_port, tcp.guest_ip, tcp.guest_port) == ("tcp", 8080, IPv4Address("192.168.42.2"), 80)
    assert (udp.proto, udp.guest_ip) == ("udp", IPv6Address("fd12:3456:789a:1::10"))
    (reservation,) = cfg.reservations
    assert (reservation.mac, reservation.ip) == ("aa:bb:cc:dd:ee:fe", IPv4Address("192.168.42.10"))
    assert reservation.hostname is None
    assert set(EVERY_KEY) == PLIST_KEYS


def test_defaults_are_vmnets():
    shared = parse_plist_network("lab", {"mode": "shared"})
    assert shared.nat44 and shared.nat66 and shared.router_advertisement and shared.dhcp and shared.dns
    assert shared.ipv6 and shared.ipv6_prefix is None and shared.subnet is None and shared.mtu == 1500
    host = parse_plist_network("lab", {"mode": "host"})
    assert not host.ipv6  # as the JSON default; with an ipv6_prefix a host network has IPv6
    assert parse_plist_network("lab", {"mode": "host", "ipv6_prefix": "fd00:1::"}).ipv6


def test_a_plist_overrides_a_builtin_keeping_its_defaults():
    cfg = parse_plist_network("shared", {"mode": "shared", "mtu": 1400})
    assert cfg.description == BUILTINS["shared"].description and cfg.mtu == 1400 and cfg.ipv6


def test_a_binary_plist_loads_too(tmp_path):
    write_plist(tmp_path / "lab.plist", {"mode": "host", "subnet": "192.168.43.0"}, fmt=plistlib.FMT_BINARY)
    assert config.load_config_dir(tmp_path)["lab"].subnet == IPv4Network("192.168.43.0/24")


@given(
    network=st.builds(
        lambda base, plen: IPv4Network((base, plen), strict=False),
        st.integers(0x0A000000, 0x0AFFFFFF),
        st.integers(8, 30),
    ),
    as_gateway=st.booleans(),
    fmt=st.sampled_from(["json", "plist"]),
)
def test_subnet_as_network_or_gateway_address_names_the_same_network(network, as_gateway, fmt):
    address = network.network_address + 1 if as_gateway else network.network_address
    obj = {"mode": "host", "subnet": str(address), "mask": str(network.netmask)}
    parse = parse_plist_network if fmt == "plist" else parse_network
    assert parse("lab", obj).subnet == network


def test_ipv6_prefix_is_an_address_and_a_length():
    cfg = parse_plist_network("lab", {"mode": "shared", "ipv6_prefix": "fd00:1:2::", "ipv6_prefix_length": 48})
    assert cfg.ipv6_prefix == IPv6Network("fd00:1:2::/48")
    assert parse_plist_network("lab", {"mode": "shared", "ipv6_prefix": "fd00:1:2:3::"}).ipv6_prefix.prefixlen == 64


BASE = {"mode": "shared", "subnet": "192.168.42.0"}


def forward(**changes):
    rule = {"protocol": "tcp", "external_port": 8080, "internal_address": "192.168.42.2", "internal_port": 80}
    return {**BASE, "port_forwarding_rules": [{**rule, **changes}]}


def reservation(**changes):
    entry = {"mac_address": "52:54:00:00:00:01", "ip_address": "192.168.42.9"}
    return {**BASE, "dhcp_reservations": [{**entry, **changes}]}


@pytest.mark.parametrize(
    "obj,needle",
    [
        ([], "dictionary"),
        ({}, "'mode' is required"),
        ({"mode": "bridged"}, "'mode'"),
        ({"mode": "shared", "colour": "blue"}, "unknown key(s): colour"),
        ({"mode": "shared", "dns": False}, "a .plist file says 'dns_proxy' for 'dns'"),
        ({"mode": "shared", "port_forwards": []}, "'port_forwarding_rules' for 'port_forwards'"),
        ({"mode": "shared", "lease_time": 600}, "'lease_time' exists only in .json files"),
        ({"mode": "shared", "allowed_users": [0]}, "'allowed_users' exists only in .json files"),
        ({"mode": "shared", "mtu": "9000"}, "'mtu' must be a int"),
        ({"mode": "shared", "mtu": 9000.0}, "'mtu' must be a int"),
        ({"mode": "shared", "mtu": True}, "'mtu' must be a int"),
        ({"mode": "shared", "mtu": 67}, "'mtu' must be between"),
        ({"mode": "shared", "mtu": 65522}, "'mtu' must be between 68 and 65521"),
        ({"mode": "shared", "nat44": 0}, "'nat44' must be a bool"),
        ({"mode": "shared", "dns_proxy": "no"}, "'dns_proxy' must be a bool"),
        ({"mode": "shared", "description": datetime.datetime(2026, 1, 1)}, "'description' must be a str"),
        ({"mode": "shared", "description": b"bytes"}, "'description' must be a str"),
        ({"mode": "shared", "subnet": 3232246272}, "'subnet'"),
        ({"mode": "shared", "subnet": "192.168.1.300"}, "not an IPv4 address"),
        ({"mode": "shared", "subnet": "192.168.1.5"}, "network address"),
        ({"mode": "shared", "subnet": "192.168.1.0", "mask": "24"}, "netmask"),
        ({"mode": "shared", "subnet": "192.168.1.0", "mask": "0.0.0.255"}, "netmask"),
        ({"mode": "shared", "mask": "255.255.255.0"}, "'mask' needs 'subnet'"),
        ({"mode": "shared", "ipv6_prefix": "fd00::/64"}, "'ipv6_prefix_length'"),
        ({"mode": "shared", "ipv6_prefix": "2001:db8::"}, "unique local"),
        ({"mode": "shared", "ipv6_prefix": "fd00::1"}, "bits set"),
        ({"mode": "shared", "ipv6_prefix": "fd00::", "ipv6_prefix_length": 129}, "'ipv6_prefix_length'"),
        ({"mode": "shared", "ipv6_prefix_length": 64}, "'ipv6_prefix_length' needs 'ipv6_prefix'"),
        ({"mode": "shared", "external_interface": "a-name-that-is-too-long"}, "interface"),
        ({"mode": "host", "external_interface": "en0"}, "'external_interface' needs mode 'shared'"),
        ({"mode": "host", "nat44": True}, "'nat44' true needs mode 'shared'"),
        ({"mode": "host", "nat66": True}, "'nat66' true needs mode 'shared'"),
        ({**forward(), "mode": "host"}, "'port_forwarding_rules' needs mode 'shared'"),
        (forward(protocol=6), "'protocol' must be tcp or udp, not 6"),
        (forward(protocol="TCP"), "tcp or udp"),
        (forward(external_port=0), "'external_port' must be between 1 and 65535"),
        (forward(internal_port="80"), "'internal_port' must be a int"),
        (forward(internal_address="192.168.43.2"), "not a guest address"),
        (forward(internal_address="fd00::2"), "needs a fixed 'ipv6_prefix'"),
        (forward(internal_address="guest"), "'internal_address': \"guest\" is not an IP address"),
        (forward(proto="tcp"), "'port_forwarding_rules' entry 1: unknown key(s): proto"),
        ({**BASE, "port_forwarding_rules": [{"protocol": "tcp"}]}, "missing key(s): external_port"),
        ({**BASE, "port_forwarding_rules": {"protocol": "tcp"}}, "must be a list"),
        ({**BASE, "port_forwarding_rules": ["tcp/80"]}, "must be a dictionary"),
        ({"mode": "shared", **forward()["port_forwarding_rules"][0]}, "unknown key(s)"),
        ({"mode": "shared", "port_forwarding_rules": forward()["port_forwarding_rules"]}, "needs a fixed 'subnet'"),
        (reservation(mac_address="01:00:5e:00:00:01"), "'mac_address' \"01:00:5e:00:00:01\" is not a unicast MAC"),
        (reservation(ip_address="192.168.42.1"), "not a guest address"),
        (reservation(ip_address="fd00::9"), "'ip_address'"),
        (reservation(hostname="db"), "'dhcp_reservations' entry 1: unknown key(s): hostname"),
        ({**BASE, "dhcp_reservations": [reservation()["dhcp_reservations"][0]] * 2}, "entry 2: 52:54:00:00:00:01"),
    ],
)  # fmt: skip
def test_invalid_plist_says_which_key_and_why(obj, needle):
    with pytest.raises(ConfigError) as info:
        parse_plist_network("lab", obj)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "obj,needle",
    [
        ({"nat44": False}, "unknown key(s): nat44 ('nat44' exists only in .plist files)"),
        ({"dns_proxy": False}, "a .json file says 'dns' for 'dns_proxy'"),
    ],
)
def test_plist_keys_in_a_json_file_get_a_hint(obj, needle):
    with pytest.raises(ConfigError) as info:
        parse_network("lab", obj)
    assert needle in str(info.value)


def test_json_external_interface_also_needs_a_shared_network():
    with pytest.raises(ConfigError, match="'external_interface' needs mode 'shared'"):
        parse_network("lab", {"mode": "host", "external_interface": "eth1"})


# Any value of any key: a ConfigError or a config, never another exception.
plist_values = st.recursive(
    st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=8)
    | st.sampled_from(["tcp", "udp", "shared", "host", "192.168.42.0", "192.168.42.2", "fd00::", "52:54:00:00:00:01"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=20), children, max_size=4),
    max_leaves=10,
)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(sorted(PLIST_KEYS | {"other"})), plist_values, max_size=6))
def test_any_plist_values_give_a_config_or_a_config_error(obj):
    try:
        cfg = parse_plist_network("lab", obj)
    except ConfigError:
        return
    unsupported_on_linux(cfg), unsupported_on_darwin(cfg)


@settings(max_examples=100)
@given(
    mode=st.sampled_from(["shared", "host"]),
    switches=st.dictionaries(st.sampled_from(["dhcp", "dns_proxy", "router_advertisement"]), st.booleans()),
    mtu=st.integers(config.MIN_MTU, config.MAX_MTU),
    third=st.integers(0, 255),
    fmt=st.sampled_from([plistlib.FMT_XML, plistlib.FMT_BINARY]),
)
def test_written_plists_read_back_as_written(tmp_path_factory, mode, switches, mtu, third, fmt):
    directory = tmp_path_factory.mktemp("conf")
    obj = {"mode": mode, "subnet": f"10.{third}.0.0", "mask": "255.255.255.0", "mtu": mtu, **switches}
    write_plist(directory / "lab.plist", obj, fmt=fmt)
    cfg = config.load_config_dir(directory, check=no_check)["lab"]
    assert (cfg.mode, cfg.mtu, cfg.subnet) == (mode, mtu, IPv4Network(f"10.{third}.0.0/24"))
    assert cfg.dhcp == switches.get("dhcp", True) and cfg.dns == switches.get("dns_proxy", True)
    assert cfg.router_advertisement == switches.get("router_advertisement", True)


# -- loading a directory -------------------------------------------------------------


def test_a_bad_plist_is_logged_and_skipped_while_the_others_load(tmp_path, caplog):
    write_plist(tmp_path / "good.plist", {"mode": "host", "subnet": "192.168.60.1"})
    (tmp_path / "also-good.json").write_text(json.dumps({"mode": "host", "subnet": "192.168.61.1"}))
    (tmp_path / "truncated.plist").write_bytes(UPSTREAM_EXAMPLE[:200])
    (tmp_path / "garbage.plist").write_bytes(b"\x00\x01 not a plist")
    (tmp_path / "array.plist").write_bytes(plistlib.dumps(["mode", "shared"]))
    write_plist(tmp_path / "typo.plist", {"mode": "host", "nat_44": False})
    with caplog.at_level(logging.ERROR):
        nets = config.load_config_dir(tmp_path)
    assert set(nets) == {"shared", "host", "good", "also-good"}
    for bad in ("truncated", "garbage", "array", "typo"):
        assert f"config {tmp_path / bad}.plist: " in caplog.text and f"network {bad!r} is not offered" in caplog.text
    assert "unknown key(s): nat_44" in caplog.text


def test_json_and_plist_for_one_network_offer_neither(tmp_path, caplog):
    (tmp_path / "lab.json").write_text(json.dumps({"mode": "host"}))
    write_plist(tmp_path / "lab.plist", {"mode": "host"})
    (tmp_path / "shared.json").write_text(json.dumps({"mtu": 1400}))
    write_plist(tmp_path / "shared.plist", {"mode": "shared"})
    write_plist(tmp_path / "other.plist", {"mode": "host"})
    with caplog.at_level(logging.ERROR):
        nets = config.load_config_dir(tmp_path)
    assert set(nets) == {"host", "other"}  # the builtin 'shared' is withdrawn too
    assert f"{tmp_path / 'lab.json'} and {tmp_path / 'lab.plist'}: network 'lab' is defined twice" in caplog.text


def test_a_host_port_is_kept_by_the_first_file_whatever_its_format(tmp_path, caplog):
    rule = {"protocol": "tcp", "external_port": 8080, "internal_port": 80}
    rules = [dict(rule, internal_address="192.168.61.9")]
    write_plist(tmp_path / "a.plist", {"mode": "shared", "subnet": "192.168.61.0", "port_forwarding_rules": rules})
    forward_json = {"proto": "tcp", "host_port": 8080, "guest_ip": "192.168.62.9", "guest_port": 80}
    (tmp_path / "b.json").write_text(json.dumps({"subnet": "192.168.62.0", "port_forwards": [forward_json]}))
    with caplog.at_level(logging.ERROR):
        nets = config.load_config_dir(tmp_path)
    assert "a" in nets and "b" not in nets
    assert "tcp/8080 is already used by network 'a'" in caplog.text


# -- what each platform refuses ---------------------------------------------------------


def test_builtins_need_nothing_either_platform_lacks():
    for cfg in BUILTINS.values():
        assert unsupported_on_linux(cfg) == [] and unsupported_on_darwin(cfg) == []


@pytest.mark.parametrize(
    "obj,needle",
    [
        ({"mode": "shared", "nat44": False}, "'nat44' false"),
        ({"mode": "shared", "nat66": False}, "'nat66' false"),
        ({"mode": "shared", "router_advertisement": False}, "'router_advertisement' false"),
        ({"mode": "host", "ipv6_prefix": "fd00:1::", "router_advertisement": False}, "'router_advertisement' false"),
        ({"mode": "shared", "ipv6_prefix": "fd00:1::", "ipv6_prefix_length": 48}, "'ipv6_prefix_length' 48"),
        ({"mode": "shared", "subnet": "192.168.42.0", "ipv6_prefix": "fd00:1::",
          "port_forwarding_rules": [{"protocol": "tcp", "external_port": 22, "internal_address": "fd00:1::9",
                                     "internal_port": 22}]}, "IPv6 address fd00:1::9"),
    ],
)  # fmt: skip
def test_linux_refuses_what_its_backend_cannot_do(obj, needle):
    cfg = parse_plist_network("lab", obj)
    problems = unsupported_on_linux(cfg)
    assert len(problems) == 1 and needle in problems[0] and "not supported on Linux" in problems[0]
    assert unsupported_on_darwin(cfg) == []  # vmnet has a call for each of these


@pytest.mark.parametrize(
    "obj",
    [
        {"mode": "host", "router_advertisement": False},  # a host network without a prefix has no IPv6 at all
        {"mode": "host", "nat44": False, "nat66": False},  # what host mode is anyway
        {"mode": "shared", "ipv6_prefix": "fd00:1:2:3::", "dhcp": False, "dns_proxy": False},
    ],
)
def test_linux_accepts_what_it_can_do(obj):
    assert unsupported_on_linux(parse_plist_network("lab", obj)) == []


@pytest.mark.parametrize(
    "obj,needle",
    [
        ({"subnet": "192.168.42.0", "dhcp_range": ["192.168.42.100", "192.168.42.200"]}, "'dhcp_range'"),
        ({"lease_time": 600}, "'lease_time'"),
        ({"dns_servers": ["9.9.9.9"]}, "'dns_servers'"),
        ({"domain": "lab.example"}, "'domain'"),
        ({"subnet": "192.168.42.0", "reservations": [{"mac": "52:54:00:00:00:01", "ip": "192.168.42.9",
                                                      "hostname": "db"}]}, "'hostname'"),
        ({"mode": "shared", "ipv6": False}, "'ipv6' false"),
    ],
)  # fmt: skip
def test_macos_refuses_json_extensions_vmnet_cannot_do(obj, needle):
    cfg = parse_network("lab", obj)
    problems = unsupported_on_darwin(cfg)
    assert len(problems) == 1 and needle in problems[0] and "not supported on macOS" in problems[0]
    assert unsupported_on_linux(cfg) == []


@pytest.mark.parametrize(
    "obj",
    [
        {"mode": "host", "ipv6": False},  # host networks: IPv6 as vmnet's host mode has it
        {"lease_time": 3600},  # the default
        {"subnet": "192.168.42.0", "reservations": [{"mac": "52:54:00:00:00:01", "ip": "192.168.42.9"}]},
        {"allowed_users": [0], "allowed_groups": [0], "mtu": 9000, "dhcp": False, "dns": False},
    ],
)
def test_macos_accepts_json_that_vmnet_can_do(obj):
    assert unsupported_on_darwin(parse_network("lab", obj)) == []


def test_refused_files_are_logged_with_every_reason_and_skipped(tmp_path, caplog):
    write_plist(tmp_path / "nonat.plist", {"mode": "shared", "nat44": False, "nat66": False})
    (tmp_path / "dns.json").write_text(json.dumps({"dns_servers": ["9.9.9.9"], "domain": "lab.example"}))
    with caplog.at_level(logging.ERROR):
        on_linux = config.load_config_dir(tmp_path, check=unsupported_on_linux)
        on_macos = config.load_config_dir(tmp_path, check=unsupported_on_darwin)
    assert set(on_linux) == {"shared", "host", "dns"} and set(on_macos) == {"shared", "host", "nonat"}
    assert f"config {tmp_path / 'nonat.plist'}: 'nat44' false" in caplog.text and "; 'nat66' false" in caplog.text
    assert f"config {tmp_path / 'dns.json'}: 'dns_servers'" in caplog.text and "; 'domain'" in caplog.text


def test_the_default_check_is_the_platforms(tmp_path, monkeypatch):
    write_plist(tmp_path / "nonat.plist", {"mode": "shared", "nat44": False})
    assert "nonat" not in config.load_config_dir(tmp_path)  # this is Linux
    monkeypatch.setattr(config.sys, "platform", "darwin")
    assert config.platform_check() is unsupported_on_darwin
    assert "nonat" in config.load_config_dir(tmp_path)
