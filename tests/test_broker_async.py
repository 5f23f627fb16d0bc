"""Broker policy with a backend that creates and removes networks asynchronously.

The Linux backend runs ``nft`` and dnsmasq as child processes the loop waits
for (issue 8, class 2); here a fake backend whose creation waits for the
test to let it go checks what the broker promises meanwhile: other clients
are served, a second acquire of the network waits for the same creation,
a connection's replies stay in request order, and clients that leave or a
shutdown in the middle leave nothing behind.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import pytest

from vmnet_broker.backends.base import CreateError
from vmnet_broker.broker import Broker

from .test_broker_policy import CONFIGS, FakeIface, FakeNet


@dataclass
class SlowBackend:
    """create_network and destroy_network wait until the test sets ``go``."""

    loop: asyncio.AbstractEventLoop
    attach_kinds = ("tap", "dgram")
    log: list = field(default_factory=list)
    fail: bool = False
    n: int = 0
    go: asyncio.Event = field(default_factory=asyncio.Event)

    def cleanup_leftovers(self):
        pass

    async def create_network(self, config):
        self.log.append(("creating", config.name))
        try:
            await self.go.wait()
        except asyncio.CancelledError:
            self.log.append(("unwound", config.name))
            raise
        if self.fail:
            raise CreateError("nft did not finish within 10 s (killed)")
        self.log.append(("created", config.name))
        return FakeNet(config)

    async def destroy_network(self, net):
        self.log.append(("destroying", net.config.name))
        await self.go.wait()
        self.log.append(("destroyed", net.config.name))

    def create_interface(self, net, request):
        self.n += 1
        self.log.append(("attach", request.network_name))
        return FakeIface(f"if{self.n}")

    def destroy_interfaces(self, ifaces):
        self.log.extend(("detach", iface.name) for iface in ifaces)

    def close(self):
        self.log.append(("close",))


@pytest.fixture
def setup():
    loop = asyncio.new_event_loop()
    backend = SlowBackend(loop)
    broker = Broker(backend, dict(CONFIGS), idle_timeout=0.05, loop=loop)
    yield broker, backend, loop
    loop.close()


def send(broker, peer, **req):
    return broker.request(peer, json.dumps(req).encode())


def body(reply):
    assert reply.ready is None or reply.ready.done(), "reply not ready"
    return json.loads(reply.data)


def settle(loop, seconds=0.01):
    loop.run_until_complete(asyncio.sleep(seconds))


def test_others_are_served_while_a_network_is_created_and_a_second_acquire_waits_for_the_same_creation(setup):
    broker, backend, loop = setup
    a, b, c = broker.connect(1, 0, 0), broker.connect(2, 0, 0), broker.connect(3, 0, 0)
    first = send(broker, a, command="acquire", network_name="shared", id=1)
    second = send(broker, b, command="acquire", network_name="shared", id=2)
    settle(loop)
    assert not first.ready.done() and not second.ready.done()
    # Another client is answered at once, and sees no half-made network.
    status = send(broker, c, command="status")
    assert body(status)["status"]["networks"] == []
    backend.go.set()
    loop.run_until_complete(asyncio.wait_for(asyncio.gather(first.ready, second.ready), 1))
    assert body(first)["id"] == 1 and body(first)["network"]["name"] == "shared"
    assert body(second)["id"] == 2 and "network" in body(second)
    assert [e for e in backend.log if e == ("created", "shared")] == [("created", "shared")]
    assert broker.status()["networks"][0]["peers"] == 2


def test_a_connection_waits_its_turn_and_gets_its_replies_in_order(setup):
    broker, backend, loop = setup
    peer = broker.connect(1, 0, 0)
    replies = [
        send(broker, peer, command="acquire", network_name="shared", id=1),
        send(broker, peer, command="attach", network_name="shared", id=2),
        send(broker, peer, command="release", network_name="shared", id=3),
        send(broker, peer, command="status", id=4),
    ]
    settle(loop)
    # Nothing after the acquire was handled yet: the release would have been "not held".
    assert not any(r.ready.done() for r in replies)
    assert ("attach", "shared") not in backend.log
    backend.go.set()
    loop.run_until_complete(asyncio.wait_for(asyncio.gather(*(r.ready for r in replies)), 1))
    out = [body(r) for r in replies]
    assert [r["id"] for r in out] == [1, 2, 3, 4]
    assert "network" in out[0] and "interface" in out[1] and "error" not in out[2]
    assert out[3]["status"]["networks"][0]["peers"] == 0


def test_a_failed_creation_fails_every_waiter_with_6_and_leaves_nothing(setup):
    broker, backend, loop = setup
    backend.fail = True
    a, b = broker.connect(1, 0, 0), broker.connect(2, 0, 0)
    replies = [send(broker, a, command="acquire", network_name="shared"),
               send(broker, b, command="attach", network_name="shared")]  # fmt: skip
    backend.go.set()
    loop.run_until_complete(asyncio.wait_for(asyncio.gather(*(r.ready for r in replies)), 1))
    for reply in replies:
        assert body(reply) == {"error": 6, "message": "nft did not finish within 10 s (killed)"}
    assert broker.status()["networks"] == [] and a.networks == set() and b.networks == set()
    # And the next acquire tries again.
    backend.fail = False
    again = send(broker, a, command="acquire", network_name="shared")
    loop.run_until_complete(asyncio.wait_for(again.ready, 1))
    assert "network" in body(again)


def test_a_client_gone_during_creation_leaves_an_idle_network_that_goes(setup):
    broker, backend, loop = setup
    peer = broker.connect(1, 0, 0)
    reply = send(broker, peer, command="attach", network_name="shared")
    settle(loop)
    broker.disconnect(peer)
    backend.go.set()
    loop.run_until_complete(asyncio.wait_for(reply.ready, 1))
    assert ("attach", "shared") not in backend.log  # no interface for a client that left
    settle(loop, 0.2)  # idle timeout 0.05
    assert ("destroyed", "shared") in backend.log and broker.status()["networks"] == []


def test_acquire_during_removal_waits_for_it_then_creates_anew(setup):
    broker, backend, loop = setup
    backend.go.set()
    peer = broker.connect(1, 0, 0)
    loop.run_until_complete(asyncio.wait_for(send(broker, peer, command="acquire", network_name="shared").ready, 1))
    backend.go.clear()
    broker.disconnect(peer)
    settle(loop, 0.1)  # idle: removal starts and waits
    assert backend.log[-1] == ("destroying", "shared")
    other = broker.connect(2, 0, 0)
    reply = send(broker, other, command="acquire", network_name="shared")
    settle(loop)
    assert not reply.ready.done()
    backend.go.set()
    loop.run_until_complete(asyncio.wait_for(reply.ready, 1))
    assert "network" in body(reply)
    assert backend.log[-3:] == [("destroyed", "shared"), ("creating", "shared"), ("created", "shared")]


def test_shutdown_during_creation_unwinds_it(setup):
    broker, backend, loop = setup
    peer = broker.connect(1, 0, 0)
    send(broker, peer, command="acquire", network_name="shared")
    settle(loop)
    loop.run_until_complete(asyncio.wait_for(broker.shutdown(), 1))
    assert ("unwound", "shared") in backend.log and backend.log[-1] == ("close",)


def test_an_attach_reply_waits_for_the_interface_to_be_ready_and_fails_cleanly_if_it_cannot_be(setup):
    broker, backend, loop = setup
    backend.go.set()
    peer = broker.connect(1, 0, 0)
    loop.run_until_complete(asyncio.wait_for(send(broker, peer, command="acquire", network_name="shared").ready, 1))
    guarded = [loop.create_future(), loop.create_future()]

    def create_interface(net, request, made=iter(guarded)):
        iface = FakeIface(f"g{backend.n}")
        backend.n += 1
        iface.ready = next(made)
        return iface

    backend.create_interface = create_interface
    ok = send(broker, peer, command="attach", network_name="shared", id="ok")
    bad = send(broker, peer, command="attach", network_name="shared", id="bad")
    settle(loop)
    assert not ok.ready.done() and not bad.ready.done()
    guarded[0].set_result(None)
    guarded[1].set_exception(CreateError("nft: exit 1"))
    loop.run_until_complete(asyncio.wait_for(asyncio.gather(ok.ready, bad.ready), 1))
    assert body(ok)["interface"]["name"] == "g0"
    assert body(bad)["error"] == 6 and "nft: exit 1" in body(bad)["message"] and body(bad)["id"] == "bad"
    loop.run_until_complete(broker.interfaces_removed())
    assert [a["name"] for a in broker.status()["networks"][0]["attachments"]] == ["g0"]


def test_a_mac_already_on_the_network_is_refused_with_6(setup):
    broker, backend, loop = setup
    backend.go.set()

    def create_interface(net, request):
        backend.n += 1
        iface = FakeIface(f"if{backend.n}")
        iface.info = lambda: {"name": iface.name, "mac": request.mac or f"52:54:00:00:00:{backend.n:02x}"}
        return iface

    backend.create_interface = create_interface
    a, b = broker.connect(1, 0, 0), broker.connect(2, 0, 0)
    first = send(broker, a, command="attach", network_name="shared", mac="52:54:00:77:00:10")
    loop.run_until_complete(asyncio.wait_for(first.ready, 1))
    assert body(first)["interface"]["name"] == "if1"
    # Another client asking for that MAC would pass the bridge filter as that guest.
    taken = body(send(broker, b, command="attach", network_name="shared", mac="52:54:00:77:00:10"))
    assert taken["error"] == 6 and "already interface if1's" in taken["message"]
    assert b.networks == set()  # the reference its attach took is given back
    # On another network it is another link layer: fine.
    other = send(broker, b, command="attach", network_name="host", mac="52:54:00:77:00:10")
    loop.run_until_complete(asyncio.wait_for(other.ready, 1))
    assert "interface" in body(other)
