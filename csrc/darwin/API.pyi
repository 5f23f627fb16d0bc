"""The macOS build of ``vmnet_broker._native`` (csrc/module_darwin.cpp).

This is the contract between the C++ mechanism in csrc/darwin/ and the Python
policy; tests on Linux replace exactly these names with an in-process fake
(tests/fake_darwin.py), so both sides must keep to it.  It is merged into
vmnet_broker/_native.pyi under ``if sys.platform == "darwin":``.

Mechanism only: every name, limit and mode comes from the caller.

Values crossing the boundary (XPC messages, both ways) are plain Python:

    Value = None | bool | int | float | str | bytes | list[Value]
            | dict[str, Value] | XpcObject

XPC -> Python: null -> None, bool, int64 and uint64 -> int, double -> float,
string -> str (invalid UTF-8 is replaced with U+FFFD), data -> bytes, array ->
list, dictionary -> dict; anything else (the vmnet serialization among others)
-> XpcObject.  Conversion stops at depth 8 and at 1024 entries per container;
deeper or larger content raises ValueError on the sending side and, on the
receiving side (requests from peers), the request arrives as
``{"__invalid__": "<reason>"}`` so policy can answer code 4.

Python -> XPC: None -> xpc_null, bool -> bool, int -> int64 (ValueError outside
int64), float -> double, str -> string (must not contain NUL), bytes -> data,
list/tuple -> array, dict with str keys -> dictionary, XpcObject -> the object
itself (retained by the container).
"""

PLATFORM: str  # "darwin" here; the Linux build has PLATFORM = "linux"

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
    def send(self, message: dict[str, object]) -> object:
        """xpc_connection_send_message_with_reply_sync (GIL released).  The
        reply converted to plain values (a dict for a dictionary reply).
        Raises XpcError when the reply is an XPC error object; ValueError if
        ``message`` cannot be converted; OSError after close()."""
    def close(self) -> None:
        """Cancel and release the connection; idempotent."""
