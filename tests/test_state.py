"""Remembered choices (networks.json): validated like config, written without following symlinks."""

from __future__ import annotations

import json
import logging
import os
from ipaddress import IPv4Network, IPv6Network

import pytest

from vmnet_broker.backends.linux import LinuxBackend, subnets
from vmnet_broker.backends.linux.state import RememberedChoices
from vmnet_broker.config import NetworkConfig


def remembered(tmp_path, **entry) -> RememberedChoices:
    (tmp_path / "networks.json").write_text(json.dumps({"shared": entry}))
    return RememberedChoices(tmp_path)


@pytest.mark.parametrize("subnet", ["8.8.8.0/24", "128.0.0.0/1", "10.0.0.0/8", "192.168.0.0/16", "100.64.0.0/24",
                                    "203.0.113.0/24", "0.0.0.0/0", "not a subnet", "192.168.200.1/24"])  # fmt: skip
def test_a_remembered_subnet_that_is_not_a_private_24_is_dropped_and_logged(tmp_path, caplog, subnet):
    with caplog.at_level(logging.WARNING):
        assert remembered(tmp_path, subnet=subnet).subnet("shared") is None
    assert f"remembered subnet {subnet!r}" in caplog.text and "not a private (RFC 1918) /24" in caplog.text


@pytest.mark.parametrize("subnet", ["192.168.200.0/24", "10.1.2.0/24", "172.31.255.0/24"])
def test_a_remembered_private_24_is_used(tmp_path, subnet):
    assert remembered(tmp_path, subnet=subnet).subnet("shared") == IPv4Network(subnet)


@pytest.mark.parametrize("prefix", ["2001:db8::/64", "fe80::/64", "fd00::/48", "::/0", "fd00::%lo/64", "junk"])
def test_a_remembered_ipv6_prefix_that_is_not_a_ula_64_is_dropped_and_logged(tmp_path, caplog, prefix):
    with caplog.at_level(logging.WARNING):
        assert remembered(tmp_path, ipv6_prefix=prefix).ipv6_prefix("shared") is None
    assert "not a unique local /64" in caplog.text


def test_a_remembered_ula_64_is_used(tmp_path):
    assert remembered(tmp_path, ipv6_prefix="fd12:3456:789a:1::/64").ipv6_prefix("shared") == IPv6Network(
        "fd12:3456:789a:1::/64"
    )


def test_choose_never_returns_a_bad_previous_choice():
    assert subnets.choose([], IPv4Network("8.8.8.0/24")) == subnets.POOL_FIRST
    assert subnets.choose([], IPv4Network("128.0.0.0/1")) == subnets.POOL_FIRST


@pytest.mark.parametrize("subnet", ["8.8.8.0/24", "128.0.0.0/1"])
def test_the_backend_rechooses_a_bad_remembered_subnet(tmp_path, monkeypatch, subnet, caplog):
    (tmp_path / "networks.json").write_text(json.dumps({"shared": {"subnet": subnet}}))
    backend = LinuxBackend(tmp_path)
    monkeypatch.setattr(backend, "_taken", lambda: [])
    with caplog.at_level(logging.WARNING):
        assert backend._pick_subnet(NetworkConfig("shared")) == subnets.POOL_FIRST
    assert f"remembered subnet {subnet!r}" in caplog.text


def test_the_backend_logs_a_remembered_subnet_that_now_collides(tmp_path, monkeypatch, caplog):
    (tmp_path / "networks.json").write_text(json.dumps({"shared": {"subnet": "192.168.200.0/24"}}))
    backend = LinuxBackend(tmp_path)
    route = IPv4Network("192.168.200.0/22")
    monkeypatch.setattr(backend, "_taken", lambda: [(route, "route 192.168.200.0/22 (table 100)")])
    with caplog.at_level(logging.WARNING):
        assert backend._pick_subnet(NetworkConfig("shared")) == subnets.POOL_FIRST
    assert "remembered subnet 192.168.200.0/24 now overlaps route 192.168.200.0/22 (table 100); chose" in caplog.text


# -- the file itself ------------------------------------------------------------------


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "outside.json"
    path.write_text(json.dumps({"shared": {"subnet": "192.168.250.0/24"}}))
    return path


def test_networks_json_is_never_read_or_written_through_a_symlink(tmp_path, target, caplog):
    state = tmp_path / "state"
    state.mkdir()
    (state / "networks.json").symlink_to(target)
    choices = RememberedChoices(state)
    with caplog.at_level(logging.WARNING):
        assert choices.subnet("shared") is None  # not read through the link
        choices.remember("shared", subnet=IPv4Network("192.168.105.0/24"))
    assert "symbolic link" in caplog.text
    assert json.loads(target.read_text()) == {"shared": {"subnet": "192.168.250.0/24"}}
    assert not (state / "networks.json").is_symlink()
    assert choices.subnet("shared") == IPv4Network("192.168.105.0/24")


def test_a_symlink_at_the_temporary_file_is_not_followed(tmp_path, target):
    state = tmp_path / "state"
    state.mkdir()
    (state / "networks.json.tmp").symlink_to(target)
    RememberedChoices(state).remember("shared", subnet=IPv4Network("192.168.105.0/24"))
    assert json.loads(target.read_text()) == {"shared": {"subnet": "192.168.250.0/24"}}
    assert json.loads((state / "networks.json").read_text()) == {"shared": {"subnet": "192.168.105.0/24"}}


def test_a_fifo_as_networks_json_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "networks.json")
    assert RememberedChoices(tmp_path).subnet("shared") is None
