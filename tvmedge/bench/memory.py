"""Peak memory of running an artifact on this host, measured in a fresh process.

The child imports the runtime, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``,
Linux), notes its resident set, then loads the artifact and runs it ``runs`` times. The
result is the high-water mark (``VmHWM``) minus that baseline: what loading and running the
model adds (library code, embedded weights, activations, the thread pool's stacks), not the
Python interpreter and TVM's runtime library underneath. ``None`` where the kernel does not
offer the counters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

_CHILD = r"""
import json, sys
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None
import numpy as np, tvm  # noqa: F401  (the runtime, before the baseline)
from tvmedge.run import load_model_vm
from tvmedge.core.artifact import read_artifact
from tvmedge.core.model import random_inputs
import tempfile
with tempfile.TemporaryDirectory(prefix="tvmedge-mem-") as tmp:
    lib, meta = read_artifact(sys.argv[1], tmp)
    inputs = random_inputs(meta["inputs"])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        print(json.dumps({"error": "cannot reset the peak RSS mark"})); sys.exit(0)
    base = status("VmRSS")
    loaded = load_model_vm(lib, meta, threads=int(sys.argv[3]) if sys.argv[3] != "0" else None)
    for _ in range(int(sys.argv[2])):
        loaded.vm(inputs)
    print(json.dumps({"baseline": base, "peak": status("VmHWM")}))
"""


def peak_memory_bytes(artifact: str | os.PathLike, runs: int = 3, threads: int | None = None,
                      timeout: float = 300) -> dict[str, Any]:
    """``{"peak_memory_bytes": int | None, "note": str}`` for running ``artifact`` here."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(artifact), str(runs), str(threads or 0)],
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"peak_memory_bytes": None, "note": f"measurement failed: {tail}"}
    got = json.loads(lines[-1])
    if "error" in got or got.get("peak") is None or got.get("baseline") is None:
        return {"peak_memory_bytes": None, "note": got.get("error", "no VmHWM/VmRSS in /proc/self/status")}
    return {"peak_memory_bytes": max(got["peak"] - got["baseline"], 0),
            "note": "peak RSS of a fresh process loading and running the artifact, above the runtime's own"}
