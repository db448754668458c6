"""The built-in default job (``tvmedge demo``, the README's first command).

Exports a zoo model, compiles it for this machine, runs it, checks its outputs against
ONNX Runtime and prints TVM's latency next to ONNX Runtime's on the same threads.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import zoo
    from .bench.peers import onnxruntime_latency, summarize
    from .build import compile_model
    from .frontend import load_model
    from .run import run_artifact
    from .target import resolve

    console = Console(highlight=False)
    work = Path(args.workdir or "out/demo")
    work.mkdir(parents=True, exist_ok=True)
    name = args.model
    entry = zoo.get(name)
    threads = os.cpu_count() or 1

    console.print(f"[bold]1/4[/] export zoo model {name} -> ONNX")
    onnx_path = zoo.export(name, work / f"{name}.onnx")
    console.print("[bold]2/4[/] import into Relax and compile for [cyan]host[/]")
    device = resolve("host")
    model = load_model(onnx_path)
    artifact = work / f"{name}-host.tar"
    meta = compile_model(model, device, artifact)
    console.print(f"      {artifact} ({meta['library_bytes'] / 1e6:.1f} MB, {meta['compile_seconds']:.1f} s, "
                  f"target {meta['target'].get('mcpu')}, untuned)")
    console.print(f"[bold]3/4[/] run with the TVM runtime ({threads} threads)")
    x = zoo.example_input(entry).numpy()
    res = run_artifact(artifact, {model.inputs[0].name: x}, repeat=10, threads=threads)
    console.print("[bold]4/4[/] ONNX Runtime on the same input and threads")
    import onnxruntime as ort

    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {entry.input_name: x})[0]
    err = float(np.abs(res.outputs[0] - ref).max() / np.abs(ref).max())
    ort_ms = summarize(onnxruntime_latency(onnx_path, {entry.input_name: x}, threads, repeat=10))

    tvm_ms = res.latency_summary()
    table = Table(title=f"{name} on this host ({threads} threads, batch 1)")
    for col in ("runtime", "median ms", "p90 ms", "min ms", "FPS", "vs ONNX Runtime"):
        table.add_column(col, justify="right" if col != "runtime" else "left")
    table.add_row("TVM (untuned)", f"{tvm_ms['median']:.2f}", f"{tvm_ms['p90']:.2f}", f"{tvm_ms['min']:.2f}",
                  f"{1e3 / tvm_ms['median']:.1f}", f"{tvm_ms['median'] / ort_ms['median']:.2f}x")
    table.add_row("ONNX Runtime", f"{ort_ms['median']:.2f}", f"{ort_ms['p90']:.2f}", f"{ort_ms['min']:.2f}",
                  f"{1e3 / ort_ms['median']:.1f}", "1.00x")
    console.print(table)
    console.print(f"max relative error vs ONNX Runtime: {err:.2e}")
    return 0 if err < 1e-4 else 1
