"""What of a network's configuration vmnet cannot do (pure; runs anywhere).

vmnet's configuration API (macOS 26) has one call per upstream plist key:
mode, IPv4 subnet and mask, IPv6 prefix, MTU, external interface, NAT44,
NAT66, DHCP, DNS proxy, router advertisements, port forwards and DHCP
reservations by MAC.  Our JSON extensions beyond those have no vmnet call,
so ``load_config_dir`` refuses a file using them on macOS, naming the key,
instead of creating a network that quietly does less.  ``allowed_users`` and
``allowed_groups`` are the broker's own policy and work on both platforms.
"""

from __future__ import annotations

from ..config import DEFAULT_LEASE_TIME, NetworkConfig


def unsupported_on_darwin(config: NetworkConfig) -> list[str]:
    """One sentence per thing ``config`` asks for that vmnet cannot do."""
    problems = []
    if config.dhcp_range is not None:
        problems.append("'dhcp_range' is not supported on macOS: vmnet's DHCP hands out the whole subnet")
    if config.lease_time != DEFAULT_LEASE_TIME:
        problems.append("'lease_time' is not supported on macOS: vmnet's DHCP has its own lease time")
    if config.dns_servers:
        problems.append("'dns_servers' is not supported on macOS: vmnet's DNS proxy forwards to the host's resolvers")
    if config.domain is not None:
        problems.append("'domain' is not supported on macOS: vmnet's DNS proxy serves no names of its own")
    if any(r.hostname is not None for r in config.reservations):
        problems.append("reservation 'hostname' is not supported on macOS: vmnet reserves an address by MAC only")
    if config.mode == "shared" and config.ipv6 is False:
        # A JSON file's "ipv6": false.  vmnet gives every shared network a
        # prefix; what can be switched off is what guests get from it.
        problems.append("'ipv6' false is not supported on macOS: vmnet gives a shared network IPv6; "
                        "a .plist file can set 'nat66' and 'router_advertisement' to false")  # fmt: skip
    return problems
