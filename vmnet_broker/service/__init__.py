"""Install, remove and inspect the broker as a system service.

launchd on macOS (``launchd.py``), systemd elsewhere (``systemd.py``);
``for_platform`` is the one place that chooses.  Both offer the same three
functions, ``install``, ``uninstall`` and ``status``, taking
``ServiceOptions`` and a ``Runner``.

Every file is written under ``options.root`` (``/``, or a scratch directory
like a DESTDIR) and every external command (``launchctl``, ``systemctl``,
``groupadd``) goes through the runner, looked up on ``PATH``: tests run the
whole sequence with stand-in commands that record their arguments.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TextIO

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


class ServiceError(Exception):
    """A step failed or was refused; the message says which and why."""


@dataclass(frozen=True)
class ServiceOptions:
    label: str | None = None  # None: the platform's default job or unit name
    exit_idle: float | None = None  # None: the platform's default
    replace: bool = False  # take the place of a job or unit that is not ours
    force: bool = False  # even while clients hold networks, or with code others could change
    socket_group: str = "vmnet"  # systemd: the group that may use the socket
    root: Path = Path("/")
    python: str = field(default_factory=lambda: sys.executable)


@dataclass(frozen=True)
class Status:
    running: bool  # launchd: the job is loaded; systemd: the socket or the service is active
    lines: list[str]


def for_platform(platform: str | None = None) -> ModuleType:
    """The service manager of this platform: launchd on macOS, else systemd."""
    if (platform or sys.platform) == "darwin":
        from . import launchd

        return launchd
    from . import systemd

    return systemd


def main(command: str, options: ServiceOptions, run: Runner | None = None, out: TextIO | None = None) -> int:
    """``install-service``, ``uninstall-service`` or ``service-status``: an exit code."""
    manager = for_platform()
    run = run or run_command
    out = out or sys.stdout
    try:
        if command != "service-status" and options.root == Path("/"):
            if os.geteuid() != 0:
                raise ServiceError("needs root (run it with sudo)")
            if not options.force:
                _refuse_while_networks_held()
                if command == "install-service":
                    _refuse_unsafe_code(options.python)
        if command == "install-service":
            lines, code = manager.install(options, run), 0
        elif command == "uninstall-service":
            lines, code = manager.uninstall(options, run), 0
        else:
            status = manager.status(options, run)
            lines, code = status.lines, 0 if status.running else 3
    except ServiceError as e:
        print(f"vmnet-broker {command}: {e}", file=sys.stderr)
        return 1
    for line in lines:
        print(line, file=out)
    return code


def unsafe_paths(paths: Sequence[str | Path]) -> list[str]:
    """Why root must not run code from ``paths``: every file and directory on
    the way to each must be root's and writable by nobody else, or whoever
    can write there can replace what root runs."""
    problems: list[str] = []
    seen: set[Path] = set()
    for start in paths:
        path = Path(os.path.realpath(start))
        for part in [path, *path.parents]:
            if part in seen:
                continue
            seen.add(part)
            try:
                st = os.stat(part)
            except OSError as e:
                problems.append(f"{part}: {e.strerror}")
                continue
            if st.st_uid != 0:
                problems.append(f"{part} is owned by uid {st.st_uid}, not root")
            elif st.st_mode & 0o022 and not (part.is_dir() and st.st_mode & 0o1000):
                problems.append(f"{part} is writable by group or others (mode {st.st_mode & 0o7777:04o})")
    return problems


def _refuse_unsafe_code(python: str) -> None:
    import vmnet_broker

    package = Path(vmnet_broker.__file__).parent
    problems = unsafe_paths([python, package])
    if problems:
        raise ServiceError(
            "the service would run, as root, code others can change: " + "; ".join(problems[:3])
            + ". Install into a root-owned virtualenv (sudo python3 -m venv /opt/vmnet-broker), or --force"
        )  # fmt: skip


def _refuse_while_networks_held() -> None:
    """Replacing or stopping the broker takes the network from every VM on it."""
    from ..client import Client
    from ..errors import BrokerError

    try:
        with Client(timeout=2.0) as client:
            status = client.status()
    except (BrokerError, OSError):
        return  # no broker answers: nothing to lose
    held = [n.name for n in status.networks if n.peers]
    if held:
        raise ServiceError(
            f"{status.peers} client(s) hold network(s) {', '.join(held)}; stopping the broker takes them "
            "from their VMs. Stop those VMs first, or --force"
        )


# -- helpers for launchd.py and systemd.py -------------------------------------


# Longer than the job's ExitTimeOut (60 s): `launchctl bootout` may wait
# that long for a broker to exit before launchd kills it.
COMMAND_TIMEOUT = 120


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run one command, capturing its output; a missing command exits 127 as
    in a shell, one that hangs past ``COMMAND_TIMEOUT`` 124 as timeout(1)."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=COMMAND_TIMEOUT)
    except OSError as e:
        return subprocess.CompletedProcess(list(argv), 127, "", f"cannot run {argv[0]}: {e.strerror}")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 124, "", f"{argv[0]} did not finish in {COMMAND_TIMEOUT} s")


def required(run: Runner, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a step that must succeed."""
    proc = run(argv)
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout or "").strip() or "no error text"
        raise ServiceError(f"{' '.join(argv)} failed (exit {proc.returncode}): {why}")
    return proc


def under(root: Path, path: str) -> Path:
    """``path`` (absolute) inside ``root``."""
    return Path(root) / path.lstrip("/")


def make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    _own_by_root(path)


def write_file(path: Path, data: bytes) -> None:
    """Mode 0644, owned by root (group wheel on macOS) when we are root; atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    _own_by_root(tmp)
    os.replace(tmp, path)


def _own_by_root(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, 0, 0)  # gid 0: wheel on macOS, root on Linux
