"""dnsmasq configuration text (pure) and the process lifecycle, with a stand-in dnsmasq.

Golden files live in tests/golden/; ``UPDATE_GOLDEN=1`` rewrites them.  The
real dnsmasq serving real guests is in test_e2e_services_units.py.
"""

import asyncio
import os
import signal
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from vmnet_broker.backends.linux import dnsmasq
from vmnet_broker.backends.linux.dnsmasq import Dnsmasq, DnsmasqError, DnsmasqSpec
from vmnet_broker.config import Reservation

from .conftest import assert_golden

STATE = Path("/var/lib/vmnet-broker")

SHARED = DnsmasqSpec(
    name="shared",
    bridge="vmb-br0",
    subnet=IPv4Network("192.168.105.0/24"),
    gateway=IPv4Address("192.168.105.1"),
    reservations=(
        Reservation("52:54:00:00:00:0a", IPv4Address("192.168.105.10"), "db"),
        Reservation("52:54:00:00:00:0b", IPv4Address("192.168.105.11")),
    ),
    domain="shared.internal",
    ipv6_prefix=IPv6Network("fd00:1:2:3::/64"),
    mode="shared",
    mtu=9000,
)
HOST = DnsmasqSpec(
    name="host",
    bridge="vmb-br1",
    subnet=IPv4Network("192.168.106.0/24"),
    gateway=IPv4Address("192.168.106.1"),
    domain="host.internal",
    ipv6_prefix=IPv6Network("fd00:9:9:9::/64"),
    mode="host",
)
CUSTOM = DnsmasqSpec(
    name="lab",
    bridge="vmb-br2",
    subnet=IPv4Network("10.77.0.0/16"),
    gateway=IPv4Address("10.77.0.1"),
    dhcp_range=(IPv4Address("10.77.1.0"), IPv4Address("10.77.1.255")),
    lease_time=600,
    dns_servers=(IPv4Address("10.0.0.53"), IPv6Address("fd00::53")),
    domain="lab.example",
)
NO_DNS = DnsmasqSpec(
    name="quiet",
    bridge="vmb-br3",
    subnet=IPv4Network("192.168.107.0/24"),
    gateway=IPv4Address("192.168.107.1"),
    dns=False,
    dns_servers=(IPv4Address("192.0.2.53"),),
    ipv6_prefix=IPv6Network("fd00:7::/64"),
)


def lines(spec: DnsmasqSpec) -> list[str]:
    return dnsmasq.config_text(spec, STATE).splitlines()


@pytest.mark.parametrize("spec", [SHARED, HOST, CUSTOM, NO_DNS], ids=lambda s: s.name)
def test_config_matches_golden_file(spec):
    assert_golden(f"dnsmasq_{spec.name}.conf", dnsmasq.config_text(spec, STATE))


@pytest.mark.parametrize("spec", [SHARED, HOST, CUSTOM, NO_DNS], ids=lambda s: s.name)
def test_serves_only_its_bridge_never_every_interface(spec):
    conf = lines(spec)
    assert f"interface={spec.bridge}" in conf and "except-interface=lo" in conf and "bind-dynamic" in conf
    assert [line for line in conf if line.startswith("interface=")] == [f"interface={spec.bridge}"]
    assert not any(line.startswith("listen-address=") for line in conf)


@pytest.mark.parametrize("spec", [SHARED, HOST, CUSTOM, NO_DNS], ids=lambda s: s.name)
def test_files_live_in_the_state_dir_and_no_system_files_are_read(spec):
    conf = lines(spec)
    assert f"pid-file={STATE}/dnsmasq-{spec.name}.pid" in conf
    assert f"dhcp-leasefile={STATE}/dnsmasq-{spec.name}.leases" in conf
    assert "no-hosts" in conf and "keep-in-foreground" in conf
    assert not any(line.startswith(("conf-file", "conf-dir", "addn-hosts")) for line in conf)


def test_dns_off_means_port_zero_and_the_given_servers_for_guests():
    conf = lines(NO_DNS)
    assert "port=0" in conf
    assert "dhcp-option=option:dns-server,192.0.2.53" in conf
    assert not any(line.startswith(("domain=", "server=", "resolv-file")) for line in conf)
    assert "dhcp-range=::,constructor:vmb-br3,ra-only" in conf


def test_upstream_is_resolv_conf_unless_servers_given():
    assert "resolv-file=/etc/resolv.conf" in lines(SHARED) and "no-resolv" not in lines(SHARED)
    conf = lines(CUSTOM)
    assert "no-resolv" in conf and "server=10.0.0.53" in conf and "server=fd00::53" in conf
    assert not any(line.startswith("resolv-file") for line in conf)


def test_host_mode_forwards_no_dns_and_advertises_no_default_route():
    conf = lines(HOST)
    assert "no-resolv" in conf and not any(line.startswith(("server=", "resolv-file")) for line in conf)
    assert "dhcp-option=option:router" in conf  # empty: no router option
    assert "ra-param=vmb-br1,0,0" in conf  # router lifetime 0
    assert "dhcp-option=option:router,192.168.105.1" in lines(SHARED)
    assert not any(line.startswith("ra-param") for line in lines(SHARED))


def test_names_answer_under_the_domain():
    conf = lines(SHARED)
    for line in ("domain=shared.internal", "local=/shared.internal/", "expand-hosts", "domain-needed"):
        assert line in conf


def test_reservations_and_range():
    conf = lines(SHARED)
    assert "dhcp-host=52:54:00:00:00:0a,192.168.105.10,db" in conf
    assert "dhcp-host=52:54:00:00:00:0b,192.168.105.11" in conf
    assert "dhcp-range=192.168.105.2,192.168.105.254,255.255.255.0,3600" in conf
    assert "dhcp-range=10.77.1.0,10.77.1.255,255.255.0.0,600" in lines(CUSTOM)


@pytest.mark.parametrize(
    "subnet, first, last",
    [
        ("192.168.105.0/24", "192.168.105.2", "192.168.105.254"),
        ("10.77.0.0/16", "10.77.0.2", "10.77.255.254"),
        ("192.168.9.0/30", "192.168.9.2", "192.168.9.2"),
    ],
)
def test_default_range_is_every_guest_address(subnet, first, last):
    assert dnsmasq.default_range(IPv4Network(subnet)) == (IPv4Address(first), IPv4Address(last))


def test_mtu_option_only_when_not_1500():
    assert "dhcp-option=option:mtu,9000" in lines(SHARED)
    assert not any("option:mtu" in line for line in lines(HOST))


def test_ipv6_slaac_from_the_prefix_with_dns_at_its_first_address():
    conf = lines(SHARED)
    assert "enable-ra" in conf and "dhcp-range=::,constructor:vmb-br0,ra-stateless" in conf
    assert "dhcp-option=option6:dns-server,[fd00:1:2:3::1]" in conf
    assert not any("constructor" in line or "enable-ra" in line for line in lines(CUSTOM))


def test_no_dhcp_means_no_dhcp_lines():
    conf = dnsmasq.config_text(DnsmasqSpec("d", "vmb-br4", IPv4Network("10.5.0.0/24"), IPv4Address("10.5.0.1"), dhcp=False), STATE)
    assert not any(line.startswith("dhcp-") for line in conf.splitlines())


# -- lifecycle, with a stand-in dnsmasq (no root needed) ----------------------

FAKE = """#!/bin/sh
# Stand-in dnsmasq: writes its pid file like the real one, then waits.
conf="${1#--conf-file=}"
[ -f "$(dirname "$0")/fail" ] && { echo "dnsmasq: failed to create listening socket: Address in use" >&2; exit 2; }
pidfile=$(sed -n 's/^pid-file=//p' "$conf")
trap 'exit 0' TERM
echo $$ > "$pidfile"
while :; do sleep 0.05; done
"""


@pytest.fixture
def fake_dnsmasq(tmp_path, monkeypatch):
    script = tmp_path / "bin" / "dnsmasq"
    script.parent.mkdir()
    script.write_text(FAKE)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    return script


@pytest.fixture
def state(tmp_path):
    return tmp_path / "state"


@pytest.fixture
def started(fake_dnsmasq, state):
    d = Dnsmasq(SHARED, state)
    d.start()
    yield d
    d.stop()


def test_start_writes_config_and_returns_once_the_pid_file_names_the_child(started, state):
    assert started.alive() and started.pid is not None
    conf = state / "dnsmasq-shared.conf"
    assert conf.read_text() == dnsmasq.config_text(SHARED, state)
    assert (state / "dnsmasq-shared.pid").read_text().strip() == str(started.pid)
    argv = Path(f"/proc/{started.pid}/cmdline").read_bytes().split(b"\0")
    assert argv[-2:] == [f"--conf-file={conf}".encode(), b""]  # only the config file


def test_stop_removes_config_and_pid_but_keeps_leases(started, state):
    leases = state / "dnsmasq-shared.leases"
    leases.write_text("lease line\n")
    pid = started.pid
    started.stop()
    assert not started.alive() and started.pid is None
    assert not Path(f"/proc/{pid}").exists()  # our child, so reaped
    assert sorted(p.name for p in state.iterdir()) == ["dnsmasq-shared.leases", "dnsmasq-shared.log"]
    assert leases.read_text() == "lease line\n"
    started.stop()  # twice is fine


def test_early_exit_raises_with_dnsmasq_own_words(fake_dnsmasq, state):
    (fake_dnsmasq.parent / "fail").touch()
    d = Dnsmasq(SHARED, state)
    with pytest.raises(DnsmasqError, match="exited with 2: dnsmasq: failed to create listening socket"):
        d.start()
    assert not d.alive() and not (state / "dnsmasq-shared.pid").exists()


def test_missing_binary_is_a_dnsmasq_error(state, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(dnsmasq.programs, "which", lambda name: "/nonexistent/dnsmasq")
    with pytest.raises(DnsmasqError, match="cannot run"):
        Dnsmasq(SHARED, state).start()


def test_watch_reports_an_unexpected_exit_at_once(started):
    async def scenario():
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        started.watch(loop, lambda: exited.set_result(True))
        os.kill(started.pid, signal.SIGKILL)
        await asyncio.wait_for(exited, 2)
        assert not started.alive()

    asyncio.run(scenario())


def test_watch_is_silent_after_a_deliberate_stop(started):
    async def scenario():
        fired = []
        started.watch(asyncio.get_running_loop(), lambda: fired.append(True))
        started.stop()
        await asyncio.sleep(0.2)
        assert fired == []

    asyncio.run(scenario())


def test_kill_leftovers_kills_only_dnsmasq_started_with_our_config(fake_dnsmasq, state):
    import subprocess

    # A crashed broker's dnsmasq: ours, but no longer anyone's child here.
    orphan = Dnsmasq(HOST, state)
    orphan.start()
    pid = orphan.pid
    orphan._proc = None  # forget it, as a crash would
    # A recycled pid: some other process now owns the number in a pid file.
    other = subprocess.Popen(["sleep", "30"])
    (state / "dnsmasq-gone.pid").write_text(f"{other.pid}\n")
    (state / "dnsmasq-stale.pid").write_text("999999999\n")
    try:
        assert dnsmasq.kill_leftovers(state) == [pid]
        assert other.poll() is None
        assert list(state.glob("*.pid")) == [] and list(state.glob("*.conf")) == []
        deadline = time.monotonic() + 3
        while dnsmasq.process_running(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not dnsmasq.process_running(pid)
    finally:
        other.kill()
        other.wait()
        try:
            os.waitpid(pid, 0)  # the test process is its parent after all
        except ChildProcessError:
            pass


# -- DHCP for guests booting together (issue 9, item 5) ---------------------------


@pytest.mark.parametrize("spec", [SHARED, HOST, CUSTOM, NO_DNS], ids=lambda s: s.name)
def test_dhcp_answers_at_once_as_the_only_server_of_the_subnet(spec):
    conf = lines(spec)
    # no-ping: no ~3 s conflict ping before each offer, which serialised DHCP.
    for option in ("no-ping", "dhcp-authoritative", "dhcp-rapid-commit"):
        assert option in conf


# -- the generator refuses what config.py should have refused (issue 8, class 1) ----

from dataclasses import replace  # noqa: E402


@pytest.mark.parametrize(
    "change",
    [
        {"domain": "shared.internal\nenable-tftp"},
        {"domain": "Shared.Internal"},
        {"name": "shared\nenable-tftp"},
        {"bridge": "vmb-br0\n"},
        {"dns_servers": (IPv6Address("fe80::1%lo\nenable-tftp"),)},
        {"dns_servers": ("9.9.9.9\nenable-tftp",)},
        {"reservations": (Reservation("52:54:00:00:00:0a\n", IPv4Address("192.168.105.10")),)},
        {"reservations": (Reservation("52:54:00:00:00:0a", IPv4Address("192.168.105.10"), "db\nenable-tftp"),)},
        {"mtu": 70000},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_value_outside_its_set_is_refused_not_written(change):
    with pytest.raises(DnsmasqError, match="refusing"):
        dnsmasq.config_text(replace(SHARED, **change), STATE)


@pytest.mark.parametrize("state", ["/var/lib/vm broker", "/var/lib/a#b", "/var/lib/x\ny", '/var/lib/"q"'])
def test_a_state_dir_path_dnsmasq_would_misread_is_refused(state):
    with pytest.raises(DnsmasqError, match="state directory"):
        dnsmasq.config_text(SHARED, Path(state))


# -- files in a state dir others could write (issue 8, class 3) ------------------------


@pytest.fixture
def outside(tmp_path):
    path = tmp_path / "outside"
    path.write_text("precious\n")
    return path


@pytest.mark.parametrize("planted", ["conf", "conf.tmp", "log", "leases", "pid"])
def test_start_never_writes_through_a_symlink_in_the_state_dir(fake_dnsmasq, state, outside, planted, caplog):
    state.mkdir()
    (state / f"dnsmasq-shared.{planted}").symlink_to(outside)
    d = Dnsmasq(SHARED, state)
    try:
        with caplog.at_level("WARNING"):
            d.start()
        assert d.alive()
    finally:
        d.stop()
    assert outside.read_text() == "precious\n"
    path = state / f"dnsmasq-shared.{planted}"
    assert not path.is_symlink()
    if planted in ("conf.tmp", "log", "leases"):
        assert f"{path} was a symbolic link (to {outside}): removed it, not followed" in caplog.text


def test_start_fixes_a_state_dir_others_can_write(fake_dnsmasq, state, caplog):
    state.mkdir()
    state.chmod(0o777)
    d = Dnsmasq(SHARED, state)
    with caplog.at_level("WARNING"):
        d.start()
    d.stop()
    assert state.stat().st_mode & 0o777 == 0o755
    assert "fixed: now uid 0, mode 0755" in caplog.text


def test_a_fifo_as_pid_file_or_log_does_not_hang(fake_dnsmasq, state):
    state.mkdir()
    os.mkfifo(state / "dnsmasq-gone.pid")
    assert dnsmasq._read_pid(state / "dnsmasq-gone.pid") is None
    assert dnsmasq.kill_leftovers(state) == []
    os.mkfifo(state / "dnsmasq-shared.log")
    assert Dnsmasq(SHARED, state)._log_tail() == "(no log)"
