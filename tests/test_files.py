"""Files root opens where others might write (issue 8, class 3): directories
made safe or refused, no symlink followed, no FIFO read, nothing unbounded.

Symlink attacks: each points at a file outside ("the target"), which must be
untouched afterwards.  Ownership cases chown to ``nobody`` (65534), so they
need root; without it they skip, and fail under ``CI=true``.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from vmnet_broker import files
from vmnet_broker.files import RefusedFile, UnsafeDirectory

from .conftest import NOBODY, require_root

@pytest.fixture
def target(precious_file):
    return precious_file


def untouched(path: Path) -> bool:
    st = path.stat()
    return path.read_text() == "precious\n" and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0 == st.st_gid


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- secure_directory -------------------------------------------------------------


def test_missing_directories_are_created_root_only_whatever_the_umask(tmp_path):
    old = os.umask(0o000)
    try:
        real = files.secure_directory(tmp_path / "a" / "b", "state")
    finally:
        os.umask(old)
    assert real == str(tmp_path / "a" / "b")
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o755


def test_a_directory_others_can_write_is_fixed_and_the_fix_logged(tmp_path, caplog):
    require_root()
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    state.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="vmnet_broker.files"):
        files.secure_directory(state, "state")
    st = state.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o755
    assert f"state directory {state} was owned by uid {NOBODY}, mode 0777" in caplog.text
    assert "fixed: now uid 0, mode 0755" in caplog.text


@pytest.mark.parametrize("how", ["owner", "group-writable"])
def test_a_directory_above_that_others_could_change_is_refused(tmp_path, how):
    require_root()
    above = tmp_path / "above"
    above.mkdir()
    if how == "owner":
        os.chown(above, NOBODY, NOBODY)
    else:
        above.chmod(0o775)
    with pytest.raises(UnsafeDirectory, match=f"{above} is (owned by uid {NOBODY}|writable by group or others)"):
        files.secure_directory(above / "run", "socket")
    assert not (above / "run").exists()  # nothing made below it


def test_a_sticky_directory_above_is_fine_but_as_the_directory_itself_it_is_refused(tmp_path):
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    assert files.secure_directory(shared / "mine", "socket") == str(shared / "mine")
    with pytest.raises(UnsafeDirectory, match="shared sticky directory"):
        files.secure_directory(shared, "socket")
    assert mode(shared) == 0o1777  # never "fixed"


def test_a_root_symlink_on_the_way_is_followed_and_the_real_path_returned(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "abs").symlink_to(tmp_path / "real")
    assert files.secure_directory(tmp_path / "link" / "state", "state") == str(tmp_path / "real" / "state")
    assert files.secure_directory(tmp_path / "abs", "state") == str(tmp_path / "real")


def test_a_symlink_someone_else_owns_is_refused(tmp_path):
    require_root()
    (tmp_path / "real").mkdir()
    link = tmp_path / "link"
    link.symlink_to("real")
    os.chown(link, NOBODY, NOBODY, follow_symlinks=False)
    with pytest.raises(UnsafeDirectory, match="symbolic link owned by uid 65534"):
        files.secure_directory(link / "state", "state")


def test_a_file_where_a_directory_should_be_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UnsafeDirectory, match="file is a regular file, not a directory"):
        files.secure_directory(tmp_path / "file" / "state", "state")


def test_symlink_loops_end(tmp_path):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(UnsafeDirectory, match="too many symbolic links"):
        files.secure_directory(tmp_path / "a", "state")


# -- writing --------------------------------------------------------------------------


@pytest.mark.parametrize("planted", ["networks.json.tmp", "networks.json"])
def test_write_atomically_never_writes_through_a_symlink(tmp_path, target, planted, caplog):
    (tmp_path / planted).symlink_to(target)
    with caplog.at_level(logging.WARNING), files.open_directory(tmp_path) as fd:
        files.write_atomically(fd, "networks.json", b"{}\n")
    assert untouched(target)
    assert (tmp_path / "networks.json").read_text() == "{}\n" and not (tmp_path / "networks.json").is_symlink()
    assert not (tmp_path / "networks.json.tmp").exists()
    if planted.endswith(".tmp"):
        assert f"{tmp_path / planted} was a symbolic link (to {target}): removed it, not followed" in caplog.text


def test_create_fresh_replaces_a_symlink_or_hard_link_and_never_truncates_the_target(tmp_path, target, caplog):
    (tmp_path / "x.log").symlink_to(target)
    os.link(target, tmp_path / "y.log")
    with caplog.at_level(logging.WARNING), files.open_directory(tmp_path) as fd:
        for name in ("x.log", "y.log"):
            os.write(files.create_fresh(fd, name), b"new")
    assert untouched(target)
    assert "was a file with 2 hard links" in caplog.text


def test_keep_regular_keeps_a_plain_file_and_replaces_anything_else(tmp_path, target):
    (tmp_path / "kept").write_text("lease\n")
    (tmp_path / "link").symlink_to(target)
    os.mkfifo(tmp_path / "fifo")
    with files.open_directory(tmp_path) as fd:
        for name in ("kept", "link", "fifo", "missing"):
            files.keep_regular(fd, name)
    assert (tmp_path / "kept").read_text() == "lease\n"
    for name in ("link", "fifo", "missing"):
        st = os.lstat(tmp_path / name)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0, name
    assert untouched(target)


def test_open_directory_does_not_follow_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    with pytest.raises(OSError):
        with files.open_directory(tmp_path / "link"):
            pass


# -- reading ---------------------------------------------------------------------------


def test_read_regular_refuses_symlinks_fifos_devices_and_large_files(tmp_path, target):
    (tmp_path / "link").symlink_to(target)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "big").write_bytes(b"x" * 101)
    (tmp_path / "ok").write_bytes(b"x" * 100)
    for name, reason in [("link", "symbolic link"), ("fifo", "FIFO"), ("zero", "symbolic link"), ("big", "101 bytes")]:
        with pytest.raises(RefusedFile, match=reason):
            files.read_regular(tmp_path / name, 100)
    with pytest.raises(RefusedFile, match="character device"):
        files.read_regular("/dev/zero", 100)
    assert files.read_regular(tmp_path / "ok", 100) == b"x" * 100


def test_read_tail_reads_the_end_of_a_regular_file_only(tmp_path):
    (tmp_path / "log").write_bytes(b"a" * 5000 + b"the end")
    assert files.read_tail(tmp_path / "log", 7) == b"the end"
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(RefusedFile):
        files.read_tail(tmp_path / "fifo", 7)
