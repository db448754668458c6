"""``tvmedge tune``: tune a model on its device over RPC, then report tuned vs untuned vs ONNX Runtime."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..core.jsonio import dumps
from ..core.progress import console as make_console


def run_tune(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..frontend import load_model, parse_shapes
    from ..target import resolve
    from .database import SLOWER_MARGIN, TuningDatabase, model_key
    from .pool import device_pool, measure_model
    from .tuner import TuneOptions, tune_model

    console = make_console(stderr=args.json)
    device = resolve(args.target)
    model = load_model(args.model, parse_shapes(args.input_shape))
    if args.fp16:
        from ..build import half_precision

        model = half_precision(model, device)
    with device_pool(device, args.rpc_tracker, args.rpc_key, emulated=bool(args.emulated),
                     log=lambda m: console.print(m, markup=False)) as pool:
        report = tune_model(model, device, args.tuning_db, TuneOptions(args.trials, resume=args.resume), pool,
                            progress=not args.json)
        if not args.no_compare:
            with tempfile.TemporaryDirectory(prefix="tvmedge-tune-") as tmp:
                tuned = measure_model(model, device, pool, args.tuning_db, args.repeat, Path(tmp), "tuned")
                untuned = measure_model(model, device, pool, None, max(3, args.repeat // 4), Path(tmp), "untuned")
                if tuned["latency_ms"]["median"] > SLOWER_MARGIN * untuned["latency_ms"]["median"]:
                    # Each kernel's record is at least as fast as its default schedule when
                    # measured alone; end to end that need not hold (noisy or emulated
                    # devices). Measure both again, alternating, before deciding.
                    tuned, untuned = _ab(tuned, untuned, pool, args.repeat)
            report["latency_ms"] = {"tuned": tuned["latency_ms"], "untuned": untuned["latency_ms"]}
            # compile follows this verdict: a model slower with its records gets the defaults.
            with TuningDatabase(args.tuning_db, write=True) as db:
                report["end_to_end"] = db.record_end_to_end(
                    model_key(model), device.name, tuned["latency_ms"]["median"], untuned["latency_ms"]["median"],
                    report["emulated"])
            report["tuned_slower_than_default"] = report["end_to_end"]["faster"] == "default"
            report["onnxruntime_ms"] = _onnxruntime_here(args.model, model, device, tuned["outputs"], report)
    if args.json:
        print(dumps(report))
        return 0
    tag = " (emulated)" if report["emulated"] else ""
    table = Table(title=f"tasks of {report['model']} on {device.name}{tag}")
    for col in ("task", "weight", "MFLOP", "trials", "best us", "GFLOP/s", "status"):
        table.add_column(col, justify="left" if col in ("task", "status") else "right")
    for t in sorted(report["tasks"], key=lambda t: -(t["best_us"] or 0) * t["weight"]):
        table.add_row(t["name"][:40], str(t["weight"]), f"{t['flops'] / 1e6:.2f}", f"{t['trials']} ({t['trials_total']})",
                      f"{t['best_us']:.1f}" if t["best_us"] else "-", f"{t['gflops']:.1f}" if t["gflops"] else "-",
                      t["status"])
    console.print(table)
    reused = sum(t["status"] == "reused" for t in report["tasks"])
    converged = sum(t["status"] == "converged" for t in report["tasks"])
    console.print(f"budget {report['trials_budget']} trials: {report['trials_run']} run in {report['tuning_seconds']:.0f}s "
                  f"({report['trials_per_iter']} per round), {reused} task(s) reused from the database, "
                  f"{converged} stopped early (converged); measured on {report['devices_used']} of "
                  f"{report['devices_available']} device(s) under key '{pool.key}'{tag}")
    if "latency_ms" in report:
        lat = report["latency_ms"]
        ort = report.get("onnxruntime_ms")
        console.print(f"end to end on {device.name}{tag}: tuned {lat['tuned']['median']:.3f} ms, "
                      f"untuned {lat['untuned']['median']:.3f} ms "
                      f"(speed-up {lat['untuned']['median'] / lat['tuned']['median']:.2f}x)"
                      + (f", ONNX Runtime {ort['median']:.3f} ms (tuned/ORT {lat['tuned']['median'] / ort['median']:.2f})"
                         if ort else ", ONNX Runtime: not run (not on this machine's CPU)"))
        if report.get("tuned_slower_than_default"):
            print(f"warning: end to end the tuned model is slower than with the default schedules "
                  f"({lat['tuned']['median']:.3f} vs {lat['untuned']['median']:.3f} ms{tag}): `tvmedge compile "
                  f"--tuning-db {args.tuning_db}` will use the default schedules for this model (tune longer, "
                  "then this is measured again)", file=sys.stderr)
    return 0


def _ab(tuned: dict[str, Any], untuned: dict[str, Any], pool, repeat: int, rounds: int = 3):
    """Both artifacts timed again in alternation (a device's speed drifts: one long run
    each can favour either); each keeps all its latencies, and its median is recomputed."""
    from ..run import latency_summary
    from .pool import time_artifact

    runs = {"tuned": list(tuned["latencies_ms"]), "untuned": list(untuned["latencies_ms"])}
    for _ in range(rounds):
        for label, art in (("tuned", tuned["artifact"]), ("untuned", untuned["artifact"])):
            runs[label] += time_artifact(art, pool, max(3, repeat // 2))["latencies_ms"]
    return tuple({**first, "latencies_ms": runs[label], "latency_ms": latency_summary(runs[label])}
                 for label, first in (("tuned", tuned), ("untuned", untuned)))


def _onnxruntime_here(model_path: str, model, device, outputs, report) -> dict[str, float] | None:
    """ONNX Runtime on the same device: only possible when the device is this machine."""
    if report["emulated"] or not str(model_path).endswith(".onnx") or device.device != "cpu" or device.cross_compiler:
        return None
    from ..bench.peers import onnxruntime_latency, summarize
    from ..core.model import random_inputs

    inputs = random_inputs([i.to_dict() for i in model.inputs])
    return summarize(onnxruntime_latency(model_path, inputs, os.cpu_count() or 1, repeat=20))


def register_cli(sub) -> None:
    p = sub.add_parser("tune", help="autotune a model on its device over RPC (MetaSchedule)")
    p.add_argument("model")
    p.add_argument("--target", default="host")
    p.add_argument("--tuning-db", required=True, metavar="DIR", help="tuning database directory (created, reused, resumed)")
    p.add_argument("--trials", type=int, default=256, help="trial budget for the model (default 256)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="tracker of the real devices (default: start a local one)")
    p.add_argument("--rpc-key", metavar="KEY", help="device key (default: the target's)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in DIR")
    p.add_argument("--emulated", action="store_true", help="the devices behind --rpc-tracker are emulated (label timings)")
    p.add_argument("--repeat", type=int, default=20, help="timed runs for the end-to-end comparison")
    p.add_argument("--no-compare", action="store_true", help="skip the tuned/untuned/ONNX Runtime comparison")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS")
    p.add_argument("--fp16", action="store_true", help="CUDA targets: tune the fp16 model (as compile --fp16 builds it)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    p.set_defaults(func=run_tune)
