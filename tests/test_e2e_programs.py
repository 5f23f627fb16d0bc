"""End to end: external programs never block the broker (issue 8, class 2).

A real broker in its own namespace, with a stand-in ``nft`` or ``dnsmasq``
first on its PATH that hangs while a flag file exists (and otherwise runs
the real one).  One client acquires a network, which needs the hanging
program; meanwhile another client measures its ``status`` round trips,
which must stay fast, and the acquire must fail with code 6 once the
program's timeout has passed.  With the flag gone, the same network is
created normally: what the failed creation made was unwound.  The numbers
are printed (``pytest -s``); the bounds are generous, since the machine is
shared.
"""

from __future__ import annotations

import os
import shutil
import statistics
import threading
import time

import pytest

from vmnet_broker import Client, CreateFailed
from vmnet_broker.backends.linux import dnsmasq, programs

from .conftest import broker_links, require_services

HANGING = """#!/bin/sh
# Hangs while {flag} exists{only}; otherwise the real program.
if [ -e {flag} ]{condition}; then exec sleep {seconds}; fi
exec {real} "$@"
"""


def stand_in(tmp_path, name: str, only_applies: bool = False):
    """``bin/NAME`` that hangs while the returned flag file exists, and the command line it hangs as."""
    real = shutil.which(name)
    assert real, f"needs {name}"
    flag = tmp_path / f"{name}.hang"
    script = tmp_path / "bin" / name
    script.parent.mkdir(exist_ok=True)
    condition = ' && [ "$1" = "-j" ] && [ "$2" = "-f" ]' if only_applies else ""
    seconds = f"59.{os.getpid() % 1000:03d}{len(name)}"  # ours alone, to look for it in ps
    script.write_text(HANGING.format(flag=flag, real=real, condition=condition, seconds=seconds,
                                     only=" (for batches only)" if only_applies else ""))  # fmt: skip
    script.chmod(0o755)
    return script.parent, flag, f"sleep {seconds}"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def acquire_while_measuring_status(socket_path: str, network: str) -> tuple[BaseException | None, float, list[float]]:
    """Acquire ``network`` on one connection; ``status`` round trips on another until it is answered."""
    outcome: dict = {}

    def acquire() -> None:
        started = time.monotonic()
        try:
            with Client(socket_path, timeout=60) as client:
                client.acquire_network(network)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            outcome["error"] = e
        outcome["took"] = time.monotonic() - started

    samples: list[float] = []
    with Client(socket_path, timeout=5) as watcher:
        watcher.status()
        thread = threading.Thread(target=acquire)
        thread.start()
        deadline = time.monotonic() + 60  # bounded: the acquire ends within its program's timeout
        while thread.is_alive() and time.monotonic() < deadline:
            start = time.perf_counter()
            watcher.status()
            samples.append(time.perf_counter() - start)
            time.sleep(0.005)
        thread.join(5)
    assert not thread.is_alive(), "the acquire never finished"
    return outcome.get("error"), outcome["took"], samples


def report(what: str, took: float, samples: list[float]) -> None:
    print(f"\n{what}: acquire answered after {took:.2f} s; another client's status meanwhile: "
          f"p50 {statistics.median(samples) * 1000:.2f} ms, p99 {percentile(samples, 0.99) * 1000:.2f} ms, "
          f"max {max(samples) * 1000:.2f} ms (n={len(samples)})")  # fmt: skip


@pytest.mark.parametrize("program", ["nft", "dnsmasq"])
def test_a_hanging_program_delays_only_the_acquire_that_needs_it(start_broker, tmp_path, program):
    require_services()
    fake_bin, flag, hanging = stand_in(tmp_path, program, only_applies=program == "nft")
    broker = start_broker(wrapper=("env", f"PATH={fake_bin}:/usr/sbin:/usr/bin:/sbin:/bin"))
    timeout = programs.NFT_TIMEOUT if program == "nft" else dnsmasq.START_TIMEOUT
    flag.touch()
    error, took, samples = acquire_while_measuring_status(broker.socket_path, "shared")
    report(f"hanging {program}", took, samples)
    assert isinstance(error, CreateFailed) and error.code == 6, error
    assert ("did not finish within" if program == "nft" else "not ready after") in str(error)
    assert timeout - 0.5 < took < timeout + 5
    # Everyone else was served all along: the round trips never waited for the program.
    assert len(samples) > 20
    assert statistics.median(samples) < 0.05 and percentile(samples, 0.99) < 0.25 and max(samples) < 1.0
    assert broker_links(broker.namespace) == []  # the half-made network was unwound
    assert hanging not in broker.namespace.run("ps", "-eo", "args").stdout  # killed, not left hanging

    flag.unlink()
    with Client(broker.socket_path) as client:
        assert client.acquire_network("shared").name == "shared"
