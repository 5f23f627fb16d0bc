"""Type stub for the compiled mechanism module (Linux build).

Mechanism only: every name, limit, MAC address and mode comes from the caller.
Errors from the kernel are ``OSError`` subclasses carrying ``errno``, a message
naming the operation, and ``filename`` set to the object (link name, path).
"""

from collections.abc import Sequence

# -- Unix seqpacket listener -------------------------------------------------

MAX_MESSAGE: int  # 65536: largest request packet accepted
MAX_FDS: int  # most fds accepted on one packet (all are closed anyway)

class ConnectionClosed(ConnectionError):
    """The peer closed its end (EOF) or reset the connection."""

class Listener:
    """An ``AF_UNIX``/``SOCK_SEQPACKET`` socket bound at ``path``.

    The parent directory is created (mode 0755) if missing; a stale socket
    file at ``path`` is replaced; the socket file gets ``mode``.  The socket
    is non-blocking and close-on-exec.
    """

    def __init__(self, path: str, mode: int = 0o660, backlog: int = 128) -> None: ...
    @staticmethod
    def from_fd(fd: int) -> Listener:
        """Adopt an already bound and listening socket (systemd activation)."""
    @property
    def path(self) -> str: ...
    def fileno(self) -> int: ...
    def accept(self) -> Connection | None:
        """Accept one pending connection, or ``None`` if none is waiting."""
    def close(self) -> None:
        """Close the socket and unlink the path (if this listener bound it)."""

class Connection:
    """One accepted client connection (non-blocking, close-on-exec)."""

    @property
    def pid(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    def fileno(self) -> int: ...
    def recv(self) -> tuple[bytes, bool] | None:
        """Read one packet: ``(data, truncated)``, or ``None`` if none waits.

        ``truncated`` is true when the packet was longer than ``MAX_MESSAGE``
        (``data`` is then its first ``MAX_MESSAGE`` bytes).  Any fds the
        client attached are closed.  An empty packet from a connected peer
        comes back as ``(b"", False)``.  Raises ``ConnectionClosed`` on EOF
        or ECONNRESET.
        """
    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one packet with ``fds`` attached as ``SCM_RIGHTS``.

        Never blocks: raises ``BlockingIOError`` if the peer's queue is full,
        ``ConnectionClosed`` if the peer is gone (EPIPE/ECONNRESET).
        """
    def close(self) -> None: ...

# -- rtnetlink (in the calling process's network namespace) -------------------

class Link:
    name: str
    index: int
    kind: str  # IFLA_INFO_KIND ("bridge", "tun", "veth", ...) or ""
    master: int  # ifindex of the bridge it is enslaved to, 0 if none
    mtu: int
    mac: str  # "aa:bb:cc:dd:ee:ff"
    up: bool  # IFF_UP

def create_bridge(name: str, mtu: int = 0) -> int:
    """Create a bridge (down; ``mtu`` 0 keeps the kernel default); its ifindex."""
def set_link_up(name: str, up: bool = True) -> None: ...
def add_address(name: str, address: str, prefix_len: int) -> None:
    """Add an IPv4 or IPv6 address (family from the text); EEXIST is an error."""
def set_master(name: str, master: str) -> None:
    """Enslave ``name`` to bridge ``master`` ("" releases it)."""
def set_mtu(name: str, mtu: int) -> None: ...
def set_mac(name: str, mac: str) -> None: ...
def delete_link(name: str) -> None:
    """Delete a link; ``FileNotFoundError`` (ENODEV) if it does not exist."""
def set_group(name: str, group: int) -> None:
    """Put a link in a link group (``IFLA_GROUP``)."""
def delete_group(group: int) -> None:
    """Delete every link of ``group`` in one request (one unregistration
    batch: ~1 ms a TAP instead of ~20); ``FileNotFoundError`` if none."""
def list_links(prefix: str = "") -> list[Link]:
    """All links whose name starts with ``prefix``, in ifindex order."""
def list_routes(family: int) -> list[tuple[str, int, int]]:
    """``(destination, prefix_len, table)`` of every route in every table
    (``AF_INET`` or ``AF_INET6``), local and policy tables included."""
def list_addresses(family: int) -> list[tuple[str, int, str]]:
    """``(address, prefix_len, ifname)`` of every address of ``family``."""

# -- TAP devices ---------------------------------------------------------------

VNET_HDR_LEN: int  # 12: sizeof(struct virtio_net_hdr_v1)

def tap_offload_flags(vnet_hdr: bool) -> int:
    """TUNSETOFFLOAD flags for a TAP with or without a vnet header (pure)."""

class Tap:
    """A TAP device: ``IFF_TAP | IFF_NO_PI`` (+ ``IFF_VNET_HDR``, ``IFF_MULTI_QUEUE``).

    ``name`` may be a template such as ``"vmb%d"``; the kernel's chosen name
    is in ``.name``.  ``queues`` > 1 opens that many fds on one device.  With
    ``netns`` (a path such as ``/run/netns/NAME``) the device is created in
    that network namespace (from a short-lived native thread that joins it).
    fds are non-blocking and close-on-exec.  The device is not persistent: it
    disappears when its last fd is closed, or when deleted by netlink.
    """

    def __init__(
        self,
        name: str,
        vnet_hdr: bool = False,
        queues: int = 1,
        netns: str | None = None,
    ) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def vnet_hdr(self) -> bool: ...
    def fds(self) -> list[int]:
        """The queue fds (still owned by this object)."""
    def close(self) -> None:
        """Close every fd this object still owns (idempotent)."""
    def __enter__(self) -> Tap: ...
    def __exit__(self, *exc: object) -> None: ...

# -- Frame pump ----------------------------------------------------------------

class Pump:
    """A native thread moving frames both ways between two fds.

    Each fd is a TAP (read/write, one frame per call) or a datagram socket
    (batched with recvmmsg/sendmmsg).  The fds are dup'ed: the caller keeps
    and closes its own.  Frames are copied unchanged (a vnet header, if any,
    passes through).  The thread never touches Python objects.
    """

    def __init__(self, a: int, b: int) -> None: ...
    def stop(self) -> None:
        """Stop and join the thread (releases the GIL); idempotent."""
    @property
    def running(self) -> bool: ...
    def stats(self) -> dict[str, int]:
        """Counters: ``a_to_b_frames``, ``a_to_b_bytes``, ``a_to_b_drops``,
        ``b_to_a_frames``, ``b_to_a_bytes``, ``b_to_a_drops``."""
