"""Broker policy on a recording backend: refcounts, limits, idle removal.

The backend here only records calls, which isolates the policy (pure logic);
the same scenarios run end to end against a real broker in test_e2e_*.py.
"""

import asyncio
import json
from dataclasses import dataclass, field

import pytest

from vmnet_broker.backends.base import CreateError
from vmnet_broker.broker import MAX_CONNECTIONS_PER_USER, MAX_PEER_INTERFACES, MAX_PEER_NETWORKS, Broker
from vmnet_broker.config import BUILTINS, parse_network


@dataclass
class FakeNet:
    config: object

    def info(self):
        return {"name": self.config.name, "mode": self.config.mode, "subnet": "192.168.105.0",
                "mask": "255.255.255.0", "bridge": "vmb-br0"}  # fmt: skip

    def reply_value(self):
        return self.info()


@dataclass
class FakeIface:
    name: str
    closed: bool = False

    def info(self):
        return {"name": self.name}

    def fds(self):
        return []

    def handed_over(self):
        self.closed = True


@dataclass
class RecordingBackend:
    attach_kinds = ("tap", "dgram")
    log: list = field(default_factory=list)
    fail: bool = False
    n: int = 0

    def cleanup_leftovers(self):
        pass

    def create_network(self, config):
        if self.fail:
            raise CreateError("no bridges today")
        self.log.append(("create", config.name))
        return FakeNet(config)

    def destroy_network(self, net):
        self.log.append(("destroy", net.config.name))

    def create_interface(self, net, request):
        self.n += 1
        self.log.append(("attach", request.network_name))
        return FakeIface(f"if{self.n}")

    def destroy_interfaces(self, ifaces):
        for iface in ifaces:
            self.log.append(("detach", iface.name))

    def close(self):
        self.log.append(("close",))


CONFIGS = dict(BUILTINS, **{f"n{i}": parse_network(f"n{i}", {}) for i in range(10)})


def call(broker, peer, **req):
    return json.loads(broker.request(peer, json.dumps(req).encode()).data)


@pytest.fixture
def setup():
    loop = asyncio.new_event_loop()
    backend = RecordingBackend()
    broker = Broker(backend, dict(CONFIGS), idle_timeout=0.05, loop=loop)
    yield broker, backend, loop
    loop.close()


def test_acquiring_twice_takes_one_reference(setup):
    broker, backend, _ = setup
    peer = broker.connect(1, 0, 0)
    assert "network" in call(broker, peer, command="acquire", network_name="shared")
    assert "network" in call(broker, peer, command="acquire", network_name="shared")
    assert backend.log == [("create", "shared")]
    assert broker.status()["networks"][0]["peers"] == 1


def test_two_peers_share_one_network(setup):
    broker, backend, _ = setup
    a, b = broker.connect(1, 0, 0), broker.connect(2, 0, 0)
    call(broker, a, command="acquire", network_name="shared")
    call(broker, b, command="acquire", network_name="shared")
    assert backend.log == [("create", "shared")]
    assert broker.status()["networks"][0]["peers"] == 2


def test_ninth_network_gets_code_7_and_creates_nothing(setup):
    broker, backend, _ = setup
    peer = broker.connect(1, 0, 0)
    for i in range(MAX_PEER_NETWORKS):
        assert "network" in call(broker, peer, command="acquire", network_name=f"n{i}")
    assert call(broker, peer, command="acquire", network_name="n9")["error"] == 7
    # Upstream checks the limit before the name: an unknown name gives 7 too.
    assert call(broker, peer, command="acquire", network_name="nope")["error"] == 7
    # A network already held is still fine.
    assert "network" in call(broker, peer, command="acquire", network_name="n0")
    assert len([e for e in backend.log if e[0] == "create"]) == MAX_PEER_NETWORKS


def test_unknown_network_is_5(setup):
    broker, backend, _ = setup
    reply = call(broker, broker.connect(1, 0, 0), command="acquire", network_name="nope", id=7)
    assert reply["error"] == 5 and reply["id"] == 7 and "nope" in reply["message"]
    assert backend.log == []


def test_create_failure_is_6_with_the_reason(setup):
    broker, backend, _ = setup
    backend.fail = True
    reply = call(broker, broker.connect(1, 0, 0), command="acquire", network_name="shared")
    assert reply == {"error": 6, "message": "no bridges today"}
    assert broker.status()["networks"] == []


def test_malformed_request_changes_nothing(setup):
    broker, backend, _ = setup
    peer = broker.connect(1, 0, 0)
    call(broker, peer, command="acquire", network_name="shared")
    before = broker.status()["networks"]
    assert json.loads(broker.request(peer, b"garbage").data)["error"] == 4
    assert json.loads(broker.request(peer, b"{}", truncated=True).data)["error"] == 4
    assert broker.status()["networks"] == before


def test_disconnect_releases_everything_and_idle_removal_follows(setup):
    broker, backend, loop = setup
    peer = broker.connect(1, 0, 0)
    call(broker, peer, command="attach", network_name="shared")
    broker.disconnect(peer)
    loop.run_until_complete(broker.interfaces_removed())  # on the reaper's thread
    assert ("detach", "if1") in backend.log and ("destroy", "shared") not in backend.log
    (net,) = broker.status()["networks"]
    assert net["peers"] == 0 and net["interfaces"] == 0 and net["idle_expires_in"] is not None
    loop.run_until_complete(asyncio.sleep(0.1))
    assert backend.log[-1] == ("destroy", "shared") and broker.status()["networks"] == []


def test_reacquire_before_idle_timeout_cancels_removal(setup):
    broker, backend, loop = setup
    a = broker.connect(1, 0, 0)
    call(broker, a, command="acquire", network_name="shared")
    broker.disconnect(a)
    b = broker.connect(2, 0, 0)
    call(broker, b, command="acquire", network_name="shared")
    loop.run_until_complete(asyncio.sleep(0.1))
    assert backend.log == [("create", "shared")]
    assert broker.status()["networks"][0]["idle_expires_in"] is None


def test_detach_only_own_interfaces(setup):
    broker, backend, _ = setup
    a, b = broker.connect(1, 0, 0), broker.connect(2, 0, 0)
    name = call(broker, a, command="attach", network_name="shared")["interface"]["name"]
    assert call(broker, b, command="detach", interface=name)["error"] == 5
    assert call(broker, a, command="detach", interface=name) == {}
    assert call(broker, a, command="detach", interface=name)["error"] == 5


def test_release_drops_reference_and_interfaces(setup):
    broker, backend, loop = setup
    peer = broker.connect(1, 0, 0)
    call(broker, peer, command="attach", network_name="host")
    assert call(broker, peer, command="release", network_name="host") == {}
    loop.run_until_complete(broker.interfaces_removed())
    assert ("detach", "if1") in backend.log
    assert call(broker, peer, command="release", network_name="host")["error"] == 5


def test_not_allowed_user_gets_3_and_nothing_is_created(setup):
    broker, backend, _ = setup
    broker._configs["private"] = parse_network("private", {"allowed_users": [1000]})
    assert call(broker, broker.connect(1, 1001, 1001), command="acquire", network_name="private")["error"] == 3
    assert backend.log == []
    assert "network" in call(broker, broker.connect(2, 1000, 1000), command="acquire", network_name="private")


def test_shutdown_removes_everything(setup):
    broker, backend, loop = setup
    peer = broker.connect(1, 0, 0)
    call(broker, peer, command="attach", network_name="shared")
    call(broker, peer, command="acquire", network_name="host")
    loop.run_until_complete(broker.shutdown())
    assert {("destroy", "shared"), ("destroy", "host"), ("detach", "if1")} <= set(backend.log)
    assert backend.log[-1] == ("close",)


def test_interface_limit_per_connection_is_7_and_creates_nothing(setup):
    broker, backend, _ = setup
    peer = broker.connect(1, 0, 0)
    for _ in range(MAX_PEER_INTERFACES):
        assert "interface" in call(broker, peer, command="attach", network_name="shared")
    reply = call(broker, peer, command="attach", network_name="host")
    assert reply["error"] == 7 and "at most" in reply["message"]
    assert ("create", "host") not in backend.log
    # Another connection is not affected.
    assert "interface" in call(broker, broker.connect(2, 0, 0), command="attach", network_name="shared")


def test_connections_per_user_are_capped_but_not_for_root(setup):
    broker, _, _ = setup
    for pid in range(MAX_CONNECTIONS_PER_USER):
        broker.connect(pid, 1000, 1000)
    with pytest.raises(ConnectionRefusedError):
        broker.connect(9999, 1000, 1000)
    broker.connect(10000, 1001, 1001)  # another user
    for pid in range(MAX_CONNECTIONS_PER_USER + 1):
        broker.connect(20000 + pid, 0, 0)  # root


# -- one client cannot block the others; fair shares; bounded replies --------------


class SlowBackend(RecordingBackend):
    """Deleting a TAP takes the kernel ~20 ms (RCU grace periods); here 50."""

    def destroy_interfaces(self, ifaces):
        import time

        time.sleep(0.05)
        super().destroy_interfaces(ifaces)


def test_detach_leaves_status_at_once_and_its_reply_waits_for_the_kernel():
    loop = asyncio.new_event_loop()
    try:
        backend = SlowBackend()
        broker = Broker(backend, dict(CONFIGS), loop=loop)
        peer = broker.connect(1, 0, 0)
        names = [call(broker, peer, command="attach", network_name="shared")["interface"]["name"] for _ in range(3)]
        replies = [broker.request(peer, json.dumps({"command": "detach", "interface": n}).encode()) for n in names]
        # The loop did not wait: all three handled, gone from status already ...
        assert broker.status()["networks"][0]["interfaces"] == 0
        assert all(r.ready is not None and not r.ready.done() for r in replies)
        # ... and each reply is released once its TAPs are deleted, the
        # later ones in one batch.
        loop.run_until_complete(asyncio.wait_for(asyncio.gather(*(r.ready for r in replies)), 5))
        assert [e for e in backend.log if e[0] == "detach"] == [("detach", n) for n in names]
    finally:
        loop.close()


def test_interfaces_per_user_are_capped_across_connections_but_not_for_root(setup):
    loop = setup[2]
    backend = RecordingBackend()
    broker = Broker(backend, dict(CONFIGS), loop=loop, max_interfaces_per_user=5)
    a, b = broker.connect(1, 1000, 1000), broker.connect(2, 1000, 1000)
    for i in range(5):
        assert "interface" in call(broker, a if i % 2 else b, command="attach", network_name="shared")
    reply = call(broker, a, command="attach", network_name="host", id=3)
    assert reply["error"] == 7 and reply["id"] == 3
    assert "uid 1000 owns 5 interfaces" in reply["message"] and "max_interfaces_per_user 5" in reply["message"]
    assert ("create", "host") not in backend.log  # checked before anything is made
    # Another user, and root, are not affected; a detach frees a share.
    assert "interface" in call(broker, broker.connect(3, 1001, 1001), command="attach", network_name="shared")
    assert "interface" in call(broker, broker.connect(4, 0, 0), command="attach", network_name="shared")
    name = broker.status()["networks"][0]["attachments"][0]["name"]
    owner = next(p for p in (a, b) if name in p.interfaces)
    assert call(broker, owner, command="detach", interface=name) == {}
    assert "interface" in call(broker, a, command="attach", network_name="shared")


def test_interfaces_per_network_are_capped_for_everyone(setup):
    loop = setup[2]
    broker = Broker(RecordingBackend(), dict(CONFIGS), loop=loop, max_interfaces_per_network=3)
    peers = [broker.connect(i, 0, 0) for i in range(4)]
    for peer in peers[:3]:
        assert "interface" in call(broker, peer, command="attach", network_name="shared")
    reply = call(broker, peers[3], command="attach", network_name="shared")
    assert reply["error"] == 7 and "network 'shared' has 3 interfaces" in reply["message"]
    assert "network" not in {k for k in reply} and "shared" not in peers[3].networks
    assert "interface" in call(broker, peers[3], command="attach", network_name="host")


def test_caps_are_validated():
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="1023"):
            Broker(RecordingBackend(), {}, loop=loop, max_interfaces_per_network=1024)
        with pytest.raises(ValueError):
            Broker(RecordingBackend(), {}, loop=loop, max_interfaces_per_user=0)
    finally:
        loop.close()


@dataclass
class LinuxLikeIface(FakeIface):
    network_name: str = ""

    def info(self):
        return {"name": self.name, "network_name": self.network_name, "kind": "tap", "mac": "52:54:00:12:34:56",
                "mtu": 1500, "vnet_hdr": False, "queues": 1}  # fmt: skip


class LinuxLikeBackend(RecordingBackend):
    """Interfaces whose status objects are as large as the Linux backend's."""

    def create_interface(self, net, request):
        self.n += 1
        return LinuxLikeIface(f"vmb-t{self.n}", network_name=request.network_name)


def big_broker(loop, interfaces=1700, networks=("shared", "host"), configs=CONFIGS):
    broker = Broker(LinuxLikeBackend(), dict(configs), loop=loop)
    for i in range(interfaces):
        peer = broker.connect(i, 0, 0) if i % 64 == 0 else peer
        call(broker, peer, command="attach", network_name=networks[i % len(networks)])
    return broker


def pages(broker, peer, limit=None):
    """Every status page from offset 0, as the client library follows them."""
    out, offset = [], 0
    for _ in range(10_000):  # bounded: a broker that never says "not truncated" fails the test
        req = {"command": "status", "offset": offset}
        if limit:
            req["limit"] = limit
        data = broker.request(peer, json.dumps(req).encode()).data
        assert len(data) <= broker.max_reply
        page = json.loads(data)["status"]
        out.append(page)
        if not page["truncated"]:
            assert page["next_offset"] is None
            return out
        assert page["next_offset"] > offset
        offset = page["next_offset"]
    pytest.fail("status paging never ended")


def join(pages_):
    networks, available = [], []
    for page in pages_:
        for net in page["networks"]:
            if networks and networks[-1]["name"] == net["name"]:
                networks[-1]["attachments"] += net["attachments"]
            else:
                networks.append(dict(net))
        available += page["available"]
    return networks, available


def test_status_of_1700_interfaces_comes_in_pages_that_each_fit_one_packet(setup):
    loop = setup[2]
    broker = big_broker(loop)
    peer = broker.connect(99999, 0, 0)
    # The default reply fits, and says it is not all.
    data = broker.request(peer, b'{"command":"status","id":"x"}').data
    first = json.loads(data)
    assert len(data) <= 65536 and first["id"] == "x"
    assert first["status"]["truncated"] is True and first["status"]["next_offset"] > 0
    got = pages(broker, peer)
    assert len(got) > 3
    full = broker.status()
    networks, available = join(got)
    assert [n["name"] for n in networks] == [n["name"] for n in full["networks"]]
    for mine, theirs in zip(networks, full["networks"]):
        assert mine["attachments"] == theirs["attachments"] and mine["interfaces"] == theirs["interfaces"]
    assert available == full["available"]
    assert len({p["generation"] for p in got}) == 1
    # "limit" cuts pages shorter; the rows are the same.
    assert join(pages(broker, peer, limit=7)) == (networks, available)


def test_status_of_thousands_of_configured_networks_fits(setup):
    loop = setup[2]
    configs = dict(CONFIGS, **{f"network-{i:05d}": parse_network(f"network-{i:05d}", {}) for i in range(6000)})
    broker = Broker(RecordingBackend(), configs, loop=loop)
    peer = broker.connect(1, 0, 0)
    call(broker, peer, command="attach", network_name="network-00042")
    got = pages(broker, peer)
    assert len(got) >= 2
    networks, available = join(got)
    assert available == sorted(configs) and [n["name"] for n in networks] == ["network-00042"]


def test_status_paging_arguments_are_validated(setup):
    broker = setup[0]
    peer = broker.connect(1, 0, 0)
    for bad in ({"offset": -1}, {"offset": "1"}, {"limit": 0}, {"limit": True}, {"offset": 1.5}):
        assert call(broker, peer, command="status", **bad)["error"] == 4, bad
    past = call(broker, peer, command="status", offset=10**6)["status"]
    assert past["networks"] == [] and past["available"] == [] and past["truncated"] is False


def test_a_request_whose_id_leaves_no_room_for_the_reply_is_refused_before_it_acts(setup):
    broker, backend, _ = setup
    peer = broker.connect(1, 0, 0)
    # 24 KB of UTF-8 on the wire, 72 KB once echoed as JSON escapes.
    request = json.dumps({"command": "attach", "network_name": "shared", "id": "\u00e9" * 12000}, ensure_ascii=False)
    reply = json.loads(broker.request(peer, request.encode()).data)
    assert reply["error"] == 7 and "reply too large" in reply["message"] and "id" not in reply
    assert backend.log == [] and not peer.networks
    assert "interface" in call(broker, peer, command="attach", network_name="shared", id="\u00e9" * 100)
