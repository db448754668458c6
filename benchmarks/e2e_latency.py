"""End-to-end latency baseline: untuned TVM vs ONNX Runtime vs PyTorch eager, per zoo model.

Each (model, runtime) configuration is measured in its own process, with the same thread
count and the same input. Prints a table and writes ``benchmarks/results/e2e_latency.json``.

    .venv/bin/python benchmarks/e2e_latency.py [--models mobilenet_v2,resnet18] [--threads 2] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNTIMES = ("tvm", "onnxruntime", "torch")


def worker(model: str, runtime: str, threads: int, repeat: int, workdir: Path) -> dict:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import numpy as np
    import torch

    from tvmedge import zoo
    from tvmedge.bench.peers import onnxruntime_latency, summarize, torch_latency

    entry = zoo.get(model)
    x = zoo.example_input(entry)
    onnx_path = workdir / f"{model}.onnx"
    if runtime == "tvm":
        from tvmedge.build import compile_model
        from tvmedge.frontend import load_model
        from tvmedge.run import run_artifact
        from tvmedge.target import resolve

        t0 = time.perf_counter()
        meta = compile_model(load_model(onnx_path), resolve("host"), workdir / f"{model}.tar")
        res = run_artifact(workdir / f"{model}.tar", {entry.input_name: x.numpy()}, repeat=repeat, threads=threads)
        return {"latency_ms": res.latency_summary(), "threads": res.threads,
                "compile_s": round(time.perf_counter() - t0, 1), "library_mb": meta["library_bytes"] / 1e6}
    if runtime == "onnxruntime":
        return {"latency_ms": summarize(onnxruntime_latency(onnx_path, {entry.input_name: x.numpy()}, threads, repeat)),
                "threads": threads}
    model_t = entry.build()
    return {"latency_ms": summarize(torch_latency(model_t, x, threads, repeat)), "threads": threads,
            "torch": torch.__version__, "np": np.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-cnn,mobilenet_v2,resnet18,lraspp_mbv3")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "e2e_latency.json"))
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "RUNTIME", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        model, runtime, workdir = args.worker
        print(json.dumps(worker(model, runtime, args.threads, args.repeat, Path(workdir))))
        return

    from rich.console import Console
    from rich.table import Table

    from tvmedge import zoo

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            zoo.export(model, Path(tmp) / f"{model}.onnx")
            for runtime in RUNTIMES:
                cmd = [sys.executable, __file__, "--threads", str(args.threads), "--repeat", str(args.repeat),
                       "--worker", model, runtime, tmp]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    rows.append({"model": model, "runtime": runtime, "error": proc.stderr.strip().splitlines()[-1]})
                    continue
                rows.append({"model": model, "runtime": runtime, **json.loads(proc.stdout.strip().splitlines()[-1])})
                print(f"  {model:14s} {runtime:12s} {rows[-1]['latency_ms']['median']:9.2f} ms", file=sys.stderr)
    ort = {r["model"]: r["latency_ms"]["median"] for r in rows if r["runtime"] == "onnxruntime" and "latency_ms" in r}
    table = Table(title=f"untuned TVM vs peers, {args.threads} threads, batch 1 ({platform.processor() or platform.machine()})")
    for col in ("model", "runtime", "median ms", "p90 ms", "min ms", "x ONNX Runtime"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], r["runtime"], "error", r["error"][:60], "", "")
            continue
        lat = r["latency_ms"]
        r["ratio_vs_onnxruntime"] = lat["median"] / ort[r["model"]] if r["model"] in ort else None
        table.add_row(r["model"], r["runtime"], f"{lat['median']:.2f}", f"{lat['p90']:.2f}", f"{lat['min']:.2f}",
                      f"{r['ratio_vs_onnxruntime']:.2f}" if r["ratio_vs_onnxruntime"] else "")
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "repeat": args.repeat, "cpu": platform.processor(),
                               "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
