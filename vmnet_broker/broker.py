"""The broker's policy: who holds which network, and when networks live and die.

All of it runs on one asyncio loop, like upstream's single dispatch queue, so
the registry needs no locks: a request is handled to completion before the
next one starts, and replies leave in request order.  The transport
(``server.py``) reaches this module through three hooks: ``connect``,
``request`` and ``disconnect``.  The registry is private; only those hooks,
``status`` and ``shutdown`` are public.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from . import protocol
from ._version import __version__
from .backends.base import Backend, CreateError, InterfaceHandle, NetworkHandle
from .config import NetworkConfig
from .errors import Code
from .protocol import Acquire, Attach, Detach, ProtocolError, Release, Request, Status

log = logging.getLogger(__name__)

# Upstream's MAX_PEER_NETWORKS: distinct networks one connection may hold.
MAX_PEER_NETWORKS = 8
# Ours: interfaces one connection may own, so a runaway client cannot fill
# the host with TAP devices.  Far above what one launcher's VMs need.
MAX_PEER_INTERFACES = 64
# Connections one non-root user may have open: each costs the broker fds.
MAX_CONNECTIONS_PER_USER = 256
DEFAULT_IDLE_TIMEOUT = 120.0


@dataclass(eq=False)
class Peer:
    """One client connection and everything it holds."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    networks: set[str] = field(default_factory=set)
    interfaces: dict[str, InterfaceHandle] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"peer {self.pid}"


@dataclass(eq=False)
class _Network:
    handle: NetworkHandle
    peers: set[Peer] = field(default_factory=set)
    interfaces: dict[str, tuple[Peer, InterfaceHandle]] = field(default_factory=dict)
    idle_timer: asyncio.TimerHandle | None = None
    idle_deadline: float | None = None  # loop.time() when it will be removed

    @property
    def name(self) -> str:
        return self.handle.config.name


@dataclass
class Reply:
    """What the transport sends back: a dictionary of plain values, maybe with fds.

    Each transport encodes ``body`` its own way (JSON on Linux, an XPC reply
    dictionary on macOS, where ``network`` is the opaque serialization).  The
    fds are the reply's own duplicates, taken when the request was handled: a
    pipelined ``detach`` or ``release`` that runs before this reply leaves
    cannot take them away.
    """

    body: dict[str, Any]
    fds: list[int] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        """``body`` as one JSON packet (the seqpacket transport)."""
        return protocol.encode(self.body)

    def sent(self) -> None:
        """The packet left (or never will): close the reply's fds."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def _dup_all(fds: list[int]) -> list[int]:
    """Duplicates of ``fds``, all or none (EMFILE half-way closes the rest)."""
    dups: list[int] = []
    try:
        for fd in fds:
            dups.append(os.dup(fd))
    except OSError:
        for fd in dups:
            os.close(fd)
        raise
    return dups


class _Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Broker:
    def __init__(
        self,
        backend: Backend,
        configs: dict[str, NetworkConfig],
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._backend = backend
        self._configs = configs
        self._idle_timeout = idle_timeout
        self._loop = loop or asyncio.get_running_loop()
        self._networks: dict[str, _Network] = {}
        self._peers: set[Peer] = set()
        self._started = time.monotonic()
        # Told the number of connections after each connect and disconnect
        # (the daemon's exit-when-idle timer and launchd transactions).
        self.connections_changed: Callable[[int], None] | None = None

    # -- transport hooks ----------------------------------------------------------

    def connect(self, pid: int, uid: int, gid: int, groups: frozenset[int] = frozenset()) -> Peer:
        """A new connection; ``ConnectionRefusedError`` if its user has too many."""
        if uid != 0 and sum(1 for p in self._peers if p.uid == uid) >= MAX_CONNECTIONS_PER_USER:
            raise ConnectionRefusedError(f"uid {uid} already has {MAX_CONNECTIONS_PER_USER} connections")
        peer = Peer(pid, uid, gid, groups | {gid})
        self._peers.add(peer)
        log.info("%s connected (uid %d, gid %d)", peer, uid, gid)
        self._connections_changed()
        return peer

    def request(self, peer: Peer, data: bytes, truncated: bool = False) -> Reply:
        """Handle one JSON packet; never raises for anything the client sent."""
        try:
            req = protocol.parse_request(data, truncated)
        except ProtocolError as e:
            log.warning("%s: invalid request: %s", peer, e.message)
            return Reply(e.body())
        return self._handle(peer, req)

    def request_message(self, peer: Peer, message: object) -> Reply:
        """Handle one request already decoded to plain values (an XPC dictionary)."""
        try:
            req = protocol.parse_message(message)
        except ProtocolError as e:
            log.warning("%s: invalid request: %s", peer, e.message)
            return Reply(e.body())
        return self._handle(peer, req)

    def _handle(self, peer: Peer, req: Request) -> Reply:
        try:
            return self._dispatch(peer, req)
        except _Refused as e:
            log.warning("%s: %s", peer, e.message)
            return Reply(protocol.error_body(e.code, e.message, req.id, req.has_id))
        except Exception as e:  # a bug or an unexpected OS error: keep serving
            log.exception("%s: internal error", peer)
            message = f"internal error: {e}"
            return Reply(protocol.error_body(Code.INTERNAL_ERROR, message, req.id, req.has_id))

    def disconnect(self, peer: Peer) -> None:
        if peer not in self._peers:
            return
        self._peers.discard(peer)
        # All its interfaces in one batch first: that is what takes time.
        self._destroy_interfaces(peer, list(peer.interfaces))
        held = sorted(peer.networks)
        for name in held:
            try:
                self._release(peer, name)
            except Exception:  # the other networks must still be released
                log.exception("%s: releasing network %r failed", peer, name)
        log.info("%s disconnected, released %d network(s)", peer, len(held))
        self._connections_changed()

    def _connections_changed(self) -> None:
        if self.connections_changed is not None:
            self.connections_changed(len(self._peers))

    def networks_held(self) -> bool:
        """Whether any connection holds a network (macOS ignores SIGTERM then)."""
        return any(peer.networks for peer in self._peers)

    def shutdown(self) -> None:
        """Remove every network and interface; collect errors, raise the first."""
        errors: list[BaseException] = []
        for peer in list(self._peers):
            try:
                self.disconnect(peer)
            except Exception as e:
                errors.append(e)
        for net in list(self._networks.values()):
            try:
                self._remove(net)
            except Exception as e:
                errors.append(e)
        try:
            self._backend.close()
        except Exception as e:
            errors.append(e)
        if errors:
            raise errors[0]

    # -- requests -----------------------------------------------------------------

    def _dispatch(self, peer: Peer, req: Request) -> Reply:
        cmd = req.command
        if isinstance(cmd, Acquire):
            net = self._acquire(peer, cmd.network_name)
            value = net.handle.reply_value()
            body = {"network": value}
            if not isinstance(value, dict):
                # macOS: the serialization is opaque; say beside it what it
                # is (upstream's clients read only "network" and "error").
                body["network_info"] = net.handle.info()
            return Reply(protocol.reply_body(body, req))
        if isinstance(cmd, Attach):
            iface, fds = self._attach(peer, cmd)
            return Reply(protocol.reply_body({"interface": iface.info()}, req), fds)
        if isinstance(cmd, Detach):
            self._detach(peer, cmd.interface)
            return Reply(protocol.reply_body({}, req))
        if isinstance(cmd, Release):
            if cmd.network_name not in peer.networks:
                raise _Refused(Code.NOT_FOUND, f"this connection does not hold {cmd.network_name!r}")
            self._release(peer, cmd.network_name)
            return Reply(protocol.reply_body({}, req))
        if isinstance(cmd, Status):
            return Reply(protocol.reply_body({"status": self.status()}, req))
        raise AssertionError(f"unhandled command {cmd!r}")

    def _acquire(self, peer: Peer, name: str) -> _Network:
        # Upstream's order: the limit is checked before the name is looked up.
        if name in peer.networks:
            return self._networks[name]
        if len(peer.networks) >= MAX_PEER_NETWORKS:
            raise _Refused(Code.INTERNAL_ERROR, f"a connection may hold at most {MAX_PEER_NETWORKS} networks")
        config = self._configs.get(name)
        if config is None:
            raise _Refused(Code.NOT_FOUND, f"no network named {name!r}")
        if not config.allows(peer.uid, set(peer.groups)):
            raise _Refused(Code.NOT_ALLOWED, f"uid {peer.uid} may not use network {name!r}")

        net = self._networks.get(name)
        if net is None:
            net = self._create(config)
        elif net.idle_timer is not None:
            net.idle_timer.cancel()
            net.idle_timer = net.idle_deadline = None
            log.info("network %r is in use again, removal cancelled", name)
        net.peers.add(peer)
        peer.networks.add(name)
        log.info("%s acquired network %r (%d peer(s))", peer, name, len(net.peers))
        return net

    def _create(self, config: NetworkConfig) -> _Network:
        started = time.monotonic()
        try:
            handle = self._backend.create_network(config)
        except CreateError as e:
            raise _Refused(Code.CREATE_FAILURE, str(e)) from e
        except OSError as e:
            raise _Refused(Code.CREATE_FAILURE, f"cannot create network {config.name!r}: {e}") from e
        net = _Network(handle)
        self._networks[config.name] = net
        info = handle.info()
        log.info(
            "created network %r: %s/%s on %s in %.0f ms",
            config.name, info.get("subnet"), info.get("mask"), info.get("bridge") or "vmnet",
            (time.monotonic() - started) * 1000,
        )  # fmt: skip
        return net

    def _attach(self, peer: Peer, cmd: Attach) -> tuple[InterfaceHandle, list[int]]:
        if cmd.kind not in self._backend.attach_kinds:
            raise _Refused(Code.INVALID_REQUEST, self._no_attach(cmd.kind))
        if len(peer.interfaces) >= MAX_PEER_INTERFACES:
            raise _Refused(Code.INTERNAL_ERROR, f"a connection may own at most {MAX_PEER_INTERFACES} interfaces")
        held = cmd.network_name in peer.networks
        net = self._acquire(peer, cmd.network_name)
        iface: InterfaceHandle | None = None
        fds: list[int] = []
        try:
            iface = self._backend.create_interface(net.handle, cmd)
            fds = _dup_all(iface.fds())
            iface.handed_over()
        except BaseException as e:
            # A failed attach leaves nothing behind, and the peer holding
            # what it held before.
            for fd in fds:
                os.close(fd)
            if iface is not None:
                try:
                    self._backend.destroy_interfaces([iface])
                except Exception:
                    log.exception("%s: removing the half-made interface %s failed", peer, iface.name)
            if not held:
                self._release(peer, cmd.network_name)
            if isinstance(e, (CreateError, OSError)):
                detail = str(e) if isinstance(e, CreateError) else f"cannot create interface: {e}"
                raise _Refused(Code.CREATE_FAILURE, detail) from e
            raise
        peer.interfaces[iface.name] = iface
        net.interfaces[iface.name] = (peer, iface)
        log.info("%s attached %s %s to network %r", peer, cmd.kind, iface.name, net.name)
        return iface, fds

    def _no_attach(self, kind: str) -> str:
        if not self._backend.attach_kinds:
            # macOS: clients start vmnet interfaces themselves from the network.
            return "this broker hands out networks, not interfaces: 'attach' and 'detach' are not available"
        return f"'kind' {kind!r} is not available here (only {', '.join(self._backend.attach_kinds)})"

    def _detach(self, peer: Peer, name: str) -> None:
        if not self._backend.attach_kinds:
            raise _Refused(Code.INVALID_REQUEST, self._no_attach(""))
        if name not in peer.interfaces:
            raise _Refused(Code.NOT_FOUND, f"this connection has no interface {name!r}")
        self._destroy_interfaces(peer, [name])

    def _destroy_interfaces(self, peer: Peer, names: list[str]) -> None:
        if not names:
            return
        # Forget them first: even if the backend fails, they are no longer ours.
        ifaces = [peer.interfaces.pop(name) for name in names]
        for net in self._networks.values():
            for name in names:
                net.interfaces.pop(name, None)
        try:
            self._backend.destroy_interfaces(ifaces)
        except Exception:  # keep going: a stuck interface must not pin a network
            log.exception("%s: removing interface(s) %s failed", peer, ", ".join(names))
        log.info("%s: removed interface(s) %s", peer, ", ".join(names))

    def _release(self, peer: Peer, name: str) -> None:
        net = self._networks[name]
        self._destroy_interfaces(peer, [n for n, (owner, _) in net.interfaces.items() if owner is peer])
        peer.networks.discard(name)
        net.peers.discard(peer)
        log.info("%s released network %r (%d peer(s) left)", peer, name, len(net.peers))
        if not net.peers:
            self._schedule_removal(net)

    # -- idle removal -------------------------------------------------------------

    def _schedule_removal(self, net: _Network) -> None:
        net.idle_deadline = self._loop.time() + self._idle_timeout
        net.idle_timer = self._loop.call_later(self._idle_timeout, self._remove_idle, net)
        log.info("network %r is idle, removing in %g s", net.name, self._idle_timeout)

    def _remove_idle(self, net: _Network) -> None:
        if self._networks.get(net.name) is net and not net.peers:
            self._remove(net)

    def _remove(self, net: _Network) -> None:
        if net.idle_timer is not None:
            net.idle_timer.cancel()
        self._networks.pop(net.name, None)
        self._backend.destroy_network(net.handle)
        log.info("removed network %r", net.name)

    # -- status -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self._loop.time()
        networks = []
        for net in self._networks.values():
            info = net.handle.info()
            expires = None if net.idle_deadline is None else max(0.0, round(net.idle_deadline - now, 3))
            info.update(
                peers=len(net.peers),
                interfaces=len(net.interfaces),
                attachments=[
                    {**iface.info(), "peer": owner.pid} for owner, iface in net.interfaces.values()
                ],
                idle_expires_in=expires,
            )
            networks.append(info)
        return {
            "version": __version__,
            # Connections holding at least one network; "connections" counts all.
            "peers": sum(1 for peer in self._peers if peer.networks),
            "connections": len(self._peers),
            "uptime": round(time.monotonic() - self._started, 3),
            "networks": networks,
            "available": sorted(self._configs),
        }
