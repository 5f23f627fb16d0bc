"""The Linux backend: kernel bridges, TAP devices and dgram pumps.

A network is a bridge ``vmb-brN`` with the gateway address on it; an
interface is a TAP on that bridge whose fd goes to the client, or for
``dgram`` a TAP the broker keeps, pumped natively to one end of a socketpair.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from ... import _native
from ...config import NetworkConfig
from ...protocol import Attach
from ..base import CreateError
from . import names, network, subnets

log = logging.getLogger(__name__)


class LinuxNetwork:
    def __init__(self, config: NetworkConfig, subnet: ipaddress.IPv4Network, bridge: str) -> None:
        self.config = config
        self.subnet = subnet
        self.bridge = bridge

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
            "ipv6_prefix": "",
            "prefix_len": 0,
            "mtu": self.config.mtu,
            "bridge": self.bridge,
        }


class LinuxBackend:
    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        self._networks: dict[str, LinuxNetwork] = {}

    # -- leftovers --------------------------------------------------------------

    def cleanup_leftovers(self) -> None:
        # TAPs first: deleting a bridge releases its ports but leaves them.
        links = sorted(_native.list_links(names.PREFIX), key=lambda link: link.kind == "bridge")
        for link in links:
            network.delete_link_quietly(link.name)
            log.warning("removed leftover %s %s", link.kind or "link", link.name)

    # -- networks -----------------------------------------------------------------

    def create_network(self, config: NetworkConfig) -> LinuxNetwork:
        subnet = self._pick_subnet(config)
        try:
            bridge = network.create_bridge(subnet, config.mtu)
        except OSError as e:
            raise CreateError(f"cannot create bridge for {config.name!r}: {e}") from e
        net = LinuxNetwork(config, subnet, bridge)
        self._networks[config.name] = net
        self._remember_subnet(config.name, subnet)
        return net

    def destroy_network(self, net: LinuxNetwork) -> None:
        self._networks.pop(net.config.name, None)
        network.delete_link_quietly(net.bridge)

    def create_interface(self, net: LinuxNetwork, request: Attach) -> network.Interface:
        try:
            return network.create_interface(net.bridge, net.config.name, net.config.mtu, request)
        except OSError as e:
            raise CreateError(f"cannot create {request.kind} interface on {net.config.name!r}: {e}") from e

    def destroy_interface(self, iface: network.Interface) -> None:
        iface.destroy()

    def close(self) -> None:
        pass

    # -- subnets ------------------------------------------------------------------

    def _taken(self) -> list[tuple[ipaddress.IPv4Network, str]]:
        """Every IPv4 network in use in this namespace, and what uses it."""
        taken = [(n.subnet, f"broker network {n.config.name!r}") for n in self._networks.values()]
        for dst, plen, table in _native.list_routes(socket.AF_INET):
            # Table 255 ("local") holds the host's own addresses and broadcasts,
            # loopback's 127/8 included: the address list covers those.
            if table != 255:
                net = ipaddress.IPv4Network(f"{dst}/{plen}", strict=False)
                taken.append((net, f"route {net} (table {table})"))
        for address, plen, ifname in _native.list_addresses(socket.AF_INET):
            net = ipaddress.IPv4Network(f"{address}/{plen}", strict=False)
            taken.append((net, f"address {address}/{plen} on {ifname}"))
        return taken

    def _pick_subnet(self, config: NetworkConfig) -> ipaddress.IPv4Network:
        taken = self._taken()
        if config.subnet is not None:
            for net, why in taken:
                if subnets.conflict(config.subnet, [net]):
                    raise CreateError(f"subnet {config.subnet} of {config.name!r} overlaps {why}")
            return config.subnet
        chosen = subnets.choose((net for net, _ in taken), self._remembered_subnet(config.name))
        if chosen is None:
            raise CreateError(f"no free /24 left in {subnets.POOL_FIRST} - {subnets.POOL_LAST}")
        return chosen

    @property
    def _subnets_file(self) -> Path:
        return self.state_dir / "subnets.json"

    def _remembered(self) -> dict[str, str]:
        try:
            data = json.loads(self._subnets_file.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _remembered_subnet(self, name: str) -> ipaddress.IPv4Network | None:
        try:
            return ipaddress.IPv4Network(self._remembered()[name])
        except (KeyError, ValueError, TypeError):
            return None

    def _remember_subnet(self, name: str, subnet: ipaddress.IPv4Network) -> None:
        data = self._remembered()
        if data.get(name) == str(subnet):
            return
        data[name] = str(subnet)
        tmp = self._subnets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self._subnets_file)
