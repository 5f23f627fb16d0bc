"""End to end: a real ``vmnet-broker serve`` in its own namespace, real sockets.

The scenarios of upstream's test/test.bats come first, then the Linux
extensions: attach/detach, lifetimes, bad input, status.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from vmnet_broker import Client, CreateFailed, InternalError, NotFound
from vmnet_broker.errors import Code

from .conftest import broker_links, links_in, wait_for
from .wire import WireClient

NINE = {f"net{i}": {"mode": "host"} for i in range(9)}


def link(ns, name):
    return next(item for item in links_in(ns) if item["ifname"] == name)


# -- upstream's scenarios (test/test.bats) ---------------------------------------


def test_acquire_shared_network(broker):
    with WireClient(broker.socket_path) as c:
        reply = c.call({"command": "acquire", "network_name": "shared"})
    net = reply["network"]
    assert "error" not in reply
    assert net["name"] == "shared" and net["mode"] == "shared"
    assert net["mask"] == "255.255.255.0" and net["subnet"].endswith(".0")
    assert net["gateway"] == net["subnet"][:-1] + "1"
    assert net["mtu"] == 1500 and net["bridge"].startswith("vmb-br")
    assert {"ipv6_prefix", "prefix_len"} <= set(net)


def test_acquire_host_network(broker):
    with WireClient(broker.socket_path) as c:
        net = c.call({"command": "acquire", "network_name": "host"})["network"]
    assert net["mode"] == "host"


def test_shared_and_host_get_distinct_subnets_and_bridges(broker):
    with WireClient(broker.socket_path) as c:
        shared = c.call({"command": "acquire", "network_name": "shared"})["network"]
        host = c.call({"command": "acquire", "network_name": "host"})["network"]
    assert shared["subnet"] != host["subnet"] and shared["bridge"] != host["bridge"]
    bridge = link(broker.namespace, shared["bridge"])
    assert bridge["linkinfo"]["info_kind"] == "bridge"
    addrs = broker.namespace.ip("-j", "addr", "show", "dev", shared["bridge"]).stdout
    assert shared["gateway"] in addrs


def test_unknown_network_is_not_found(broker):
    with WireClient(broker.socket_path) as c:
        reply = c.call({"command": "acquire", "network_name": "no-such-network"})
    assert reply["error"] == Code.NOT_FOUND and "no-such-network" in reply["message"]
    with Client(broker.socket_path) as client, pytest.raises(NotFound) as info:
        client.acquire_network("no-such-network")
    assert str(info.value).startswith("Network name not found")


def test_acquire_same_network_many_times(broker):
    with WireClient(broker.socket_path) as c:
        replies = [c.call({"command": "acquire", "network_name": "shared"}) for _ in range(9)]
        status = c.call({"command": "status"})["status"]
    assert all(r["network"] == replies[0]["network"] for r in replies)
    (net,) = status["networks"]
    assert net["peers"] == 1


def test_too_many_networks_is_internal_error(start_broker):
    broker = start_broker(config=NINE)
    with Client(broker.socket_path) as client:
        for i in range(8):
            client.acquire_network(f"net{i}")
        with pytest.raises(InternalError) as info:
            client.acquire_network("net8")
        assert info.value.code == 7
        # What it held is untouched.
        assert len(client.status().networks) == 8


def test_serial_peers_share_one_network(broker):
    seen = []
    for _ in range(5):
        with Client(broker.socket_path) as client:
            seen.append(client.acquire_network("shared"))
    assert len({(n.subnet, n.bridge) for n in seen}) == 1


def test_concurrent_peers_share_one_network(broker):
    results, errors = [], []
    clients = [Client(broker.socket_path) for _ in range(10)]
    barrier = threading.Barrier(len(clients))

    def acquire(client):
        try:
            barrier.wait(5)
            results.append(client.acquire_network("shared"))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=acquire, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    try:
        assert not errors
        assert len({(n.subnet, n.bridge) for n in results}) == 1 and len(results) == 10
        (net,) = clients[0].status().networks
        assert net.peers == 10
    finally:
        for c in clients:
            c.close()


# -- bad input -------------------------------------------------------------------

MALFORMED = [
    b"not json",
    b"\xff\xfe\x00",
    b"[1, 2]",
    b'"acquire"',
    b"{}",
    json.dumps({"command": 42}).encode(),
    json.dumps({"command": "acquire"}).encode(),
    json.dumps({"command": "acquire", "network_name": 1}).encode(),
    json.dumps({"command": "explode"}).encode(),
    json.dumps({"command": "detach"}).encode(),
    json.dumps({"command": "attach", "network_name": "shared", "kind": "vde"}).encode(),
    json.dumps({"command": "attach", "network_name": "shared", "queues": 0}).encode(),
    json.dumps({"command": "attach", "network_name": "shared", "queues": 99}).encode(),
    json.dumps({"command": "attach", "network_name": "shared", "mac": "ff:ff:ff:ff:ff:ff"}).encode(),
    json.dumps({"command": "attach", "network_name": "shared", "vnet_hdr": "true"}).encode(),
    json.dumps({"command": "attach", "network_name": "shared", "kind": "dgram", "queues": 2}).encode(),
    json.dumps({"command": "status", "pad": "x" * 70000}).encode(),
]


def test_malformed_requests_get_4_and_keep_connection_and_state(broker):
    with WireClient(broker.socket_path) as c:
        iface = c.call({"command": "attach", "network_name": "shared"})["interface"]
        before = c.call({"command": "status"})["status"]["networks"]
        for data in MALFORMED:
            reply = c.call(data)
            assert reply["error"] == Code.INVALID_REQUEST, data[:60]
            assert reply["message"]
        after = c.call({"command": "status"})["status"]["networks"]
        assert after == before
        assert iface["name"] in broker_links(broker.namespace)
    assert "invalid request" in broker.log()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fd_count(pid: int, timeout: float = 2.0) -> int:
    """The broker's fd count once closes handed to its closer threads are done."""
    deadline = time.monotonic() + timeout
    last = fd_count(pid)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = fd_count(pid)
        if now == last:
            return now
        last = now
    return last


def test_fds_sent_by_a_client_are_closed_by_the_broker(broker):
    with WireClient(broker.socket_path) as c:
        c.call({"command": "status"})
        before = settled_fd_count(broker.pid)
        r, w = os.pipe()
        try:
            c.send({"command": "status"}, fds=[r, w, r, w])
            reply, _ = c.recv()
        finally:
            os.close(r)
            os.close(w)
        assert "status" in reply
        # Closed on the broker's closer threads, soon after.
        assert wait_for(lambda: fd_count(broker.pid) == before, 2), (fd_count(broker.pid), before)


def test_request_id_is_echoed_on_success_and_error(broker):
    with WireClient(broker.socket_path) as c:
        assert c.call({"command": "status", "id": 17})["id"] == 17
        assert c.call({"command": "acquire", "network_name": "nope", "id": "x"})["id"] == "x"
        assert c.call({"command": "bogus", "id": None}) == {
            "error": 4, "message": "unknown command 'bogus'", "id": None,
        }  # fmt: skip
        assert "id" not in c.call({"command": "status"})


def test_pipelined_requests_are_answered_in_order(broker):
    with WireClient(broker.socket_path) as c:
        for i in range(50):
            c.send({"command": "acquire", "network_name": "shared" if i % 2 else "nope", "id": i})
        for i in range(50):
            reply, _ = c.recv()
            assert reply["id"] == i and ("network" in reply) == bool(i % 2)


def test_client_dying_mid_request_loses_nothing_for_others(broker):
    with Client(broker.socket_path) as keeper:
        kept = keeper.attach("shared")
        kept.close()
        bridge = keeper.acquire_network("shared").bridge
        for _ in range(5):
            c = WireClient(broker.socket_path)
            c.send({"command": "attach", "network_name": "shared", "queues": 4})
            c.close()  # gone before the reply (and its fds) could be delivered
        assert wait_for(lambda: set(broker_links(broker.namespace)) == {bridge, kept.name}, 2)
        (net,) = keeper.status().networks
        assert net.peers == 1 and net.interfaces == 1


# -- attachments -------------------------------------------------------------------


def tun_name(fd: int) -> str:
    TUNGETIFF = 0x800454D2
    ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    name, flags = struct.unpack("16sH", ifr[:18])
    return name.rstrip(b"\0").decode()


def test_tap_is_enslaved_to_the_right_bridge_with_mtu_and_mac(broker):
    with Client(broker.socket_path) as client:
        shared = client.acquire_network("shared")
        host = client.acquire_network("host")
        with client.attach("host", mac="52:54:00:12:34:56") as iface:
            assert iface.kind == "tap" and iface.mac == "52:54:00:12:34:56" and len(iface.fds) == 1
            assert tun_name(iface.fds[0]) == iface.name
            tap = link(broker.namespace, iface.name)
            bridge = link(broker.namespace, host.bridge)
            assert tap["master"] == host.bridge != shared.bridge
            assert tap["mtu"] == bridge["mtu"] == host.mtu
            # The host end of the cable, not the guest's own MAC.
            assert tap["address"] == "fe:54:00:12:34:56"
            assert "UP" in tap["flags"]


def test_random_mac_is_locally_administered_unicast(broker):
    with Client(broker.socket_path) as client:
        macs = set()
        for _ in range(4):
            with client.attach("shared") as iface:
                first = int(iface.mac[:2], 16)
                assert first & 0x02 and not first & 0x01
                macs.add(iface.mac)
        assert len(macs) == 4


def test_multiqueue_tap_gives_one_fd_per_queue_on_one_device(broker):
    with Client(broker.socket_path) as client:
        with client.attach("shared", queues=4, vnet_hdr=True) as iface:
            assert iface.queues == 4 and len(iface.fds) == 4 and iface.vnet_hdr
            assert {tun_name(fd) for fd in iface.fds} == {iface.name}
            assert link(broker.namespace, iface.name)["linkinfo"]["info_data"]["multi_queue"] is True


def test_dgram_attachment_is_a_datagram_socket_backed_by_a_tap(broker):
    import socket as pysocket

    with Client(broker.socket_path) as client:
        net = client.acquire_network("shared")
        with client.attach("shared", kind="dgram") as iface:
            sock = pysocket.socket(fileno=os.dup(iface.fds[0]))
            try:
                assert sock.type == pysocket.SOCK_DGRAM and sock.family == pysocket.AF_UNIX
            finally:
                sock.close()
            assert iface.name.startswith("vmb-d")
            assert link(broker.namespace, iface.name)["master"] == net.bridge


def test_detach_removes_the_interface(broker):
    with Client(broker.socket_path) as client:
        iface = client.attach("shared")
        iface.close()
        assert iface.name in broker_links(broker.namespace)
        client.detach(iface)
        assert iface.name not in broker_links(broker.namespace)
        with pytest.raises(NotFound):
            client.detach(iface.name)


def test_release_removes_the_peers_interfaces(start_broker):
    broker = start_broker(idle_timeout=30)
    with Client(broker.socket_path) as client:
        a = client.attach("shared")
        a.close()
        client.release("shared")
        assert a.name not in broker_links(broker.namespace)
        (net,) = client.status().networks
        assert net.peers == 0 and net.idle_expires_in is not None


# -- lifetimes -----------------------------------------------------------------------


def test_idle_network_is_removed_after_the_timeout(start_broker):
    broker = start_broker(idle_timeout=2)
    with Client(broker.socket_path) as client:
        bridge = client.acquire_network("shared").bridge
    with Client(broker.socket_path) as watcher:
        (net,) = watcher.status().networks
        assert net.peers == 0 and 0 < net.idle_expires_in <= 2
        assert wait_for(lambda: not watcher.status().networks, 5)
    assert bridge not in broker_links(broker.namespace)


def test_reacquire_before_the_timeout_cancels_removal_and_returns_the_same_network(start_broker):
    broker = start_broker(idle_timeout=1.0)
    with Client(broker.socket_path) as client:
        first = client.acquire_network("shared")
    time.sleep(0.3)
    with Client(broker.socket_path) as client:
        again = client.acquire_network("shared")
        time.sleep(1.2)
        (net,) = client.status().networks
        assert net.idle_expires_in is None and net.peers == 1
    assert (again.subnet, again.bridge) == (first.subnet, first.bridge)
    # The same network, not a new one that looks alike.
    assert "removal cancelled" in broker.log() and "removed network" not in broker.log()


CHILD = textwrap.dedent(
    """
    import sys, time
    from vmnet_broker import Client
    client = Client(sys.argv[1])
    names = []
    for i in range(int(sys.argv[2])):
        names.append(client.attach("shared" if i % 2 else "host", kind="dgram" if i % 3 else "tap").name)
    print(" ".join(names), flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("count", [2, 64])  # 64: the most one connection may own
def test_killed_client_has_its_interfaces_removed_within_a_second(broker, count):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, broker.socket_path, str(count)], stdout=subprocess.PIPE, text=True
    )
    try:
        names = child.stdout.readline().split()
        assert len(names) == count and set(names) <= set(broker_links(broker.namespace))
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        killed = time.monotonic()
        assert wait_for(lambda: not set(names) & set(broker_links(broker.namespace)), 1.0, 0.01)
        elapsed = time.monotonic() - killed
        print(f"interfaces gone {elapsed * 1000:.0f} ms after SIGKILL")
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    with Client(broker.socket_path) as client:
        for net in client.status().networks:
            assert net.peers == 0 and net.interfaces == 0


def test_sigterm_removes_everything_and_exits_0(broker):
    client = Client(broker.socket_path)
    client.acquire_network("host")
    client.attach("shared", queues=2).close()
    client.attach("shared", kind="dgram").close()
    assert len(broker_links(broker.namespace)) == 4
    try:
        assert broker.stop() == 0
        assert broker_links(broker.namespace) == []
        assert not os.path.exists(broker.socket_path)
    finally:
        client.close()
    assert "vmnet-broker stopped" in broker.log()


def test_restart_after_sigkill_removes_the_dead_brokers_links(start_broker):
    broker = start_broker()
    with Client(broker.socket_path) as client:
        client.attach("shared").close()
        client.attach("host", kind="dgram").close()
        broker.stop(signal.SIGKILL)
    assert len(broker_links(broker.namespace)) >= 2
    second = start_broker(namespace=broker.namespace, workdir=broker.workdir)
    assert broker_links(second.namespace) == []
    assert "removed leftover" in second.log()


# -- status -----------------------------------------------------------------------------


def test_status_lists_networks_peers_and_interfaces(broker):
    with Client(broker.socket_path) as a, Client(broker.socket_path) as b:
        a.attach("shared").close()
        a.attach("shared", kind="dgram").close()
        b.acquire_network("shared")
        b.acquire_network("host")
        status = a.status()
        assert status.peers == 2
        nets = {n.name: n for n in status.networks}
        assert nets["shared"].peers == 2 and nets["shared"].interfaces == 2
        assert nets["host"].peers == 1 and nets["host"].interfaces == 0
        assert nets["shared"].idle_expires_in is None
        kinds = sorted(i["kind"] for i in nets["shared"].raw["attachments"])
        assert kinds == ["dgram", "tap"]
    out = subprocess.run(
        [sys.executable, "-m", "vmnet_broker", "status", "--socket", broker.socket_path, "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout)["networks"][0]["peers"] == 0


def test_status_cli_reports_a_missing_broker(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "vmnet_broker", "status", "--socket", str(tmp_path / "none.sock")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1 and "Failed to send XPC message to broker" in out.stderr


def test_serve_is_ready_quickly(broker):
    print(f"serve -> ready socket: {broker.ready_seconds * 1000:.0f} ms")
    assert broker.ready_seconds < 10


def test_out_of_fds_the_broker_neither_spins_nor_drops_its_clients(start_broker):
    broker = start_broker(wrapper=("prlimit", "--nofile=48"))  # logs at debug level
    with Client(broker.socket_path) as keeper:
        kept = keeper.attach("shared")
        kept.close()
        flood = []
        try:
            for _ in range(80):  # more than the broker has fds for
                flood.append(WireClient(broker.socket_path, timeout=2))
            time.sleep(0.2)
            before = broker.log().count("accept failed")
            time.sleep(1.0)
            # Backing off (~10 tries a second), not spinning on a listener it
            # cannot accept from (thousands): counted, so load cannot blur it.
            assert 0 < broker.log().count("accept failed") - before < 30
            (net,) = keeper.status().networks
            assert net.interfaces == 1
        finally:
            for c in flood:
                c.close()
        # Once fds are free again, new clients are served.
        assert wait_for(lambda: _can_connect(broker.socket_path), 5)
    assert "accepting connections again" in broker.log()


def _can_connect(path: str) -> bool:
    try:
        with Client(path, timeout=1) as client:
            return client.status().peers >= 1
    except Exception:
        return False


def test_an_empty_packet_is_an_invalid_request_not_a_goodbye(broker):
    with WireClient(broker.socket_path) as c:
        c.call({"command": "acquire", "network_name": "host"})
        reply = c.call(b"")
        assert reply["error"] == Code.INVALID_REQUEST
        (net,) = c.call({"command": "status"})["status"]["networks"]
        assert net["peers"] == 1


def test_pipelined_attach_then_release_still_delivers_the_fds(broker):
    with WireClient(broker.socket_path) as c:
        c.send({"command": "attach", "network_name": "shared", "queues": 2})
        c.send({"command": "release", "network_name": "shared"})
        attach, fds = c.recv()
        release, _ = c.recv()
        try:
            assert "interface" in attach and len(fds) == 2 and release == {}
        finally:
            for fd in fds:
                os.close(fd)


def test_a_failed_attach_takes_no_reference(start_broker):
    broker = start_broker(wrapper=("prlimit", "--nofile=40"))
    with Client(broker.socket_path) as hog, Client(broker.socket_path) as other:
        failed = None
        for _ in range(40):  # until the broker runs out of fds
            try:
                hog.attach("shared", queues=4).close()
            except CreateFailed as e:
                failed = e
                break
        assert failed is not None and failed.code == 6
        with pytest.raises(CreateFailed):
            other.attach("shared", queues=16)  # more fds than the hog left free
        (net,) = hog.status().networks
        assert net.peers == 1  # the hog only: `other` holds nothing


def test_a_second_broker_in_the_same_namespace_refuses_to_start(broker, tmp_path):
    with Client(broker.socket_path) as client:
        client.attach("shared").close()
        second = subprocess.run(
            broker.namespace.exec_args(
                [sys.executable, "-m", "vmnet_broker", "serve", "--socket", str(tmp_path / "other.sock"),
                 "--state-dir", str(tmp_path / "other-state")]
            ),
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert second.returncode == 1 and "is running in this network namespace" in second.stderr
        # The first broker's network and interface are untouched.
        (net,) = client.status().networks
        assert net.interfaces == 1 and len(broker_links(broker.namespace)) == 2


def test_a_broker_does_not_take_over_a_live_brokers_socket(broker, tmp_path):
    from vmnet_broker.sandbox import Namespace

    with Namespace() as other:
        second = subprocess.run(
            other.exec_args([sys.executable, "-m", "vmnet_broker", "serve", "--socket", broker.socket_path,
                             "--state-dir", str(tmp_path / "other-state")]),
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    assert second.returncode == 1 and "listening on" in second.stderr
    with Client(broker.socket_path) as client:
        client.status()


def test_the_namespace_lock_cannot_be_squatted_by_an_unprivileged_user(start_broker):
    from vmnet_broker.sandbox import Namespace

    ns = Namespace().create()  # start_broker's teardown closes it, after the broker
    # An unprivileged process holding the broker's old abstract-socket name,
    # or anything else it can create, does not keep the broker from starting:
    # the lock lives in a root-only directory.
    squatter = ns.popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
         "import socket,time; s=socket.socket(socket.AF_UNIX); s.bind('\\0vmnet-broker'); print('ok', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    broker = None
    try:
        assert squatter.stdout.readline().strip() == "ok"
        broker = start_broker(namespace=ns)
        with Client(broker.socket_path) as client:
            client.status()
    finally:
        squatter.kill()
        squatter.wait()
        squatter.stdout.close()
        if broker is None:
            ns.close()  # otherwise start_broker's teardown does, after SIGTERM


def test_a_bad_config_file_is_logged_and_skipped_and_the_rest_offered(start_broker):
    broker = start_broker(config={"lab": {"mode": "host", "subnet": "192.168.71.1"},
                                  "typo": {"mode": "hots"}, "broken": "{not json"})  # fmt: skip
    with Client(broker.socket_path) as client:
        assert client.acquire_network("lab").subnet == "192.168.71.0"
        for name in ("typo", "broken"):
            with pytest.raises(NotFound):
                client.acquire_network(name)
        assert {"lab", "shared", "host"} <= set(client.status().raw["available"])
    log = broker.log()
    assert "typo.json: 'mode' must be one of shared, host, not 'hots'" in log
    assert "broken.json:" in log and "network 'broken' is not offered" in log


def test_serve_has_exactly_the_options_outside_tools_call():
    out = subprocess.run(
        [sys.executable, "-m", "vmnet_broker", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in ("--socket", "--config-dir", "--state-dir", "--idle-timeout", "--log-level"):
        assert option in out
    bad = subprocess.run(
        [sys.executable, "-m", "vmnet_broker", "serve", "--idle-timeout", "soon"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "'soon' is not a number of seconds" in bad.stderr
