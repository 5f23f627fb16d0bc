"""Control-plane timings of a real broker, in a namespace of its own.

    sudo .venv/bin/python benchmarks/control_plane.py [--rounds 20]

Prints, for each operation, the median (p50), p90 and p99 over the rounds
and the ratio to a baseline measured in the same run: a `status` round trip
(a lookup and a reply, nothing created), so a noisy machine shifts both alike.

- serve -> ready: process start to a socket that accepts
- create shared: bridge + nftables batch + dnsmasq start (idle timeout 0, so
  each round creates the network anew)
- acquire existing: a second client acquiring a network that exists
- attach tap / attach dgram, and detach
- status, other churns: another client's `status` while one client attaches
  and detaches in pipelined rounds of 16 (one client cannot hold the others up)
- status, net created: another client's `status` while one client creates a
  network over and over
- 1000 Client() at once: from 64 threads, until all are connected (none may fail)
- acquire, 1000 peers: one client's `acquire` while 1,000 other connections
  hold the network
- memory per dgram attachment: the broker's RSS growth per `dgram`+`vnet_hdr`
  attachment after big frames went through it, and once it has been quiet;
  the ratio here is to the broker's RSS before the attachments
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmnet_broker import Client  # noqa: E402
from vmnet_broker.sandbox import BrokerProcess  # noqa: E402


def timed(fn: Callable[[], object], rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def report(name: str, samples: list[float], baseline: float) -> None:
    med = statistics.median(samples)
    print(f"{name:<26} median {med * 1000:8.2f} ms   p90 {percentile(samples, 0.9) * 1000:8.2f} ms   "
          f"p99 {percentile(samples, 0.99) * 1000:8.2f} ms   "
          f"x{med / baseline:8.1f} baseline   (n={len(samples)})")  # fmt: skip


def status_while(path: str, busy: Callable[[threading.Event], None], seconds: float) -> list[float]:
    """Another client's status round trips while ``busy`` runs in a thread (until its event is set)."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            busy(stop)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    samples = []
    try:
        time.sleep(0.2)
        with Client(path, timeout=30) as client:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                start = time.perf_counter()
                client.status()
                samples.append(time.perf_counter() - start)
                time.sleep(0.002)
    finally:
        stop.set()
        thread.join(60)
    if errors:
        raise errors[0]
    return samples


def churn(path: str, stop: threading.Event) -> None:
    """Attach then detach 16 interfaces, pipelined, over and over, on one raw connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(path)

        def recv() -> dict:
            data, ancdata, _, _ = s.recvmsg(1 << 16, socket.CMSG_SPACE(16 * 4))
            for level, kind, cmsg in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    for i in range(0, len(cmsg) - len(cmsg) % 4, 4):
                        os.close(int.from_bytes(cmsg[i : i + 4], sys.byteorder))
            return json.loads(data)

        while not stop.is_set():
            for _ in range(16):
                s.send(b'{"command": "attach", "network_name": "shared"}')
            names = [recv()["interface"]["name"] for _ in range(16)]
            for name in names:
                s.send(json.dumps({"command": "detach", "interface": name}).encode())
            for _ in names:
                recv()


def create_networks(path: str, stop: threading.Event) -> None:
    """Acquire and release ``host`` over and over (idle timeout 0: each acquire creates it)."""
    with Client(path, timeout=30) as c:
        while not stop.is_set():
            c.acquire_network("host")
            c.release("host")
            time.sleep(0.005)  # the removal runs on the loop right after


def connect_many(path: str, count: int) -> tuple[float, list[Client], int]:
    """``count`` Client() at once from 64 threads: seconds until all are in, the clients, failures."""
    clients: list[Client] = []
    failures = 0
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        for future in [pool.submit(Client, path, timeout=30) for _ in range(count)]:
            try:
                clients.append(future.result())
            except Exception:
                failures += 1
    return time.perf_counter() - start, clients, failures


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def dgram_memory(client: Client, pid: int, count: int = 16) -> tuple[float, float, int]:
    """RSS growth per dgram+vnet_hdr attachment: after 64 KiB frames went through it, once quiet; broker RSS before."""
    client.acquire_network("shared")
    time.sleep(0.3)
    before = rss(pid)
    ifaces = [client.attach("shared", kind="dgram", vnet_hdr=True) for _ in range(count)]
    frame = bytes(12) + b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01\x08\x00" + bytes(65000 - 26)
    try:
        for _ in range(3):
            for iface in ifaces:
                sock = socket.socket(fileno=os.dup(iface.fds[0]))
                sock.setblocking(False)
                for _ in range(96):
                    try:
                        sock.send(frame)
                    except BlockingIOError:
                        time.sleep(0.001)
                sock.close()
        time.sleep(0.3)
        busy = (rss(pid) - before) / count
        time.sleep(3)  # buffers go back after a quiet period
        quiet = (rss(pid) - before) / count
    finally:
        for iface in ifaces:
            client.detach(iface)
            iface.close()
    return busy, quiet, before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    rounds = parser.parse_args().rounds

    with tempfile.TemporaryDirectory(prefix="vmb-bench-") as tmp:
        ready = []
        for i in range(min(rounds, 5)):
            with BrokerProcess(Path(tmp) / f"ready{i}", log_level="warning") as b:
                ready.append(b.ready_seconds)

        broker = BrokerProcess(Path(tmp) / "main", idle_timeout=0, log_level="warning").start()
        try:
            with Client(broker.socket_path) as client:
                baseline_samples = timed(client.status, rounds * 5)
                baseline = statistics.median(baseline_samples)

                # Time only the acquire that creates, not the wait for removal.
                create = []
                for _ in range(rounds):
                    with Client(broker.socket_path) as c:
                        start = time.perf_counter()
                        c.acquire_network("shared")
                        create.append(time.perf_counter() - start)
                    deadline = time.monotonic() + 5
                    while client.status().networks and time.monotonic() < deadline:
                        time.sleep(0.005)

                client.acquire_network("shared")
                with Client(broker.socket_path) as other:
                    existing = timed(lambda: other.acquire_network("shared"), rounds * 5)

                def attach_detach(kind: str) -> tuple[list[float], list[float]]:
                    attach, detach = [], []
                    for _ in range(rounds):
                        start = time.perf_counter()
                        iface = client.attach("shared", kind)
                        attach.append(time.perf_counter() - start)
                        iface.close()
                        start = time.perf_counter()
                        client.detach(iface)
                        detach.append(time.perf_counter() - start)
                    return attach, detach

                tap, tap_detach = attach_detach("tap")
                dgram, dgram_detach = attach_detach("dgram")

                churning = status_while(broker.socket_path, lambda stop: churn(broker.socket_path, stop), 3.0)
                creating = status_while(broker.socket_path, lambda stop: create_networks(broker.socket_path, stop), 3.0)
                mem_busy, mem_quiet, rss_before = dgram_memory(client, broker.pid)

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
            thousand, thousand_failed = [], 0
            for _ in range(3):
                seconds, clients, failed = connect_many(broker.socket_path, 1000)
                thousand.append(seconds)
                thousand_failed += failed
                for c in clients:
                    c.close()
                time.sleep(0.5)

            seconds, holders, failed = connect_many(broker.socket_path, 1000)
            thousand_failed += failed
            try:
                with concurrent.futures.ThreadPoolExecutor(16) as pool:
                    list(pool.map(lambda c: c.acquire_network("shared"), holders))
                crowded = []
                for _ in range(rounds * 5):
                    with Client(broker.socket_path) as c:
                        start = time.perf_counter()
                        c.acquire_network("shared")
                        crowded.append(time.perf_counter() - start)
            finally:
                for c in holders:
                    c.close()
        finally:
            broker.close()

    print(f"vmnet-broker control plane, {rounds} rounds; baseline: status round trip "
          f"{baseline * 1e6:.0f} us (median of {len(baseline_samples)})")  # fmt: skip
    report("serve -> ready", ready, baseline)
    report("create shared", create, baseline)
    report("acquire existing", existing, baseline)
    report("attach tap", tap, baseline)
    report("attach dgram", dgram, baseline)
    report("detach tap", tap_detach, baseline)
    report("detach dgram", dgram_detach, baseline)
    report("status, other churns", churning, baseline)
    report("status, net created", creating, baseline)
    report("1000 Client() at once", thousand, baseline)
    print(f"{'':<26} ({thousand_failed} of {len(thousand) * 1000 + 1000} connections failed)")
    report("acquire, 1000 peers", crowded, baseline)
    for name, value in (("memory/dgram, after 64K", mem_busy), ("memory/dgram, once quiet", mem_quiet)):
        print(f"{name:<26} {value / 1024:8.0f} KiB per attachment   x{value / rss_before:8.3f} broker RSS before "
              f"({rss_before / 1048576:.1f} MiB)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
