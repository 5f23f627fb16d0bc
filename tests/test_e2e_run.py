"""``vmnet-broker run``: attach, exec COMMAND with the fds; persistent TAPs; the dgram example.

The pure parts (the command line, placeholders, QEMU's arguments) are unit
tests; the rest runs a real broker in its own namespace and real processes
as COMMAND.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from vmnet_broker import Client, cli
from vmnet_broker.client import Interface
from vmnet_broker.errors import Code
from vmnet_broker.run import NicSpec, UsageError, build_argv, check, qemu_args

from .conftest import broker_links, free_id, require_services, require_tools, wait_for
from .wire import WireClient

ROOT = Path(__file__).resolve().parent.parent
RUN = [sys.executable, "-m", "vmnet_broker", "run"]
TUNSETIFF, TUNSETPERSIST = 0x400454CA, 0x400454CB
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def tap(fds, mac="52:54:00:00:00:01", mtu=1500, vnet_hdr=False, name="vmb-t0") -> Interface:
    return Interface(name, "shared", "tap", mac, mtu, vnet_hdr, len(fds), list(fds))


def dgram(fd, mac="52:54:00:00:00:02", vnet_hdr=False) -> Interface:
    return Interface("vmb-d0", "shared", "dgram", mac, 1500, vnet_hdr, 1, [fd])


def parse(*argv: str) -> argparse.Namespace:
    return cli._parser().parse_args(["run", *argv])


# -- the command line: one --network per NIC, its options after it --------------------


def test_nic_options_apply_to_the_network_before_them():
    args = parse(
        "--socket", "/s", "--network", "shared", "--vnet-hdr", "--queues", "2",
        "--network", "host", "--kind", "dgram", "--mac", "52:54:00:AB:CD:EF",
        "--network", "lab", "--persist", "--qemu", "--", "qemu", "-m", "1G",
    )  # fmt: skip
    assert args.nics == [
        NicSpec("shared", vnet_hdr=True, queues=2),
        NicSpec("host", kind="dgram", mac="52:54:00:ab:cd:ef"),
        NicSpec("lab", persist=True),
    ]
    assert args.socket == "/s" and args.qemu and args.argv == ["--", "qemu", "-m", "1G"]


def test_a_nic_option_before_any_network_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse("--kind", "dgram", "--network", "shared", "--", "true")
    assert info.value.code == 2
    assert "--kind must follow the --network it applies to" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--network", "shared"], "a COMMAND to run is required"),
        (["--network", "shared", "--"], "a COMMAND to run is required"),
        (["--", "qemu"], "at least one --network is required"),
        (["--network", "shared", "--queues", "0", "--", "q"], "must be between 1 and 16"),
        (["--network", "shared", "--mac", "01:00:5e:00:00:01", "--", "q"], "multicast"),
    ],
)
def test_usage_errors_exit_2_before_connecting(argv, message, tmp_path):
    out = subprocess.run(
        [*RUN, "--socket", str(tmp_path / "no-broker.sock"), *argv], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2 and message in out.stderr, out.stderr


def specs(*nics: NicSpec) -> list[NicSpec]:
    return list(nics)


@pytest.mark.parametrize(
    "nics, command, qemu, message",
    [
        (specs(NicSpec("shared", kind="dgram", vnet_hdr=True)), ["qemu"], True, "-netdev dgram carries no vnet header"),
        (specs(NicSpec("shared", persist=True)), ["qemu"], True, "--qemu passes fds"),
        (specs(NicSpec("shared", persist=True, vnet_hdr=True)), ["fc"], False, "--persist makes a single-queue TAP"),
        (specs(NicSpec("shared", kind="dgram", queues=2)), ["x"], False, "--queues needs --kind tap"),
        (specs(NicSpec("shared")), ["x", "{fd1}"], False, "there are only 1 NIC(s)"),
        (specs(NicSpec("shared", persist=True)), ["fc", "--tap={fd}"], False, "is --persist: no fd"),
        (specs(NicSpec("shared")), ["x", "{nope}"], False, "unknown placeholder {nope}"),
        (specs(NicSpec("shared")), ["x", "{fd:>4}"], False, "unknown placeholder {fd:>4}"),
        (specs(NicSpec("shared")), ["x", "{fd!r}"], False, "unknown placeholder {fd!r}"),
        (specs(NicSpec("shared")), ["x", "${HOME}"], False, "unknown placeholder {HOME}"),
        (specs(NicSpec("shared")), ["x", "{"], False, "Single '{' encountered"),
    ],
)
def test_check_refuses(nics, command, qemu, message):
    with pytest.raises(UsageError) as info:
        check(nics, command, qemu)
    assert message in str(info.value)


def test_check_accepts_dgram_with_vnet_hdr_without_qemu_and_placeholders_in_command_name():
    check([NicSpec("shared", kind="dgram", vnet_hdr=True)], ["krun-like", "--fd={fd}"], False)
    check([NicSpec("a"), NicSpec("b", persist=True)], ["x", "{fd0} {ifname1} {mac1} {{literal}}"], False)


# -- placeholders and QEMU's arguments (argv out) -----------------------------------------


def test_placeholders_are_substituted_per_nic_and_braces_escape():
    ifaces = [tap([5, 6], mac="52:54:00:00:00:0a", mtu=9000), dgram(7, mac="52:54:00:00:00:0b")]
    argv = build_argv(
        ["{fd}-is-not-substituted-in-COMMAND", "{fd} {fds} {mac} {mtu} {ifname}", "{fd1},{fds1},{mac1},{mtu1}",
         "conn={connfd}", '{{"json": {fd0}}}', "plain"],
        ifaces, connfd=3, qemu=False,
    )  # fmt: skip
    assert argv == [
        "{fd}-is-not-substituted-in-COMMAND", "5 5:6 52:54:00:00:00:0a 9000 vmb-t0",
        "7,7,52:54:00:00:00:0b,1500", "conn=3", '{"json": 5}', "plain",
    ]  # fmt: skip


def test_qemu_tap_gets_the_brokers_mac_vhost_off_and_no_host_mtu_at_1500():
    assert qemu_args([tap([9], mac="52:54:00:12:34:56", vnet_hdr=True)]) == [
        "-netdev", "tap,id=vmb0,fd=9,vhost=off",
        "-device", "virtio-net-pci,netdev=vmb0,mac=52:54:00:12:34:56",
    ]  # fmt: skip


def test_qemu_multiqueue_tap_uses_fds_and_mq_and_host_mtu_when_not_1500():
    assert qemu_args([tap([5, 6, 7, 8], mac="52:54:00:12:34:56", mtu=9000)]) == [
        "-netdev", "tap,id=vmb0,fds=5:6:7:8,vhost=off",
        "-device", "virtio-net-pci,netdev=vmb0,mac=52:54:00:12:34:56,host_mtu=9000,mq=on,vectors=10",
    ]  # fmt: skip


def test_qemu_dgram_and_several_nics_get_their_own_ids():
    argv = build_argv(["qemu-system-x86_64", "-m", "256"], [tap([4]), dgram(5, mac="52:54:00:00:00:05")], 3, qemu=True)
    assert argv == [
        "qemu-system-x86_64", "-m", "256",
        "-netdev", "tap,id=vmb0,fd=4,vhost=off", "-device", "virtio-net-pci,netdev=vmb0,mac=52:54:00:00:00:01",
        "-netdev", "dgram,id=vmb1,local.type=fd,local.str=5",
        "-device", "virtio-net-pci,netdev=vmb1,mac=52:54:00:00:00:05",
    ]  # fmt: skip


def test_qemu_args_refuse_dgram_with_vnet_hdr():
    with pytest.raises(ValueError, match="no vnet header"):
        qemu_args([dgram(5, vnet_hdr=True)])


# -- against a real broker ----------------------------------------------------------------

# COMMAND for the tests: reports what it inherited as one JSON line, then
# exits with argv[2] (or waits for a line on stdin first, with "wait").
REPORT = textwrap.dedent(
    """
    import fcntl, json, os, socket, struct, sys
    info = json.loads(sys.argv[1])
    def alive(fd):
        try:
            os.fstat(fd)
            return True
        except OSError:
            return False
    listed = [int(n) for n in os.listdir("/proc/self/fd")]
    fds = sorted(fd for fd in listed if alive(fd))  # the listing's own fd is closed by now
    def describe(fd):
        try:
            ifr = fcntl.ioctl(fd, 0x800454D2, bytes(40))  # TUNGETIFF
            name, flags = struct.unpack("16sH", ifr[:18])
            return {"tap": name.rstrip(b"\\0").decode(), "flags": flags}
        except OSError:
            s = socket.socket(fileno=os.dup(fd))
            try:
                return {"family": int(s.family), "type": int(s.type)}
            finally:
                s.close()
    conn = info["connfd"]
    print(json.dumps({
        "pid": os.getpid(), "info": info, "fds": fds,
        "described": {str(fd): describe(fd) for fd in fds if fd > 2},
        "conn_nonblocking": bool(fcntl.fcntl(conn, fcntl.F_GETFL) & os.O_NONBLOCK),
    }), flush=True)
    if sys.argv[2] == "wait":
        sys.stdin.readline()
        sys.exit(0)
    sys.exit(int(sys.argv[2]))
    """
)
@pytest.fixture
def scripts():
    """The COMMANDs below as files anyone can read (ARGS are templates: braces in
    a ``-c`` program would be taken for placeholders)."""
    path = Path(tempfile.mkdtemp(prefix="vmbt-scripts-"))
    os.chmod(path, 0o755)
    for name, text in (("report.py", REPORT), ("open_by_name.py", OPEN_BY_NAME), ("with_tun.py", WITH_TUN)):
        (path / name).write_text(text)
        os.chmod(path / name, 0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


INFO = '{{"fd": {fd}, "fds": "{fds}", "mac": "{mac}", "mtu": {mtu}, "ifname": "{ifname}", "connfd": {connfd}}}'


def run_cli(broker, *argv: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RUN, "--socket", broker.socket_path, *argv], capture_output=True, text=True, timeout=60, **kwargs
    )


def interfaces_gone(broker) -> bool:
    with Client(broker.socket_path) as client:
        held = sum(net.interfaces for net in client.status().networks)
    return held == 0 and not [n for n in broker_links(broker.namespace) if not n.startswith("vmb-br")]


def test_command_inherits_exactly_the_connection_and_a_tap_and_its_status_is_returned(broker, scripts):
    out = run_cli(
        broker, "--network", "shared", "--vnet-hdr", "--mac", "52:54:00:12:34:56",
        "--", sys.executable, str(scripts / "report.py"), INFO, "7",
    )  # fmt: skip
    assert out.returncode == 7, out.stderr
    report = json.loads(out.stdout)
    info = report["info"]
    assert info["mac"] == "52:54:00:12:34:56" and info["mtu"] == 1500 and info["fds"] == str(info["fd"])
    # Nothing but stdio, the connection and the TAP crossed the exec.
    assert report["fds"] == sorted({0, 1, 2, info["connfd"], info["fd"]})
    tap_fd = report["described"][str(info["fd"])]
    assert tap_fd["tap"] == info["ifname"] and info["ifname"].startswith("vmb-t")
    assert tap_fd["flags"] & IFF_VNET_HDR
    conn = report["described"][str(info["connfd"])]
    assert conn == {"family": 1, "type": 5}  # AF_UNIX, SOCK_SEQPACKET
    assert not report["conn_nonblocking"]
    assert wait_for(lambda: interfaces_gone(broker), 2)


def test_command_does_not_inherit_pythons_ignored_signals(broker):
    out = run_cli(broker, "--network", "shared", "--", "cat", "/proc/self/status")
    assert out.returncode == 0, out.stderr
    ignored = int(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("SigIgn:")), 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)) and not ignored & (1 << (signal.SIGXFSZ - 1))


def test_dgram_fd_is_a_datagram_socket(broker, scripts):
    report_py = str(scripts / "report.py")
    out = run_cli(broker, "--network", "shared", "--kind", "dgram", "--", sys.executable, report_py, INFO, "0")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    info = report["info"]
    assert report["described"][str(info["fd"])] == {"family": 1, "type": 2}  # AF_UNIX, SOCK_DGRAM
    assert info["ifname"].startswith("vmb-d")
    assert wait_for(lambda: interfaces_gone(broker), 2)


def test_several_nics_multiqueue_and_indexed_placeholders(broker, scripts):
    template = (
        '{{"fds0": "{fds0}", "ifname0": "{ifname0}", "fd1": {fd1}, "ifname1": "{ifname1}", '
        '"mac1": "{mac1}", "connfd": {connfd}}}'
    )
    out = run_cli(
        broker, "--network", "shared", "--queues", "3", "--vnet-hdr",
        "--network", "host", "--kind", "dgram", "--mac", "52:54:00:00:00:42",
        "--", sys.executable, str(scripts / "report.py"), template, "0",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    info = report["info"]
    queues = [int(fd) for fd in info["fds0"].split(":")]
    assert len(queues) == 3
    assert {report["described"][str(fd)]["tap"] for fd in queues} == {info["ifname0"]}
    assert report["described"][str(info["fd1"])]["type"] == 2 and info["mac1"] == "52:54:00:00:00:42"
    assert report["fds"] == sorted({0, 1, 2, info["connfd"], info["fd1"], *queues})


def test_sigkilled_command_is_the_run_process_and_its_interfaces_go(broker, scripts):
    proc = subprocess.Popen(
        [*RUN, "--socket", broker.socket_path, "--network", "shared", "--network", "shared", "--kind", "dgram",
         "--", sys.executable, str(scripts / "report.py"), INFO, "wait"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        report = json.loads(proc.stdout.readline())
        # exec: COMMAND is the process we started; no launcher is left to die first.
        assert report["pid"] == proc.pid
        with Client(broker.socket_path) as client:
            (net,) = client.status().networks
            assert net.interfaces == 2 and net.raw["attachments"][0]["peer"] == proc.pid
        proc.kill()
        proc.wait(5)
        assert wait_for(lambda: interfaces_gone(broker), 1.0)
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def test_unknown_network_exits_1_naming_code_5(broker):
    out = run_cli(broker, "--network", "no-such-net", "--", "true")
    assert out.returncode == 1
    assert "Network name not found" in out.stderr and f"(code {Code.NOT_FOUND})" in out.stderr
    assert "no-such-net" in out.stderr


def test_second_nic_failing_leaves_nothing_attached(broker):
    out = run_cli(broker, "--network", "shared", "--network", "nope", "--", "true")
    assert out.returncode == 1 and "NIC 1 (--network nope)" in out.stderr
    assert wait_for(lambda: interfaces_gone(broker), 2)


def test_missing_broker_exits_1_naming_code_1(tmp_path):
    out = subprocess.run(
        [*RUN, "--socket", str(tmp_path / "none.sock"), "--network", "shared", "--", "true"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 1 and "(code 1)" in out.stderr and "connect" in out.stderr


def test_a_command_that_cannot_be_executed_exits_127_and_releases(broker):
    out = run_cli(broker, "--network", "shared", "--", "/nonexistent/vmm")
    assert out.returncode == 127 and "cannot execute '/nonexistent/vmm'" in out.stderr
    assert wait_for(lambda: interfaces_gone(broker), 2)


# -- persistent TAPs (Firecracker) ----------------------------------------------------------

# Opens /dev/net/tun as root in the current (the broker's) namespace, leaves
# it open across exec in $TUN_FD, then runs the rest of argv.  /dev/net/tun is
# mode 0600 on some machines (this one); what is tested is the TAP's owner
# check at TUNSETIFF, not the device node's mode.
WITH_TUN = textwrap.dedent(
    """
    import os, sys
    fd = os.open("/dev/net/tun", os.O_RDWR)
    os.set_inheritable(fd, True)
    os.environ["TUN_FD"] = str(fd)
    os.execvp(sys.argv[1], sys.argv[1:])
    """
)
OPEN_BY_NAME = textwrap.dedent(
    f"""
    import fcntl, os, struct, sys
    name = sys.argv[1]
    fd = int(os.environ["TUN_FD"])
    print("uid", os.getuid(), "owner", open(f"/sys/class/net/{{name}}/owner").read().strip(), flush=True)
    if len(sys.argv) > 2:
        sys.stdin.readline()
    try:
        fcntl.ioctl(fd, {TUNSETIFF}, struct.pack("16sH", name.encode(), {IFF_TAP | IFF_NO_PI | IFF_VNET_HDR}))
        print("attached", flush=True)
    except OSError as e:
        print("refused", e.errno, flush=True)
        sys.exit(1)
    if len(sys.argv) > 2:
        sys.stdin.readline()
    """
)


@pytest.fixture
def reachable_workdir():
    """A broker directory other users can reach (pytest's tmp_path is 0700)."""
    path = tempfile.mkdtemp(prefix="vmbt-run-")
    os.chmod(path, 0o711)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


# The throwaway user runs the system's Python on a copy of the package in a
# directory it can read: the checkout and the test's interpreter may live
# where only root can reach (/root/.pyenv here).
USER_PYTHON = "/usr/bin/python3"


def as_user(scripts: Path, uid: int, ns, *argv: str) -> list[str]:
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    return ns.exec_args([sys.executable, str(scripts / "with_tun.py"), *setpriv, *argv])


def user_env(scripts: Path) -> dict[str, str]:
    if not (scripts / "vmnet_broker").exists():
        shutil.copytree(ROOT / "vmnet_broker", scripts / "vmnet_broker", ignore=shutil.ignore_patterns("__pycache__"))
    return {**os.environ, "PYTHONPATH": str(scripts), "PYTHONDONTWRITEBYTECODE": "1"}


def test_persist_tap_is_owned_by_the_requesting_uid_and_deleted_with_the_connection(
    scripts, reachable_workdir, start_broker
):
    require_tools("setpriv", USER_PYTHON)
    uid = free_id(61000)
    broker = start_broker(workdir=reachable_workdir / "broker", extra_args=("--socket-group", str(uid)))
    ns = broker.namespace
    env = user_env(scripts)
    proc = subprocess.Popen(
        as_user(scripts, uid, ns, USER_PYTHON, "-m", "vmnet_broker", "run", "--socket", broker.socket_path,
                "--network", "shared", "--persist",
                "--", USER_PYTHON, str(scripts / "open_by_name.py"), "{ifname}", "wait"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/", env=env,
    )  # fmt: skip
    try:
        first = proc.stdout.readline().split()
        assert first == ["uid", str(uid), "owner", str(uid)], proc.stderr.read() if not first else first
        with Client(broker.socket_path) as client:
            (attachment,) = client.status().networks[0].raw["attachments"]
        name = attachment["name"]
        assert name.startswith("vmb-p") and attachment["persist"] is True
        # Another uid may not take it, even holding /dev/net/tun open.
        other = subprocess.run(
            as_user(scripts, uid + 1, ns, USER_PYTHON, str(scripts / "open_by_name.py"), name),
            capture_output=True, text=True, timeout=30, cwd="/", env=env,
        )  # fmt: skip
        assert other.returncode == 1 and other.stdout.split()[-2:] == ["refused", str(errno.EPERM)], other
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "attached"
        # The opener chose the vnet header; the device is still on the bridge.
        flags = int(ns.run("cat", f"/sys/class/net/{name}/tun_flags").stdout, 16)
        assert flags & IFF_VNET_HDR
        (link,) = json.loads(ns.ip("-j", "link", "show", "dev", name).stdout)
        assert link["master"].startswith("vmb-br")
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(10) == 0
        assert wait_for(lambda: name not in broker_links(ns), 2)
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


ROOT_OPENS = textwrap.dedent(
    f"""
    import fcntl, os, struct, sys
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, {TUNSETIFF}, struct.pack("16sH", sys.argv[1].encode(), {IFF_TAP | IFF_NO_PI}))
    if sys.argv[2] == "unpersist":
        fcntl.ioctl(fd, {TUNSETPERSIST}, 0)  # what its owner may do: it goes when closed
    print("ok")
    """
)


def test_persist_tap_comes_without_fds_and_goes_on_detach_and_its_name_is_not_reused(broker):
    ns = broker.namespace
    with WireClient(broker.socket_path) as a, WireClient(broker.socket_path) as b:
        reply, fds = a.call_fds({"command": "attach", "network_name": "shared", "persist": True})
        assert "interface" in reply, reply
        iface = reply["interface"]
        assert fds == [] and iface["persist"] is True and iface["kind"] == "tap"
        name = iface["name"]
        # The broker keeps no queue attached: the (single-queue) device is free to open.
        assert ns.run(sys.executable, "-c", ROOT_OPENS, name, "keep").stdout.strip() == "ok"
        assert name in broker_links(ns)
        # Its owner made it vanish; the broker still has it on record, so the
        # next persistent TAP gets another name, and `a` leaving cannot take it.
        ns.run(sys.executable, "-c", ROOT_OPENS, name, "unpersist")
        assert wait_for(lambda: name not in broker_links(ns), 2)
        other = b.call({"command": "attach", "network_name": "shared", "persist": True})["interface"]["name"]
        assert other != name
        a.close()
        assert wait_for(lambda: peers(broker) == 1, 2)
        assert other in broker_links(ns)
        assert b.call({"command": "detach", "interface": other}) == {}
        assert other not in broker_links(ns)


def peers(broker) -> int:
    """Connections holding a network (the one asking holds none)."""
    with Client(broker.socket_path) as client:
        return client.status().peers


@pytest.mark.parametrize(
    "extra", [{"kind": "dgram"}, {"vnet_hdr": True}, {"queues": 2}, {"persist": "yes"}]
)
def test_persist_refuses_what_it_cannot_honour(broker, extra):
    with WireClient(broker.socket_path) as c:
        reply = c.call({"command": "attach", "network_name": "shared", "persist": True, **extra})
        assert reply["error"] == Code.INVALID_REQUEST, reply
        assert c.call({"command": "status"})["status"]["networks"] == []


# -- the dgram example gets real answers through the broker ----------------------------------


def test_dgram_example_gets_a_dhcp_offer_and_an_arp_reply_under_run(start_broker):
    require_services()
    broker = start_broker()
    out = run_cli(
        broker, "--network", "shared", "--kind", "dgram",
        "--", sys.executable, str(ROOT / "examples" / "dgram_client.py"), "--fd", "{fd}", "--mac", "{mac}",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    offer, arp = out.stdout.splitlines()
    with Client(broker.socket_path) as client:
        net = client.acquire_network("shared")
    assert offer.startswith("DHCPOFFER " + net.subnet[: net.subnet.rfind(".") + 1])
    assert f"from {net.gateway}" in offer and arp.startswith(f"ARP {net.gateway} is at ")


def test_dgram_example_with_the_client_library_and_vnet_hdr(start_broker):
    require_services()
    broker = start_broker()
    out = run_cli(
        broker, "--network", "host", "--kind", "dgram", "--vnet-hdr",
        "--", sys.executable, str(ROOT / "examples" / "dgram_client.py"),
        "--fd", "{fd}", "--mac", "{mac}", "--vnet-hdr",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    standalone = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dgram_client.py"), "--network", "shared"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "VMNET_BROKER_SOCKET": broker.socket_path},
    )  # fmt: skip
    assert standalone.returncode == 0, standalone.stdout + standalone.stderr
    assert "DHCPOFFER" in standalone.stdout and "ARP" in standalone.stdout
