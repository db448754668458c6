"""CUDA path on this machine's GPU: zoo models' numerics against ONNX Runtime, untuned vs tuned.

The same path as a Jetson build (dlight default schedules, NVRTC-compiled PTX embedded in the
library, MetaSchedule's CUDA search over a local tracker + RPC server), built for this GPU's
arch. Per model: max |TVM - ORT| / max |ORT| (fp32, and fp16 with ``--fp16``), median latency
untuned and tuned (``--trials``; 0 skips tuning), ONNX Runtime on the CPU beside them.
Without a GPU it says so and exits 0 (nothing to measure). Writes
``benchmarks/results/cuda.json``.

    .venv/bin/python benchmarks/cuda.py [--models digits-cnn,mobilenet_v2,resnet18] [--trials 256] [--fp16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def gpu_target() -> dict | None:
    """The JSON target of this machine's first CUDA GPU (host: this CPU), or None without one."""
    import tvm

    from tvmedge.core.errors import TvmedgeError
    from tvmedge.lower.cuda import gpu_present
    from tvmedge.target import host_target_dict

    try:
        if not gpu_present():
            return None
    except TvmedgeError as e:
        print(f"CUDA compile path unavailable: {e}", file=sys.stderr)
        return None
    dev = tvm.cuda(0)
    return {"kind": "cuda", "arch": "sm_" + dev.compute_version.replace(".", ""),
            "max_threads_per_block": dev.max_threads_per_block, "max_shared_memory_per_block":
            dev.max_shared_memory_per_block, "thread_warp_size": dev.warp_size, "host": host_target_dict()}


def bench_model(name: str, target: dict, trials: int, fp16: bool, repeat: int, workdir: Path) -> dict:
    import numpy as np

    from tvmedge import zoo
    from tvmedge.bench.peers import onnxruntime_latency, summarize
    from tvmedge.build import compile_model
    from tvmedge.frontend import load_model
    from tvmedge.run import run_artifact
    from tvmedge.target import resolve

    entry = zoo.get(name)
    onnx_path = zoo.export(name, workdir / f"{name}.onnx")
    x = {entry.input_name: zoo.example_input(entry).numpy()}
    import onnxruntime as ort

    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    device = resolve(json.dumps(target))
    row: dict = {"model": name, "arch": target["arch"],
                 "onnxruntime_cpu_ms": summarize(onnxruntime_latency(onnx_path, x, os.cpu_count() or 1, repeat))}

    def measure(label: str, model, db=None) -> None:
        t0 = time.perf_counter()
        meta = compile_model(model, device, workdir / f"{name}-{label}.tar", tuning_db=db, keep_faster=False)
        res = run_artifact(workdir / f"{name}-{label}.tar", x, repeat=repeat)
        out = res.outputs[0]
        row[label] = {"latency_ms": res.latency_summary(), "compile_s": round(time.perf_counter() - t0, 1),
                      "max_rel_err_vs_ort": float(np.abs(out - ref).max() / np.abs(ref).max()),
                      "top1_agrees": bool(out.reshape(out.shape[0], -1).argmax(1)[0] == ref.reshape(ref.shape[0], -1).argmax(1)[0]),
                      "schedules": meta["schedules"], "device_code": meta["device_code"]}

    model = load_model(onnx_path)
    measure("untuned", model)
    if fp16:
        from tvmedge.build import half_precision

        measure("untuned_fp16", half_precision(model, device))
    if trials:
        from tvmedge.tune.pool import device_pool
        from tvmedge.tune.tuner import TuneOptions, tune_model

        db = workdir / f"{name}-db"
        t0 = time.perf_counter()
        with device_pool(device) as pool:
            rep = tune_model(model, device, db, TuneOptions(trials), pool, progress=False)
        row["tuning"] = {"trials_run": rep["trials_run"], "seconds": round(time.perf_counter() - t0, 1)}
        measure("tuned", model, str(db))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-cnn,mobilenet_v2,resnet18")
    ap.add_argument("--trials", type=int, default=256, help="tuning budget per model (0: untuned only)")
    ap.add_argument("--fp16", action="store_true", help="also the fp16 build (compile --fp16)")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cuda.json"))
    args = ap.parse_args()

    target = gpu_target()
    if target is None:
        print("benchmarks/cuda.py: no CUDA GPU on this machine: nothing measured (the PTX builds for "
              "Jetson are checked by tests/test_cuda.py without one)")
        return
    from rich.console import Console
    from rich.table import Table

    rows = []
    with tempfile.TemporaryDirectory(prefix="tvmedge-cuda-bench-") as tmp:
        for name in args.models.split(","):
            try:
                rows.append(bench_model(name, target, args.trials, args.fp16, args.repeat, Path(tmp)))
            except Exception as e:  # one model failing must not hide the others' numbers
                rows.append({"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            print(f"  {name}: done", file=sys.stderr)
    table = Table(title=f"tvmedge on {target['arch']} vs ONNX Runtime (CPU, {os.cpu_count()} threads)")
    for col in ("model", "build", "median ms", "rel err vs ORT", "top-1 =", "ORT CPU ms"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], "error", r["error"][:70], "", "", "")
            continue
        for label in ("untuned", "untuned_fp16", "tuned"):
            if label in r:
                m = r[label]
                table.add_row(r["model"], label, f"{m['latency_ms']['median']:.3f}", f"{m['max_rel_err_vs_ort']:.1e}",
                              "yes" if m["top1_agrees"] else "NO", f"{r['onnxruntime_cpu_ms']['median']:.3f}")
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"target": target, "trials": args.trials, "repeat": args.repeat, "cpu": platform.processor(),
                               "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
