"""A client written only from PROTOCOL.md: raw seqpacket, JSON, SCM_RIGHTS.

It shares no code with vmnet_broker.client, so the end-to-end tests that use
it check the wire contract itself, as an outside client would see it.
"""

from __future__ import annotations

import array
import json
import os
import socket


class WireClient:
    def __init__(self, path: str, timeout: float = 10) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def send(self, message: dict | bytes, fds: list[int] = ()) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], ancdata)

    def recv(self) -> tuple[dict, list[int]]:
        fds = array.array("i")
        data, ancdata, flags, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
        for level, kind, cmsg in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cmsg[: len(cmsg) - len(cmsg) % fds.itemsize])
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC), "reply truncated"
        assert data, "broker closed the connection"
        return json.loads(data), list(fds)

    def call(self, message: dict | bytes) -> dict:
        self.send(message)
        reply, fds = self.recv()
        for fd in fds:
            os.close(fd)
        return reply

    def call_fds(self, message: dict) -> tuple[dict, list[int]]:
        self.send(message)
        return self.recv()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
