"""Guests cannot pose as each other: each bridge port sends only its own addresses.

A client owns the fd of its TAP, and through it the guest behind it can send
any frame.  Without a check, a guest that sends with another guest's MAC
address makes the bridge learn that address on its own port, and the victim
stops getting its frames (its gateway's replies first); one that answers ARP
for another guest's IPv4 address, or for the gateway's, poisons the
neighbour caches the same way one layer up.  So, as libvirt's
``no-mac-spoofing`` and ``no-ip-spoofing`` filters do, a frame that enters a
broker bridge from a guest's port must carry:

- as Ethernet source (and ARP sender hardware address) the MAC the broker
  assigned to that attachment;
- as IPv4 source (and ARP sender address) an address of the port's network
  that is not the gateway, network or broadcast address; 0.0.0.0 only for
  ARP probes and DHCP requests (UDP 68 to 67);
- and if that address is *owned* (leased by the network's dnsmasq or
  reserved in its config), the owner's MAC.

Everything else from a guest's port is dropped and counted, in a counter of
that attachment that ``status`` shows.  Owned rather than leased-only:
guests with static addresses in the subnet are supported (README), and a
guest sends from its new lease before the broker can have read it; but no
guest can take an address that a lease or a reservation gives another, and
none can pose as the gateway.  Leases come from dnsmasq's lease file, read
again whenever it changes (``leases.py``).  IPv6 and VLAN-tagged frames are
checked for their MAC only.

The check lives in the broker's second nftables table, ``bridge
vmnet_broker``: one chain on the bridge family's prerouting hook (before the
bridge learns a source address; br_netfilter's hook comes later still),
whose rules never change, and sets that say which port is whose, keyed by
the port's ifindex (a name is reused by the next TAP at once, an ifindex is
not).  Every change is one atomic ``nft -j -f -`` batch, as for the
``inet`` table; but the table is not deleted and remade, because the
attachments' counters live in it.  The first batch (and the one after a
failure) flushes and refills it whole; the others carry only what changed.
Additions go at once (an attach reply waits for them); deletions, which cost
the kernel an RCU grace period (~15 ms against ~4 for an addition), follow
on their own a moment later, so an attach never waits for a detach's.  A
port of ours that is in no set (an interface being attached) sends nothing.
Names come from config.py's validation and our own templates, and every
string of a batch is checked against an explicit set before ``nft`` sees it.

Two things reach the bridge without passing any hook, and are handled where
the bridge is made (``network.create_bridge``): link-local frames (LLDP,
802.1X, pause) are learned from before filtering, so bridges are made with
``no_linklocal_learn``; and a client can ``SIOCSIFHWADDR`` its TAP fd, which
changes the port's own address (see docs/security.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ...config import valid_ifname
from . import names, programs
from .firewall import FirewallError, check_batch_strings

log = logging.getLogger(__name__)

FAMILY = "bridge"
TABLE = names.NFT_TABLE
# Every port the broker makes (vmb-tN, vmb-dN, vmb-pN); bridges are never ports.
OUR_PORTS = names.PREFIX + "*"
# The bridge family's "filter" priority: before br_netfilter (0).
PRIO_FILTER = -200
# How old the counters in status may be: reading them is an nft run, so
# status shows the last reading and asks for a new one when it is older.
COUNTERS_MAX_AGE = 1.0
# Deletions (a port gone, a lease moved) go in a batch of their own this long
# after they are due, whatever else comes meanwhile.
REMOVE_DELAY = 0.1

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# Every string of a batch: names, interface names, MACs, addresses, keywords,
# operators ("!=", "=="), payload fields ("saddr ip") and our wildcard.
_BATCH_STRING = re.compile(r"[A-Za-z0-9 _.:@!=-]*|" + re.escape(OUR_PORTS))


@dataclass(frozen=True)
class GuardPort:
    """One attachment's bridge port and what it may send as."""

    name: str  # the TAP on the bridge (a dgram attachment's is the broker's TAP)
    index: int  # its ifindex: what the sets say
    mac: str  # the guest's MAC, as the broker assigned it
    subnet: ipaddress.IPv4Network  # its network's
    counter: str  # its counter's name: one per attachment, so a reused TAP name starts from zero


Owned = frozenset[tuple[str, ipaddress.IPv4Address]]  # (owner MAC, address)


def counter_name(port: str, serial: int) -> str:
    return f"forged-{port}-{serial}"


def sources(subnet: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None:
    """The IPv4 sources a guest of ``subnet`` may use: after the gateway (.1), before broadcast."""
    first, last = subnet.network_address + 2, subnet.broadcast_address - 1
    return (first, last) if first <= last else None


# -- the batch (pure) ---------------------------------------------------------


def ruleset(ports: Sequence[GuardPort], owned: Iterable[tuple[str, ipaddress.IPv4Address]],
            stale_counters: Iterable[str] = ()) -> dict[str, Any]:  # fmt: skip
    """The batch that makes the table say exactly this, whatever it said before.

    ``stale_counters``: counters of attachments that are gone, to delete (if
    they exist).  Raises ValueError for any value outside what it may be.
    """
    ports = sorted(ports, key=lambda p: (str(p.name), str(p.index)))
    stale = sorted(set(stale_counters) - {p.counter for p in ports})
    _check(ports, list(owned), stale)
    table = {"family": FAMILY, "name": TABLE}
    commands: list[dict[str, Any]] = [{"metainfo": {"json_schema_version": 1}}, {"add": {"table": table}}]
    chain = {**_obj("prerouting"), "type": "filter", "hook": "prerouting", "prio": PRIO_FILTER, "policy": "accept"}
    commands += [{"add": {"chain": chain}}, {"flush": {"chain": _obj("prerouting")}}]
    for name, kind in _SETS:
        verb = "map" if name == "forged" else "set"
        commands += [{"add": {verb: {**_obj(name), **kind}}}, {"flush": {verb: _obj(name)}}]
    # Counters: "add" keeps one that exists (and its count); the map says whose is whose.
    commands += [{"add": {"counter": _obj(p.counter)}} for p in ports]
    commands += _elements("add", ports, owned)
    for name in stale:  # "add" first, so that "delete" finds it whatever happened before
        commands += [{"add": {"counter": _obj(name)}}, {"delete": {"counter": _obj(name)}}]
    commands += _rules()
    batch = {"nftables": commands}
    check_batch_strings(batch, _BATCH_STRING, "nftables bridge batch")
    return batch


def changes(
    old_ports: dict[int, GuardPort], old_owned: Owned, ports: dict[int, GuardPort], owned: Owned
) -> dict[str, Any] | None:
    """The batch that takes a table made by ``ruleset`` from the old state to the new one; None if they are the same.

    Ports by ifindex.  Only what changed: one attach is a few elements, not
    all of every port's again (1,700 ports rebuilt per attach cost seconds
    of nft).
    """
    gone = sorted((p for index, p in old_ports.items() if ports.get(index) != p), key=lambda p: p.index)
    added = sorted((p for index, p in ports.items() if old_ports.get(index) != p), key=lambda p: p.index)
    lost, new = old_owned - owned, owned - old_owned
    if not (gone or added or lost or new):
        return None
    _check(added, list(new), [p.counter for p in gone])
    # Addresses still owned by someone stay in "owned" (a lease moving from one MAC to another).
    still = {ip for _, ip in owned}
    commands: list[dict[str, Any]] = [{"metainfo": {"json_schema_version": 1}}]
    commands += _elements("delete", gone, lost, keep_addresses=still)
    commands += [{"delete": {"counter": _obj(p.counter)}} for p in gone]
    commands += [{"add": {"counter": _obj(p.counter)}} for p in added]
    commands += _elements("add", added, new, keep_addresses={ip for _, ip in old_owned - lost})
    batch = {"nftables": commands}
    check_batch_strings(batch, _BATCH_STRING, "nftables bridge batch")
    return batch


# The sets and the map, and their types: what ruleset() makes and changes() edits.
_SETS: list[tuple[str, dict[str, Any]]] = [
    ("ports", {"type": "iface_index"}),
    ("port_mac", {"type": ["iface_index", "ether_addr"]}),
    ("port_ip", {"type": ["iface_index", "ipv4_addr"], "flags": ["interval"]}),
    ("owned", {"type": "ipv4_addr"}),
    ("owner", {"type": ["ether_addr", "ipv4_addr"]}),
    ("forged", {"type": "iface_index", "map": "counter"}),
]


def _elements(
    verb: str,
    ports: Sequence[GuardPort],
    owned: Iterable[tuple[str, ipaddress.IPv4Address]],
    keep_addresses: set[ipaddress.IPv4Address] = frozenset(),  # type: ignore[assignment]
) -> list[dict[str, Any]]:
    """``add`` or ``delete`` commands for these ports' and owned addresses' elements.

    ``keep_addresses``: addresses that stay in (or are already in) "owned",
    so not added or deleted there.
    """
    owned = sorted(set(owned), key=lambda pair: (int(pair[1]), pair[0]))
    ranges = [(p, r) for p in ports if (r := sources(p.subnet)) is not None]
    addresses = sorted({ip for _, ip in owned} - set(keep_addresses))
    contents: list[tuple[str, list[Any]]] = [
        ("ports", [p.index for p in ports]),
        ("port_mac", [_concat(p.index, p.mac) for p in ports]),
        ("port_ip", [_concat(p.index, {"range": [str(first), str(last)]}) for p, (first, last) in ranges]),
        ("owned", [str(ip) for ip in addresses]),
        ("owner", [_concat(mac, str(ip)) for mac, ip in owned]),
        # A map's element is deleted by its key.
        ("forged", [[p.index, p.counter] if verb == "add" else p.index for p in ports]),
    ]
    return [{verb: {"element": {**_obj(name), "elem": elements}}} for name, elements in contents if elements]


def _rules() -> list[dict[str, Any]]:
    iif = _meta("iif")
    count_drop = [{"counter": {"map": {"key": iif, "data": "@forged"}}}, {"drop": None}]
    arp_ip, arp_mac = _payload("arp", "saddr ip"), _payload("arp", "saddr ether")
    ip_saddr, ether_saddr = _payload("ip", "saddr"), _payload("ether", "saddr")
    zero = "0.0.0.0"
    return [
        _rule(_match(_meta("iifname"), OUR_PORTS, "!="), {"accept": None}, comment="not a guest port"),
        _rule(_match(iif, "@ports", "!="), {"counter": None}, {"drop": None}, comment="a port being attached"),
        _rule(_match(_concat(iif, ether_saddr), "@port_mac", "!="), *count_drop,
              comment="source MAC not assigned to the port"),
        _rule(_match(_concat(iif, arp_mac), "@port_mac", "!="), *count_drop,
              comment="ARP: sender MAC not assigned to the port"),
        _rule(_match(arp_ip, zero, "!="), _match(_concat(iif, arp_ip), "@port_ip", "!="), *count_drop,
              comment="ARP: sender address outside the network"),
        _rule(_match(arp_ip, "@owned"), _match(_concat(arp_mac, arp_ip), "@owner", "!="), *count_drop,
              comment="ARP: sender address owned by another MAC"),
        _rule(_match(ip_saddr, zero), _match(_payload("udp", "sport"), 68), _match(_payload("udp", "dport"), 67),
              {"accept": None}, comment="DHCP from a guest without an address"),
        _rule(_match(_concat(iif, ip_saddr), "@port_ip", "!="), *count_drop,
              comment="IPv4: source outside the network"),
        _rule(_match(ip_saddr, "@owned"), _match(_concat(ether_saddr, ip_saddr), "@owner", "!="), *count_drop,
              comment="IPv4: source owned by another MAC"),
    ]  # fmt: skip


def _check(ports: Sequence[GuardPort], owned: Sequence[tuple[str, Any]], stale: Sequence[str]) -> None:
    problems = []
    seen: set[object] = set()
    for p in ports:
        if not (valid_ifname(p.name) and p.name.startswith(names.PREFIX)):
            problems.append(f"port {p.name!r}")
        if not (type(p.index) is int and 0 < p.index < 2**31) or p.index in seen:
            problems.append(f"ifindex {p.index!r} of {p.name!r}")
        seen.add(p.index)
        if not (isinstance(p.mac, str) and _MAC.fullmatch(p.mac)):
            problems.append(f"MAC {p.mac!r}")
        if not isinstance(p.subnet, ipaddress.IPv4Network):
            problems.append(f"subnet {p.subnet!r}")
    for mac, ip in owned:
        if not (isinstance(mac, str) and _MAC.fullmatch(mac)) or not isinstance(ip, ipaddress.IPv4Address):
            problems.append(f"owned address {mac!r} {ip!r}")
    for name in [p.counter for p in ports] + list(stale):
        if not (isinstance(name, str) and re.fullmatch(r"forged-[A-Za-z0-9._-]{1,15}-[0-9]{1,18}", name)):
            problems.append(f"counter {name!r}")
    if problems:
        raise ValueError(f"nftables bridge rules: refusing {'; '.join(problems)}")


def _obj(name: str) -> dict[str, Any]:
    return {"family": FAMILY, "table": TABLE, "name": name}


def _rule(*expr: dict[str, Any], comment: str) -> dict[str, Any]:
    return {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": "prerouting", "expr": list(expr),
                             "comment": comment}}}  # fmt: skip


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _concat(*parts: Any) -> dict[str, Any]:
    return {"concat": list(parts)}


# -- leases (pure) ------------------------------------------------------------


def parse_leases(text: str, subnet: ipaddress.IPv4Network) -> frozenset[tuple[str, ipaddress.IPv4Address]]:
    """``(mac, address)`` of each IPv4 lease in a dnsmasq lease file.

    A line is ``expiry mac address hostname client-id``; anything else (the
    DHCPv6 lines, a line cut short while dnsmasq rewrites the file, an
    address outside ``subnet``) is skipped.
    """
    owned = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 5 or not fields[0].isdigit() or not _MAC.fullmatch(fields[1]):
            continue
        try:
            address = ipaddress.IPv4Address(fields[2])
        except ValueError:
            continue
        if address in subnet and sources(subnet) is not None:
            owned.add((fields[1], address))
    return frozenset(owned)


# -- applying it, on the loop -------------------------------------------------


class Guard:
    """The table's state, and the task that makes the kernel's match it.

    Runs on the event loop only.  Changes arriving while ``nft`` runs are
    applied together by the next run (one batch for a burst of attaches);
    ``add`` returns a future done once a batch with that port is in the
    kernel, which is when its attach reply may go.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ports: dict[int, GuardPort] = {}  # by ifindex
        self._owned: dict[str, Owned] = {}  # network name -> owned addresses
        self._serials = itertools.count()
        # What the kernel has: after a batch went in, its ports and owned
        # addresses (the next batch is the changes since); None before the
        # first and after a failure (the next is the whole state).
        self._applied: tuple[dict[int, GuardPort], Owned] | None = None
        self._maybe_counters: set[str] = set()  # counters the kernel may have
        self._next: asyncio.Future[None] | None = None  # waiters for the next batch
        self._task: asyncio.Task[None] | None = None
        self._counts: dict[str, tuple[int, int]] = {}  # counter name -> (packets, bytes)
        self._counted_at = 0.0
        self._counting: asyncio.Task[None] | None = None
        self._later: asyncio.TimerHandle | None = None  # deletions due
        self._deleting = False  # the next batch deletes too
        self._closed = False

    def port(self, name: str, index: int, mac: str, subnet: ipaddress.IPv4Network) -> GuardPort:
        return GuardPort(name, index, mac, subnet, counter_name(name, next(self._serials)))

    def add(self, port: GuardPort) -> asyncio.Future[None]:
        """Guard ``port`` from now on; done once the kernel does (an exception if it cannot)."""
        self._ports[port.index] = port
        return self._sync()

    def remove(self, port: GuardPort) -> None:
        """Forget ``port`` (its TAP is gone).  Not urgent: no frame comes from
        a port that is gone, so its deletion waits for the next one due."""
        if self._ports.get(port.index) is port:
            del self._ports[port.index]
            self._delete_soon()

    def set_owned(self, network: str, owned: Owned) -> None:
        """The addresses leases and reservations give on ``network`` (empty: the network is gone)."""
        if self._owned.get(network, frozenset()) != owned:
            if owned:
                self._owned[network] = owned
            else:
                self._owned.pop(network, None)
            self._sync()

    def forged(self, port: GuardPort) -> dict[str, int]:
        """Frames dropped from ``port`` (and their bytes), as last read (see COUNTERS_MAX_AGE)."""
        if time.monotonic() - self._counted_at > COUNTERS_MAX_AGE and self._counting is None and not self._closed:
            self._counting = self._loop.create_task(self._read_counters())
        packets, octets = self._counts.get(port.counter, (0, 0))
        return {"packets": packets, "bytes": octets}

    async def settled(self) -> None:
        """Until every change so far is in the kernel (or failed), deletions too."""
        if self._later is not None:
            self._later.cancel()
            self._delete_now()
        while self._task is not None:
            await asyncio.wait([self._task])

    def close(self) -> None:
        """No more batches (shutdown: the backend deletes the table next)."""
        self._closed = True
        if self._later is not None:
            self._later.cancel()
        for task in (self._task, self._counting):
            if task is not None:
                task.cancel()

    def _delete_soon(self) -> None:
        if self._later is None and not self._closed:
            self._later = self._loop.call_later(REMOVE_DELAY, self._delete_now)

    def _delete_now(self) -> None:
        self._later = None
        self._deleting = True
        self._sync()

    def _sync(self) -> asyncio.Future[None]:
        if self._closed:  # a removal reported after shutdown must not make the table again
            done = self._loop.create_future()
            done.set_exception(FirewallError(0, "the broker is stopping"))
            done.exception()
            return done
        if self._next is None:
            self._next = self._loop.create_future()
            # Nobody may wait for a batch asked for by a removal: its error is logged.
            self._next.add_done_callback(lambda f: f.cancelled() or f.exception())
        if self._task is None:
            self._task = self._loop.create_task(self._run())
        return self._next

    async def _run(self) -> None:
        try:
            while self._next is not None:
                waiters, self._next = self._next, None
                try:
                    await self._apply()
                except Exception as e:
                    log.error("bridge filter: %s", e)
                    waiters.set_exception(e)
                else:
                    waiters.set_result(None)
        finally:
            self._task = None

    async def _apply(self) -> None:
        ports = dict(self._ports)
        owned: Owned = frozenset(pair for pairs in self._owned.values() for pair in pairs)
        target = (ports, owned)
        if self._applied is None:
            batch = ruleset(list(ports.values()), owned, self._maybe_counters)
        else:
            if not self._deleting:  # additions only; deletions when due (_delete_soon)
                old_ports, old_owned = self._applied
                target = ({**old_ports, **ports}, old_owned | owned)
            batch = changes(*self._applied, *target)
        self._deleting = False
        if target != (ports, owned):
            self._delete_soon()
        if batch is None:
            return
        self._maybe_counters |= {p.counter for p in target[0].values()}
        try:
            await programs.nft_batch(batch)
        except BaseException:
            # The kernel is as before, unless someone else changed our
            # table: the next batch says everything.
            self._applied = None
            raise
        self._applied = target
        self._maybe_counters = {p.counter for p in target[0].values()}

    async def _read_counters(self) -> None:
        try:
            proc = await programs.run([programs.which("nft"), "-j", "list", "counters", "table", FAMILY, TABLE],
                                      timeout=programs.NFT_TIMEOUT)  # fmt: skip
            if proc.returncode == 0:
                counts = {}
                for item in json.loads(proc.stdout or "{}").get("nftables", []):
                    counter = item.get("counter") if isinstance(item, dict) else None
                    if isinstance(counter, dict) and isinstance(counter.get("name"), str):
                        counts[counter["name"]] = (int(counter.get("packets", 0)), int(counter.get("bytes", 0)))
                self._counts = counts
            else:
                log.debug("reading the bridge filter's counters: %s", proc.stderr.strip())
        except (OSError, ValueError, programs.ProgramTimeout) as e:
            log.warning("reading the bridge filter's counters: %s", e)
        finally:
            self._counted_at = time.monotonic()
            self._counting = None
