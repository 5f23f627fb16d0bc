"""``vmnet-broker doctor`` in a namespace of its own: it finds what is wrong and changes nothing."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from tests.conftest import require_services
from vmnet_broker.client import Client
from vmnet_broker.sandbox import BrokerProcess, Namespace


@pytest.fixture
def ns():
    require_services()
    with Namespace() as namespace:
        yield namespace


def doctor(ns: Namespace, tmp_path, *extra: str):
    state = tmp_path / "state"
    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "vmnet_broker", "doctor", "--socket", str(tmp_path / "broker.sock"),
            "--state-dir", str(state), "--config-dir", str(config), *extra]  # fmt: skip
    result = ns.run(*args, check=False, timeout=30)
    return result.returncode, result.stdout


def test_a_clean_namespace_is_all_well(ns, tmp_path):
    rc, out = doctor(ns, tmp_path)
    assert (rc, out.splitlines()[-1]) == (0, "all well"), out


def test_leftovers_are_reported_and_left_alone(ns, tmp_path):
    ns.ip("link", "add", "vmb-br7", "type", "bridge")
    ns.run("nft", "add", "table", "inet", "vmnet_broker")
    (tmp_path / "broker.sock").touch()  # a crashed broker's socket file, not a socket
    rc, out = doctor(ns, tmp_path)
    assert rc == 1, out
    assert "link vmb-br7" in out
    assert "nftables table inet vmnet_broker" in out
    assert "is not a socket" in out
    # Looked, changed nothing.
    assert ns.ip("link", "show", "vmb-br7", check=False).returncode == 0
    assert ns.run("nft", "list", "table", "inet", "vmnet_broker", check=False).returncode == 0


def test_a_subnet_that_overlaps_a_route_is_reported(ns, tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "lab.json").write_text(json.dumps({"mode": "host", "subnet": "10.9.3.0"}))
    ns.ip("route", "add", "10.9.0.0/16", "dev", "lo", "table", "200")  # a VPN's policy table
    rc, out = doctor(ns, tmp_path)
    assert rc == 1, out
    assert "network 'lab' 10.9.3.0/24 overlaps route 10.9.0.0/16 (table 200)" in out


def test_unsafe_state_dir_and_bad_config_are_reported(ns, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    (state / "networks.json.tmp").symlink_to("/etc/passwd")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "broken.json").write_text("{not json")
    rc, out = doctor(ns, tmp_path)
    assert rc == 1, out
    assert "writable by group or others" in out
    assert "networks.json.tmp is a symlink" in out
    assert "broken.json" in out and "not offered" in out


def test_a_running_broker_is_asked_not_blamed(tmp_path):
    require_services()
    with BrokerProcess(tmp_path / "b") as broker:
        with Client(broker.socket_path) as client:
            client.acquire_network("shared")
            result = broker.namespace.run(
                sys.executable, "-m", "vmnet_broker", "doctor", "--socket", broker.socket_path,
                "--state-dir", broker.state_dir, "--config-dir", str(tmp_path / "none"), check=False,
            )  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert "answers at" in result.stdout and "1 network(s)" in result.stdout
    assert "leftover" not in result.stdout.replace("no links", "")


def test_a_crashed_brokers_leftovers_are_reported_then_cleaned_by_the_next_start(tmp_path):
    require_services()
    broker = BrokerProcess(tmp_path / "b")
    try:
        broker.start()
        with Client(broker.socket_path) as client:
            client.acquire_network("shared")
            broker.process.kill()  # a crash: its dnsmasq, bridge and nft table stay
            broker.process.wait(10)
        result = broker.namespace.run(
            sys.executable, "-m", "vmnet_broker", "doctor", "--socket", broker.socket_path,
            "--state-dir", broker.state_dir, "--config-dir", str(tmp_path / "none"), check=False,
        )  # fmt: skip
        assert result.returncode == 1, result.stdout
        for what in ("dnsmasq pid", "link vmb-br0", "nftables table inet vmnet_broker", "no broker answers"):
            assert what in result.stdout, (what, result.stdout)
        broker.start()  # the next start removes them (and takes the namespace lock back)
        result = broker.namespace.run(
            sys.executable, "-m", "vmnet_broker", "doctor", "--socket", broker.socket_path,
            "--state-dir", broker.state_dir, "--config-dir", str(tmp_path / "none"), check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout
    finally:
        broker.close()


def test_a_degraded_network_of_the_running_broker_is_reported(tmp_path):
    """The broker marks a network degraded (here: its gateway flushed behind its back); doctor says so."""
    require_services()
    with BrokerProcess(tmp_path / "b") as broker:
        with Client(broker.socket_path) as client:
            net = client.acquire_network("shared")
            broker.namespace.ip("-4", "addr", "flush", "dev", net.bridge)
            reason = f"gateway {net.gateway}/24 was removed from bridge {net.bridge}"
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not (client.status().networks[0].raw.get("degraded") or ""):
                time.sleep(0.02)
            result = broker.namespace.run(
                sys.executable, "-m", "vmnet_broker", "doctor", "--socket", broker.socket_path,
                "--state-dir", broker.state_dir, "--config-dir", str(tmp_path / "none"), check=False,
            )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert f"problem  network   'shared' is degraded: {reason}" in result.stdout, result.stdout
