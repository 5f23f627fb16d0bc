"""Keeping a network's dnsmasq running: restarted with backoff for as long as the network lives.

A dnsmasq that dies (killed, out of memory, a bug) is started again after a
delay that doubles with each death in a row: 0.1 s, 0.2 s, 0.4 s, ... up to
30 s, and back to 0.1 s once one has run for 30 s.  It is never given up
on: a network whose DHCP and DNS are gone for good while ``status`` says
they are on is worse than one that keeps trying.  While it is down the
network is degraded, with why and when the next try is
(``dnsmasq restarting (killed by SIGKILL), next try in 0.4 s``); the
reason goes when a dnsmasq serves again.  (systemd's ``Restart=`` with
``RestartSec=100ms`` and its ``RestartSteps``/``RestartMaxDelaySec`` do the
same for services.)
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

from .watch import Problems

log = logging.getLogger(__name__)

FIRST_DELAY = 0.1
MAX_DELAY = 30.0
# A dnsmasq that ran this long before it died starts the backoff over.
STABLE_AFTER = 30.0
PROBLEM = "dnsmasq"


class Backoff:
    """Delays before each restart: ``first`` doubling to ``cap``; ``reset`` starts over (pure)."""

    def __init__(self, first: float = FIRST_DELAY, cap: float = MAX_DELAY) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self.first


def describe_exit(returncode: int | None) -> str:
    """``killed by SIGKILL``, ``exit status 2``: how a process ended."""
    if returncode is None:
        return "exited"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class Restarts:
    """One network's dnsmasq restarts: the backoff, the pending try, the problem shown."""

    def __init__(self, network_name: str, problems: Problems) -> None:
        self._name = network_name
        self._problems = problems
        self._backoff = Backoff()
        self._timer: asyncio.TimerHandle | None = None
        self._running_since: float | None = None
        self.count = 0  # restarts scheduled so far

    def running(self) -> None:
        """A dnsmasq serves (first start or restart)."""
        self._running_since = time.monotonic()
        if self._problems.clear(PROBLEM):
            log.info("network %r: dnsmasq runs again after %d restart(s)", self._name, self.count)

    def died(
        self, loop: asyncio.AbstractEventLoop, why: str, retry: Callable[[], None], pid: int | None = None
    ) -> float:
        """dnsmasq (``pid``) exited (``why``), or a restart failed: ``retry`` later. Returns the delay."""
        self.cancel_timer()
        ran = None if self._running_since is None else time.monotonic() - self._running_since
        self._running_since = None
        if ran is not None and ran >= STABLE_AFTER:
            self._backoff.reset()
        delay = self._backoff.next()
        deadline = loop.time() + delay
        self.count += 1
        self._problems.set(
            PROBLEM,
            lambda: f"dnsmasq restarting ({why}), next try in {max(0.0, deadline - loop.time()):.1f} s",
            quiet=True,
        )
        who = "dnsmasq" if pid is None else f"dnsmasq (pid {pid})"
        log.warning("network %r: %s %s; restarting it in %g s (restart %d)", self._name, who, why, delay, self.count)
        self._timer = loop.call_later(delay, self._fire, retry)
        return delay

    def _fire(self, retry: Callable[[], None]) -> None:
        self._timer = None
        retry()

    @property
    def pending(self) -> bool:
        return self._timer is not None

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stop(self) -> None:
        """The network's dnsmasq is stopped on purpose: no more tries, no problem shown."""
        self.cancel_timer()
        self._running_since = None
        self._problems.clear(PROBLEM)
