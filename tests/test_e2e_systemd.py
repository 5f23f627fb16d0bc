"""The broker under a service manager: socket activation and readiness.

systemd hands the listening socket over as fd 3 with ``LISTEN_PID`` and
``LISTEN_FDS``, and waits for ``READY=1`` on ``NOTIFY_SOCKET``.  Here the
test plays systemd, with the broker in a namespace of its own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from vmnet_broker import Client
from vmnet_broker.sandbox import Namespace


def test_socket_activation_and_ready_notification(network, tmp_path):
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(15)

    with Namespace() as ns:
        serve = [sys.executable, "-m", "vmnet_broker", "serve", "--socket", str(tmp_path / "unused.sock"),
                 "--state-dir", str(tmp_path / "state")]  # fmt: skip
        # As systemd does: the socket at fd 3, LISTEN_PID naming the broker
        # itself (`exec` keeps the shell's pid through `ip netns exec`).
        script = f'exec 3<&{listener.fileno()}; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'
        env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
        broker = subprocess.Popen(
            ["bash", "-c", script, "bash", *ns.exec_args(serve)],  # dash only takes fds 0-9
            pass_fds=(listener.fileno(),), env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            try:
                ready = notify.recv(100)
            except TimeoutError:
                broker.kill()
                raise AssertionError(f"no READY=1: {broker.stderr.read()}") from None
            assert ready == b"READY=1"
            listener.close()  # the broker has its own copy now
            with Client(path) as client:
                assert client.acquire_network("host").mode == "host"
            assert not os.path.exists(tmp_path / "unused.sock")
            broker.send_signal(signal.SIGTERM)
            assert notify.recv(100) == b"STOPPING=1"
            assert broker.wait(15) == 0
        finally:
            broker.kill()
            broker.wait()
            log = broker.stderr.read()
            broker.stderr.close()
            notify.close()
    assert "vmnet-broker stopped" in log
