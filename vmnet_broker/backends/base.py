"""The interface every platform backend implements for the broker."""

from __future__ import annotations

from collections.abc import Awaitable
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

    # Optional: ``ready``, an asyncio future done once the interface may be
    # used (Linux: the bridge filter guards its port); the attach reply waits
    # for it, and if it fails the interface is destroyed and the reply is
    # code 6.  ``forged()`` and ``buffers()``: extra status (broker.py).


class Backend(Protocol):
    # The attach kinds this platform hands out (("tap", "dgram") on Linux;
    # none on macOS, where a client starts its own vmnet interface).
    attach_kinds: tuple[str, ...]

    def cleanup_leftovers(self) -> None:
        """Remove what an earlier, crashed broker left behind."""

    def create_network(self, config: NetworkConfig) -> NetworkHandle | Awaitable[NetworkHandle]:
        """Create the network; raises ``CreateError`` (or OSError) on failure.

        May return an awaitable instead (Linux: it runs ``nft`` and dnsmasq,
        which the loop must not wait for); the broker serves other clients
        meanwhile (see broker.py).
        """

    def destroy_network(self, network: NetworkHandle) -> None | Awaitable[None]:
        """Remove the network; tolerates pieces that are already gone (may return an awaitable too)."""

    def create_interface(self, network: NetworkHandle, request: Attach) -> InterfaceHandle: ...

    def destroy_interfaces(self, interfaces: list[InterfaceHandle]) -> None:
        """Destroy several at once (a client gone: its interfaces in one batch)."""

    def close(self) -> None:
        """Stop whatever the backend runs itself (after every network is gone)."""


class CreateError(Exception):
    """Creating a network or interface failed for a reason the user can act on.

    The message goes to the client with code 6 (``CREATE_FAILURE``).
    """
