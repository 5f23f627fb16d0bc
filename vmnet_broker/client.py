"""The client library: one connection to the broker, kept open.

The connection *is* the reference: networks and interfaces stay while it is
open, and go when it closes or the process dies.  On Linux the connection is
a Unix socket: a launcher that hands a VM to a child process can let the
child inherit ``client.fileno()``, so the reference lives exactly as long as
the VM.  On macOS it is an XPC connection to the broker's Mach service, as
upstream's C, Go and Swift clients make; XPC connections are not inherited,
so the process that acquired must outlive the VM.
"""

from __future__ import annotations

import array
import dataclasses
import ipaddress
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import ConnectionFailed, InvalidReply, error_for

DEFAULT_SOCKET = "/run/vmnet-broker/broker.sock"
SOCKET_ENV = "VMNET_BROKER_SOCKET"
# Upstream's Mach service name, so either broker serves either client.
DEFAULT_SERVICE = "com.github.nirs.vmnet-broker"
SERVICE_ENV = "VMNET_BROKER_SERVICE"
# Replies are small, except status with many networks; MSG_TRUNC tells us if not.
MAX_REPLY = 1 << 20
MAX_REPLY_FDS = 16
# A broker whose backlog is full refuses a non-blocking connect with EAGAIN
# (1,000 clients at once): try again, waiting longer each time up to this,
# until the timeout.
CONNECT_RETRY_MAX = 0.05
# Status pages followed before giving up, and restarts when the broker's
# state changed between pages.
MAX_STATUS_PAGES = 10_000
MAX_STATUS_RESTARTS = 5


def default_socket_path() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def default_service_name() -> str:
    return os.environ.get(SERVICE_ENV) or DEFAULT_SERVICE


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
    # macOS: the vmnet serialization (an opaque XPC object) the broker
    # handed out; None on Linux.
    serialization: Any = field(default=None, repr=False, compare=False)
    _native: Any = field(default=None, repr=False, compare=False)

    def vmnet_network(self) -> Any:
        """macOS: a new ``vmnet_network_ref`` made from the serialization.

        An owned handle (``_native.VmnetNetwork``): keep it while the VM
        uses the network; ``.pointer()`` gives the raw ref for PyObjC's
        ``VZVmnetNetworkDeviceAttachment(network:)`` or
        ``vmnet_interface_start_with_network``.
        """
        if self.serialization is None or self._native is None:
            raise TypeError("only a network acquired over XPC (macOS) has a vmnet serialization")
        return self._native.network_from_serialization(self.serialization)

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


class Channel(Protocol):
    """One connection to a broker, as the ``Client`` uses it."""

    def request(self, message: dict[str, Any]) -> tuple[Any, list[int]]:
        """Send one request; the decoded reply and the fds that came with it."""

    def network(self, reply: dict[str, Any]) -> Network:
        """The ``Network`` of a successful ``acquire`` reply."""

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class SeqpacketChannel:
    """Linux: JSON packets on a Unix ``SOCK_SEQPACKET`` socket, fds as ``SCM_RIGHTS``."""

    def __init__(self, socket_path: str, timeout: float | None) -> None:
        self.socket_path = socket_path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.settimeout(timeout)
        try:
            self._connect(timeout)
        except OSError as e:
            self._sock.close()
            raise ConnectionFailed(f"cannot connect to {socket_path}: {e.strerror or e}") from e

    def _connect(self, timeout: float | None) -> None:
        # With a timeout the socket is non-blocking, and a Unix socket whose
        # listener's backlog is full answers EAGAIN at once rather than
        # waiting: retried until the timeout.  (Without one, connect() waits
        # for room itself.)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                self._sock.connect(self.socket_path)
                return
            except BlockingIOError:
                if deadline is None or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, CONNECT_RETRY_MAX)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def request(self, message: dict[str, Any]) -> tuple[Any, list[int]]:
        data = json.dumps(message).encode()
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
            return json.loads(reply_data), fds
        except ValueError as e:
            for fd in fds:
                os.close(fd)
            raise InvalidReply(f"reply is not a JSON object: {e}") from None

    def network(self, reply: dict[str, Any]) -> Network:
        return Network.from_reply(reply.get("network"))

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


class XpcChannel:
    """macOS: dictionaries over an XPC connection to the broker's Mach service.

    What upstream's client does (``client/client.c``): connect lazily, send
    with reply (sync), an XPC error for a reply is code 1, anything but a
    dictionary code 2.  ``native`` is the compiled macOS ``_native`` module
    (tests pass a fake of it).
    """

    def __init__(self, service_name: str, native: Any = None) -> None:
        if native is None:
            from . import _native as native
        self.service_name = service_name
        self._native = native
        self._conn = native.XpcClient(service_name)

    def fileno(self) -> int:
        raise OSError(f"an XPC connection ({self.service_name}) has no file descriptor to inherit")

    def close(self) -> None:
        self._conn.close()

    def request(self, message: dict[str, Any]) -> tuple[Any, list[int]]:
        try:
            # The serialization is itself a dictionary: it must come back as
            # the XPC object vmnet made, not as plain values.
            return self._conn.send(message, ["network"]), []
        except self._native.XpcError as e:
            raise ConnectionFailed(f"broker {self.service_name}: {e.description}") from e
        except OSError as e:
            raise ConnectionFailed(f"broker {self.service_name}: {e}") from e
        except ValueError as e:  # a reply beyond the conversion limits
            raise InvalidReply(f"broker {self.service_name}: {e}") from e

    def network(self, reply: dict[str, Any]) -> Network:
        serialization = reply.get("network")
        if serialization is None or not hasattr(serialization, "type_name"):
            raise InvalidReply("the reply has no network serialization")
        info = reply.get("network_info")
        if isinstance(info, dict):  # our broker says what the network is
            network = Network.from_reply(info)
        else:  # upstream's broker: ask vmnet
            network = self._describe(serialization)
        return dataclasses.replace(network, serialization=serialization, _native=self._native)

    def _describe(self, serialization: Any) -> Network:
        """What vmnet says of a serialization from upstream's broker.

        The acquire already holds the reference, so a failure here (vmnet
        refusing to deserialize, say without the entitlement) leaves the
        addresses empty instead of losing the network.
        """
        unknown = Network(
            name="", mode="", subnet="", mask="", gateway="", ipv6_prefix="", prefix_len=0, mtu=0, bridge="", raw={}
        )
        try:
            vmnet = self._native.network_from_serialization(serialization)
            try:
                address, mask = vmnet.ipv4_subnet()
                prefix, length = vmnet.ipv6_prefix()
            finally:
                vmnet.close()
            subnet = ipaddress.IPv4Network(f"{address}/{mask}", strict=False)
        except (OSError, ValueError):
            return unknown
        return dataclasses.replace(
            unknown, subnet=str(subnet.network_address), mask=str(subnet.netmask),
            gateway=str(subnet.network_address + 1), ipv6_prefix=prefix, prefix_len=length,
        )  # fmt: skip


def default_channel(socket_path: str | None, timeout: float | None, service_name: str | None) -> Channel:
    """The transport this build of the package speaks (the one platform choice)."""
    if sys.platform == "darwin":
        return XpcChannel(service_name or default_service_name())
    return SeqpacketChannel(socket_path or default_socket_path(), timeout)


class Client:
    """A connection to the broker.

    Linux: ``socket_path`` defaults to ``$VMNET_BROKER_SOCKET``, then
    ``/run/vmnet-broker/broker.sock``.  macOS: ``service_name`` defaults to
    ``$VMNET_BROKER_SERVICE``, then ``com.github.nirs.vmnet-broker``.
    ``channel`` replaces either (tests, other transports).

    Methods raise ``BrokerError`` subclasses carrying the protocol's
    ``code``.  ``ConnectionFailed`` (a broken connection, or no reply within
    ``timeout``) and any exception that interrupts a request close this
    client's socket; the broker releases what the connection held once no
    process has it open (a child that inherited ``fileno()`` keeps it).
    Safe to share between threads: one request is in flight at a time.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        timeout: float | None = 60.0,
        service_name: str | None = None,
        channel: Channel | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._channel = channel or default_channel(socket_path, timeout, service_name)

    # -- connection ---------------------------------------------------------------

    def fileno(self) -> int:
        """The connection's fd (Linux), for a child process to inherit."""
        return self._channel.fileno()

    def close(self) -> None:
        """Close the connection: the broker releases everything it held."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------

    def acquire_network(self, name: str) -> Network:
        reply, _ = self.request({"command": "acquire", "network_name": name})
        return self._channel.network(reply)

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
        """The broker's status, all of it: pages are followed and joined."""
        obj = self._status_pages()
        try:
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

    def _status_pages(self) -> dict[str, Any]:
        """Every page of ``status`` (a broker that does not page sends one), joined.

        A page carries ``next_offset`` while rows remain; a network whose
        attachments run on into the next page appears there again.  If the
        broker's ``generation`` changes between pages, it starts over.
        """
        for _ in range(MAX_STATUS_RESTARTS):
            first = self._status_page(0)
            joined = dict(first)
            networks = [dict(n) for n in first.get("networks", [])]
            available = list(first.get("available", []))
            page = first
            for _ in range(MAX_STATUS_PAGES):
                offset = page.get("next_offset")
                if not page.get("truncated") or offset is None:
                    joined.update(networks=networks, available=available, truncated=False, next_offset=None)
                    return joined
                page = self._status_page(offset)
                if page.get("generation") != first.get("generation"):
                    break  # changed under us: start over
                more = page.get("networks", [])
                if more and networks and more[0].get("name") == networks[-1].get("name"):
                    first_more, *more = more
                    before = networks[-1].get("attachments", [])
                    networks[-1]["attachments"] = [*before, *first_more.get("attachments", [])]
                networks.extend(dict(n) for n in more)
                available.extend(page.get("available", []))
            else:
                raise InvalidReply(f"status has more than {MAX_STATUS_PAGES} pages")
        raise InvalidReply(f"the broker's state kept changing while reading status ({MAX_STATUS_RESTARTS} tries)")

    def _status_page(self, offset: int) -> dict[str, Any]:
        request: dict[str, Any] = {"command": "status"}
        if offset:
            request["offset"] = offset
        reply, _ = self.request(request)
        page = reply.get("status")
        if not isinstance(page, dict):
            raise InvalidReply("bad status object: no 'status' dictionary")
        next_offset = page.get("next_offset")
        if page.get("truncated") and (not isinstance(next_offset, int) or next_offset <= offset):
            raise InvalidReply(f"bad status page: next_offset {next_offset!r} after offset {offset}")
        return page

    def request(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """Send one request; the reply object and the fds that came with it.

        Raises the ``BrokerError`` for the reply's ``error`` code.
        """
        with self._lock:
            reply, fds = self._channel.request(message)
        if not isinstance(reply, dict):
            for fd in fds:
                os.close(fd)
            raise InvalidReply(f"reply is not a dictionary but {type(reply).__name__}")
        code = reply.get("error")
        if code:
            for fd in fds:
                os.close(fd)
            if not isinstance(code, int) or isinstance(code, bool):
                raise InvalidReply(f"'error' is not an integer: {code!r}")
            raise error_for(code, reply.get("message") if isinstance(reply.get("message"), str) else None)
        return reply, fds


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
