"""The macOS transport: the native XPC Mach-service listener on the asyncio loop.

The listener's blocks run on a private dispatch queue and only queue events
and write a byte to a pipe; this module watches that pipe with
``add_reader`` and drains the events on the loop, so the broker's policy
keeps its one thread and needs no locks (upstream gets the same from its
single dispatch queue).  A peer is one XPC connection; XPC matches each reply
to its request, so replies need no ordering of ours.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
from collections.abc import Callable
from typing import Any, Protocol

from ..broker import Broker, Peer

log = logging.getLogger(__name__)


class XpcEvent(Protocol):
    kind: str
    peer: int
    pid: int
    uid: int
    gid: int
    request: int
    message: dict[str, object]
    invalid: str
    description: str


class XpcListener(Protocol):
    """What this transport needs of ``_native.XpcListener`` (see _native.pyi)."""

    service_name: str

    def fileno(self) -> int: ...
    def drain(self) -> list[Any]: ...
    def reply(self, request: int, message: dict[str, object]) -> bool: ...
    def discard(self, request: int) -> None: ...
    def cancel_peer(self, peer: int) -> None: ...
    def close(self) -> None: ...


def user_groups(uid: int, gid: int) -> frozenset[int]:
    """The groups of the peer's effective user (for ``allowed_groups``).

    XPC gives the euid and egid only; membership comes from the user
    database, as the kernel would compute it at login.
    """
    try:
        return frozenset(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except (KeyError, OSError):
        return frozenset({gid})


class XpcServer:
    """Feeds ``broker`` from an XPC listener.

    ``failed`` is called with a reason if the listener itself reports an
    error: it is unusable then, and the daemon exits non-zero (as upstream).
    """

    def __init__(
        self,
        broker: Broker,
        listener: XpcListener,
        loop: asyncio.AbstractEventLoop,
        failed: Callable[[str], None] | None = None,
    ) -> None:
        self.broker = broker
        self.listener = listener
        self.loop = loop
        self.failed = failed
        self.peers: dict[int, Peer] = {}
        self.closed = False

    def start(self) -> None:
        self.loop.add_reader(self.listener.fileno(), self._drain)
        log.info("listening on XPC service %s (broker pid %d)", self.listener.service_name, os.getpid())

    def _drain(self) -> None:
        for event in self.listener.drain():
            if self.closed:
                return
            handler = getattr(self, f"_on_{event.kind}", None)
            if handler is None:
                log.warning("unknown listener event %r", event.kind)
                continue
            try:
                handler(event)
            except Exception:  # one event must not stop the others
                log.exception("handling %s event of peer %d failed", event.kind, event.pid)

    def _on_peer(self, event: XpcEvent) -> None:
        try:
            peer = self.broker.connect(event.pid, event.uid, event.gid, user_groups(event.uid, event.gid))
        except Exception as e:
            # Refused (too many connections) or a bug: either way a peer we
            # do not track is cancelled, never left waiting for replies.
            if isinstance(e, ConnectionRefusedError):
                log.warning("peer %d refused: %s", event.pid, e)
            else:
                log.exception("peer %d: accepting failed", event.pid)
            self.listener.cancel_peer(event.peer)
            return
        self.peers[event.peer] = peer

    def _on_request(self, event: XpcEvent) -> None:
        peer = self.peers.get(event.peer)
        if peer is None:
            # A cancelled peer's message in flight: answer it anyway, so no
            # client blocks in send_message_with_reply_sync.
            self.listener.reply(event.request, {"error": 7, "message": "connection refused"})
            return
        if event.invalid:
            reply = self.broker.refuse(peer, event.invalid)
        else:
            reply = self.broker.request_message(peer, event.message)
        try:
            delivered = self.listener.reply(event.request, reply.body)
        except ValueError as e:  # a body XPC cannot carry: a bug of ours
            log.error("%s: reply cannot be sent over XPC: %s", peer, e)
            delivered = self.listener.reply(event.request, {"error": 7, "message": f"internal error: {e}"})
        if not delivered:
            # Upstream acquires even without reply context; so do we, and
            # the reference goes with the connection as always.
            log.debug("%s: reply not delivered (no reply context, or peer gone)", peer)

    def _on_gone(self, event: XpcEvent) -> None:
        peer = self.peers.pop(event.peer, None)
        if peer is not None:
            self.broker.disconnect(peer)

    def _on_error(self, event: XpcEvent) -> None:
        if event.peer == 0:
            log.error("XPC listener failed: %s", event.description)
            if self.failed is not None:
                self.failed(event.description)
            return
        peer = self.peers.get(event.peer)
        log.warning("%s: XPC error: %s", peer or f"peer {event.pid}", event.description)

    def _on_terminating(self, event: XpcEvent) -> None:
        log.info("XPC: termination imminent (%s)", event.description)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.listener.fileno())
        try:
            for peer in list(self.peers.values()):
                try:
                    self.broker.disconnect(peer)
                except Exception:  # one peer's cleanup must not strand the rest
                    log.exception("%s: cleanup failed", peer)
            self.peers.clear()
        finally:
            self.listener.close()
