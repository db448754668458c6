"""tvmedge next to ONNX Runtime and OpenVINO: one run, same threads, same input, per model.

For each model (zoo names, or a model file; ONNX files are also run by the peers):

- ``tvm untuned``   — ``compile`` without any tuning records (``use_shipped=False``: every
  kernel gets tvmedge's default schedule rules);
- ``tvm shipped``   — ``compile`` with the databases shipped in ``schedules/`` for this
  CPU's ISA class (``none for <class>`` when there are none);
- ``tvm tuned Nm``  — tuned here for ``--tune-minutes`` on a fresh database (MetaSchedule
  through a local tracker + server, as ``tvmedge tune`` does, in rounds of
  ``--round-trials``), then compiled with it; skipped with ``--tune-minutes 0``;
- ``onnxruntime``   — CPU execution provider;
- ``openvino f32``  — OpenVINO CPU with ``INFERENCE_PRECISION_HINT`` f32;
- ``openvino default`` — OpenVINO CPU at its default precision (bf16 on CPUs with
  AVX512-BF16/AMX, f32 elsewhere; the table names it).

Every configuration is timed in its own process (no runtime's thread pool competes with
another's), with ``--threads`` threads (TVM's pool, ORT's intra-op threads, OpenVINO's
inference threads; the TVM target's ``num-cores`` and the tuning server use the same count)
and the same random input (seed 0). Each output is compared with ONNX Runtime's. Prints a
table (median ms and ratio to ONNX Runtime; for tvmedge with records, how many kernels
got one), writes JSON (``--json``) and a PNG plot
(same name). The machine (CPU model, LLVM's CPU name, ISA class, cores, threads) is in both.

    .venv/bin/python benchmarks/peers.py [--models mobilenet_v2,resnet18,lraspp_mbv3] [--threads 2]
        [--tune-minutes 0] [--repeat 50] [--json benchmarks/results/peers.json]
    .venv/bin/python benchmarks/peers.py --models path/to/model.onnx --input-shape input:1x3x224x224
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODELS = "mobilenet_v2,resnet18,lraspp_mbv3"
PEER_CONFIGS = ("onnxruntime", "openvino f32", "openvino default")


def machine(threads: int) -> dict[str, Any]:
    """What ran the benchmark: CPU model (/proc/cpuinfo), LLVM's CPU name, ISA class, cores, threads."""
    import tvm

    from tvmedge.isa import isa_class
    from tvmedge.target import host_target_dict

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    host = host_target_dict()
    out = {"cpu_model": model, "llvm_cpu": host["mcpu"], "isa_class": isa_class(host),
           "logical_cores": os.cpu_count(), "threads": threads, "tvm": tvm.__version__}
    for pkg in ("onnxruntime", "openvino"):
        try:
            out[pkg] = __import__(pkg).__version__
        except ImportError:
            out[pkg] = None
    return out


# ----------------------------------------------------------------------------- workers
def worker(config: str, model_file: str, inputs_npz: str, out_npz: str, threads: int, repeat: int) -> dict[str, Any]:
    """Time one configuration in this (fresh) process; save its outputs to ``out_npz``."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import numpy as np

    from tvmedge.bench import peers

    data = np.load(inputs_npz)
    inputs = {k: data[k] for k in data.files}
    info: dict[str, Any] = {}
    if config.startswith("tvm"):
        from tvmedge.run import run_artifact

        res = run_artifact(model_file, inputs, repeat=repeat, threads=threads)
        outputs, lat, info["threads"] = res.outputs, res.latencies_ms, res.threads
    elif config == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        outputs = ort.InferenceSession(model_file, opts, providers=["CPUExecutionProvider"]).run(None, inputs)
        lat = peers.onnxruntime_latency(model_file, inputs, threads, repeat=repeat)
        info["threads"] = threads
    else:
        precision = "f32" if config == "openvino f32" else None
        compiled = peers.openvino_compile(model_file, threads, precision)
        outputs = peers.openvino_run(compiled, inputs)
        info["precision"] = peers.openvino_precision(compiled)
        info["threads"] = threads
        del compiled
        lat = peers.openvino_latency(model_file, inputs, threads, precision, repeat=repeat)
    np.savez(out_npz, *[np.asarray(o) for o in outputs])
    return {"latency_ms": peers.summarize(lat), "repeat": len(lat), **info}


def run_worker(config: str, model_file: Path, inputs_npz: Path, work: Path, threads: int, repeat: int) -> dict[str, Any]:
    out_npz = work / f"out-{config.replace(' ', '_')}.npz"
    cmd = [sys.executable, __file__, "--threads", str(threads), "--repeat", str(repeat),
           "--worker", config, str(model_file), str(inputs_npz), str(out_npz)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["outputs_npz"] = str(out_npz)
    return res


# ----------------------------------------------------------------------------- tvmedge variants
def bench_device(threads: int):
    """The host device, its target's ``num-cores`` set to the thread count the benchmark uses."""
    from tvm.target import Target

    from tvmedge.target import resolve

    dev = resolve("host")
    return dataclasses.replace(dev, target=Target({**dev.target_json, "num-cores": threads}))


def tune_for(model, device, minutes: float, db_dir: Path, round_trials: int, threads: int, log=print) -> dict[str, Any]:
    """Tune ``model`` into a fresh ``db_dir`` in rounds until ``minutes`` are spent."""
    from tvmedge.tune.pool import device_pool
    from tvmedge.tune.tuner import TuneOptions, tune_model

    spent, trials, rounds = 0.0, 0, 0
    with device_pool(device, log=log, threads=threads) as pool:
        while spent < minutes * 60:
            t0 = time.perf_counter()
            rep = tune_model(model, device, db_dir, TuneOptions(round_trials, retune=rounds > 0), pool, progress=False)
            spent += time.perf_counter() - t0
            trials += rep["trials_run"]
            rounds += 1
            log(f"  tuning: {trials} trials in {spent / 60:.1f} min")
            if rep["trials_run"] == 0:
                break
    return {"minutes": round(spent / 60, 2), "trials": trials, "rounds": rounds}


def load(spec: str, work: Path, shapes: list[str] | None) -> tuple[str, Path, Any]:
    """(name, model file, imported model) for a zoo name or a model file."""
    from tvmedge import zoo
    from tvmedge.frontend import load_model, parse_shapes

    path = Path(spec)
    if path.suffix and path.exists():
        return path.stem, path, load_model(path, parse_shapes(shapes))
    onnx_path = zoo.export(spec, work / f"{spec}.onnx")
    return spec, onnx_path, load_model(onnx_path)


def bench_model(spec: str, args, work: Path, log=print) -> dict[str, Any]:
    import numpy as np

    from tvmedge.build import compile_model
    from tvmedge.isa import isa_class
    from tvmedge.core.model import random_inputs
    from tvmedge.tune.shipped import shipped_databases

    name, model_file, model = load(spec, work, args.input_shape)
    device = bench_device(args.threads)
    inputs = random_inputs([i.to_dict() for i in model.inputs], seed=0)
    inputs_npz = work / f"{name}-inputs.npz"
    np.savez(inputs_npz, **inputs)
    slow_repeat = max(3, args.repeat // 10)
    rows: dict[str, dict[str, Any]] = {}

    def tvm_row(label: str, tuning_db, repeat: int, **extra) -> None:
        art = work / f"{name}-{label.replace(' ', '_')}.tar"
        t0 = time.perf_counter()
        meta = compile_model(model, device, art, tuning_db=tuning_db, use_shipped=False)
        compile_s = round(time.perf_counter() - t0, 1)
        rows[label] = {**run_worker(label, art, inputs_npz, work, args.threads, repeat), "compile_s": compile_s,
                       **({"kernels": meta["schedules"]} if "schedules" in meta else {}), **extra}

    log(f"{name}: tvm untuned")
    tvm_row("tvm untuned", None, slow_repeat)
    shipped = shipped_databases(device)
    if shipped:
        log(f"{name}: tvm shipped ({', '.join(str(p.relative_to(p.parents[2])) for p in shipped)})")
        tvm_row("tvm shipped", shipped, args.repeat, databases=[str(p) for p in shipped])
    else:
        rows["tvm shipped"] = {"skipped": f"none for {isa_class(device.target)}"}
    if args.tune_minutes > 0:
        label = f"tvm tuned {args.tune_minutes:g}m"
        db_dir = work / f"{name}-tuning-db"
        log(f"{name}: tuning {args.tune_minutes:g} min")
        tuning = tune_for(model, device, args.tune_minutes, db_dir, args.round_trials, args.threads, log=log)
        tvm_row(label, db_dir, args.repeat, tuning=tuning)
        if args.keep_tuning_db:
            dest = Path(args.keep_tuning_db) / name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(db_dir, dest, ignore=shutil.ignore_patterns(".*", "logs"))
    if model_file.suffix == ".onnx":
        for config in PEER_CONFIGS:
            log(f"{name}: {config}")
            rows[config] = run_worker(config, model_file, inputs_npz, work, args.threads, args.repeat)
    else:
        for config in PEER_CONFIGS:
            rows[config] = {"skipped": f"not an ONNX model ({model_file.suffix})"}

    ort = rows.get("onnxruntime", {})
    ort_ms = ort.get("latency_ms", {}).get("median")
    ref = [np.load(ort["outputs_npz"])[k] for k in np.load(ort["outputs_npz"]).files] if "outputs_npz" in ort else None
    for row in rows.values():
        if "latency_ms" in row:
            row["ratio_to_onnxruntime"] = row["latency_ms"]["median"] / ort_ms if ort_ms else None
        npz = row.pop("outputs_npz", None)
        if npz and ref is not None:
            outs = [np.load(npz)[k] for k in np.load(npz).files]
            row["max_abs_diff_vs_onnxruntime"] = max(float(np.abs(o.astype("float64") - r.astype("float64")).max())
                                                     for o, r in zip(outs, ref)) if outs else None
    return {"model": name, "source": str(model_file), "inputs": [i.to_dict() for i in model.inputs],
            "shipped_databases": [str(p) for p in shipped], "rows": rows}


# ----------------------------------------------------------------------------- report
def cell(row: dict[str, Any]) -> str:
    if "latency_ms" in row:
        ratio = row.get("ratio_to_onnxruntime")
        return f"{row['latency_ms']['median']:.3g}" + (f" ({ratio:.2f}x)" if ratio else "")
    return row.get("skipped") or f"error: {row.get('error', '?')[:50]}"


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cpu_model']} (LLVM CPU {m['llvm_cpu']}, ISA class {m['isa_class']}), {m['logical_cores']} logical "
            f"cores, {m['threads']} threads; TVM {m['tvm']}, ONNX Runtime {m['onnxruntime']}, "
            f"OpenVINO {str(m['openvino']).split('-')[0]}")


def configs_of(results: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for res in results:
        for c in res["rows"]:
            if c not in seen:
                seen.append(c)
    return seen


def print_table(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"median ms (x ONNX Runtime), batch 1, {out['machine']['threads']} threads",
                  caption=machine_line(out["machine"]))
    configs = configs_of(out["models"])
    table.add_column("model")
    for c in configs:
        table.add_column(c, justify="right")
    for res in out["models"]:
        cells = []
        for c in configs:
            row = res["rows"].get(c, {"skipped": "-"})
            text = cell(row)
            if c == "openvino default" and row.get("precision"):
                text += f" [{row['precision']}]"
            kernels = row.get("kernels")
            if c != "tvm untuned" and kernels and "latency_ms" in row:  # how many kernels the records reached
                total = kernels.get("tuned", 0) + kernels.get("default_rule", 0) + len(kernels.get("unscheduled", []))
                text += f" [{kernels.get('tuned', 0)}/{total} tuned]"
            cells.append(escape(text))
        table.add_row(res["model"], *cells)
    Console(width=200).print(table)
    for res in out["models"]:
        bad = {c: r["max_abs_diff_vs_onnxruntime"] for c, r in res["rows"].items()
               if r.get("max_abs_diff_vs_onnxruntime") is not None}
        print(f"{res['model']}: max |output - ONNX Runtime's| " + ", ".join(f"{c} {d:.2g}" for c, d in bad.items()))


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    configs = configs_of(out["models"])
    models = [r["model"] for r in out["models"]]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(models) + 2), 4.5))
    width = 0.8 / max(1, len(configs))
    for i, c in enumerate(configs):
        vals = [r["rows"].get(c, {}).get("ratio_to_onnxruntime") or np.nan for r in out["models"]]
        ax.bar(np.arange(len(models)) + (i - (len(configs) - 1) / 2) * width, vals, width, label=c)
    ax.axhline(1.0, ls="--", c="gray")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(models)), models)
    ax.set_ylabel("latency / ONNX Runtime (lower is faster)")
    m = out["machine"]
    ax.set_title(f"{m['cpu_model']} ({m['llvm_cpu']}), {m['threads']} threads", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"zoo names or model files, comma-separated (default {DEFAULT_MODELS})")
    ap.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    ap.add_argument("--repeat", type=int, default=50, help="timed runs per configuration (untuned TVM: a tenth)")
    ap.add_argument("--tune-minutes", type=float, default=0.0, help="tune each model this long on a fresh database (0: skip)")
    ap.add_argument("--round-trials", type=int, default=128, help="trials per tuning round")
    ap.add_argument("--keep-tuning-db", metavar="DIR", help="copy each model's tuning database to DIR/<model>")
    ap.add_argument("--input-shape", action="append", metavar="NAME:DIMS", help="fix dynamic input dims of model files")
    ap.add_argument("--json", default=str(RESULTS / "peers.json"), help="JSON output; the plot goes next to it (.png)")
    ap.add_argument("--worker", nargs=4, metavar=("CONFIG", "MODEL", "INPUTS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, threads=args.threads, repeat=args.repeat)))
        return

    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    out_path = Path(args.json)
    out: dict[str, Any] = {"machine": machine(args.threads), "date": time.strftime("%Y-%m-%d %H:%M"),
                           "repeat": args.repeat, "tune_minutes": args.tune_minutes, "models": []}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="tvmedge-peers-") as tmp:
        for spec in [s.strip() for s in args.models.split(",") if s.strip()]:
            work = Path(tmp) / f"m{len(out['models'])}"
            work.mkdir()
            out["models"].append(bench_model(spec, args, work, log=log))
            out_path.parent.mkdir(parents=True, exist_ok=True)  # after each model: a crash keeps what was measured
            out_path.write_text(json.dumps(out, indent=2))
    print_table(out)
    png = out_path.with_suffix(".png")
    plot(out, png)
    print(f"wrote {out_path} and {png}")


if __name__ == "__main__":
    main()
