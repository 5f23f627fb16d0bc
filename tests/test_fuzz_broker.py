"""A stateful fuzzer: several clients, root and an unprivileged socket-group
user, drive one real broker in its own namespace while a model says what
must be true after every step.

Rules: connect, acquire, attach tap/dgram, detach, release, garbage, fds
attached to a request, a half-closed request, disconnect, and a client
process killed with SIGKILL while it holds an interface.  Invariants after
each step: ``status`` equals the model (who holds which network, how many
interfaces), the TAP links in the broker's namespace equal the model, and no
request the model expects to succeed fails.  At the end of each example,
with every client gone, the broker's fd count equals what it was the last
time the same networks existed with no clients.

Examples are bounded: 20 by default (under half a minute); ``VMB_FUZZ_EXAMPLES``
asks for more.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule, run_state_machine_as_test

from tests.conftest import require_services, require_tools
from vmnet_broker import Client, NotAllowed, NotFound
from vmnet_broker.sandbox import BrokerProcess

EXAMPLES = int(os.environ.get("VMB_FUZZ_EXAMPLES", "20"))
NETWORKS = ("shared", "host", "lab")
MAX_CLIENTS = 4
MAX_INTERFACES = 3  # per client, far below any broker limit
TAG = f"vmbf{os.getpid() % 100000}"


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


class Accounts:
    """A throwaway socket group and user (and a group the user is not in)."""

    def __init__(self) -> None:
        self.group, self.other, self.user = f"{TAG}s", f"{TAG}o", f"{TAG}u"
        _run("groupadd", "--system", self.group)
        _run("groupadd", "--system", self.other)
        _run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "-g", self.group, self.user)
        self.uid = pwd.getpwnam(self.user).pw_uid
        self.gid = grp.getgrnam(self.group).gr_gid

    def close(self) -> None:
        for cmd in (("userdel", self.user), ("groupdel", self.group), ("groupdel", self.other)):
            subprocess.run(cmd, capture_output=True, timeout=30)


def connect_as(uid: int, gid: int, path: str) -> Client:
    """SO_PEERCRED records the effective ids at connect(): connect as the user."""
    if uid == 0:
        return Client(path, timeout=10)
    os.setegid(gid)
    os.seteuid(uid)
    try:
        return Client(path, timeout=10)
    finally:
        os.seteuid(0)
        os.setegid(0)


def wait_until(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


@pytest.fixture(scope="module")
def bench():
    require_services()
    require_tools("useradd", "groupadd", "userdel", "groupdel")
    accounts = Accounts()
    # The user must reach the socket: a directory chain it can traverse.
    workdir = tempfile.mkdtemp(prefix="vmnet-broker-fuzz-")
    os.chmod(workdir, 0o755)
    config = os.path.join(workdir, "config")
    os.mkdir(config)
    with open(os.path.join(config, "lab.json"), "w") as f:
        json.dump({"mode": "host", "allowed_groups": [accounts.other]}, f)
    broker = BrokerProcess(workdir, config_dir=config, extra_args=("--socket-group", accounts.group), log_level="info")
    try:
        broker.start()
        yield broker, accounts
    finally:
        broker.close()
        accounts.close()
        shutil.rmtree(workdir, ignore_errors=True)


class Held:
    """One client connection and what the model says it holds."""

    def __init__(self, client: Client, root: bool) -> None:
        self.client = client
        self.root = root
        self.networks: set[str] = set()
        self.interfaces: dict[str, str] = {}  # name -> network

    def __repr__(self) -> str:
        return f"<{'root' if self.root else 'user'} client {sorted(self.networks)} {sorted(self.interfaces)}>"


class BrokerMachine(RuleBasedStateMachine):
    broker: BrokerProcess
    accounts: Accounts
    fd_baselines: dict[frozenset[str], int]

    clients = Bundle("clients")

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Held] = []
        self.existing: set[str] = self._existing()

    def _existing(self) -> set[str]:
        with Client(self.broker.socket_path) as c:
            return {n.name for n in c.status().networks}

    # -- rules ----------------------------------------------------------------------

    @rule(target=clients, root=st.booleans())
    def connect(self, root: bool):
        if len(self.held) >= MAX_CLIENTS:
            return self.held[0]
        uid, gid = (0, 0) if root else (self.accounts.uid, self.accounts.gid)
        held = Held(connect_as(uid, gid, self.broker.socket_path), root)
        self.held.append(held)
        return held

    @rule(held=clients, name=st.sampled_from(NETWORKS + ("no-such",)))
    def acquire(self, held: Held, name: str):
        if held not in self.held:
            return
        if name == "no-such":
            with pytest.raises(NotFound):
                held.client.acquire_network(name)
        elif name == "lab" and not held.root:
            with pytest.raises(NotAllowed):
                held.client.acquire_network(name)
        else:
            assert held.client.acquire_network(name).name == name
            held.networks.add(name)
            self.existing.add(name)

    @rule(held=clients, name=st.sampled_from(("shared", "host")), kind=st.sampled_from(("tap", "dgram")),
          vnet_hdr=st.booleans())  # fmt: skip
    def attach(self, held: Held, name: str, kind: str, vnet_hdr: bool):
        if held not in self.held or len(held.interfaces) >= MAX_INTERFACES:
            return
        iface = held.client.attach(name, kind, vnet_hdr=vnet_hdr)
        iface.close()  # the interface belongs to the connection, not to our fd
        held.interfaces[iface.name] = name
        held.networks.add(name)
        self.existing.add(name)

    @rule(held=clients, data=st.data())
    def detach(self, held: Held, data):
        if held not in self.held or not held.interfaces:
            return
        name = data.draw(st.sampled_from(sorted(held.interfaces)))
        held.client.detach(name)
        del held.interfaces[name]

    @rule(held=clients, name=st.sampled_from(NETWORKS))
    def release(self, held: Held, name: str):
        if held not in self.held:
            return
        if name not in held.networks:
            with pytest.raises(NotFound):
                held.client.release(name)
            return
        held.client.release(name)
        held.networks.discard(name)
        held.interfaces = {i: n for i, n in held.interfaces.items() if n != name}

    @rule(held=consumes(clients))
    def disconnect(self, held: Held):
        if held in self.held:
            held.client.close()
            self.held.remove(held)

    @rule(data=st.binary(max_size=200) | st.sampled_from([b"", b"{}", b"[]", b'{"command":7}', b"\xff" * 70000]))
    def garbage(self, data: bytes):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(10)
            s.connect(self.broker.socket_path)
            s.send(data)
            reply = json.loads(s.recv(1 << 20) or b"{}")
        assert reply.get("error") == 4, (data[:50], reply)

    @rule(count=st.integers(1, 8))
    def fds_attached(self, count: int):
        """fds sent to the broker are closed by it; the request is still answered."""
        pipes = [os.pipe() for _ in range(count)]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.settimeout(10)
                s.connect(self.broker.socket_path)
                socket.send_fds(s, [b'{"command":"status"}'], [r for r, _ in pipes])
                assert "status" in json.loads(s.recv(1 << 20))
            # Every read end we sent is closed in the broker too: our write ends see no reader.
            for r, w in pipes:
                os.close(r)
            for _, w in pipes:
                assert wait_until(lambda w=w: _no_reader(w)), "the broker kept a client's fd"
        finally:
            for _, w in pipes:
                os.close(w)

    @rule()
    def half_close(self):
        """A request followed by shutdown(SHUT_WR) still gets its reply."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(10)
            s.connect(self.broker.socket_path)
            s.send(b'{"command":"status","id":1}')
            s.shutdown(socket.SHUT_WR)
            reply = json.loads(s.recv(1 << 20))
        assert reply.get("id") == 1 and "status" in reply

    @rule(kind=st.sampled_from(("tap", "dgram")))
    def kill_a_client(self, kind: str):
        """A launcher killed with SIGKILL while it holds an interface leaves nothing."""
        code = (
            "import sys, vmnet_broker\n"
            f"c = vmnet_broker.Client({self.broker.socket_path!r})\n"
            f"i = c.attach('host', {kind!r})\n"
            "print(i.name, flush=True)\n"
            "sys.stdin.read()\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            name = proc.stdout.readline().strip()
            assert name.startswith("vmb-"), name
        finally:
            proc.kill()
            proc.wait(10)
        self.existing.add("host")
        assert wait_until(lambda: name not in self._links()), f"{name} outlived its killed client"

    # -- invariants -----------------------------------------------------------------

    def _links(self) -> set[str]:
        out = self.broker.namespace.ip("-j", "link", "show").stdout
        return {link["ifname"] for link in json.loads(out or "[]") if link["ifname"].startswith(("vmb-t", "vmb-d"))}

    @invariant()
    def status_matches_the_model(self):
        with Client(self.broker.socket_path) as c:
            status = c.status()
        got = {n.name: (n.peers, n.interfaces) for n in status.networks}
        want = {
            name: (sum(name in h.networks for h in self.held),
                   sum(n == name for h in self.held for n in h.interfaces.values()))
            for name in self.existing
        }  # fmt: skip
        assert got == want, (got, want, self.held)

    @invariant()
    def links_match_the_model(self):
        want = {i for h in self.held for i in h.interfaces}
        # A detached TAP may finish unregistering just after the reply.
        assert wait_until(lambda: self._links() == want), (self._links(), want)

    def teardown(self):
        for held in self.held:
            held.client.close()
        with Client(self.broker.socket_path) as c:
            assert wait_until(lambda: c.status().raw["connections"] == 1), "clients still connected"
        assert wait_until(lambda: not self._links()), self._links()
        key = frozenset(self._existing())
        fds = wait_until(lambda: (n := _steady_fd_count(self.broker.pid)) == self.fd_baselines.get(key, n) and n) or _fd_count(self.broker.pid)
        expected = self.fd_baselines.setdefault(key, fds)
        assert fds == expected, f"broker holds {fds} fds, {expected} the last time these networks existed idle"


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _steady_fd_count(pid: int) -> int:
    """The count once it stops changing: the broker closes a client's fds (its
    connection included) on closer threads, just after it handles the EOF."""
    last = _fd_count(pid)
    for _ in range(40):
        time.sleep(0.05)
        now = _fd_count(pid)
        if now == last:
            return now
        last = now
    return last


def _no_reader(write_fd: int) -> bool:
    try:
        os.write(write_fd, b"x")
    except BrokenPipeError:
        return True
    return False


def test_broker_state_machine(bench):
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    broker, accounts = bench
    BrokerMachine.broker = broker
    BrokerMachine.accounts = accounts
    BrokerMachine.fd_baselines = {}
    run_state_machine_as_test(
        BrokerMachine,
        settings=settings(
            max_examples=EXAMPLES, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )
    assert broker.process.poll() is None, broker.log()
