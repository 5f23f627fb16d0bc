"""Choosing IPv4 subnets that collide with nothing (pure functions).

A network without a configured subnet gets the first /24 of ``POOL`` that
overlaps no address and no route of the broker's namespace (all routing
tables: VPNs put theirs in policy tables) and no other broker network.  The
last choice for a name is preferred, so guests keep their addresses across
broker restarts, unless it now collides (or is not a private /24: a state
file someone edited).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator

IPv4Network = ipaddress.IPv4Network

# 192.168.105.0/24 is where lima's socket_vmnet starts; the pool then walks
# up through 192.168.254.0/24.  Users with a clash configure a subnet.
POOL_FIRST = IPv4Network("192.168.105.0/24")
POOL_LAST = IPv4Network("192.168.254.0/24")


def pool() -> Iterator[IPv4Network]:
    first = int(POOL_FIRST.network_address) >> 8
    last = int(POOL_LAST.network_address) >> 8
    for n in range(first, last + 1):
        yield IPv4Network((n << 8, 24))


# RFC 1918: the only space the broker chooses from (its pool is inside it).
PRIVATE = (IPv4Network("10.0.0.0/8"), IPv4Network("172.16.0.0/12"), IPv4Network("192.168.0.0/16"))


def is_private_24(net: IPv4Network) -> bool:
    """A /24 inside RFC 1918 space: what ``choose`` returns, so what a remembered choice may be."""
    return net.prefixlen == 24 and any(net.subnet_of(space) for space in PRIVATE)


def is_default_route(net: IPv4Network) -> bool:
    return net.prefixlen == 0


def conflict(candidate: IPv4Network, taken: Iterable[IPv4Network]) -> IPv4Network | None:
    """The first of ``taken`` that overlaps ``candidate`` (default routes never do)."""
    for other in taken:
        if not is_default_route(other) and candidate.overlaps(other):
            return other
    return None


def choose(taken: Iterable[IPv4Network], previous: IPv4Network | None = None) -> IPv4Network | None:
    """A free /24: ``previous`` if still free, else the first free one of the pool."""
    taken = list(taken)
    if previous is not None and is_private_24(previous) and conflict(previous, taken) is None:
        return previous
    for candidate in pool():
        if conflict(candidate, taken) is None:
            return candidate
    return None
