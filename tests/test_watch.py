"""The watcher and the dnsmasq restart policy, without root: netlink faked.

The end-to-end scenarios are in test_e2e_drift.py; here each kind of event,
a lost-events resync and the backoff, one at a time.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from vmnet_broker.backends.linux import LinuxNetwork, restart, watch
from vmnet_broker.config import parse_network

IPV6 = ipaddress.IPv6Network("fd12:3456:789a:1::/64")
BRIDGE, INDEX = "vmb-br0", 12


class FakeLink:
    def __init__(self, name: str, index: int, up: bool = True) -> None:
        self.name, self.index, self.up = name, index, up


class FakeKernel:
    """What the watcher reads: one monitor queue, links, addresses, routes."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.links = {1: FakeLink("lo", 1), INDEX: FakeLink(BRIDGE, INDEX)}
        self.addresses = [("192.168.105.1", 24, BRIDGE), (str(IPV6[1]), 64, BRIDGE)]
        self.routes = [("192.168.105.0", 24, 254), (str(IPV6.network_address), 64, 254), ("192.168.105.1", 32, 255)]
        kernel = self

        class Monitor:
            closed = False

            def fileno(self) -> int:
                return 99

            def drain(self, max_events: int = 4096) -> list[tuple]:
                out, kernel.events = kernel.events, []
                return out

            def close(self) -> None:
                self.closed = True

        self.Monitor = Monitor

    def get_link(self, index: int) -> FakeLink:
        if index not in self.links:
            raise FileNotFoundError(19, "look up link: No such device")
        return self.links[index]

    def list_addresses(self, family: int) -> list[tuple[str, int, str]]:
        return [a for a in self.addresses if (":" in a[0]) == (family == socket.AF_INET6)]

    def list_routes(self, family: int) -> list[tuple[str, int, int]]:
        return [r for r in self.routes if (":" in r[0]) == (family == socket.AF_INET6)]

    def event(self, kind: str, index: int = 0, name: str = "", family: int = 0, address: str = "",
              prefix_len: int = 0, table: int = 0, up: bool = False) -> None:  # fmt: skip
        self.events.append((kind, index, name, family, address, prefix_len, table, up))


class FakeLoop:
    def add_reader(self, fd: int, callback) -> None:  # noqa: ANN001
        self.reader = callback

    def remove_reader(self, fd: int) -> None:
        self.reader = None

    def time(self) -> float:
        return 100.0

    def call_later(self, delay: float, callback, *args):  # noqa: ANN001, ANN202
        self.later = (delay, callback, args)
        return self

    def cancel(self) -> None:  # the TimerHandle call_later returned
        self.later = None


@pytest.fixture
def kernel(monkeypatch):
    fake = FakeKernel()
    for name in ("Monitor", "get_link", "list_addresses", "list_routes"):
        monkeypatch.setattr(watch._native, name, getattr(fake, name), raising=False)
    return fake


@pytest.fixture
def setup(kernel):
    gone = []
    watcher = watch.Watcher(FakeLoop(), gone.append)
    net = LinuxNetwork(parse_network("shared", {}), ipaddress.IPv4Network("192.168.105.0/24"), IPV6, BRIDGE, INDEX)
    watcher.watch(net)
    return watcher, net, gone


def test_a_network_as_created_is_not_degraded(setup):
    _, net, _ = setup
    assert net.degraded is None


def test_a_deleted_bridge_is_the_only_reason_shown_and_is_reported_once(kernel, setup, caplog):
    watcher, net, gone = setup
    kernel.event("deladdr", INDEX, family=socket.AF_INET, address="192.168.105.1", prefix_len=24)
    kernel.event("dellink", INDEX, BRIDGE)
    del kernel.links[INDEX]
    watcher.poll()
    assert net.degraded == "bridge vmb-br0 (ifindex 12) was deleted outside the broker"
    assert net.problems.bridge_gone and gone == [net]
    # A new link that takes the name (another index) is not ours: nothing changes.
    kernel.links[13] = FakeLink(BRIDGE, 13)
    kernel.event("newlink", 13, BRIDGE, up=True)
    watcher.poll()
    assert net.degraded == "bridge vmb-br0 (ifindex 12) was deleted outside the broker" and gone == [net]


def test_renamed_or_down_bridge_is_degraded_until_it_is_back(kernel, setup):
    watcher, net, _ = setup
    kernel.event("newlink", INDEX, "eth9", up=True)
    watcher.poll()
    assert net.degraded == "bridge vmb-br0 (ifindex 12) was renamed to eth9 outside the broker"
    kernel.event("newlink", INDEX, BRIDGE, up=False)
    watcher.poll()
    assert net.degraded == "bridge vmb-br0 (ifindex 12) was set down outside the broker"
    kernel.event("newlink", INDEX, BRIDGE, up=True)
    watcher.poll()
    assert net.degraded is None


def test_each_gateway_address_removed_is_a_reason_and_its_return_clears_it(kernel, setup):
    watcher, net, _ = setup
    kernel.event("deladdr", INDEX, family=socket.AF_INET6, address=str(IPV6[1]), prefix_len=64)
    kernel.event("deladdr", INDEX, family=socket.AF_INET, address="192.168.105.1", prefix_len=24)
    # Another address on the bridge, or the gateway on another link, is not the gateway.
    kernel.event("deladdr", INDEX, family=socket.AF_INET, address="192.168.105.9", prefix_len=24)
    kernel.event("deladdr", 1, family=socket.AF_INET, address="192.168.105.1", prefix_len=24)
    watcher.poll()
    assert net.degraded == (
        f"gateway {IPV6[1]}/64 was removed from bridge vmb-br0 (ifindex 12) outside the broker; "
        "gateway 192.168.105.1/24 was removed from bridge vmb-br0 (ifindex 12) outside the broker"
    )
    kernel.event("newaddr", INDEX, family=socket.AF_INET6, address=str(IPV6[1]), prefix_len=64)
    kernel.event("newaddr", INDEX, family=socket.AF_INET, address="192.168.105.1", prefix_len=32)  # not the same
    watcher.poll()
    assert net.degraded == "gateway 192.168.105.1/24 was removed from bridge vmb-br0 (ifindex 12) outside the broker"


def test_overlapping_routes_in_any_table_degrade_and_own_local_default_routes_do_not(kernel, setup):
    watcher, net, _ = setup
    kernel.event("newroute", INDEX, family=socket.AF_INET, address="192.168.105.0", prefix_len=24, table=254)  # its own
    kernel.event("newroute", 1, family=socket.AF_INET, address="192.168.105.7", prefix_len=32, table=255)  # local
    kernel.event("newroute", 1, family=socket.AF_INET, address="0.0.0.0", prefix_len=0, table=254)  # default
    kernel.event("newroute", 1, family=socket.AF_INET, address="10.0.0.0", prefix_len=8, table=200)  # elsewhere
    watcher.poll()
    assert net.degraded is None
    kernel.event("newroute", 1, family=socket.AF_INET, address="192.168.104.0", prefix_len=22, table=200)
    kernel.routes.append(("192.168.104.0", 22, 200))
    kernel.event("newroute", 0, family=socket.AF_INET6, address="fd12:3456:789a::", prefix_len=48, table=254)
    kernel.routes.append(("fd12:3456:789a::", 48, 254))
    watcher.poll()
    assert net.degraded == (
        "route 192.168.104.0/22 (table 200, dev lo) overlaps its subnet: added outside the broker; "
        "route fd12:3456:789a::/48 (table main) overlaps its subnet: added outside the broker"
    )
    kernel.routes.remove(("192.168.104.0", 22, 200))
    kernel.event("delroute", 1, family=socket.AF_INET, address="192.168.104.0", prefix_len=22, table=200)
    watcher.poll()
    assert net.degraded == "route fd12:3456:789a::/48 (table main) overlaps its subnet: added outside the broker"


def test_lost_events_make_the_watcher_read_the_state_afresh(kernel, setup):
    watcher, net, gone = setup
    kernel.addresses = [a for a in kernel.addresses if a[0] != "192.168.105.1"]
    kernel.routes.append(("192.168.0.0", 16, 100))
    kernel.event("overrun")
    watcher.poll()
    assert net.degraded == (
        "gateway 192.168.105.1/24 is missing from bridge vmb-br0 (ifindex 12): removed outside the broker; "
        "route 192.168.0.0/16 (table 100) overlaps its subnet: added outside the broker"
    )
    kernel.addresses.append(("192.168.105.1", 24, BRIDGE))
    kernel.routes.remove(("192.168.0.0", 16, 100))
    del kernel.links[INDEX]
    kernel.event("overrun")
    watcher.poll()
    assert net.degraded == "bridge vmb-br0 (ifindex 12) was deleted outside the broker" and gone == [net]


def test_an_unwatched_network_is_left_alone(kernel, setup):
    watcher, net, gone = setup
    watcher.unwatch(net)
    kernel.event("dellink", INDEX, BRIDGE)
    watcher.poll()
    assert net.degraded is None and gone == []


# -- dnsmasq restarts ---------------------------------------------------------------


def test_backoff_doubles_to_its_cap_and_starts_over():
    backoff = restart.Backoff(0.1, 30)
    delays = [backoff.next() for _ in range(12)]
    assert delays[:10] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30]
    assert delays[10:] == [30, 30]
    backoff.reset()
    assert backoff.next() == 0.1


def test_exits_are_described_as_signals_or_statuses():
    assert restart.describe_exit(-9) == "killed by SIGKILL"
    assert restart.describe_exit(2) == "exit status 2"
    assert restart.describe_exit(None) == "exited"


def test_restarts_show_a_countdown_while_down_and_never_give_up():
    loop = FakeLoop()
    problems = watch.Problems("shared")
    restarts = restart.Restarts("shared", problems)
    restarts.running()
    tries = []
    for _ in range(20):
        restarts.died(loop, "killed by SIGKILL", lambda: tries.append(1), pid=42)
        delay, fire, args = loop.later
        assert problems.text() == f"dnsmasq restarting (killed by SIGKILL), next try in {delay:.1f} s"
        fire(*args)
        assert restarts.pending is False
    assert len(tries) == 20 and delay == 30
    restarts.running()
    assert problems.text() is None
    restarts.died(loop, "exit status 1", lambda: None)
    restarts.stop()
    assert problems.text() is None and restarts.pending is False
