"""The macOS backend: a network is a vmnet network and its serialization.

On macOS 26 a vmnet network lives as long as the process that created it
holds it, which is why the broker exists.  It is created once, on the first
acquire, and its serialization (made once, at creation) is what every
acquire hands out, as upstream does; a client turns it back into a network
with ``vmnet_network_create_with_serialization`` and starts its interface
itself.  Nothing is left behind by a crash: the networks die with us.

``native`` is the compiled ``_native`` module of the macOS build (tests on
Linux pass an in-process fake of exactly that boundary).
"""

from __future__ import annotations

import ipaddress
import logging
from types import ModuleType
from typing import Any

from ..config import DEFAULT_MTU, NetworkConfig
from ..protocol import Attach
from .base import CreateError

log = logging.getLogger(__name__)


class DarwinNetwork:
    def __init__(self, config: NetworkConfig, vmnet: Any) -> None:
        self.config = config
        self.vmnet = vmnet  # _native.VmnetNetwork
        address, mask = vmnet.ipv4_subnet()
        # vmnet reports the host's address on the network (x.y.z.1), or the
        # network address: the network is the same either way.
        self.subnet = ipaddress.IPv4Network(f"{address}/{mask}", strict=False)
        prefix, length = vmnet.ipv6_prefix()
        self.ipv6_prefix = ipaddress.IPv6Network(f"{prefix}/{length}", strict=False) if prefix else None
        self.reported = (address, mask, prefix, length)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "mode": self.config.mode,
            "subnet": str(self.subnet.network_address),
            "mask": str(self.subnet.netmask),
            "gateway": str(self.subnet.network_address + 1),
            "ipv6_prefix": str(self.ipv6_prefix.network_address) if self.ipv6_prefix else "",
            "prefix_len": self.ipv6_prefix.prefixlen if self.ipv6_prefix else 0,
            "mtu": self.config.mtu,
            "bridge": "",
        }

    def reply_value(self) -> Any:
        # The same XPC object every time: upstream retains one per reply.
        return self.vmnet.serialization()


def vmnet_options(config: NetworkConfig, native: ModuleType) -> tuple[int, dict[str, Any]]:
    """``create_network``'s arguments for a network's configuration (pure).

    Only what differs from vmnet's defaults is passed, so the builtins
    ``shared`` and ``host`` are created exactly as upstream creates them: by
    mode alone, on a subnet vmnet picks.
    """
    mode = native.VMNET_SHARED_MODE if config.mode == "shared" else native.VMNET_HOST_MODE
    options: dict[str, Any] = {}
    if config.subnet is not None:
        # The host's address, as upstream's code and apple/container pass it
        # (upstream's planned docs say the network address; both are
        # accepted in config and what vmnet reports back is logged).
        options["subnet"] = str(config.subnet.network_address + 1)
        options["mask"] = str(config.subnet.netmask)
    if config.ipv6_prefix is not None:
        options["ipv6_prefix"] = str(config.ipv6_prefix.network_address)
        options["ipv6_prefix_len"] = config.ipv6_prefix.prefixlen
    if config.mtu != DEFAULT_MTU:
        options["mtu"] = config.mtu
    if config.external_interface is not None:
        options["external_interface"] = config.external_interface
    switches = {
        "nat44": config.nat44,
        "nat66": config.nat66,
        "dhcp": config.dhcp,
        "dns_proxy": config.dns,
        "router_advertisement": config.router_advertisement,
    }
    options.update({key: False for key, on in switches.items() if not on})
    if config.port_forwards:
        options["port_forwards"] = [
            (f.proto, f.host_port, str(f.guest_ip), f.guest_port) for f in config.port_forwards
        ]
    if config.reservations:
        options["dhcp_reservations"] = [(r.mac, str(r.ip)) for r in config.reservations]
    return mode, options


class DarwinBackend:
    # Clients start their own vmnet interface from the network's serialization.
    attach_kinds: tuple[str, ...] = ()

    def __init__(self, native: ModuleType) -> None:
        self._native = native

    def cleanup_leftovers(self) -> None:
        """Nothing to do: vmnet networks die with the process that made them."""

    def create_network(self, config: NetworkConfig) -> DarwinNetwork:
        mode, options = vmnet_options(config, self._native)
        try:
            vmnet = self._native.create_network(mode, **options)
        except self._native.VmnetError as e:
            raise CreateError(f"cannot create network {config.name!r}: {e}") from e
        except ValueError as e:
            raise CreateError(f"cannot create network {config.name!r}: {e}") from e
        network = DarwinNetwork(config, vmnet)
        address, mask, prefix, length = network.reported
        log.info(
            "vmnet network %r: vmnet reports subnet %s mask %s, ipv6 %s/%d (asked: %s)",
            config.name, address, mask, prefix or "-", length,
            ", ".join(f"{k}={v}" for k, v in options.items()) or "mode only",
        )  # fmt: skip
        return network

    def destroy_network(self, network: DarwinNetwork) -> None:  # type: ignore[override]
        network.vmnet.close()

    def create_interface(self, network: DarwinNetwork, request: Attach) -> Any:  # type: ignore[override]
        # The broker refuses attach before it gets here (attach_kinds is empty).
        raise CreateError("vmnet interfaces are started by the client, not the broker")

    def destroy_interfaces(self, interfaces: list[Any]) -> None:
        if interfaces:
            raise AssertionError("a macOS broker never has interfaces")

    def close(self) -> None:
        pass
