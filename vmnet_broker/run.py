"""``vmnet-broker run``: attach NICs, then become the VM's process.

::

    vmnet-broker run [--socket PATH] [--qemu] [-v]
                     --network NAME [--kind tap|dgram] [--vnet-hdr] [--queues N] [--mac MAC] [--persist]
                     [--network NAME [NIC options]]...
                     -- COMMAND ARGS...

Each ``--network`` starts a NIC; the NIC options after it, up to the next
``--network``, are that NIC's.  ``run`` connects to the broker, attaches
every NIC, then replaces itself with COMMAND (``execvp``): COMMAND inherits
the broker connection and the attachments' fds (exactly those have
close-on-exec cleared), so the broker holds the network as long as COMMAND
lives and deletes its interfaces when it exits, however it exits.  There is
no launcher process left to die before the VM.  COMMAND's exit status is
``run``'s; a broker error is status 1 (the message names the code), a usage
error 2, a COMMAND that cannot be executed 126 or 127, as in a shell.

ARGS may hold placeholders, replaced before the exec (``{{`` and ``}}`` are
literal braces):

==============  ==============================================================
``{fd}``        the NIC's fd (a multiqueue TAP's first)
``{fds}``       all its fds, colon-separated (``5:6:7:8``)
``{mac}``       the guest MAC the broker chose or was given
``{mtu}``       the network's MTU
``{ifname}``    the interface's name (a ``--persist`` TAP is opened by it)
``{connfd}``    the broker connection's fd
==============  ==============================================================

``{fd0}``, ``{mac1}``, ... name the NICs in the order given; ``{fd}`` is
``{fd0}``.  ``--qemu`` appends a ``-netdev``/``-device`` pair per NIC (see
``qemu_args``).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import signal
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .client import Client, Interface
from .errors import BrokerError, InvalidReply
from .protocol import MAX_QUEUES, ProtocolError, normalize_mac

_FIELD = re.compile(r"(fd|fds|mac|mtu|ifname)(\d*)|connfd")
DEFAULT_MTU = 1500  # virtio-net's own default: host_mtu= only when it differs


class UsageError(Exception):
    """A command line ``run`` refuses before connecting (exit status 2)."""


@dataclass(frozen=True)
class NicSpec:
    """One ``--network`` and the NIC options that followed it."""

    network: str
    kind: str = "tap"
    vnet_hdr: bool = False
    queues: int = 1
    mac: str | None = None
    persist: bool = False

    def label(self, index: int) -> str:
        return f"NIC {index} (--network {self.network})"


# -- the command line ------------------------------------------------------------------


class _NewNic(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        namespace.nics = [*(namespace.nics or []), NicSpec(str(values))]


class _NicOption(argparse.Action):
    """Sets one field of the NIC the latest ``--network`` started."""

    def __init__(self, *args, field: str, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.field = field  # the NicSpec attribute it sets

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        if not namespace.nics:
            parser.error(f"{option_string} must follow the --network it applies to")
        value = self.const if self.nargs == 0 else values
        namespace.nics[-1] = replace(namespace.nics[-1], **{self.field: value})


def _queues(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= value <= MAX_QUEUES:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_QUEUES}")
    return value


def _mac(text: str) -> str:
    try:
        return normalize_mac(text)
    except ProtocolError as e:
        raise argparse.ArgumentTypeError(e.message) from None


EPILOG = """\
Each --network starts a NIC; --kind, --vnet-hdr, --queues, --mac and --persist
after it (up to the next --network) are that NIC's.

Placeholders in ARGS ({{ and }} are literal braces):
  {fd}      the NIC's fd (the first queue's)    {fds}     all its fds, a:b:c
  {mac}     its guest MAC                       {mtu}     the network's MTU
  {ifname}  its interface name                  {connfd}  the broker connection
  {fd0}, {mac1}, ...: the NICs in the order given ({fd} is {fd0}).

COMMAND replaces this process and inherits the connection and the fds, so
the interfaces live exactly as long as COMMAND. Exit status: COMMAND's; 1 if
the broker refused (the message gives the code), 2 for a usage error.

  vmnet-broker run --network shared --vnet-hdr --qemu -- \\
      qemu-system-x86_64 -m 1G -kernel vmlinuz -initrd initrd.img -nographic
  vmnet-broker run --network shared --kind dgram -- \\
      qemu-system-x86_64 ... -netdev dgram,id=n0,local.type=fd,local.str={fd} \\
      -device virtio-net-pci,netdev=n0,mac={mac}
"""


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``run`` subcommand (``cli.py`` calls this)."""
    parser = commands.add_parser(
        "run",
        help="attach NICs on broker networks, then exec a VMM that inherits them",
        description="Connect to the broker, attach one NIC per --network, then replace this process "
        "with COMMAND, which inherits the broker connection and the NICs' fds.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(nics=None, run_parser=parser)
    parser.add_argument("--socket", default=None, help="broker socket (default: $VMNET_BROKER_SOCKET or the default)")
    parser.add_argument("--qemu", action="store_true", help="append QEMU's -netdev/-device pair for every NIC")
    parser.add_argument("-v", "--verbose", action="store_true", help="say what was attached and what runs, on stderr")
    nic = parser.add_argument_group("NICs (repeat --network for more; options apply to the --network before them)")
    nic.add_argument("--network", action=_NewNic, metavar="NAME", help="start a NIC on this broker network")
    nic.add_argument(
        "--kind", action=_NicOption, field="kind", choices=("tap", "dgram"),
        help="tap: TAP fd(s); dgram: a datagram socket, one Ethernet frame each (default: tap)",
    )  # fmt: skip
    nic.add_argument(
        "--vnet-hdr", action=_NicOption, field="vnet_hdr", nargs=0, const=True,
        help="frames carry a virtio_net_hdr (offloads); QEMU tap, cloud-hypervisor and crosvm want it",
    )  # fmt: skip
    nic.add_argument(
        "--queues", action=_NicOption, field="queues", type=_queues, metavar="N", help="TAP queues (default 1)"
    )
    nic.add_argument("--mac", action=_NicOption, field="mac", type=_mac, help="guest MAC (default: random)")
    nic.add_argument(
        "--persist", action=_NicOption, field="persist", nargs=0, const=True,
        help="a TAP your uid opens by name ({ifname}), for VMMs such as Firecracker; no fd",
    )  # fmt: skip
    # Not "command": that is the top-level parser's subcommand.
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS", help="the VMM and its arguments")
    return parser


# -- pure parts: checks, placeholders, QEMU arguments ---------------------------------------


def check(nics: Sequence[NicSpec], command: Sequence[str], qemu: bool) -> None:
    """Everything ``run`` can refuse before connecting; raises ``UsageError``."""
    if not nics:
        raise UsageError("at least one --network is required")
    if not command:
        raise UsageError("a COMMAND to run is required (after --)")
    for i, nic in enumerate(nics):
        if nic.kind != "tap" and nic.queues > 1:
            raise UsageError(f"{nic.label(i)}: --queues needs --kind tap")
        if nic.persist and (nic.kind != "tap" or nic.vnet_hdr or nic.queues > 1):
            raise UsageError(
                f"{nic.label(i)}: --persist makes a single-queue TAP the VMM opens by name "
                "(it sets IFF_VNET_HDR itself): no --kind dgram, --vnet-hdr or --queues"
            )
        if qemu and nic.persist:
            raise UsageError(f"{nic.label(i)}: --qemu passes fds; a --persist TAP is for VMMs that open it by name")
        if qemu and nic.kind == "dgram" and nic.vnet_hdr:
            # QEMU's dgram netdev has no vnet header: the guest would get no
            # lease and nobody an error.
            raise UsageError(f"{nic.label(i)}: QEMU's -netdev dgram carries no vnet header: drop --vnet-hdr")
    for position, arg in enumerate(command[1:], 1):
        for name in _fields(arg, position):
            index = _nic_index(name)
            if index is None:
                continue
            if index >= len(nics):
                raise UsageError(f"{{{name}}} in argument {position}: there are only {len(nics)} NIC(s)")
            if name.startswith("fd") and nics[index].persist:
                raise UsageError(f"{{{name}}} in argument {position}: {nics[index].label(index)} is --persist: no fd")


def _fields(arg: str, position: int) -> list[str]:
    """The placeholder names in one argument; ``UsageError`` for anything else in braces."""
    shown = arg if len(arg) <= 60 else arg[:57] + "..."
    try:
        parsed = list(string.Formatter().parse(arg))
    except ValueError as e:
        raise UsageError(f"argument {position} {shown!r}: {e} (write {{{{ and }}}} for literal braces)") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion or not _FIELD.fullmatch(name):
            text = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise UsageError(
                f"argument {position} {shown!r}: unknown placeholder {{{text}}} "
                "(known: fd, fds, mac, mtu, ifname, connfd, and fd0, mac1, ...; write {{ and }} for literal braces)"
            )
        names.append(name)
    return names


def _nic_index(name: str) -> int | None:
    """Which NIC a placeholder names (None for ``connfd``)."""
    match = _FIELD.fullmatch(name)
    if match is None or match.group(1) is None:
        return None
    return int(match.group(2) or 0)


def placeholder_values(ifaces: Sequence[Interface], connfd: int) -> dict[str, str]:
    values = {"connfd": str(connfd)}
    for i, iface in enumerate(ifaces):
        per_nic = {
            "mac": iface.mac,
            "mtu": str(iface.mtu),
            "ifname": iface.name,
        }
        if iface.fds:
            per_nic["fd"] = str(iface.fds[0])
            per_nic["fds"] = ":".join(map(str, iface.fds))
        for key, value in per_nic.items():
            values[f"{key}{i}"] = value
            if i == 0:
                values[key] = value
    return values


def substitute(command: Sequence[str], values: dict[str, str]) -> list[str]:
    """COMMAND with its ARGS' placeholders replaced (checked by ``check`` first)."""
    return [command[0], *(arg.format_map(values) for arg in command[1:])]


def qemu_args(ifaces: Sequence[Interface]) -> list[str]:
    """A ``-netdev``/``-device`` pair per NIC, ids ``vmb0``, ``vmb1``, ...

    Always the broker's MAC (QEMU's default is the same for every VM); the
    network's MTU as ``host_mtu`` when it is not 1500; ``vhost=off`` (an
    unprivileged QEMU cannot open /dev/vhost-net itself); a multiqueue TAP
    as ``fds=`` (QEMU takes the queue count from it and refuses ``queues=``
    beside ``fds=``) with ``mq=on`` and 2N+2 MSI-X vectors.
    """
    args: list[str] = []
    for i, iface in enumerate(ifaces):
        netdev_id = f"vmb{i}"
        if iface.kind == "dgram":
            if iface.vnet_hdr:
                raise ValueError("QEMU's -netdev dgram carries no vnet header")
            netdev = f"dgram,id={netdev_id},local.type=fd,local.str={iface.fds[0]}"
        elif len(iface.fds) == 1:
            netdev = f"tap,id={netdev_id},fd={iface.fds[0]},vhost=off"
        elif len(iface.fds) > 1:
            netdev = f"tap,id={netdev_id},fds={':'.join(map(str, iface.fds))},vhost=off"
        else:
            raise ValueError(f"interface {iface.name} has no fd to give QEMU")
        device = f"virtio-net-pci,netdev={netdev_id},mac={iface.mac}"
        if iface.mtu != DEFAULT_MTU:
            device += f",host_mtu={iface.mtu}"
        if len(iface.fds) > 1:
            device += f",mq=on,vectors={2 * len(iface.fds) + 2}"
        args += ["-netdev", netdev, "-device", device]
    return args


def build_argv(command: Sequence[str], ifaces: Sequence[Interface], connfd: int, qemu: bool) -> list[str]:
    argv = substitute(command, placeholder_values(ifaces, connfd))
    if qemu:
        argv += qemu_args(ifaces)
    return argv


# -- attaching and exec'ing ------------------------------------------------------------------


def _attach(client: Client, nic: NicSpec) -> Interface:
    if not nic.persist:
        return client.attach(nic.network, nic.kind, mac=nic.mac, vnet_hdr=nic.vnet_hdr, queues=nic.queues)
    # A persistent TAP comes by name, with no fd (Client.attach expects fds).
    request = {"command": "attach", "network_name": nic.network, "kind": "tap", "persist": True}
    if nic.mac is not None:
        request["mac"] = nic.mac
    reply, fds = client.request(request)
    for fd in fds:
        os.close(fd)
    if fds:
        raise InvalidReply(f"a persistent TAP came with {len(fds)} fd(s), expected none")
    try:
        obj = reply["interface"]
        return Interface(
            name=str(obj["name"]), network_name=str(obj["network_name"]), kind=str(obj["kind"]),
            mac=str(obj["mac"]), mtu=int(obj["mtu"]), vnet_hdr=bool(obj["vnet_hdr"]), queues=int(obj["queues"]),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidReply(f"bad interface object: {e}") from None


def _inherit(fds: Sequence[int]) -> None:
    for fd in fds:
        os.set_inheritable(fd, True)


def _blocking(fd: int) -> None:
    # Python's socket timeout made it non-blocking; a VMM that talks to the
    # broker on {connfd} expects a plain socket.
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)


def _restore_signals() -> None:
    # Python ignores SIGPIPE and SIGXFSZ; ignored signals stay ignored across
    # exec (subprocess's restore_signals does the same for its children).
    for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)


def run(args: argparse.Namespace) -> int:
    """``vmnet-broker run``: returns only on failure; on success COMMAND replaces this process."""
    command = list(args.argv)
    if command[:1] == ["--"]:
        command = command[1:]
    nics: list[NicSpec] = args.nics or []
    try:
        check(nics, command, args.qemu)
    except UsageError as e:
        args.run_parser.error(str(e))  # exits 2

    client: Client | None = None
    ifaces: list[Interface] = []
    step = "connect"
    try:
        client = Client(args.socket)
        for i, nic in enumerate(nics):
            step = f"attach {nic.label(i)}"
            ifaces.append(_attach(client, nic))
    except BrokerError as e:
        print(f"vmnet-broker run: {step}: {e} (code {e.code})", file=sys.stderr)
        for iface in ifaces:
            iface.close()
        if client is not None:
            client.close()
        return 1

    argv = build_argv(command, ifaces, client.fileno(), args.qemu)
    if args.verbose:
        for i, iface in enumerate(ifaces):
            fds = ",".join(map(str, iface.fds)) or "none (opened by name)"
            print(
                f"vmnet-broker run: NIC {i}: {iface.kind} {iface.name} on {iface.network_name!r}, "
                f"mac {iface.mac}, mtu {iface.mtu}, fds {fds}",
                file=sys.stderr,
            )
        print(f"vmnet-broker run: connection fd {client.fileno()}; exec {' '.join(argv)}", file=sys.stderr)
    _blocking(client.fileno())
    _inherit([client.fileno(), *(fd for iface in ifaces for fd in iface.fds)])
    _restore_signals()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        # This process exits now, and with it the connection: the broker
        # deletes the interfaces.
        print(f"vmnet-broker run: cannot execute {argv[0]!r}: {e.strerror or e}", file=sys.stderr)
        return 127 if isinstance(e, FileNotFoundError) else 126
    raise AssertionError("execvp returned")
