"""A QEMU launcher on the client API, done the way the README asks launchers to.

    python tests/qemu_launcher.py --socket PATH [--network shared] [--lifetime tied] -- QEMU ARGS...

It attaches a TAP (with ``vnet_hdr``) on a broker network and starts QEMU
as its child with the NIC appended (the broker's MAC and MTU), then waits
for QEMU and exits with its status.  What a launcher's death does to the VM
is ``--lifetime``:

- ``tied`` (the pattern for a VM that belongs to its launcher): QEMU
  inherits the broker connection (``client.fileno()`` in ``pass_fds``) and
  gets SIGKILL when the launcher dies (``PR_SET_PDEATHSIG`` in
  ``preexec_fn``).  A launcher killed with SIGKILL takes its VM with it;
  the connection closes with QEMU and the broker removes the interface.
- ``detached`` (a VM meant to outlive its launcher): QEMU inherits the
  connection and no death signal, so it keeps running and keeps its
  network until it exits; then the broker removes the interface.
- ``unsafe`` (the mistake this exists to show): QEMU gets the TAP fd but
  not the connection.  When the launcher dies the broker, rightly, deletes
  the TAP; QEMU keeps the dead fd and spins a core on read errors.

Nothing is written on stdout: QEMU inherits it (the tests' serial console).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys

from vmnet_broker import Client

PR_SET_PDEATHSIG = 1


def die_with(parent: int):
    """A ``preexec_fn``: SIGKILL this child when ``parent`` dies.

    The death signal follows the thread that forked: start QEMU from the
    main thread (or from a thread that lives as long as the VM).  A parent
    that died between fork and prctl has already gone: exit at once.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)

    return preexec


def qemu_nic(fd: int, mac: str, mtu: int) -> list[str]:
    device = f"virtio-net-pci,netdev=n0,mac={mac}"  # always the broker's MAC: QEMU's default is the same for all
    if mtu != 1500:
        device += f",host_mtu={mtu}"
    return ["-netdev", f"tap,id=n0,fd={fd},vhost=off", "-device", device]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", default=None)
    parser.add_argument("--network", default="shared")
    parser.add_argument("--lifetime", choices=("tied", "detached", "unsafe"), default="tied")
    parser.add_argument("qemu", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    qemu = args.qemu[1:] if args.qemu[:1] == ["--"] else args.qemu
    if not qemu:
        parser.error("QEMU's command line is required after --")

    with Client(args.socket) as client:
        iface = client.attach(args.network, kind="tap", vnet_hdr=True)
        fds = list(iface.fds)
        if args.lifetime != "unsafe":
            fds.append(client.fileno())  # the reference to the network lives as long as QEMU
        process = subprocess.Popen(
            qemu + qemu_nic(iface.fds[0], iface.mac, iface.mtu),
            pass_fds=fds,
            preexec_fn=die_with(os.getpid()) if args.lifetime == "tied" else None,
        )
        iface.close()  # QEMU holds the TAP now
        print(f"qemu_launcher: pid {os.getpid()}, QEMU pid {process.pid}, {iface.name} {iface.mac}", file=sys.stderr)
        status = process.wait()
    return 128 - status if status < 0 else status  # killed by a signal: as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
