"""Load balancing over a device pool: FPS of shapes-seg with 1, 2 (and 4) local RPC servers.

Starts a TVM RPC tracker on loopback and N ``tvm.exec.rpc_server`` processes registered
under one key, each pinned to one core with ``taskset -c`` and running TVM with one thread
(``TVM_NUM_THREADS=1``), then streams the same frames through ``tvmedge.deploy.pool``
(the path ``tvmedge run --pool`` / ``tvmedge video --pool`` take) and reports total FPS,
each server's share, and the speed-up over one server, measured side by side in one run.
Rounds alternate the configurations (1, 2, 1, 2, ...) so a change in machine load hits
both. With more servers than cores, servers share cores (printed as such).

    .venv/bin/python benchmarks/pool.py [--servers 1,2] [--frames 300] [--rounds 3] [--inflight 2]

CPU time per frame (the servers' process groups, and this client) is printed beside FPS: on a
machine shared with other jobs, more server processes also win a larger share of the CPU from
them, so the FPS ratio alone can overstate scaling; the CPU cost per frame does not depend on
that.

Writes ``benchmarks/results/pool.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def pinned_python(workdir: Path, core: int) -> str:
    """A wrapper that runs this Python pinned to ``core`` (start_server's ``python``)."""
    path = workdir / f"python-core{core}"
    path.write_text(f"#!/bin/sh\nexec taskset -c {core} {sys.executable} \"$@\"\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def server_cpu_s(servers) -> float:
    """CPU seconds used so far by the servers' process groups (server and session workers)."""
    import psutil

    total = 0.0
    for s in servers:
        for pid in s.pids():
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


def client_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(artifact: Path, tracker, key: str, n_servers: int, frames: list, inflight: int, strategy: str,
            workdir: Path) -> dict:
    from tvmedge.deploy.launch import start_server
    from tvmedge.deploy.pool import open_pool

    cores = os.cpu_count() or 1
    servers = []
    try:
        for i in range(n_servers):
            servers.append(start_server(tracker.addr, key, env={"TVM_NUM_THREADS": "1"},
                                        python=pinned_python(workdir, i % cores), timeout=180))
        with open_pool(artifact, tracker.addr, [key], inflight=inflight, strategy=strategy, threads=1) as pool:
            for _ in pool.map(frames[:8]):  # warm up each device's session
                pass
            pool.wall_s = 0.0
            pool.delivered = 0
            for d in pool.devices:
                d.frames, d.busy_s = 0, 0.0
            cpu0 = server_cpu_s(servers), client_cpu_s()
            for _ in pool.map(frames):
                pass
            st = pool.stats()
            st["server_cpu_ms_per_frame"] = 1e3 * (server_cpu_s(servers) - cpu0[0]) / len(frames)
            st["client_cpu_ms_per_frame"] = 1e3 * (client_cpu_s() - cpu0[1]) / len(frames)
            return st
    finally:
        for s in servers:
            s.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default="1,2", help="server counts to compare (default 1,2; 4 oversubscribes 2 cores)")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per configuration (median kept)")
    ap.add_argument("--inflight", type=int, default=2)
    ap.add_argument("--strategy", default="least-loaded")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pool.json"))
    args = ap.parse_args()
    if shutil.which("taskset") is None:
        print("taskset not found (util-linux)", file=sys.stderr)
        return 1

    from tvmedge import zoo
    from tvmedge.build import compile_model
    from tvmedge.deploy.launch import start_tracker
    from tvmedge.frontend import load_model
    from tvmedge.target import resolve

    counts = [int(c) for c in args.servers.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="tvmedge-bench-pool-"))
    try:
        onnx_path = zoo.export("shapes-seg", workdir / "seg.onnx")
        art = workdir / "seg.tar"
        compile_model(load_model(onnx_path), resolve("host"), art)
        from tvmedge.zoo.shapes import dataset

        x, _ = dataset("eval", 64)
        frames = [{"input": x[i % len(x)][None]} for i in range(args.frames)]
        runs: dict[int, list[dict]] = {n: [] for n in counts}
        with start_tracker(port=0, timeout=120) as tracker:
            for r in range(args.rounds):
                for n in counts:
                    key = f"bench-pool-{os.getpid()}-{r}-{n}"
                    st = measure(art, tracker, key, n, frames, args.inflight, args.strategy, workdir)
                    runs[n].append(st)
                    print(f"round {r + 1}: {n} server(s): {st['fps']:.1f} FPS", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    for n in counts:
        best = sorted(runs[n], key=lambda s: s["fps"])[len(runs[n]) // 2]  # the median round
        rows.append({"servers": n, "fps": best["fps"], "fps_rounds": [s["fps"] for s in runs[n]],
                     "shares": [round(d["share"], 3) for d in best["devices"]],
                     "mean_ms_per_frame": [d["mean_ms"] for d in best["devices"]],
                     "server_cpu_ms_per_frame": best["server_cpu_ms_per_frame"],
                     "client_cpu_ms_per_frame": best["client_cpu_ms_per_frame"]})
    base = rows[0]["fps"]
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    print(f"\nshapes-seg (1x3x64x64) over a pool of local RPC servers, 1 thread each, pinned with taskset; "
          f"{args.frames} frames, {args.inflight} in flight per server, {args.strategy}; {cores} cores, "
          f"load average {load:.1f} at the end (other work shares this machine)")
    print(f"{'servers':>8} {'FPS (median)':>13} {'rounds':>24} {'speed-up':>9} {'server CPU ms/frame':>20} "
          f"{'client CPU ms/frame':>20}  shares")
    for row in rows:
        row["speedup_vs_first"] = row["fps"] / base
        note = "  (more servers than cores)" if row["servers"] > cores else ""
        print(f"{row['servers']:>8} {row['fps']:>13.1f} {', '.join(f'{v:.0f}' for v in row['fps_rounds']):>24} "
              f"{row['speedup_vs_first']:>8.2f}x {row['server_cpu_ms_per_frame']:>20.2f} "
              f"{row['client_cpu_ms_per_frame']:>20.2f}  {row['shares']}{note}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "pool", "model": "shapes-seg", "frames": args.frames,
                               "inflight": args.inflight, "strategy": args.strategy, "cores": cores,
                               "cpu": platform.processor() or platform.machine(), "load_average_end": load,
                               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
