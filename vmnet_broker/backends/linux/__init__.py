"""The Linux backend: what a network is, in kernel objects and daemons.

A network is a bridge ``vmb-brN`` with the gateway on it, its rules in the
broker's nftables table, and one dnsmasq for DHCP, DNS and router
advertisements.  An interface is a TAP on the bridge whose fd goes to the
client, or for ``dgram`` a TAP the broker keeps, pumped natively to one end of
a socketpair.

Creation and removal mirror each other (libvirt's start/shutdown of a
virtual network): each step of ``create_network`` registers its undo, and a
failure unwinds what was done in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

from ... import _native, files
from ...config import NetworkConfig
from ...protocol import KINDS, Attach
from ..base import CreateError
from . import dnsmasq, firewall, names, network, restart, subnets, watch
from .state import RememberedChoices, random_ula_prefix

log = logging.getLogger(__name__)


_TABLES = {253: "default", 254: "main"}


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
        # Netlink events on the loop: links, addresses and routes changed
        # behind the broker's back make networks degraded (watch.py).
        self._watcher = watch.Watcher(loop, self._bridge_gone) if loop is not None else None

    # -- leftovers --------------------------------------------------------------

    def cleanup_leftovers(self) -> None:
        for pid in dnsmasq.kill_leftovers(self.state_dir):
            log.warning("removed leftover dnsmasq (pid %d)", pid)
        if firewall.delete_table():
            log.warning("removed leftover nftables table inet %s", names.NFT_TABLE)
        # TAPs first: deleting a bridge releases its ports but leaves them.
        links = sorted(_native.list_links(names.PREFIX), key=lambda link: link.kind == "bridge")
        for link in links:
            network.delete_link_quietly(link.index)  # the one listed, not a newcomer of that name
            log.warning("removed leftover %s %s", link.kind or "link", link.name)

    # -- networks -----------------------------------------------------------------

    def create_network(self, config: NetworkConfig) -> LinuxNetwork:
        subnet = self._pick_subnet(config)
        prefix = self._pick_ipv6_prefix(config)
        with contextlib.ExitStack() as undo:
            try:
                # Not a name a network on record still has, even one whose
                # bridge was deleted behind our back (watch.py).
                in_use = frozenset(n.bridge for n in self._networks.values())
                bridge, bridge_index = network.create_bridge(subnet, config.mtu, in_use)
                undo.callback(network.delete_link_quietly, bridge_index)
                if prefix is not None:
                    _native.add_address(bridge, str(prefix.network_address + 1), prefix.prefixlen)
            except OSError as e:
                raise CreateError(f"cannot create bridge for {config.name!r}: {e}") from e

            net = LinuxNetwork(config, subnet, prefix, bridge, bridge_index)
            self._apply_firewall([*self._networks.values(), net])
            undo.callback(self._apply_firewall_quietly, list(self._networks.values()))

            if net.needs_dnsmasq:
                self._start_dnsmasq(net)
                undo.callback(self._stop_dnsmasq, net)
            undo.pop_all()

        self._networks[config.name] = net
        if self._watcher is not None:
            self._watcher.watch(net)
        try:
            self._remembered.remember(config.name, subnet=subnet, ipv6_prefix=prefix)
        except OSError as e:  # the network works; it may just be renumbered after a restart
            log.error("cannot remember the subnet of %r in %s: %s", config.name, self.state_dir, e)
        return net

    def destroy_network(self, net: LinuxNetwork) -> None:
        """Remove in reverse order of creation; every step runs, errors are collected."""
        self._networks.pop(net.config.name, None)
        if self._watcher is not None:
            self._watcher.unwatch(net)
        errors = []
        for step in (
            lambda: self._stop_dnsmasq(net),
            lambda: self._apply_firewall(list(self._networks.values())),
            # By ifindex: gone already if deleted behind our back, and then
            # its name may be another link's.
            lambda: network.delete_link_quietly(net.bridge_index or net.bridge),
        ):
            try:
                step()
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
        try:
            iface = network.create_interface(
                net.bridge_index or net.bridge, net.config.name, net.config.mtu, request, reserved
            )
        except OSError as e:
            raise CreateError(f"cannot create {request.kind} interface on {net.config.name!r}: {e}") from e
        if iface.persist:
            with self._persistent_lock:
                self._persistent.add(iface.name)
        return iface

    def destroy_interfaces(self, ifaces: list[network.Interface]) -> None:
        try:
            network.destroy_interfaces(ifaces, next(self._groups))
        finally:
            with self._persistent_lock:
                self._persistent.difference_update(iface.name for iface in ifaces)

    def close(self) -> None:
        for net in list(self._networks.values()):
            self.destroy_network(net)
        firewall.delete_table()
        if self._watcher is not None:
            self._watcher.close()

    # -- firewall -------------------------------------------------------------------

    def _apply_firewall(self, nets: list[LinuxNetwork]) -> None:
        specs = [n.firewall_spec() for n in nets]
        try:
            firewall.apply(specs)
        except (firewall.FirewallError, ValueError, OSError, subprocess.SubprocessError) as e:
            # ValueError: rules that cannot coexist (a host port forwarded twice).
            raise CreateError(f"nftables: {e}") from e
        for key, value in firewall.sysctls(specs).items():
            _write_sysctl(key, value)

    def _apply_firewall_quietly(self, nets: list[LinuxNetwork]) -> None:
        try:
            self._apply_firewall(nets)
        except CreateError as e:
            log.error("restoring firewall rules: %s", e)

    # -- dnsmasq ---------------------------------------------------------------------

    def _start_dnsmasq(self, net: LinuxNetwork) -> None:
        server = dnsmasq.Dnsmasq(net.dnsmasq_spec(), self.state_dir)
        try:
            server.start()
        except (dnsmasq.DnsmasqError, OSError) as e:
            raise CreateError(f"dnsmasq for {net.config.name!r}: {e}") from e
        try:
            if self._loop is not None:
                server.watch(self._loop, lambda: self._dnsmasq_exited(net, server))
        except OSError as e:
            server.stop()
            raise CreateError(f"dnsmasq for {net.config.name!r}: cannot watch it: {e}") from e
        net.dnsmasq = server
        net.restarts.running()
        log.info("network %r: dnsmasq pid %s", net.config.name, server.pid)

    def _stop_dnsmasq(self, net: LinuxNetwork) -> None:
        net.restarts.stop()
        server, net.dnsmasq = net.dnsmasq, None
        if server is not None:
            server.stop()

    def _dnsmasq_exited(self, net: LinuxNetwork, server: dnsmasq.Dnsmasq) -> None:
        """dnsmasq died: started again after a backoff, forever while the network lives (restart.py)."""
        if net.dnsmasq is not server or self._networks.get(net.config.name) is not net:
            return  # stopped on purpose
        net.dnsmasq = None
        assert self._loop is not None  # only a watched dnsmasq gets here
        why = restart.describe_exit(server.returncode)
        net.restarts.died(self._loop, why, lambda: self._restart_dnsmasq(net), pid=server.pid)

    def _restart_dnsmasq(self, net: LinuxNetwork) -> None:
        if self._networks.get(net.config.name) is not net or net.dnsmasq is not None or net.problems.bridge_gone:
            return  # removed, or stopped on purpose, since
        try:
            self._start_dnsmasq(net)
        except CreateError as e:
            assert self._loop is not None
            net.restarts.died(self._loop, f"restart failed: {e}", lambda: self._restart_dnsmasq(net))

    # -- behind the broker's back ---------------------------------------------------

    def _bridge_gone(self, net: LinuxNetwork) -> None:
        """The watcher saw the bridge deleted: stop what served it.

        A dnsmasq bound by name (``interface=``, ``bind-dynamic``) would
        take up the next link of that name; the firewall rules stay until
        the network is removed (they name a bridge no broker network has).
        """
        if net.dnsmasq is not None or net.restarts.pending:
            log.warning("network %r: stopping its dnsmasq, its bridge is gone", net.config.name)
            self._stop_dnsmasq(net)

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


def _write_sysctl(key: str, value: str) -> None:
    """Namespace-local for net.*: affects only the broker's network namespace."""
    path = Path("/proc/sys") / key
    if path.read_text().strip() != value:
        path.write_text(value)
        log.info("sysctl %s = %s", key.replace("/", "."), value)
