"""What of a network's configuration the Linux backend cannot do (pure).

``load_config_dir`` refuses a file asking for any of it, naming the key,
instead of creating a network that quietly does less.  Each refusal below
says what the backend does instead: a shared network always masquerades
(firewall.py), and a network with IPv6 always has NAT66 (shared) and
router advertisements from its dnsmasq (dnsmasq.py) on a /64.
"""

from __future__ import annotations

from ..config import NetworkConfig


def unsupported_on_linux(config: NetworkConfig) -> list[str]:
    """One sentence per thing ``config`` asks for that this backend cannot do."""
    problems = []
    if config.mode == "shared" and not config.nat44:
        problems.append("'nat44' false is not supported on Linux: a shared network always masquerades IPv4 "
                        "(for no NAT use mode 'host')")  # fmt: skip
    if config.ipv6 and config.mode == "shared" and not config.nat66:
        problems.append("'nat66' false is not supported on Linux: a shared network with IPv6 always masquerades it")
    if config.ipv6 and not config.router_advertisement:
        problems.append("'router_advertisement' false is not supported on Linux: a network with IPv6 always "
                        "advertises its prefix")  # fmt: skip
    if config.ipv6_prefix is not None and config.ipv6_prefix.prefixlen != 64:
        problems.append(f"'ipv6_prefix_length' {config.ipv6_prefix.prefixlen} is not supported on Linux: "
                        "only a /64 (SLAAC)")  # fmt: skip
    for forward in config.port_forwards:
        if forward.guest_ip.version == 6:
            problems.append(f"port forward {forward.proto}/{forward.host_port} to IPv6 address {forward.guest_ip} "
                            "is not supported on Linux: IPv4 guests only")  # fmt: skip
    return problems
