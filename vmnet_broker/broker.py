"""The broker's policy: who holds which network, and when networks live and die.

All of it runs on one asyncio loop, like upstream's single dispatch queue, so
the registry needs no locks: a request is handled to completion before the
next one starts, and replies leave in request order.  The transport
(``transports/``) reaches this module through three hooks: ``connect``,
``request`` and ``disconnect``.  The registry is private; only those hooks,
``status`` and ``shutdown`` are public.

Nothing here waits for the kernel to unregister a link (~20 ms a TAP): an
interface leaves the registry at once, and a worker thread deletes it
(``_Reaper``), batched with whatever else is waiting.  The worker touches
only interfaces the registry has already forgotten, so the registry still
has one thread.  A ``detach`` or ``release`` reply is held back until its
links are gone, so a client that sees the reply sees them gone too.

Nor does anything here wait for an external program.  Creating a network on
Linux runs ``nft`` and starts a dnsmasq, which once took the loop for up to
their timeouts (29 s with a hanging ``nft``) while every client waited.  A
backend may now return an awaitable from ``create_network``,
``destroy_network`` or an interface's ``ready``; the broker then goes on
serving, and the request that waits is finished by a task on the same loop:

- A request that must wait (an ``acquire`` or ``attach`` of a network being
  created) gets a ``Reply`` at once whose ``ready`` future is set when its
  body is final.  The transport already sends replies in request order and
  holds back any that is not ready, so the order per connection holds.
- A connection is served one request at a time: what it sends after a
  request that waits is queued on its ``Peer`` and handled when that request
  is done, exactly as if the connection had waited.  Other connections are
  served meanwhile.
- One network is created once: a second ``acquire`` of a network being
  created waits for the same creation (``_creating``), and a network being
  removed is created again only after its removal (``_removing``).
- An attach reply leaves once the backend says the interface may be used
  (Linux: the bridge filter guards its port); if it cannot be, the
  interface goes and the reply says why.
- The registry is still only touched by code on the loop, between awaits:
  after each await a task looks again at what it needs (is the client still
  connected, is the network still there, does the attach still fit the
  limits) before it changes anything.

A sync backend (the macOS one, the tests' fakes) takes none of these paths:
its replies are final when ``request`` returns.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import inspect
import logging
import os
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable, Coroutine
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
# Interfaces all connections of one non-root user may own together, so one
# user cannot take every port of a bridge (the kernel's limit is 1,023) or
# fill the host with TAPs from many connections.  Configurable (serve
# --max-interfaces-per-user).
DEFAULT_MAX_INTERFACES_PER_USER = 256
# Interfaces on one network, from everyone (root too): below the kernel's
# 1,023 bridge ports, so the limit is ours, with a clear message.
# Configurable (serve --max-interfaces-per-network), at most BRIDGE_PORTS.
DEFAULT_MAX_INTERFACES_PER_NETWORK = 1000
BRIDGE_PORTS = 1023
DEFAULT_IDLE_TIMEOUT = 120.0
# Room kept in every reply for the request's echoed "id" and the body;
# a request whose "id" alone leaves less is refused before it does anything.
REPLY_RESERVE = 4096


@dataclass(eq=False)
class Peer:
    """One client connection and everything it holds."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    networks: set[str] = field(default_factory=set)
    interfaces: dict[str, InterfaceHandle] = field(default_factory=dict)
    # A request of this connection is still being handled (it waits for a
    # network being created): the ones it sends meanwhile wait here, in order.
    busy: bool = False
    waiting: collections.deque[tuple[Request, Reply]] = field(default_factory=collections.deque)

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
    # Not to be sent before this is done (a detach waits for its links to
    # be gone; a request that waits for a network being created has its body
    # and fds filled in first).
    ready: asyncio.Future[None] | None = None
    # sent() was called: fds that arrive later are closed at once.
    finished: bool = False

    @property
    def data(self) -> bytes:
        """``body`` as one JSON packet (the seqpacket transport)."""
        return protocol.encode(self.body)

    def sent(self) -> None:
        """The packet left (or never will): close the reply's fds."""
        self.finished = True
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def take(self, other: Reply) -> None:
        """Say what ``other`` says (body and fds), now that it is final."""
        self.body, self.fds, other.fds = other.body, other.fds, []
        if self.finished:  # its connection closed while it waited
            self.sent()


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


_Batch = list[tuple[list[InterfaceHandle], "asyncio.Future[None]"]]


class _Reaper:
    """Destroys interfaces on one worker thread, in batches, off the loop.

    Unregistering a link waits for RCU grace periods (~20 ms a TAP); one
    client detaching in a loop held every other client up that long per
    request while the loop waited.  Now the loop hands the interfaces over
    and goes on; what piles up while the worker is busy goes in its next
    batch (one kernel batch deletes many TAPs in about the time of one).
    Each ``destroy`` gives a future done when its interfaces are gone.
    """

    def __init__(self, backend: Backend, loop: asyncio.AbstractEventLoop) -> None:
        self._backend = backend
        self._loop = loop
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._waiting: _Batch = []
        self._busy = False

    def destroy(self, ifaces: list[InterfaceHandle]) -> asyncio.Future[None]:
        done = self._loop.create_future()
        self._waiting.append((ifaces, done))
        if not self._busy:
            self._start()
        return done

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vmnet-broker-reaper")
        self._busy = True
        ifaces = [iface for group, _ in batch for iface in group]
        work = self._loop.run_in_executor(self._executor, self._backend.destroy_interfaces, ifaces)
        work.add_done_callback(lambda work: self._finished(work, batch))

    def _finished(self, work: asyncio.Future[None], batch: _Batch) -> None:
        self._busy = False
        error = "cancelled" if work.cancelled() else work.exception()
        if error is not None:
            names = ", ".join(iface.name for group, _ in batch for iface in group)
            log.error("removing interface(s) %s failed: %s", names, error)
        for _, done in batch:
            if not done.done():
                done.set_result(None)
        if self._waiting:
            self._start()

    @property
    def idle(self) -> bool:
        return not self._busy and not self._waiting

    def close(self) -> None:
        """Wait for the batch under way, then destroy the rest here (shutdown)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        batch, self._waiting = self._waiting, []
        ifaces = [iface for group, _ in batch for iface in group]
        try:
            if ifaces:
                self._backend.destroy_interfaces(ifaces)
        finally:
            for _, done in batch:
                if not done.done():
                    done.set_result(None)


def _attachment_status(owner: Peer, iface: InterfaceHandle) -> dict[str, Any]:
    status = {**iface.info(), "peer": owner.pid}
    # A backend's interfaces may report the memory they hold (Linux: a dgram
    # attachment's pump buffers); the InterfaceHandle protocol does not ask it.
    buffers = getattr(iface, "buffers", None)
    if callable(buffers) and (value := buffers()) is not None:
        status["buffers"] = value
    # ... and frames dropped for a forged source (Linux: the bridge filter's counter).
    forged = getattr(iface, "forged", None)
    if callable(forged) and (value := forged()) is not None:
        status["forged"] = value
    return status


class _Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _create_refused(config: NetworkConfig, error: CreateError | OSError) -> _Refused:
    """Code 6 for a network the backend could not create, saying why."""
    if isinstance(error, CreateError):
        return _Refused(Code.CREATE_FAILURE, str(error))
    return _Refused(Code.CREATE_FAILURE, f"cannot create network {config.name!r}: {error}")


class Broker:
    def __init__(
        self,
        backend: Backend,
        configs: dict[str, NetworkConfig],
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        max_interfaces_per_user: int = DEFAULT_MAX_INTERFACES_PER_USER,
        max_interfaces_per_network: int = DEFAULT_MAX_INTERFACES_PER_NETWORK,
        max_reply: int = protocol.MAX_MESSAGE,
    ) -> None:
        if not 1 <= max_interfaces_per_network <= BRIDGE_PORTS:
            raise ValueError(f"max_interfaces_per_network must be between 1 and {BRIDGE_PORTS} (a bridge's ports)")
        if max_interfaces_per_user < 1:
            raise ValueError("max_interfaces_per_user must be at least 1")
        self._backend = backend
        self._configs = configs
        self._idle_timeout = idle_timeout
        self._loop = loop or asyncio.get_running_loop()
        self._networks: dict[str, _Network] = {}
        self._peers: set[Peer] = set()
        self._started = time.monotonic()
        self._max_user_interfaces = max_interfaces_per_user
        self._max_network_interfaces = max_interfaces_per_network
        # Largest reply a client is sent (the seqpacket packet limit).
        self.max_reply = max_reply
        self._user_interfaces: collections.Counter[int] = collections.Counter()
        self._reaper = _Reaper(backend, self._loop)
        # Networks a backend is creating or removing asynchronously, and the
        # tasks finishing requests that wait (see the module's docstring).
        self._creating: dict[str, asyncio.Task[_Network]] = {}
        self._removing: dict[str, asyncio.Task[None]] = {}
        self._leaving: dict[str, _Network] = {}  # being removed: status shows them until they are gone
        self._tasks: set[asyncio.Task[Reply]] = set()
        # Changes whenever a network or an interface comes or goes: a client
        # paging through status restarts if it changed under it.
        self._generation = 0
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

    def refuse(self, peer: Peer, reason: str) -> Reply:
        """A request the transport could not even decode (an XPC dictionary
        beyond the conversion limits): malformed, like any other bad shape."""
        log.warning("%s: invalid request: %s", peer, reason)
        return Reply(protocol.error_body(Code.INVALID_REQUEST, f"request not understood: {reason}"))

    def _handle(self, peer: Peer, req: Request) -> Reply:
        if peer.busy:
            # An earlier request of this connection still waits: this one is
            # handled after it, and its reply leaves after that one's.
            reply = Reply({}, ready=self._loop.create_future())
            peer.waiting.append((req, reply))
            return reply
        return self._handle_now(peer, req)

    def _handle_now(self, peer: Peer, req: Request) -> Reply:
        if req.has_id and len(protocol.encode({"id": req.id})) > self.max_reply - REPLY_RESERVE:
            # Its echo alone would not leave room for the reply: refused
            # before it changes anything (the "id" cannot be echoed).
            message = f"reply too large: the request's 'id' leaves no room for it (limit {self.max_reply} bytes)"
            log.warning("%s: %s", peer, message)
            return Reply(protocol.error_body(Code.INTERNAL_ERROR, message))
        try:
            return self._dispatch(peer, req)
        except Exception as e:
            return self._error_reply(peer, req, e)

    def _error_reply(self, peer: Peer, req: Request, e: BaseException) -> Reply:
        if isinstance(e, _Refused):
            log.warning("%s: %s", peer, e.message)
            return Reply(protocol.error_body(e.code, e.message, req.id, req.has_id))
        # A bug or an unexpected OS error: keep serving.
        log.error("%s: internal error", peer, exc_info=e)
        return Reply(protocol.error_body(Code.INTERNAL_ERROR, f"internal error: {e}", req.id, req.has_id))

    def _later(self, peer: Peer, req: Request, work: Coroutine[Any, Any, Reply]) -> Reply:
        """The reply to a request that must wait: ``work`` finishes it on a task.

        Until then this connection's next requests wait (``_handle``); the
        other connections are served.
        """
        reply = Reply({}, ready=self._loop.create_future())
        peer.busy = True
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(lambda task: self._finished(peer, req, reply, task))
        return reply

    def _finished(self, peer: Peer, req: Request, reply: Reply, task: asyncio.Task[Reply]) -> None:
        self._tasks.discard(task)
        peer.busy = False
        if task.cancelled():  # shutdown: nobody will read it
            result = Reply(protocol.error_body(Code.INTERNAL_ERROR, "the broker is stopping", req.id, req.has_id))
        elif (error := task.exception()) is not None:
            result = self._error_reply(peer, req, error)
        else:
            result = task.result()
        self._release_when_ready(reply, result)
        # Then what the connection sent meanwhile, in order, until one waits again.
        while peer.waiting and not peer.busy:
            req, reply = peer.waiting.popleft()
            self._release_when_ready(reply, self._handle_now(peer, req))

    def _release_when_ready(self, reply: Reply, result: Reply) -> None:
        """Let ``reply`` (queued in the transport already) go as ``result``, once that is final."""
        assert reply.ready is not None

        def release(_: object = None) -> None:
            reply.take(result)
            if not reply.ready.done():
                reply.ready.set_result(None)

        if result.ready is None or result.ready.done():
            release()
        else:
            result.ready.add_done_callback(release)

    def disconnect(self, peer: Peer) -> None:
        if peer not in self._peers:
            return
        self._peers.discard(peer)
        peer.waiting.clear()  # their replies will never be read
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

    async def shutdown(self) -> None:
        """Remove every network and interface; collect errors, raise the first.

        Requests still waiting are cancelled first (their clients are gone
        with the transport), and so are creations under way: the backend
        unwinds what each had made.  Removals under way are waited for.
        """
        errors: list[BaseException] = []
        pending = [*self._tasks, *self._creating.values()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for peer in list(self._peers):
            try:
                self.disconnect(peer)
            except Exception as e:
                errors.append(e)
        try:
            self._reaper.close()  # every TAP gone before its bridge
        except Exception as e:
            errors.append(e)
        for net in list(self._networks.values()):
            try:
                self._remove(net)
            except Exception as e:
                errors.append(e)
        for result in await asyncio.gather(*self._removing.values(), return_exceptions=True):
            if isinstance(result, BaseException):
                errors.append(result)
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
            if net is None:  # being created
                return self._later(peer, req, self._acquire_later(peer, req, cmd.network_name))
            return self._acquire_reply(net, req)
        if isinstance(cmd, Attach):
            self._check_attach(peer, cmd)
            held = cmd.network_name in peer.networks
            net = self._acquire(peer, cmd.network_name)
            if net is None:  # being created
                return self._later(peer, req, self._attach_later(peer, req, cmd, held))
            return self._attach_reply(peer, req, cmd, net, held)
        if isinstance(cmd, Detach):
            gone = self._detach(peer, cmd.interface)
            return Reply(protocol.reply_body({}, req), ready=gone)
        if isinstance(cmd, Release):
            if cmd.network_name not in peer.networks:
                raise _Refused(Code.NOT_FOUND, f"this connection does not hold {cmd.network_name!r}")
            gone = self._release(peer, cmd.network_name)
            return Reply(protocol.reply_body({}, req), ready=gone)
        if isinstance(cmd, Status):
            return Reply(self._status_reply(cmd, req))
        raise AssertionError(f"unhandled command {cmd!r}")

    def _acquire_reply(self, net: _Network, req: Request) -> Reply:
        value = net.handle.reply_value()
        body = {"network": value}
        if not isinstance(value, dict):
            # macOS: the serialization is opaque; say beside it what it
            # is (upstream's clients read only "network" and "error").
            body["network_info"] = net.handle.info()
        return Reply(protocol.reply_body(body, req))

    async def _acquire_later(self, peer: Peer, req: Request, name: str) -> Reply:
        return self._acquire_reply(await self._wait_and_join(peer, name), req)

    def _acquire(self, peer: Peer, name: str) -> _Network | None:
        """Take ``peer``'s reference to the network, creating it if need be.

        None if the network is being created (by this request or another, or
        is still being removed): then ``_wait_and_join`` takes the reference.
        """
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
            if name in self._creating or name in self._removing:
                return None
            net = self._create(config)
            if net is None:
                return None
        self._join(peer, net)
        return net

    def _join(self, peer: Peer, net: _Network) -> None:
        if net.idle_timer is not None:
            net.idle_timer.cancel()
            net.idle_timer = net.idle_deadline = None
            log.info("network %r is in use again, removal cancelled", net.name)
        net.peers.add(peer)
        peer.networks.add(net.name)
        log.info("%s acquired network %r (%d peer(s))", peer, net.name, len(net.peers))

    async def _wait_and_join(self, peer: Peer, name: str) -> _Network:
        """Wait for the network to be there, then take ``peer``'s reference (``_acquire``'s slow path)."""
        for _ in range(3):  # again if it was removed before this task ran (idle timeout 0)
            removing = self._removing.get(name)
            if removing is not None:
                await asyncio.wait([removing])  # its failure is logged there
            creating = self._creating.get(name)
            net = self._networks.get(name)
            if net is None and creating is None:
                net = self._create(self._configs[name])
                creating = self._creating.get(name)
            if net is None and creating is not None:
                # Shielded: this request may be cancelled, the creation is everyone's.
                net = await asyncio.shield(creating)
            if net is None or self._networks.get(name) is not net:
                continue  # removed before this task ran
            if peer not in self._peers:
                # Gone while it waited.  A network nobody took is idle.
                if not net.peers and net.idle_timer is None:
                    self._schedule_removal(net)
                raise _Refused(Code.INTERNAL_ERROR, "the connection closed")  # nobody reads it
            self._join(peer, net)
            return net
        raise _Refused(Code.CREATE_FAILURE, f"network {name!r} was removed while it was being acquired")

    def _create(self, config: NetworkConfig) -> _Network | None:
        """The new network; None if the backend creates it asynchronously (``_creating``)."""
        started = time.monotonic()
        try:
            made = self._backend.create_network(config)
        except (CreateError, OSError) as e:
            raise _create_refused(config, e) from e
        if inspect.isawaitable(made):
            task = self._loop.create_task(self._create_later(config, made, started))
            task.add_done_callback(lambda task: task.cancelled() or task.exception())  # each waiter reports it
            self._creating[config.name] = task
            return None
        return self._created(config, made, started)

    async def _create_later(self, config: NetworkConfig, made: Awaitable[NetworkHandle], started: float) -> _Network:
        try:
            handle = await made
        except (CreateError, OSError) as e:
            raise _create_refused(config, e) from e
        finally:
            del self._creating[config.name]
        # Its waiters take their references next (or, if their clients left,
        # make it idle: _wait_and_join).
        return self._created(config, handle, started)

    def _created(self, config: NetworkConfig, handle: NetworkHandle, started: float) -> _Network:
        net = _Network(handle)
        self._networks[config.name] = net
        self._generation += 1
        info = handle.info()
        log.info(
            "created network %r: %s/%s on %s in %.0f ms",
            config.name, info.get("subnet"), info.get("mask"), info.get("bridge") or "vmnet",
            (time.monotonic() - started) * 1000,
        )  # fmt: skip
        return net

    def _check_attach(self, peer: Peer, cmd: Attach) -> None:
        """Refuse an attach the limits do not allow, before anything is made."""
        if cmd.kind not in self._backend.attach_kinds:
            raise _Refused(Code.INVALID_REQUEST, self._no_attach(cmd.kind))
        if len(peer.interfaces) >= MAX_PEER_INTERFACES:
            raise _Refused(Code.INTERNAL_ERROR, f"a connection may own at most {MAX_PEER_INTERFACES} interfaces")
        if peer.uid != 0 and self._user_interfaces[peer.uid] >= self._max_user_interfaces:
            raise _Refused(
                Code.INTERNAL_ERROR,
                f"uid {peer.uid} owns {self._user_interfaces[peer.uid]} interfaces on all its connections, "
                f"the most one user may (max_interfaces_per_user {self._max_user_interfaces})",
            )
        existing = self._networks.get(cmd.network_name)
        if existing is not None and len(existing.interfaces) >= self._max_network_interfaces:
            raise _Refused(
                Code.INTERNAL_ERROR,
                f"network {cmd.network_name!r} has {len(existing.interfaces)} interfaces, the most it may "
                f"(max_interfaces_per_network {self._max_network_interfaces})",
            )

    async def _attach_later(self, peer: Peer, req: Request, cmd: Attach, held: bool) -> Reply:
        net = await self._wait_and_join(peer, cmd.network_name)
        try:
            self._check_attach(peer, cmd)  # again: others attached while it waited
        except _Refused:
            if not held:
                self._release(peer, cmd.network_name)
            raise
        return self._attach_reply(peer, req, cmd, net, held)

    def _attach_reply(self, peer: Peer, req: Request, cmd: Attach, net: _Network, held: bool) -> Reply:
        iface, fds = self._attach(peer, cmd, net, held)
        reply = Reply(protocol.reply_body({"interface": iface.info()}, req), fds)
        ready = getattr(iface, "ready", None)
        if ready is not None:
            self._hold_until_ready(peer, req, iface, reply, ready)
        return reply

    def _hold_until_ready(
        self, peer: Peer, req: Request, iface: InterfaceHandle, reply: Reply, ready: asyncio.Future[None]
    ) -> None:
        """The reply leaves once the interface may be used (Linux: once the
        bridge filter guards its port, so no frame of the guest gets past
        it); if it cannot be, the interface goes and the reply says why."""
        released: asyncio.Future[None] = self._loop.create_future()
        reply.ready = released

        def done(ready: asyncio.Future[None]) -> None:
            error = "cancelled" if ready.cancelled() else ready.exception()
            if error is not None:
                log.error("%s: interface %s cannot be used: %s", peer, iface.name, error)
                reply.sent()  # the client gets no fds
                message = f"cannot create interface {iface.name}: {error}"
                reply.body = protocol.error_body(Code.CREATE_FAILURE, message, req.id, req.has_id)
                if peer.interfaces.get(iface.name) is iface:
                    self._destroy_interfaces(peer, [iface.name])
            released.set_result(None)

        ready.add_done_callback(done)

    def _attach(self, peer: Peer, cmd: Attach, net: _Network, held: bool) -> tuple[InterfaceHandle, list[int]]:
        iface: InterfaceHandle | None = None
        fds: list[int] = []
        try:
            self._check_mac_free(net, cmd.mac)
            if cmd.persist:  # its owner: who asked, as the kernel vouches (SO_PEERCRED)
                cmd = dataclasses.replace(cmd, owner_uid=peer.uid)
            iface = self._backend.create_interface(net.handle, cmd)
            fds = _dup_all(iface.fds())
            iface.handed_over()
        except BaseException as e:
            # A failed attach leaves nothing behind, and the peer holding
            # what it held before.
            for fd in fds:
                os.close(fd)
            if iface is not None:
                self._reaper.destroy([iface])  # the reaper logs a failure
            if not held:
                self._release(peer, cmd.network_name)
            if isinstance(e, (CreateError, OSError)):
                detail = str(e) if isinstance(e, CreateError) else f"cannot create interface: {e}"
                raise _Refused(Code.CREATE_FAILURE, detail) from e
            raise
        peer.interfaces[iface.name] = iface
        net.interfaces[iface.name] = (peer, iface)
        self._user_interfaces[peer.uid] += 1
        self._generation += 1
        log.info("%s attached %s %s to network %r", peer, cmd.kind, iface.name, net.name)
        return iface, fds

    def _check_mac_free(self, net: _Network, mac: str | None) -> None:
        """One interface per MAC on a network: a client asking for another's
        would be let through the bridge filter as that guest (guard.py)."""
        if mac is None:
            return  # the backend picks a random one
        for name, (_, iface) in net.interfaces.items():
            if iface.info().get("mac") == mac:
                raise _Refused(Code.CREATE_FAILURE, f"MAC {mac} is already interface {name}'s on network {net.name!r}")

    def _no_attach(self, kind: str) -> str:
        if not self._backend.attach_kinds:
            # macOS: clients start vmnet interfaces themselves from the network.
            return "this broker hands out networks, not interfaces: 'attach' and 'detach' are not available"
        return f"'kind' {kind!r} is not available here (only {', '.join(self._backend.attach_kinds)})"

    def _detach(self, peer: Peer, name: str) -> asyncio.Future[None] | None:
        if not self._backend.attach_kinds:
            raise _Refused(Code.INVALID_REQUEST, self._no_attach(""))
        if name not in peer.interfaces:
            raise _Refused(Code.NOT_FOUND, f"this connection has no interface {name!r}")
        return self._destroy_interfaces(peer, [name])

    def _destroy_interfaces(self, peer: Peer, names: list[str]) -> asyncio.Future[None] | None:
        """Forget them now; the reaper deletes them.  Done when they are gone."""
        if not names:
            return None
        # Forget them first: even if the backend fails, they are no longer ours.
        ifaces = [peer.interfaces.pop(name) for name in names]
        for net in self._networks.values():
            for name in names:
                net.interfaces.pop(name, None)
        self._user_interfaces[peer.uid] -= len(ifaces)
        if self._user_interfaces[peer.uid] <= 0:
            del self._user_interfaces[peer.uid]
        self._generation += 1
        log.info("%s: removing interface(s) %s", peer, ", ".join(names))
        return self._reaper.destroy(ifaces)

    async def interfaces_removed(self) -> None:
        """Until every interface handed to the reaper is gone (tests)."""
        while not self._reaper.idle:
            await asyncio.sleep(0.005)

    def _release(self, peer: Peer, name: str) -> asyncio.Future[None] | None:
        net = self._networks[name]
        gone = self._destroy_interfaces(peer, [n for n, (owner, _) in net.interfaces.items() if owner is peer])
        peer.networks.discard(name)
        net.peers.discard(peer)
        log.info("%s released network %r (%d peer(s) left)", peer, name, len(net.peers))
        if not net.peers:
            self._schedule_removal(net)
        return gone

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
        self._generation += 1
        gone = self._backend.destroy_network(net.handle)
        if inspect.isawaitable(gone):
            task = self._loop.create_task(self._remove_later(net, gone))
            task.add_done_callback(lambda task: task.cancelled() or task.exception())  # logged there
            self._removing[net.name] = task
            self._leaving[net.name] = net
            return
        log.info("removed network %r", net.name)

    async def _remove_later(self, net: _Network, gone: Awaitable[None]) -> None:
        try:
            await gone
            log.info("removed network %r", net.name)
        except Exception:
            log.exception("removing network %r failed", net.name)
            raise
        finally:
            del self._removing[net.name]
            del self._leaving[net.name]
            self._generation += 1

    # -- status -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything, in one dictionary (unpaged: a reply is ``_status_reply``)."""
        networks = [{**info, "attachments": attachments} for info, attachments in self._status_networks()]
        return {**self._status_head(), "networks": networks, "available": sorted(self._configs)}

    def _status_head(self) -> dict[str, Any]:
        return {
            "version": __version__,
            # Connections holding at least one network; "connections" counts all.
            "peers": sum(1 for peer in self._peers if peer.networks),
            "connections": len(self._peers),
            "uptime": round(time.monotonic() - self._started, 3),
        }

    def _status_networks(self, render: bool = True) -> list[tuple[dict[str, Any], list[Any]]]:
        """Each network's status object (without attachments) and its attachments.

        With ``render`` false, the attachments are ``(owner, interface)``
        pairs, for ``_attachment_status`` to render only those a page shows.
        """
        now = self._loop.time()
        out = []
        for net in self._networks.values():
            info = net.handle.info()
            expires = None if net.idle_deadline is None else max(0.0, round(net.idle_deadline - now, 3))
            info.update(peers=len(net.peers), interfaces=len(net.interfaces), idle_expires_in=expires)
            # Why the network no longer works as created (its bridge deleted
            # behind the broker's back, dnsmasq restarting...), or None.
            info["degraded"] = getattr(net.handle, "degraded", None)
            pairs = list(net.interfaces.values())
            out.append((info, [_attachment_status(owner, iface) for owner, iface in pairs] if render else pairs))
        for net in self._leaving.values():  # until its bridge and daemons are gone
            info = net.handle.info()
            info.update(peers=0, interfaces=0, idle_expires_in=0.0, removing=True)
            info["degraded"] = getattr(net.handle, "degraded", None)
            out.append((info, []))
        return out

    def _status_reply(self, cmd: Status, req: Request) -> dict[str, Any]:
        """One page of status that fits ``max_reply`` bytes, from row ``cmd.offset``.

        The rows are, in order: each network, followed by its attachments,
        then the names in ``available``.  A page takes rows while the encoded
        reply fits (and at most ``cmd.limit``); a network whose attachments
        go on past the page appears again, with the rest of them, on the
        next.  ``truncated`` says more rows follow, from ``next_offset``;
        ``generation`` changes whenever a network or an interface comes or
        goes, so a client paging through knows when to start over.
        """
        networks = self._status_networks(render=False)
        # (network index, (owner, interface)) / (-1, available name); None: the network itself
        rows: list[tuple[int, Any]] = []
        for i, (_, attachments) in enumerate(networks):
            rows.append((i, None))
            rows.extend((i, attachment) for attachment in attachments)
        rows.extend((-1, name) for name in sorted(self._configs))

        page: dict[str, Any] = {
            **self._status_head(),
            "networks": [],
            "available": [],
            "generation": self._generation,
            # Sized at their longest while measuring.
            "truncated": False,
            "next_offset": len(rows) * 10 + 10,
        }
        used = len(protocol.encode(protocol.reply_body({"status": page}, req)))
        first = min(cmd.offset, len(rows))
        last = len(rows) if cmd.limit is None else min(len(rows), first + cmd.limit)
        shown: list[dict[str, Any]] = []
        current = -1  # index of the network shown last
        end = first
        for i, value in rows[first:last]:
            if i >= 0 and value is not None:
                value = _attachment_status(*value)  # rendered only when on a page
            cost = 0
            if i >= 0 and i != current:
                net = {**networks[i][0], "attachments": []}
                cost += len(protocol.encode(net)) + 1
            if value is not None:
                cost += len(protocol.encode(value)) + 1
            if used + cost > self.max_reply:
                break
            used += cost
            if i >= 0 and i != current:
                shown.append(net)
                current = i
            if value is not None:
                (shown[-1]["attachments"] if i >= 0 else page["available"]).append(value)
            end += 1
        if end == first < last:
            raise _Refused(
                Code.INTERNAL_ERROR, f"reply too large: status row {first} alone exceeds {self.max_reply} bytes"
            )
        more = end < len(rows)
        page.update(networks=shown, truncated=more, next_offset=end if more else None)
        return protocol.reply_body({"status": page}, req)
