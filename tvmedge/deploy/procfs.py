"""Reading Linux ``/proc``: which processes of a process group are still running.

TVM's RPC servers start ``tvm.exec.popen_worker`` children that outlive their parent, so
a tracker or server counts as stopped only when its whole process group is gone.
"""

from __future__ import annotations

import os


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid`` (Linux /proc)."""
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(name))
    return pids
