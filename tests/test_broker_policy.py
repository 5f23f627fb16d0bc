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
    broker, backend, _ = setup
    peer = broker.connect(1, 0, 0)
    call(broker, peer, command="attach", network_name="host")
    assert call(broker, peer, command="release", network_name="host") == {}
    assert ("detach", "if1") in backend.log
    assert call(broker, peer, command="release", network_name="host")["error"] == 5


def test_not_allowed_user_gets_3_and_nothing_is_created(setup):
    broker, backend, _ = setup
    broker._configs["private"] = parse_network("private", {"allowed_users": [1000]})
    assert call(broker, broker.connect(1, 1001, 1001), command="acquire", network_name="private")["error"] == 3
    assert backend.log == []
    assert "network" in call(broker, broker.connect(2, 1000, 1000), command="acquire", network_name="private")


def test_shutdown_removes_everything(setup):
    broker, backend, _ = setup
    peer = broker.connect(1, 0, 0)
    call(broker, peer, command="attach", network_name="shared")
    call(broker, peer, command="acquire", network_name="host")
    broker.shutdown()
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
