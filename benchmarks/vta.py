"""int8 models on the simulated VTA-style accelerator (1x16x16 and 1x32x32) vs the host CPU int8.

Per zoo model (digits-cnn and shapes-seg calibrated on their own data, resnet18 with random
weights on random inputs), the int8 quantization is compiled for each VTA description
(``targets/vta-pynq.json``, 1x16x16 at 100 MHz; ``targets/vta-ultra96.json``, 1x32x32 at
300 MHz) and for the host. Reported per configuration:

* the layers offloaded (and those left on the CPU, with why);
* the accelerator's estimated latency and FPS for the offloaded layers - from the timing
  model, SIMULATED, not measured on an FPGA (``--tune-trials N``: after searching each
  layer's tiling with N timing-model trials, as ``tvmedge tune --target vta-*`` does);
* GEMM utilisation: issued MACs (padding lanes of partial blocks included) and useful
  MACs (the layers' own) per cycle, over the core's BLOCK_IN x BLOCK_OUT peak;
* bytes moved by the DMA (loads + stores);
* the same layers on the board's host CPU, a roofline estimate from the description
  (cores x clock x int8 MACs/cycle; an estimate, not a measurement);
* the whole int8 model compiled for and measured on THIS machine (x86, the same int8
  graph): the only measured number here. The machine is shared and loaded: read it as a
  reference point, not a board figure.

    .venv/bin/python benchmarks/vta.py [--models digits-cnn,shapes-seg,resnet18] [--tune-trials 0]
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
CONFIGS = ("vta-pynq", "vta-ultra96")


def _quantized(name: str, tmp: Path, calib_size: int):
    import numpy as np

    from tvmedge import zoo
    from tvmedge.frontend import load_model
    from tvmedge.optimize import data as data_mod
    from tvmedge.optimize.data import Dataset
    from tvmedge.optimize.quantize import quantize

    model = load_model(zoo.export(name, tmp / f"{name}.onnx"))
    if name in TRAINED:
        calib = data_mod.load(TRAINED[name], model, "calib", limit=calib_size)
    else:
        rng = np.random.default_rng(0)
        spec = model.inputs[0]
        calib = Dataset(name="random", samples=[{spec.name: rng.normal(size=spec.shape).astype(np.float32)}
                                                for _ in range(max(2, calib_size // 8))])
    q, _ = quantize(model, calib, observer="minmax", progress=False)
    return q


def _row(name: str, cfg_name: str, info: dict[str, Any], accel: Any, tuned: bool) -> dict[str, Any]:
    from tvmedge.vta.tune import host_cpu_ms

    off = [r for r in info["layers"] if r["where"] != "cpu"]
    cycles = sum(r["estimate"]["cycles"] for r in off)
    peak = accel.block_in * accel.block_out
    issued = sum(r["estimate"]["macs"] for r in off)
    useful = sum(r["macs"] for r in off)
    cpu_est = host_cpu_ms(useful, accel) or 0.0  # the same layers on the board's CPU (roofline)
    ms = cycles / (accel.clock_mhz * 1e3)
    return {"model": name, "config": cfg_name, "core": f"1x{accel.block_in}x{accel.block_out}",
            "clock_mhz": accel.clock_mhz, "tuned": tuned, "layers_total": len(info["layers"]),
            "offloaded": [r["layer"] for r in off], "on_cpu": info["on_cpu"],
            "accelerator_ms_simulated": ms, "accelerator_fps_simulated": 1e3 / ms if ms else None,
            "gemm_utilisation_issued": issued / max(1, cycles * peak), "gemm_utilisation_useful": useful / max(1, cycles * peak),
            "bytes_moved": sum(r["estimate"]["bytes_loaded"] + r["estimate"]["bytes_stored"] for r in off),
            "board_cpu_ms_roofline_estimate": cpu_est, "board_cpu": accel.host_cpu.get("name")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-cnn,shapes-seg,resnet18")
    ap.add_argument("--tune-trials", type=int, default=0, help="timing-model trials per layer (0: default tilings)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS / "vta.json"))
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    from rich.console import Console
    from rich.table import Table

    from tvmedge.build import compile_model
    from tvmedge.devices import accelerator
    from tvmedge.run import run_artifact
    from tvmedge.target import resolve
    from tvmedge.vta.offload import offload, offloadable_layers
    from tvmedge.vta.tune import choices, tune_layers

    console = Console(width=170)
    rows: list[dict[str, Any]] = []
    host_ms: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tvmedge-bench-vta-") as tmpd:
        tmp = Path(tmpd)
        for name in args.models.split(","):
            t0 = time.time()
            q = _quantized(name, tmp, args.calib_size)
            compile_model(q, resolve("host"), tmp / f"{name}-host.tar")
            res = run_artifact(tmp / f"{name}-host.tar", repeat=args.repeat, threads=args.threads)
            host_ms[name] = res.latency_summary()["median"]
            for cfg_name in CONFIGS:
                accel = accelerator(cfg_name)
                records = None
                if args.tune_trials:
                    db = tmp / f"db-{cfg_name}"
                    tune_layers(offloadable_layers(q, accel), accel, db, args.tune_trials, progress=False)
                    records = choices(db, cfg_name)
                _, info = offload(q, accel, records, warn=lambda m: None)
                row = _row(name, cfg_name, info, accel, bool(args.tune_trials))
                row["host_int8_ms_measured_here"] = host_ms[name]
                rows.append(row)
            console.print(f"{name}: done in {time.time() - t0:.0f} s", style="dim")

    table = Table(title="int8 on the SIMULATED VTA-style accelerator (timing model, not an FPGA) vs host CPU int8")
    for col in ("model", "core", "offloaded", "accel ms (sim)", "accel FPS (sim)", "GEMM util issued/useful",
                "MB moved", "board CPU ms (roofline est.)", "this host int8 ms (measured)"):
        table.add_column(col, justify="left" if col in ("model", "core") else "right")
    for r in rows:
        table.add_row(r["model"], f"{r['core']} @{r['clock_mhz']:g}MHz", f"{len(r['offloaded'])}/{r['layers_total']}",
                      f"{r['accelerator_ms_simulated']:.3f}", f"{r['accelerator_fps_simulated']:.0f}",
                      f"{100 * r['gemm_utilisation_issued']:.0f}% / {100 * r['gemm_utilisation_useful']:.0f}%",
                      f"{r['bytes_moved'] / 1e6:.2f}", f"{r['board_cpu_ms_roofline_estimate']:.2f}",
                      f"{r['host_int8_ms_measured_here']:.3f}")
    console.print(table)
    for r in rows:
        if r["on_cpu"]:
            console.print(f"{r['model']} on {r['config']}: on the CPU: "
                          + "; ".join(f"{c['layer']} ({c['reason']})" for c in r["on_cpu"]), markup=False)
    console.print("accelerator figures are SIMULATED (tvmedge's timing model of the design in targets/vta-*.json); "
                  "the accelerator time covers the offloaded layers only (the host part - quantize, dequantize, "
                  "pooling, residual adds - is not in it). 'this host' is this x86 machine, loaded by other jobs.",
                  markup=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": args.threads,
                               "simulated": True, "tune_trials": args.tune_trials, "rows": rows,
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
