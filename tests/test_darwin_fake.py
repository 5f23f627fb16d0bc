"""The macOS broker on Linux, with only the native boundary faked.

The darwin backend, the XPC transport, the daemon's launchd semantics and
the XPC client are the real modules; ``tests/fake_darwin.py`` stands in for
the compiled macOS ``_native`` (XPC played by a Unix socket per Mach
service, vmnet by a subnet counter).  Brokers and clients are separate
processes, as on a Mac.  Scenarios follow upstream's test/test.bats, run
with our client and with a client that does exactly what upstream's
client.c does.
"""

from __future__ import annotations

import json
import os
import plistlib
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests import fake_darwin
from vmnet_broker import BrokerError, Client, CreateFailed, InternalError, InvalidRequest, NotFound
from vmnet_broker.backends.darwin import DarwinBackend, vmnet_options
from vmnet_broker.client import XpcChannel
from vmnet_broker.config import parse_network

REPO = Path(__file__).resolve().parent.parent
CLIENTS = ("client", "upstream-client")


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class FakeBroker:
    """``vmnet-broker serve`` on the fake native module, in its own process."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.service = f"test.vmnet-broker.{uuid.uuid4().hex[:8]}"
        self.env = dict(os.environ, VMB_FAKE_XPC_DIR=str(tmp_path), VMNET_BROKER_SERVICE=self.service)
        self.log_path = tmp_path / f"{self.service}.log"
        config_dir = tmp_path / "config"
        config_dir.mkdir(exist_ok=True)
        self.config_dir = config_dir
        self.args = ["--service-name", self.service, "--config-dir", str(config_dir), *args]
        self.broker_env = dict(self.env, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.children: list[subprocess.Popen] = []

    def start(self) -> FakeBroker:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fake_darwin", "serve", *self.args],
                cwd=REPO, env=self.broker_env, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        wait_until(lambda: "ready in" in self.log() or self.proc.poll() is not None, what="the broker to be ready")
        assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def run(self, kind: str, *names: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "tests.fake_darwin", kind, *names],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    def hold(self, *names: str) -> tuple[subprocess.Popen, list[str]]:
        """A client process that acquired ``names`` and keeps them; its tokens."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_darwin", "hold", *names],
            cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.children.append(proc)
        line = proc.stdout.readline()
        assert line.startswith("held"), (line, proc.stderr.read() if proc.poll() is not None else "")
        return proc, json.loads(line.split(" ", 1)[1])

    def client(self) -> Client:
        """Our client, in this process, over the fake XPC."""
        return Client(channel=XpcChannel(self.service, native=fake_darwin))

    def status(self) -> dict:
        with self.client() as client:
            return client.status().raw

    def stop(self) -> int:
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.wait()
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def make_broker(tmp_path, monkeypatch):
    monkeypatch.setenv("VMB_FAKE_XPC_DIR", str(tmp_path))  # for the clients in this process
    brokers: list[FakeBroker] = []

    def make(*args: str, env: dict[str, str] | None = None, start: bool = True) -> FakeBroker:
        broker = FakeBroker(tmp_path, *args, env=env)
        brokers.append(broker)
        return broker.start() if start else broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def broker(make_broker) -> FakeBroker:
    return make_broker()


# -- upstream's test.bats, through the XPC message path -------------------------


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize(
    "names",
    [["shared"], ["host"], ["shared", "host"], ["shared"] * 3, ["shared"] * 9],
    ids=["shared", "host", "both", "shared-3-times", "shared-9-times"],
)
def test_acquire_succeeds(broker, kind, names):
    result = broker.run(kind, *names)
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr


@pytest.mark.parametrize("kind", CLIENTS)
def test_non_existing_network_returns_not_found(broker, kind):
    result = broker.run(kind, "no-such-network")
    assert (result.returncode, result.stdout) == (1, "fail acquire_network 5\n")


def test_serial_peers_reuse_network_and_cancel_the_idle_timer(broker):
    tokens = []
    for _ in range(3):
        proc, held = broker.hold("shared")
        tokens += held
        proc.kill()
        proc.wait()
        wait_until(lambda: broker.status()["peers"] == 0, what="the peer to be gone")
    assert len(set(tokens)) == 1, "every peer must get the same serialization"
    assert broker.log().count("fake vmnet_network_create") == 1
    assert broker.log().count("removal cancelled") == 2


def test_concurrent_peers_share_one_network(broker):
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.fake_darwin", kind, name], cwd=REPO, env=broker.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for kind in CLIENTS for name in ("shared", "host")
    ]  # fmt: skip
    results = [p.communicate(timeout=30) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, results
    log = broker.log()
    assert log.count("fake vmnet_network_create mode=1001") == 1
    assert log.count("fake vmnet_network_create mode=1000") == 1


def test_holders_get_the_same_serialization_the_whole_time(broker):
    _, first = broker.hold("shared", "host")
    _, second = broker.hold("host", "shared")
    assert first == second[::-1]
    status = broker.status()
    assert {n["name"]: n["peers"] for n in status["networks"]} == {"shared": 2, "host": 2}


# -- malformed dictionaries, limits, failures -------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        {},
        {"network_name": "shared"},
        {"command": 1, "network_name": "shared"},
        {"command": b"acquire", "network_name": "shared"},
        {"command": "acquire"},
        {"command": "acquire", "network_name": 7},
        {"command": "acquire", "network_name": None},
        {"command": "acquire", "network_name": ["shared"]},
        {"command": "bogus", "network_name": "shared"},
        {"command": "acquire", "network_name": "shared", "id": {"nested": True}},
    ],
    ids=repr,
)
def test_malformed_dictionary_is_invalid_request_and_keeps_state(broker, message):
    conn = fake_darwin.XpcClient(broker.service)
    try:
        assert "network" in conn.send({"command": "acquire", "network_name": "host"})
        reply = conn.send(message)
        assert reply["error"] == 4 and isinstance(reply["error"], int), reply
        assert "network" not in reply
        # The connection still works and still holds what it held.
        assert "network" in conn.send({"command": "acquire", "network_name": "shared"})
        held = {n["name"]: n["peers"] for n in broker.status()["networks"]}
        assert held == {"host": 1, "shared": 1}
    finally:
        conn.close()


def test_a_dictionary_beyond_the_conversion_limits_is_invalid_request(broker):
    """The C++ listener hands such a request over as "invalid"; the fake does the same."""
    import socket

    deep: list = ["s", "x"]
    for _ in range(9):
        deep = ["a", [deep]]
    wide = ["a", [["i", i] for i in range(1025)]]
    for value in (deep, wide):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(fake_darwin._socket_path(broker.service))
            message = ["o", {"command": ["s", "acquire"], "network_name": ["s", "shared"], "extra": value}]
            s.send(json.dumps([1, message]).encode())
            _, reply = json.loads(s.recv(1 << 20))
        assert fake_darwin._decode(reply)["error"] == 4
    assert broker.status()["networks"] == []


def test_a_key_named_like_our_marker_is_just_another_key(broker):
    """Upstream reads command and network_name only; so do we, whatever else comes."""
    conn = fake_darwin.XpcClient(broker.service)
    try:
        reply = conn.send({"command": "acquire", "network_name": "shared", "__invalid__": "x"}, ["network"])
        assert "network" in reply and "error" not in reply
    finally:
        conn.close()


def test_ninth_network_is_internal_error_before_lookup(make_broker):
    broker = make_broker(start=False)
    for i in range(8):
        (broker.config_dir / f"n{i}.json").write_text(json.dumps({"mode": "host"}))
    broker.start()
    with broker.client() as client:
        for i in range(8):
            client.acquire_network(f"n{i}")
        # Upstream checks the limit before the name: an unknown name gives 7.
        with pytest.raises(InternalError):
            client.acquire_network("no-such-network")
        with pytest.raises(InternalError):
            client.acquire_network("shared")
        client.acquire_network("n3")  # one it holds: still fine
    with broker.client() as other:
        other.acquire_network("shared")  # the limit is per connection


def test_vmnet_failure_is_create_failure_with_the_status_logged(make_broker):
    broker = make_broker(env={"VMB_FAKE_VMNET_FAIL": "1009"})
    result = broker.run("upstream-client", "shared")
    assert (result.returncode, result.stdout) == (1, "fail acquire_network 6\n")
    with broker.client() as client, pytest.raises(CreateFailed) as info:
        client.acquire_network("host")
    assert "VMNET_SHARING_SERVICE_BUSY (1009)" in str(info.value)
    assert "VMNET_SHARING_SERVICE_BUSY (1009)" in broker.log()
    assert broker.status()["networks"] == []


def test_attach_and_detach_are_refused_on_macos(broker):
    with broker.client() as client:
        with pytest.raises(InvalidRequest, match="networks, not interfaces"):
            client.attach("shared")
        with pytest.raises(InvalidRequest):
            client.detach("vmb-t0")
        assert broker.status()["networks"] == []  # attach acquired nothing


# -- our extensions over XPC --------------------------------------------------------


def test_our_client_gets_the_network_and_its_serialization(broker):
    with broker.client() as client:
        net = client.acquire_network("shared")
        assert (net.name, net.mode, net.mask) == ("shared", "shared", "255.255.255.0")
        assert net.subnet.endswith(".0") and net.gateway.endswith(".1")
        assert net.prefix_len == 64 and net.ipv6_prefix
        vmnet = net.vmnet_network()
        assert vmnet.ipv4_subnet() == (net.gateway, net.mask)
        # XPC decodes a new object per reply: the same network is the same content.
        again = client.acquire_network("shared").serialization
        assert again is not net.serialization and again.description() == net.serialization.description()


def test_status_and_release_ride_the_same_dictionaries(broker):
    with broker.client() as client:
        client.acquire_network("shared")
        status = client.status()
        assert [(n.name, n.peers, n.idle_expires_in) for n in status.networks] == [("shared", 1, None)]
        client.release("shared")
        with pytest.raises(NotFound):
            client.release("shared")
        (net,) = client.status().networks
        assert net.peers == 0 and net.idle_expires_in is not None


def test_our_client_works_against_a_broker_that_answers_like_upstream(tmp_path, monkeypatch):
    """Upstream's broker replies with "network" only (no network_info): ask vmnet."""
    monkeypatch.setenv("VMB_FAKE_XPC_DIR", str(tmp_path))
    listener = fake_darwin.XpcListener("test.upstream")
    network = fake_darwin.create_network(fake_darwin.VMNET_SHARED_MODE)
    client = Client(channel=XpcChannel("test.upstream", native=fake_darwin))
    try:
        import threading

        def serve_one(reply):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                for event in listener.drain():
                    if event.kind == "request":
                        listener.reply(event.request, reply)
                        return
                time.sleep(0.01)

        thread = threading.Thread(target=serve_one, args=({"network": network.serialization()},))
        thread.start()
        net = client.acquire_network("shared")
        thread.join()
        assert (net.subnet, net.mask, net.gateway) == ("192.168." + net.subnet.split(".")[2] + ".0", "255.255.255.0", net.gateway)
        assert net.serialization.description() == network.serialization().description()

        # A serialization vmnet cannot turn back into a network (here: not
        # one at all) still acquires: the addresses are just unknown.
        thread = threading.Thread(target=serve_one, args=({"network": {"junk": b"x"}},))
        thread.start()
        net = client.acquire_network("shared")
        thread.join()
        assert net.subnet == "" and net.serialization is not None

        thread = threading.Thread(target=serve_one, args=({"error": 5},))
        thread.start()
        with pytest.raises(NotFound, match="Network name not found"):
            client.acquire_network("nope")
        thread.join()

        thread = threading.Thread(target=serve_one, args=({"error": 0},))
        thread.start()
        with pytest.raises(BrokerError) as info:  # success without a network: code 2
            client.acquire_network("shared")
        assert info.value.code == 2
        thread.join()
    finally:
        client.close()
        listener.close()


def test_no_broker_is_xpc_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("VMB_FAKE_XPC_DIR", str(tmp_path))
    with Client(channel=XpcChannel("test.nobody", native=fake_darwin)) as client:
        with pytest.raises(BrokerError, match="Failed to send XPC message to broker") as info:
            client.acquire_network("shared")
        assert info.value.code == 1


# -- lifetime: idle removal, peers going away, idle exit, signals -------------------


def test_network_removed_after_idle_timeout(make_broker):
    broker = make_broker("--idle-timeout", "0.3")
    assert broker.run("client", "shared").stdout == "ok\n"
    wait_until(lambda: broker.status()["networks"] == [], what="idle removal")
    assert "removed network 'shared'" in broker.log()


def test_peer_invalid_releases_everything(broker):
    proc, _ = broker.hold("shared", "host")
    assert broker.status()["peers"] == 1
    proc.kill()
    proc.wait()
    status = wait_until(lambda: (s := broker.status())["peers"] == 0 and s, what="the dead peer to be released")
    assert sorted(n["name"] for n in status["networks"]) == ["host", "shared"]
    assert all(n["peers"] == 0 and n["idle_expires_in"] is not None for n in status["networks"])
    assert "released 2 network(s)" in broker.log()


def test_exit_idle_after_the_last_client_leaves(make_broker):
    broker = make_broker("--exit-idle", "0.5")
    time.sleep(1.0)  # not armed before anyone connected, as upstream
    assert broker.proc.poll() is None
    assert broker.run("client", "shared").returncode == 0
    assert broker.proc.wait(10) == 0
    log = broker.log()
    assert log.count("fake xpc_transaction_begin") == log.count("fake xpc_transaction_end") == 1
    assert "no clients for 0.5 s, exiting" in log


def test_exit_idle_is_cancelled_by_a_new_client(make_broker):
    broker = make_broker("--exit-idle", "1")
    assert broker.run("client", "shared").returncode == 0
    broker.hold("shared")
    time.sleep(1.5)
    assert broker.proc.poll() is None, "exited while a client was connected"


def test_sigterm_is_ignored_while_clients_hold_networks(broker):
    proc, _ = broker.hold("shared")
    broker.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "SIGTERM ignored" in broker.log(), what="the signal to be logged")
    assert broker.proc.poll() is None
    proc.kill()
    proc.wait()
    wait_until(lambda: broker.status()["peers"] == 0, what="the holder to be gone")
    broker.proc.send_signal(signal.SIGINT)
    assert broker.proc.wait(10) == 0
    assert "vmnet-broker stopped" in broker.log()


# -- configuration reaches vmnet ----------------------------------------------------


def test_builtins_are_created_by_mode_alone_like_upstream():
    for name, mode in (("shared", fake_darwin.VMNET_SHARED_MODE), ("host", fake_darwin.VMNET_HOST_MODE)):
        from vmnet_broker.config import BUILTINS

        assert vmnet_options(BUILTINS[name], fake_darwin) == (mode, {})


def test_every_config_key_reaches_vmnet():
    config = parse_network(
        "lab",
        {
            "mode": "shared", "subnet": "192.168.42.0", "mask": "255.255.255.0", "mtu": 9000,
            "ipv6_prefix": "fd00:42::/64", "external_interface": "en0", "dhcp": False, "dns": False,
            "reservations": [{"mac": "52:54:00:00:00:10", "ip": "192.168.42.10"}],
            "port_forwards": [{"proto": "tcp", "host_port": 2222, "guest_ip": "192.168.42.10", "guest_port": 22}],
        },
    )  # fmt: skip
    mode, options = vmnet_options(config, fake_darwin)
    assert mode == fake_darwin.VMNET_SHARED_MODE
    assert options == {
        "subnet": "192.168.42.1", "mask": "255.255.255.0", "ipv6_prefix": "fd00:42::", "ipv6_prefix_len": 64,
        "mtu": 9000, "external_interface": "en0", "dhcp": False, "dns_proxy": False,
        "port_forwards": [("tcp", 2222, "192.168.42.10", 22)],
        "dhcp_reservations": [("52:54:00:00:00:10", "192.168.42.10")],
    }  # fmt: skip
    # And the fake (like the C++) accepts exactly these arguments.
    backend = DarwinBackend(fake_darwin)
    network = backend.create_network(config)
    assert network.info()["subnet"] == "192.168.42.0" and network.info()["gateway"] == "192.168.42.1"


def test_a_plist_network_is_created_with_its_options(make_broker):
    broker = make_broker(start=False)
    with open(broker.config_dir / "lab.plist", "wb") as f:
        plistlib.dump({"mode": "host", "subnet": "192.168.77.1", "mask": "255.255.255.0", "dhcp": False}, f)
    broker.start()
    assert broker.run("upstream-client", "lab").stdout == "ok\n"
    created = [line for line in broker.log().splitlines() if "fake vmnet_network_create" in line]
    assert created == [
        'fake vmnet_network_create mode=1000 options={"dhcp": false, "mask": "255.255.255.0", "subnet": "192.168.77.1"}'
    ]
    assert "vmnet reports subnet 192.168.77.1 mask 255.255.255.0" in broker.log()


def test_listener_error_exits_non_zero(make_broker):
    broker = make_broker(env={"VMB_FAKE_XPC_LISTENER_ERROR": "Connection invalid"}, start=False)
    with open(broker.log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_darwin", "serve", *broker.args],
            cwd=REPO, env=broker.broker_env, stderr=log,
        )  # fmt: skip
    assert proc.wait(20) == 1
    assert "XPC listener failed: Connection invalid" in broker.log()
