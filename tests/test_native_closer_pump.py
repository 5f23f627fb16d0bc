"""The native closer and the pump's buffers, on socketpairs and pipes (no root).

What a client sends the broker (fds on a request, fds on frames of a dgram
attachment, packets left unread when it goes) is closed on the closer's
threads, never where it arrived; a pump's frame buffers are sized for its
network and given back when it is quiet.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import time

import pytest

_native = pytest.importorskip("vmnet_broker._native")
if getattr(_native, "PLATFORM", "linux") != "linux":
    pytest.skip("Linux mechanism", allow_module_level=True)


def wait_until(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def readers_gone(write_end: int) -> bool:
    """True once every copy of the pipe's read end is closed (a write gets EPIPE)."""
    try:
        os.write(write_end, b"x")
        return False
    except BrokenPipeError:
        return True
    except BlockingIOError:
        return False


def pipe_sent_away() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return r, w


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


@pytest.mark.parametrize(
    ("mtu", "vnet_hdr", "expected"),
    [
        (1500, False, 1522), (9000, False, 9022), (1500, True, 65792),
        (0, False, 65792), (70000, False, 65792), (1, False, 64),
    ],  # fmt: skip
)
def test_pump_frame_size_comes_from_mtu_and_vnet_hdr(mtu, vnet_hdr, expected):
    assert _native.pump_frame_size(mtu, vnet_hdr) == expected
    assert _native.MAX_FRAME_SIZE == 65792


@pytest.mark.parametrize(("frame_size", "frames"), [(64, 32), (1522, 32), (9022, 29), (65792, 3), (10**7, 1)])
def test_pump_buffers_stay_within_their_budget(frame_size, frames):
    assert _native.pump_batch_frames(frame_size) == frames
    assert frames * min(frame_size, _native.PUMP_BUFFER_BUDGET) <= max(_native.PUMP_BUFFER_BUDGET, frame_size)


def test_fds_on_a_request_are_closed_off_thread(tmp_path):
    listener = _native.Listener(str(tmp_path / "s.sock"))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.connect(str(tmp_path / "s.sock"))
    conn = listener.accept()
    r, w = pipe_sent_away()
    try:
        send_fds(client, b"{}", [r] * 200)  # more than the old control buffer's 64
        os.close(r)
        assert conn.recv() == (b"{}", False)
        assert wait_until(lambda: readers_gone(w)), "every copy of the read end closed"
        assert _native.closer_wait_idle(2000) and _native.closer_stats()["threads"] >= 1
    finally:
        os.close(w)
        conn.close()
        client.close()
        listener.close()


def test_packets_left_unread_are_drained_when_a_connection_closes(tmp_path):
    listener = _native.Listener(str(tmp_path / "s.sock"))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.connect(str(tmp_path / "s.sock"))
    conn = listener.accept()
    r, w = pipe_sent_away()
    try:
        for _ in range(10):
            send_fds(client, b"{}", [r, r])
        os.close(r)
        conn.close()  # never read: the fds ride on queued packets
        assert wait_until(lambda: readers_gone(w))
        client.settimeout(2)
        assert client.recv(10) == b""  # and the connection is closed
    finally:
        os.close(w)
        client.close()
        listener.close()


def test_a_pump_closes_fds_that_come_with_frames_and_drops_frames_too_long():
    vm, broker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tap_side, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    pump = _native.Pump(broker_end.fileno(), tap_side.fileno(), _native.pump_frame_size(1500, False))
    r, w = pipe_sent_away()
    try:
        send_fds(vm, b"f" * 100, [r, r, r])
        os.close(r)
        vm.send(b"g" * 2000)  # longer than a 1500-byte network's frames
        vm.send(b"h" * 60)
        far.settimeout(2)
        assert far.recv(4096) == b"f" * 100
        assert far.recv(4096) == b"h" * 60
        assert wait_until(lambda: readers_gone(w))
        stats = pump.stats()
        assert stats["fds_closed"] == 3 and stats["a_to_b_drops"] == 1 and stats["a_to_b_frames"] == 2
    finally:
        os.close(w)
        pump.stop()
        for s in (vm, broker_end, tap_side, far):
            s.close()


def test_pump_buffers_are_given_back_once_quiet():
    vm, broker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tap_side, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (vm, broker_end, tap_side, far):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    pump = _native.Pump(broker_end.fileno(), tap_side.fileno())  # 64 KiB frames: 3 buffered
    try:
        stats = pump.stats()
        assert stats["buffer_bytes"] <= _native.PUMP_BUFFER_BUDGET and stats["buffer_held"] == 0
        for _ in range(20):
            vm.send(b"x" * 65000)
        far.settimeout(2)
        for _ in range(20):
            assert len(far.recv(70000)) == 65000
        assert pump.stats()["buffer_held"] >= 65000
        assert wait_until(lambda: pump.stats()["buffer_releases"] >= 1, 4)
        assert pump.stats()["buffer_held"] == 0
        vm.send(b"y" * 100)  # still works after giving them back
        assert far.recv(70000) == b"y" * 100
    finally:
        pump.stop()
        for s in (vm, broker_end, tap_side, far):
            s.close()


def test_stopping_a_pump_hands_its_fds_to_the_closer():
    vm, broker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tap_side, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    pump = _native.Pump(broker_end.fileno(), tap_side.fileno())
    broker_end.close()
    tap_side.close()
    pump.stop()
    far.settimeout(2)
    # The pump's dups are closed (soon): the far ends see their peers gone.
    assert wait_until(lambda: _send_fails(vm))
    vm.close()
    far.close()


def _send_fails(sock: socket.socket) -> bool:
    try:
        sock.send(b"x")
        return False
    except OSError as e:
        return e.errno in (errno.ECONNREFUSED, errno.ENOTCONN, errno.EPIPE)
