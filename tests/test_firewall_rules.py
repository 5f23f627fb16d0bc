"""The nftables batch (pure), and how apply/delete_table drive ``nft``.

Golden files live in tests/golden/; ``UPDATE_GOLDEN=1`` rewrites them.  The
rules' effect on real traffic is checked in test_e2e_services_units.py.
"""

import json
import os
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest

from vmnet_broker.backends.linux import firewall
from vmnet_broker.backends.linux.firewall import FirewallError, FirewallNetwork
from vmnet_broker.config import PortForward

from .conftest import assert_golden


SHARED = FirewallNetwork(
    name="shared",
    bridge="vmb-br0",
    mode="shared",
    subnet=IPv4Network("192.168.105.0/24"),
    ipv6_prefix=IPv6Network("fd00:1:2:3::/64"),
    port_forwards=(
        PortForward("tcp", 2222, IPv4Address("192.168.105.10"), 22),
        PortForward("udp", 5353, IPv4Address("192.168.105.10"), 53),
    ),
)
HOST = FirewallNetwork(name="host", bridge="vmb-br1", mode="host", subnet=IPv4Network("192.168.106.0/24"))
UPLINK = FirewallNetwork(
    name="lab", bridge="vmb-br2", mode="shared", subnet=IPv4Network("10.77.0.0/16"), external_interface="eth1"
)


def commands(batch):
    return batch["nftables"]


def rules(batch, chain=None):
    found = [c["add"]["rule"] for c in commands(batch) if "rule" in c.get("add", {})]
    return [r for r in found if chain is None or r["chain"] == chain]


def masquerades(batch):
    return [r for r in rules(batch, "postrouting") if {"masquerade": None} in r["expr"]]


def mentions(rule, value) -> bool:
    return value in json.dumps(rule["expr"])


def test_ruleset_matches_golden_file():
    batch = firewall.ruleset([SHARED, HOST, UPLINK])
    assert_golden("firewall_three_networks.json", json.dumps(batch, indent=1) + "\n")


def test_batch_starts_with_metainfo_then_replaces_the_table_whether_or_not_it_exists():
    batch = commands(firewall.ruleset([SHARED]))
    assert batch[0] == {"metainfo": {"json_schema_version": 1}}
    table = {"family": "inet", "name": "vmnet_broker"}
    assert batch[1:4] == [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    # Everything else lives in our table and nowhere else.
    for command in batch[4:]:
        (verb, objects), = command.items()
        (kind, obj), = objects.items()
        assert verb == "add" and obj["family"] == "inet" and obj["table"] == "vmnet_broker", command


def test_no_networks_means_the_batch_only_removes_the_table():
    batch = commands(firewall.ruleset([]))
    assert [next(iter(c)) for c in batch] == ["metainfo", "add", "delete"]
    assert "delete" in batch[-1]


def test_same_bridge_traffic_is_accepted_before_any_drop():
    batch = firewall.ruleset([SHARED, HOST])
    sets = {c["add"]["set"]["name"]: c["add"]["set"] for c in commands(batch) if "set" in c.get("add", {})}
    assert sets["intra"]["elem"] == [{"concat": ["vmb-br0", "vmb-br0"]}, {"concat": ["vmb-br1", "vmb-br1"]}]
    forward = rules(batch, "forward")
    intra = next(i for i, r in enumerate(forward) if mentions(r, "@intra"))
    first_drop = next(i for i, r in enumerate(forward) if {"drop": None} in r["expr"])
    assert intra < first_drop


def test_forward_chain_keeps_policy_accept_and_ends_dropping_anything_else_touching_our_bridges():
    batch = firewall.ruleset([SHARED, HOST])
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in commands(batch) if "chain" in c.get("add", {})}
    assert chains["forward"]["policy"] == "accept" and chains["forward"]["hook"] == "forward"
    last_two = rules(batch, "forward")[-2:]
    assert [r["expr"][-1] for r in last_two] == [{"drop": None}, {"drop": None}]
    assert mentions(last_two[0], "iifname") and mentions(last_two[1], "oifname")
    assert all(mentions(r, "@bridges") for r in last_two)


def test_host_mode_is_never_masqueraded_or_forwarded_out():
    batch = firewall.ruleset([HOST])
    assert masquerades(batch) == []
    accepts = [r for r in rules(batch, "forward") if {"accept": None} in r["expr"]]
    assert not any(mentions(r, "vmb-br1") for r in accepts)  # only via @intra and conntrack


def test_shared_masquerades_its_subnet_and_prefix_except_into_its_own_bridge():
    out = masquerades(firewall.ruleset([SHARED]))
    nat = [r for r in out if not mentions(r, "dnat")]
    assert len(nat) == 2
    assert mentions(nat[0], "192.168.105.0") and mentions(nat[1], "fd00:1:2:3::")
    for rule in nat:
        assert {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": {"set": ["lo", "vmb-br0"]}}} in rule[
            "expr"
        ]


def test_shared_may_not_forward_into_another_broker_bridge():
    out = [r for r in rules(firewall.ruleset([SHARED, HOST]), "forward") if r.get("comment", "").endswith(": out")]
    assert len(out) == 1
    assert {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "@bridges"}} in out[0]["expr"]


def test_external_interface_limits_forwarding_and_nat_to_it():
    batch = firewall.ruleset([UPLINK])
    (nat,) = masquerades(batch)
    (out,) = [r for r in rules(batch, "forward") if r.get("comment") == "lab: out"]
    for rule in (nat, out):
        assert {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth1"}} in rule["expr"]


def test_port_forwards_dnat_from_outside_and_from_the_host_but_not_loopback():
    batch = firewall.ruleset([SHARED])
    (pre,) = rules(batch, "prerouting")
    (out,) = rules(batch, "output")
    for rule in (pre, out):
        assert rule["expr"][-1] == {"jump": {"target": "portfwd"}} and mentions(rule, '"local"')
    assert mentions(out, "127.0.0.0")
    dnats = [r["expr"][-1] for r in rules(batch, "portfwd")]
    assert dnats == [
        {"dnat": {"family": "ip", "addr": "192.168.105.10", "port": 22}},
        {"dnat": {"family": "ip", "addr": "192.168.105.10", "port": 53}},
    ]
    accept = [r for r in rules(batch, "forward") if mentions(r, "dnat")]
    assert len(accept) == 1 and mentions(accept[0], "vmb-br0")
    # ...but not from another broker network.
    assert {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "@bridges"}} in accept[0]["expr"]


def test_no_port_forwards_no_dnat_rules():
    batch = firewall.ruleset([HOST, UPLINK])
    assert rules(batch, "prerouting") == rules(batch, "output") == rules(batch, "portfwd") == []


def test_same_host_port_in_two_networks_is_refused():
    twin = FirewallNetwork(
        "twin", "vmb-br3", "shared", IPv4Network("192.168.107.0/24"),
        port_forwards=(PortForward("tcp", 2222, IPv4Address("192.168.107.5"), 22),),
    )  # fmt: skip
    with pytest.raises(ValueError, match="tcp/2222"):
        firewall.ruleset([SHARED, twin])


def test_sysctls_follow_shared_networks_and_ipv6():
    assert firewall.sysctls([]) == {}
    assert firewall.sysctls([HOST]) == {}
    assert firewall.sysctls([HOST, UPLINK]) == {"net/ipv4/ip_forward": "1"}
    assert firewall.sysctls([SHARED]) == {"net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "1"}


# -- apply / delete_table with a stand-in nft -----------------------------------


@pytest.fixture
def fake_nft(tmp_path, monkeypatch):
    """An ``nft`` on PATH that logs its argv and stdin and answers from files."""
    script = tmp_path / "bin" / "nft"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {tmp_path}/argv\n'
        f"cat >> {tmp_path}/stdin\n"
        f"cat {tmp_path}/stdout 2>/dev/null\n"
        f"cat {tmp_path}/stderr >&2 2>/dev/null\n"
        f"exit $(cat {tmp_path}/rc 2>/dev/null || echo 0)\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    return tmp_path


def test_apply_sends_the_batch_as_json_on_stdin(fake_nft):
    firewall.apply([SHARED])
    assert (fake_nft / "argv").read_text() == "-j -f -\n"
    assert json.loads((fake_nft / "stdin").read_text()) == firewall.ruleset([SHARED])


def test_apply_failure_carries_rc_stderr_and_batch(fake_nft):
    (fake_nft / "rc").write_text("1")
    (fake_nft / "stderr").write_text("Error: Could not process rule: No such file or directory\n")
    with pytest.raises(FirewallError) as info:
        firewall.apply([SHARED])
    err = info.value
    assert err.rc == 1 and "No such file" in err.stderr and err.batch == firewall.ruleset([SHARED])
    assert str(err) == "nft failed (exit 1): Error: Could not process rule: No such file or directory"


@pytest.mark.parametrize("present", [True, False])
def test_delete_table_reports_whether_our_table_existed(fake_nft, present):
    tables = [{"metainfo": {"json_schema_version": 1}}, {"table": {"family": "inet", "name": "other", "handle": 1}}]
    if present:
        tables.append({"table": {"family": "inet", "name": "vmnet_broker", "handle": 2}})
    (fake_nft / "stdout").write_text(json.dumps({"nftables": tables}))
    assert firewall.delete_table() is present
    calls = (fake_nft / "argv").read_text().splitlines()
    assert calls[0] == "-j list tables inet"
    assert calls[1:] == (["-j -f -"] if present else [])


# -- the generator refuses what config.py should have refused (issue 8, class 1) ----

from dataclasses import replace  # noqa: E402


@pytest.mark.parametrize(
    "change",
    [
        {"external_interface": "eth*"},  # an nftables wildcard: every eth interface
        {"external_interface": "eth1\n"},
        {"external_interface": "a-name-too-long-for-linux"},
        {"bridge": "vmb br0"},
        {"name": "shared\nx"},
        {"name": 'shared" ; flush ruleset'},
        {"mode": "bridged"},
        {"subnet": "192.168.105.0/24"},
        {"ipv6_prefix": IPv6Network("fd00:1:2:3::%lo/64")},
        {"port_forwards": (PortForward("sctp", 2222, IPv4Address("192.168.105.10"), 22),)},
        {"port_forwards": (PortForward("tcp", 0, IPv4Address("192.168.105.10"), 22),)},
        {"port_forwards": (PortForward("tcp", True, IPv4Address("192.168.105.10"), 22),)},
        {"port_forwards": (PortForward("tcp", 2222, "192.168.105.10; drop", 22),)},
    ],
    ids=lambda c: f"{next(iter(c))}={next(iter(c.values()))!r}",
)
def test_a_value_outside_its_set_never_reaches_nft(change):
    with pytest.raises(ValueError, match="refusing"):
        firewall.ruleset([replace(SHARED, **change)])


def test_every_string_of_a_batch_is_plain():
    batch = firewall.ruleset([SHARED, HOST, UPLINK])
    firewall.check_batch_strings(batch)
    with pytest.raises(ValueError, match="refusing the string"):
        firewall.check_batch_strings({"nftables": [{"add": {"rule": {"comment": "x\ny"}}}]})
