"""Binarized vs float, end to end on this CPU: XNOR/popcount artifacts vs their float twins.

Two pairs, each compiled by tvmedge for the host and timed with ``tvmedge.run.run_artifact``
(same process, same thread count):

* **digits**: ``digits-bnn`` lowered to packed-bit operators (``tvmedge.binary.lower``) vs the
  float ``digits-cnn`` and vs digits-bnn's own float simulation (its ONNX export: the same
  network with float convs on ±1 values), both through the ONNX path;
* **synthetic**: a 1x128x56x56 stack of binary 3x3 convs (128->128, BatchNorm after each, random
  weights), lowered to bits, vs the same stack with float convs via ONNX -> TVM.

TVM's float kernels here are untuned (MetaSchedule tuning on 2 cores takes minutes per layer),
so ONNX Runtime's time for each float model is printed beside them as the honest float
reference. Prints a table and writes ``benchmarks/results/bnn.json``.

``--pi4-emulated`` also cross-compiles the digits pair for ``pi4`` and runs both artifacts on an
emulated Raspberry Pi 4 (qemu-user TVM RPC server behind a loopback tracker; needs the arm64
user space prepared by ``tvmedge device emulate``/the demo, never downloads). Emulated times
compare the two artifacts with each other only; they are not a Pi's.

    .venv/bin/python benchmarks/bnn.py [--threads 2] [--repeat 30] [--layers 4] [--pi4-emulated]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from tvmedge.deploy.launch import start_tracker
from tvmedge.deploy.session import connect


def synthetic_stack(layers: int, channels: int, binary: bool, seed: int = 0) -> nn.Sequential:
    """``layers`` x (3x3 conv, BatchNorm); binary convs or their float twins, random weights."""
    from tvmedge.binary import BinaryConv2d, SignSTE
    from tvmedge.zoo.models import randomize_bn

    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(layers):
        if binary:
            mods.append(BinaryConv2d(channels, channels, 3, padding=1, input_quantizer=SignSTE(),
                                     kernel_quantizer=SignSTE()))
        else:
            mods.append(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        mods.append(nn.BatchNorm2d(channels))
    return randomize_bn(nn.Sequential(*mods), seed).eval()


def export_onnx(model: nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
    return path


def measure(name: str, kind: str, artifact_of, x: np.ndarray, threads: int, repeat: int,
            onnx_path: Path | None = None) -> dict:
    """Compile (``artifact_of()`` -> .tar), time with run_artifact; ORT too when given ONNX."""
    from tvmedge.bench.peers import onnxruntime_latency, summarize
    from tvmedge.run import run_artifact

    t0 = time.perf_counter()
    tar = artifact_of()
    compile_s = time.perf_counter() - t0
    res = run_artifact(tar, {"input": x}, repeat=repeat, threads=threads)
    row = {"model": name, "kind": kind, "tvm_ms": res.latency_summary(), "threads": res.threads,
           "compile_s": round(compile_s, 1), "output": res.outputs[0]}
    if onnx_path is not None:
        row["onnxruntime_ms"] = summarize(onnxruntime_latency(onnx_path, {"input": x}, threads, repeat))
    return row


def run_emulated_pi4(bnn: nn.Module, work: Path, repeat: int) -> dict:
    """digits-bnn (bits) vs digits-cnn (float) cross-compiled for pi4, run on an emulated board."""
    from tvmedge import zoo
    from tvmedge.binary.lower import to_imported_model
    from tvmedge.build import compile_model
    from tvmedge.deploy.emulate import EmulatedDevice
    from tvmedge.deploy.sysroot import find_sysroot
    from tvmedge.frontend import load_model
    from tvmedge.run import run_artifact
    from tvmedge.target import resolve

    sysroot = find_sysroot("aarch64")
    if sysroot is None:
        return {"skipped": "no prepared arm64 user space (run `tvmedge device emulate pi4` once)"}
    pi4 = resolve("pi4")
    compile_model(to_imported_model(bnn, (1, 1, 8, 8)), pi4, work / "bnn-pi4.tar")
    compile_model(load_model(work / "digits_cnn.onnx"), pi4, work / "cnn-pi4.tar")
    x = {"input": zoo.example_input(zoo.get("digits-bnn")).numpy()}
    key = f"pi4-bnn-bench-{os.getpid()}"
    tracker = start_tracker(port=0)
    try:
        with EmulatedDevice("pi4", tracker.addr, key=key, sysroot=sysroot):
            out = {}
            for name, tar in (("digits-bnn binary", "bnn-pi4.tar"), ("digits-cnn float", "cnn-pi4.tar")):
                session = connect(tracker=tracker.addr, key=key, timeout=120)
                res = run_artifact(work / tar, x, repeat=repeat, session=session)
                out[name] = {"median_ms": round(res.latency_summary()["median"], 3), "threads": res.threads}
                del session
    finally:
        tracker.stop()
    out["float_over_binary"] = round(out["digits-cnn float"]["median_ms"] / out["digits-bnn binary"]["median_ms"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--layers", type=int, default=4, help="binary conv layers in the synthetic stack")
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--pi4-emulated", action="store_true",
                    help="also run the digits pair on an emulated pi4 over RPC")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bnn.json"))
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    from tvmedge import zoo
    from tvmedge.binary.digits_bnn import held_out_accuracy
    from tvmedge.binary.lower import to_imported_model
    from tvmedge.build import compile_model
    from tvmedge.frontend import load_model
    from tvmedge.target import resolve

    host = resolve("host")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tvmedge-bnn-") as tmp:
        work = Path(tmp)

        def from_onnx(onnx_path: Path, tar: str):
            def build() -> Path:
                compile_model(load_model(onnx_path), host, work / tar)
                return work / tar
            return build

        def from_bnn(model: nn.Module, shape: tuple[int, ...], tar: str):
            def build() -> Path:
                compile_model(to_imported_model(model, shape), host, work / tar)
                return work / tar
            return build

        # ---- digits
        bnn = zoo.get("digits-bnn").build()
        cnn = zoo.get("digits-cnn").build()
        x = zoo.example_input(zoo.get("digits-bnn")).numpy()
        bnn_onnx = export_onnx(bnn, x.shape, work / "digits_bnn.onnx")
        cnn_onnx = export_onnx(cnn, x.shape, work / "digits_cnn.onnx")
        acc = {"digits-bnn": held_out_accuracy(bnn), "digits-cnn": held_out_accuracy(cnn)}
        rows.append(measure("digits-bnn", "binary (packed bits)", from_bnn(bnn, x.shape, "bnn.tar"), x,
                            args.threads, args.repeat))
        rows.append(measure("digits-bnn", "float simulation (ONNX)", from_onnx(bnn_onnx, "bnn_f.tar"), x,
                            args.threads, args.repeat, bnn_onnx))
        rows.append(measure("digits-cnn", "float", from_onnx(cnn_onnx, "cnn.tar"), x, args.threads,
                            args.repeat, cnn_onnx))

        # ---- synthetic binary conv stack
        shape = (1, args.channels, args.size, args.size)
        name = f"{args.layers}x bconv3x3 {args.channels}ch {args.size}x{args.size}"
        xs = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        sb = synthetic_stack(args.layers, args.channels, binary=True)
        sf = synthetic_stack(args.layers, args.channels, binary=False)
        sb_onnx = export_onnx(sb, shape, work / "stack_bnn.onnx")
        sf_onnx = export_onnx(sf, shape, work / "stack_float.onnx")
        rows.append(measure(name, "binary (packed bits)", from_bnn(sb, shape, "sb.tar"), xs,
                            args.threads, args.repeat))
        rows.append(measure(name, "float twin", from_onnx(sf_onnx, "sf.tar"), xs, args.threads,
                            args.repeat, sf_onnx))

        emulated = run_emulated_pi4(bnn, work, args.repeat) if args.pi4_emulated else None

    # Correctness beside speed: the binary artifacts against PyTorch.
    with torch.no_grad():
        ref_digits = bnn(torch.from_numpy(x)).numpy()
        ref_stack = sb(torch.from_numpy(xs)).numpy()
    checks = {
        "digits-bnn max |tvm - torch|": float(np.abs(rows[0]["output"] - ref_digits).max()),
        "stack max |tvm - torch| / max|torch|": float(np.abs(rows[3]["output"] - ref_stack).max()
                                                      / np.abs(ref_stack).max()),
        "stack float-simulated ONNX exported": sb_onnx.name,
    }
    for r in rows:
        del r["output"]

    def ref_of(model: str) -> float:
        return next(r["tvm_ms"]["median"] for r in rows if r["model"] == model and r["kind"].startswith("binary"))

    table = Table(title=f"binary vs float, host CPU, {args.threads} threads (median ms)")
    for col in ("model", "variant", "TVM ms", "x vs binary", "ORT ms", "x vs binary (ORT)", "compile s"):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for r in rows:
        b = ref_of(r["model"]) if r["model"] != "digits-cnn" else ref_of("digits-bnn")
        t = r["tvm_ms"]["median"]
        ort = r.get("onnxruntime_ms", {}).get("median")
        r["float_over_binary_tvm"] = round(t / b, 2)
        if ort is not None:
            r["float_over_binary_ort"] = round(ort / b, 2)
        table.add_row(r["model"], r["kind"], f"{t:.3f}", f"{t / b:.2f}",
                      f"{ort:.3f}" if ort is not None else "-", f"{ort / b:.2f}" if ort is not None else "-",
                      f"{r['compile_s']:.1f}")
    console = Console(width=150)
    console.print(table)
    console.print(f"held-out accuracy: digits-bnn {acc['digits-bnn']:.4f}, digits-cnn {acc['digits-cnn']:.4f}")
    for k, v in checks.items():
        console.print(f"{k}: {v}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "host": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "threads": args.threads, "repeat": args.repeat, "accuracy": acc, "checks": checks,
        "note": "TVM float kernels untuned; ONNX Runtime given as the tuned float reference. "
                "Ratios > 1 mean the binary artifact is faster.",
        "rows": rows, "emulated_pi4": emulated, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2))
    if emulated is not None:
        console.print(f"emulated pi4 (qemu, relative only): {emulated}")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
