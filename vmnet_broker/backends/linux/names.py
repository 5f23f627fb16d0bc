"""Names of everything the Linux backend creates, from one fixed prefix.

The same helpers name new objects and recognise leftovers of a crashed broker,
so anything the broker made can be found and removed.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

PREFIX = "vmb-"
BRIDGE = PREFIX + "br"  # vmb-br0, vmb-br1, ...
TAP_TEMPLATE = PREFIX + "t%d"  # a VM's TAP, fd handed to the client
DGRAM_TEMPLATE = PREFIX + "d%d"  # the broker's TAP behind a dgram attachment
PERSIST = PREFIX + "p"  # vmb-p0, ...: a persistent TAP a VMM opens by name
NFT_TABLE = "vmnet_broker"
# Link groups used to delete many TAPs in one batch ("vmb" + a counter).
LINK_GROUP_BASE = 0x766D6200


def is_ours(ifname: str) -> bool:
    return ifname.startswith(PREFIX)


def free_bridge_name(existing: set[str]) -> str:
    """The lowest ``vmb-brN`` not in ``existing``."""
    return free_name(BRIDGE, existing)


def free_name(base: str, existing: set[str]) -> str:
    """The lowest ``<base>N`` not in ``existing``."""
    n = 0
    while f"{base}{n}" in existing:
        n += 1
    return f"{base}{n}"


def random_mac() -> str:
    """A random locally administered unicast MAC address.

    Never ``fe:`` or ``fa:`` first: those are the host sides' (below).
    """
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    if octets[0] in HOST_SIDE_FIRST_OCTETS:
        octets[0] ^= 0x10  # fe -> ee, fa -> ea: still local unicast
    return ":".join(f"{b:02x}" for b in octets)


HOST_SIDE_FIRST_OCTETS = (0xFE, 0xFA)


def host_side_mac(guest_mac: str) -> str:
    """The TAP device's own MAC for a guest MAC, as libvirt does (``fe:`` first).

    The TAP is the host's end of the cable; if it carried the guest's MAC, the
    bridge would treat frames for the guest as its own and never deliver
    them.  So the two must differ: ``fe``, or ``fa`` for a guest MAC that
    itself starts with ``fe``.  ``fe`` also keeps the bridge from adopting a
    port's MAC as its address.
    """
    first = "fa" if guest_mac.startswith("fe") else "fe"
    return first + guest_mac[2:]


def link_groups() -> Iterator[int]:
    """Fresh link-group ids, cycling through 256 of our own."""
    return (LINK_GROUP_BASE + (n % 256) for n in itertools.count())
