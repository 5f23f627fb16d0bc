"""The daemon's own files (issue 8, class 3): the socket's directory, the
socket's group, the namespace lock — none reachable through a symlink."""

from __future__ import annotations

import grp
import logging
import os
from pathlib import Path

import pytest

from vmnet_broker import daemon
from vmnet_broker.daemon import NamespaceLock, Options

from .conftest import NOBODY, require_root

@pytest.fixture
def target(precious_file):
    return precious_file


def test_the_socket_group_is_never_given_to_a_symlink_target(tmp_path, target, monkeypatch):
    """A socket-group member who swapped the new socket for a symlink got root to chown its target."""
    require_root()
    socket_path = tmp_path / "run" / "broker.sock"
    socket_path.parent.mkdir()

    class SwappedListener:
        def __init__(self, path: str, **options: object) -> None:  # bind, then the swap, before the chown
            Path(path).symlink_to(target)

    monkeypatch.setattr(daemon._native, "Listener", SwappedListener)
    monkeypatch.setattr(daemon, "SeqpacketServer", lambda broker, listener, loop: listener)
    options = Options(socket_path=str(socket_path), socket_group="nogroup")
    daemon._transport(None, options, daemon._native, None, lambda reason: None)
    assert target.stat().st_gid == 0  # before: nogroup
    assert os.lstat(socket_path).st_gid == grp.getgrnam("nogroup").gr_gid  # the link itself


def test_a_socket_directory_others_can_write_is_fixed_and_logged(tmp_path, caplog):
    require_root()
    run = tmp_path / "run"
    run.mkdir()
    os.chown(run, NOBODY, NOBODY)
    run.chmod(0o777)
    options = Options(socket_path=str(run / "broker.sock"), state_dir=str(tmp_path / "state"))
    with caplog.at_level(logging.WARNING):
        secured = daemon._secure_directories(options, activated=False)
    assert secured.socket_path == str(run / "broker.sock")
    assert run.stat().st_uid == 0 and run.stat().st_mode & 0o777 == 0o755
    assert f"socket directory {run} was owned by uid {NOBODY}, mode 0777" in caplog.text
    assert (tmp_path / "state").is_dir()


def test_an_unsafe_directory_above_the_socket_stops_the_broker(tmp_path, caplog):
    require_root()
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)  # a user's directory: they could rename run/ and put their own
    options = Options(socket_path=str(home / "run" / "broker.sock"), state_dir=str(tmp_path / "state"))
    with pytest.raises(Exception, match=f"{home} is owned by uid {NOBODY}"):
        daemon._secure_directories(options, activated=False)


def test_the_socket_path_goes_through_no_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    options = Options(socket_path=str(tmp_path / "link" / "broker.sock"), state_dir=str(tmp_path / "state"))
    assert daemon._secure_directories(options, activated=False).socket_path == str(tmp_path / "real" / "broker.sock")


def test_the_namespace_lock_never_writes_through_a_symlink(tmp_path, target):
    require_root()
    inode = os.stat("/proc/self/ns/net").st_ino
    (tmp_path / f"netns-{inode}.lock").symlink_to(target)
    with pytest.raises(OSError):
        NamespaceLock(str(tmp_path))
    assert target.read_text() == "precious\n"  # before: truncated, our pid written


def test_the_namespace_lock_directory_is_made_root_only(tmp_path):
    lock_dir = tmp_path / "lock"
    lock_dir.mkdir()
    lock_dir.chmod(0o777)
    with NamespaceLock(str(lock_dir)) as lock:
        assert Path(lock.path).parent == lock_dir
    assert lock_dir.stat().st_mode & 0o777 == 0o755


def test_a_state_dir_dnsmasq_configs_cannot_name_stops_the_broker(tmp_path):
    options = Options(socket_path=str(tmp_path / "run" / "broker.sock"), state_dir=str(tmp_path / "vm state"))
    with pytest.raises(Exception, match="dnsmasq configs cannot name files there"):
        daemon._secure_directories(options, activated=False)
