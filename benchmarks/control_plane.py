"""Control-plane timings of a real broker, in a namespace of its own.

    sudo .venv/bin/python benchmarks/control_plane.py [--rounds 20]

Prints, for each operation, the median and p90 over the rounds and the ratio
to a baseline measured in the same run: a `status` round trip (a lookup and
a reply, nothing created), so a noisy machine shifts both alike.

- serve -> ready: process start to a socket that accepts
- create shared: bridge + nftables batch + dnsmasq start (idle timeout 0, so
  each round creates the network anew)
- acquire existing: a second client acquiring a network that exists
- attach tap / attach dgram, and detach
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
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


def p90(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def report(name: str, samples: list[float], baseline: float) -> None:
    med = statistics.median(samples)
    print(f"{name:<22} median {med * 1000:8.2f} ms   p90 {p90(samples) * 1000:8.2f} ms   "
          f"x{med / baseline:8.1f} baseline   (n={len(samples)})")  # fmt: skip


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
