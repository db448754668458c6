"""Stops an RPC process group when the tvmedge process that started it dies.

Trackers and servers run in their own process group (so that ``stop()`` reaches their
worker processes), which also means they outlive a ``tvmedge tune`` killed with SIGKILL,
holding their port. This small process watches the starter: when it is gone, the group
gets SIGTERM, then SIGKILL. It exits by itself once the group is empty.

    python -m tvmedge.deploy.orphan_guard STARTER_PID PGID
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _exists(send, ident: int) -> bool:
    """Whether a process (``os.kill``) or process group (``os.killpg``) still exists."""
    try:
        send(ident, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def guard(starter: int, pgid: int, poll_s: float = 0.5) -> None:
    while _exists(os.killpg, pgid):
        if not _exists(os.kill, starter):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    return
                deadline = time.monotonic() + 3.0
                while time.monotonic() < deadline and _exists(os.killpg, pgid):
                    time.sleep(0.1)
            return
        time.sleep(poll_s)


if __name__ == "__main__":
    guard(int(sys.argv[1]), int(sys.argv[2]))
