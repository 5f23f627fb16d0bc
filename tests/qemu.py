"""Real VMs for end-to-end tests: QEMU with a guest from ``tests/vmimage.py``.

``Vm(name, nic, image=..., workdir=...)`` runs ``qemu-system-x86_64`` (KVM
only where real VMX/SVM KVM exists, else TCG) in its own process group with a
hard timeout, optionally inside a network namespace.  The guest's first
serial port is a command channel on QEMU's stdin/stdout; its kernel console
(ttyS1) goes to ``<workdir>/<name>.console.log``.

- ``run(cmd, timeout) -> (status, output)`` runs a shell command in the guest;
- ``dhcp(hostname)`` gets a lease with busybox ``udhcpc`` and returns its IP;
- ``stop()`` powers the guest off, then kills QEMU's process group.

A NIC is a ``Nic`` or a tuple:

- ``("tap", fds, mac, vnet_hdr, mtu)``: TAP fd(s) handed out by the broker,
  ``-netdev tap,fd=N,vhost=off`` (``fds=N:M`` for a multiqueue TAP);
- ``("dgram", fd, mac)``: one end of a datagram socketpair,
  ``-netdev dgram,local.type=fd,local.str=N`` (no vnet header on this path);
- ``("ifname", name[, mac])``: QEMU opens the TAP itself (run the VM in the
  namespace holding the bridge: ``netns=``).

The fds are passed to QEMU with ``pass_fds``; the caller closes its copies
once ``start()`` returned.

``launcher=[...]`` puts a program before QEMU's argv: one that execs it
(``vmnet-broker run ... --qemu --``, which adds the NIC itself: pass
``nic=None``) or starts it as a child (a launcher script).  QEMU and its
launcher share one process group; ``kill()`` and ``group_pids()`` work on
the group, so a QEMU whose launcher died is still found and killed.
"""

from __future__ import annotations

import base64
import ctypes
import itertools
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import vmimage
from .conftest import CI, require_tools

QEMU = "qemu-system-x86_64"
CHUNK = 512  # base64 characters per command line sent to the agent
GUEST_SLACK = 30.0  # seconds a command's answer may lag its guest-side timeout (TCG is slow)


class VmError(RuntimeError):
    pass


# -- acceleration ----------------------------------------------------------------------


def kvm_usable() -> bool:
    """Real KVM: VMX/SVM in the CPU flags, kvm_intel or kvm_amd loaded, /dev/kvm usable.

    Not ``/dev/kvm`` alone: on these machines it is ``kvm_pvm``, which cannot
    boot a stock kernel.  ``VMB_QEMU_ACCEL=tcg|kvm`` overrides the probe.
    """
    forced = os.environ.get("VMB_QEMU_ACCEL")
    if forced in ("tcg", "kvm"):
        return forced == "kvm"
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        return False
    if not flags & {"vmx", "svm"}:
        return False
    modules = {p.name for p in Path("/sys/module").glob("kvm_*")}
    try:
        modules |= {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}
    except OSError:
        pass
    if not modules & {"kvm_intel", "kvm_amd"}:
        return False
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def accel_args() -> list[str]:
    if kvm_usable():
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


# -- NICs ---------------------------------------------------------------------------------


def random_mac() -> str:
    """Locally administered unicast (QEMU's default would give every VM the same one)."""
    octets = [0x52, 0x54, 0x00] + [random.randrange(256) for _ in range(3)]
    return ":".join(f"{o:02x}" for o in octets)


@dataclass(frozen=True)
class Nic:
    kind: str  # "tap", "dgram" or "ifname"
    fds: tuple[int, ...] = ()
    mac: str = field(default_factory=random_mac)
    vnet_hdr: bool = False
    mtu: int = 1500
    ifname: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("tap", "dgram", "ifname"):
            raise ValueError(f"unknown NIC kind {self.kind!r}")
        if self.kind == "tap" and not self.fds:
            raise ValueError("a tap NIC needs at least one fd")
        if self.kind == "dgram":
            if len(self.fds) != 1:
                raise ValueError("a dgram NIC needs exactly one fd")
            if self.vnet_hdr:
                # QEMU's dgram netdev has no vnet header: the guest would see garbage.
                raise ValueError("QEMU's -netdev dgram cannot carry a vnet header")
        if self.kind == "ifname" and not self.ifname:
            raise ValueError("an ifname NIC needs the TAP's name")

    @classmethod
    def of(cls, spec: Nic | tuple) -> Nic:
        """A ``Nic`` from the tuple forms in the module docstring."""
        if isinstance(spec, Nic):
            return spec
        kind, *rest = spec
        if kind == "tap":
            fds, mac, vnet_hdr, mtu = (list(rest) + [None, None, False, 1500][len(rest) :])[:4]
            fds = (fds,) if isinstance(fds, int) else tuple(fds)
            return cls("tap", fds, mac or random_mac(), bool(vnet_hdr), int(mtu or 1500))
        if kind == "dgram":
            fd, mac, mtu = (list(rest) + [None, None, 1500][len(rest) :])[:3]
            return cls("dgram", (fd,), mac or random_mac(), False, int(mtu or 1500))
        if kind == "ifname":
            name, mac, mtu = (list(rest) + [None, None, 1500][len(rest) :])[:3]
            return cls("ifname", (), mac or random_mac(), False, int(mtu or 1500), name)
        raise ValueError(f"unknown NIC kind {kind!r}")

    @classmethod
    def from_interface(cls, iface: Any) -> Nic:
        """From a ``vmnet_broker.client.Interface`` (its MAC, MTU and fds)."""
        return cls(iface.kind, tuple(iface.fds), iface.mac, bool(iface.vnet_hdr), int(iface.mtu))

    def qemu_args(self) -> list[str]:
        if self.kind == "tap" and len(self.fds) == 1:
            netdev = f"tap,id=n0,fd={self.fds[0]},vhost=off"
        elif self.kind == "tap":
            netdev = f"tap,id=n0,fds={':'.join(map(str, self.fds))},vhost=off"
        elif self.kind == "dgram":
            netdev = f"dgram,id=n0,local.type=fd,local.str={self.fds[0]}"
        else:
            netdev = f"tap,id=n0,ifname={self.ifname},script=no,downscript=no,vhost=off"
        # romfile=: no iPXE option ROM (we boot -kernel; it only costs boot time).
        device = f"virtio-net-pci,netdev=n0,mac={self.mac},romfile="
        if self.mtu != 1500:
            device += f",host_mtu={self.mtu}"
        if self.kind == "tap" and len(self.fds) > 1:
            device += f",mq=on,vectors={2 * len(self.fds) + 2}"
        return ["-netdev", netdev, "-device", device]


# -- the VM --------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child before exec: QEMU gets SIGKILL if the test process dies.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Vm:
    """One QEMU guest; a context manager (``__enter__`` starts it, ``__exit__`` stops it)."""

    _ids = itertools.count(1)

    def __init__(
        self,
        name: str,
        nic: Nic | tuple | None,
        *,
        image: vmimage.Image,
        workdir: str | Path,
        netns: Any = None,  # a Namespace or its name: QEMU runs there (`ip netns exec`)
        memory: int = 256,
        cpus: int = 1,
        hard_timeout: float = 600,
        boot_timeout: float = 120,
        append: str = "",
        launcher: Sequence[str] = (),  # argv before QEMU's: `vmnet-broker run ... --`, a launcher script
    ) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", name):
            raise ValueError(f"VM name {name!r} is not a host name")
        self.name = name
        self.nic = Nic.of(nic) if nic is not None else None
        self.image = image
        self.workdir = Path(workdir)
        self.netns = getattr(netns, "name", netns)
        self.memory, self.cpus = memory, cpus
        self.hard_timeout, self.boot_timeout = hard_timeout, boot_timeout
        self.append = append
        self.launcher = list(launcher)
        self.console_path = self.workdir / f"{name}.console.log"
        self.serial_path = self.workdir / f"{name}.serial.log"
        self.stderr_path = self.workdir / f"{name}.qemu.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.lease: dict[str, str] = {}
        self.boot_seconds: float | None = None
        self._started = 0.0
        self._cond = threading.Condition()
        self._ready = False
        self._eof = False
        self._results: dict[str, tuple[int, list[str]]] = {}
        self._collecting: dict[str, list[str]] = {}
        self._reader: threading.Thread | None = None
        self._watchdog: threading.Timer | None = None
        self._run_lock = threading.Lock()
        self._stopped = False

    # -- lifecycle --

    def command(self) -> list[str]:
        qemu = shutil.which(QEMU) or QEMU
        cmdline = f"console=ttyS1 panic=-1 quiet vmb.hostname={self.name} {self.append}".strip()
        cmd = [
            qemu, *accel_args(), "-m", str(self.memory), "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-no-reboot", "-nographic",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd), "-append", cmdline,
            "-serial", "stdio", "-serial", f"file:{self.console_path}",
        ]  # fmt: skip
        if self.nic is not None:
            cmd += self.nic.qemu_args()
        cmd = self.launcher + cmd
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    def start(self) -> Vm:
        """Start QEMU (returns at once; ``wait_ready`` waits for the guest's agent)."""
        if self.process is not None:
            raise VmError(f"{self.name}: already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if "," in str(self.console_path):
            raise VmError(f"QEMU option values cannot hold commas: {self.console_path}")
        with open(self.stderr_path, "wb") as stderr:
            self._started = time.monotonic()
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                pass_fds=self.nic.fds if self.nic else (),
                start_new_session=True,  # its own process group: killpg takes all of it
                # PDEATHSIG follows the forking *thread*: only from the main one.
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
            )
        self._watchdog = threading.Timer(self.hard_timeout, self._hard_timeout)
        self._watchdog.daemon = True
        self._watchdog.start()
        self._reader = threading.Thread(target=self._read, name=f"vm-{self.name}", daemon=True)
        self._reader.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> Vm:
        timeout = self.boot_timeout if timeout is None else timeout
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._eof, timeout)
            ready = self._ready
        if not ready:
            what = "QEMU exited" if self._eof else f"no agent after {timeout} s"
            raise VmError(f"{self.name}: {what}\n{self.diagnostics()}")
        if self.boot_seconds is None:
            self.boot_seconds = time.monotonic() - self._started
        return self

    def boot(self) -> Vm:
        return self.start().wait_ready()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10) -> int | None:
        """Power the guest off; kill QEMU's process group if it is not gone in ``timeout``."""
        if self.process is None or self._stopped:
            return self.process.returncode if self.process else None
        self._stopped = True
        if self._ready and not self._eof:  # QEMU is there, even if a launcher before it is not
            try:
                self._send(b"P\n")
            except OSError:
                pass
            with self._cond:
                self._cond.wait_for(lambda: self._eof, timeout)
        try:
            self.process.wait(1 if self._ready else 0.1)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
        if self.process.stdin:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        if self._reader:
            self._reader.join(5)
        if self._watchdog:
            self._watchdog.cancel()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL QEMU's whole process group (idempotent).

        Also after the group's leader is gone: a launcher killed before its
        QEMU leaves QEMU in the group, and the kernel keeps the group's id
        from being reused while any member lives.
        """
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while self.group_pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def group_pids(self) -> list[int]:
        """Live processes in QEMU's process group (the launcher, QEMU), zombies excluded."""
        if self.process is None:
            return []
        return [pid for pid, (pgrp, state) in _process_table().items() if pgrp == self.process.pid and state != "Z"]

    def _hard_timeout(self) -> None:
        if self.alive() or self.group_pids():
            self._note(f"hard timeout ({self.hard_timeout} s): killing QEMU")
            self.kill()

    def __enter__(self) -> Vm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the serial channel --

    def _note(self, text: str) -> None:
        with open(self.serial_path, "a") as f:
            f.write(f"## {text}\n")

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        pending = b""
        with open(self.serial_path, "ab") as log:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(line.rstrip(b"\r").decode(errors="replace"))
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _line(self, line: str) -> None:
        with self._cond:
            if line.endswith("@@READY"):  # SeaBIOS's escape codes may precede it
                self._ready = True
            elif line.startswith("@@B "):
                self._collecting[line[4:].strip()] = []
            elif line.startswith("@@E "):
                parts = line.split()
                if len(parts) == 3 and parts[1] in self._collecting:
                    self._results[parts[1]] = (int(parts[2]), self._collecting.pop(parts[1]))
            else:
                for lines in self._collecting.values():
                    lines.append(line)
                    break
            self._cond.notify_all()

    def _send(self, data: bytes) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def run(self, cmd: str | list[str], timeout: float = 60, check: bool = False) -> tuple[int, str]:
        """Run ``cmd`` (a shell script, or an argv list) in the guest: (exit status, stdout+stderr).

        The guest kills it after ``timeout`` s (status 137); ``VmError`` if no
        answer comes back at all.
        """
        script = cmd if isinstance(cmd, str) else shlex.join(cmd)
        if not self._ready:
            raise VmError(f"{self.name}: not ready (call wait_ready)")
        guest_timeout = max(1, int(timeout + 0.999))
        encoded = base64.b64encode(script.encode()).decode()
        with self._run_lock:
            ident = str(next(self._ids))
            lines = [f"C {encoded[i : i + CHUNK]}\n" for i in range(0, len(encoded), CHUNK)] or ["C \n"]
            lines.append(f"X {ident} {guest_timeout}\n")
            try:
                self._send("".join(lines).encode())
            except OSError as e:
                raise VmError(f"{self.name}: QEMU's stdin is gone ({e})\n{self.diagnostics()}") from None
            with self._cond:
                self._cond.wait_for(lambda: ident in self._results or self._eof, guest_timeout + GUEST_SLACK)
                result = self._results.pop(ident, None)
        if result is None:
            why = "QEMU exited" if self._eof else f"no answer in {guest_timeout + GUEST_SLACK:.0f} s"
            raise VmError(f"{self.name}: {script!r}: {why}\n{self.diagnostics()}")
        status, b64 = result
        try:
            output = base64.b64decode("".join(b64)).decode(errors="replace")
        except ValueError as e:
            raise VmError(f"{self.name}: garbled output of {script!r}: {e}") from None
        if check and status != 0:
            raise VmError(f"{self.name}: {script!r} exited {status}:\n{output}")
        return status, output

    # -- conveniences --

    def dhcp(self, hostname: str | None = None, timeout: float = 40) -> str:
        """A DHCP lease on eth0 (``udhcpc``), applied with its route and resolver; the IP.

        ``hostname`` (default: the VM's name) is sent as option 12, so the
        network's DNS learns it.  The whole lease is in ``self.lease``.
        """
        hostname = hostname or self.name
        # -T 3, not less: udhcpc sends only 3 REQUESTs, -T apart, and dnsmasq
        # answers nothing while it ping-checks another client's address (~3 s).
        tries = max(2, int(timeout) // 3)
        cmd = (f"udhcpc -i eth0 -f -q -n -t {tries} -T 3 -A 1 -O mtu -s /etc/udhcpc.script "
               f"-x hostname:{shlex.quote(hostname)}")  # fmt: skip
        status, out = self.run(cmd, timeout=timeout + 10)
        match = re.search(r"^lease (.*)$", out, re.M)
        if status != 0 or not match:
            raise VmError(f"{self.name}: no DHCP lease (status {status}):\n{out}")
        self.lease = dict(item.split("=", 1) for item in match.group(1).split("|") if "=" in item)
        return self.lease["ip"]

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except OSError:
            return ""

    def diagnostics(self, tail: int = 3000) -> str:
        try:
            stderr = self.stderr_path.read_text(errors="replace")
        except OSError:
            stderr = ""
        code = self.process.poll() if self.process else None
        return (f"--- {self.name}: qemu exit {code}; stderr:\n{stderr[-tail:]}"
                f"--- console ({self.console_path}):\n{self.console()[-tail:]}")  # fmt: skip


# -- processes ----------------------------------------------------------------------------


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (process group, state) for every process."""
    table = {}
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_path.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
        table[int(stat_path.parent.name)] = (int(fields[2]), fields[0])
    return table


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (all its threads)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_share(pid: int, seconds: float = 2.0) -> float:
    """Cores ``pid`` used over the next ``seconds`` (1.0: one core flat out)."""
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started)


# -- skipping --------------------------------------------------------------------------------


def _qemu_missing() -> str | None:
    for tool in (QEMU, "apt-get", "apt-cache", "dpkg-deb", "ldd"):
        if shutil.which(tool) is None:
            hint = " (apt-get install --no-install-recommends qemu-system-x86)" if tool == QEMU else ""
            return f"needs {tool}{hint}"
    if vmimage.cached_image() is None:
        try:
            vmimage.package_set()
        except vmimage.ImageError as e:
            return f"no cached guest image and apt cannot name its packages: {e}"
    return None


def require_qemu() -> None:
    """Root, the broker's daemons, QEMU, and a guest image (cached, or apt to build it).

    Skips on a developer's machine; fails under ``CI=true`` (conftest's rule).
    """
    require_tools("nft", "dnsmasq")
    missing = _qemu_missing()
    if missing:
        if CI:
            pytest.fail(f"QEMU test cannot run under CI: {missing}", pytrace=False)
        pytest.skip(missing)
