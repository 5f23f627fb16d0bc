"""Bridges and attachments: the kernel objects of one broker network.

``create_bridge``/``destroy_bridge`` and ``create_interface``/``destroy`` mirror
each other: creation unwinds what it made when a step fails, destruction
tolerates pieces that are already gone.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ... import _native
from ...protocol import Attach
from . import names

log = logging.getLogger(__name__)

# Socket buffers of a dgram attachment.  The kernel default (~200 KiB) holds
# few 64 KiB TSO frames; 4 MiB is what vfkit and vmnet-helper settled on.
DGRAM_BUFFER = 4 * 1024 * 1024


def delete_link_quietly(link: str | int) -> None:
    """Delete a link, by name or (what the broker made) by ifindex; one already gone is fine.

    What the broker created it deletes by ifindex: a name can be taken by
    another link once the first is deleted behind the broker's back.
    """
    try:
        _native.delete_link(link)
    except OSError as e:
        if e.errno not in (errno.ENODEV, errno.ENOENT):
            raise


def create_bridge(subnet: ipaddress.IPv4Network, mtu: int, reserved: frozenset[str] = frozenset()) -> tuple[str, int]:
    """A bridge named ``vmb-brN``, up, with the gateway (.1) on it: its name and ifindex.

    ``reserved``: names of bridges the broker still has on record, which a
    new bridge must not take even if they are gone from the kernel.
    """
    existing = {link.name for link in _native.list_links(names.BRIDGE)}
    bridge = names.free_bridge_name(existing | reserved)
    index = _native.create_bridge(bridge, mtu)
    try:
        # A fixed MAC, or the bridge takes the lowest port MAC and changes it
        # as VMs come and go (guests' ARP caches go stale).
        mac = names.random_mac()
        _native.set_mac(bridge, mac)
        no_linklocal_learning(bridge, index, mac)
        _native.add_address(bridge, str(subnet.network_address + 1), subnet.prefixlen)
        _native.set_link_up(bridge)
    except BaseException:
        delete_link_quietly(index)
        raise
    return bridge, index


def no_linklocal_learning(bridge: str, index: int, mac: str, sys_class_net: str = "/sys/class/net") -> None:
    """Keep the bridge from learning source addresses of link-local frames.

    Frames to 01:80:c2:00:00:0X (LLDP, 802.1X, pause) are learned from
    before any netfilter hook sees them, so a guest could claim another
    guest's MAC with one, past the bridge filter (guard.py).  The option is
    set through sysfs, which shows this namespace's links only when it was
    mounted in it (``ip netns exec`` does): the link is checked to be ours by
    ifindex and MAC first.
    """
    base = os.path.join(sys_class_net, bridge)
    try:
        with open(os.path.join(base, "ifindex")) as f:
            same = int(f.read()) == index
        with open(os.path.join(base, "address")) as f:
            same = same and f.read().strip() == mac
        if not same:
            log.warning("%s: /sys is not this network namespace's; link-local frames may teach the bridge MACs", bridge)
            return
        with open(os.path.join(base, "bridge", "no_linklocal_learn"), "w") as f:
            f.write("1")
    except (OSError, ValueError) as e:
        log.warning("%s: cannot turn off learning from link-local frames: %s", bridge, e)


@dataclass
class Interface:
    """One attachment: a TAP on the bridge, and for ``dgram`` its pump.

    A ``persist`` TAP is handed over by name, not fd: it outlives its fds,
    its owner (the requesting uid) opens it with TUNSETIFF, and only deleting
    it removes it.
    """

    name: str
    network_name: str
    kind: str
    mac: str
    mtu: int
    vnet_hdr: bool
    queues: int
    _tap: Any = field(repr=False)  # _native.Tap, its fds until handed over
    persist: bool = False
    # The TAP's ifindex, taken at creation: what destroy deletes.  Its name
    # may belong to another TAP by then, if it was deleted behind our back.
    index: int = 0
    _client_end: socket.socket | None = field(default=None, repr=False)
    _pump: Any = field(default=None, repr=False)  # _native.Pump for dgram
    _keepalive: int | None = field(default=None, repr=False)  # one TAP queue fd, after handover
    # Set by the backend (guard.py): the bridge filter's entry for this port;
    # a future done once the filter guards it (the attach reply waits for it);
    # and what status shows of the frames it dropped.
    guard_port: Any = field(default=None, repr=False)
    ready: Any = field(default=None, repr=False)
    forged: Callable[[], dict[str, int]] | None = field(default=None, repr=False)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "network_name": self.network_name,
            "kind": self.kind,
            "mac": self.mac,
            "mtu": self.mtu,
            "vnet_hdr": self.vnet_hdr,
            "queues": self.queues,
            "persist": self.persist,
        }

    def buffers(self) -> dict[str, int] | None:
        """A dgram pump's frame buffers: bytes mapped, bytes held now, times given back."""
        if self._pump is None:
            return None
        stats = self._pump.stats()
        return {"bytes": stats["buffer_bytes"], "held": stats["buffer_held"], "releases": stats["buffer_releases"]}

    def fds(self) -> list[int]:
        if self.persist:
            return []  # opened by name: an fd handed over would hold its one queue
        if self.kind == "dgram":
            return [self._client_end.fileno()] if self._client_end else []
        return self._tap.fds()

    def handed_over(self) -> None:
        # The client's end of a dgram socketpair is the client's now.  Of a
        # TAP we keep one queue fd: the interface belongs to the connection,
        # so it must outlive a VMM that closed its fds, until detach or
        # disconnect; one fd is enough to keep the device, all queues' fds
        # would cost 16 per interface.  A dgram TAP lives in the pump's dup.
        # A persistent TAP needs no fd, and must have none attached: its
        # single queue is for the VMM that opens it by name.
        if self._client_end is not None:
            self._client_end.close()
            self._client_end = None
        if self.kind == "tap" and self._keepalive is None and not self.persist:
            self._keepalive = os.dup(self._tap.fds()[0])
        self._tap.close()

    def destroy(self) -> None:
        # Delete first: RTM_DELLINK removes the TAP even while a VM holds an fd.
        delete_link_quietly(self.index or self.name)
        if self._pump is not None:
            self._pump.stop()
        if self._client_end is not None:
            self._client_end.close()
            self._client_end = None
        self._tap.close()
        if self._keepalive is not None:
            os.close(self._keepalive)
            self._keepalive = None


def destroy_interfaces(ifaces: list[Interface], group: int) -> None:
    """Destroy several interfaces, their TAPs deleted in one kernel batch.

    Unregistering a link waits for RCU grace periods: ~20 ms a TAP one by
    one, ~1 ms each in a batch (measured: 30 TAPs, 687 ms vs 26 ms).  That is
    what keeps a dead client's interfaces gone within a second.
    """
    if len(ifaces) > 1:
        try:
            for iface in ifaces:
                try:
                    _native.set_group(iface.index or iface.name, group)
                except FileNotFoundError:
                    pass  # already gone
            _native.delete_group(group)
        except OSError as e:  # e.g. EOPNOTSUPP: fall back to one by one below
            log.debug("batch delete of %d interfaces failed: %s", len(ifaces), e)
    errors = []
    for iface in ifaces:
        try:
            iface.destroy()
        except OSError as e:
            errors.append(e)
    if errors:
        raise errors[0]


def _new_tap(template: str, request: Attach, on_record: frozenset[str]) -> Any:
    """A TAP from the kernel's template whose name the broker has not on record.

    The kernel gives the lowest free name; after a TAP of ours was deleted
    behind our back that is its name, and two interfaces of one name would
    make the registry (and a client's ``detach``) act on the wrong one.  So
    such a TAP is held open while the next is made (it gets the next free
    name), then closed, which deletes it.  Naming TAPs ourselves instead
    would race: TUNSETIFF on a name that appeared meanwhile attaches to
    that device.
    """
    held = []
    try:
        for _ in range(len(on_record) + 1):
            tap = _native.Tap(template, vnet_hdr=request.vnet_hdr, queues=request.queues)
            if tap.name not in on_record:
                return tap
            held.append(tap)
        raise OSError(errno.EEXIST, f"no TAP name free of those on record ({len(on_record)})")
    finally:
        for tap in held:
            tap.close()


def create_interface(
    bridge: str | int,
    network_name: str,
    mtu: int,
    request: Attach,
    reserved: frozenset[str] = frozenset(),
    on_record: frozenset[str] = frozenset(),
) -> Interface:
    """A TAP on ``bridge`` (name, or the ifindex the broker recorded) as
    ``request`` asks; ``reserved``: names a persistent TAP must not take;
    ``on_record``: names of interfaces the broker has, which the new one
    must not have even if their links were deleted behind its back."""
    mac = request.mac or names.random_mac()
    if request.persist:
        if request.owner_uid is None:
            raise ValueError("a persistent TAP needs its owner's uid")
        # Named here, not by the kernel's template: a persistent TAP its owner
        # made vanish (TUNSETPERSIST 0) must not have its name reused while
        # the broker still has it on record, or deleting it would delete
        # another peer's interface.
        existing = {link.name for link in _native.list_links(names.PERSIST)}
        template = names.free_name(names.PERSIST, existing | reserved)
    elif request.kind == "dgram":
        template = names.DGRAM_TEMPLATE
    else:
        template = names.TAP_TEMPLATE
    tap = _new_tap(template, request, on_record)
    iface = Interface(
        tap.name, network_name, request.kind, mac, mtu, request.vnet_hdr, request.queues, tap, persist=request.persist
    )
    try:
        iface.index = socket.if_nametoindex(tap.name)  # ours: we hold its fds
        _native.set_mtu(tap.name, mtu)
        _native.set_mac(tap.name, names.host_side_mac(mac))
        _native.set_master(tap.name, bridge)
        _native.set_link_up(tap.name)
        if request.kind == "dgram":
            client_end, broker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            with broker_end:
                for end in (client_end, broker_end):
                    end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, DGRAM_BUFFER)
                    end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, DGRAM_BUFFER)
                iface._client_end = client_end
                # The pump dups both fds; ours close when handed over.
                # Buffers sized for this network's frames (a vnet_hdr one's are 64 KiB).
                frame_size = _native.pump_frame_size(mtu, request.vnet_hdr)
                iface._pump = _native.Pump(tap.fds()[0], broker_end.fileno(), frame_size)
        if request.persist:
            tap.make_persistent(request.owner_uid)
    except BaseException:
        iface.destroy()
        raise
    return iface
