#!/usr/bin/env python3
"""Boot a QEMU VM on a vmnet-broker network, with the Python client library.

    python3 examples/qemu_launcher.py --network shared \\
        --kernel vmlinuz --initrd initrd.img --append "console=ttyS0" [--disk disk.img] \\
        [-- more QEMU arguments]

The serial console is this terminal (QEMU's -nographic; Ctrl-A X quits).
What a launcher has to get right, and where it happens below:

- a TAP with ``vnet_hdr`` (checksum and segmentation offload: about twice
  the throughput of a plain TAP) -> ``client.attach(..., vnet_hdr=True)``;
- the broker's MAC on the NIC: without ``mac=`` every QEMU uses
  52:54:00:12:34:56, and two VMs fight over one DHCP lease -> ``nic_args``;
- the network's MTU as ``host_mtu`` when it is not 1500 -> ``nic_args``;
- the broker connection must live exactly as long as QEMU.  The broker
  deletes the TAP when the connection's last fd closes; a QEMU whose TAP is
  gone spins a core on read errors.  So QEMU inherits ``client.fileno()``
  (``pass_fds``): the connection stays open while QEMU runs, even if this
  launcher dies.  And QEMU gets SIGKILL when the launcher dies
  (``PR_SET_PDEATHSIG``, set in the child before exec), so a launcher
  killed with SIGKILL leaves no VM behind either.  Pick one of the two
  lifetimes if you prefer: pass_fds alone lets the VM outlive the launcher
  (with its network); PDEATHSIG alone ties the VM to the launcher.
  ``vmnet-broker run`` needs neither: it execs QEMU, so there is no
  launcher process at all.

Tested with: QEMU 7.2 (Debian 12, TCG), the Debian cloud kernel and a
busybox initramfs (the guest image the test suite builds), on the broker's
``shared`` network: DHCP lease, MAC and MTU as attached, ping of the gateway;
killing the launcher with SIGKILL took QEMU and its TAP with it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import vmnet_broker

PR_SET_PDEATHSIG = 1


def kvm_usable() -> bool:
    """Real hardware virtualization: /dev/kvm alone can be a stub that boots nothing."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in cpuinfo.split() for flag in ("vmx", "svm")) and os.access("/dev/kvm", os.R_OK | os.W_OK)


def nic_args(iface: vmnet_broker.Interface, netdev_id: str = "net0") -> list[str]:
    """QEMU's -netdev/-device pair for a broker TAP attachment."""
    fds = ":".join(map(str, iface.fds))
    netdev = f"tap,id={netdev_id},{'fds' if len(iface.fds) > 1 else 'fd'}={fds},vhost=off"
    device = f"virtio-net-pci,netdev={netdev_id},mac={iface.mac}"
    if iface.mtu != 1500:
        device += f",host_mtu={iface.mtu}"
    if len(iface.fds) > 1:
        device += f",mq=on,vectors={2 * len(iface.fds) + 2}"
    return ["-netdev", netdev, "-device", device]


def die_with(parent: int):  # noqa: ANN201
    """A preexec_fn: the child gets SIGKILL when the thread that forked it dies.

    PDEATHSIG follows the forking *thread*, so spawn from one that lives as
    long as the launcher (here: the main thread).  If the parent is already
    gone by the time the child runs this, the signal will never come: exit.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)

    return preexec


def main() -> int:
    parser = argparse.ArgumentParser(description="Boot a QEMU VM on a vmnet-broker network.")
    parser.add_argument("--network", default="shared", help="broker network (default: shared)")
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--initrd")
    parser.add_argument("--append", default="console=ttyS0", help="kernel command line")
    parser.add_argument("--disk", help="a raw disk image, as virtio-blk")
    parser.add_argument("--memory", default="512", help="MiB (default 512)")
    parser.add_argument("--cpus", default="1")
    parser.add_argument("--mac", help="guest MAC (default: the broker picks one)")
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then more QEMU arguments")
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra

    client = vmnet_broker.Client()  # $VMNET_BROKER_SOCKET or /run/vmnet-broker/broker.sock
    try:
        net = client.acquire_network(args.network)
        iface = client.attach(args.network, kind="tap", vnet_hdr=True, mac=args.mac)
    except vmnet_broker.BrokerError as e:
        print(f"qemu_launcher: {args.network}: {e} (code {e.code})", file=sys.stderr)
        return 1
    print(
        f"qemu_launcher: {iface.name} on {net.name} ({net.subnet}/{net.mask}, gateway {net.gateway}), "
        f"mac {iface.mac}, mtu {iface.mtu}",
        file=sys.stderr,
    )

    accel = ["-accel", "kvm", "-cpu", "host"] if kvm_usable() else ["-accel", "tcg,thread=multi", "-cpu", "max"]
    cmd = [
        args.qemu, *accel, "-m", args.memory, "-smp", args.cpus,
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", args.kernel, "-append", args.append,
        *nic_args(iface),
    ]  # fmt: skip
    if args.initrd:
        cmd += ["-initrd", args.initrd]
    if args.disk:
        cmd += ["-drive", f"file={args.disk},if=virtio,format=raw"]
    if "-serial" not in extra:
        cmd += ["-serial", "mon:stdio"]
    cmd += extra

    assert threading.current_thread() is threading.main_thread()  # PDEATHSIG follows the forking thread
    qemu = subprocess.Popen(
        cmd,
        pass_fds=[client.fileno(), *iface.fds],  # the TAP, and the reference on it
        preexec_fn=die_with(os.getpid()),
    )
    iface.close()  # QEMU has its own copies; the TAP lives while QEMU or we hold the connection

    # ^C reaches QEMU from the terminal; SIGTERM to the launcher stops QEMU.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: qemu.terminate())
    status = qemu.wait()
    client.close()  # the last holder: the broker deletes the TAP now
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main())
