"""External programs run while the broker serves: on the loop, never blocking it.

``nft`` once hung for its whole 30 s timeout inside ``subprocess.run`` on the
event loop, and every client waited with it.  Here a program runs as an
asyncio subprocess: the loop serves everyone else while it runs, and one
that outlives its timeout is killed, with everything it started (its own
process group), and reported as ``ProgramTimeout``.  Cancelling the caller
kills it the same way.

Start-up and shutdown (nobody is served yet, or any more) may still call
programs synchronously (``firewall.delete_table``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence

# nft applies one small batch in milliseconds; one that takes this long is
# stuck (a kernel lock, a wedged binary), and a network waiting for it is
# better refused with code 6 than kept waiting.
NFT_TIMEOUT = 10.0


class ProgramTimeout(TimeoutError):
    """The program did not finish within its timeout and was killed."""

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        super().__init__(f"{argv[0]} did not finish within {timeout:g} s (killed)")
        self.argv = list(argv)
        self.timeout = timeout


def which(name: str) -> str:
    """The program's path: on PATH, else where Debian puts it."""
    return shutil.which(name) or f"/usr/sbin/{name}"


async def run(argv: Sequence[str], stdin: str | None = None, *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with ``stdin``; its exit code, stdout and stderr as text.

    Raises ``OSError`` if it cannot be started and ``ProgramTimeout`` if it
    outlives ``timeout`` seconds.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: a timeout kills whatever it started too
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(None if stdin is None else stdin.encode()), timeout)
    except BaseException as e:  # the timeout, or the caller cancelled
        await _kill(proc)
        if isinstance(e, asyncio.TimeoutError):
            raise ProgramTimeout(argv, timeout) from None
        raise
    assert proc.returncode is not None
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    return subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    # SIGKILL cannot be ignored; the wait only reaps it (bounded all the same).
    with contextlib.suppress(asyncio.TimeoutError, ProcessLookupError):
        await asyncio.wait_for(proc.wait(), 5)


async def nft_batch(batch: dict) -> None:
    """Apply one JSON batch with ``nft -j -f -``; ``FirewallError`` if nft refuses it."""
    from .firewall import FirewallError

    proc = await run([which("nft"), "-j", "-f", "-"], json.dumps(batch), timeout=NFT_TIMEOUT)
    if proc.returncode != 0:
        raise FirewallError(proc.returncode, proc.stderr, batch)
