"""NAT and isolation for broker networks: one nftables table the broker owns.

Every change rebuilds the whole ``inet vmnet_broker`` table in one atomic
``nft -j -f -`` transaction; the host's other tables are never touched, and
removing the broker's rules is deleting that table.

What the rules do (the forward chain's policy is accept, so traffic that has
nothing to do with our bridges is left alone):

- ``shared``: IPv4 (and, with a prefix, IPv6) from the network's subnet may
  leave by any interface that is not a broker bridge (or only by
  ``external_interface``), masqueraded; replies come back by conntrack.
  Nothing new enters the bridge from outside except port forwards.
- ``host``: nothing is forwarded into or out of the bridge.  The host's own
  input is not filtered here: guests reach the gateway (DHCP, DNS, anything)
  unless another table of the host drops it, which an accept of ours could
  not override anyway.
- Between two broker networks nothing is forwarded.  Frames between two ports
  of one bridge are accepted: with br_netfilter active they traverse the
  forward hook as ``iifname == oifname == bridge``.
- Port forwards DNAT ``host_port`` on any of the namespace's own addresses to
  a guest, from outside (prerouting) and from the host itself (output).  From
  the host, connect to a non-loopback address: 127.0.0.0/8 is not forwarded,
  because routing a loopback source out of the bridge needs ``route_localnet``,
  which would also let guests reach the host's 127.0.0.1 services
  (CVE-2020-8558).

The batch is JSON, so no value can start a second command; still, every
value is checked before it goes in (names and interface names whole, against
explicit character sets, addresses and networks parsed and unscoped, ports
and protocols from their sets), and every string of the finished batch
against one set: an interface name such as ``eth*`` (an nftables wildcard) or
one with a newline never reaches ``nft``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Sequence

from ...config import MODES, PROTOS, PortForward, valid_ifname, valid_name
from . import names

FAMILY = "inet"
TABLE = names.NFT_TABLE
# Priorities as numbers: 1.0.6 rejects the name "dstnat" for the output hook.
PRIO_FILTER = 0
PRIO_DSTNAT = -100
PRIO_SRCNAT = 100
NFT_TIMEOUT = 30
# Every string in a batch: names, interface names, addresses, keywords and
# operators and our comments ("shared: tcp/8080", "guests of one network (br_netfilter)").
_BATCH_STRING = re.compile(r"[A-Za-z0-9 _.:/@()!=-]*")


@dataclass(frozen=True)
class FirewallNetwork:
    name: str
    bridge: str
    mode: str  # "shared" | "host"
    subnet: ipaddress.IPv4Network
    ipv6_prefix: ipaddress.IPv6Network | None = None
    external_interface: str | None = None
    port_forwards: tuple[PortForward, ...] = ()


class FirewallError(Exception):
    """``nft`` refused a batch; carries its exit code, stderr and the batch."""

    def __init__(self, rc: int, stderr: str, batch: dict[str, Any] | None = None) -> None:
        self.rc = rc
        self.stderr = stderr
        self.batch = batch
        super().__init__(f"nft failed (exit {rc}): {stderr.strip() or 'no error text'}")


# -- the ruleset (pure) -------------------------------------------------------


def sysctls(networks: Sequence[FirewallNetwork]) -> dict[str, str]:
    """Namespace-local sysctls (paths under /proc/sys) the ruleset relies on.

    Never turned back off: something else on the host may rely on forwarding.
    Turning on IPv6 forwarding makes interfaces with ``accept_ra=1`` ignore
    router advertisements; an uplink configured by SLAAC needs ``accept_ra=2``.
    """
    shared = [n for n in networks if n.mode == "shared"]
    result: dict[str, str] = {}
    if shared:
        result["net/ipv4/ip_forward"] = "1"
    if any(n.ipv6_prefix is not None for n in shared):
        result["net/ipv6/conf/all/forwarding"] = "1"
    return result


def ruleset(networks: Sequence[FirewallNetwork]) -> dict[str, Any]:
    """The ``{"nftables": [...]}`` batch that replaces our table with these networks.

    With no networks the batch only removes the table.  Raises ValueError when
    two networks forward the same host port.
    """
    table = {"family": FAMILY, "name": TABLE}
    # "add" first so that "delete" finds a table whether or not one existed.
    commands: list[dict[str, Any]] = [
        {"metainfo": {"json_schema_version": 1}},
        {"add": {"table": table}},
        {"delete": {"table": table}},
    ]
    if not networks:
        return {"nftables": commands}
    for net in networks:
        _check_values(net)
    _check_port_forwards(networks)
    bridges = sorted(n.bridge for n in networks)
    commands += [
        {"add": {"table": table}},
        _set("bridges", "ifname", bridges),
        # Kernel sets cannot compare iifname with oifname; a set of
        # "bridge . bridge" pairs can.
        _set("intra", ["ifname", "ifname"], [{"concat": [b, b]} for b in bridges]),
        _chain("forward", "filter", "forward", PRIO_FILTER),
        _chain("prerouting", "nat", "prerouting", PRIO_DSTNAT),
        _chain("output", "nat", "output", PRIO_DSTNAT),
        _chain("postrouting", "nat", "postrouting", PRIO_SRCNAT),
        {"add": {"chain": {"family": FAMILY, "table": TABLE, "name": "portfwd"}}},
    ]
    commands += _forward_rules(networks)
    commands += _nat_rules(networks)
    batch = {"nftables": commands}
    check_batch_strings(batch)
    return batch


def _check_values(net: FirewallNetwork) -> None:
    """Raise ValueError for any value of ``net`` outside what it may be."""
    problems = []
    if not valid_name(net.name):
        problems.append(f"network name {net.name!r}")
    if net.mode not in MODES:
        problems.append(f"mode {net.mode!r}")
    for ifname in (net.bridge, net.external_interface):
        if ifname is not None and not valid_ifname(ifname):
            problems.append(f"interface name {ifname!r}")
    if not isinstance(net.subnet, ipaddress.IPv4Network):
        problems.append(f"subnet {net.subnet!r}")
    if net.ipv6_prefix is not None and (
        not isinstance(net.ipv6_prefix, ipaddress.IPv6Network) or net.ipv6_prefix.network_address.scope_id
    ):
        problems.append(f"IPv6 prefix {str(net.ipv6_prefix)!r}")
    for pf in net.port_forwards:
        ports_ok = all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535
                       for p in (pf.host_port, pf.guest_port))  # fmt: skip
        if pf.proto not in PROTOS or not ports_ok or not isinstance(pf.guest_ip, ipaddress.IPv4Address):
            problems.append(f"port forward {pf!r}")
    if problems:
        raise ValueError(f"nftables rules for {net.name!r}: refusing {'; '.join(problems)}")


def check_batch_strings(value: Any, allowed: re.Pattern[str] = _BATCH_STRING, what: str = "nftables batch") -> None:
    """Every string anywhere in a batch (keys included), whole, against ``allowed``."""
    if isinstance(value, str):
        if not allowed.fullmatch(value):
            raise ValueError(f"{what}: refusing the string {value!r}")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_batch_strings(key, allowed, what)
            check_batch_strings(item, allowed, what)
    elif isinstance(value, list):
        for item in value:
            check_batch_strings(item, allowed, what)


def _forward_rules(networks: Sequence[FirewallNetwork]) -> list[dict[str, Any]]:
    rules = [
        _rule("forward", _match(_ct("state"), ["established", "related"], "in"), _ACCEPT),
        _rule("forward", _match(_concat(_meta("iifname"), _meta("oifname")), "@intra"), _ACCEPT,
              comment="guests of one network (br_netfilter)"),
    ]  # fmt: skip
    for net in networks:
        if net.mode != "shared":
            continue
        out = _egress(net, _match(_meta("oifname"), "@bridges", "!="))
        rules.append(_rule("forward", _match(_meta("iifname"), net.bridge), _match(_ip("saddr"), _prefix(net.subnet)),
                           out, _ACCEPT, comment=f"{net.name}: out"))  # fmt: skip
        if net.ipv6_prefix is not None:
            rules.append(_rule("forward", _match(_meta("iifname"), net.bridge),
                               _match(_ip6("saddr"), _prefix(net.ipv6_prefix)), out, _ACCEPT,
                               comment=f"{net.name}: out (IPv6)"))  # fmt: skip
        if net.port_forwards:
            rules.append(_rule("forward", _match(_meta("iifname"), "@bridges", "!="),
                               _match(_meta("oifname"), net.bridge), _match(_ct("status"), "dnat", "in"), _ACCEPT,
                               comment=f"{net.name}: port forwards"))  # fmt: skip
    rules += [
        _rule("forward", _match(_meta("iifname"), "@bridges"), _DROP),
        _rule("forward", _match(_meta("oifname"), "@bridges"), _DROP),
    ]
    return rules


def _nat_rules(networks: Sequence[FirewallNetwork]) -> list[dict[str, Any]]:
    rules = []
    forwards = [(net, pf) for net in networks if net.mode == "shared" for pf in net.port_forwards]
    if forwards:
        local_daddr = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
        rules += [
            _rule("prerouting", _match(_meta("nfproto"), "ipv4"), local_daddr, {"jump": {"target": "portfwd"}}),
            _rule("output", _match(_ip("daddr"), _prefix(ipaddress.IPv4Network("127.0.0.0/8")), "!="), local_daddr,
                  {"jump": {"target": "portfwd"}}, comment="not loopback: see route_localnet"),
        ]  # fmt: skip
        for net, pf in forwards:
            rules.append(_rule("portfwd", _match(_meta("l4proto"), pf.proto),
                               _match({"payload": {"protocol": "th", "field": "dport"}}, pf.host_port),
                               {"dnat": {"family": "ip", "addr": str(pf.guest_ip), "port": pf.guest_port}},
                               comment=f"{net.name}: {pf.proto}/{pf.host_port}"))  # fmt: skip
    for net in networks:
        if net.mode != "shared":
            continue
        # lo: a host process using the gateway address as source to reach
        # another local address must keep it.
        out = _egress(net, _match(_meta("oifname"), {"set": sorted([net.bridge, "lo"])}, "!="))
        rules.append(_rule("postrouting", _match(_ip("saddr"), _prefix(net.subnet)), out, _MASQUERADE,
                           comment=f"{net.name}: NAT"))  # fmt: skip
        if net.ipv6_prefix is not None:
            rules.append(_rule("postrouting", _match(_ip6("saddr"), _prefix(net.ipv6_prefix)), out, _MASQUERADE,
                               comment=f"{net.name}: NAT66"))  # fmt: skip
        if net.port_forwards:
            # Replies must come back through us: from a guest of the same
            # network (hairpin) and from the host itself, whose source address
            # a guest without a default route could not answer.
            into = [_match(_meta("oifname"), net.bridge), _match(_ct("status"), "dnat", "in")]
            rules += [
                _rule("postrouting", *into, _match(_ip("saddr"), _prefix(net.subnet)), _MASQUERADE,
                      comment=f"{net.name}: port forward hairpin"),
                _rule("postrouting", *into, _match({"fib": {"result": "type", "flags": ["saddr"]}}, "local"),
                      _MASQUERADE, comment=f"{net.name}: port forward from the host"),
            ]  # fmt: skip
    return rules


def _check_port_forwards(networks: Sequence[FirewallNetwork]) -> None:
    owner: dict[tuple[str, int], str] = {}
    for net in networks:
        for pf in net.port_forwards if net.mode == "shared" else ():
            key = (pf.proto, pf.host_port)
            if key in owner:
                raise ValueError(f"port forward {pf.proto}/{pf.host_port} of {net.name!r} is already {owner[key]!r}'s")
            owner[key] = net.name


_ACCEPT: dict[str, Any] = {"accept": None}
_DROP: dict[str, Any] = {"drop": None}
_MASQUERADE: dict[str, Any] = {"masquerade": None}


def _egress(net: FirewallNetwork, otherwise: dict[str, Any]) -> dict[str, Any]:
    """Where a shared network's traffic may leave: its pinned uplink, or ``otherwise``."""
    if net.external_interface:
        return _match(_meta("oifname"), net.external_interface)
    return otherwise


def _set(name: str, kind: str | list[str], elements: list[Any]) -> dict[str, Any]:
    return {"add": {"set": {"family": FAMILY, "table": TABLE, "name": name, "type": kind, "elem": elements}}}


def _chain(name: str, kind: str, hook: str, prio: int) -> dict[str, Any]:
    chain = {"family": FAMILY, "table": TABLE, "name": name, "type": kind, "hook": hook, "prio": prio}
    return {"add": {"chain": {**chain, "policy": "accept"}}}


def _rule(chain: str, *expr: dict[str, Any], comment: str | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"family": FAMILY, "table": TABLE, "chain": chain, "expr": list(expr)}
    if comment:
        rule["comment"] = comment
    return {"add": {"rule": rule}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _ct(key: str) -> dict[str, Any]:
    return {"ct": {"key": key}}


def _ip(field: str) -> dict[str, Any]:
    return {"payload": {"protocol": "ip", "field": field}}


def _ip6(field: str) -> dict[str, Any]:
    return {"payload": {"protocol": "ip6", "field": field}}


def _concat(*parts: Any) -> dict[str, Any]:
    return {"concat": list(parts)}


def _prefix(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> dict[str, Any]:
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


# -- applying it --------------------------------------------------------------
#
# The nft binary, not python3-nftables: those bindings are a Debian package
# built for the system interpreter, and the broker runs on others.  JSON in,
# so no quoting of names; one -f batch is one netlink transaction.


def _nft(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    try:
        return subprocess.run([nft, *args], input=stdin, capture_output=True, text=True, timeout=NFT_TIMEOUT)
    except OSError as e:
        raise FirewallError(127, f"cannot run {nft}: {e}") from e


def apply(networks: Sequence[FirewallNetwork]) -> None:
    """Replace our table with the rules for ``networks``, atomically (none: no table)."""
    batch = ruleset(networks)
    proc = _nft(["-j", "-f", "-"], json.dumps(batch))
    if proc.returncode != 0:
        raise FirewallError(proc.returncode, proc.stderr, batch)


def delete_tables(*families: str) -> None:
    """Remove our tables of these families, whether or not they exist, in one ``nft`` run (shutdown)."""
    commands: list[dict[str, Any]] = [{"metainfo": {"json_schema_version": 1}}]
    for family in families:
        table = {"family": family, "name": TABLE}
        commands += [{"add": {"table": table}}, {"delete": {"table": table}}]
    batch = {"nftables": commands}
    proc = _nft(["-j", "-f", "-"], json.dumps(batch))
    if proc.returncode != 0:
        raise FirewallError(proc.returncode, proc.stderr, batch)


def delete_table(family: str = FAMILY) -> bool:
    """Remove our table of ``family`` if present; True if there was one.

    ``inet``: this module's; ``bridge``: the bridge filter's (guard.py).
    """
    listed = _nft(["-j", "list", "tables", family])
    if listed.returncode != 0:
        raise FirewallError(listed.returncode, listed.stderr)
    tables = json.loads(listed.stdout or "{}").get("nftables", [])
    existed = any(item.get("table", {}).get("name") == TABLE for item in tables)
    if existed:
        # add + delete: no error if someone removed it meanwhile
        table = {"family": family, "name": TABLE}
        batch = {"nftables": [{"metainfo": {"json_schema_version": 1}}, {"add": {"table": table}},
                              {"delete": {"table": table}}]}  # fmt: skip
        proc = _nft(["-j", "-f", "-"], json.dumps(batch))
        if proc.returncode != 0:
            raise FirewallError(proc.returncode, proc.stderr, batch)
    return existed
