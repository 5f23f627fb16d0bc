"""The bridge filter (guard.py): its batch (pure, golden), lease parsing, and
how the Guard drives ``nft``; plus the pieces beside it that need no network:
lease-file watching, programs run off the loop, dnsmasq started off the loop.

``UPDATE_GOLDEN=1`` rewrites tests/golden/guard_two_networks.json.  What the
rules do to real frames is checked in test_e2e_spoofing.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from vmnet_broker.backends.linux import dnsmasq, guard, leases, network, programs
from vmnet_broker.backends.linux.firewall import FirewallError
from vmnet_broker.backends.linux.guard import GuardPort

from .conftest import assert_golden

SHARED = IPv4Network("192.168.105.0/24")
LAB = IPv4Network("10.77.0.0/16")
PORTS = [
    GuardPort("vmb-t0", 21, "52:54:00:00:00:0a", SHARED, "forged-vmb-t0-0"),
    GuardPort("vmb-d0", 22, "52:54:00:00:00:0b", SHARED, "forged-vmb-d0-1"),
    GuardPort("vmb-p0", 23, "52:54:00:77:00:10", LAB, "forged-vmb-p0-2"),
]
OWNED = [("52:54:00:00:00:0a", IPv4Address("192.168.105.55")), ("52:54:00:77:00:10", IPv4Address("10.77.0.10"))]


def commands(batch):
    return batch["nftables"]


def rules(batch):
    return [c["add"]["rule"] for c in commands(batch) if "rule" in c.get("add", {})]


def elements(batch, name):
    added = [c["add"]["element"] for c in commands(batch) if "element" in c.get("add", {})]
    found = [element["elem"] for element in added if element["name"] == name]
    return found[0] if found else []


def test_ruleset_matches_golden_file():
    batch = guard.ruleset(PORTS, OWNED, {"forged-vmb-t1-7"})
    assert_golden("guard_two_networks.json", json.dumps(batch, indent=1) + "\n")


def test_the_table_is_refilled_never_deleted_so_counters_keep_counting():
    batch = commands(guard.ruleset(PORTS, OWNED))
    assert batch[0] == {"metainfo": {"json_schema_version": 1}}
    assert batch[1] == {"add": {"table": {"family": "bridge", "name": "vmnet_broker"}}}
    assert not any("delete" in c and "table" in c["delete"] for c in batch)
    # Every set and the chain are flushed before they are filled.
    for kind, name in [("chain", "prerouting"), ("set", "ports"), ("set", "port_mac"), ("set", "port_ip"),
                       ("set", "owned"), ("set", "owner"), ("map", "forged")]:  # fmt: skip
        obj = {"family": "bridge", "table": "vmnet_broker", "name": name}
        add = next(i for i, c in enumerate(batch) if c.get("add", {}).get(kind, {}).get("name") == name)
        assert batch[add + 1] == {"flush": {kind: obj}}, name
    # Everything lives in the bridge family's table of ours.
    for command in batch[1:]:
        ((verb, objects),) = command.items()
        ((_, obj),) = objects.items()
        assert obj["family"] == "bridge" and obj.get("table", obj.get("name")) == "vmnet_broker"


def test_each_port_has_its_mac_its_networks_sources_and_a_counter():
    batch = guard.ruleset(PORTS, OWNED)
    # By ifindex: a TAP's name is the next TAP's as soon as it is gone.
    assert sorted(elements(batch, "ports")) == [21, 22, 23]
    assert {"concat": [21, "52:54:00:00:00:0a"]} in elements(batch, "port_mac")
    # After the gateway (.1), before broadcast.
    assert {"concat": [21, {"range": ["192.168.105.2", "192.168.105.254"]}]} in elements(batch, "port_ip")
    assert {"concat": [23, {"range": ["10.77.0.2", "10.77.255.254"]}]} in elements(batch, "port_ip")
    assert elements(batch, "owned") == ["10.77.0.10", "192.168.105.55"]
    assert {"concat": ["52:54:00:00:00:0a", "192.168.105.55"]} in elements(batch, "owner")
    assert [21, "forged-vmb-t0-0"] in elements(batch, "forged")
    counters = [c["add"]["counter"]["name"] for c in commands(batch) if "counter" in c.get("add", {})]
    assert counters == ["forged-vmb-d0-1", "forged-vmb-p0-2", "forged-vmb-t0-0"]


def test_counters_of_attachments_gone_are_deleted_after_the_map_stops_naming_them():
    batch = commands(guard.ruleset(PORTS[:1], [], {"forged-vmb-d0-1", "forged-vmb-t0-0"}))
    deleted = [i for i, c in enumerate(batch) if "counter" in c.get("delete", {})]
    assert [batch[i]["delete"]["counter"]["name"] for i in deleted] == ["forged-vmb-d0-1"]  # not the live one
    flush = batch.index({"flush": {"map": {"family": "bridge", "table": "vmnet_broker", "name": "forged"}}})
    assert flush < deleted[0] and batch[deleted[0] - 1] == {"add": {"counter": batch[deleted[0]]["delete"]["counter"]}}


def test_changes_are_only_what_changed():
    many = {100 + i: GuardPort(f"vmb-t{i}", 100 + i, f"52:54:00:00:{i // 256:02x}:{i % 256:02x}", SHARED,
                               f"forged-vmb-t{i}-{i}") for i in range(1000)}  # fmt: skip
    owned = frozenset(OWNED)
    assert guard.changes(many, owned, dict(many), owned) is None
    one_more = {**many, 22: PORTS[1]}
    batch = guard.changes(many, owned, one_more, owned)
    assert len(json.dumps(batch)) < 2000
    assert [next(iter(c)) for c in commands(batch)][1:] == ["add"] * 5  # counter, ports, port_mac, port_ip, forged
    # A port gone, its name taken by another attachment, and a lease moving to another MAC.
    reused = GuardPort("vmb-t0", 5000, "52:54:00:00:00:99", SHARED, "forged-vmb-t0-1000")
    moved = frozenset({("52:54:00:00:00:99", IPv4Address("192.168.105.55")), OWNED[1]})
    rest = {index: port for index, port in many.items() if index != 100}
    batch = commands(guard.changes(one_more, owned, {**rest, 5000: reused}, moved))
    deletes = [c["delete"] for c in batch if "delete" in c]
    adds = [c["add"] for c in batch if "add" in c]
    assert batch.index({"delete": {"counter": guard._obj("forged-vmb-t0-0")}}) > batch.index(
        {"delete": {"element": {**guard._obj("forged"), "elem": [22, 100]}}})
    lost = {"element": {**guard._obj("owner"), "elem": [{"concat": ["52:54:00:00:00:0a", "192.168.105.55"]}]}}
    assert lost in deletes
    assert not any(d.get("element", {}).get("name") == "owned" for d in deletes)  # still someone's
    assert {"element": {**guard._obj("port_mac"), "elem": [{"concat": [5000, "52:54:00:00:00:99"]}]}} in adds
    assert {"counter": guard._obj("forged-vmb-t0-1000")} in adds


def test_rules_in_order_only_our_ports_unknown_ports_mac_then_addresses():
    found = rules(guard.ruleset(PORTS, OWNED))
    comments = [r["comment"] for r in found]
    assert comments == [
        "not a guest port",
        "a port being attached",
        "source MAC not assigned to the port",
        "ARP: sender MAC not assigned to the port",
        "ARP: sender address outside the network",
        "ARP: sender address owned by another MAC",
        "DHCP from a guest without an address",
        "IPv4: source outside the network",
        "IPv4: source owned by another MAC",
    ]
    assert found[0]["expr"][0] == {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "vmb-*"}}
    # Every drop but the unknown port's is counted in the port's own counter.
    for rule in found[2:]:
        if {"drop": None} in rule["expr"]:
            assert {"counter": {"map": {"key": {"meta": {"key": "iif"}}, "data": "@forged"}}} in rule["expr"]
    chain = next(c["add"]["chain"] for c in commands(guard.ruleset(PORTS, OWNED)) if "chain" in c.get("add", {}))
    assert (chain["hook"], chain["prio"], chain["policy"]) == ("prerouting", -200, "accept")


def test_no_ports_still_makes_the_table_and_its_rules():
    batch = guard.ruleset([], [])
    assert len(rules(batch)) == 9 and elements(batch, "ports") == []


@pytest.mark.parametrize(
    "port",
    [
        GuardPort("eth0", 21, "52:54:00:00:00:0a", SHARED, "forged-eth0-0"),  # not ours
        GuardPort("vmb-t0\n", 21, "52:54:00:00:00:0a", SHARED, "forged-vmb-t0-0"),
        GuardPort("vmb-t*", 21, "52:54:00:00:00:0a", SHARED, "forged-vmb-t0-0"),
        GuardPort("vmb-t0", 21, "52:54:00:00:00:0A", SHARED, "forged-vmb-t0-0"),
        GuardPort("vmb-t0", 21, "52:54:00:00:00:0a\n", SHARED, "forged-vmb-t0-0"),
        GuardPort("vmb-t0", 21, "52:54:00:00:00:0a", "192.168.105.0/24", "forged-vmb-t0-0"),
        GuardPort("vmb-t0", 21, "52:54:00:00:00:0a", SHARED, "forged; flush ruleset"),
        GuardPort("vmb-t0", "21", "52:54:00:00:00:0a", SHARED, "forged-vmb-t0-0"),
        GuardPort("vmb-t0", 0, "52:54:00:00:00:0a", SHARED, "forged-vmb-t0-0"),
    ],
    ids=repr,
)
def test_a_value_outside_its_set_never_reaches_nft(port):
    with pytest.raises(ValueError, match="refusing"):
        guard.ruleset([port], [])


def test_owned_addresses_are_checked_too():
    with pytest.raises(ValueError, match="refusing"):
        guard.ruleset(PORTS, [("52:54:00:00:00:0a", "192.168.105.55")])
    with pytest.raises(ValueError, match="refusing"):
        guard.ruleset([PORTS[0], PORTS[0]], [])  # one port (ifindex) twice


def test_leases_are_read_strictly():
    text = (
        "1733040000 52:54:00:00:00:0a 192.168.105.55 vm1 01:52:54:00:00:00:0a\n"
        "1733040000 52:54:00:00:00:0b 192.168.105.56 * *\n"
        "1733040000 52:54:00:00:00:0c 10.0.0.9 * *\n"  # not this network's
        "duid 00:01:00:01:2c:5f:1a:2b:52:54:00:00:00:0a\n"
        "1733040000 1234 fd00::5 * 00:01\n"  # DHCPv6
        "1733040000 52:54:00:00:00:0d 192.168.105\n"  # cut short by a rewrite
        "17330 52:54:00:00:00:0E 192.168.105.57 * *\n"  # uppercase: not dnsmasq's
        "x 52:54:00:00:00:0f 192.168.105.58 * *\n"
    )
    assert guard.parse_leases(text, SHARED) == {
        ("52:54:00:00:00:0a", IPv4Address("192.168.105.55")),
        ("52:54:00:00:00:0b", IPv4Address("192.168.105.56")),
    }


# -- the Guard, with a stand-in nft -----------------------------------------------------


@pytest.fixture
def fake_nft(tmp_path, monkeypatch):
    """An ``nft`` on PATH that logs each run's argv and stdin, then answers from files."""
    script = tmp_path / "bin" / "nft"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {tmp_path}/argv\n'
        f"n=$(( $(cat {tmp_path}/n 2>/dev/null || echo 0) + 1 )); echo $n > {tmp_path}/n\n"
        f"cat > {tmp_path}/stdin.$n\n"
        f"sleep $(cat {tmp_path}/delay 2>/dev/null || echo 0)\n"
        f"cat {tmp_path}/stdout 2>/dev/null\n"
        f"cat {tmp_path}/stderr >&2 2>/dev/null\n"
        f"exit $(cat {tmp_path}/rc 2>/dev/null || echo 0)\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    return tmp_path


def batches(tmp_path):
    """What each run that got a batch on stdin got, in order."""
    runs = sorted(tmp_path.glob("stdin.*"), key=lambda p: int(p.suffix[1:]))
    return [json.loads(p.read_text()) for p in runs if p.read_text()]


def test_a_burst_of_ports_is_one_or_two_batches_and_each_add_is_done_once_its_batch_is_in(fake_nft):
    async def main():
        g = guard.Guard(asyncio.get_running_loop())
        (fake_nft / "delay").write_text("0.2")
        first = g.add(g.port("vmb-t0", 20, "52:54:00:00:00:0a", SHARED))
        await asyncio.sleep(0.05)  # the first batch is running
        rest = [g.add(g.port(f"vmb-t{i}", 20 + i, f"52:54:00:00:00:1{i}", SHARED)) for i in range(1, 6)]
        assert not first.done()
        await asyncio.wait_for(asyncio.gather(first, *rest), 5)
        return g

    asyncio.run(main())
    sent = batches(fake_nft)
    assert len(sent) == 2  # the five that came while the first ran went together
    assert elements(sent[0], "ports") == [20] and len(elements(sent[1], "ports")) == 5
    assert not any("flush" in c for c in commands(sent[1]))  # only what changed


def test_a_failed_batch_fails_its_waiters_and_the_next_change_tries_again(fake_nft):
    async def main():
        g = guard.Guard(asyncio.get_running_loop())
        (fake_nft / "rc").write_text("1")
        (fake_nft / "stderr").write_text("Error: Could not process rule: No such file or directory\n")
        port = g.port("vmb-t0", 20, "52:54:00:00:00:0a", SHARED)
        with pytest.raises(FirewallError, match="No such file"):
            await asyncio.wait_for(g.add(port), 5)
        (fake_nft / "rc").unlink()
        g.remove(port)
        await g.settled()
        # The counter never made it into the kernel: nothing to delete.
        return batches(fake_nft)[-1]

    last = asyncio.run(main())
    # After a failure the next batch says everything again (here: no ports; a
    # counter that may have made it in is deleted if it did).
    assert elements(last, "ports") == [] and {"flush": {"chain": guard._obj("prerouting")}} in commands(last)


def test_a_removed_ports_counter_is_deleted_and_counters_are_read_back(fake_nft):
    async def main():
        g = guard.Guard(asyncio.get_running_loop())
        port = g.port("vmb-t0", 20, "52:54:00:00:00:0a", SHARED)
        await asyncio.wait_for(g.add(port), 5)
        listing = {"nftables": [{"metainfo": {}}, {"counter": {"family": "bridge", "name": port.counter,
                                                               "table": "vmnet_broker", "packets": 7, "bytes": 420}}]}
        (fake_nft / "stdout").write_text(json.dumps(listing))
        assert g.forged(port) == {"packets": 0, "bytes": 0}  # the first reading is under way
        deadline = time.monotonic() + 5
        while g.forged(port)["packets"] == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert g.forged(port) == {"packets": 7, "bytes": 420}
        (fake_nft / "stdout").unlink()
        g.remove(port)
        await g.settled()

    asyncio.run(main())
    last = batches(fake_nft)[-1]
    assert {"delete": {"counter": guard._obj("forged-vmb-t0-0")}} in commands(last)
    assert "-j list counters table bridge vmnet_broker" in (fake_nft / "argv").read_text()


def test_an_attach_does_not_wait_for_a_detachs_deletions_which_follow_on_their_own(fake_nft):
    async def main():
        g = guard.Guard(asyncio.get_running_loop())
        old = g.port("vmb-t0", 20, "52:54:00:00:00:0a", SHARED)
        await g.add(old)
        g.remove(old)  # its TAP is gone; the next TAP takes its name, not its ifindex
        await g.add(g.port("vmb-t0", 27, "52:54:00:00:00:0b", SHARED))
        deadline = time.monotonic() + 5
        while len(batches(fake_nft)) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(guard.REMOVE_DELAY)

    asyncio.run(main())
    first, attach, later = batches(fake_nft)
    # Deleting costs the kernel an RCU grace period: the attach's batch only adds...
    assert elements(attach, "ports") == [27] and not any("delete" in c for c in commands(attach))
    # ... and the old port's elements and counter go in a batch of their own.
    deleted = [c["delete"] for c in commands(later) if "delete" in c]
    assert {"element": {**guard._obj("ports"), "elem": [20]}} in deleted
    assert {"counter": guard._obj("forged-vmb-t0-0")} in deleted and not any("add" in c for c in commands(later))


# -- link-local learning off, through sysfs ------------------------------------------------


def fake_sys(tmp_path, index: int, mac: str):
    bridge = tmp_path / "vmb-br0"
    (bridge / "bridge").mkdir(parents=True)
    (bridge / "ifindex").write_text(f"{index}\n")
    (bridge / "address").write_text(f"{mac}\n")
    (bridge / "bridge" / "no_linklocal_learn").write_text("0\n")
    return bridge / "bridge" / "no_linklocal_learn"


def test_link_local_learning_is_turned_off_on_our_bridge(tmp_path):
    option = fake_sys(tmp_path, 7, "02:00:00:00:00:fe")
    network.no_linklocal_learning("vmb-br0", 7, "02:00:00:00:00:fe", str(tmp_path))
    assert option.read_text() == "1"


@pytest.mark.parametrize("index,mac", [(8, "02:00:00:00:00:fe"), (7, "02:00:00:00:00:ff")])
def test_a_sysfs_of_another_namespace_is_left_alone_and_said_so(tmp_path, caplog, index, mac):
    option = fake_sys(tmp_path, index, mac)
    with caplog.at_level(logging.WARNING):
        network.no_linklocal_learning("vmb-br0", 7, "02:00:00:00:00:fe", str(tmp_path))
    assert option.read_text() == "0\n" and "not this network namespace's" in caplog.text


# -- lease files, watched -----------------------------------------------------------------


def test_a_rewritten_lease_file_is_reported_once_per_burst(tmp_path):
    async def main():
        seen = []
        watcher = leases.LeaseFiles(str(tmp_path), asyncio.get_running_loop(), seen.append)
        try:
            path = tmp_path / "dnsmasq-shared.leases"
            with open(path, "w") as f:  # dnsmasq: truncate and write, several times
                for i in range(5):
                    f.write(f"{i}\n")
                    f.flush()
            (tmp_path / "dnsmasq-shared.conf").write_text("not a lease file")
            await asyncio.sleep(leases.QUIET * 5)
            return seen
        finally:
            watcher.close()

    assert asyncio.run(main()) == ["dnsmasq-shared.leases"]


# -- programs off the loop ------------------------------------------------------------------


def test_a_program_that_hangs_is_killed_with_what_it_started(tmp_path):
    pids = tmp_path / "pids"
    script = f"sleep 30 & echo $! > {pids}; echo $$ >> {pids}; wait"

    async def main():
        started = time.monotonic()
        with pytest.raises(programs.ProgramTimeout, match="did not finish within 0.3 s"):
            await programs.run(["sh", "-c", script], timeout=0.3)
        return time.monotonic() - started

    assert asyncio.run(main()) < 3
    for pid in map(int, pids.read_text().split()):
        assert not dnsmasq.process_running(pid), f"{pid} still runs"


def test_a_program_gets_its_stdin_and_gives_its_output():
    proc = asyncio.run(programs.run(["sh", "-c", "cat; echo oops >&2; exit 3"], "batch", timeout=5))
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "batch", "oops\n")


class LoopWatch:
    """Counts the turns a 10 ms ticker gets on the loop inside the ``async with``.

    A blocked loop gives it none until the block ends; timing the gaps
    instead said nothing on a machine loaded enough to starve the process.
    """

    async def __aenter__(self) -> "LoopWatch":
        self.ticks = 0
        self.counting = True

        async def tick():
            while True:
                await asyncio.sleep(0.01)
                self.ticks += self.counting

        self.task = asyncio.create_task(tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.counting = False
        self.task.cancel()


def test_the_loop_keeps_running_while_a_program_runs(tmp_path):
    # The program waits until the loop has had turns: a blocking run would never end (but time out).
    go = tmp_path / "go"
    script = f"while [ ! -e {go} ]; do sleep 0.01; done"

    async def main():
        async with LoopWatch() as watch:
            running = asyncio.create_task(programs.run(["sh", "-c", script], timeout=10))
            while watch.ticks < 3:
                await asyncio.sleep(0.01)
            go.touch()
            await running
        return watch.ticks

    assert asyncio.run(main()) >= 3


# -- dnsmasq started and stopped off the loop ----------------------------------------------


@pytest.fixture
def hanging_dnsmasq(tmp_path, monkeypatch):
    """A "dnsmasq" that never writes its pid file, and ignores SIGTERM."""
    script = tmp_path / "bin" / "dnsmasq"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.05; done\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(dnsmasq, "START_TIMEOUT", 0.5)
    monkeypatch.setattr(dnsmasq, "STOP_TIMEOUT", 0.3)
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    spec = dnsmasq.DnsmasqSpec(name="shared", bridge="vmb-br0", subnet=SHARED, gateway=SHARED.network_address + 1)
    return dnsmasq.Dnsmasq(spec, state)


def test_a_dnsmasq_that_never_gets_ready_fails_the_start_without_blocking_the_loop(hanging_dnsmasq):
    server = hanging_dnsmasq

    async def main():
        async with LoopWatch() as watch:
            started = time.monotonic()
            with pytest.raises(dnsmasq.DnsmasqError, match="not ready after 0.5 s"):
                await server.start_async()
        return watch.ticks, time.monotonic() - started

    ticks, took = asyncio.run(main())
    assert took >= 0.8  # 0.5 s to start, 0.3 s more to give up on SIGTERM, then SIGKILL
    assert ticks >= 1  # the loop had turns meanwhile (~80 on an idle machine)
    assert server.pid is None and not server.paths["pid"].exists()
