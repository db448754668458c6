"""int8 on this host: fp32 vs int8 (generic Relax ops) vs int8 + VNNI kernels, with ONNX Runtime.

Per zoo model: the fp32 model, its int8 quantization (:mod:`tvmedge.optimize.quantize`;
trained models calibrated on their own calibration split, random-weight ones on random
inputs), compiled for the host untuned (the default ``tvm.compile`` path) twice - without the
VNNI rewrite (``TVMEDGE_INT8_DOT=0``) and with it (:mod:`tvmedge.lower.int8_dot`, what
``tvmedge compile`` does on this CPU) - and timed with the TVM runtime (``--threads``,
default 2), next to ONNX Runtime fp32 on the same input. Trained models report their metric
(digits accuracy, shapes mIoU on held-out data) measured on the compiled libraries; the others
the output error vs fp32. ``--tune-trials N`` adds fp32 tuned with MetaSchedule (N trials,
local RPC runner as ``tvmedge tune``) and int8+VNNI tuned with the same budget (the tasks
left around the VNNI kernels), the fair comparison for the int8 >= 2x fp32 goal.

ONNX Runtime's own int8 runs too: ``quantize_static`` (QDQ, per-channel int8 weights, uint8
activations) of the same ONNX model on the same calibration inputs (issue 14's goal: tvmedge
int8 <= 0.5x ORT fp32 and <= 1.0x ORT int8 on mobilenet_v2).

"untuned" means tvmedge's default schedules without tuning records (on par with ONNX Runtime
fp32 on these models); ONNX Runtime fp32 and int8 are the references.

    .venv/bin/python benchmarks/int8.py [--models digits-cnn,shapes-seg,resnet18,mobilenet_v2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


RESULTS = Path(__file__).parent / "results"
TRAINED = {"shapes-seg": "shapes", "digits-cnn": "digits"}


def _library(artifact: Path, tmp: Path):
    """A compiled artifact loaded here, callable like :class:`~tvmedge.optimize.check.HostRunner`."""
    import tvm

    from tvmedge.core.artifact import read_artifact
    from tvmedge.core.vm import ModelVM

    lib_path, meta = read_artifact(artifact, tmp)
    return ModelVM(tvm.runtime.load_module(str(lib_path)), tvm.cpu(0), [s["name"] for s in meta["inputs"]])


def _tune(model: Any, device: Any, db: Path, trials: int) -> Path:
    from tvmedge.tune.pool import device_pool
    from tvmedge.tune.tuner import TuneOptions, tune_model

    with device_pool(device, log=lambda *a: None) as pool:
        tune_model(model, device, db, TuneOptions(trials), pool, progress=False)
    return db


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-cnn,shapes-seg,resnet18,mobilenet_v2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--tune-trials", type=int, default=0, help="also fp32 tuned with this many trials (0: skip)")
    ap.add_argument("--out", default=str(RESULTS / "int8.json"))
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    from rich.console import Console
    from rich.table import Table

    from tvmedge import zoo
    import onnxruntime as ort

    from tvmedge.bench.peers import onnxruntime_latency, onnxruntime_qdq, summarize
    from tvmedge.build import compile_model
    from tvmedge.frontend import load_model
    from tvmedge.optimize import data as data_mod
    from tvmedge.core.metrics import errors
    from tvmedge.optimize.check import outputs_over, score
    from tvmedge.optimize.data import Dataset
    from tvmedge.lower.int8_dot import ENV_SWITCH, has_vnni
    from tvmedge.optimize.quantize import quantize
    from tvmedge.core.model import random_inputs
    from tvmedge.run import run_artifact
    from tvmedge.target import resolve

    device = resolve("host")
    res: dict[str, Any] = {"threads": args.threads, "repeat": args.repeat, "cpu": str(device.target.attrs.get("mcpu")),
                           "vnni": has_vnni(device.target), "tune_trials": args.tune_trials,
                           "date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="tvmedge-int8-") as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            onnx_path = zoo.export(name, tmp / f"{name}.onnx")
            model = load_model(onnx_path)
            specs = [i.to_dict() for i in model.inputs]
            if name in TRAINED:
                calib = data_mod.load(TRAINED[name], model, "calib", limit=args.calib_size)
                evals = data_mod.load(TRAINED[name], model, "eval", limit=args.eval_size)
            else:
                calib = Dataset("random", [random_inputs(specs, seed=i) for i in range(min(8, args.calib_size))])
                evals = None
            # the timed input (its outputs give the error vs fp32): real data where there is some
            x = evals.samples[0] if evals is not None else random_inputs(specs, seed=1234)
            t0 = time.time()
            qmodel, qrep = quantize(model, calib, progress=False)
            rows: dict[str, Any] = {"quantize_s": round(time.time() - t0, 1), "int8_layers": len(qrep["layers"])}
            variants = [("fp32", model, "0", None), ("int8", qmodel, "0", None), ("int8+vnni", qmodel, "1", None)]
            if args.tune_trials:
                # same budget for both; int8+vnni tunes what is left around the VNNI kernels
                # (quantize, epilogues, pooling, depthwise convs)
                t0 = time.time()
                db = _tune(model, device, tmp / f"db-{name}", args.tune_trials)
                rows["tune_s"] = round(time.time() - t0, 1)
                os.environ[ENV_SWITCH] = "1"
                t0 = time.time()
                qdb = _tune(qmodel, device, tmp / f"db-{name}-int8", args.tune_trials)
                rows["tune_int8_s"] = round(time.time() - t0, 1)
                variants.insert(1, (f"fp32 tuned {args.tune_trials}", model, "0", db))
                variants.append((f"int8+vnni tuned {args.tune_trials}", qmodel, "1", qdb))
            ref = None
            for kind, m, vnni, db in variants:
                os.environ[ENV_SWITCH] = vnni
                t0 = time.time()
                art = tmp / f"{name}-{kind.replace(' ', '_')}.tar"
                meta = compile_model(m, device, art, tuning_db=db)
                row: dict[str, Any] = {"compile_s": round(time.time() - t0, 1),
                                       "rewrites": [r["rewrite"] for r in meta["rewrites"]]}
                run = run_artifact(art, x, repeat=args.repeat, threads=args.threads)
                row["latency_ms"] = run.latency_summary()
                ref = run.outputs if ref is None else ref
                row.update(errors(ref, run.outputs))
                if evals is not None:
                    lib = _library(art, tmp / f"lib-{name}-{kind.replace(' ', '_')}")
                    row["metric"] = evals.metric
                    row["score"] = score(outputs_over(lib, evals), evals)
                rows[kind] = row
                print(f"{name:12s} {kind:16s} {row['latency_ms']['median']:9.2f} ms  score {row.get('score')}",
                      flush=True)
            os.environ.pop(ENV_SWITCH, None)
            rows["onnxruntime fp32"] = {"latency_ms": summarize(onnxruntime_latency(onnx_path, x, args.threads,
                                                                                    max(args.repeat, 50)))}
            print(f"{name:12s} {'onnxruntime fp32':16s} {rows['onnxruntime fp32']['latency_ms']['median']:9.2f} ms",
                  flush=True)
            # ONNX Runtime's own int8 of the same model, calibrated on the same inputs
            qdq = onnxruntime_qdq(onnx_path, tmp / f"{name}.qdq.onnx", list(calib.samples))
            sess = ort.InferenceSession(qdq, providers=["CPUExecutionProvider"])
            row = {"latency_ms": summarize(onnxruntime_latency(qdq, x, args.threads, max(args.repeat, 50)))}
            row.update(errors(ref, sess.run(None, x)))
            if evals is not None:
                row["metric"] = evals.metric
                row["score"] = score(outputs_over(lambda s: sess.run(None, s), evals), evals)
            rows["onnxruntime int8 (QDQ)"] = row
            print(f"{name:12s} {'onnxruntime int8':16s} {row['latency_ms']['median']:9.2f} ms  score {row.get('score')}",
                  flush=True)
            res["models"][name] = rows

    table = Table(title=f"int8 on this host ({res['cpu']}, VNNI {res['vnni']}), {args.threads} threads, batch 1, "
                        "untuned TVM")
    for col in ("model", "variant", "median ms", "x fp32 untuned", "x ORT fp32", "metric", "drop (pt)",
                "max rel err", "compile s"):
        table.add_column(col, justify="right")
    for name, rows in res["models"].items():
        base = rows["fp32"]
        ort_ms = rows["onnxruntime fp32"]["latency_ms"]["median"]
        for kind, r in rows.items():
            if not isinstance(r, dict):
                continue
            ms = r["latency_ms"]["median"]
            r["speedup_vs_fp32"] = base["latency_ms"]["median"] / ms
            r["speedup_vs_onnxruntime"] = ort_ms / ms
            if "score" in r:
                r["drop_points"] = 100 * (base["score"] - r["score"])
            table.add_row(name, kind, f"{ms:.2f}", f"{r['speedup_vs_fp32']:.2f}x",
                          f"{r['speedup_vs_onnxruntime']:.2f}x",
                          f"{r['score']:.4f}" if "score" in r else "",
                          f"{r['drop_points']:.2f}" if "drop_points" in r else "",
                          f"{r['max_rel']:.3g}" if "max_rel" in r else "", f"{r.get('compile_s', '')}")
    Console(width=160).print(table)
    for name, rows in res["models"].items():
        v, g = rows["int8+vnni"], rows["int8"]
        drop = v.get("drop_points")
        tuned = rows.get(f"fp32 tuned {args.tune_trials}")
        qtuned = rows.get(f"int8+vnni tuned {args.tune_trials}")
        ort_q = rows["onnxruntime int8 (QDQ)"]["latency_ms"]["median"]
        ort_f = rows["onnxruntime fp32"]["latency_ms"]["median"]
        best = min(r["latency_ms"]["median"] for k, r in rows.items() if isinstance(r, dict) and k.startswith("int8"))
        print(f"{name}: int8+vnni {g['latency_ms']['median'] / v['latency_ms']['median']:.2f}x over generic int8, "
              f"{v['speedup_vs_fp32']:.2f}x over untuned fp32, {v['speedup_vs_onnxruntime']:.2f}x vs ORT fp32; "
              f"best tvmedge int8 {best:.2f} ms = {best / ort_f:.2f}x ORT fp32 (goal <= 0.5x), "
              f"{best / ort_q:.2f}x ORT int8 QDQ (goal <= 1.0x)"
              + (f"; tuned, {args.tune_trials} trials each: int8+vnni {tuned['latency_ms']['median'] / qtuned['latency_ms']['median']:.2f}x "
                 f"fp32 (goal >= 2x: {'met' if tuned['latency_ms']['median'] >= 2 * qtuned['latency_ms']['median'] else 'NOT met'})"
                 if tuned and qtuned else "")
              + (f", drop {drop:.2f} pt" if drop is not None else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
