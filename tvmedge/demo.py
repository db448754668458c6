"""The built-in default job (``tvmedge demo``, the README's first command).

Part 1, this machine: export ``mobilenet_v2``, compile it for ``host`` (with the tuning
database shipped in ``schedules/`` for this CPU's ISA class, if any), run it, check it
against ONNX Runtime and print both latencies on the same threads.

Part 2, a device over RPC: start a tracker on loopback and an emulated Raspberry Pi 4 (a
real TVM RPC server for aarch64 under qemu, registered under key ``pi4``), tune
``digits-cnn`` on it with a short MetaSchedule budget, compile the deployable pi4 library
with that database, run it on the board over RPC, check its outputs against ONNX Runtime
on the host and print the report. Emulated timings are labelled as such: they are qemu's,
not a Pi's. ``--skip-device`` leaves part 2 out.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .core.progress import console as make_console
from .deploy.address import format_host_port
from .deploy.launch import start_tracker
from .deploy.session import connect


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def host_part(console, name: str, work: Path, threads: int) -> tuple[bool, dict]:
    import onnxruntime as ort

    from . import zoo
    from .bench.peers import onnxruntime_latency, summarize
    from .build import compile_model
    from .frontend import load_model
    from .run import run_artifact
    from .target import resolve

    entry = zoo.get(name)
    console.print(f"[bold]1/7[/] export zoo model {name} -> ONNX")
    onnx_path = zoo.export(name, work / f"{name}.onnx")
    console.print("[bold]2/7[/] import into Relax and compile for [cyan]host[/]")
    device = resolve("host")
    model = load_model(onnx_path)
    artifact = work / f"{name}-host.tar"
    meta = compile_model(model, device, artifact, use_shipped=True)
    sch = meta["schedules"]
    console.print(f"      {artifact} ({meta['library_bytes'] / 1e6:.1f} MB, {meta['compile_seconds']:.1f} s, "
                  f"target {meta['target'].get('mcpu')}; kernels: {sch['tuned']} from shipped records, "
                  f"{sch['default_rule']} by default rules)")
    console.print(f"[bold]3/7[/] run with the TVM runtime and with ONNX Runtime ({threads} threads)")
    x = zoo.example_input(entry).numpy()
    res = run_artifact(artifact, {model.inputs[0].name: x}, repeat=10, threads=threads)
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {entry.input_name: x})[0]
    err = _rel(res.outputs[0], ref)
    ort_ms = summarize(onnxruntime_latency(onnx_path, {entry.input_name: x}, threads, repeat=10))
    label = f"TVM ({sch['tuned']} kernels from shipped records)" if sch["tuned"] else "TVM (default schedules, untuned)"
    return err < 1e-4, {"rows": [(label, res.latency_summary()), ("ONNX Runtime", ort_ms)], "err": err,
                        "title": f"{name} on this host ({threads} threads, batch 1)"}


def device_part(console, name: str, work: Path, trials: int) -> tuple[bool, dict]:
    import onnxruntime as ort

    from . import zoo
    from .build import compile_model
    from .deploy.emulate import EmulatedDevice
    from .frontend import load_model
    from .run import run_artifact
    from .target import resolve
    from .tune.pool import DevicePool
    from .tune.tuner import TuneOptions, tune_model

    entry = zoo.get(name)
    device = resolve("pi4")
    onnx_path = zoo.export(name, work / f"{name}.onnx")
    model = load_model(onnx_path)
    db = Path(tempfile.mkdtemp(prefix="tvmedge-demo-db-", dir=work))
    console.print("[bold]4/7[/] start a tracker on loopback and an [yellow]emulated[/] Raspberry Pi 4 "
                  "(qemu-aarch64; the first run prepares its arm64 user space, then it is cached)")
    t0 = time.perf_counter()
    with start_tracker() as tr, EmulatedDevice("pi4", tr.addr, key="pi4"):
        console.print(f"      tracker {format_host_port(tr.addr)}, board registered under key 'pi4' "
                      f"in {time.perf_counter() - t0:.0f} s")
        console.print(f"[bold]5/7[/] tune {name} on the board over RPC ({trials} trials, MetaSchedule + XGBoost)")
        report = tune_model(model, device, db, TuneOptions(trials), DevicePool(tr.addr, "pi4", emulated=True))
        console.print("[bold]6/7[/] compile the deployable pi4 library with that database; untuned for comparison")
        tuned_tar, untuned_tar = work / f"{name}-pi4.tar", work / f"{name}-pi4-untuned.tar"
        meta = compile_model(model, device, tuned_tar, tuning_db=db)
        compile_model(model, device, untuned_tar)
        console.print(f"      {tuned_tar} ({meta['library_bytes'] / 1e3:.0f} kB, {meta['target'].get('mtriple')}, "
                      f"{meta['target'].get('mcpu')})")
        console.print("[bold]7/7[/] run both on the board over RPC")
        x = zoo.example_input(entry, seed=3).numpy()
        session = connect(tracker=tr.addr, key="pi4", timeout=300)
        runs = {label: run_artifact(tar, {model.inputs[0].name: x}, repeat=10, session=session)
                for label, tar in (("tuned", tuned_tar), ("untuned", untuned_tar))}
        del session
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {entry.input_name: x})[0]
    err = _rel(runs["tuned"].outputs[0], ref)
    tuned_tasks = [t for t in report["tasks"] if t["trials"]]
    return err < 1e-4, {"rows": [("TVM tuned (emulated pi4)", runs["tuned"].latency_summary()),
                                 ("TVM untuned (emulated pi4)", runs["untuned"].latency_summary())],
                        "err": err, "title": f"{name} on an EMULATED Raspberry Pi 4 over RPC (qemu timings, not a Pi's)",
                        "note": f"{report['trials_run']} trials in {report['tuning_seconds']:.0f} s on "
                                f"{len(tuned_tasks)} of {len(report['tasks'])} tasks; database {db}"}


def _table(console, part: dict, base: str | None = None) -> None:
    from rich.table import Table

    table = Table(title=part["title"])
    for col in ("runtime", "median ms", "p90 ms", "min ms", "FPS", "ratio"):
        table.add_column(col, justify="right" if col != "runtime" else "left")
    ref = dict(part["rows"]).get(base) if base else part["rows"][-1][1]
    for label, s in part["rows"]:
        table.add_row(label, f"{s['median']:.3f}", f"{s['p90']:.3f}", f"{s['min']:.3f}",
                      f"{1e3 / s['median']:.1f}", f"{s['median'] / ref['median']:.2f}x")
    console.print(table)
    if part.get("note"):
        console.print(part["note"])
    console.print(f"max relative error vs ONNX Runtime: {part['err']:.2e}")


def run_demo(args: argparse.Namespace) -> int:

    console = make_console()
    work = Path(args.workdir or "out/demo")
    work.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 1
    ok, host = host_part(console, args.model, work, threads)
    _table(console, host)
    if args.skip_device:
        return 0 if ok else 1
    ok2, dev = device_part(console, "digits-cnn", work, args.trials)
    _table(console, dev)
    return 0 if ok and ok2 else 1
