"""The Linux transport: the native Unix seqpacket listener on the asyncio loop.

Each connection's fd is watched with ``add_reader``; every packet is handed to
the broker, and the reply (with fds) goes back in request order.  A client
that stops reading its replies is not read from either until it catches up,
so one slow client costs the broker a bounded queue and nothing else.

One client cannot hold the others up: each wake-up of a connection handles
its packets for at most ``WAKEUP_BUDGET`` of loop time, then the loop serves
whoever else is ready; fds a client attaches are closed on native closer
threads (``_native.closer_stats``); a reply that cannot be sent as one packet
is answered with code 7 instead of costing the client its connection; and a
client that shuts down its writing side still gets the replies it asked for.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import time

from .. import _native, protocol
from ..broker import Broker, Peer, Reply
from ..errors import Code

log = logging.getLogger(__name__)

# Replies queued for a client that is not reading; past this we stop reading
# its requests until the queue drains.
MAX_QUEUED_REPLIES = 64
# Packets handled per wake-up of one connection, so one busy client cannot
# starve the others ...
MAX_PACKETS_PER_WAKEUP = 32
# ... and loop time spent on them: past this, the rest waits for the next
# wake-up, after every other ready client had its turn.  (32 pipelined
# requests that each took the loop 20 ms once kept another client's status
# waiting half a second.)
WAKEUP_BUDGET = 0.002
# Connections accepted per wake-up of the listener.
MAX_ACCEPTS_PER_WAKEUP = 64
# How long to stop accepting after accept() failed (out of fds, usually).
ACCEPT_BACKOFF = 0.1
# fds held by replies queued for one client: past this, stop reading it, so
# a client that never reads cannot pin the broker's fds.
MAX_QUEUED_FDS = 64


SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"


def listen_backlog() -> int:
    """The system's most pending connections (``net.core.somaxconn``), for ``listen()``.

    1,000 clients connecting at once overflowed a backlog of 128 and were
    refused with EAGAIN; the kernel cuts any larger value to this one, so
    it is the most we can have.
    """
    try:
        with open(SOMAXCONN_PATH) as f:
            return max(128, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return 4096  # the kernel's default since 5.4


def peer_groups(pid: int) -> frozenset[int]:
    """Supplementary groups of a process (for ``allowed_groups``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


class _Client:
    def __init__(self, server: SeqpacketServer, conn: _native.Connection, peer: Peer) -> None:
        self.server = server
        self.conn = conn
        self.peer = peer
        self.fd = conn.fileno()
        self.outbox: collections.deque[Reply] = collections.deque()
        self.reading = False
        self.writing = False
        self.closed = False
        # The client shut down its sending side (or closed): answer what it
        # asked, then close.
        self.eof = False
        self.waiting = False  # a flush is due when the head reply is ready

    def start(self) -> None:
        self._set_reading(True)

    def _set_reading(self, on: bool) -> None:
        if on and not self.reading:
            self.server.loop.add_reader(self.fd, self._readable)
        elif self.reading and not on:
            self.server.loop.remove_reader(self.fd)
        self.reading = on

    def _set_writing(self, on: bool) -> None:
        if on and not self.writing:
            self.server.loop.add_writer(self.fd, self._flush)
        elif self.writing and not on:
            self.server.loop.remove_writer(self.fd)
        self.writing = on

    def _backlogged(self) -> bool:
        return (
            len(self.outbox) >= MAX_QUEUED_REPLIES
            or sum(len(reply.fds) for reply in self.outbox) >= MAX_QUEUED_FDS
        )

    def _readable(self) -> None:
        started = time.monotonic()
        for _ in range(MAX_PACKETS_PER_WAKEUP):
            if self.closed or self.eof or self._backlogged():
                break
            try:
                packet = self.conn.recv()
            except _native.ConnectionClosed as e:
                if e.errno:  # reset: nobody is left to read replies
                    self.close()
                    return
                # EOF: the client may only have shut down its sending side
                # (a request, then shutdown(SHUT_WR)): its replies still go.
                self.eof = True
                break
            except OSError:
                self.close()
                return
            if packet is None:
                break
            data, truncated = packet
            self.outbox.append(self.server.broker.request(self.peer, data, truncated))
            if time.monotonic() - started > WAKEUP_BUDGET:
                break  # the others' turn; the rest is still readable next time
        self._flush()

    def _flush(self) -> None:
        while self.outbox and not self.closed:
            reply = self.outbox[0]
            if reply.ready is not None and not reply.ready.done():
                # Replies leave in order: everything waits for this one.
                if not self.waiting:
                    self.waiting = True
                    reply.ready.add_done_callback(self._ready)
                break
            try:
                self._send(reply)
            except BlockingIOError:
                break
            except (_native.ConnectionClosed, OSError):
                self.close()
                return
            self.outbox.popleft()
            reply.sent()
        if self.closed:
            return
        if self.eof and not self.outbox:
            self.close()
            return
        self._set_writing(bool(self.outbox) and not self.waiting)
        self._set_reading(not self.eof and not self._backlogged())

    def _ready(self, _: object) -> None:
        self.waiting = False
        self._flush()

    def _send(self, reply: Reply) -> None:
        """One reply as one packet; one that cannot be is answered with code 7."""
        data = reply.data
        limit = self.server.broker.max_reply
        if len(data) <= limit:
            try:
                self.conn.send(data, reply.fds)
                return
            except OSError as e:
                if e.errno != errno.EMSGSIZE:
                    raise
                reason = f"the kernel refused it (EMSGSIZE, {len(data)} bytes)"
        else:
            reason = f"{len(data)} bytes, more than the {limit} a packet may carry"
        # Not a dead peer: the client stays connected and keeps what it holds.
        log.warning("%s: reply too large (%s); answering with code 7", self.peer, reason)
        body = protocol.error_body(Code.INTERNAL_ERROR, f"reply too large: {reason}")
        if "id" in reply.body:
            with_id = {**body, "id": reply.body["id"]}
            if len(protocol.encode(with_id)) <= limit:
                body = with_id
        self.conn.send(protocol.encode(body), [])

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._set_reading(False)
        self._set_writing(False)
        for reply in self.outbox:
            reply.sent()
        self.outbox.clear()
        self.conn.close()
        self.server.clients.discard(self)
        self.server.broker.disconnect(self.peer)


class SeqpacketServer:
    """Accepts connections on ``listener`` and feeds them to ``broker``."""

    def __init__(self, broker: Broker, listener: _native.Listener, loop: asyncio.AbstractEventLoop) -> None:
        self.broker = broker
        self.listener = listener
        self.loop = loop
        self.clients: set[_Client] = set()
        self.closed = False
        self.accept_failing = False

    def start(self) -> None:
        self.loop.add_reader(self.listener.fileno(), self._accept)
        log.info("listening on %s (broker pid %d)", self.listener.path, os.getpid())

    def _accept(self) -> None:
        for _ in range(MAX_ACCEPTS_PER_WAKEUP):
            try:
                conn = self.listener.accept()
            except OSError as e:
                # EMFILE and friends: the pending connection stays queued and
                # the socket stays readable, so pause accepting instead of
                # spinning, and keep serving the clients we have.
                level = logging.DEBUG if self.accept_failing else logging.WARNING
                log.log(level, "accept failed: %s; pausing accepts for %g s", e, ACCEPT_BACKOFF)
                self.accept_failing = True
                self.loop.remove_reader(self.listener.fileno())
                self.loop.call_later(ACCEPT_BACKOFF, self._resume_accepting)
                return
            if conn is None:
                return
            if self.accept_failing:
                self.accept_failing = False
                log.info("accepting connections again")
            try:
                peer = self.broker.connect(conn.pid, conn.uid, conn.gid, peer_groups(conn.pid))
            except ConnectionRefusedError as e:
                log.warning("peer %d refused: %s", conn.pid, e)
                conn.close()
                continue
            client = _Client(self, conn, peer)
            self.clients.add(client)
            client.start()

    def _resume_accepting(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.listener.fileno(), self._accept)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.listener.fileno())
        try:
            for client in list(self.clients):
                try:
                    client.close()
                except Exception:  # one client's cleanup must not strand the rest
                    log.exception("%s: cleanup failed", client.peer)
        finally:
            self.listener.close()
