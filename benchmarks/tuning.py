"""Tuned latency vs ONNX Runtime as a function of trials and minutes, on this host.

For each model: tune in rounds on a fresh database (through a local tracker and RPC
server, as `tvmedge tune` does), and after each round compile with the database and time
the model (TVM runtime) next to ONNX Runtime, same threads, same run. Stops when the time
budget is spent. Then measures the time to a tuned model when the database already holds
the workloads (a second `tune` on a copy of it: everything reused). Prints a table, writes
``benchmarks/results/tuning.json`` and ``tuning.png``. The final databases can be copied
into ``schedules/<ISA class>/tvm-<major.minor>/`` (``--save-schedules``).

Goal to report against: tuned <= 0.8x ONNX Runtime within 30 minutes of tuning, and
<= 5 minutes when the database already holds the workloads.

    .venv/bin/python benchmarks/tuning.py [--models mobilenet_v2,resnet18] [--minutes 30] [--round-trials 128]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def measure(model, device, db_dir, onnx_path, inputs, threads: int, work: Path) -> tuple[float, float]:
    from tvmedge.bench.peers import onnxruntime_latency, summarize
    from tvmedge.build import compile_model
    from tvmedge.run import run_artifact

    art = work / "m.tar"
    compile_model(model, device, art, tuning_db=db_dir)
    tvm_ms = run_artifact(art, inputs, repeat=30, threads=threads).latency_summary()["median"]
    ort_ms = summarize(onnxruntime_latency(onnx_path, inputs, threads, repeat=30))["median"]
    return tvm_ms, ort_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet_v2,resnet18")
    ap.add_argument("--minutes", type=float, default=30.0, help="tuning time budget per model")
    ap.add_argument("--round-trials", type=int, default=128, help="trials per round between measurements")
    ap.add_argument("--save-schedules", action="store_true", help="copy the final databases into schedules/")
    args = ap.parse_args()

    threads = os.cpu_count() or 1
    os.environ["TVM_NUM_THREADS"] = str(threads)
    from rich.console import Console
    from rich.table import Table

    from tvmedge import zoo
    from tvmedge.frontend import load_model
    from tvmedge.tune.shipped import database_class, shipped_class_dir
    from tvmedge.core.model import random_inputs
    from tvmedge.target import resolve
    from tvmedge.tune.database import export_best
    from tvmedge.tune.pool import device_pool
    from tvmedge.tune.tuner import TuneOptions, tune_model

    device = resolve("host")
    out: dict = {"threads": threads, "cpu": device.target_json.get("mcpu"), "minutes": args.minutes,
                 "round_trials": args.round_trials, "models": {}}
    with tempfile.TemporaryDirectory(prefix="tvmedge-bench-") as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            onnx_path = zoo.export(name, tmp / f"{name}.onnx")
            model = load_model(onnx_path)
            inputs = random_inputs([i.to_dict() for i in model.inputs])
            db_dir = RESULTS / "tuning-db" / name
            if db_dir.exists():
                shutil.rmtree(db_dir)
            untuned, ort = measure(model, device, None, onnx_path, inputs, threads, tmp)
            curve = [{"trials": 0, "minutes": 0.0, "tvm_ms": untuned, "ort_ms": ort, "ratio": untuned / ort}]
            print(f"{name}: untuned {untuned:.2f} ms, ONNX Runtime {ort:.2f} ms", flush=True)
            spent = 0.0
            trials = 0
            with device_pool(device, log=print) as pool:
                while spent < args.minutes * 60:
                    t0 = time.perf_counter()
                    rep = tune_model(model, device, db_dir, TuneOptions(args.round_trials, retune=trials > 0), pool,
                                     progress=False)
                    spent += time.perf_counter() - t0
                    trials += rep["trials_run"]
                    tvm_ms, ort = measure(model, device, db_dir, onnx_path, inputs, threads, tmp)
                    curve.append({"trials": trials, "minutes": spent / 60, "tvm_ms": tvm_ms, "ort_ms": ort,
                                  "ratio": tvm_ms / ort})
                    print(f"  {trials:5d} trials {spent / 60:6.1f} min: {tvm_ms:8.2f} ms = {tvm_ms / ort:.2f}x ORT", flush=True)
                    if rep["trials_run"] == 0:
                        break
                # The database already holds the workloads: a second tune of the same model.
                reuse_db = tmp / f"{name}-reuse"
                shutil.copytree(db_dir, reuse_db)
                t0 = time.perf_counter()
                rep = tune_model(model, device, reuse_db, TuneOptions(args.round_trials), pool, progress=False)
                tvm_ms, ort = measure(model, device, reuse_db, onnx_path, inputs, threads, tmp)
                reuse_min = (time.perf_counter() - t0) / 60
            out["models"][name] = {"curve": curve, "reuse": {"minutes_to_tuned_model": reuse_min,
                                                             "trials_run": rep["trials_run"], "tvm_ms": tvm_ms,
                                                             "ort_ms": ort, "ratio": tvm_ms / ort}}
            if args.save_schedules:
                # schedules/<ISA class the records need>/tvm-<major.minor>/<model> (see schedules/README.md)
                best = tmp / f"{name}-best"
                kept = export_best(db_dir, best)  # the best record per workload: all compile applies
                dest = shipped_class_dir(database_class(best)) / name
                if dest.exists():
                    shutil.rmtree(dest)
                shutil.copytree(best, dest)
                print(f"  saved {kept} records to {dest}", flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)  # after each model: a crash keeps what was measured
            (RESULTS / "tuning.json").write_text(json.dumps(out, indent=2))

    table = Table(title=f"tuning on this host ({threads} threads): tuned TVM / ONNX Runtime")
    for col in ("model", "trials", "minutes", "TVM ms", "ORT ms", "TVM/ORT"):
        table.add_column(col, justify="right")
    for name, res in out["models"].items():
        for p in res["curve"]:
            table.add_row(name, str(p["trials"]), f"{p['minutes']:.1f}", f"{p['tvm_ms']:.2f}", f"{p['ort_ms']:.2f}",
                          f"{p['ratio']:.2f}")
        r = res["reuse"]
        table.add_row(name, "reuse", f"{r['minutes_to_tuned_model']:.1f}", f"{r['tvm_ms']:.2f}", f"{r['ort_ms']:.2f}",
                      f"{r['ratio']:.2f}")
    Console().print(table)
    for name, res in out["models"].items():
        within = [p for p in res["curve"] if p["minutes"] <= 30]
        best = min(p["ratio"] for p in within)
        print(f"{name}: best TVM/ORT within 30 min = {best:.2f} (goal <= 0.80: {'met' if best <= 0.8 else 'NOT met'}); "
              f"with the database already filled: {res['reuse']['minutes_to_tuned_model']:.1f} min "
              f"(goal <= 5: {'met' if res['reuse']['minutes_to_tuned_model'] <= 5 else 'NOT met'})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tuning.json").write_text(json.dumps(out, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in out["models"].items():
        ax.plot([p["minutes"] for p in res["curve"]], [p["ratio"] for p in res["curve"]], marker="o", label=name)
    ax.axhline(0.8, ls="--", c="gray", label="goal 0.8x ORT")
    ax.axhline(1.0, ls=":", c="gray")
    ax.set_yscale("log")
    ax.set_xlabel("minutes of tuning")
    ax.set_ylabel("tuned TVM latency / ONNX Runtime")
    ax.set_title(f"MetaSchedule on this host, {threads} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "tuning.png", dpi=120)
    print(f"wrote {RESULTS / 'tuning.json'} and {RESULTS / 'tuning.png'}")


if __name__ == "__main__":
    main()
