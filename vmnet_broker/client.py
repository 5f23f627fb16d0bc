"""The client library: one connection to the broker, kept open.

The connection *is* the reference: networks and interfaces stay while it is
open, and go when it closes or the process dies.  A launcher that hands a VM
to a child process can let the child inherit ``client.fileno()``, so the
reference lives exactly as long as the VM.
"""

from __future__ import annotations

import array
import json
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from .errors import ConnectionFailed, InvalidReply, error_for

DEFAULT_SOCKET = "/run/vmnet-broker/broker.sock"
SOCKET_ENV = "VMNET_BROKER_SOCKET"
# Replies are small, except status with many networks; MSG_TRUNC tells us if not.
MAX_REPLY = 1 << 20
MAX_REPLY_FDS = 16


def default_socket_path() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


@dataclass(frozen=True)
class Network:
    """An acquired network (the ``network`` object of the reply)."""

    name: str
    mode: str
    subnet: str
    mask: str
    gateway: str
    ipv6_prefix: str
    prefix_len: int
    mtu: int
    bridge: str
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_reply(cls, obj: Any) -> Network:
        try:
            return cls(
                name=str(obj["name"]),
                mode=str(obj["mode"]),
                subnet=str(obj["subnet"]),
                mask=str(obj["mask"]),
                gateway=str(obj["gateway"]),
                ipv6_prefix=str(obj.get("ipv6_prefix", "")),
                prefix_len=int(obj.get("prefix_len", 0)),
                mtu=int(obj["mtu"]),
                bridge=str(obj.get("bridge", "")),
                raw=dict(obj),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidReply(f"bad network object: {e}") from None


@dataclass
class Interface:
    """An attached VM interface and its file descriptors (owned: close them).

    For ``tap`` the fds are the TAP queues; for ``dgram`` the one fd is a
    datagram socket carrying one Ethernet frame per datagram.
    """

    name: str
    network_name: str
    kind: str
    mac: str
    mtu: int
    vnet_hdr: bool
    queues: int
    fds: list[int] = field(default_factory=list)

    def fileno(self) -> int:
        return self.fds[0]

    def close(self) -> None:
        """Close our copies of the fds (the interface stays until detached)."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> Interface:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class NetworkStatus:
    name: str
    mode: str
    subnet: str
    peers: int
    interfaces: int
    idle_expires_in: float | None
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class BrokerStatus:
    version: str
    peers: int
    networks: list[NetworkStatus]
    raw: dict[str, Any] = field(repr=False, compare=False)


class Client:
    """A connection to the broker.

    ``socket_path`` defaults to ``$VMNET_BROKER_SOCKET``, then
    ``/run/vmnet-broker/broker.sock``.  Methods raise ``BrokerError``
    subclasses carrying the protocol's ``code``.  ``ConnectionFailed`` (a
    broken connection, or no reply within ``timeout``) and any exception that
    interrupts a request close this client's socket; the broker releases what
    the connection held once no process has it open (a child that inherited
    ``fileno()`` keeps it).  Safe to share between threads: one request is in
    flight at a time.
    """

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = 60.0) -> None:
        self.socket_path = socket_path or default_socket_path()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.socket_path)
        except OSError as e:
            self._sock.close()
            raise ConnectionFailed(f"cannot connect to {self.socket_path}: {e.strerror or e}") from e

    # -- connection ---------------------------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        """Close the connection: the broker releases everything it held."""
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------

    def acquire_network(self, name: str) -> Network:
        reply, _ = self.request({"command": "acquire", "network_name": name})
        return Network.from_reply(reply.get("network"))

    def attach(
        self,
        network_name: str,
        kind: str = "tap",
        *,
        mac: str | None = None,
        vnet_hdr: bool = False,
        queues: int = 1,
    ) -> Interface:
        req: dict[str, Any] = {"command": "attach", "network_name": network_name, "kind": kind}
        if mac is not None:
            req["mac"] = mac
        if vnet_hdr:
            req["vnet_hdr"] = True
        if queues != 1:
            req["queues"] = queues
        reply, fds = self.request(req)
        try:
            obj = reply["interface"]
            iface = Interface(
                name=str(obj["name"]),
                network_name=str(obj["network_name"]),
                kind=str(obj["kind"]),
                mac=str(obj["mac"]),
                mtu=int(obj["mtu"]),
                vnet_hdr=bool(obj["vnet_hdr"]),
                queues=int(obj["queues"]),
                fds=fds,
            )
        except (KeyError, TypeError, ValueError) as e:
            for fd in fds:
                os.close(fd)
            raise InvalidReply(f"bad interface object: {e}") from None
        expected = iface.queues if iface.kind == "tap" else 1
        if len(fds) != expected:
            iface.close()
            raise InvalidReply(f"expected {expected} fd(s) with the interface, got {len(fds)}")
        return iface

    def detach(self, interface: str | Interface) -> None:
        name = interface.name if isinstance(interface, Interface) else interface
        self.request({"command": "detach", "interface": name})

    def release(self, network_name: str) -> None:
        self.request({"command": "release", "network_name": network_name})

    def status(self) -> BrokerStatus:
        reply, _ = self.request({"command": "status"})
        try:
            obj = reply["status"]
            networks = [
                NetworkStatus(
                    name=n["name"],
                    mode=n["mode"],
                    subnet=n["subnet"],
                    peers=int(n["peers"]),
                    interfaces=int(n["interfaces"]),
                    idle_expires_in=n["idle_expires_in"],
                    raw=n,
                )
                for n in obj["networks"]
            ]
            return BrokerStatus(str(obj["version"]), int(obj["peers"]), networks, obj)
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidReply(f"bad status object: {e}") from None

    def request(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """Send one request; the reply object and the fds that came with it.

        Raises the ``BrokerError`` for the reply's ``error`` code.
        """
        data = json.dumps(message).encode()
        with self._lock:
            try:
                self._sock.sendall(data)
                reply_data, fds = self._receive()
            except BaseException as e:
                # A reply left unread (timeout, KeyboardInterrupt, a signal
                # handler's exception) would answer the next request: the
                # connection is unusable, so it is closed.
                self._sock.close()
                if isinstance(e, OSError):
                    raise ConnectionFailed(f"broker connection failed: {e.strerror or e}") from e
                raise
        try:
            reply = json.loads(reply_data)
            if not isinstance(reply, dict):
                raise ValueError("not an object")
        except ValueError as e:
            for fd in fds:
                os.close(fd)
            raise InvalidReply(f"reply is not a JSON object: {e}") from None
        code = reply.get("error")
        if code:
            for fd in fds:
                os.close(fd)
            raise error_for(int(code), reply.get("message"))
        return reply, fds

    def _receive(self) -> tuple[bytes, list[int]]:
        fds = array.array("i")
        data, ancdata, flags, _ = self._sock.recvmsg(
            MAX_REPLY, socket.CMSG_SPACE(MAX_REPLY_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, cmsg in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cmsg[: len(cmsg) - (len(cmsg) % fds.itemsize)])
        received = list(fds)
        if not data:
            raise ConnectionFailed("the broker closed the connection")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in received:
                os.close(fd)
            raise InvalidReply("reply or its file descriptors were truncated")
        return data, received


_default_client: Client | None = None
_default_lock = threading.Lock()


def acquire_network(name: str) -> Network:
    """Acquire ``name`` on a process-wide connection kept open until exit.

    Like upstream's C client: the network stays while this process lives.
    """
    global _default_client
    with _default_lock:
        if _default_client is None:
            _default_client = Client()
        try:
            return _default_client.acquire_network(name)
        except ConnectionFailed:
            _default_client = None  # the next call connects afresh
            raise
