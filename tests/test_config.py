"""Config parsing: upstream's keys, our extensions, and clear per-file errors."""

import json
import logging
from ipaddress import IPv4Address, IPv4Network

import pytest

from vmnet_broker import config
from vmnet_broker.config import ConfigError, parse_network


def test_builtins_are_shared_and_host_without_fixed_subnets():
    nets = config.load_config_dir(None)
    assert set(nets) == {"shared", "host"}
    assert nets["shared"].mode == "shared" and nets["host"].mode == "host"
    assert nets["shared"].subnet is None and nets["host"].subnet is None


@pytest.mark.parametrize("subnet", ["192.168.42.0", "192.168.42.1"])
def test_subnet_as_network_or_host_address_names_the_same_network(subnet):
    cfg = parse_network("lab", {"mode": "host", "subnet": subnet, "mask": "255.255.255.0"})
    assert cfg.subnet == IPv4Network("192.168.42.0/24")


def test_upstream_keys_and_defaults():
    cfg = parse_network("lab", {"description": "my lab", "mode": "shared", "subnet": "10.77.0.1", "mask": "255.255.0.0"})
    assert cfg.description == "my lab" and cfg.subnet == IPv4Network("10.77.0.0/16")
    assert cfg.mtu == 1500 and cfg.dhcp and cfg.dns and cfg.dns_domain == "lab.internal"


def test_extension_keys():
    cfg = parse_network(
        "lab",
        {
            "subnet": "192.168.50.0", "mtu": 9000, "lease_time": 600,
            "dhcp_range": ["192.168.50.100", "192.168.50.200"],
            "reservations": [{"mac": "52:54:00:00:00:0A", "ip": "192.168.50.10", "hostname": "db"}],
            "dns_servers": ["10.0.0.53", "fd00::53"], "domain": "lab.example",
            "ipv6_prefix": "fd00:1:2:3::/64",
            "port_forwards": [{"proto": "tcp", "host_port": 8022, "guest_ip": "192.168.50.10", "guest_port": 22}],
            "external_interface": "eth1", "allowed_users": [0, "root"], "allowed_groups": ["root"],
        },
    )  # fmt: skip
    assert cfg.mtu == 9000 and cfg.lease_time == 600
    assert cfg.dhcp_range == (IPv4Address("192.168.50.100"), IPv4Address("192.168.50.200"))
    assert cfg.reservations[0].mac == "52:54:00:00:00:0a" and cfg.reservations[0].hostname == "db"
    assert cfg.ipv6 and str(cfg.ipv6_prefix) == "fd00:1:2:3::/64"
    assert cfg.port_forwards[0].guest_port == 22 and cfg.external_interface == "eth1"
    assert cfg.allowed_uids == {0} and cfg.allowed_gids == {0}


def test_builtin_can_be_overridden_keeping_its_defaults():
    cfg = parse_network("shared", {"subnet": "192.168.99.0"})
    assert cfg.mode == "shared" and cfg.ipv6 and cfg.subnet == IPv4Network("192.168.99.0/24")


@pytest.mark.parametrize(
    "obj,needle",
    [
        ([], "JSON object"),
        ({"mode": "bridged"}, "'mode'"),
        ({"subnet": "192.168.1.300"}, "IPv4"),
        ({"subnet": "192.168.1.0", "mask": "255.0.255.0"}, "netmask"),
        ({"subnet": "192.168.1.5"}, "network address"),
        ({"subnet": "8.8.8.0"}, "private"),
        ({"subnet": "192.168.1.0", "mask": "255.255.255.254"}, "too small"),
        ({"mask": "255.255.255.0"}, "'mask' needs 'subnet'"),
        ({"mtu": 67}, "'mtu'"),
        ({"mtu": 65536}, "'mtu'"),
        ({"mtu": "1500"}, "'mtu'"),
        ({"dhcp": "yes"}, "'dhcp'"),
        ({"reservations": [{"mac": "52:54:00:00:00:01", "ip": "192.168.1.9"}]}, "fixed 'subnet'"),
        ({"subnet": "192.168.1.0", "reservations": [{"mac": "x", "ip": "192.168.1.9"}]}, "mac"),
        ({"subnet": "192.168.1.0", "reservations": [{"mac": "52:54:00:00:00:01", "ip": "192.168.2.9"}]}, "not a guest address"),
        ({"subnet": "192.168.1.0", "dhcp_range": ["192.168.1.200", "192.168.1.100"]}, "comes after"),
        ({"ipv6_prefix": "fd00::/48"}, "/64"),
        ({"mode": "host", "subnet": "192.168.1.0", "port_forwards": []}, "mode 'shared'"),
        ({"subnet": "192.168.1.0", "port_forwards": [{"proto": "sctp", "host_port": 1, "guest_ip": "192.168.1.2", "guest_port": 1}]}, "tcp or udp"),
        ({"allowed_users": ["no-such-user-xyz"]}, "no user"),
        ({"allowed_groups": [-1]}, "group"),
        ({"external_interface": "a-name-that-is-too-long"}, "interface"),
        ({"colour": "blue"}, "unknown key"),
    ],
)  # fmt: skip
def test_invalid_config_says_which_key_and_why(obj, needle):
    with pytest.raises(ConfigError, match=None) as info:
        parse_network("lab", obj)
    assert needle in str(info.value)


def test_bad_file_is_reported_with_path_and_others_still_offered(tmp_path, caplog):
    (tmp_path / "good.json").write_text(json.dumps({"mode": "host", "subnet": "192.168.60.1"}))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "wrong.json").write_text(json.dumps({"mode": "bridged"}))
    (tmp_path / "README.txt").write_text("ignored")
    with caplog.at_level(logging.ERROR):
        nets = config.load_config_dir(tmp_path)
    assert set(nets) == {"shared", "host", "good"}
    assert str(tmp_path / "broken.json") in caplog.text and str(tmp_path / "wrong.json") in caplog.text
    assert "'mode'" in caplog.text


def test_bad_override_of_a_builtin_withdraws_it(tmp_path):
    (tmp_path / "host.json").write_text(json.dumps({"mtu": 1}))
    assert "host" not in config.load_config_dir(tmp_path)


def test_missing_config_dir_offers_builtins(tmp_path):
    assert set(config.load_config_dir(tmp_path / "nope")) == {"shared", "host"}


def test_access_control_root_always_and_lists_otherwise():
    open_cfg = parse_network("a", {})
    assert open_cfg.allows(1000, {1000})
    cfg = parse_network("b", {"allowed_users": [1000], "allowed_groups": [2000]})
    assert cfg.allows(0, {0})
    assert cfg.allows(1000, {1000})
    assert cfg.allows(1001, {2000, 1001})
    assert not cfg.allows(1001, {1001})


def test_a_host_port_forwarded_by_two_networks_keeps_the_first(tmp_path, caplog):
    forward = {"proto": "tcp", "host_port": 8080, "guest_port": 80}
    (tmp_path / "a.json").write_text(json.dumps({"subnet": "192.168.61.0", "port_forwards": [dict(forward, guest_ip="192.168.61.9")]}))
    (tmp_path / "b.json").write_text(json.dumps({"subnet": "192.168.62.0", "port_forwards": [dict(forward, guest_ip="192.168.62.9")]}))
    with caplog.at_level(logging.ERROR):
        nets = config.load_config_dir(tmp_path)
    assert "a" in nets and "b" not in nets
    assert "tcp/8080 is already used by network 'a'" in caplog.text


# -- values validated whole (issue 8, class 1) ------------------------------------


@pytest.mark.parametrize(
    "obj,needle",
    [
        ({"domain": "lab.example\n"}, "'domain'"),
        ({"domain": "lab..example"}, "'domain'"),
        ({"domain": "-lab.example"}, "'domain'"),
        ({"domain": "lab_1.example"}, "'domain'"),
        ({"domain": "lab.exampl\u0435"}, "'domain'"),  # a Cyrillic e
        ({"external_interface": "eth1\n"}, "'external_interface'"),
        ({"external_interface": "eth*"}, "'external_interface'"),
        ({"external_interface": "eth0:1"}, "'external_interface'"),
        ({"external_interface": ".."}, "'external_interface'"),
        ({"subnet": "192.168.1.0", "reservations": [{"mac": "52:54:00:00:00:01\n", "ip": "192.168.1.9"}]}, "'mac'"),
        ({"subnet": "192.168.1.0", "reservations": [{"mac": "52:54:00:00:00:01", "ip": "192.168.1.9", "hostname": "db\n"}]}, "'hostname'"),
        ({"subnet": "192.168.1.0", "reservations": [{"mac": "52:54:00:00:00:01", "ip": "192.168.1.9", "hostname": "d_b"}]}, "'hostname'"),
        ({"dns_servers": ["fe80::1%lo\nenable-tftp"]}, "scope id"),
        ({"dns_servers": ["fe80::1%eth0"]}, "scope id"),
        ({"dns_servers": ["9.9.9.9\n"]}, "not an IP address"),
        ({"ipv6_prefix": "fd00:1:2:3::%lo/64"}, "scope id"),
        ({"allowed_users": ["ro\x00ot"]}, "no user"),
        ({"allowed_groups": [2**32 - 1]}, "group"),
        ({"subnet": "192.168.1.0", "mask": 24}, "'mask'"),
        ({"mtu": 65522}, "'mtu' must be between 68 and 65521"),
    ],
)  # fmt: skip
def test_values_are_validated_whole(obj, needle):
    with pytest.raises(ConfigError) as info:
        parse_network("lab", obj)
    assert needle in str(info.value)


@pytest.mark.parametrize("name", ["lab\n", "lab\nx", "lab/x", "-lab", "x" * 65])
def test_a_network_name_is_validated_whole(name):
    with pytest.raises(ConfigError, match="network name"):
        parse_network(name, {})


def test_names_are_lowercase_ldh_and_addresses_are_rebuilt_from_their_value():
    cfg = parse_network(
        "lab",
        {
            "subnet": "192.168.1.0", "domain": "Lab.Example", "dns_servers": ["FD00:0::53"],
            "reservations": [{"mac": "52:54:00:00:00:01", "ip": "192.168.1.9", "hostname": "DB"}],
        },
    )  # fmt: skip
    assert cfg.domain == "lab.example" and cfg.reservations[0].hostname == "db"
    assert [str(s) for s in cfg.dns_servers] == ["fd00::53"]


@pytest.mark.parametrize(
    "name,domain",
    [("lab", "lab.internal"), ("My_Lab", "my-lab.internal"), ("a..b-", "a.b.internal"),
     ("x" * 64, "x" * 63 + ".internal")],  # fmt: skip
)
def test_the_default_domain_is_the_name_as_lowercase_ldh(name, domain):
    assert parse_network(name, {}).dns_domain == domain
    assert config.valid_domain(domain)


@pytest.mark.parametrize("mtu", [68, 1500, 9000, 65521])
def test_mtu_up_to_the_tap_maximum_is_accepted(mtu):
    assert parse_network("lab", {"mtu": mtu}).mtu == mtu


def test_an_mtu_above_the_tap_maximum_is_a_per_file_error_at_load(tmp_path, caplog):
    (tmp_path / "jumbo.json").write_text(json.dumps({"mtu": 65535}))
    (tmp_path / "ok.json").write_text(json.dumps({"mtu": 65521}))
    with caplog.at_level(logging.ERROR):
        nets = config.load_config_dir(tmp_path)
    assert "jumbo" not in nets and nets["ok"].mtu == 65521
    assert f"config {tmp_path / 'jumbo.json'}: 'mtu' must be between 68 and 65521, not 65535" in caplog.text


# -- the config directory: regular files only, bounded, linear (issue 8, class 7) ------


def test_a_fifo_in_the_config_dir_does_not_hang_loading(tmp_path, caplog):
    import os

    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "good.json").write_text(json.dumps({"mode": "host"}))
    with caplog.at_level(logging.ERROR):
        nets = config.load_config_dir(tmp_path)  # before: blocked forever in open()
    assert "good" in nets and "fifo" not in nets
    assert f"config {tmp_path / 'fifo.json'}: a FIFO, not a regular file" in caplog.text


def test_a_symlink_to_dev_zero_is_refused_not_read(tmp_path, caplog):
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "zero2.plist").symlink_to("/dev/zero")
    (tmp_path / "good.json").write_text(json.dumps({"mode": "host"}))
    with caplog.at_level(logging.ERROR):
        nets = config.load_config_dir(tmp_path)  # before: read /dev/zero until memory ran out
    assert "good" in nets and "zero" not in nets and "zero2" not in nets
    assert f"config {tmp_path / 'zero.json'}: a symbolic link, not a regular file" in caplog.text


def test_a_symlink_to_a_good_file_is_refused_too(tmp_path, caplog):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "lab.json").write_text(json.dumps({"mode": "host"}))
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "lab.json").symlink_to(real / "lab.json")
    with caplog.at_level(logging.ERROR):
        assert "lab" not in config.load_config_dir(conf)
    assert "symbolic link" in caplog.text


def test_files_over_the_size_limit_and_directories_are_refused(tmp_path, caplog):
    (tmp_path / "big.json").write_text(json.dumps({"description": "x" * config.MAX_CONFIG_FILE}))
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "edge.json").write_text(json.dumps({"description": ""}).ljust(config.MAX_CONFIG_FILE))
    with caplog.at_level(logging.ERROR):
        nets = config.load_config_dir(tmp_path)
    assert "big" not in nets and "dir" not in nets and "edge" in nets
    size = (tmp_path / "big.json").stat().st_size
    assert f"big.json: {size} bytes, more than the {config.MAX_CONFIG_FILE} allowed" in caplog.text
    assert "a directory, not a regular file" in caplog.text


def test_deeply_nested_json_is_a_per_file_error(tmp_path, caplog):
    (tmp_path / "deep.json").write_text("[" * 50000)
    (tmp_path / "deep2.plist").write_bytes(b"<plist>" + b"<array>" * 5000)
    with caplog.at_level(logging.ERROR):
        nets = config.load_config_dir(tmp_path)
    assert "deep" not in nets and "deep2" not in nets


def test_ten_thousand_files_load_in_linear_time(tmp_path):
    import time

    for i in range(10_000):
        forward = [{"proto": "tcp", "host_port": 1024 + i, "guest_ip": f"10.{i // 256}.{i % 256}.2", "guest_port": 22}]
        obj = {"subnet": f"10.{i // 256}.{i % 256}.0", "port_forwards": forward}
        (tmp_path / f"n{i:05d}.json").write_text(json.dumps(obj))
    started = time.monotonic()
    nets = config.load_config_dir(tmp_path)
    took = time.monotonic() - started
    print(f"10,000 config files loaded in {took:.2f} s")
    assert len(nets) == 10_002
    assert took < 5, f"{took:.1f} s: loading is not linear"  # before: ~35 s here (quadratic host-port check)
