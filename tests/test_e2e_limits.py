"""End to end: fair shares of bridge ports, and replies that always fit.

An unprivileged user is a throwaway uid the test picks (no account needed):
a short helper runs as that uid only to connect, and hands the connected
sockets back, so the broker's SO_PEERCRED sees that uid while the test talks
on them.
"""

from __future__ import annotations

import array
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from vmnet_broker import Client, InternalError
from vmnet_broker.errors import Code

from .conftest import broker_links, free_id, require_tools, wait_for
from .wire import WireClient

# Connects COUNT times as whoever runs it, and sends the sockets back on BACK.
CONNECT = textwrap.dedent(
    """
    import array, socket, sys
    path, count, back = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    conns = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        conns.append(s)
    back = socket.socket(fileno=back)
    back.sendmsg([b"ok"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno() for s in conns]))])
    """
)


class Peer:
    """One connection to the broker, made by another uid (raw JSON packets)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(30)

    def call(self, message: dict) -> dict:
        self.sock.send(json.dumps(message).encode())
        fds = array.array("i")
        data, ancdata, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
        for level, kind, cmsg in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cmsg[: len(cmsg) - len(cmsg) % fds.itemsize])
        for fd in fds:
            os.close(fd)
        return json.loads(data)

    def close(self) -> None:
        self.sock.close()


def connect_as(uid: int, path: str, count: int) -> list[Peer]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", "/usr/bin/python3", "-c",
             CONNECT, path, str(count), str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), check=True, timeout=30, cwd="/",
        )  # fmt: skip
        ours.settimeout(10)
        fds = array.array("i")
        _, ancdata, _, _ = ours.recvmsg(16, socket.CMSG_SPACE(count * fds.itemsize))
        for level, kind, cmsg in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cmsg[: len(cmsg) - len(cmsg) % fds.itemsize])
    finally:
        ours.close()
        theirs.close()
    assert len(fds) == count
    return [Peer(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=fd)) for fd in fds]


@pytest.fixture
def reachable_workdir():
    """A broker directory other users can reach (pytest's tmp_path is 0700)."""
    path = tempfile.mkdtemp(prefix="vmbt-limits-")
    os.chmod(path, 0o711)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_one_user_with_16_connections_cannot_take_every_bridge_port(start_broker, reachable_workdir):
    """16 connections x 64 interfaces would be 1,024: more than a bridge's
    1,023 ports.  The user gets its share (256 by default) and code 7 with a
    message; everyone else can still attach."""
    require_tools("setpriv", "/usr/bin/python3")
    uid = free_id(62000)
    broker = start_broker(workdir=reachable_workdir / "broker", extra_args=("--socket-group", str(uid)))
    peers = connect_as(uid, broker.socket_path, 16)

    def fill(peer: Peer) -> tuple[int, dict | None]:
        """Attach on one connection until refused (or its 64): how many, and the refusal."""
        for n in range(64):
            reply = peer.call({"command": "attach", "network_name": "shared"})
            if "interface" not in reply:
                return n, reply
        return 64, None

    try:
        started = time.monotonic()
        # All connections at once, as a user with many VMs would.
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(fill, peers))
        attached = sum(n for n, _ in results)
        refused = [r for _, r in results if r is not None]
        print(f"uid {uid}, 16 connections: {attached} interfaces, then {refused[0] if refused else None} "
              f"({time.monotonic() - started:.1f} s)")  # fmt: skip
        assert attached == 256
        assert refused and {r["error"] for r in refused} == {Code.INTERNAL_ERROR}
        assert "max_interfaces_per_user 256" in refused[0]["message"]
        # Another user (root here) still gets a port on the same bridge.
        with Client(broker.socket_path) as other:
            iface = other.attach("shared")
            iface.close()
            assert other.status().networks[0].interfaces == 257
    finally:
        for peer in peers:
            peer.close()
    assert wait_for(lambda: len(broker_links(broker.namespace)) <= 1, 10)


def test_interfaces_per_network_are_capped_by_a_serve_option(start_broker):
    broker = start_broker(extra_args=("--max-interfaces-per-network", "3"))
    with Client(broker.socket_path) as a, Client(broker.socket_path) as b:
        for client in (a, a, b):
            client.attach("shared").close()
        with pytest.raises(InternalError) as info:
            b.attach("shared")
        assert "network 'shared' has 3 interfaces" in str(info.value)
        b.attach("host").close()  # another network has its own share
        assert sorted(n.interfaces for n in a.status().networks) == [1, 3]


def test_status_with_1700_interfaces_is_paged_and_costs_the_asker_nothing(start_broker):
    """Such a status was one 250 KB packet: EMSGSIZE, taken for a dead peer,
    closed the asker's connection and deleted its TAPs."""
    broker = start_broker()
    clients = [Client(broker.socket_path) for _ in range(27)]
    try:
        started = time.monotonic()

        def fill(n: int) -> None:
            for i in range(n * 64, min(1700, n * 64 + 64)):
                clients[n].attach("shared" if i % 2 else "host").close()

        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            list(pool.map(fill, range(len(clients))))
        made = time.monotonic() - started
        asker = clients[0]
        with WireClient(broker.socket_path) as raw:
            raw.send({"command": "status"})
            data, _, flags, _ = raw.sock.recvmsg(1 << 20)
            assert data, "the broker closed the connection"
            first = json.loads(data)["status"]
            assert len(data) <= 65536 and first["truncated"] is True and first["next_offset"] > 0
        started = time.monotonic()
        status = asker.status()
        took = time.monotonic() - started
        print(f"1700 interfaces attached in {made:.1f} s; status followed its pages in {took * 1000:.0f} ms")
        attachments = [a for n in status.networks for a in n.raw["attachments"]]
        assert len(attachments) == 1700 and len({a["name"] for a in attachments}) == 1700
        assert sum(n.interfaces for n in status.networks) == 1700
        # The asker is still connected: its interfaces are all there.
        assert asker.status().raw["connections"] == 27
        assert len(broker_links(broker.namespace)) == 1702
    finally:
        for client in clients:
            client.close()


def test_a_reply_too_large_to_send_is_code_7_and_the_connection_keeps_what_it_holds(broker):
    with WireClient(broker.socket_path) as c:
        iface = c.call({"command": "attach", "network_name": "shared"})["interface"]
        # 16,000 emoji: 64 KB of UTF-8 in the request, 192 KB of JSON escapes
        # once echoed.
        request = json.dumps({"command": "status", "id": "\U0001f600" * 16000}, ensure_ascii=False).encode()
        assert len(request) <= 65536
        c.send(request)
        reply, _ = c.recv()
        assert reply["error"] == Code.INTERNAL_ERROR and "reply too large" in reply["message"]
        status = c.call({"command": "status"})["status"]
        assert [a["name"] for a in status["networks"][0]["attachments"]] == [iface["name"]]
        assert iface["name"] in broker_links(broker.namespace)
