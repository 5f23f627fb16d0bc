"""The broker's lifecycle: set up, serve until a signal, clean up everything.

Setup removes what a crashed broker left, then binds the socket (or adopts
one from systemd socket activation), so a client that can connect is talking
to a clean broker.  A signal only asks the loop to stop; cleanup runs every
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
import time
from dataclasses import dataclass
from pathlib import Path

from . import _native
from .backends.linux import LinuxBackend
from .broker import DEFAULT_IDLE_TIMEOUT, Broker
from .client import DEFAULT_SOCKET
from .config import DEFAULT_CONFIG_DIR, load_config_dir
from .server import Server

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
        self.path = os.path.join(directory, f"netns-{inode}.lock")
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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


def serve(options: Options) -> int:
    """Run the broker until SIGINT or SIGTERM; 0 after a clean shutdown."""
    try:
        lock = NamespaceLock()
    except AlreadyRunning as e:
        log.error("%s; not starting", e)
        return 1
    with lock:
        if os.environ.get("LISTEN_PID") != str(os.getpid()):
            try:
                _check_socket_free(options.socket_path)
            except AlreadyRunning as e:
                log.error("%s; not starting", e)
                return 1
        _raise_fd_limit()
        return asyncio.run(_serve(options))


async def _serve(options: Options) -> int:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    log.info("vmnet-broker starting (pid %d)", os.getpid())

    configs = load_config_dir(options.config_dir)
    Path(options.state_dir).mkdir(parents=True, exist_ok=True)
    backend = LinuxBackend(options.state_dir, loop)
    backend.cleanup_leftovers()

    broker = Broker(backend, configs, options.idle_timeout, loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    server: Server | None = None
    try:
        listener = _activated_listener()
        if listener is None:
            listener = _native.Listener(options.socket_path)
            if options.socket_group is not None:
                os.chown(options.socket_path, -1, _gid(options.socket_group))
        server = Server(broker, listener, loop)
        server.start()
        log.info(
            "ready in %.0f ms; networks: %s", (time.monotonic() - started) * 1000, ", ".join(sorted(configs))
        )
        _notify("READY=1")
        await stop.wait()
        log.info("signal received, shutting down")
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
            broker.shutdown()
        except Exception as e:
            errors.append(e)
        if errors:
            log.error("cleanup failed: %s", errors[0])
            raise errors[0]
    log.info("vmnet-broker stopped (pid %d)", os.getpid())
    return 0
