"""Files root opens: never through a symlink, never a FIFO, never unbounded.

The broker runs as root and writes in its state directory, creates its
socket in a directory, and reads config files.  Whoever can write one of
those directories could put a symlink where the broker is about to write
(``networks.json.tmp -> /etc/shadow``), a FIFO where it reads (start-up
hangs), or a link to ``/dev/zero`` (a read that never ends).  So:

- ``secure_directory`` walks a directory's path from ``/`` one component at a
  time (``openat`` with ``O_NOFOLLOW``), refuses it if any directory above is
  writable by someone else, and fixes the directory itself (root's, not
  group or other writable), logging what it changed.
- ``write_atomically``, ``create_fresh`` and ``keep_regular`` work on a
  directory fd opened with ``O_DIRECTORY|O_NOFOLLOW``: ``*at`` calls,
  ``O_NOFOLLOW|O_EXCL`` for anything created, a symlink found in the way is
  removed (never followed) and logged.
- ``read_regular`` and ``read_tail`` read only regular files (``lstat``, then
  ``O_NOFOLLOW|O_NONBLOCK`` and ``fstat``), up to a size limit.

Reading works anywhere (config.py uses it on macOS too); the rest names
directories through ``/proc/self/fd`` and is for the Linux backend.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator

log = logging.getLogger(__name__)

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_SYMLINKS = 40  # as the kernel's path walk
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


class UnsafeDirectory(Exception):
    """A directory the broker would create files in is not safe, and it would not fix it."""


class RefusedFile(OSError):
    """Not a regular file, or too large; the message says which (without the path)."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "of an unknown type"


def _trusted_owners() -> set[int]:
    return {0, os.geteuid()}


# -- directories ------------------------------------------------------------------


def secure_directory(path: str | os.PathLike[str], purpose: str, *, mode: int = 0o755) -> str:
    """Make ``path`` a directory only root can change, creating what is missing; its real path.

    Every directory above it must be root's and writable by nobody else
    (sticky ones such as ``/tmp`` excepted: there others cannot rename or
    remove root's entries); else ``UnsafeDirectory``.  Symlinks on the way
    are followed only if root owns them (the directory holding them has been
    checked already).  Missing directories are created with ``mode``.  The
    directory itself, if someone else's or group/other writable, is fixed
    (chown to root, ``chmod go-w``) and the fix logged; a shared sticky
    directory (``/tmp`` itself) is refused instead.
    """
    shown = os.fspath(path)
    pending = [part for part in os.path.abspath(shown).split("/") if part][::-1]  # a stack
    fd = os.open("/", DIRECTORY_FLAGS)
    links = 0
    try:
        while pending:
            name = pending.pop()
            if name == "/":  # an absolute symlink target: start again at the root
                os.close(fd)
                fd = os.open("/", DIRECTORY_FLAGS)
                continue
            if name == ".":
                continue
            _check_above(fd, purpose, shown)
            try:
                next_fd = os.open(name, DIRECTORY_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                next_fd = _make_directory(fd, name, mode, purpose)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                links += 1
                if links > MAX_SYMLINKS:
                    raise UnsafeDirectory(f"{purpose} directory {shown}: too many symbolic links") from None
                _follow(fd, name, purpose, shown, pending)
                continue
            os.close(fd)
            fd = next_fd
        _fix_leaf(fd, purpose, shown)
        return _path_of(fd)
    finally:
        os.close(fd)


def _path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _make_directory(fd: int, name: str, mode: int, purpose: str) -> int:
    try:
        os.mkdir(name, mode, dir_fd=fd)
    except FileExistsError:  # made meanwhile; if it is a symlink now, the open refuses it
        return os.open(name, DIRECTORY_FLAGS, dir_fd=fd)
    made = os.open(name, DIRECTORY_FLAGS, dir_fd=fd)
    os.fchmod(made, mode)  # exactly, whatever the umask
    log.info("%s directory: created %s (mode %04o)", purpose, _path_of(made), mode)
    return made


def _follow(fd: int, name: str, purpose: str, shown: str, pending: list[str]) -> None:
    """``name`` in ``fd`` is no directory: push a root-owned symlink's target, refuse anything else."""
    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    full = os.path.join(_path_of(fd), name)
    if not stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(f"{purpose} directory {shown}: {full} is {_kind(st.st_mode)}, not a directory")
    if st.st_uid not in _trusted_owners():
        raise UnsafeDirectory(f"{purpose} directory {shown}: {full} is a symbolic link owned by uid {st.st_uid}")
    target = os.readlink(name, dir_fd=fd)
    pending.extend(reversed([part for part in target.split("/") if part]))
    if target.startswith("/"):
        pending.append("/")


def _check_above(fd: int, purpose: str, shown: str) -> None:
    """A directory on the way: root's, and writable by nobody else unless sticky."""
    st = os.fstat(fd)
    if st.st_uid not in _trusted_owners():
        raise UnsafeDirectory(
            f"{purpose} directory {shown}: {_path_of(fd)} is owned by uid {st.st_uid}, "
            "who could replace what is below it"
        )
    if st.st_mode & _OTHERS_WRITE and not st.st_mode & stat.S_ISVTX:
        raise UnsafeDirectory(
            f"{purpose} directory {shown}: {_path_of(fd)} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}), who could replace what is below it"
        )


def _fix_leaf(fd: int, purpose: str, shown: str) -> None:
    st = os.fstat(fd)
    where = _path_of(fd)
    wrong_owner = st.st_uid not in _trusted_owners()
    writable = bool(st.st_mode & _OTHERS_WRITE)
    if not (wrong_owner or writable):
        return
    if writable and st.st_mode & stat.S_ISVTX:
        raise UnsafeDirectory(
            f"{purpose} directory {shown}: {where} is a shared sticky directory "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); give the broker a directory of its own"
        )
    before = f"owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"
    if wrong_owner:
        os.fchown(fd, os.geteuid(), -1)
    os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~_OTHERS_WRITE)
    after = os.fstat(fd)
    log.warning(
        "%s directory %s was %s, so others could swap files root writes there; fixed: now uid %d, mode %04o",
        purpose, where, before, after.st_uid, stat.S_IMODE(after.st_mode),
    )  # fmt: skip


@contextlib.contextmanager
def open_directory(path: str | os.PathLike[str]) -> Iterator[int]:
    """An fd of ``path`` (``O_DIRECTORY|O_NOFOLLOW``: its last component is no symlink) for ``*at`` calls."""
    fd = os.open(path, DIRECTORY_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


# -- files in a directory fd ------------------------------------------------------------


def _remove_in_the_way(dir_fd: int, name: str) -> None:
    """Remove ``name`` if present; anything but a plain regular file there is logged (never followed)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise RefusedFile(f"{name} is a directory; the broker will not remove it")
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        what = _kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
        target = ""
        if stat.S_ISLNK(st.st_mode):
            with contextlib.suppress(OSError):
                target = f" (to {os.readlink(name, dir_fd=dir_fd)})"
        path = os.path.join(_path_of(dir_fd), name)
        log.warning("%s was %s%s: removed it, not followed, and made a new file", path, what, target)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def create_fresh(dir_fd: int, name: str, mode: int = 0o644) -> int:
    """A new, empty file ``name`` (what was there removed, a symlink never followed); its fd for writing."""
    _remove_in_the_way(dir_fd, name)
    return os.open(name, CREATE_FLAGS, mode, dir_fd=dir_fd)


def write_atomically(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Readers see the old ``name`` or the new one, never half; no symlink is followed.

    The text goes to ``name.tmp`` created with ``O_EXCL|O_NOFOLLOW``, which
    is renamed over ``name`` (a rename replaces a symlink, never its target).
    """
    tmp = name + ".tmp"
    fd = create_fresh(dir_fd, tmp, mode)
    try:
        with os.fdopen(fd, "wb", closefd=True) as f:
            f.write(data)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def keep_regular(dir_fd: int, name: str, mode: int = 0o644) -> None:
    """Make sure ``name`` is a regular file of ours, keeping its content if it is one.

    For files another program opens by path as root (dnsmasq's lease file):
    a symlink, FIFO or hard link there is removed and an empty file made.
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid in _trusted_owners():
            return
    except FileNotFoundError:
        pass
    os.close(create_fresh(dir_fd, name, mode))


def unlink(dir_fd: int, name: str) -> None:
    """Remove ``name`` if present (unlink never follows a symlink)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


# -- reading --------------------------------------------------------------------------


@contextlib.contextmanager
def _open_regular(path: str | os.PathLike[str], dir_fd: int | None) -> Iterator[tuple[int, os.stat_result]]:
    st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise RefusedFile(f"{_kind(st.st_mode)}, not a regular file")
    try:
        fd = os.open(path, READ_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a symlink since the lstat
            raise RefusedFile("a symbolic link, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedFile(f"{_kind(st.st_mode)}, not a regular file")
        yield fd, st
    finally:
        os.close(fd)


def read_regular(path: str | os.PathLike[str], limit: int, *, dir_fd: int | None = None) -> bytes:
    """The content of a regular file of at most ``limit`` bytes; ``RefusedFile`` otherwise."""
    with _open_regular(path, dir_fd) as (fd, st):
        if st.st_size > limit:
            raise RefusedFile(f"{st.st_size} bytes, more than the {limit} allowed")
        data = _read_up_to(fd, limit + 1)
        if len(data) > limit:
            raise RefusedFile(f"more than the {limit} bytes allowed")
        return data


def read_tail(path: str | os.PathLike[str], limit: int, *, dir_fd: int | None = None) -> bytes:
    """The last ``limit`` bytes of a regular file (a log); ``RefusedFile`` if it is none."""
    with _open_regular(path, dir_fd) as (fd, st):
        if st.st_size > limit:
            os.lseek(fd, st.st_size - limit, os.SEEK_SET)
        return _read_up_to(fd, limit)


def _read_up_to(fd: int, size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.read(fd, min(size, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
