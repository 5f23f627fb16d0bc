"""The Linux backend: what a network is, in kernel objects and daemons.

A network is a bridge ``vmb-brN`` with the gateway on it, its rules in the
broker's nftables table, and one dnsmasq for DHCP, DNS and router
advertisements.  An interface is a TAP on the bridge whose fd goes to the
client, or for ``dgram`` a TAP the broker keeps, pumped natively to one end of
a socketpair.

Creation and removal mirror each other (libvirt's start/shutdown of a
virtual network): each step of ``create_network`` registers its undo, and a
failure unwinds what was done in reverse.

Both are coroutines on the broker's loop: ``nft`` and dnsmasq's start-up and
stop run as child processes the loop waits for without blocking, bounded by
timeouts (programs.py), so every other client is served meanwhile.  One
network changes at a time (``_changing``): each nftables batch is built from
the networks there are, and a second creation running beside the first
would leave the first's rules out.  Interfaces are guarded by the bridge
filter (guard.py), which learns leases from dnsmasq's lease files (leases.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import _native, files
from ...config import NetworkConfig
from ...protocol import KINDS, Attach
from ..base import CreateError
from . import dnsmasq, firewall, guard, leases, names, network, programs, restart, subnets, watch
from .state import RememberedChoices, random_ula_prefix

log = logging.getLogger(__name__)


_TABLES = {253: "default", 254: "main"}
# A lease file holds at most a few thousand lines (dhcp-lease-max): read it only up to this.
LEASES_LIMIT = 1 << 20


class LinuxNetwork:
    def __init__(
        self,
        config: NetworkConfig,
        subnet: ipaddress.IPv4Network,
        ipv6_prefix: ipaddress.IPv6Network | None,
        bridge: str,
        bridge_index: int = 0,
    ) -> None:
        self.config = config
        self.subnet = subnet
        self.ipv6_prefix = ipv6_prefix
        self.bridge = bridge
        # The bridge as the kernel knows it: acted on by this, never by name (watch.py).
        self.bridge_index = bridge_index
        self.dnsmasq: dnsmasq.Dnsmasq | None = None
        # What went wrong behind the broker's back; `status` shows it as "degraded".
        self.problems = watch.Problems(config.name)
        self.restarts = restart.Restarts(config.name, self.problems)

    @property
    def degraded(self) -> str | None:
        """Why the network does not work as created, or None (``status``)."""
        return self.problems.text()

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    def info(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "mode": self.config.mode,
            "subnet": str(self.subnet.network_address),
            "mask": str(self.subnet.netmask),
            "gateway": str(self.gateway),
            "ipv6_prefix": str(self.ipv6_prefix.network_address) if self.ipv6_prefix else "",
            "prefix_len": self.ipv6_prefix.prefixlen if self.ipv6_prefix else 0,
            "mtu": self.config.mtu,
            "bridge": self.bridge,
            "domain": self.config.dns_domain if self.config.dns else "",
            "dhcp": self.config.dhcp,
        }

    def reply_value(self) -> dict[str, Any]:
        return self.info()

    def firewall_spec(self) -> firewall.FirewallNetwork:
        return firewall.FirewallNetwork(
            name=self.config.name,
            bridge=self.bridge,
            mode=self.config.mode,
            subnet=self.subnet,
            ipv6_prefix=self.ipv6_prefix,
            external_interface=self.config.external_interface,
            port_forwards=self.config.port_forwards,
        )

    def dnsmasq_spec(self) -> dnsmasq.DnsmasqSpec:
        c = self.config
        return dnsmasq.DnsmasqSpec(
            name=c.name,
            bridge=self.bridge,
            subnet=self.subnet,
            gateway=self.gateway,
            dhcp=c.dhcp,
            dhcp_range=c.dhcp_range,
            lease_time=c.lease_time,
            reservations=c.reservations,
            dns=c.dns,
            dns_servers=c.dns_servers,
            domain=c.dns_domain,
            ipv6_prefix=self.ipv6_prefix,
            mode=c.mode,
            mtu=c.mtu,
        )

    @property
    def needs_dnsmasq(self) -> bool:
        return self.config.dhcp or self.config.dns or self.ipv6_prefix is not None


class LinuxBackend:
    attach_kinds = KINDS

    def __init__(self, state_dir: str | Path, loop: asyncio.AbstractEventLoop | None = None) -> None:
        # Root writes here: root's alone, every directory above it too, or
        # UnsafeDirectory (files.py); the real path, so no symlink is in it.
        self.state_dir = Path(files.secure_directory(state_dir, "state"))
        self._loop = loop
        self._networks: dict[str, LinuxNetwork] = {}
        self._remembered = RememberedChoices(self.state_dir)
        self._groups = names.link_groups()
        # Persistent TAPs on record, until destroyed (their names stay taken).
        # Destroying may run on another thread than creating: hence the lock.
        self._persistent: set[str] = set()
        self._persistent_lock = threading.Lock()
        # Every interface on record (same lock): no new TAP takes one of
        # these names, even if its link was deleted behind our back.
        self._on_record: set[str] = set()
        # Netlink events on the loop: links, addresses and routes changed
        # behind the broker's back make networks degraded (watch.py).
        # TAPs whose fd a client holds, by name: the MAC their device must keep.
        self._taps: dict[str, _TapMac] = {}
        self._watcher = watch.Watcher(loop, self._bridge_gone, self._link_changed) if loop is not None else None
        # One network created or removed at a time (see the module's docstring).
        self._changing = asyncio.Lock()
        # The bridge filter: each port sends only its own addresses (guard.py).
        self._guard = guard.Guard(loop) if loop is not None else None
        self._lease_files: leases.LeaseFiles | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # dnsmasq restarts under way

    # -- leftovers --------------------------------------------------------------

    def cleanup_leftovers(self) -> None:
        for pid in dnsmasq.kill_leftovers(self.state_dir):
            log.warning("removed leftover dnsmasq (pid %d)", pid)
        if firewall.delete_table():
            log.warning("removed leftover nftables table inet %s", names.NFT_TABLE)
        if firewall.delete_table(guard.FAMILY):
            log.warning("removed leftover nftables table %s %s", guard.FAMILY, names.NFT_TABLE)
        # TAPs first: deleting a bridge releases its ports but leaves them.
        links = sorted(_native.list_links(names.PREFIX), key=lambda link: link.kind == "bridge")
        for link in links:
            network.delete_link_quietly(link.index)  # the one listed, not a newcomer of that name
            log.warning("removed leftover %s %s", link.kind or "link", link.name)

    # -- networks -----------------------------------------------------------------

    async def create_network(self, config: NetworkConfig) -> LinuxNetwork:
        async with self._changing:
            return await self._create_network(config)

    async def _create_network(self, config: NetworkConfig) -> LinuxNetwork:
        subnet = self._pick_subnet(config)
        prefix = self._pick_ipv6_prefix(config)
        async with contextlib.AsyncExitStack() as undo:  # unwinds on failure and on cancellation
            try:
                # Not a name a network on record still has, even one whose
                # bridge was deleted behind our back (watch.py).
                in_use = frozenset(n.bridge for n in self._networks.values())
                bridge, bridge_index = network.create_bridge(subnet, config.mtu, in_use)
                # The kernel takes tens of ms to unregister it: off the loop, as in destroy_network.
                undo.push_async_callback(asyncio.to_thread, network.delete_link_quietly, bridge_index)
                if prefix is not None:
                    _native.add_address(bridge, str(prefix.network_address + 1), prefix.prefixlen)
            except OSError as e:
                raise CreateError(f"cannot create bridge for {config.name!r}: {e}") from e

            net = LinuxNetwork(config, subnet, prefix, bridge, bridge_index)
            await self._apply_firewall([*self._networks.values(), net])
            undo.push_async_callback(self._apply_firewall_quietly, list(self._networks.values()))

            if net.needs_dnsmasq:
                await self._start_dnsmasq(net)
                undo.push_async_callback(self._stop_dnsmasq_async, net)
            undo.pop_all()

        self._networks[config.name] = net
        if self._watcher is not None:
            self._watcher.watch(net)
        self._guard_leases(net)
        try:
            self._remembered.remember(config.name, subnet=subnet, ipv6_prefix=prefix)
        except OSError as e:  # the network works; it may just be renumbered after a restart
            log.error("cannot remember the subnet of %r in %s: %s", config.name, self.state_dir, e)
        return net

    async def destroy_network(self, net: LinuxNetwork) -> None:
        """Remove in reverse order of creation; every step runs, errors are collected."""
        async with self._changing:
            self._networks.pop(net.config.name, None)
            if self._watcher is not None:
                self._watcher.unwatch(net)
            if self._guard is not None:
                self._guard.set_owned(net.config.name, frozenset())
            errors = []
            for step in (
                lambda: self._stop_dnsmasq_async(net),
                lambda: self._apply_firewall(list(self._networks.values())),
            ):
                try:
                    await step()
                except Exception as e:
                    log.error("removing network %r: %s", net.config.name, e)
                    errors.append(e)
            try:
                # By ifindex: gone already if deleted behind our back, and then
                # its name may be another link's.  On a thread: the kernel
                # waits for RCU grace periods to unregister it (~20-40 ms).
                await asyncio.to_thread(network.delete_link_quietly, net.bridge_index or net.bridge)
            except Exception as e:
                log.error("removing network %r: %s", net.config.name, e)
                errors.append(e)
            if errors:
                raise errors[0]

    def create_interface(self, net: LinuxNetwork, request: Attach) -> network.Interface:
        if request.persist and request.owner_uid is None:
            raise CreateError("a persistent TAP needs the requesting peer's uid, and the broker did not pass it on")
        if self._watcher is not None:
            self._watcher.poll()  # the kernel's state as of this request
        if net.problems.bridge_gone:
            raise CreateError(
                f"network {net.config.name!r} is degraded: {net.degraded}; it takes no interfaces until every "
                "client has released it and it is created again"
            )
        with self._persistent_lock:
            reserved = frozenset(self._persistent)
            on_record = frozenset(self._on_record)
        try:
            iface = network.create_interface(
                net.bridge_index or net.bridge, net.config.name, net.config.mtu, request, reserved, on_record
            )
        except OSError as e:
            raise CreateError(f"cannot create {request.kind} interface on {net.config.name!r}: {e}") from e
        with self._persistent_lock:
            self._on_record.add(iface.name)
            if iface.persist:
                self._persistent.add(iface.name)
        if self._guard is not None:
            # Its port sends only its own addresses, from before the client
            # has its fd: the attach reply waits for ``ready``.
            port = self._guard.port(iface.name, iface.index, iface.mac, net.subnet)
            iface.guard_port = port
            iface.ready = self._guard.add(port)
        tap = None
        if iface.kind == "tap":  # the client holds its fd (a dgram TAP's is the broker's)
            tap = self._taps[iface.name] = _TapMac(iface.index, names.host_side_mac(iface.mac))
        iface.forged = lambda: self._forged(iface, tap)
        return iface

    def _forged(self, iface: network.Interface, tap: _TapMac | None) -> dict[str, int] | None:
        """What ``status`` shows of an attachment's forgeries: frames dropped, MAC changes undone."""
        if self._guard is None or iface.guard_port is None:
            return None
        return {**self._guard.forged(iface.guard_port), "mac_changes": tap.changes if tap is not None else 0}

    def destroy_interfaces(self, ifaces: list[network.Interface]) -> None:
        """Runs on the broker's reaper thread; the bridge filter hears of it on the loop."""
        try:
            network.destroy_interfaces(ifaces, next(self._groups))
        finally:
            with self._persistent_lock:
                self._persistent.difference_update(iface.name for iface in ifaces)
                self._on_record.difference_update(iface.name for iface in ifaces)
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._interfaces_gone, ifaces)

    def _interfaces_gone(self, ifaces: list[network.Interface]) -> None:
        for iface in ifaces:
            if self._guard is not None and iface.guard_port is not None:
                self._guard.remove(iface.guard_port)
            tap = self._taps.get(iface.name)
            if tap is not None and tap.index == iface.index:
                del self._taps[iface.name]

    def close(self) -> None:
        """After every network is gone (the broker's shutdown): our tables and watchers go too."""
        for net in list(self._networks.values()):  # none, unless a removal failed
            self._stop_dnsmasq(net)
            network.delete_link_quietly(net.bridge_index or net.bridge)
        self._networks.clear()
        for task in self._tasks:
            task.cancel()
        if self._guard is not None:
            self._guard.close()
        if self._lease_files is not None:
            self._lease_files.close()
        # Synchronous: nobody is served any more.  Both tables in one nft run.
        firewall.delete_tables(firewall.FAMILY, guard.FAMILY)
        if self._watcher is not None:
            self._watcher.close()

    # -- firewall -------------------------------------------------------------------

    async def _apply_firewall(self, nets: list[LinuxNetwork]) -> None:
        specs = [n.firewall_spec() for n in nets]
        try:
            await programs.nft_batch(firewall.ruleset(specs))
        except (firewall.FirewallError, ValueError, OSError, subprocess.SubprocessError) as e:
            # ValueError: rules that cannot coexist (a host port forwarded
            # twice); TimeoutError (an OSError): nft hung and was killed.
            raise CreateError(f"nftables: {e}") from e
        for key, value in firewall.sysctls(specs).items():
            _write_sysctl(key, value)

    async def _apply_firewall_quietly(self, nets: list[LinuxNetwork]) -> None:
        try:
            await self._apply_firewall(nets)
        except CreateError as e:
            log.error("restoring firewall rules: %s", e)

    # -- dnsmasq ---------------------------------------------------------------------

    async def _start_dnsmasq(self, net: LinuxNetwork) -> None:
        server = dnsmasq.Dnsmasq(net.dnsmasq_spec(), self.state_dir)
        try:
            await server.start_async()
        except (dnsmasq.DnsmasqError, OSError) as e:
            raise CreateError(f"dnsmasq for {net.config.name!r}: {e}") from e
        try:
            if self._loop is not None:
                server.watch(self._loop, lambda: self._dnsmasq_exited(net, server))
        except OSError as e:
            await server.stop_async()
            raise CreateError(f"dnsmasq for {net.config.name!r}: cannot watch it: {e}") from e
        net.dnsmasq = server
        net.restarts.running()
        log.info("network %r: dnsmasq pid %s", net.config.name, server.pid)

    def _stop_dnsmasq(self, net: LinuxNetwork) -> None:
        net.restarts.stop()
        server, net.dnsmasq = net.dnsmasq, None
        if server is not None:
            server.stop()

    async def _stop_dnsmasq_async(self, net: LinuxNetwork) -> None:
        net.restarts.stop()
        server, net.dnsmasq = net.dnsmasq, None
        if server is not None:
            await server.stop_async()

    def _dnsmasq_exited(self, net: LinuxNetwork, server: dnsmasq.Dnsmasq) -> None:
        """dnsmasq died: started again after a backoff, forever while the network lives (restart.py)."""
        if net.dnsmasq is not server or self._networks.get(net.config.name) is not net:
            return  # stopped on purpose
        net.dnsmasq = None
        assert self._loop is not None  # only a watched dnsmasq gets here
        why = restart.describe_exit(server.returncode)
        net.restarts.died(self._loop, why, lambda: self._restart_dnsmasq(net), pid=server.pid)

    def _restart_dnsmasq(self, net: LinuxNetwork) -> None:
        assert self._loop is not None  # only a watched dnsmasq is restarted
        task = self._loop.create_task(self._restart_dnsmasq_async(net))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart_dnsmasq_async(self, net: LinuxNetwork) -> None:
        async with self._changing:  # not while the network is being removed
            if self._networks.get(net.config.name) is not net or net.dnsmasq is not None or net.problems.bridge_gone:
                return  # removed, or stopped on purpose, since
            try:
                await self._start_dnsmasq(net)
            except CreateError as e:
                assert self._loop is not None
                why = f"start failed: {' '.join(str(e.__cause__ or e).split())}"
                net.restarts.died(self._loop, why, lambda: self._restart_dnsmasq(net))

    # -- a TAP's own MAC, changed by its client ----------------------------------------

    def _link_changed(self, event: watch.Event) -> None:
        """Put back the MAC of a TAP whose client changed it (``SIOCSIFHWADDR`` on its fd).

        The bridge takes a port's own MAC for a local address on that port,
        so a TAP given another guest's MAC gets that guest's frames, filter or
        not; and nothing can refuse the change (the TAP allows it while up,
        the fd's holder needs no privilege).  So it is undone as soon as the
        kernel reports it, which drops the bridge's entry again, and logged
        and counted in the attachment's status (``mac_changes``).
        """
        tap = self._taps.get(event.name)
        if event.kind != "newlink" or tap is None or tap.index != event.index:
            return
        mac = _sysfs_mac(event.name, event.index)
        if mac is None or mac == tap.mac:
            return
        try:
            _native.set_mac(event.name, tap.mac)  # the name is this ifindex's: checked just now
        except OSError as e:
            log.error("%s: its client changed its MAC to %s; putting back %s failed: %s", event.name, mac, tap.mac, e)
            return
        tap.changes += 1
        log.warning("%s: its client changed its MAC to %s (SIOCSIFHWADDR on its fd); put back %s (%d time(s))",
                    event.name, mac, tap.mac, tap.changes)  # fmt: skip

    # -- leases, for the bridge filter -------------------------------------------------

    def _guard_leases(self, net: LinuxNetwork) -> None:
        """Tell the bridge filter which addresses ``net``'s leases and reservations give whom."""
        if self._guard is None:
            return
        if self._lease_files is None and self._loop is not None:
            try:
                self._lease_files = leases.LeaseFiles(str(self.state_dir), self._loop, self._leases_changed)
            except OSError as e:
                log.error("cannot watch lease files (only reservations are protected from other guests): %s", e)
        owned = {(r.mac, r.ip) for r in net.config.reservations if r.ip in net.subnet}
        if net.config.dhcp:
            path = dnsmasq.paths(self.state_dir, net.config.name)["leases"]
            try:
                text = files.read_regular(path, LEASES_LIMIT).decode(errors="replace")
            except FileNotFoundError:
                text = ""
            except OSError as e:
                log.warning("network %r: cannot read its leases: %s", net.config.name, e)
                text = ""
            owned |= guard.parse_leases(text, net.subnet)
        self._guard.set_owned(net.config.name, frozenset(owned))

    def _leases_changed(self, filename: str | None) -> None:
        for net in list(self._networks.values()):
            if filename is None or filename == dnsmasq.paths(self.state_dir, net.config.name)["leases"].name:
                self._guard_leases(net)

    # -- behind the broker's back ---------------------------------------------------

    def _bridge_gone(self, net: LinuxNetwork) -> None:
        """The watcher saw the bridge deleted: stop what served it.

        A dnsmasq bound by name (``interface=``, ``bind-dynamic``) would
        take up the next link of that name; the firewall rules stay until
        the network is removed (they name a bridge no broker network has).
        """
        assert self._loop is not None  # the watcher runs on it
        task = self._loop.create_task(self._stop_dnsmasq_of_gone_bridge(net))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_dnsmasq_of_gone_bridge(self, net: LinuxNetwork) -> None:
        async with self._changing:  # after a restart under way, which may have started one
            if net.dnsmasq is not None or net.restarts.pending:
                log.warning("network %r: stopping its dnsmasq, its bridge is gone", net.config.name)
                await self._stop_dnsmasq_async(net)

    # -- addresses --------------------------------------------------------------------

    def _taken(self) -> list[tuple[ipaddress.IPv4Network, str]]:
        """Every IPv4 network in use in this namespace, and what uses it."""
        taken = [(n.subnet, f"broker network {n.config.name!r}") for n in self._networks.values()]
        # Addresses first: "address 10.0.0.5/24 on wg0" says more than its route.
        for address, plen, ifname in _native.list_addresses(socket.AF_INET):
            net = ipaddress.IPv4Network(f"{address}/{plen}", strict=False)
            taken.append((net, f"address {address}/{plen} on {ifname}"))
        for dst, plen, table in _native.list_routes(socket.AF_INET):
            # Table 255 ("local") holds the host's own addresses and broadcasts,
            # loopback's 127/8 included: the address list covers those.
            if table != 255:
                net = ipaddress.IPv4Network(f"{dst}/{plen}", strict=False)
                taken.append((net, f"route {net} (table {_TABLES.get(table, table)})"))
        return taken

    def _pick_subnet(self, config: NetworkConfig) -> ipaddress.IPv4Network:
        taken = self._taken()
        if config.subnet is not None:
            for net, why in taken:
                if subnets.conflict(config.subnet, [net]):
                    raise CreateError(f"subnet {config.subnet} of {config.name!r} overlaps {why}")
            return config.subnet
        remembered = self._remembered.subnet(config.name)
        chosen = subnets.choose((net for net, _ in taken), remembered)
        if chosen is None:
            raise CreateError(f"no free /24 left in {subnets.POOL_FIRST} - {subnets.POOL_LAST}")
        if remembered is not None and chosen != remembered:
            why = next((why for net, why in taken if subnets.conflict(remembered, [net])), "something")
            log.warning("network %r: remembered subnet %s now overlaps %s; chose %s",
                        config.name, remembered, why, chosen)  # fmt: skip
        return chosen

    def _pick_ipv6_prefix(self, config: NetworkConfig) -> ipaddress.IPv6Network | None:
        if not config.ipv6:
            return None
        if config.ipv6_prefix is not None:
            prefix = config.ipv6_prefix
        else:
            prefix = self._remembered.ipv6_prefix(config.name) or random_ula_prefix()
        for other in self._networks.values():
            if other.ipv6_prefix is not None and other.ipv6_prefix.overlaps(prefix):
                if config.ipv6_prefix is not None:
                    raise CreateError(f"ipv6_prefix {prefix} of {config.name!r} is used by {other.config.name!r}")
                prefix = random_ula_prefix()
        return prefix


@dataclass
class _TapMac:
    index: int
    mac: str  # the TAP device's own (host side) MAC
    changes: int = 0  # times its client changed it and it was put back


def _sysfs_mac(name: str, index: int) -> str | None:
    """A link's MAC from sysfs, if ``name`` there is the link ``index`` (else None).

    A file read on the loop, not a netlink dump of every link per event.
    sysfs shows this namespace's links when it was mounted in it (``ip netns
    exec`` does); the ifindex check catches one that was not.
    """
    base = Path("/sys/class/net") / name
    try:
        if int((base / "ifindex").read_text()) != index:
            return None
        return (base / "address").read_text().strip()
    except (OSError, ValueError):
        return None


def _write_sysctl(key: str, value: str) -> None:
    """Namespace-local for net.*: affects only the broker's network namespace."""
    path = Path("/proc/sys") / key
    if path.read_text().strip() != value:
        path.write_text(value)
        log.info("sysctl %s = %s", key.replace("/", "."), value)
