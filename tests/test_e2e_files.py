"""End to end, a real broker (issue 8, class 3): directories others could write
are fixed or refused, symlinks planted in the state directory are never
followed, remembered subnets are checked like config."""

from __future__ import annotations

import grp
import json
import os
import stat

import pytest

from vmnet_broker import Client

from .conftest import require_services

NOBODY = 65534
PLANTED = ["networks.json.tmp", "dnsmasq-shared.conf.tmp", "dnsmasq-shared.conf", "dnsmasq-shared.log",
           "dnsmasq-shared.leases", "dnsmasq-shared.pid", "dnsmasq-host.log"]  # fmt: skip


@pytest.fixture
def services(network):
    require_services()


@pytest.fixture
def outside(tmp_path):
    """Files outside the broker's directories, one per planted symlink."""
    directory = tmp_path / "outside"
    directory.mkdir()
    made = {}
    for name in PLANTED:
        made[name] = directory / name
        made[name].write_text("precious\n")
        made[name].chmod(0o600)
    return made


def test_a_user_writable_state_dir_is_fixed_and_no_symlink_in_it_is_followed(start_broker, services, tmp_path, outside):
    workdir = tmp_path / "b"
    state = workdir / "state"
    state.mkdir(parents=True)
    os.chown(state, NOBODY, NOBODY)
    state.chmod(0o777)
    for name, target in outside.items():  # what the user did while it was theirs
        (state / name).symlink_to(target)
    broker = start_broker(workdir=workdir)
    with Client(broker.socket_path) as client:
        client.acquire_network("shared")
        client.acquire_network("host")
    for name, target in outside.items():
        assert target.read_text() == "precious\n" and stat.S_IMODE(target.stat().st_mode) == 0o600, name
        assert target.stat().st_uid == 0, name
    st = state.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o755
    log = broker.log()
    assert f"state directory {state} was owned by uid {NOBODY}, mode 0777" in log and "fixed" in log
    assert f"{state}/networks.json.tmp was a symbolic link" in log
    assert f"{state}/dnsmasq-shared.log was a symbolic link" in log
    assert f"{state}/dnsmasq-shared.leases was a symbolic link" in log
    assert json.loads((state / "networks.json").read_text()).keys() == {"shared", "host"}


def test_a_socket_directory_the_group_could_write_is_fixed_before_the_socket_is_made(start_broker, network, tmp_path):
    workdir = tmp_path / "b"
    workdir.mkdir()
    nogroup = grp.getgrnam("nogroup").gr_gid
    os.chown(workdir, 0, nogroup)
    workdir.chmod(0o775)  # the socket group could swap the socket for a symlink
    broker = start_broker(workdir=workdir, extra_args=("--socket-group", "nogroup"))
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o755
    assert f"socket directory {workdir} was owned by uid 0, mode 0775" in broker.log()
    sock = os.lstat(broker.socket_path)
    assert stat.S_ISSOCK(sock.st_mode) and sock.st_gid == nogroup


def test_a_directory_above_that_a_user_owns_stops_the_broker(start_broker, network, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    with pytest.raises(RuntimeError, match="broker exited with 1"):
        start_broker(workdir=home / "b")
    log = (home / "b" / "broker.log").read_text()
    assert f"{home} is owned by uid {NOBODY}, who could replace what is below it; not starting" in log


def test_remembered_subnets_that_are_not_private_are_chosen_again(start_broker, services, tmp_path):
    workdir = tmp_path / "b"
    (workdir / "state").mkdir(parents=True)
    remembered = {"shared": {"subnet": "8.8.8.0/24", "ipv6_prefix": "2001:db8::/64"}, "host": {"subnet": "128.0.0.0/1"}}
    (workdir / "state" / "networks.json").write_text(json.dumps(remembered))
    broker = start_broker(workdir=workdir)
    with Client(broker.socket_path) as client:
        shared = client.acquire_network("shared")
        host = client.acquire_network("host")
    assert {shared.subnet, host.subnet} == {"192.168.105.0", "192.168.106.0"}
    assert shared.ipv6_prefix.startswith("fd")
    log = broker.log()
    assert "remembered subnet '8.8.8.0/24'" in log and "remembered subnet '128.0.0.0/1'" in log
    assert "remembered IPv6 prefix '2001:db8::/64'" in log
    saved = json.loads((workdir / "state" / "networks.json").read_text())
    assert saved["shared"]["subnet"] == f"{shared.subnet}/24" and saved["host"]["subnet"] == f"{host.subnet}/24"
