"""What changes behind the broker's back, noticed through netlink.

Root, or a daemon such as a VPN client, can change the namespace under a
live network: delete or rename its bridge, set it down, flush the gateway
address, add a route that overlaps the subnet.  The broker cannot undo all
of that, and must not fight an administrator who did it on purpose; it must
notice, say so, and never act on something it did not create.

So each network records its bridge by ifindex (names are reused: after
``ip link del vmb-br0`` the next bridge of that name is someone else's), and
a ``Watcher`` on the event loop reads the kernel's link, address and route
events (``_native.Monitor``) and keeps each network's ``Problems`` up to date:

- the bridge deleted (or moved to another namespace): the network is
  degraded for good; it takes no more interfaces, its dnsmasq is stopped
  (it would bind to the next link of that name), and removing it deletes
  nothing but what still has its ifindex;
- the bridge renamed or set down, the gateway address removed (IPv4 ``.1``
  or IPv6 ``::1``): degraded until someone puts it back, which clears it.
  The broker does not restore them itself, as libvirt does not: whoever
  removed them meant it, or will find the network marked;
- a route in any table (VPNs use policy tables) that overlaps the network's
  subnet or IPv6 prefix and does not go through its own bridge: degraded
  while the route exists.  New networks avoid such routes anyway: the
  subnet choice reads every table's routes at creation (``_taken``).

Each problem is logged when it appears and when it goes.  Events arrive
in order; one that says events were lost ("overrun") makes the watcher
read the state afresh from the kernel.  Everything here runs on the loop's
thread (``poll`` from its reader callback, and from the backend before it
acts on a network), like the rest of the policy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from ... import _native

if TYPE_CHECKING:
    from . import LinuxNetwork

log = logging.getLogger(__name__)

LOCAL_TABLE = 255  # the host's own addresses and broadcasts: the address events say more
# A reason longer than this is cut (a dnsmasq error quotes its log).
MAX_REASON = 300


class Event(NamedTuple):
    """One ``_native.Monitor.drain()`` tuple, with names."""

    kind: str  # newlink dellink newaddr deladdr newroute delroute overrun
    index: int
    name: str
    family: int
    address: str
    prefix_len: int
    table: int
    up: bool


class Problems:
    """Why a network is degraded, one reason per key; ``text`` for ``status``.

    A reason is a string, or a function giving one (a countdown).  A deleted
    bridge says everything: while it is set, it is the only reason shown.
    """

    BRIDGE_GONE = "bridge gone"

    def __init__(self, network_name: str) -> None:
        self._name = network_name
        self._reasons: dict[str, str | Callable[[], str]] = {}

    def set(self, key: str, reason: str | Callable[[], str], *, quiet: bool = False) -> None:
        new = key not in self._reasons
        self._reasons[key] = reason
        if new and not quiet:
            log.warning("network %r degraded: %s", self._name, _render(reason))

    def clear(self, key: str, why: str = "") -> bool:
        if self._reasons.pop(key, None) is None:
            return False
        if why:
            log.info("network %r: %s", self._name, why)
        return True

    def has(self, key: str) -> bool:
        return key in self._reasons

    def keys(self) -> list[str]:
        return list(self._reasons)

    @property
    def bridge_gone(self) -> bool:
        return self.BRIDGE_GONE in self._reasons

    def text(self) -> str | None:
        """``None`` when all is well, else the reasons, ``; ``-separated."""
        if self.bridge_gone:
            return _render(self._reasons[self.BRIDGE_GONE])
        if not self._reasons:
            return None
        return "; ".join(_render(reason) for reason in self._reasons.values())


def _render(reason: str | Callable[[], str]) -> str:
    text = reason if isinstance(reason, str) else reason()
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def _route_key(event: Event) -> str:
    return f"route {event.address}/{event.prefix_len} table {event.table} dev {event.index}"


def _route_network(event: Event) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(f"{event.address}/{event.prefix_len}", strict=False)
    except ValueError:
        return None


def _table_name(table: int) -> str:
    return {253: "default", 254: "main"}.get(table, str(table))


class Watcher:
    """Netlink events to each watched network's ``Problems``.

    ``on_bridge_gone(net)`` is called once when a network's bridge is gone
    (the backend stops what serves it); ``on_link(event)``, if given, with
    every link event (the backend puts back a TAP's MAC a client changed).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_bridge_gone: Callable[[LinuxNetwork], None],
        on_link: Callable[[Event], None] | None = None,
    ) -> None:
        self._loop = loop
        self._on_bridge_gone = on_bridge_gone
        self._on_link = on_link
        self._monitor = _native.Monitor()
        self._by_index: dict[int, LinuxNetwork] = {}
        self._networks: list[LinuxNetwork] = []
        loop.add_reader(self._monitor.fileno(), self.poll)

    def close(self) -> None:
        if not self._monitor.closed:
            self._loop.remove_reader(self._monitor.fileno())
            self._monitor.close()
        self._by_index.clear()
        self._networks.clear()

    # -- networks -------------------------------------------------------------------

    def watch(self, net: LinuxNetwork) -> None:
        """Start watching a network just created: events so far are read
        first, then its state is checked as it is now."""
        self.poll()
        self._networks.append(net)
        self._by_index[net.bridge_index] = net
        self._check(net)

    def unwatch(self, net: LinuxNetwork) -> None:
        if self._by_index.get(net.bridge_index) is net:
            del self._by_index[net.bridge_index]
        if net in self._networks:
            self._networks.remove(net)

    # -- events ---------------------------------------------------------------------

    def poll(self) -> None:
        """Apply every queued event (the loop's reader callback; also called
        before the backend acts on a network, so it acts on today's state)."""
        if self._monitor.closed:
            return
        try:
            events = [Event(*e) for e in self._monitor.drain()]
        except OSError as e:  # never seen; a broken monitor must not take the loop down
            log.error("netlink monitor failed, no longer watching: %s", e)
            self.close()
            return
        overrun = False
        for event in events:
            if event.kind == "overrun":
                overrun = True
            elif event.kind in ("newlink", "dellink"):
                self._link_event(event)
            elif event.kind in ("newaddr", "deladdr"):
                self._address_event(event)
            else:
                self._route_event(event)
        if overrun:
            log.warning("netlink events were lost (the monitor's queue overflowed); reading the state afresh")
            for net in list(self._networks):
                self._check(net)

    def _link_event(self, event: Event) -> None:
        if self._on_link is not None:
            self._on_link(event)
        net = self._by_index.get(event.index)
        if net is None:
            return
        if event.kind == "dellink":
            self._bridge_gone(net)
        else:
            self._bridge_state(net, event.name, event.up)

    def _address_event(self, event: Event) -> None:
        net = self._by_index.get(event.index)
        if net is None:
            return
        for key, address, prefix_len in _gateways(net):
            if event.address == str(address) and event.prefix_len == prefix_len:
                if event.kind == "deladdr":
                    net.problems.set(key, f"gateway {address}/{prefix_len} was removed from bridge {net.bridge} "
                                          f"(ifindex {net.bridge_index}) outside the broker")  # fmt: skip
                else:
                    net.problems.clear(key, f"gateway {address}/{prefix_len} is back on bridge {net.bridge}")

    def _route_event(self, event: Event) -> None:
        if event.table == LOCAL_TABLE or event.prefix_len == 0:
            return  # the host's own addresses; a default route overlaps nothing (subnets.conflict)
        route = _route_network(event)
        if route is None:
            return
        key = _route_key(event)
        for net in self._networks:
            if net.problems.bridge_gone or event.index == net.bridge_index:
                continue  # a route through the network's own bridge is the network's
            if not any(route.version == ours.version and route.overlaps(ours) for ours in _networks_of(net)):
                continue
            where = f"route {route} (table {_table_name(event.table)}{_via(event.index)})"
            if event.kind == "newroute":
                net.problems.set(key, f"{where} overlaps its subnet: added outside the broker")
            elif not _route_exists(route, event.table):
                net.problems.clear(key, f"{where} is gone; it overlapped the network")

    # -- state checks ---------------------------------------------------------------

    def _bridge_gone(self, net: LinuxNetwork) -> None:
        if net.problems.bridge_gone:
            return
        net.problems.set(
            Problems.BRIDGE_GONE, f"bridge {net.bridge} (ifindex {net.bridge_index}) was deleted outside the broker"
        )
        self._by_index.pop(net.bridge_index, None)
        try:
            self._on_bridge_gone(net)
        except Exception:
            log.exception("network %r: acting on its deleted bridge", net.config.name)

    def _bridge_state(self, net: LinuxNetwork, name: str, up: bool) -> None:
        what = f"bridge {net.bridge} (ifindex {net.bridge_index})"
        if name != net.bridge:
            net.problems.set("bridge renamed", f"{what} was renamed to {name} outside the broker")
        else:
            net.problems.clear("bridge renamed", f"{what} has its name back")
        if not up:
            net.problems.set("bridge down", f"{what} was set down outside the broker")
        else:
            net.problems.clear("bridge down", f"{what} is up again")

    def _check(self, net: LinuxNetwork) -> None:
        """Read one network's state from the kernel (new, or events lost)."""
        if net.problems.bridge_gone:
            return
        try:
            link = _native.get_link(net.bridge_index)
        except FileNotFoundError:
            self._bridge_gone(net)
            return
        except OSError as e:
            log.error("network %r: cannot look up bridge %s (ifindex %d): %s", net.config.name, net.bridge,
                      net.bridge_index, e)  # fmt: skip
            return
        self._bridge_state(net, link.name, link.up)
        present = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for address, prefix_len, ifname in _native.list_addresses(family):
                if ifname == link.name:
                    present.add((address, prefix_len))
        for key, address, prefix_len in _gateways(net):
            if (str(address), prefix_len) in present:
                net.problems.clear(key, f"gateway {address}/{prefix_len} is back on bridge {net.bridge}")
            else:
                net.problems.set(key, f"gateway {address}/{prefix_len} is missing from bridge {net.bridge} "
                                      f"(ifindex {net.bridge_index}): removed outside the broker")  # fmt: skip
        # Routes, as a dump has them (no output link): the network's own are
        # its prefix routes in the main table.  Known overlaps not in the dump
        # are gone; new ones are added.
        own = {(str(n), 254) for n in _networks_of(net)}
        seen = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for dst, prefix_len, table in _native.list_routes(family):
                event = Event("newroute", 0, "", family, dst, prefix_len, table, False)
                route = _route_network(event)
                if route is None or table == LOCAL_TABLE or prefix_len == 0 or (str(route), table) in own:
                    continue
                if any(route.version == ours.version and route.overlaps(ours) for ours in _networks_of(net)):
                    known = [k for k in net.problems.keys() if k.startswith(f"route {dst}/{prefix_len} table {table} ")]
                    seen.update(known)
                    if not known:
                        key = _route_key(event)
                        seen.add(key)
                        net.problems.set(key, f"route {route} (table {_table_name(table)}) overlaps its subnet: "
                                              "added outside the broker")  # fmt: skip
        for key in net.problems.keys():
            if key.startswith("route ") and key not in seen:
                net.problems.clear(key, f"{key.split(' dev ')[0]} is gone; it overlapped the network")


def _gateways(net: LinuxNetwork) -> list[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(problem key, address, prefix length) of each address the broker put on the bridge."""
    out: list[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = [
        ("gateway", net.gateway, net.subnet.prefixlen)
    ]
    if net.ipv6_prefix is not None:
        out.append(("gateway6", net.ipv6_prefix.network_address + 1, net.ipv6_prefix.prefixlen))
    return out


def _networks_of(net: LinuxNetwork) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [net.subnet] + ([net.ipv6_prefix] if net.ipv6_prefix is not None else [])


def _via(index: int) -> str:
    if not index:
        return ""
    try:
        return f", dev {_native.get_link(index).name}"
    except OSError:
        return f", dev ifindex {index}"


def _route_exists(route: ipaddress.IPv4Network | ipaddress.IPv6Network, table: int) -> bool:
    """Whether a route to ``route`` is still in ``table`` (another of the same
    destination, another metric, may outlive the one deleted)."""
    family = socket.AF_INET if route.version == 4 else socket.AF_INET6
    try:
        routes = _native.list_routes(family)
    except OSError:
        return False
    return any(t == table and p == route.prefixlen and d == str(route.network_address) for d, p, t in routes)
