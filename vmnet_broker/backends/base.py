"""The interface every platform backend implements for the broker."""

from __future__ import annotations

from typing import Any, Protocol

from ..config import NetworkConfig
from ..protocol import Attach


class NetworkHandle(Protocol):
    config: NetworkConfig

    def info(self) -> dict[str, Any]:
        """What ``status`` shows of the network: plain values."""

    def reply_value(self) -> Any:
        """The ``network`` value of an ``acquire`` reply: on Linux the same
        object as ``info()``, on macOS the vmnet serialization."""


class InterfaceHandle(Protocol):
    name: str

    def info(self) -> dict[str, Any]:
        """The ``interface`` object of an ``attach`` reply."""

    def fds(self) -> list[int]:
        """The fds to hand to the client (the reply takes duplicates)."""

    def handed_over(self) -> None:
        """The reply holds its duplicates of ``fds()``: drop what we need no more."""


class Backend(Protocol):
    # The attach kinds this platform hands out (("tap", "dgram") on Linux;
    # none on macOS, where a client starts its own vmnet interface).
    attach_kinds: tuple[str, ...]

    def cleanup_leftovers(self) -> None:
        """Remove what an earlier, crashed broker left behind."""

    def create_network(self, config: NetworkConfig) -> NetworkHandle:
        """Create the network; raises ``CreateError`` (or OSError) on failure."""

    def destroy_network(self, network: NetworkHandle) -> None:
        """Remove the network; tolerates pieces that are already gone."""

    def create_interface(self, network: NetworkHandle, request: Attach) -> InterfaceHandle: ...

    def destroy_interfaces(self, interfaces: list[InterfaceHandle]) -> None:
        """Destroy several at once (a client gone: its interfaces in one batch)."""

    def close(self) -> None:
        """Stop whatever the backend runs itself (after every network is gone)."""


class CreateError(Exception):
    """Creating a network or interface failed for a reason the user can act on.

    The message goes to the client with code 6 (``CREATE_FAILURE``).
    """
