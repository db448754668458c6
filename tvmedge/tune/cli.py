"""``tvmedge tune``: tune a model on its device over RPC, then report tuned vs untuned vs ONNX Runtime."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from ..deploy.address import parse_host_port
from ..deploy.launch import start_server, start_tracker
from ..deploy.session import connect
from ..deploy.tracker import list_devices
from ..errors import TvmedgeError
from ..jsonio import dumps


@contextlib.contextmanager
def device_pool(device, tracker_arg: str | None, key: str | None, emulate: bool | None,
                log=print, threads: int | None = None) -> Iterator[tuple[tuple[str, int], str, int, bool]]:
    """Yields (tracker, key, number of free devices, emulated) for tuning and running.

    With ``--rpc-tracker`` the user's devices are used. Without it, tvmedge starts a
    tracker on loopback and one server: a local one for a host target, an emulated device
    (qemu) for a target that has an emulator, and stops them afterwards. ``threads``: the
    local server's thread pool (candidates are timed with it); default all cores.
    """
    if tracker_arg:
        tracker = parse_host_port(tracker_arg)
        key = key or device.rpc_key or device.name
        free = sum(d.get("free", 0) for d in list_devices(tracker) if d["key"] == key)
        if free == 0:
            raise TvmedgeError(f"no free device under key '{key}' at tracker {tracker[0]}:{tracker[1]} "
                               f"(start one with `tvmedge device serve --tracker {tracker[0]}:{tracker[1]} --key {key}`)")
        yield tracker, key, free, bool(emulate)
        return
    with contextlib.ExitStack() as stack:
        tr = start_tracker()
        stack.callback(tr.stop)
        key = key or device.rpc_key or device.name
        from ..run import arch_of_target
        from ..target import host_target_dict

        native = arch_of_target(device.target_json) == host_target_dict()["mtriple"].split("-")[0]
        if device.device == "cpu" and native:
            log(f"[tvmedge] local tracker {tr.host}:{tr.port} + a local RPC server (key {key})")
            # TMPDIR: each server's sessions work under its own folder, which is how the
            # measuring side tells devices apart (tvmedge.tune.measure.create_session_logged).
            tmpdir = tempfile.mkdtemp(prefix="tvmedge-dev-")
            stack.callback(shutil.rmtree, tmpdir, ignore_errors=True)
            srv = start_server(tracker=(tr.host, tr.port), key=key,
                               env={"TVM_NUM_THREADS": str(threads or os.cpu_count() or 1), "TMPDIR": tmpdir})
            stack.callback(srv.stop)
            yield (tr.host, tr.port), key, 1, False
        elif device.emulator:
            from ..deploy.emulate import EmulatedDevice

            log(f"[tvmedge] local tracker {tr.host}:{tr.port} + an EMULATED {device.name} (qemu); "
                "its timings are not the real device's")
            stack.enter_context(EmulatedDevice(kind=device.name, tracker=(tr.host, tr.port), key=key))
            yield (tr.host, tr.port), key, 1, True
        else:
            raise TvmedgeError(f"target '{device.name}' is not this machine and has no emulator: "
                               "give --rpc-tracker HOST:PORT --rpc-key KEY of a real device")


def _alive(tracker: tuple[str, int], key: str):
    """Whether a server is still registered under ``key`` (a few polls, to ride out a reconnect)."""
    def check() -> bool:
        for attempt in range(6):
            try:
                if any(d["key"] == key and d["total"] > 0 for d in list_devices(tracker)):
                    return True
            except TvmedgeError:
                pass
            time.sleep(1.0)
        return False
    return check


def measure_model(model, device, tracker, key, db_dir: str | None, repeat: int, workdir: Path,
                  label: str) -> dict[str, Any]:
    """Compile (with or without the database) and time it on the device through the tracker."""
    from ..build import compile_model
    from ..run import run_artifact

    art = workdir / f"{label}.tar"
    compile_model(model, device, art, tuning_db=db_dir)
    session = connect(tracker=tracker, key=key, timeout=300)
    res = run_artifact(art, repeat=repeat, session=session)
    return {"artifact": str(art), "latency_ms": res.latency_summary(), "outputs": res.outputs}


def run_tune(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..frontend import load_model, parse_shapes
    from ..target import resolve
    from .tuner import tune_model

    console = Console(stderr=args.json, highlight=False)
    device = resolve(args.target)
    model = load_model(args.model, parse_shapes(args.input_shape))
    with device_pool(device, args.rpc_tracker, args.rpc_key, None, log=lambda m: console.print(m, markup=False)) as pool:
        tracker, key, free, emulated = pool
        emulated = emulated or bool(args.emulated)
        report = tune_model(model, device, args.tuning_db, args.trials, tracker, key, n_devices=free,
                            resume=args.resume, emulated=emulated, progress=not args.json,
                            device_alive=_alive(tracker, key))
        if not args.no_compare:
            with tempfile.TemporaryDirectory(prefix="tvmedge-tune-") as tmp:
                tuned = measure_model(model, device, tracker, key, args.tuning_db, args.repeat, Path(tmp), "tuned")
                untuned = measure_model(model, device, tracker, key, None, max(3, args.repeat // 4), Path(tmp), "untuned")
            report["latency_ms"] = {"tuned": tuned["latency_ms"], "untuned": untuned["latency_ms"]}
            # Each kernel's record is at least as fast as its default schedule when measured
            # alone; end to end that need not hold (noisy or emulated devices): say so.
            report["tuned_slower_than_default"] = bool(
                tuned["latency_ms"]["median"] > 1.05 * untuned["latency_ms"]["median"])
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
                  f"{report['devices_available']} device(s) under key '{key}'{tag}")
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
                  f"({lat['tuned']['median']:.3f} vs {lat['untuned']['median']:.3f} ms{tag}): compile without "
                  "--tuning-db for this model, or tune longer", file=sys.stderr)
    return 0


def _onnxruntime_here(model_path: str, model, device, outputs, report) -> dict[str, float] | None:
    """ONNX Runtime on the same device: only possible when the device is this machine."""
    if report["emulated"] or not str(model_path).endswith(".onnx") or device.device != "cpu" or device.cross_compiler:
        return None
    from ..bench.peers import onnxruntime_latency, summarize
    from ..run import random_inputs

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
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    p.set_defaults(func=run_tune)
