"""Network namespaces and a broker process inside one: the test bench.

Used by the demo, the tests and the benchmarks, so that none of them touches
the host's network: the broker runs in a namespace with nothing but ``lo``,
and guests are namespaces of their own.  Everything made here is removed by
``close()``, which tolerates pieces already gone.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")
_counter = itertools.count()


def unique_name(prefix: str) -> str:
    """A namespace name unique to this process (short: it may name links too)."""
    return f"{prefix}{os.getpid() % 100000}-{next(_counter)}"


def run(cmd: list[str], *, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


class Namespace:
    """A network namespace made with ``ip netns add`` (from the root mount ns)."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or unique_name("vmbt")
        self.created = False

    @property
    def path(self) -> str:
        return str(NETNS_DIR / self.name)

    def create(self) -> Namespace:
        run(["ip", "netns", "add", self.name])
        self.created = True
        self.ip("link", "set", "lo", "up")
        return self

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "-n", self.name, *args], check=check)

    def exec_args(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(self.exec_args(list(cmd)), timeout=timeout, check=check)

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.exec_args(cmd), **kwargs)

    def close(self) -> None:
        if not self.created:
            return
        # Processes left inside would keep the namespace (and its links) alive.
        pids = run(["ip", "netns", "pids", self.name], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        run(["ip", "netns", "del", self.name], check=False)
        self.created = False

    def __enter__(self) -> Namespace:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()


class BrokerProcess:
    """``vmnet-broker serve`` in a fresh namespace of its own.

    ``start()`` returns once the socket accepts connections; ``ready_seconds``
    is how long that took.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        config_dir: str | Path | None = None,
        idle_timeout: float = 120,
        log_level: str = "debug",
        namespace: Namespace | None = None,
        extra_args: tuple[str, ...] = (),
        wrapper: tuple[str, ...] = (),
        python: str = sys.executable,
    ) -> None:
        self.workdir = Path(workdir)
        self.python = python  # e.g. a fresh venv's, to serve from an installed package
        self.socket_path = str(self.workdir / "broker.sock")
        self.state_dir = str(self.workdir / "state")
        self.log_path = self.workdir / "broker.log"
        self.config_dir = config_dir
        self.idle_timeout = idle_timeout
        self.log_level = log_level
        self.namespace = namespace or Namespace(unique_name("vmbb"))
        self._own_namespace = namespace is None
        self.extra_args = extra_args
        self.wrapper = wrapper  # e.g. ("prlimit", "--nofile=64") before the command
        self.process: subprocess.Popen[Any] | None = None
        self.ready_seconds: float | None = None

    def command(self) -> list[str]:
        cmd = [
            self.python, "-m", "vmnet_broker", "serve",
            "--socket", self.socket_path,
            "--state-dir", self.state_dir,
            "--idle-timeout", str(self.idle_timeout),
            "--log-level", self.log_level,
        ]  # fmt: skip
        if self.config_dir is not None:
            cmd += ["--config-dir", str(self.config_dir)]
        return list(self.wrapper) + cmd + list(self.extra_args)

    def start(self, timeout: float = 15) -> BrokerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._own_namespace and not self.namespace.created:
            self.namespace.create()
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = self.namespace.popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self.wait_ready(timeout)
        self.ready_seconds = time.monotonic() - started
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"broker exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                    s.connect(self.socket_path)
                return
            except OSError:
                time.sleep(0.01)
        raise TimeoutError(f"broker socket not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def send_signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        """Signal the broker and wait; SIGKILL if it does not exit in time."""
        if self.process is None:
            return None
        self.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)

    def close(self) -> None:
        self.stop()
        if self._own_namespace:
            self.namespace.close()

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
