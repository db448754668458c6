"""XNOR GEMM micro-benchmark: every kernel backend and numpy fp32 at M=N=K=1024 and 2048.

Prints a table, writes ``benchmarks/results/kernels.json`` and a roofline PNG next to it, and
states the goals and whether this run met them:

* the Numba XNOR GEMM is >= 20x faster than numpy float32 matmul of the same shape (same run);
* it reaches >= 50 % of the machine's binary-op peak (model in :mod:`tvmedge.kernels.machine`).

Usage: ``python benchmarks/kernels.py [--repeat N] [--backends numba,opencl] [--conv]``
(``--conv`` adds the default bconv2d layers). Exit status 0 whether or not the goals are met;
1 only if a backend produced a wrong result or crashed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tvmedge.kernels import BACKENDS  # noqa: E402
from tvmedge.kernels.report import plot_roofline, print_table  # noqa: E402
from tvmedge.kernels.timing import failed_rows, run_bench  # noqa: E402
from tvmedge.kernels.workload import DEFAULT_SHAPES  # noqa: E402

GOAL_SPEEDUP = 20.0
GOAL_FRAC_PEAK = 0.5


def goals(result: dict, backend: str = "numba") -> list[dict]:
    """One entry per shape: the two goals for ``backend`` and whether they were met."""
    out = []
    for r in result["rows"]:
        if r["backend"] != backend or r["status"] != "ok":
            continue
        out.append({"shape": r["shape"], "backend": backend,
                    "speedup_vs_numpy_fp32": r["speedup_vs_numpy_fp32"],
                    "speedup_goal_met": r["speedup_vs_numpy_fp32"] >= GOAL_SPEEDUP,
                    "frac_peak": r["frac_peak"],
                    "peak_goal_met": r["frac_peak"] is not None and r["frac_peak"] >= GOAL_FRAC_PEAK,
                    "exact": r["verified"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--conv", action="store_true", help="also benchmark bconv2d layers")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "kernels.json"))
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]

    t0 = time.time()
    results = [run_bench("xnor_gemm", backends, ["1024x1024x1024", "2048x2048x2048"],
                         repeat=args.repeat, warmup=args.warmup)]
    if args.conv:
        results.append(run_bench("bconv2d", backends, DEFAULT_SHAPES["bconv2d"],
                                 repeat=args.repeat, warmup=args.warmup))
    for res in results:
        print_table(res)

    met = goals(results[0])
    print(f"\ngoals (numba xnor_gemm): >= {GOAL_SPEEDUP:.0f}x numpy fp32 and "
          f">= {100 * GOAL_FRAC_PEAK:.0f}% of binary peak "
          f"({results[0]['machine']['peak_binary_gops']:.0f} GOP/s)")
    for g in met:
        pk = "n/a" if g["frac_peak"] is None else f"{100 * g['frac_peak']:.0f}%"
        print(f"  {g['shape']}: {g['speedup_vs_numpy_fp32']:.1f}x "
              f"[{'met' if g['speedup_goal_met'] else 'NOT met'}], {pk} of peak "
              f"[{'met' if g['peak_goal_met'] else 'NOT met'}], exact: {g['exact']}")
    if not met:
        print("  numba backend did not run: goals not evaluated")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    png = os.path.splitext(args.out)[0] + "_roofline.png"
    plot_roofline(results, png)
    doc = {"benchmark": "benchmarks/kernels.py", "seconds": round(time.time() - t0, 1),
           "goals": {"speedup_vs_numpy_fp32": GOAL_SPEEDUP, "frac_binary_peak": GOAL_FRAC_PEAK,
                     "results": met, "all_met": bool(met) and all(
                         g["speedup_goal_met"] and g["peak_goal_met"] for g in met)},
           "results": results, "roofline_png": os.path.relpath(png, ROOT)}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {os.path.relpath(args.out, ROOT)} and {os.path.relpath(png, ROOT)}")
    return 1 if any(failed_rows(res) for res in results) else 0


if __name__ == "__main__":
    sys.exit(main())
