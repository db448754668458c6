"""Output of kernel benchmark results: a rich table, a roofline plot, one JSON object.

Each function takes what :func:`tvmedge.kernels.timing.run_bench` returns (the plot also a list
of them, e.g. xnor_gemm and bconv2d on one chart).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from rich.table import Table

from ..core.jsonio import dumps
from ..core.schema import device_block, envelope
from ..core.progress import console as make_console

MARKERS = {"numpy_fp32": "s", "numba": "o", "opencl": "^", "cupy": "D", "tvm": "v"}


def print_table(result: dict, console: Any = None) -> None:
    """Rich table of one bench result, with the peak model underneath."""
    console = console or make_console()
    m = result["machine"]
    t = Table(title=f"{result['kernel']} on {m.get('cpu', 'this CPU')}: median of {result['repeat']} samples")
    for col in ("shape", "backend", "median ms", "p10-p90 ms", "GOP/s", "x numpy fp32",
                "% peak", "exact", "kernel ms"):
        t.add_column(col, justify="left" if col in ("shape", "backend") else "right")
    for r in result["rows"]:
        if r["status"] != "ok":
            t.add_row(r["shape"], r["backend"], "error", r.get("reason", "")[:60], "", "", "", "", "")
            continue
        t.add_row(r["shape"], r["backend"], f"{r['latency_ms']['median']:.3f}",
                  f"{r['p10_ms']:.3f}-{r['latency_ms']['p90']:.3f}", f"{r['gops']:.0f}",
                  f"{r['speedup_vs_numpy_fp32']:.1f}",
                  "" if r["frac_peak"] is None else f"{100 * r['frac_peak']:.0f}%",
                  "" if r["verified"] is None else ("yes" if r["verified"] else "NO"),
                  "" if not r.get("kernel_ms") else f"{r['kernel_ms']:.3f}")
    console.print(t)
    for name, why in result["skipped"].items():
        console.print(f"skipped {name}: {why}")
    console.print(f"peak: {m['peak_formula']} (clock: cpuinfo {m['clock_ghz_cpuinfo']} GHz, "
                  f"measured {m['clock_ghz_measured'] and round(m['clock_ghz_measured'], 2)} GHz; "
                  f"{m['popcount_unit']}); threads {m['threads']}, BLAS threads {m['blas_threads']}")
    if m.get("mix_bound_gops"):
        console.print(f"instruction-mix bound: {m['mix_bound_gops']:.0f} GOP/s ({m['mix_bound_note']})")
    console.print(f"baseline: {result['baseline']}; memory bandwidth "
                  f"{m['mem_bw_gbs'] and round(m['mem_bw_gbs'], 1)} GB/s ({m['mem_bw_source']})")


def plot_roofline(results: dict | list[dict], path: str) -> str:
    """Roofline PNG (arithmetic intensity vs GOP/s, log-log) of one or more bench results."""
    import matplotlib  # imported here: ~0.3 s, and only a --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [results] if isinstance(results, dict) else list(results)
    m = results[0]["machine"]
    pts = [(res["kernel"], r) for res in results for r in res["rows"] if r["status"] == "ok"]
    xs = [r["intensity"] for _, r in pts] or [1.0]
    lo, hi = min(xs) / 4, max(xs) * 4
    xi = np.logspace(np.log10(lo), np.log10(hi), 200)
    fig, ax = plt.subplots(figsize=(12, 6))
    peak = m["peak_binary_gops"]
    bw = m.get("mem_bw_gbs")
    roof = np.minimum(peak, bw * xi) if bw else np.full_like(xi, peak)
    ax.plot(xi, roof, "k-", lw=2, label=f"binary peak {peak:.0f} GOP/s"
            + (f", memory {bw:.0f} GB/s" if bw else ""))
    if m.get("mix_bound_gops"):
        mix = np.minimum(m["mix_bound_gops"], bw * xi) if bw else np.full_like(xi, m["mix_bound_gops"])
        ax.plot(xi, mix, "k--", lw=1, label=f"xor+popcnt+add issue bound {m['mix_bound_gops']:.0f} GOP/s")
    for kernel, r in pts:
        ax.scatter(r["intensity"], r["gops"], marker=MARKERS.get(r["backend"], "x"), s=45,
                   label=f"{kernel} {r['shape']} {r['backend']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (ops per byte of compulsory traffic)")
    ax.set_ylabel("GOP/s (binary ops; numpy fp32: GFLOP/s)")
    ax.set_title(f"XNOR kernels roofline, {m['threads']} threads @ {m['clock_ghz_used']:.2f} GHz")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def to_json(result: dict) -> str:
    """One bench result as one line of strict JSON in the tvmedge/1 schema (as every ``--json`` prints)."""
    return dumps(envelope("kernels bench", {**result, "device": device_block("host", "host", cpu=result["machine"].get("cpu"))}))
