"""Noticing when dnsmasq rewrites a lease file: inotify on the state directory.

dnsmasq rewrites ``dnsmasq-NAME.leases`` in place whenever a lease is
granted, renewed, released or expires, before it answers the guest.  The
bridge filter (guard.py) must learn of a new lease at once, so that no other
guest can take the address, and without polling: one inotify watch on the
state directory, read on the event loop; ``changed(filename)`` is called
a moment after a file's first event (a rewrite is a truncate and a few
writes).  inotify through libc with ctypes: the standard library has no
binding, and it is three calls.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from collections.abc import Callable

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
# A rewrite of a lease file is a truncate and a few writes: read it this
# long after the first event.
QUIET = 0.02


class LeaseFiles:
    """Calls ``changed(name)`` on the loop soon after a file in ``directory`` whose name ends in ``suffix`` changes.

    ``changed(None)`` after the kernel dropped events (queue overflow): every
    such file may have changed.
    """

    def __init__(
        self,
        directory: str,
        loop: asyncio.AbstractEventLoop,
        changed: Callable[[str | None], None],
        suffix: str = ".leases",
    ) -> None:
        self._loop = loop
        self._changed = changed
        self._suffix = suffix
        self._pending: dict[str | None, asyncio.TimerHandle] = {}
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        mask = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE
        if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        self._fd: int | None = fd
        loop.add_reader(fd, self._read)

    def _read(self) -> None:
        if self._fd is None:
            return
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EINTR:
                log.error("watching lease files failed, no longer watching: %s", e)
                self.close()
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            _, mask, _, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
            offset += _EVENT.size + length
            name = raw.split(b"\0", 1)[0].decode(errors="replace")
            if mask & IN_Q_OVERFLOW:
                self._soon(None)
            elif name.endswith(self._suffix):
                self._soon(name)

    def _soon(self, name: str | None) -> None:
        # Not pushed back by later events: a file rewritten all the time is
        # still read every QUIET seconds (a read cut short by a rewrite is
        # followed by the read its events ask for).
        if name not in self._pending:
            self._pending[name] = self._loop.call_later(QUIET, self._fire, name)

    def _fire(self, name: str | None) -> None:
        self._pending.pop(name, None)
        try:
            self._changed(name)
        except Exception:
            log.exception("handling a change of lease file %s", name)

    def close(self) -> None:
        for timer in self._pending.values():
            timer.cancel()
        self._pending.clear()
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
