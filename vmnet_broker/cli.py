"""Command line: ``vmnet-broker serve | status | run | demo``, and
``install-service | uninstall-service | service-status``.

Results go to stdout, logs to stderr; logging is configured here only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from ._version import __version__
from .broker import (
    BRIDGE_PORTS,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_INTERFACES_PER_NETWORK,
    DEFAULT_MAX_INTERFACES_PER_USER,
)
from .client import DEFAULT_SERVICE, DEFAULT_SOCKET, SOCKET_ENV, Client, default_socket_path
from .config import DEFAULT_CONFIG_DIR
from .errors import BrokerError

LOG_LEVELS = ("debug", "info", "warning", "error")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmnet-broker",
        description="One shared service that owns virtual networks for VM launchers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .daemon import DEFAULT_STATE_DIR

    serve = commands.add_parser(
        "serve",
        help="run the broker (as root, under systemd or by hand)",
        description="Run the broker until SIGINT or SIGTERM; then remove every network it made.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--socket", default=DEFAULT_SOCKET, help="Unix socket to listen on")
    serve.add_argument(
        "--config-dir", default=DEFAULT_CONFIG_DIR, help="directory of <network>.json files"
    )
    serve.add_argument(
        "--state-dir", default=DEFAULT_STATE_DIR, help="where subnets, dnsmasq configs and leases live"
    )
    serve.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="remove a network this long after its last client left",
    )
    serve.add_argument(
        "--socket-group",
        default=None,
        metavar="GROUP",
        help="group owning the socket: its members may use the broker without root",
    )
    serve.add_argument(
        "--exit-idle",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="exit this long after the last client disconnected (for launchd or systemd starting it on demand)",
    )
    serve.add_argument(
        "--service-name",
        default=DEFAULT_SERVICE,
        metavar="NAME",
        help="macOS: the XPC Mach service to listen on (the launchd job's MachServices name)",
    )
    serve.add_argument(
        "--max-interfaces-per-user",
        type=_count(1, 1_000_000),
        default=DEFAULT_MAX_INTERFACES_PER_USER,
        metavar="N",
        help="interfaces all connections of one user (root excepted) may own together",
    )
    serve.add_argument(
        "--max-interfaces-per-network",
        type=_count(1, BRIDGE_PORTS),
        default=DEFAULT_MAX_INTERFACES_PER_NETWORK,
        metavar="N",
        help=f"interfaces on one network, from everyone (a bridge has {BRIDGE_PORTS} ports)",
    )
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="log verbosity")

    status = commands.add_parser(
        "status",
        help="show the broker's networks and clients",
        description=f"Ask a running broker for its state (socket: --socket, ${SOCKET_ENV}, or {DEFAULT_SOCKET}).",
    )
    status.add_argument("--socket", default=None, help="broker socket")
    status.add_argument("--json", action="store_true", help="print the raw status object as JSON")

    from .run import add_parser as add_run_parser

    add_run_parser(commands)
    commands.add_parser(
        "demo",
        help="start a broker and two guests in namespaces, ping, show status, clean up",
        description="Needs root. Touches nothing outside the network namespaces it creates.",
    )
    doctor = commands.add_parser(
        "doctor",
        help="report leftovers, subnet clashes, degraded networks, unsafe directories, missing tools",
        description="Looks and reports; changes nothing. Exit status 0 when all is well, 1 otherwise.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    doctor.add_argument("--socket", default=None, help="broker socket (default: $VMNET_BROKER_SOCKET or the default)")
    doctor.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="the broker's state directory")
    doctor.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR, help="the broker's config directory")
    _add_service_commands(commands)
    return parser


def _count(low: int, high: int):  # noqa: ANN202
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86400 * 365:
        raise argparse.ArgumentTypeError("must be between 0 and one year")
    return value


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from .daemon import Options, serve

        _setup_logging(args.log_level)
        options = Options(
            socket_path=args.socket,
            config_dir=args.config_dir,
            state_dir=args.state_dir,
            idle_timeout=args.idle_timeout,
            socket_group=args.socket_group,
            exit_idle=args.exit_idle,
            service_name=args.service_name,
            max_interfaces_per_user=args.max_interfaces_per_user,
            max_interfaces_per_network=args.max_interfaces_per_network,
        )
        return serve(options)
    if args.command == "status":
        return _status(args.socket, args.json)
    if args.command == "doctor":
        from .doctor import run_doctor

        return run_doctor(args.socket, args.state_dir, args.config_dir)
    if args.command == "run":
        from .run import run

        return run(args)
    if args.command == "demo":
        from .demo import run_demo

        _setup_logging("warning")
        return run_demo()
    if args.command in SERVICE_COMMANDS:
        return _service(args)
    raise AssertionError(args.command)


def _status(socket_path: str | None, as_json: bool) -> int:
    try:
        with Client(socket_path) as client:
            status = client.status()
    except BrokerError as e:
        print(f"vmnet-broker status: {e} (code {e.code})", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(status.raw, indent=2))
        return 0
    where = socket_path or default_socket_path()
    print(f"vmnet-broker {status.version} at {where}: {status.peers} peer(s) holding networks")
    if not status.networks:
        print("no networks")
    for net in status.networks:
        raw = net.raw
        idle = "in use" if net.idle_expires_in is None else f"idle, removed in {net.idle_expires_in:.0f} s"
        print(
            f"{net.name:<12} {net.mode:<6} {net.subnet}/{raw.get('mask', '?')} "
            f"bridge {raw.get('bridge', '?')}  {net.peers} peer(s), {net.interfaces} interface(s), {idle}"
        )
        if raw.get("degraded"):
            print(f"  DEGRADED: {raw['degraded']}")
        for iface in raw.get("attachments", []):
            forged = iface.get("forged") or {}
            note = ""
            if forged.get("packets") or forged.get("mac_changes"):  # the bridge filter's (docs/security.md)
                note = (f"  forged: {forged.get('packets', 0)} frame(s) dropped, "
                        f"{forged.get('mac_changes', 0)} MAC change(s) undone")
            print(f"  {iface['name']:<10} {iface['kind']:<5} {iface['mac']}  peer {iface['peer']}{note}")
    return 0


# -- install-service, uninstall-service, service-status (vmnet_broker/service) --

SERVICE_COMMANDS = ("install-service", "uninstall-service", "service-status")


def _add_service_commands(commands: argparse._SubParsersAction) -> None:
    label_help = (
        "launchd Label and Mach service name (macOS; default com.github.nirs.vmnet-broker) "
        "or unit name (Linux; default vmnet-broker)"
    )
    install = commands.add_parser(
        "install-service",
        help="install and start the broker as a launchd daemon (macOS) or systemd socket service (Linux)",
        description="Needs root. macOS: /Library/LaunchDaemons/<label>.plist, see docs/launchd.md. "
        "Linux: /etc/systemd/system/<label>.socket and .service, see docs/systemd.md.",
    )
    install.add_argument("--replace", action="store_true", help="take the place of a job or unit that is not ours")
    install.add_argument(
        "--exit-idle", type=_seconds, default=None, metavar="SECONDS",
        help="the broker exits this long after its last client (default: 120 on macOS; Linux: keeps running)",
    )  # fmt: skip
    install.add_argument(
        "--socket-group", default="vmnet", metavar="GROUP", help="Linux: group that may use the broker without root"
    )
    uninstall = commands.add_parser(
        "uninstall-service", help="stop the broker's service and remove what install-service wrote"
    )
    status = commands.add_parser("service-status", help="whether the broker's service is loaded, its state and pid")
    for command in (install, uninstall):
        command.add_argument(
            "--force", action="store_true",
            help="go ahead even while clients hold networks (their VMs lose them) or when the "
            "interpreter or package root would run is writable by others",
        )  # fmt: skip
    for command in (install, uninstall, status):
        command.add_argument("--label", default=None, help=label_help)
        command.add_argument("--root", default="/", help=argparse.SUPPRESS)  # a DESTDIR, for tests


def _service(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import service

    options = service.ServiceOptions(
        label=args.label,
        exit_idle=getattr(args, "exit_idle", None),
        replace=getattr(args, "replace", False),
        force=getattr(args, "force", False),
        socket_group=getattr(args, "socket_group", "vmnet"),
        root=Path(args.root),
    )
    return service.main(args.command, options)
