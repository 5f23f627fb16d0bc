"""The wire protocol: request validation and reply encoding (pure functions).

A request comes in as JSON bytes (Linux) or as an XPC dictionary already
turned into plain values (macOS); a validated request or a ``ProtocolError``
goes out.  Replies are plain dictionaries that each transport encodes.  Nothing
here touches sockets or state, so every rule of PROTOCOL.md is checked by unit
tests, and the broker can trust what it is handed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Union

from .errors import Code

MAX_MESSAGE = 65536
MAX_QUEUES = 16
# Bound of status paging's "offset" and "limit" (rows: networks, attachments, names).
MAX_STATUS_ROWS = 10_000_000
# Set by the native XPC listener on a request dictionary it could not convert.
INVALID_KEY = "__invalid__"
KINDS = ("tap", "dgram")

# JSON scalars an "id" may be; objects and arrays are refused.
Scalar = Union[str, int, float, bool, None]

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


class ProtocolError(Exception):
    """A request that must be refused with ``code``; ``str()`` says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # Set once the request's "id" is known, so the error reply echoes it.
        self.request_id: Scalar = None
        self.has_id = False

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.request_id, self.has_id)

    def reply(self) -> bytes:
        return encode(self.body())


@dataclass(frozen=True)
class Acquire:
    network_name: str


@dataclass(frozen=True)
class Release:
    network_name: str


@dataclass(frozen=True)
class Attach:
    network_name: str
    kind: str = "tap"
    mac: str | None = None
    vnet_hdr: bool = False
    queues: int = 1
    # A TAP that outlives its fds, opened by name by the VMM (Firecracker);
    # no fd is handed over.
    persist: bool = False
    # Who may open a persistent TAP: the requesting peer's uid, set by the
    # broker from SO_PEERCRED, never read from the request.
    owner_uid: int | None = None


@dataclass(frozen=True)
class Detach:
    interface: str


@dataclass(frozen=True)
class Status:
    # Paging (our extension): the first row, and at most this many rows
    # (None: as many as fit one reply).
    offset: int = 0
    limit: int | None = None


Command = Union[Acquire, Release, Attach, Detach, Status]


@dataclass(frozen=True)
class Request:
    command: Command
    id: Scalar = None
    has_id: bool = False


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(Code.INVALID_REQUEST, message)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_request(data: bytes, truncated: bool = False) -> Request:
    """Validate one JSON packet (Linux); raises ``ProtocolError`` with code 4 if malformed."""
    if truncated or len(data) > MAX_MESSAGE:
        raise _invalid(f"request larger than {MAX_MESSAGE} bytes")
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _invalid(f"request is not UTF-8 JSON: {e}") from None
    return parse_message(obj)


def parse_message(obj: object) -> Request:
    """Validate one decoded request: a JSON object, or an XPC dictionary as plain values."""
    if not isinstance(obj, dict):
        raise _invalid(f"request must be a JSON object, not {type(obj).__name__}")

    has_id = "id" in obj
    request_id = obj.get("id")
    if not isinstance(request_id, (str, int, float, bool, type(None))):
        raise _invalid("'id' must be a JSON scalar")
    if isinstance(request_id, float) and not math.isfinite(request_id):
        # 1e400 parses as inf, which has no JSON spelling to echo back.
        raise _invalid("'id' must be a finite number")

    try:
        command = _parse_command(obj)
    except ProtocolError as e:
        e.request_id, e.has_id = request_id, has_id
        raise
    return Request(command, request_id, has_id)


def _string(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        if key not in obj:
            raise _invalid(f"missing '{key}'")
        raise _invalid(f"'{key}' must be a string")
    # An empty name is well-formed, just not found (5), as upstream answers.
    return value


def _parse_command(obj: dict[str, Any]) -> Command:
    command = obj.get("command")
    if not isinstance(command, str):
        raise _invalid("missing 'command'" if "command" not in obj else "'command' must be a string")
    if command == "acquire":
        return Acquire(_string(obj, "network_name"))
    if command == "release":
        return Release(_string(obj, "network_name"))
    if command == "detach":
        return Detach(_string(obj, "interface"))
    if command == "status":
        return _parse_status(obj)
    if command == "attach":
        return _parse_attach(obj)
    raise _invalid(f"unknown command {command!r}")


def _parse_status(obj: dict[str, Any]) -> Status:
    offset = obj.get("offset", 0)
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= MAX_STATUS_ROWS:
        raise _invalid(f"'offset' must be an integer between 0 and {MAX_STATUS_ROWS}")
    limit = obj.get("limit")
    if limit is not None and (
        not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_STATUS_ROWS
    ):
        raise _invalid(f"'limit' must be an integer between 1 and {MAX_STATUS_ROWS}")
    return Status(offset, limit)


def _parse_attach(obj: dict[str, Any]) -> Attach:
    name = _string(obj, "network_name")

    kind = obj.get("kind", "tap")
    if kind not in KINDS:
        raise _invalid(f"'kind' must be one of {', '.join(KINDS)}")

    mac = obj.get("mac")
    if mac is not None:
        mac = normalize_mac(mac)

    vnet_hdr = obj.get("vnet_hdr", False)
    if not isinstance(vnet_hdr, bool):
        raise _invalid("'vnet_hdr' must be true or false")

    queues = obj.get("queues", 1)
    # bool is an int in Python, never a queue count on the wire.
    if not isinstance(queues, int) or isinstance(queues, bool):
        raise _invalid("'queues' must be an integer")
    if not 1 <= queues <= MAX_QUEUES:
        raise _invalid(f"'queues' must be between 1 and {MAX_QUEUES}")
    if queues > 1 and kind != "tap":
        raise _invalid("'queues' > 1 needs kind 'tap'")

    persist = obj.get("persist", False)
    if not isinstance(persist, bool):
        raise _invalid("'persist' must be true or false")
    if persist:
        # The kernel takes IFF_VNET_HDR from the TUNSETIFF of the VMM that
        # opens it by name, so a vnet_hdr asked for here would mean nothing;
        # one queue, because single-queue VMMs (Firecracker) cannot attach
        # to a multiqueue device.
        if kind != "tap":
            raise _invalid("'persist' needs kind 'tap'")
        if vnet_hdr:
            raise _invalid("a 'persist' TAP takes no 'vnet_hdr': the VMM that opens it sets IFF_VNET_HDR itself")
        if queues > 1:
            raise _invalid("a 'persist' TAP has one queue")

    return Attach(name, kind, mac, vnet_hdr, queues, persist)


def normalize_mac(mac: object) -> str:
    """Lower-case ``aa:bb:cc:dd:ee:ff`` of a unicast, non-zero MAC address."""
    if not isinstance(mac, str) or not _MAC.fullmatch(mac.lower()):
        raise _invalid("'mac' must look like 52:54:00:12:34:56")
    mac = mac.lower()
    if int(mac[:2], 16) & 1:
        raise _invalid(f"'mac' {mac} is a multicast address")
    if mac == "00:00:00:00:00:00":
        raise _invalid("'mac' must not be all zeros")
    return mac


def reply_body(body: dict[str, Any], request: Request | None = None) -> dict[str, Any]:
    """A success reply as plain values, echoing the request's ``id`` if it had one."""
    reply = dict(body)
    if request is not None and request.has_id:
        reply["id"] = request.id
    return reply


def error_body(code: int, message: str | None = None, request_id: Scalar = None, has_id: bool = False) -> dict[str, Any]:
    """A failure reply: ``error`` (upstream's int64 code), and our readable ``message``."""
    reply: dict[str, Any] = {"error": int(code)}
    if message:
        reply["message"] = message
    if has_id:
        reply["id"] = request_id
    return reply


def encode(body: dict[str, Any]) -> bytes:
    """A reply body as one JSON packet (the Linux transport)."""
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def encode_reply(body: dict[str, Any], request: Request | None = None) -> bytes:
    return encode(reply_body(body, request))
