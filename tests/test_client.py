"""The client library against sockets that misbehave (no broker needed)."""

import contextlib
import json
import socket
import threading
import time

import pytest

from vmnet_broker import Client, ConnectionFailed, InvalidReply


@pytest.fixture
def fake_broker(tmp_path):
    """A seqpacket listener that answers what the test tells it to."""
    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen()
    yield path, listener
    listener.close()


def test_a_timed_out_request_closes_the_connection_so_replies_cannot_shift(fake_broker):
    path, listener = fake_broker
    client = Client(path, timeout=0.2)
    conn, _ = listener.accept()
    try:
        with pytest.raises(ConnectionFailed):
            client.acquire_network("shared")  # the fake never answers in time
        with contextlib.suppress(BrokenPipeError):  # the client hung up, as it should
            conn.send(json.dumps({"network": {"name": "late"}}).encode())
        with pytest.raises(ConnectionFailed):
            client.status()  # not the late reply, mistaken for this one's
    finally:
        conn.close()
        client.close()


def test_a_reply_that_is_not_json_is_an_invalid_reply(fake_broker):
    path, listener = fake_broker
    with Client(path, timeout=5) as client:
        conn, _ = listener.accept()
        answer = threading.Thread(target=lambda: (conn.recv(65536), conn.send(b"nonsense")))
        answer.start()
        with pytest.raises(InvalidReply) as info:
            client.status()
        answer.join()
        conn.close()
    assert info.value.code == 2


def test_no_broker_is_connection_failed_with_upstream_text(tmp_path):
    with pytest.raises(ConnectionFailed) as info:
        Client(str(tmp_path / "nobody.sock"))
    assert info.value.code == 1 and str(info.value).startswith("Failed to send XPC message to broker")


def test_connect_retries_while_the_brokers_backlog_is_full(tmp_path):
    """A full backlog refuses a non-blocking Unix connect with EAGAIN at once
    (1,000 clients at once got that); the client tries again until its timeout."""
    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    waiting = []
    try:
        while True:  # fill the backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            waiting.append(s)
        threading.Timer(0.3, lambda: [listener.accept()[0].close() for _ in waiting]).start()
        started = time.monotonic()
        with Client(path, timeout=5):
            pass
        assert 0.25 < time.monotonic() - started < 5
        with pytest.raises(ConnectionFailed):  # and gives up at the timeout
            while True:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.setblocking(False)
                try:
                    s.connect(path)
                except BlockingIOError:
                    s.close()
                    break
                waiting.append(s)
            Client(path, timeout=0.2)
    finally:
        for s in waiting:
            s.close()
        listener.close()


def serve_pages(conn, pages):
    """Answer each status request with the page for its offset; record the offsets asked for."""
    asked = []
    for _ in range(len(pages)):
        request = json.loads(conn.recv(65536))
        offset = request.get("offset", 0)
        asked.append(offset)
        conn.send(json.dumps({"status": pages[offset]}).encode())
    return asked


def page(networks, available, next_offset, generation=1):
    return {"version": "x", "peers": 1, "networks": networks, "available": available,
            "generation": generation, "truncated": next_offset is not None, "next_offset": next_offset}  # fmt: skip


def net(name, attachments, interfaces):
    return {"name": name, "mode": "shared", "subnet": "192.168.105.0", "peers": 1, "interfaces": interfaces,
            "idle_expires_in": None, "attachments": [{"name": a} for a in attachments]}  # fmt: skip


def test_status_follows_pages_and_joins_a_network_split_across_them(fake_broker):
    path, listener = fake_broker
    pages = {
        0: page([net("host", ["t0"], 1), net("shared", ["t1", "t2"], 4)], [], 4),
        4: page([net("shared", ["t3", "t4"], 4)], ["host"], 7),
        7: page([], ["shared"], None),
    }
    with Client(path, timeout=5) as client:
        conn, _ = listener.accept()
        asked: list = []
        server = threading.Thread(target=lambda: asked.extend(serve_pages(conn, pages)))
        server.start()
        status = client.status()
        server.join(5)
        conn.close()
    assert asked == [0, 4, 7]
    assert [(n.name, n.interfaces) for n in status.networks] == [("host", 1), ("shared", 4)]
    assert [a["name"] for a in status.networks[1].raw["attachments"]] == ["t1", "t2", "t3", "t4"]
    assert status.raw["available"] == ["host", "shared"] and status.raw["truncated"] is False


def test_status_starts_over_when_the_broker_changed_between_pages(fake_broker):
    path, listener = fake_broker
    replies = [
        page([net("shared", ["t1"], 2)], [], 2, generation=1),
        page([net("shared", ["t9"], 2)], [], None, generation=2),  # changed: start over
        page([net("shared", ["t1", "t9"], 2)], ["shared"], None, generation=2),
    ]
    with Client(path, timeout=5) as client:
        conn, _ = listener.accept()

        def answer():
            for reply in replies:
                conn.recv(65536)
                conn.send(json.dumps({"status": reply}).encode())

        server = threading.Thread(target=answer)
        server.start()
        status = client.status()
        server.join(5)
        conn.close()
    assert [a["name"] for a in status.networks[0].raw["attachments"]] == ["t1", "t9"]
