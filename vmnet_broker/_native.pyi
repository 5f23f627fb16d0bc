"""Type stub for the compiled mechanism module ``vmnet_broker._native``.

One module name, two builds: csrc/module.cpp on Linux (the seqpacket
listener, rtnetlink, TAP devices, the frame pump) and csrc/module_darwin.cpp
on macOS (the XPC listener and client, vmnet networks).  ``PLATFORM`` says
which.  Mechanism only: every name, limit, MAC address and mode comes from
the caller.  Errors from the OS are ``OSError`` subclasses carrying ``errno``,
a message naming the operation, and ``filename`` set to the object.

On macOS, values crossing the boundary (XPC messages, both ways) are plain
Python:  None | bool | int | float | str | bytes | list | dict[str, ...] |
XpcObject.  XPC -> Python: null, bool, int64 and uint64 (one above the int64
range stays an XpcObject), double, string (invalid UTF-8 replaced), data,
array, dictionary; anything else (the vmnet serialization among others) is an
XpcObject.  Conversion stops at depth 8 and 1024 entries per container: a
request beyond that arrives with an empty message and ``invalid`` set to the
reason (a field of the event, so no key a peer sends can forge it); a reply beyond it
raises ValueError.
"""

import sys
from collections.abc import Sequence

PLATFORM: str  # "linux" or "darwin"

if sys.platform == "darwin":
    # -- errors -------------------------------------------------------------------

    class VmnetError(OSError):
        """A vmnet call failed.

        ``status`` is the vmnet_return_t value (1001...), ``status_name`` its
        constant's name ("VMNET_SHARING_SERVICE_BUSY"; "VMNET_STATUS_<n>" for a
        value vmnet does not document), ``operation`` the vmnet function.
        ``str()`` is "vmnet_network_create: VMNET_SHARING_SERVICE_BUSY (1009)".
        """

        status: int
        status_name: str
        operation: str

    class XpcError(ConnectionError):
        """XPC answered with an error object instead of a reply.

        ``description`` is the error's XPC_ERROR_KEY_DESCRIPTION ("Connection
        invalid", "Connection interrupted", ...).
        """

        description: str

    def vmnet_status_name(status: int) -> str:
        """The constant's name for a vmnet_return_t value (pure)."""

    # -- XPC objects ---------------------------------------------------------------

    class XpcObject:
        """An owned reference to an XPC object (xpc_retain'ed, released when the
        Python object is collected).  Opaque to Python: it can be compared by
        identity of the underlying object and handed back to XPC or vmnet."""

        @property
        def type_name(self) -> str:
            """"dictionary", "data", "string", ..., from xpc_get_type's name."""
        def description(self) -> str:
            """xpc_copy_description of the object (for logs)."""
        def pointer(self) -> int:
            """The raw ``xpc_object_t`` (borrowed: valid while this object lives),
            for ctypes or PyObjC."""
        def __eq__(self, other: object) -> bool:
            """Same underlying XPC object (pointer identity)."""
        def __hash__(self) -> int: ...

    def xpc_transaction_begin() -> None:
        """Tell launchd the process has work (EnableTransactions)."""

    def xpc_transaction_end() -> None: ...

    # -- the broker's XPC listener --------------------------------------------------

    class XpcEvent:
        """One event from the listener.

        kind:
          "peer"        a new peer connection (activated): peer, pid, uid, gid
          "request"     a dictionary from a peer: peer, request, message
          "gone"        XPC_ERROR_CONNECTION_INVALID on a peer: peer.  No further
                        event for that peer follows.
          "error"       another error on a peer (peer > 0) or on the listener
                        (peer == 0; fatal: the listener is unusable): description
          "terminating" XPC_ERROR_TERMINATION_IMMINENT: description
        """

        kind: str
        peer: int  # listener-chosen id, never reused; 0 for the listener itself
        pid: int
        uid: int  # euid
        gid: int  # egid
        request: int  # id of a "request" event, to reply to; 0 otherwise
        message: dict[str, object]  # the request's dictionary as plain values; {} otherwise
        invalid: str  # why a "request" could not be converted ("" when it could)
        description: str

    class XpcListener:
        """A Mach-service listener (XPC_CONNECTION_MACH_SERVICE_LISTENER) on one
        private serial dispatch queue, activated on construction.

        Every peer gets an event handler and is activated; the handlers only
        convert and queue events and write a byte to a pipe (never taking the
        GIL).  ``fileno()`` is that pipe's read end: readable while events wait.
        Raises OSError if the listener cannot be created.
        """

        def __init__(self, service_name: str) -> None: ...
        @property
        def service_name(self) -> str: ...
        def fileno(self) -> int: ...
        def drain(self) -> list[XpcEvent]:
            """Every queued event, oldest first (never blocks; [] if none)."""
        def reply(self, request: int, message: dict[str, object]) -> bool:
            """Answer request ``request`` with ``message`` (a dictionary made by
            xpc_dictionary_create_reply on the original request, filled from
            ``message``, sent on the peer's connection).  Each request is answered
            at most once; False if the request had no reply context, was already
            answered, or its peer is gone.  ValueError if ``message`` cannot be
            converted (nothing is sent; the request is still pending)."""
        def discard(self, request: int) -> None:
            """Drop a request without answering (releases it)."""
        def cancel_peer(self, peer: int) -> None:
            """xpc_connection_cancel a peer; a "gone" event follows."""
        def close(self) -> None:
            """Cancel the listener and every peer, release every pending request;
            waits for the queue to drain (GIL released).  Idempotent."""

    # -- vmnet networks (macOS 26) ------------------------------------------------

    VMNET_HOST_MODE: int  # 1000
    VMNET_SHARED_MODE: int  # 1001

    class VmnetNetwork:
        """An owned vmnet_network_ref (CFRelease on close or collection).

        Made by ``create_network`` (the broker: it also holds the serialization
        made once with vmnet_network_copy_serialization) or by
        ``network_from_serialization`` (a client)."""

        def serialization(self) -> XpcObject:
            """The serialization made at creation (the same object every call);
            for a network made from a serialization, that serialization."""
        def ipv4_subnet(self) -> tuple[str, str]:
            """``(address, mask)`` from vmnet_network_get_ipv4_subnet, dotted quads."""
        def ipv6_prefix(self) -> tuple[str, int]:
            """``(prefix, length)`` from vmnet_network_get_ipv6_prefix; ("", 0) if none."""
        def pointer(self) -> int:
            """The raw ``vmnet_network_ref`` (borrowed), for ctypes or PyObjC."""
        def close(self) -> None:
            """Release the network (and our serialization) now; idempotent."""

    def create_network(
        mode: int,
        *,
        subnet: str | None = None,  # IPv4 address passed as given to set_ipv4_subnet
        mask: str | None = None,  # required with subnet
        ipv6_prefix: str | None = None,
        ipv6_prefix_len: int = 0,  # required with ipv6_prefix
        mtu: int = 0,  # 0: vmnet's default
        external_interface: str | None = None,
        nat44: bool = True,
        nat66: bool = True,
        dhcp: bool = True,
        dns_proxy: bool = True,
        router_advertisement: bool = True,
        port_forwards: list[tuple[str, int, str, int]] = [],  # (proto "tcp"|"udp", external_port, internal_address, internal_port)
        dhcp_reservations: list[tuple[str, str]] = [],  # (mac "aa:bb:..", ipv4)
    ) -> VmnetNetwork:
        """vmnet_network_configuration_create + setters + vmnet_network_create +
        vmnet_network_copy_serialization, all on one serial dispatch queue (GIL
        released).  Raises VmnetError naming the failing call and status;
        ValueError for an unparsable address/MAC/protocol (before any vmnet call)."""

    def network_from_serialization(serialization: XpcObject) -> VmnetNetwork:
        """vmnet_network_create_with_serialization (GIL released); VmnetError on failure."""

    # -- the client's XPC connection ----------------------------------------------

    class XpcClient:
        """A connection to a Mach service (xpc_connection_create_mach_service with
        flags 0, or XPC_CONNECTION_MACH_SERVICE_PRIVILEGED), on its own serial
        queue, with an event handler that ignores events, activated.  Connecting
        is lazy in XPC: errors show up on the first send."""

        def __init__(self, service_name: str, privileged: bool = False) -> None: ...
        def send(self, message: dict[str, object], opaque: Sequence[str] = ()) -> object:
            """xpc_connection_send_message_with_reply_sync (GIL released).  The
            reply converted to plain values (a dict for a dictionary reply),
            except the values of the top-level keys in ``opaque``, which stay
            XpcObjects: a vmnet serialization is a dictionary that must reach
            vmnet again as it came.  Raises XpcError when the reply is an XPC
            error object; ValueError if ``message`` or the reply cannot be
            converted; OSError after close()."""
        def close(self) -> None:
            """Cancel and release the connection; idempotent."""

else:
    # -- Unix seqpacket listener -------------------------------------------------

    MAX_MESSAGE: int  # 65536: largest request packet accepted
    MAX_FDS: int  # 253 (SCM_MAX_FD): every fd a packet can carry is received, then closed off-thread
    MAX_CLOSER_THREADS: int  # 8: threads closing what clients sent, started as needed

    class ConnectionClosed(ConnectionError):
        """The peer closed its end (EOF) or reset the connection."""

    class Listener:
        """An ``AF_UNIX``/``SOCK_SEQPACKET`` socket bound at ``path``.

        The parent directory is created (mode 0755) if missing; a stale socket
        file at ``path`` is replaced; the socket file gets ``mode``.  The socket
        is non-blocking and close-on-exec.
        """

        def __init__(self, path: str, mode: int = 0o660, backlog: int = 128) -> None:
            """``backlog`` above ``/proc/sys/net/core/somaxconn`` is cut to it by the kernel."""
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
            client attached are closed on closer threads (``closer_stats``),
            never here: a close can wait (a lingering socket, a FUSE file), and
            this runs on the event loop.  An empty packet from a connected peer
            comes back as ``(b"", False)``.  Raises ``ConnectionClosed`` on EOF
            or ECONNRESET.
            """
        def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
            """Send one packet with ``fds`` attached as ``SCM_RIGHTS``.

            Never blocks: raises ``BlockingIOError`` if the peer's queue is full,
            ``ConnectionClosed`` if the peer is gone (EPIPE/ECONNRESET).
            """
        def close(self) -> None:
            """Drop the packets still queued (their fds to the closer), then close the
            socket on a closer thread; never blocks.  Idempotent."""

    def closer_stats() -> dict[str, int]:
        """``pending`` (fds handed to the closer threads, not closed yet), ``closed``, ``threads``."""
    def closer_wait_idle(timeout_ms: int) -> bool:
        """Wait (without the GIL) until nothing is pending on the closer threads; False on timeout."""

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
    def set_master(name: str, master: str | int) -> None:
        """Enslave ``name`` to bridge ``master``: a name ("" releases it), or
        an ifindex (0 releases it), which names the bridge the broker made
        even if another link has taken its name since."""
    def set_mtu(name: str, mtu: int) -> None: ...
    def set_mac(name: str, mac: str) -> None: ...
    def delete_link(link: str | int) -> None:
        """Delete a link by name or ifindex; ``FileNotFoundError`` (ENODEV) if it does not exist."""
    def get_link(index: int) -> Link:
        """The link of ifindex ``index``; ``FileNotFoundError`` (ENODEV) if it is gone."""
    def set_group(link: str | int, group: int) -> None:
        """Put a link (name or ifindex) in a link group (``IFLA_GROUP``)."""
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

    class Monitor:
        """A netlink socket subscribed to link, IPv4/IPv6 address and IPv4/IPv6
        route changes in this network namespace (non-blocking, close-on-exec).
        Wait for ``fileno()`` to be readable, then ``drain()``."""

        def __init__(self, receive_buffer: int = 4 * 1024 * 1024) -> None: ...
        def fileno(self) -> int: ...
        @property
        def closed(self) -> bool: ...
        def drain(self, max_events: int = 4096) -> list[tuple[str, int, str, int, str, int, int, bool]]:
            """Queued events, oldest first, never blocking: ``(kind, index, name,
            family, address, prefix_len, table, up)``.  ``kind``: ``newlink``/
            ``dellink`` (index, name, up), ``newaddr``/``deladdr`` (index,
            family, address, prefix_len), ``newroute``/``delroute`` (family,
            destination address, prefix_len, table, output link index or 0), or
            ``overrun``: events were lost, read the state afresh."""
        def close(self) -> None: ...

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
        fds are non-blocking and close-on-exec.  Unless made persistent, the device
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
        def make_persistent(self, owner: int, group: int | None = None) -> None:
            """TUNSETOWNER (and TUNSETGROUP if ``group``), then TUNSETPERSIST: the device
            outlives its fds, and ``owner`` may attach to it by name; only deleting it
            by netlink removes it then.  Call while an fd is open."""
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

        def __init__(self, a: int, b: int, frame_size: int = ...) -> None:
            """Frames longer than ``frame_size`` (default ``MAX_FRAME_SIZE``) are dropped
            and counted; the buffers hold ``pump_batch_frames(frame_size)`` frames,
            mapped, and go back to the kernel once the pump is quiet."""
        def stop(self) -> None:
            """Stop and join the thread (releases the GIL); its fds go to the closer. Idempotent."""
        @property
        def running(self) -> bool: ...
        def stats(self) -> dict[str, int]:
            """Counters: ``a_to_b_frames``, ``a_to_b_bytes``, ``a_to_b_drops``,
            ``b_to_a_frames``, ``b_to_a_bytes``, ``b_to_a_drops``; ``buffer_bytes``
            (frame buffers mapped), ``buffer_held`` (touched since last given back),
            ``buffer_releases``, ``fds_closed`` (fds that came with frames)."""

    MAX_FRAME_SIZE: int  # 65792: a 64 KiB GSO frame, vnet header, Ethernet and VLAN headers
    PUMP_BUFFER_BUDGET: int  # 262144: most bytes of frame buffers one pump maps

    def pump_frame_size(mtu: int, vnet_hdr: bool) -> int:
        """The longest frame on a network of ``mtu`` (pure): ``mtu`` + 22, or
        ``MAX_FRAME_SIZE`` with a vnet header."""
    def pump_batch_frames(frame_size: int) -> int:
        """Frames a pump buffers for ``frame_size`` (pure): 1-32, within ``PUMP_BUFFER_BUDGET``."""
