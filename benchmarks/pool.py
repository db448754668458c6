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


def solo(artifact: str, frames: int) -> None:
    """One local process running the artifact on one thread, no RPC (``--solo``): prints its FPS."""
    os.environ["TVM_NUM_THREADS"] = "1"
    from tvmedge.core.artifact import read_artifact
    from tvmedge.run import load_model_vm

    with tempfile.TemporaryDirectory() as tmp:
        lib, meta = read_artifact(artifact, tmp)
        vm = load_model_vm(lib, meta, threads=1).vm
        spec = meta["inputs"][0]
        x = {spec["name"]: np.random.default_rng(0).random(spec["shape"], dtype="float32")}
        for _ in range(20):
            vm(x)
        t0 = time.perf_counter()
        for _ in range(frames):
            vm(x)
        print(frames / (time.perf_counter() - t0))


def bound(artifact: Path, n: int, frames: int, workdir: Path) -> float:
    """The compute bound of ``n`` servers here: ``n`` pinned one-thread processes running the
    model at once, without RPC or a client (sum of their FPS)."""
    import subprocess

    cores = os.cpu_count() or 1
    procs = [subprocess.Popen([pinned_python(workdir, i % cores), __file__, "--solo", str(artifact),
                               "--frames", str(frames)], stdout=subprocess.PIPE, text=True) for i in range(n)]
    return sum(float(p.communicate()[0].split()[-1]) for p in procs)


def measure(artifact: Path, tracker, key: str, n_servers: int, frames: list, inflight: int, strategy: str,
            workdir: Path, shm: bool = True) -> dict:
    from tvmedge.deploy.launch import start_server
    from tvmedge.deploy.pool import open_pool

    cores = os.cpu_count() or 1
    servers = []
    os.environ["TVMEDGE_RPC_SHM"] = "1" if shm else "0"
    try:
        for i in range(n_servers):
            servers.append(start_server(tracker.addr, key, env={"TVM_NUM_THREADS": "1"},
                                        python=pinned_python(workdir, i % cores), timeout=180,
                                        device_info={"kind": "hardware"}))
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
        os.environ.pop("TVMEDGE_RPC_SHM", None)
        for s in servers:
            s.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default="1,2", help="server counts to compare (default 1,2; 4 oversubscribes 2 cores)")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per configuration (median kept)")
    ap.add_argument("--inflight", type=int, default=2)
    ap.add_argument("--strategy", default="least-loaded")
    ap.add_argument("--no-plain-rpc", action="store_true",
                    help="skip the rows that move frames through TVM's RPC stream instead of shared memory")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pool.json"))
    ap.add_argument("--solo", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.solo:
        solo(args.solo, args.frames)
        return 0
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
        configs = [(n, True) for n in counts] + ([] if args.no_plain_rpc else [(n, False) for n in counts])
        runs: dict[tuple, list[dict]] = {c: [] for c in configs}
        bounds: dict[int, list[float]] = {n: [] for n in counts}
        with start_tracker(port=0, timeout=120) as tracker:
            for r in range(args.rounds):
                for n, shm in configs:
                    key = f"bench-pool-{os.getpid()}-{r}-{n}-{int(shm)}"
                    st = measure(art, tracker, key, n, frames, args.inflight, args.strategy, workdir, shm)
                    runs[(n, shm)].append(st)
                    print(f"round {r + 1}: {n} server(s), {'shared memory' if shm else 'RPC stream'}: "
                          f"{st['fps']:.1f} FPS", flush=True)
                for n in counts:
                    bounds[n].append(bound(art, n, args.frames, workdir))
                    print(f"round {r + 1}: {n} local process(es) without RPC: {bounds[n][-1]:.1f} FPS", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    for n, shm in configs:
        best = sorted(runs[(n, shm)], key=lambda s: s["fps"])[len(runs[(n, shm)]) // 2]  # the median round
        rows.append({"servers": n, "payload": "shared memory" if shm else "RPC stream",
                     "fps": best["fps"], "fps_rounds": [s["fps"] for s in runs[(n, shm)]],
                     "shares": [round(d["share"], 3) for d in best["devices"]],
                     "mean_ms_per_frame": [d["mean_ms"] for d in best["devices"]],
                     "server_cpu_ms_per_frame": best["server_cpu_ms_per_frame"],
                     "client_cpu_ms_per_frame": best["client_cpu_ms_per_frame"]})
    bound_rows = [{"processes": n, "fps": float(np.median(bounds[n])), "fps_rounds": bounds[n]} for n in counts]
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    print(f"\nshapes-seg (1x3x64x64) over a pool of local RPC servers, 1 thread each, pinned with taskset; "
          f"{args.frames} frames, {args.inflight} in flight per server, {args.strategy}; {cores} cores, "
          f"load average {load:.1f} at the end (other work shares this machine)")
    print(f"{'servers':>8} {'payload':>14} {'FPS (median)':>13} {'rounds':>24} {'speed-up':>9} "
          f"{'server CPU ms/frame':>20} {'client CPU ms/frame':>20}  shares")
    for row in rows:
        first = next(r for r in rows if r["payload"] == row["payload"])
        row["speedup_vs_first"] = row["fps"] / first["fps"]
        note = "  (more servers than cores)" if row["servers"] > cores else ""
        print(f"{row['servers']:>8} {row['payload']:>14} {row['fps']:>13.1f} "
              f"{', '.join(f'{v:.0f}' for v in row['fps_rounds']):>24} "
              f"{row['speedup_vs_first']:>8.2f}x {row['server_cpu_ms_per_frame']:>20.2f} "
              f"{row['client_cpu_ms_per_frame']:>20.2f}  {row['shares']}{note}")
    print("\nthe compute bound: the same model in N pinned one-thread processes at once, no RPC, no client")
    for b in bound_rows:
        b["speedup_vs_first"] = b["fps"] / bound_rows[0]["fps"]
        print(f"{b['processes']:>8} process(es) {b['fps']:>10.1f} FPS  ({', '.join(f'{v:.0f}' for v in b['fps_rounds'])})"
              f"  {b['speedup_vs_first']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "pool", "model": "shapes-seg", "frames": args.frames,
                               "inflight": args.inflight, "strategy": args.strategy, "cores": cores,
                               "cpu": platform.processor() or platform.machine(), "load_average_end": load,
                               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
                               "compute_bound": bound_rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
