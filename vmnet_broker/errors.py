"""Error codes of the vmnet-broker protocol and the exceptions that carry them.

The codes and the messages are upstream's (``include/vmnet-broker.h`` and
``vmnet_broker_strerror`` in ``client/client.c``), so a user sees the same text
whichever client library their launcher uses.
"""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    SUCCESS = 0
    XPC_FAILURE = 1
    INVALID_REPLY = 2
    NOT_ALLOWED = 3
    INVALID_REQUEST = 4
    NOT_FOUND = 5
    CREATE_FAILURE = 6
    INTERNAL_ERROR = 7


MESSAGES: dict[int, str] = {
    Code.SUCCESS: "Broker session started",
    Code.XPC_FAILURE: "Failed to send XPC message to broker",
    Code.INVALID_REPLY: "Broker returned invalid reply",
    Code.NOT_ALLOWED: "You are not allowed to create a network",
    Code.INVALID_REQUEST: "Invalid broker request",
    Code.NOT_FOUND: "Network name not found",
    Code.CREATE_FAILURE: "Failed to create network",
    Code.INTERNAL_ERROR: "Internal or unknown error",
}


def strerror(code: int) -> str:
    """Upstream's ``vmnet_broker_strerror``."""
    return MESSAGES.get(code, "(unknown status)")


class BrokerError(Exception):
    """A request failed; ``code`` is the protocol's error code.

    ``str(err)`` is upstream's message for the code, followed by the broker's
    own explanation when it sent one.
    """

    code: int = Code.INTERNAL_ERROR

    def __init__(self, detail: str | None = None, *, code: int | None = None) -> None:
        if code is not None:
            self.code = code
        self.detail = detail
        text = strerror(self.code)
        super().__init__(f"{text}: {detail}" if detail else text)


class ConnectionFailed(BrokerError):
    code = Code.XPC_FAILURE


class InvalidReply(BrokerError):
    code = Code.INVALID_REPLY


class NotAllowed(BrokerError):
    code = Code.NOT_ALLOWED


class InvalidRequest(BrokerError):
    code = Code.INVALID_REQUEST


class NotFound(BrokerError):
    code = Code.NOT_FOUND


class CreateFailed(BrokerError):
    code = Code.CREATE_FAILURE


class InternalError(BrokerError):
    code = Code.INTERNAL_ERROR


_BY_CODE: dict[int, type[BrokerError]] = {
    cls.code: cls
    for cls in (
        ConnectionFailed,
        InvalidReply,
        NotAllowed,
        InvalidRequest,
        NotFound,
        CreateFailed,
        InternalError,
    )
}


def error_for(code: int, detail: str | None = None) -> BrokerError:
    """The exception for a code received from the broker."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return BrokerError(detail, code=code)
    return cls(detail)
