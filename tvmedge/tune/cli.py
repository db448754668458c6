"""``tvmedge tune``: tune a model on its device over RPC, then report tuned vs untuned vs ONNX Runtime."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..core.errors import TvmedgeError
from ..core.jsonio import dumps
from ..core.schema import device_block, envelope, kind_label, latency_block
from ..core.progress import console as make_console


def run_tune(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..frontend import load_model, parse_shapes
    from ..target import resolve
    from .pool import compare_end_to_end, device_pool
    from .tuner import TuneOptions, tune_model

    if args.tracker_port is not None and args.rpc_tracker:
        raise TvmedgeError("--tracker-port is the port of the local tracker tune starts without --rpc-tracker: "
                           "give one or the other")
    console = make_console(stderr=args.json)
    device = resolve(args.target)
    model = load_model(args.model, parse_shapes(args.input_shape))
    if args.fp16:
        from ..build import half_precision

        model = half_precision(model, device)
    if device.accelerator is not None:  # a VTA target: the timing model measures (tvmedge.vta.tune)
        return _tune_vta(args, model, device, console)
    with device_pool(device, args.rpc_tracker, args.rpc_key, emulated=bool(args.emulated),
                     log=lambda m: console.print(m, markup=False), tracker_port=args.tracker_port) as pool:
        report = tune_model(model, device, args.tuning_db, TuneOptions(args.trials, resume=args.resume), pool,
                            progress=not args.json, warn=lambda line: print(f"warning: {line}", file=sys.stderr))
        if not args.no_compare:
            cmp = compare_end_to_end(model, device, pool, args.tuning_db, args.repeat, report["emulated"])
            tuned, untuned = cmp["tuned"], cmp["untuned"]
            report["latency_ms"] = {"tuned": tuned["latency_ms"], "untuned": untuned["latency_ms"]}
            report["end_to_end"] = cmp["end_to_end"]
            report["tuned_slower_than_default"] = report["end_to_end"]["faster"] == "default"
            report["onnxruntime_ms"] = _onnxruntime_here(args.model, model, device, tuned["outputs"], report)
        report["device"] = device_block(device.name, device.target_json, pool.kind, via="rpc", key=pool.key,
                                        **{k: v for k, v in pool.info.items()
                                           if k in ("board", "emulator", "arch", "reported") and v is not None})
    if args.json:
        print(dumps(to_schema(report)))
        return 0
    tag = kind_label(report["device"]["kind"])
    table = Table(title=f"tasks of {report['model']} on {device.name}{tag}")
    for col in ("task", "weight", "MFLOP", "trials", "best us", "GFLOP/s", "status"):
        table.add_column(col, justify="left" if col in ("task", "status") else "right")
    for t in sorted(report["tasks"], key=lambda t: -(t["best_us"] or 0) * t["weight"]):
        table.add_row(t["name"][:40], str(t["weight"]), f"{t['flops'] / 1e6:.2f}", f"{t['trials']} ({t['trials_total']})",
                      f"{t['best_us']:.1f}" if t["best_us"] else "-", f"{t['gflops']:.1f}" if t["gflops"] else "-",
                      t["status"])
    console.print(table)
    count = {s: sum(t["status"] == s for t in report["tasks"]) for s in ("reused", "converged", "no trials")}
    over = report["trials_run"] - report["trials_budget"]
    console.print(f"budget {report['trials_budget']} trials: {report['trials_run']} measured"
                  + (f" ({over} past the budget: MetaSchedule finishes the round it started)" if over > 0 else "")
                  + f" in {report['tuning_seconds']:.0f}s ({report['trials_per_iter']} per round); of "
                  f"{len(report['tasks'])} tasks {count['reused']} reused from the database, {count['converged']} "
                  f"stopped early (converged), {count['no trials']} got no trials (default schedules); measured on "
                  f"{report['devices_used']} of {report['devices_available']} device(s) under key '{pool.key}'{tag}")
    for line in report.get("warnings", []):
        print(f"warning: {line}", file=sys.stderr)
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


def to_schema(report: dict[str, Any]) -> dict[str, Any]:
    """The tune report as the tvmedge/1 schema: the tuned model's latency as ``latency_ms``,
    untuned and ONNX Runtime under ``baselines`` (ORT ran on this host: its own device block)."""
    out = {k: v for k, v in report.items() if k not in ("latency_ms", "onnxruntime_ms", "emulated")}
    if "latency_ms" in report:
        out["latency_ms"] = latency_block(report["latency_ms"]["tuned"])
        ort = report.get("onnxruntime_ms")
        out["baselines"] = {
            "untuned": {"latency_ms": latency_block(report["latency_ms"]["untuned"])},
            "onnxruntime": None if not ort else {"latency_ms": latency_block(ort),
                                                  "device": device_block("host", "host", via="local")}}
    return envelope("tune", out)


def _onnxruntime_here(model_path: str, model, device, outputs, report) -> dict[str, float] | None:
    """ONNX Runtime on the same device: only possible when the device is this machine."""
    if report["emulated"] or not str(model_path).endswith(".onnx") or device.device != "cpu" or device.cross_compiler:
        return None
    from ..bench.peers import onnxruntime_latency, summarize
    from ..core.model import random_inputs

    inputs = random_inputs([i.to_dict() for i in model.inputs])
    return summarize(onnxruntime_latency(model_path, inputs, os.cpu_count() or 1, repeat=20))


def _tune_vta(args: argparse.Namespace, model: Any, device: Any, console: Any) -> int:
    from rich.table import Table

    from ..vta.tune import tune_model

    if args.rpc_tracker:
        console.print(f"note: {device.name}'s accelerator is measured with its timing model here; --rpc-tracker is "
                      "not used by this command", markup=False)
    report = tune_model(model, device.accelerator, args.tuning_db, args.trials, progress=not args.json)
    if args.json:
        from ..core.schema import device_block, envelope

        device_json = device_block(device.name, device.target_json, kind="simulated", via="none")
        print(dumps(envelope("tune vta", {**report, "device": device_json})))
        return 0
    table = Table(title=f"{report['accelerator']} layers, SIMULATED (measured with the timing model)")
    for col in ("layer", "trials", "default cycles", "best cycles", "speedup", "tile", "offload"):
        table.add_column(col, justify="left" if col in ("layer", "tile") else "right")
    for r in report["layers"]:
        t = r["tiling"]
        cpu = r["host_cpu_ms_estimate"]
        table.add_row(r["layer"], str(r["trials"]), str(r["default_cycles"]), str(r["best_cycles"]),
                      f"{r['speedup']:.2f}x", f"{t['tile_h']}x{t['tile_w']}x{t['tile_co']}blk{' db' if t['double_buffer'] else ''}",
                      ("yes" if r["offload"] else "no") + (f" (cpu est. {cpu:.3f} ms)" if cpu is not None else ""))
    console.print(table)
    console.print(f"records: {report['records']} (compile with --tuning-db {args.tuning_db} to apply them); "
                  "the host CPU part is not tuned by this command", markup=False)
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("tune", help="autotune a model on its device over RPC (MetaSchedule)")
    p.add_argument("model", help="ONNX (.onnx), .pt2, TFLite (.tflite) or .relax model")
    p.add_argument("--target", default="host",
                   help="device name (targets/), TVM tag or JSON target (default host: this machine)")
    p.add_argument("--tuning-db", required=True, metavar="DIR", help="tuning database directory (created, reused, resumed)")
    p.add_argument("--trials", type=int, default=256, help="trial budget for the model (default 256)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="tracker of the real devices (default: start a local one)")
    p.add_argument("--rpc-key", metavar="KEY", help="device key (default: the target's)")
    p.add_argument("--tracker-port", type=int, default=None, metavar="PORT",
                   help="without --rpc-tracker: the port of the local tracker tune starts "
                        "(default: the first free one of 9190-9199)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in DIR")
    p.add_argument("--emulated", action="store_true", help="label the devices behind --rpc-tracker emulated even if they do not say so "
                        "(boards from `tvmedge device emulate` say so themselves)")
    p.add_argument("--repeat", type=int, default=20, help="timed runs for the end-to-end comparison")
    p.add_argument("--no-compare", action="store_true", help="skip the tuned/untuned/ONNX Runtime comparison")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                   help="fix an input shape, e.g. input:1x3x224x224")
    p.add_argument("--fp16", action="store_true", help="CUDA targets: tune the fp16 model (as compile --fp16 builds it)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    p.set_defaults(func=run_tune)
