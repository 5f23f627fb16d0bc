"""A stand-in for the macOS build of ``vmnet_broker._native``, for tests on Linux.

It has the names and behaviour of the darwin branch of vmnet_broker/_native.pyi
and nothing else, so
the real darwin backend, XPC transport, daemon and client run unchanged on
top of it; only the boundary is fake.  XPC is played by one Unix seqpacket
socket per Mach service name under ``$VMB_FAKE_XPC_DIR``, so brokers and
clients are real, separate processes: a peer's credentials come from
SO_PEERCRED, a dead client is a "gone" event, a dead broker an interrupted
connection.  vmnet is played by a subnet counter; ``$VMB_FAKE_VMNET_FAIL``
(a vmnet_return_t number) makes ``create_network`` fail with it, and
``$VMB_FAKE_XPC_LISTENER_ERROR`` makes the listener report that error.

    python -m tests.fake_darwin serve [vmnet-broker serve options]
    python -m tests.fake_darwin client NAME...          # our Client, prints like upstream's test.c
    python -m tests.fake_darwin upstream-client NAME... # upstream's client.c logic, dictionaries only
    python -m tests.fake_darwin hold NAME...            # acquire, print "held TOKEN...", sleep until killed
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import itertools
import json
import os
import selectors
import socket
import struct
import sys
import threading
import types
import uuid
from collections.abc import Sequence
from typing import Any

PLATFORM = "darwin"
VMNET_HOST_MODE = 1000
VMNET_SHARED_MODE = 1001
MAX_DEPTH = 8
MAX_ENTRIES = 1024
_STATUS = {
    1000: "VMNET_SUCCESS", 1001: "VMNET_FAILURE", 1002: "VMNET_MEM_FAILURE", 1003: "VMNET_INVALID_ARGUMENT",
    1004: "VMNET_SETUP_INCOMPLETE", 1005: "VMNET_INVALID_ACCESS", 1006: "VMNET_PACKET_TOO_BIG",
    1007: "VMNET_BUFFER_EXHAUSTED", 1008: "VMNET_TOO_MANY_PACKETS", 1009: "VMNET_SHARING_SERVICE_BUSY",
    1010: "VMNET_NOT_AUTHORIZED",
}  # fmt: skip

# Every create_network call of this process: (mode, options) — for in-process tests.
CREATED: list[tuple[int, dict[str, Any]]] = []
transactions: collections.Counter[str] = collections.Counter()


def vmnet_status_name(status: int) -> str:
    return _STATUS.get(status, f"VMNET_STATUS_{status}")


class VmnetError(OSError):
    def __init__(self, status: int, operation: str) -> None:
        self.status = status
        self.status_name = vmnet_status_name(status)
        self.operation = operation
        super().__init__(f"{operation}: {self.status_name} ({status})")


class XpcError(ConnectionError):
    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class XpcObject:
    """An XPC object Python does not look into.

    As in XPC, two received objects are never the same object (equality is
    identity); ``content`` is what the object holds, as plain values.  A
    ``dictionary`` (a vmnet serialization is one) crosses the wire as a
    dictionary and arrives as plain values unless its key is kept opaque,
    exactly as the C++ converts it.
    """

    def __init__(self, content: Any, type_name: str = "dictionary") -> None:
        self.content = content
        self.type_name = type_name

    def description(self) -> str:
        return f"<{self.type_name}> {_encode(self.content, 1)}"

    def pointer(self) -> int:
        return id(self)


def xpc_transaction_begin() -> None:
    transactions["begin"] += 1
    print("fake xpc_transaction_begin", file=sys.stderr, flush=True)


def xpc_transaction_end() -> None:
    transactions["end"] += 1
    print("fake xpc_transaction_end", file=sys.stderr, flush=True)


# -- values on the fake wire: tagged, so every XPC type keeps its type ---------


def _container(depth: int, count: int, kind: str) -> None:
    # As csrc/darwin/value.cpp: the message dictionary is depth 1.
    if depth > MAX_DEPTH:
        raise ValueError(f"{kind} nested deeper than {MAX_DEPTH} levels")
    if count > MAX_ENTRIES:
        raise ValueError(f"{kind} of {count} entries (at most {MAX_ENTRIES})")


def _encode(value: Any, depth: int = 1) -> Any:
    if value is None:
        return ["n"]
    if isinstance(value, bool):
        return ["b", value]
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"{value} does not fit in int64")
        return ["i", value]
    if isinstance(value, float):
        return ["d", value]
    if isinstance(value, str):
        if "\0" in value:
            raise ValueError("a string holds NUL")
        return ["s", value]
    if isinstance(value, bytes):
        return ["x", value.hex()]
    if isinstance(value, XpcObject):
        if value.type_name == "dictionary":
            return _encode(value.content, depth)
        return ["X", value.content, value.type_name]
    if isinstance(value, (list, tuple)):
        _container(depth, len(value), "array")
        return ["a", [_encode(v, depth + 1) for v in value]]
    if isinstance(value, dict):
        _container(depth, len(value), "dictionary")
        if not all(isinstance(k, str) for k in value):
            raise ValueError("dictionary keys must be strings")
        return ["o", {k: _encode(v, depth + 1) for k, v in value.items()}]
    raise ValueError(f"{type(value).__name__} has no XPC type")


def _decode(tagged: Any, depth: int = 1, opaque: Sequence[str] = ()) -> Any:
    tag = tagged[0]
    if tag == "n":
        return None
    if tag in ("b", "i", "d", "s"):
        return tagged[1]
    if tag == "x":
        return bytes.fromhex(tagged[1])
    if tag == "X":
        return XpcObject(tagged[1], tagged[2])
    if tag == "a":
        _container(depth, len(tagged[1]), "array")
        return [_decode(v, depth + 1) for v in tagged[1]]
    if tag == "o":
        _container(depth, len(tagged[1]), "dictionary")
        return {
            k: XpcObject(_decode(v, depth + 1)) if k in opaque and v[0] == "o" else _decode(v, depth + 1)
            for k, v in tagged[1].items()
        }
    raise ValueError(f"unknown tag {tag!r}")


def _socket_path(service_name: str) -> str:
    directory = os.environ.get("VMB_FAKE_XPC_DIR")
    if not directory:
        raise OSError("VMB_FAKE_XPC_DIR is not set: the fake XPC has nowhere to meet")
    return os.path.join(directory, f"{service_name}.sock")


def _send(sock: socket.socket, serial: int, value: Any) -> None:
    sock.send(json.dumps([serial, value]).encode())


# -- the listener ----------------------------------------------------------------


class XpcEvent(types.SimpleNamespace):
    kind: str
    peer: int
    pid: int
    uid: int
    gid: int
    request: int
    message: dict[str, object]
    invalid: str
    description: str


def _event(kind: str, **fields: Any) -> XpcEvent:
    base = dict(peer=0, pid=0, uid=0, gid=0, request=0, message={}, invalid="", description="")
    base.update(fields)
    return XpcEvent(kind=kind, **base)


class XpcListener:
    """A thread plays the dispatch queue: it only queues events and writes to a pipe."""

    def __init__(self, service_name: str) -> None:
        self.service_name = service_name
        self._path = _socket_path(service_name)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if os.path.exists(self._path):
            os.unlink(self._path)
        self._sock.bind(self._path)
        os.chmod(self._path, 0o666)
        self._sock.listen(128)
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._events: collections.deque[XpcEvent] = collections.deque()
        self._peers: dict[int, socket.socket] = {}
        self._pending: dict[int, tuple[int, int]] = {}  # request -> (peer, serial)
        self._ids = itertools.count(1)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="fake-xpc-queue", daemon=True)
        self._thread.start()
        if os.environ.get("VMB_FAKE_XPC_LISTENER_ERROR"):
            # What launchd gives a listener whose name is not in its plist.
            self._push(_event("error", description=os.environ["VMB_FAKE_XPC_LISTENER_ERROR"]))

    def fileno(self) -> int:
        return self._read_fd

    def _push(self, event: XpcEvent) -> None:
        with self._lock:
            self._events.append(event)
        try:
            os.write(self._write_fd, b"x")
        except BlockingIOError:
            pass

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, "accept")
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        while True:
            for key, _ in sel.select():
                if key.data == "stop":
                    sel.close()
                    return
                if key.data == "accept":
                    conn, _ = self._sock.accept()
                    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                    peer = next(self._ids)
                    with self._lock:
                        self._peers[peer] = conn
                    sel.register(conn, selectors.EVENT_READ, peer)
                    self._push(_event("peer", peer=peer, pid=pid, uid=uid, gid=gid))
                    continue
                peer, conn = key.data, key.fileobj
                try:
                    data = conn.recv(1 << 20)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(conn)
                    with self._lock:
                        self._peers.pop(peer, None)
                    conn.close()
                    self._push(_event("gone", peer=peer))
                    continue
                serial, tagged = json.loads(data)
                message, invalid = {}, ""
                try:
                    message = _decode(tagged)
                except (ValueError, RecursionError) as e:
                    invalid = str(e)
                request = next(self._ids)
                with self._lock:
                    self._pending[request] = (peer, serial)
                self._push(_event("request", peer=peer, request=request, message=message, invalid=invalid))

    def drain(self) -> list[XpcEvent]:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events

    def reply(self, request: int, message: dict[str, object]) -> bool:
        tagged = _encode(message)  # ValueError before anything is consumed
        with self._lock:
            pending = self._pending.pop(request, None)
            conn = self._peers.get(pending[0]) if pending else None
        if pending is None or conn is None:
            return False
        try:
            _send(conn, pending[1], tagged)
        except OSError:
            return False
        return True

    def discard(self, request: int) -> None:
        with self._lock:
            self._pending.pop(request, None)

    def cancel_peer(self, peer: int) -> None:
        with self._lock:
            conn = self._peers.get(peer)
        if conn is not None:
            conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join()
        with self._lock:
            for conn in self._peers.values():
                conn.close()
            self._peers.clear()
            self._pending.clear()
        self._sock.close()
        if os.path.exists(self._path):
            os.unlink(self._path)


# -- the client ------------------------------------------------------------------


class XpcClient:
    def __init__(self, service_name: str, privileged: bool = False) -> None:
        self.service_name = service_name
        self._sock: socket.socket | None = None
        self._serial = itertools.count(1)
        self._closed = False

    def send(self, message: dict[str, object], opaque: Sequence[str] = ()) -> object:
        if self._closed:
            raise OSError("the connection is closed")
        tagged = _encode(message)
        if self._sock is None:  # XPC connects lazily, at the first message
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.connect(_socket_path(self.service_name))
            except OSError:
                sock.close()
                raise XpcError("Connection invalid") from None
            self._sock = sock
        serial = next(self._serial)
        try:
            _send(self._sock, serial, tagged)
            data = self._sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            # The service went away: XPC says "interrupted" and relaunches
            # it on the next message.
            self._sock.close()
            self._sock = None
            raise XpcError("Connection interrupted")
        got, tagged_reply = json.loads(data)
        assert got == serial, "fake XPC replies out of order"
        return _decode(tagged_reply, opaque=opaque)

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- vmnet ---------------------------------------------------------------------

_next_subnet = itertools.count(64)


class VmnetNetwork:
    def __init__(self, serialization: XpcObject) -> None:
        self._serialization = serialization
        self._info = json.loads(serialization.content["networkSerialization"])
        self.closed = False

    def _open(self) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "vmnet network closed")

    def serialization(self) -> XpcObject:
        self._open()
        return self._serialization

    def ipv4_subnet(self) -> tuple[str, str]:
        self._open()
        return self._info["subnet"], self._info["mask"]

    def ipv6_prefix(self) -> tuple[str, int]:
        self._open()
        return self._info["ipv6"], self._info["ipv6_len"]

    def pointer(self) -> int:
        self._open()
        return id(self)

    def close(self) -> None:
        self.closed = True


def create_network(mode: int, **options: Any) -> VmnetNetwork:
    known = {
        "subnet", "mask", "ipv6_prefix", "ipv6_prefix_len", "mtu", "external_interface", "nat44", "nat66",
        "dhcp", "dns_proxy", "router_advertisement", "port_forwards", "dhcp_reservations",
    }  # fmt: skip
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"create_network() got unexpected keyword arguments {sorted(unknown)}")
    if mode not in (VMNET_HOST_MODE, VMNET_SHARED_MODE):
        raise VmnetError(1003, "vmnet_network_configuration_create")
    # What the C++ checks before any vmnet call.
    if ("subnet" in options) != ("mask" in options):
        raise ValueError("subnet and mask go together")
    for proto, _, address, _ in options.get("port_forwards", []):
        if proto not in ("tcp", "udp"):
            raise ValueError(f"unknown protocol {proto!r}")
        ipaddress.ip_address(address)  # IPv4, or IPv6 (an in6_addr), as the C++
    for mac, ip in options.get("dhcp_reservations", []):
        if len(bytes.fromhex(mac.replace(":", ""))) != 6:
            raise ValueError(f"bad MAC {mac!r}")
        ipaddress.IPv4Address(ip)
    fail = os.environ.get("VMB_FAKE_VMNET_FAIL")
    if fail:
        raise VmnetError(int(fail), "vmnet_network_create")
    CREATED.append((mode, dict(options)))
    print(f"fake vmnet_network_create mode={mode} options={json.dumps(options, sort_keys=True)}", file=sys.stderr, flush=True)
    if "subnet" in options:
        subnet, mask = options["subnet"], options["mask"]
    else:  # vmnet picks the next free /24 and reports the host's address
        subnet, mask = f"192.168.{next(_next_subnet)}.1", "255.255.255.0"
    ipv6 = options.get("ipv6_prefix", f"fd{uuid.uuid4().hex[:2]}:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}::")
    length = options.get("ipv6_prefix_len", 64)
    # What vmnet's serialization is: a dictionary holding opaque data.
    blob = json.dumps({"id": uuid.uuid4().hex, "subnet": subnet, "mask": mask, "ipv6": ipv6, "ipv6_len": length})
    return VmnetNetwork(XpcObject({"networkSerialization": blob.encode()}))


def network_from_serialization(serialization: XpcObject) -> VmnetNetwork:
    if not isinstance(serialization, XpcObject):
        raise TypeError("a serialization is an XpcObject")
    try:
        return VmnetNetwork(serialization)
    except (ValueError, KeyError, TypeError):
        raise VmnetError(1003, "vmnet_network_create_with_serialization") from None


def module() -> types.ModuleType:
    """This fake as a module object standing where ``_native`` stands."""
    return sys.modules[__name__]


# -- command line: a broker or a client process on the fake --------------------


def _install() -> None:
    """Make ``vmnet_broker._native`` this fake, before the package imports it."""
    sys.modules["vmnet_broker._native"] = module()


def _client_main(names: list[str], hold: bool) -> int:
    """Prints like upstream's test.c: "ok", or "fail <step> <code>"; details on stderr."""
    from vmnet_broker import BrokerError, Client
    from vmnet_broker.client import XpcChannel, default_service_name

    client = Client(channel=XpcChannel(default_service_name(), native=module()))
    tokens = []
    for name in names:
        try:
            network = client.acquire_network(name)
        except BrokerError as e:
            print(f"fail acquire_network {e.code}", flush=True)
            return 1
        try:
            network.vmnet_network().close()  # as test.c: the serialization must deserialize
        except VmnetError as e:
            print(f"fail network_from_serialization {e.status}", flush=True)
            return 1
        print(f"{name}: {network.subnet}/{network.mask} gateway {network.gateway}", file=sys.stderr, flush=True)
        tokens.append(network.serialization.description())
    if hold:
        print("held " + json.dumps(tokens), flush=True)
        threading.Event().wait()
    print("ok", flush=True)
    return 0


def _upstream_client_main(names: list[str]) -> int:
    """upstream's client/client.c, line for line: dictionaries and int64 codes only."""
    from vmnet_broker.client import default_service_name

    conn = XpcClient(default_service_name())
    for name in names:
        try:
            reply = conn.send({"command": "acquire", "network_name": name}, ["network"])
        except XpcError:
            print("fail acquire_network 1", flush=True)
            return 1
        if not isinstance(reply, dict):
            print("fail acquire_network 2", flush=True)
            return 1
        error = reply.get("error") if isinstance(reply.get("error"), int) else 0
        if error:
            print(f"fail acquire_network {error}", flush=True)
            return 1
        if reply.get("network") is None:
            print("fail acquire_network 2", flush=True)
            return 1
        network_from_serialization(reply["network"]).close()
    print("ok", flush=True)
    return 0


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    _install()
    if command == "serve":
        from vmnet_broker.cli import main as cli_main

        return cli_main(["serve", *rest])
    if command in ("client", "hold"):
        return _client_main(rest, hold=command == "hold")
    if command == "upstream-client":
        return _upstream_client_main(rest)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
