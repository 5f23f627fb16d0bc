"""The broker as a systemd service (Linux): a socket unit and a service unit.

systemd listens on the broker's socket (``<label>.socket``, group
``socket_group``, mode 0660) and starts ``<label>.service`` at the first
connection; the broker takes the socket (``LISTEN_FDS``) and reports
readiness (``NOTIFY_SOCKET``).  The units are those of docs/systemd.md, with
a first line that marks them as ours: a unit file without it is refused
unless ``replace``.
"""

from __future__ import annotations

import grp
from pathlib import Path

from ..client import DEFAULT_SOCKET
from . import Runner, ServiceError, ServiceOptions, Status, required, under, write_file

DEFAULT_LABEL = "vmnet-broker"
UNIT_DIR = "/etc/systemd/system"
STATE_DIR = "/var/lib/vmnet-broker"
MARKER = "# Written by vmnet-broker install-service; vmnet-broker uninstall-service removes it."


def socket_unit(group: str, socket_path: str = DEFAULT_SOCKET) -> str:
    """The ``.socket`` unit (pure)."""
    return f"""{MARKER}
[Unit]
Description=vmnet-broker socket

[Socket]
ListenSequentialPacket={socket_path}
SocketMode=0660
# Pending connections: as many as the kernel allows (net.core.somaxconn cuts it).
Backlog=65535
# Members of this group may use the broker without root.
SocketGroup={group}

[Install]
WantedBy=sockets.target
"""


def service_unit(label: str, python: str, exit_idle: float | None = None) -> str:
    """The ``.service`` unit (pure): ``python -m vmnet_broker serve``."""
    args = [python, "-m", "vmnet_broker", "serve", "--state-dir", STATE_DIR]
    if exit_idle is not None:
        args += ["--exit-idle", str(int(exit_idle)) if float(exit_idle).is_integer() else str(exit_idle)]
    return f"""{MARKER}
[Unit]
Description=vmnet-broker: shared virtual networks for VM launchers
Requires={label}.socket
After=network.target

[Service]
Type=notify
ExecStart={" ".join(map(_exec_quote, args))}
# SIGTERM removes every network, interface, rule and dnsmasq it made.
KillMode=mixed
TimeoutStopSec=30
StateDirectory=vmnet-broker
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"""


def unit_paths(root: Path, label: str) -> tuple[Path, Path]:
    directory = under(root, UNIT_DIR)
    return directory / f"{label}.socket", directory / f"{label}.service"


def is_ours(path: Path) -> bool:
    try:
        return path.read_text().startswith(MARKER)
    except (OSError, UnicodeDecodeError):
        return False


def install(options: ServiceOptions, run: Runner) -> list[str]:
    label = options.label or DEFAULT_LABEL
    socket_path, service_path = unit_paths(options.root, label)
    foreign = [p for p in (socket_path, service_path) if p.exists() and not is_ours(p)]
    if foreign and not options.replace:
        raise ServiceError(f"{foreign[0]} is not ours; --replace stops it and writes ours in its place")
    done = []
    if foreign:
        run(["systemctl", "stop", f"{label}.socket", f"{label}.service"])  # may not be running: fine
        done.append(f"stopped {label}.socket and {label}.service, replacing {' and '.join(map(str, foreign))}")
    if not _group_exists(options.socket_group):
        required(run, ["groupadd", "--system", options.socket_group])
        done.append(f"created group {options.socket_group}: its members may use the broker without root")
    write_file(socket_path, socket_unit(options.socket_group).encode())
    write_file(service_path, service_unit(label, options.python, options.exit_idle).encode())
    done.append(f"wrote {socket_path} and {service_path}")
    required(run, ["systemctl", "daemon-reload"])
    required(run, ["systemctl", "enable", "--now", f"{label}.socket"])
    done.append(f"enabled and started {label}.socket: systemd starts the broker at the first connection")
    if run(["systemctl", "is-active", "--quiet", f"{label}.service"]).returncode == 0:
        done.append(f"a broker is running: it keeps the old units until 'systemctl restart {label}.service'")
    return done


def uninstall(options: ServiceOptions, run: Runner) -> list[str]:
    label = options.label or DEFAULT_LABEL
    paths = [p for p in unit_paths(options.root, label) if p.exists()]
    foreign = [p for p in paths if not is_ours(p)]
    if foreign:
        raise ServiceError(f"{foreign[0]} is not ours; not removing it")
    if not paths:
        return [f"{label} is not installed"]
    # Stops the service too: the broker removes every network it made.
    required(run, ["systemctl", "disable", "--now", f"{label}.socket", f"{label}.service"])
    for path in paths:
        path.unlink()
    required(run, ["systemctl", "daemon-reload"])
    return [
        f"stopped and disabled {label}.socket and {label}.service",
        f"removed {' and '.join(map(str, paths))}",
        f"kept group {options.socket_group} and {STATE_DIR}",
    ]


def status(options: ServiceOptions, run: Runner) -> Status:
    label = options.label or DEFAULT_LABEL
    active = run(["systemctl", "is-active", f"{label}.socket"])
    if active.returncode == 127:
        raise ServiceError(active.stderr.strip() or "cannot run systemctl")
    socket_state = active.stdout.strip() or "unknown"
    shown = run(["systemctl", "show", f"{label}.service", "--property=ActiveState,SubState,MainPID"])
    fields = dict(line.partition("=")[::2] for line in shown.stdout.splitlines() if "=" in line)
    service_state = f"{fields.get('ActiveState', 'unknown')} ({fields.get('SubState', 'unknown')})"
    pid = f", pid {fields['MainPID']}" if fields.get("MainPID", "0") != "0" else ""
    files = [f"{p} ({'ours' if is_ours(p) else 'not ours'})" if p.exists() else f"{p} (missing)"
             for p in unit_paths(options.root, label)]  # fmt: skip
    running = socket_state == "active" or fields.get("ActiveState") == "active"
    return Status(
        running,
        [f"{label}.socket: {socket_state}", f"{label}.service: {service_state}{pid}", f"units: {', '.join(files)}"],
    )


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _exec_quote(arg: str) -> str:
    """One ExecStart= word: specifiers (%) and variables ($) escaped, quoted if needed."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if any(c in arg for c in ' \t"\'\\;'):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg
