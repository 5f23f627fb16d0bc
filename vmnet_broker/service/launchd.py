"""The broker as a launchd daemon (macOS): one plist, started on demand.

launchd owns the Mach service name (``MachServices``), starts the broker at
the first message to it, and lets it exit when idle (``serve --exit-idle``);
``EnableTransactions`` makes launchd honour the broker's XPC transactions.
The job runs as root (no ``UserName``): vmnet needs no entitlement then.

One job per Mach name: a job for our name that is not ours (upstream's
vmnet-broker, installed at the same path under the same label) is refused
unless ``replace``, which boots it out first.  See docs/launchd.md.
"""

from __future__ import annotations

import plistlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..client import DEFAULT_SERVICE
from . import Runner, ServiceError, ServiceOptions, Status, make_dir, required, under, write_file

DEFAULT_LABEL = DEFAULT_SERVICE  # upstream's label and Mach name: its clients look it up
DAEMONS_DIR = "/Library/LaunchDaemons"
LOG_DIR = "/Library/Logs/vmnet-broker"
LOG_FILE = f"{LOG_DIR}/vmnet-broker.log"
EXIT_IDLE = 120.0  # upstream's idle exit
EXIT_TIMEOUT = 60  # SIGTERM to SIGKILL at stop


def job(label: str, python: str, exit_idle: float = EXIT_IDLE) -> dict[str, Any]:
    """The launchd plist for the broker (pure)."""
    args = [python, "-m", "vmnet_broker", "serve", "--exit-idle", _number(exit_idle)]
    if label != DEFAULT_LABEL:
        args += ["--service-name", label]
    return {
        "Label": label,
        "ProgramArguments": args,
        "MachServices": {label: True},
        "EnableTransactions": True,
        # launchd.plist(5) spells it ExitTimeOut; upstream's "ExitTimeout" is
        # likely ignored.
        "ExitTimeOut": EXIT_TIMEOUT,
        "StandardErrorPath": LOG_FILE,
    }


def is_ours(job: dict[str, Any]) -> bool:
    """Runs ``python -m vmnet_broker serve``, whichever interpreter."""
    args = job.get("ProgramArguments")
    return isinstance(args, list) and args[1:4] == ["-m", "vmnet_broker", "serve"]


def plist_path(root: Path, label: str) -> Path:
    return under(root, DAEMONS_DIR) / f"{label}.plist"


@dataclass(frozen=True)
class ForeignJob:
    """A launchd job for our Mach name that we did not install."""

    label: str
    path: Path | None  # None: loaded, but from no plist we can see
    program: str

    def __str__(self) -> str:
        where = self.path or "no plist in " + DAEMONS_DIR
        return f"launchd job {self.label} ({where}, runs {self.program})"


def install(options: ServiceOptions, run: Runner) -> list[str]:
    label = options.label or DEFAULT_LABEL
    plist = plist_path(options.root, label)
    loaded = _loaded(run, label)
    foreign = _foreign_jobs(options.root, label)
    if loaded and not plist.exists() and not any(f.label == label for f in foreign):
        foreign.append(ForeignJob(label, None, "unknown"))
    if foreign and not options.replace:
        raise ServiceError(
            f"{foreign[0]} already serves Mach name {label}; it is not ours. "
            "--replace boots it out (VMs using its networks lose them) and installs ours"
        )
    done = []
    for other in foreign:
        run(["launchctl", "bootout", f"system/{other.label}"])  # fails if not loaded: fine
        done.append(f"booted out {other}")
        if other.path is not None and other.path != plist:
            # Its plist stays, disabled, so launchd does not start it at boot.
            required(run, ["launchctl", "disable", f"system/{other.label}"])
            done.append(f"disabled system/{other.label}; its plist {other.path} is left in place")
    if loaded and all(f.label != label for f in foreign):
        required(run, ["launchctl", "bootout", f"system/{label}"])  # ours: reinstalling
        done.append(f"booted out the installed system/{label}")
    if loaded or foreign:
        _wait_gone(run, label)

    make_dir(under(options.root, LOG_DIR))
    exit_idle = EXIT_IDLE if options.exit_idle is None else options.exit_idle
    write_file(plist, plistlib.dumps(job(label, options.python, exit_idle)))
    done.append(f"wrote {plist}")
    required(run, ["launchctl", "bootstrap", "system", str(plist)])
    done.append(f"bootstrapped system/{label}: launchd starts the broker at the first request; log {LOG_FILE}")
    return done


def uninstall(options: ServiceOptions, run: Runner) -> list[str]:
    label = options.label or DEFAULT_LABEL
    plist = plist_path(options.root, label)
    if plist.exists() and not is_ours(_read(plist)):
        raise ServiceError(f"{plist} is not ours (it does not run vmnet_broker); not removing it")
    done = []
    if _loaded(run, label):
        if not plist.exists():
            raise ServiceError(f"system/{label} is loaded but {plist} is missing: not ours; not booting it out")
        required(run, ["launchctl", "bootout", f"system/{label}"])
        done.append(f"booted out system/{label}")
    if plist.exists():
        plist.unlink()
        done.append(f"removed {plist}")
    if not done:
        return [f"system/{label} is not installed"]
    return done + [f"kept the log directory {LOG_DIR}"]


def status(options: ServiceOptions, run: Runner) -> Status:
    label = options.label or DEFAULT_LABEL
    plist = plist_path(options.root, label)
    if not plist.exists():
        file_state = "missing"
    else:
        file_state = "ours" if is_ours(_read(plist)) else "not ours"
    proc = run(["launchctl", "print", f"system/{label}"])
    if proc.returncode == 127:
        raise ServiceError(proc.stderr.strip() or "cannot run launchctl")
    if proc.returncode != 0:
        return Status(False, [f"system/{label}: not loaded", f"plist: {plist} ({file_state})"])
    fields = parse_print(proc.stdout)
    state = fields.get("state", "unknown")
    pid = f", pid {fields['pid']}" if "pid" in fields else ""
    last = f", last exit code {fields['last exit code']}" if "last exit code" in fields else ""
    return Status(True, [f"system/{label}: loaded, {state}{pid}{last}", f"plist: {plist} ({file_state})"])


def parse_print(text: str) -> dict[str, str]:
    """The job's own ``key = value`` lines of ``launchctl print`` (one tab in;
    deeper lines belong to nested blocks).  The format is not an API."""
    fields = {}
    for line in text.splitlines():
        if line.startswith("\t") and not line.startswith("\t\t"):
            key, sep, value = line.strip().partition(" = ")
            if sep and not value.endswith("{"):
                fields[key] = value
    return fields


# How long to wait for a booted-out job to be gone: past its ExitTimeOut (60 s).
BOOTOUT_WAIT = 90.0


def _wait_gone(run: Runner, label: str) -> None:
    """bootout may return before the old job has exited; bootstrap would then
    fail ("Input/output error")."""
    deadline = time.monotonic() + BOOTOUT_WAIT
    while _loaded(run, label):
        if time.monotonic() > deadline:
            raise ServiceError(f"system/{label} is still loaded {BOOTOUT_WAIT:g} s after bootout")
        time.sleep(0.2)


def _loaded(run: Runner, label: str) -> bool:
    return run(["launchctl", "print", f"system/{label}"]).returncode == 0


def _read(path: Path) -> dict[str, Any]:
    """A plist as a dict; one we cannot read is nobody's we know (empty)."""
    try:
        with open(path, "rb") as f:
            data = plistlib.load(f)
    except Exception:  # plistlib raises several kinds; unreadable is unreadable
        return {}
    return data if isinstance(data, dict) else {}


def _foreign_jobs(root: Path, label: str) -> list[ForeignJob]:
    """Plists in /Library/LaunchDaemons for our label or Mach name that are not ours."""
    found = []
    directory = under(root, DAEMONS_DIR)
    for path in sorted(directory.glob("*.plist")) if directory.is_dir() else []:
        data = _read(path)
        services = data.get("MachServices")
        mine = path.name == f"{label}.plist" or data.get("Label") == label
        if (mine or isinstance(services, dict) and label in services) and not is_ours(data):
            args = data.get("ProgramArguments")
            program = data.get("Program") or (args[0] if isinstance(args, list) and args else "unknown")
            found.append(ForeignJob(str(data.get("Label") or path.stem), path, str(program)))
    return found


def _number(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)
