"""The client library against sockets that misbehave (no broker needed)."""

import contextlib
import json
import socket
import threading

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
