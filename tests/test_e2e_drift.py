"""State changed behind the broker's back (issue 8, class 5; and class 7's dnsmasq).

A real broker in a namespace; root changes that namespace under it with
``ip``, as an administrator, a script or a VPN client would: deletes a
bridge or a TAP, flushes the gateway, adds a route in a policy table, kills
dnsmasq again and again.  The broker must notice (``degraded`` in status,
and its log), refuse what can no longer work, and never act on a link that
merely has the name of one it created.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from vmnet_broker import Client, CreateFailed
from vmnet_broker.backends.linux.dnsmasq import process_running
from vmnet_broker.guest import Guest

from .conftest import require_services, wait_for


@pytest.fixture
def start(start_broker):
    require_services()
    return start_broker


def degraded(client: Client, name: str) -> str | None:
    for net in client.status().networks:
        if net.name == name:
            return net.raw["degraded"]
    raise AssertionError(f"no network {name!r} in status")


def ifindex(ns, name: str) -> int | None:
    result = ns.ip("-j", "link", "show", name, check=False)
    return json.loads(result.stdout)[0]["ifindex"] if result.returncode == 0 else None


def dnsmasq_pid(broker, name: str) -> int | None:
    try:
        return int((Path(broker.state_dir) / f"dnsmasq-{name}.pid").read_text())
    except (OSError, ValueError):
        return None


def test_a_deleted_bridge_degrades_its_network_which_refuses_attach_and_deletes_nothing_by_name(start):
    broker = start(idle_timeout=1)
    ns = broker.namespace
    with Client(broker.socket_path) as first, Client(broker.socket_path) as second:
        shared = first.acquire_network("shared")
        index = ifindex(ns, shared.bridge)
        dnsmasq = dnsmasq_pid(broker, "shared")
        ns.ip("link", "del", shared.bridge)

        expected = f"bridge {shared.bridge} (ifindex {index}) was deleted outside the broker"
        assert wait_for(lambda: degraded(first, "shared") == expected, 5), degraded(first, "shared")
        # Another network does not take the name while the first has it on record.
        host = second.acquire_network("host")
        assert host.bridge != shared.bridge
        host_index = ifindex(ns, host.bridge)
        # The degraded network refuses attach, clearly, and changes nothing.
        with pytest.raises(CreateFailed) as info:
            first.attach("shared")
        assert info.value.code == 6
        assert "network 'shared' is degraded: " + expected in str(info.value)
        assert _tap_names(ns) == []
        # Its dnsmasq is stopped: bound by name, it would take up the next link so named.
        assert wait_for(lambda: not process_running(dnsmasq), 5)
        assert degraded(second, "host") is None

        # Someone else makes a link of the dead bridge's name; the broker's
        # idle removal of the dead network must not touch it.
        ns.ip("link", "add", shared.bridge, "type", "bridge")
        stranger = ifindex(ns, shared.bridge)
        first.release("shared")
        assert wait_for(lambda: "shared" not in {n.name for n in second.status().networks}, 5)
        assert ifindex(ns, shared.bridge) == stranger
        assert ifindex(ns, host.bridge) == host_index
        ns.ip("link", "del", shared.bridge)  # ours to remove, not the broker's

        # Created afresh, the network works again.
        again = first.acquire_network("shared")
        assert degraded(first, "shared") is None
        first.attach("shared").close()
        assert ifindex(ns, again.bridge) is not None
    log = broker.log()
    assert "network 'shared' degraded: " + expected in log
    assert "stopping its dnsmasq, its bridge is gone" in log


def _tap_names(ns) -> list[str]:
    out = ns.ip("-j", "link", "show").stdout
    return [link["ifname"] for link in json.loads(out) if link["ifname"].startswith("vmb-t")]


def test_a_tap_deleted_behind_the_broker_lends_its_name_to_nobody_and_its_detach_deletes_nothing_else(start):
    broker = start()
    ns = broker.namespace
    with Client(broker.socket_path) as first, Client(broker.socket_path) as second:
        mine = first.attach("shared")
        ns.ip("link", "del", mine.name)
        # The kernel would hand the lowest free name out again; not while it is on record.
        theirs = second.attach("shared")
        assert theirs.name != mine.name
        their_index = ifindex(ns, theirs.name)
        # A link someone else makes under the dead TAP's name is not the broker's to delete.
        ns.ip("link", "add", mine.name, "type", "bridge")
        stranger = ifindex(ns, mine.name)
        first.detach(mine.name)
        assert ifindex(ns, mine.name) == stranger
        assert ifindex(ns, theirs.name) == their_index
        status = second.status()
        assert [a["name"] for n in status.networks for a in n.raw["attachments"]] == [theirs.name]
        ns.ip("link", "del", mine.name)
        mine.close()
        theirs.close()


def test_a_flushed_gateway_degrades_the_network_until_it_is_put_back(start):
    broker = start()
    ns = broker.namespace
    with Client(broker.socket_path) as client:
        net = client.acquire_network("shared")
        assert degraded(client, "shared") is None
        ns.ip("-4", "addr", "flush", "dev", net.bridge)
        gateway = f"{net.gateway}/24"
        want = f"gateway {gateway} was removed from bridge {net.bridge} (ifindex {ifindex(ns, net.bridge)}) outside the broker"
        assert wait_for(lambda: degraded(client, "shared") == want, 5), degraded(client, "shared")
        # Not restored by the broker (whoever removed it meant it) ...
        time.sleep(0.3)
        assert ns.ip("-4", "-j", "addr", "show", "dev", net.bridge).stdout.count('"local"') == 0
        # ... and no longer degraded once someone puts it back.
        ns.ip("addr", "add", gateway, "dev", net.bridge)
        assert wait_for(lambda: degraded(client, "shared") is None, 5)
    log = broker.log()
    assert "network 'shared' degraded: " + want in log
    assert f"gateway {gateway} is back on bridge {net.bridge}" in log


def test_an_overlapping_route_in_a_policy_table_degrades_a_live_network_and_new_ones_avoid_it(start):
    broker = start()
    ns = broker.namespace
    with Client(broker.socket_path) as client:
        shared = client.acquire_network("shared")
        assert shared.subnet == "192.168.105.0"
        # A VPN coming up: its routes in a table of its own, covering 192.168.104-107.
        ns.ip("route", "add", "192.168.104.0/22", "dev", "lo", "table", "200")
        want = "route 192.168.104.0/22 (table 200, dev lo) overlaps its subnet: added outside the broker"
        assert wait_for(lambda: degraded(client, "shared") == want, 5), degraded(client, "shared")
        # A network created now avoids the route (without it: 192.168.106.0).
        assert client.acquire_network("host").subnet == "192.168.108.0"
        assert degraded(client, "host") is None
        ns.ip("route", "del", "192.168.104.0/22", "dev", "lo", "table", "200")
        assert wait_for(lambda: degraded(client, "shared") is None, 5)
    log = broker.log()
    assert "network 'shared' degraded: " + want in log
    assert "route 192.168.104.0/22 (table 200, dev lo) is gone; it overlapped the network" in log


KILLS = 7


def test_a_dnsmasq_killed_again_and_again_keeps_coming_back_and_is_shown_degraded_while_down(start, guests):
    broker = start()
    with Client(broker.socket_path) as client:
        client.acquire_network("shared")
        seen: list[str] = []
        started = time.monotonic()
        for kill in range(KILLS):
            pid = dnsmasq_pid(broker, "shared")
            assert pid and process_running(pid), broker.log()[-3000:]
            os.kill(pid, signal.SIGKILL)
            # While it is down, status says so; then a new dnsmasq serves.
            reason = wait_for(lambda: degraded(client, "shared") or _restarted(broker, pid), 5, interval=0.005)
            if isinstance(reason, str):
                seen.append(reason)
            # Back, and the broker knows it (a kill before that is a failed start).
            back = wait_for(lambda: _restarted(broker, pid) and degraded(client, "shared") is None, 40)
            assert back, f"kill {kill + 1}: not restarted\n{broker.log()[-3000:]}"
        took = time.monotonic() - started
        print(f"\n{KILLS} kills: dnsmasq back each time, {took:.1f} s in all")
        # The later restarts wait long enough (0.4 s and more) to be seen every time.
        assert len(seen) >= KILLS - 3, seen
        assert all(r.startswith("dnsmasq restarting (killed by SIGKILL), next try in ") for r in seen), "\n".join(seen)
        assert wait_for(lambda: degraded(client, "shared") is None, 5)
        # And it serves: a guest gets a lease.
        guest = Guest(client.attach("shared"))
        guests.append(guest)
        assert guest.start().dhcp()["ip"]
    log = broker.log()
    assert f"(restart {KILLS})" in log and "keeps dying" not in log
    assert "dnsmasq runs again" in log


def _restarted(broker, old: int) -> bool:
    pid = dnsmasq_pid(broker, "shared")
    return bool(pid and pid != old and process_running(pid))
