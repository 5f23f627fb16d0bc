"""The seqpacket transport on a real socket and loop, with the recording backend (no root).

What a client does to its own connection must cost it nothing it holds and
cost the others nothing at all: a half-closed connection still gets its
replies, and a reply too large for one packet is answered with code 7 on a
connection that stays.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import threading

import pytest

from vmnet_broker.broker import Broker

from .test_broker_policy import CONFIGS, RecordingBackend
from .wire import WireClient

_native = pytest.importorskip("vmnet_broker._native")
if getattr(_native, "PLATFORM", "linux") != "linux":
    pytest.skip("the seqpacket transport is Linux's", allow_module_level=True)

from vmnet_broker.transports import seqpacket  # noqa: E402


@pytest.fixture
def served(tmp_path):
    """A SeqpacketServer on its own loop thread; yields (socket path, broker, loop)."""
    loop = asyncio.new_event_loop()
    path = str(tmp_path / "broker.sock")
    state: dict = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        broker = Broker(RecordingBackend(), dict(CONFIGS), loop=loop)
        server = seqpacket.SeqpacketServer(broker, _native.Listener(path), loop)
        server.start()
        state.update(broker=broker, server=server)
        ready.set()
        loop.run_forever()
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield path, state["broker"], loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def on_loop(loop, fn):
    """Run ``fn`` on the loop thread and return its result."""
    done = threading.Event()
    out: list = []
    loop.call_soon_threadsafe(lambda: (out.append(fn()), done.set()))
    assert done.wait(5)
    return out[0]


def test_listen_backlog_is_the_systems_maximum():
    with open("/proc/sys/net/core/somaxconn") as f:
        assert seqpacket.listen_backlog() == max(128, int(f.read()))


def test_a_request_then_shutdown_wr_still_gets_its_reply(served):
    path, _, _ = served
    with WireClient(path) as c:
        c.send({"command": "acquire", "network_name": "shared", "id": 1})
        c.send({"command": "status", "id": 2})
        c.sock.shutdown(socket.SHUT_WR)
        first, _ = c.recv()
        second, _ = c.recv()
        assert first["id"] == 1 and "network" in first
        assert second["id"] == 2 and second["status"]["networks"][0]["peers"] == 1
        # Then the broker closes: the client sent all it will.
        assert c.sock.recv(100) == b""


def test_a_reply_larger_than_a_packet_is_code_7_and_the_connection_stays(served):
    path, broker, loop = served
    on_loop(loop, lambda: setattr(broker, "max_reply", 8192))
    with WireClient(path) as c:
        iface = c.call({"command": "attach", "network_name": "shared"})["interface"]
        # The error echoes the 9,000-character name: more than 8192 bytes.
        reply = c.call({"command": "acquire", "network_name": "n" * 9000, "id": 5})
        assert reply["error"] == 7 and reply["message"].startswith("reply too large") and reply["id"] == 5
        status = c.call({"command": "status"})["status"]
        assert status["networks"][0]["attachments"][0]["name"] == iface["name"]


def test_a_reply_the_kernel_refuses_with_emsgsize_is_code_7_not_a_dead_peer():
    sent: list[bytes] = []

    class Conn:
        def __init__(self) -> None:
            self.a, self.b = socket.socketpair()

        def fileno(self) -> int:
            return self.a.fileno()

        def send(self, data: bytes, fds) -> None:
            if len(data) > 1000:
                raise OSError(errno.EMSGSIZE, "send: Message too long")
            sent.append(data)

        def recv(self):
            return None

        def close(self) -> None:
            self.a.close()
            self.b.close()

    loop = asyncio.new_event_loop()
    try:
        broker = Broker(RecordingBackend(), dict(CONFIGS), loop=loop)
        server = seqpacket.SeqpacketServer(broker, None, loop)
        peer = broker.connect(1, 0, 0)
        client = seqpacket._Client(server, Conn(), peer)
        server.clients.add(client)
        client.outbox.append(broker.request(peer, json.dumps({"command": "attach", "network_name": "shared"}).encode()))
        huge = json.dumps({"command": "acquire", "network_name": "x" * 2000}).encode()
        client.outbox.append(broker.request(peer, huge))
        client._flush()
        assert not client.closed and peer in broker._peers and len(peer.interfaces) == 1
        assert "interface" in json.loads(sent[0])
        refused = json.loads(sent[1])
        assert refused["error"] == 7 and "EMSGSIZE" in refused["message"]
        client.close()
    finally:
        loop.close()
