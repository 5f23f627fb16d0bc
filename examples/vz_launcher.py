#!/usr/bin/env python3
"""Boot a Linux VM with Virtualization.framework on a network from vmnet-broker.

    python3 examples/vz_launcher.py --kernel vmlinuz --initrd initrd.img \\
        --disk disk.img --network shared --cmdline "console=hvc0 root=/dev/vda"

The guest's console (hvc0) is this terminal; its NIC is on the broker's network,
shared with other launchers' VMs.  The broker connection is the reference: it
stays open while the VM runs, and the broker releases it when this process exits.
^C asks the guest to power off; a second ^C (or SIGTERM) stops the VM at once.

Needs macOS 26+ and `python3 -m pip install pyobjc-framework-Virtualization`
(plus vmnet_broker), run by a Python executable that has the
com.apple.security.virtualization entitlement.  Entitlements belong to the main
executable, not to modules, so ad-hoc sign an interpreter of your own, e.g. a
venv's copied binary (framework Pythons may re-exec another one: sign that):
    python3 -m venv --copies ~/vz-venv
    ~/vz-venv/bin/pip install pyobjc-framework-Virtualization /path/to/vmnet-broker
    /usr/libexec/PlistBuddy -c 'Add :com.apple.security.virtualization bool true' vz.plist
    codesign -f -s - --entitlements vz.plist ~/vz-venv/bin/python3
    codesign -d --entitlements - ~/vz-venv/bin/python3    # check

Written against Apple's and PyObjC's documentation (and PyObjC's source); it
could not be run here (no Mac), so it has not been tested.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import termios
from collections.abc import Iterator
from typing import Any

import objc
import Virtualization as vz
from Foundation import NSURL, NSFileHandle, NSObject
from PyObjCTools import AppHelper, MachSignals

import vmnet_broker

# initWithNetwork: takes a vmnet_network_ref, which PyObjC's metadata (from
# Apple's header) types ^{vmnet_network=}: a struct pointer PyObjC has no wrapper
# for, so it would refuse our int, and objc_object(c_void_p=...) fits only "@"
# arguments.  Declared void* here, the argument takes the int as the pointer.
objc.registerMetaDataForSelector(
    b"VZVmnetNetworkDeviceAttachment", b"initWithNetwork:", {"arguments": {2: {"type": b"^v"}}}
)


def log(message: str) -> None:
    # stdout is the guest's console; our own lines go to stderr.
    print(f"vz_launcher: {message}", file=sys.stderr, flush=True)


def file_url(path: str) -> Any:
    return NSURL.fileURLWithPath_(os.path.abspath(path))


def make_config(args: argparse.Namespace, network_ref: int) -> Any:
    """The VM configuration, validated; RuntimeError carries VZ's reason."""
    loader = vz.VZLinuxBootLoader.alloc().initWithKernelURL_(file_url(args.kernel))
    if args.initrd:
        loader.setInitialRamdiskURL_(file_url(args.initrd))
    loader.setCommandLine_(args.cmdline)

    attachment = vz.VZVmnetNetworkDeviceAttachment.alloc().initWithNetwork_(network_ref)
    if attachment is None:
        # Apple: nil on error, and a VM may only use a network its own process
        # created; ours is rebuilt from the broker's serialization, as upstream's
        # own launchers do.
        raise RuntimeError("VZVmnetNetworkDeviceAttachment refused the network")
    nic = vz.VZVirtioNetworkDeviceConfiguration.alloc().init()
    nic.setAttachment_(attachment)
    # Locally administered: it cannot collide with a vendor-assigned address.
    nic.setMACAddress_(vz.VZMACAddress.randomLocallyAdministeredAddress())
    log(f"guest MAC {nic.MACAddress().string()}")

    console = vz.VZFileHandleSerialPortAttachment.alloc()
    console = console.initWithFileHandleForReading_fileHandleForWriting_(
        NSFileHandle.fileHandleWithStandardInput(), NSFileHandle.fileHandleWithStandardOutput()
    )
    serial = vz.VZVirtioConsoleDeviceSerialPortConfiguration.alloc().init()
    serial.setAttachment_(console)

    config = vz.VZVirtualMachineConfiguration.alloc().init()
    config.setBootLoader_(loader)
    config.setCPUCount_(args.cpus)
    config.setMemorySize_(args.memory * 1024 * 1024)
    config.setNetworkDevices_([nic])
    config.setSerialPorts_([serial])
    # A Linux guest without an entropy source can stall early in boot.
    config.setEntropyDevices_([vz.VZVirtioEntropyDeviceConfiguration.alloc().init()])
    if args.disk:
        image = vz.VZDiskImageStorageDeviceAttachment.alloc()
        image, error = image.initWithURL_readOnly_error_(file_url(args.disk), False, None)
        if image is None:
            raise RuntimeError(f"disk {args.disk}: {error.localizedDescription()}")
        disk = vz.VZVirtioBlockDeviceConfiguration.alloc().initWithAttachment_(image)
        config.setStorageDevices_([disk])

    ok, error = config.validateWithError_(None)
    if not ok:
        raise RuntimeError(f"invalid configuration: {error.localizedDescription()}")
    return config


class VMDelegate(NSObject, protocols=[objc.protocolNamed("VZVirtualMachineDelegate")]):
    """Ends the run loop when the VM stops; exit_code says how it stopped."""
    exit_code = 0

    @objc.python_method
    def finish(self, code: int) -> None:
        self.exit_code = code
        AppHelper.stopEventLoop()

    def guestDidStopVirtualMachine_(self, vm: Any) -> None:
        log("guest powered off")
        self.finish(0)

    def virtualMachine_didStopWithError_(self, vm: Any, error: Any) -> None:
        log(f"VM stopped: {error.localizedDescription()}")
        self.finish(1)


@contextlib.contextmanager
def console_mode() -> Iterator[None]:
    # Keystrokes go to the guest as typed (it echoes and edits lines itself);
    # ISIG stays on, so ^C still reaches us as SIGINT.
    if not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved, mode = termios.tcgetattr(fd), termios.tcgetattr(fd)
    mode[0] &= ~termios.ICRNL
    mode[3] &= ~(termios.ICANON | termios.ECHO)
    termios.tcsetattr(fd, termios.TCSANOW, mode)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_vm(config: Any) -> int:
    # initWithConfiguration: runs the VM on the main queue, so every VZ call and
    # callback happens on this thread, served by the main run loop below.
    vm = vz.VZVirtualMachine.alloc().initWithConfiguration_(config)
    delegate = VMDelegate.alloc().init()
    vm.setDelegate_(delegate)  # held weakly by VZ; our `delegate` keeps it alive
    asked = False

    def on_started(error: Any) -> None:
        if error is not None:
            log(f"start failed: {error.localizedDescription()}")
            delegate.finish(1)

    def on_stopped(error: Any) -> None:
        if error is not None:
            log(f"stop failed: {error.localizedDescription()}")
        delegate.finish(delegate.exit_code or 1)

    def on_signal(signum: int) -> None:
        nonlocal asked
        delegate.exit_code = 128 + signum  # guestDidStop resets it to 0
        if signum == signal.SIGINT and not asked and vm.canRequestStop():
            asked = True
            if vm.requestStopWithError_(None)[0]:
                log("asked the guest to power off; ^C again stops it now")
                return
        if vm.canStop():
            vm.stopWithCompletionHandler_(on_stopped)
        else:
            AppHelper.stopEventLoop()

    # Python runs its own signal handlers only between bytecodes, not while the
    # run loop sleeps in C; MachSignals wakes the run loop and calls us on it.
    for signum in (signal.SIGINT, signal.SIGTERM):
        MachSignals.signal(signum, on_signal)

    with console_mode():
        vm.startWithCompletionHandler_(on_started)
        AppHelper.runConsoleEventLoop()
    return int(delegate.exit_code)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Boot a Linux VM on a vmnet-broker network.")
    add = parser.add_argument
    add("--kernel", required=True, help="uncompressed Linux kernel image")
    add("--initrd", help="initial ramdisk")
    add("--disk", help="raw disk image (read-write virtio-blk)")
    add("--cmdline", default="console=hvc0", help="kernel command line (default: %(default)s)")
    add("--network", default="shared", help="broker network (default: %(default)s)")
    add("--cpus", type=int, default=2, help="virtual CPUs (default: %(default)s)")
    add("--memory", type=int, default=1024, help="memory in MiB (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        client = vmnet_broker.Client()
        try:
            net = client.acquire_network(args.network)
            log(f"network {net.name} ({net.mode}) {net.subnet}/{net.mask} gateway {net.gateway}")
            # Our own vmnet_network_ref, made from the broker's serialization;
            # it must outlive the VM, so it lives until main() returns.
            vmnet_net = net.vmnet_network()
            return run_vm(make_config(args, vmnet_net.pointer()))
        finally:
            # The connection is our reference: the broker releases the network
            # once nobody holds it.  Exiting without this has the same effect.
            client.close()
    except vmnet_broker.BrokerError as e:
        log(f"broker: {e} (code {e.code})")
        return 1
    except (OSError, RuntimeError) as e:
        log(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
