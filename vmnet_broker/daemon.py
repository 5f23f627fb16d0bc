"""The broker's lifecycle: set up, serve until a signal, clean up everything.

Setup removes what a crashed broker left, then binds the socket (or adopts
one from systemd socket activation; on macOS, listens on the XPC Mach
service), so a client that can connect is talking to a clean broker.  A signal only asks the loop to stop; cleanup runs every
step in ``finally`` and reports the first error.
"""

from __future__ import annotations

import asyncio
import fcntl
import grp
import logging
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType

from . import _native, files
from .backends.base import Backend
from .backends.darwin import DarwinBackend
from .backends.darwin_config import unsupported_on_darwin
from .backends.linux import LinuxBackend, dnsmasq
from .backends.linux_config import unsupported_on_linux
from .broker import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_INTERFACES_PER_NETWORK,
    DEFAULT_MAX_INTERFACES_PER_USER,
    Broker,
)
from .client import DEFAULT_SERVICE, DEFAULT_SOCKET
from .config import DEFAULT_CONFIG_DIR, Check, load_config_dir
from .transports.seqpacket import SeqpacketServer, listen_backlog
from .transports.xpc import XpcServer

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/var/lib/vmnet-broker"
LOCK_DIR = "/run/vmnet-broker"  # root-only: per-namespace lock files
PROBE_TIMEOUT = 1.0
SD_LISTEN_FDS_START = 3


@dataclass
class Options:
    socket_path: str = DEFAULT_SOCKET
    config_dir: str | None = DEFAULT_CONFIG_DIR
    state_dir: str = DEFAULT_STATE_DIR
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    socket_group: str | None = None  # group that may connect (socket mode 0660)
    exit_idle: float | None = None  # exit this long after the last client left
    service_name: str = DEFAULT_SERVICE  # macOS: the Mach service to listen on
    # Fair shares (broker.py): interfaces of one non-root user, of one network.
    max_interfaces_per_user: int = DEFAULT_MAX_INTERFACES_PER_USER
    max_interfaces_per_network: int = DEFAULT_MAX_INTERFACES_PER_NETWORK


def _activated_listener() -> _native.Listener | None:
    """The socket systemd passed us (``LISTEN_FDS``), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return _native.Listener.from_fd(SD_LISTEN_FDS_START)


def _notify(state: str) -> None:
    """sd_notify(3) in a few lines: tell systemd we are ready or stopping."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as e:
        log.debug("sd_notify failed: %s", e)


class AlreadyRunning(Exception):
    """Another broker owns this network namespace or this socket path."""


class NamespaceLock:
    """One broker per network namespace, held for the broker's lifetime.

    A second broker in the same namespace would take the first one's
    networks for a crash's leftovers and remove them.  The lock is a
    ``flock`` on a file named after the namespace's inode, in a directory
    only root can write, so no unprivileged process can take it first; the
    kernel drops it when the broker dies, however it dies.
    """

    def __init__(self, directory: str = LOCK_DIR) -> None:
        inode = os.stat("/proc/self/ns/net").st_ino
        # Root's alone (created or fixed, or UnsafeDirectory), and the lock
        # file never opened through a symlink.
        directory = files.secure_directory(directory, "lock")
        self.path = os.path.join(directory, f"netns-{inode}.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 32).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise AlreadyRunning(f"another vmnet-broker (pid {holder}) is running in this network namespace") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        os.unlink(self.path)
        os.close(self.fd)

    def __enter__(self) -> NamespaceLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check_socket_free(path: str) -> None:
    """Refuse to replace a socket file that a live broker still owns.

    A broker that accepts answers the connect; one that is stuck (stopped,
    or its backlog full) makes it time out: both are alive.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except (TimeoutError, BlockingIOError):
        raise AlreadyRunning(f"a vmnet-broker owns {path} but does not accept connections") from None
    except OSError:
        return  # nothing there, or a stale file from a dead broker
    finally:
        probe.close()
    raise AlreadyRunning(f"another vmnet-broker is listening on {path}")


def _raise_fd_limit() -> None:
    """Every TAP, dnsmasq pipe and client costs an fd: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _gid(group: str) -> int:
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def serve(options: Options, native: ModuleType | None = None) -> int:
    """Run the broker until a signal (or idle exit); 0 after a clean shutdown.

    ``native`` is the compiled mechanism module; tests pass a fake of the
    macOS one.  Its ``PLATFORM`` picks the backend and the transport, here
    and nowhere else.
    """
    native = native or _native
    if _is_darwin(native):
        # launchd guarantees one instance per Mach service; vmnet networks
        # die with the process, so there is nothing to lock or clean.
        return asyncio.run(_serve(options, native))
    try:
        lock = NamespaceLock()
    except (AlreadyRunning, files.UnsafeDirectory, OSError) as e:
        log.error("%s; not starting", e)
        return 1
    with lock:
        activated = os.environ.get("LISTEN_PID") == str(os.getpid())
        try:
            options = _secure_directories(options, activated)
            if not activated:
                _check_socket_free(options.socket_path)
        except (AlreadyRunning, files.UnsafeDirectory, OSError) as e:
            log.error("%s; not starting", e)
            return 1
        _raise_fd_limit()
        return asyncio.run(_serve(options, native))


def _secure_directories(options: Options, activated: bool) -> Options:
    """The state directory and the socket's: root's alone, created or fixed, or refused.

    A socket-group member who could write the socket's directory could swap
    the new socket for a symlink before root chowns it; one who could write
    the state directory could make root write through symlinks there.  The
    socket path returned is in the directory's real path (no symlinks).
    """
    if not activated:  # else systemd made the socket (and its directory)
        path = os.path.abspath(options.socket_path)
        directory = files.secure_directory(os.path.dirname(path), "socket")
        options = replace(options, socket_path=os.path.join(directory, os.path.basename(path)))
    state = files.secure_directory(options.state_dir, "state")  # second: it may be below the socket's
    if not dnsmasq.usable_state_dir(state):
        raise files.UnsafeDirectory(f"state directory {state}: dnsmasq configs cannot name files there "
                                    "(use letters, digits and ._/+@~- only)")  # fmt: skip
    return options


def _is_darwin(native: ModuleType) -> bool:
    return getattr(native, "PLATFORM", "linux") == "darwin"


def _config_check(native: ModuleType) -> Check:
    """What this platform's backend cannot do: such a config file is refused at load."""
    return unsupported_on_darwin if _is_darwin(native) else unsupported_on_linux


def _backend(options: Options, native: ModuleType, loop: asyncio.AbstractEventLoop) -> Backend:
    if _is_darwin(native):
        return DarwinBackend(native)
    return LinuxBackend(options.state_dir, loop)


def _transport(
    broker: Broker, options: Options, native: ModuleType, loop: asyncio.AbstractEventLoop, failed: Callable[[str], None]
) -> SeqpacketServer | XpcServer:
    if _is_darwin(native):
        return XpcServer(broker, native.XpcListener(options.service_name), loop, failed)
    listener = _activated_listener()
    if listener is None:
        listener = _native.Listener(options.socket_path, backlog=listen_backlog())
        if options.socket_group is not None:
            # lchown: never the target of a symlink put where the socket was
            # (the directory is root's alone, so none can be; this is the
            # second line of defence).
            os.chown(options.socket_path, -1, _gid(options.socket_group), follow_symlinks=False)
    return SeqpacketServer(broker, listener, loop)


class _Lifetime:
    """When the daemon stops: a signal, the listener failing, or idle exit.

    On macOS, as upstream: SIGINT and SIGTERM are ignored while clients hold
    networks (their VMs would lose the network), and launchd transactions
    are open while anyone is connected.  ``exit_idle``: stop that many
    seconds after the last client left (armed at the first disconnect, as
    upstream's timer is), so launchd or systemd can start us on demand.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, broker: Broker, exit_idle: float | None, native: ModuleType):
        self.loop = loop
        self.broker = broker
        self.exit_idle = exit_idle
        self.native = native
        self.darwin = _is_darwin(native)
        self.stopped = asyncio.Event()
        self.exit_code = 0
        self.connections = 0
        self.idle_timer: asyncio.TimerHandle | None = None

    def signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.darwin and self.broker.networks_held():
            log.warning("%s ignored: clients hold networks (their VMs would lose them)", name)
            return
        log.info("%s received, shutting down", name)
        self.stopped.set()

    def failed(self, reason: str) -> None:
        log.error("listener failed (%s), shutting down", reason)
        self.exit_code = 1
        self.stopped.set()

    def connections_changed(self, count: int) -> None:
        if self.darwin and (count > 0) != (self.connections > 0):
            if count > 0:
                self.native.xpc_transaction_begin()
            else:
                self.native.xpc_transaction_end()
        self.connections = count
        if count > 0 and self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        elif count == 0 and self.exit_idle is not None and self.idle_timer is None:
            log.info("no clients; exiting in %g s unless one connects", self.exit_idle)
            self.idle_timer = self.loop.call_later(self.exit_idle, self._idle_exit)

    def _idle_exit(self) -> None:
        log.info("no clients for %g s, exiting", self.exit_idle)
        self.stopped.set()


async def _serve(options: Options, native: ModuleType) -> int:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    log.info("vmnet-broker starting (pid %d)", os.getpid())

    configs = load_config_dir(options.config_dir, check=_config_check(native))
    backend = _backend(options, native, loop)
    backend.cleanup_leftovers()

    broker = Broker(
        backend, configs, options.idle_timeout, loop,
        max_interfaces_per_user=options.max_interfaces_per_user,
        max_interfaces_per_network=options.max_interfaces_per_network,
    )  # fmt: skip
    lifetime = _Lifetime(loop, broker, options.exit_idle, native)
    broker.connections_changed = lifetime.connections_changed
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lifetime.signal, sig)

    server: SeqpacketServer | XpcServer | None = None
    try:
        server = _transport(broker, options, native, loop, lifetime.failed)
        server.start()
        log.info(
            "ready in %.0f ms; networks: %s", (time.monotonic() - started) * 1000, ", ".join(sorted(configs))
        )
        _notify("READY=1")
        await lifetime.stopped.wait()
        _notify("STOPPING=1")
    finally:
        errors: list[BaseException] = []
        if server is not None:
            try:
                server.close()
            except Exception as e:
                log.exception("closing the listener")
                errors.append(e)
        try:
            await broker.shutdown()
        except Exception as e:
            errors.append(e)
        if errors:
            log.error("cleanup failed: %s", errors[0])
            raise errors[0]
    log.info("vmnet-broker stopped (pid %d)", os.getpid())
    return lifetime.exit_code
