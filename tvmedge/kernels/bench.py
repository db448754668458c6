"""Micro-benchmarks of the binarized kernels: timing, peak/bandwidth model, table, roofline, CLI.

What is counted (as in BNN papers): one XNOR and one popcount-accumulate per bit pair, so an
XNOR GEMM of M x N x K bits is ``2*M*N*K`` binary ops, a binary conv ``2*N*O*OH*OW*C*KH*KW``;
the numpy fp32 baseline of the same shape does the same number of FLOPs (multiply + add).

Binary-op peak of this CPU = cores x clock x popcount bits per cycle per core x 2 ops/bit pair.
On AVX-512 VPOPCNTDQ cores (Zen 4, Ice Lake and later) one ``vpopcntq zmm`` (512 bits) issues
per cycle; Zen 4 executes it as two 256-bit halves on its two popcount-capable pipes, and a probe
of independent ``vpopcntq zmm`` on this host measured 1.00/cycle (2.00/cycle for ymm). Without
VPOPCNTDQ the model falls back to scalar ``popcnt`` (64 bits/cycle). The clock is the higher of
``/proc/cpuinfo`` "cpu MHz" (the nominal clock under a hypervisor) and a measured one (a chain
of dependent 1-cycle integer ops timed in Numba), because a boosting core runs well above its
nominal clock and a peak at the nominal clock would overstate the fraction reached.
The xor/popcnt/add instruction mix itself caps a kernel below that peak: on Zen 4 the three
512-bit ops take 1.5 cycles on the four 256-bit pipes (measured 0.667 triples/cycle), i.e. 2/3 of
the popcount peak; it is drawn as a second roof.

Memory bandwidth (the slanted roof) is a STREAM-style triad ``a = b + s*c`` over three 64 MiB
float64 arrays with Numba on all threads, counted as 24 bytes per element (no write-allocate).
Arithmetic intensity uses compulsory traffic only: packed operands in, int32 result out.

Backend times are wall-clock per call from numpy in to numpy out (OpenCL / CuPy include
host<->device copies; their kernel-only time is reported separately as ``kernel_ms``).
Medians over ``repeat`` samples; a sample averages enough calls to last >= 20 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from typing import Any, Callable

import numpy as np

from . import BACKENDS, backend_status, get_backend
from . import pack as _pack

KERNELS = ("xnor_gemm", "bconv2d")
DEFAULT_SHAPES = {
    "xnor_gemm": ["1024x1024x1024", "2048x2048x2048"],
    "bconv2d": ["1x64x56x56-64x3x3-s1-p1", "1x128x28x28-128x3x3-s1-p1",
                "1x256x14x14-256x3x3-s2-p1"],
}
MIN_SAMPLE_S = 0.02
_machine_cache: dict | None = None


# ----------------------------------------------------------------------------- shapes
def parse_shape(kernel: str, text: str) -> dict:
    """``MxNxK`` for xnor_gemm (K in bits); ``NxCxHxW-OxKHxKW[-sS][-pP]`` for bconv2d."""
    text = text.strip().lower()
    if kernel == "xnor_gemm":
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
        if not m:
            raise ValueError(f"xnor_gemm shape must be MxNxK (e.g. 1024x1024x1024), got {text!r}")
        mm, n, k = (int(g) for g in m.groups())
        if min(mm, n, k) < 1:
            raise ValueError(f"shape dimensions must be >= 1: {text!r}")
        return {"name": text, "M": mm, "N": n, "K": k}
    if kernel == "bconv2d":
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)-(\d+)x(\d+)x(\d+)(?:-s(\d+))?(?:-p(\d+))?", text)
        if not m:
            raise ValueError("bconv2d shape must be NxCxHxW-OxKHxKW[-sS][-pP] "
                             f"(e.g. 1x64x56x56-64x3x3-s1-p1), got {text!r}")
        n, c, h, w, o, kh, kw = (int(g) for g in m.groups()[:7])
        s, p = int(m.group(8) or 1), int(m.group(9) or 0)
        oh, ow = _pack.conv_out_hw(h, w, kh, kw, s, p)
        return {"name": text, "N": n, "C": c, "H": h, "W": w, "O": o, "KH": kh, "KW": kw,
                "stride": s, "padding": p, "OH": oh, "OW": ow}
    raise ValueError(f"unknown kernel {kernel!r}; choose from {', '.join(KERNELS)}")


def _ops(kernel: str, s: dict) -> int:
    if kernel == "xnor_gemm":
        return 2 * s["M"] * s["N"] * s["K"]
    return 2 * s["N"] * s["O"] * s["OH"] * s["OW"] * s["C"] * s["KH"] * s["KW"]


def _bytes(kernel: str, s: dict) -> int:
    """Compulsory traffic of the binary kernel: packed inputs in, int32 out."""
    if kernel == "xnor_gemm":
        return 8 * _pack.n_words(s["K"]) * (s["M"] + s["N"]) + 4 * s["M"] * s["N"]
    k = s["C"] * s["KH"] * s["KW"]
    return (4 * s["N"] * s["C"] * s["H"] * s["W"] + 8 * s["O"] * _pack.n_words(k)
            + 4 * s["N"] * s["O"] * s["OH"] * s["OW"])


def _fp32_bytes(kernel: str, s: dict) -> int:
    if kernel == "xnor_gemm":
        return 4 * (s["M"] * s["K"] + s["K"] * s["N"] + s["M"] * s["N"])
    k = s["C"] * s["KH"] * s["KW"]
    return 4 * (s["N"] * s["C"] * s["H"] * s["W"] + s["O"] * k + s["N"] * s["O"] * s["OH"] * s["OW"])


# ----------------------------------------------------------------------------- machine model
def _cpu_flags_and_mhz() -> tuple[set[str], float | None]:
    flags: set[str] = set()
    mhz: list[float] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = set(val.split())
                elif key.strip() == "cpu MHz":
                    mhz.append(float(val))
    except OSError:
        pass
    return flags, (max(mhz) if mhz else None)


def _measured_ghz() -> float | None:
    try:
        from .numba_backend import measure_clock_ghz

        return measure_clock_ghz()
    except Exception:
        return None


def _stream_triad_gbs() -> float | None:
    try:
        from .numba_backend import stream_triad_gbs

        return stream_triad_gbs()
    except Exception:
        return None


def _threads() -> int:
    try:
        import numba

        return int(numba.get_num_threads())
    except Exception:
        return len(os.sched_getaffinity(0))


def _blas_threads() -> int | None:
    try:
        from threadpoolctl import threadpool_info

        return max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"),
                   default=None)
    except Exception:
        return None


def machine_info() -> dict:
    """Cores, clocks, the binary-op peak and its formula, memory bandwidth (measured once)."""
    global _machine_cache
    if _machine_cache is not None:
        return _machine_cache
    flags, mhz = _cpu_flags_and_mhz()
    ghz_meas = _measured_ghz()
    ghz_info = mhz / 1000 if mhz else None
    ghz = max(g for g in (ghz_meas, ghz_info, 1.0) if g)
    cores = len(os.sched_getaffinity(0))
    threads = _threads()
    vpop = "avx512_vpopcntdq" in flags
    bits = 512 if vpop else 64
    units = min(cores, threads)
    peak = units * ghz * bits * 2
    _machine_cache = {
        "cores": cores,
        "threads": threads,
        "blas_threads": _blas_threads(),
        "clock_ghz_cpuinfo": ghz_info,
        "clock_ghz_measured": ghz_meas,
        "clock_ghz_used": ghz,
        "popcount_bits_per_cycle_per_core": bits,
        "popcount_unit": "vpopcntq zmm, 1/cycle" if vpop else "scalar popcnt r64, 1/cycle",
        "peak_binary_gops": peak,
        "peak_formula": f"{units} cores x {ghz:.2f} GHz x {bits} bits/cycle x 2 ops/bit pair "
                        f"= {peak:.0f} GOP/s",
        "mix_bound_gops": peak * 2 / 3 if vpop else None,
        "mix_bound_note": "xor+popcnt+add on 4x256-bit pipes: 1.5 cycles per 512-bit pair "
                          "(Zen 4), 2/3 of the popcount peak" if vpop else None,
        "mem_bw_gbs": _stream_triad_gbs(),
        "mem_bw_source": "STREAM-style triad, 3 x 64 MiB float64, numba prange, 24 B/element",
    }
    return _machine_cache


# ----------------------------------------------------------------------------- timing
def time_call(fn: Callable[[], Any], repeat: int, warmup: int) -> np.ndarray:
    """Seconds per call for ``repeat`` samples after ``warmup`` calls (samples >= 20 ms)."""
    for _ in range(max(0, warmup)):
        fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    number = int(min(1000, max(1, MIN_SAMPLE_S // one)))
    samples = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number)
    return np.asarray(samples)


def _stats(samples: np.ndarray) -> dict:
    return {"median_ms": float(np.median(samples) * 1e3),
            "p10_ms": float(np.percentile(samples, 10) * 1e3),
            "p90_ms": float(np.percentile(samples, 90) * 1e3),
            "samples": int(samples.size)}


def _inputs(kernel: str, s: dict, rng: np.random.Generator) -> dict:
    if kernel == "xnor_gemm":
        a = rng.choice(np.array([-1, 1], np.float32), size=(s["M"], s["K"]))
        b = rng.choice(np.array([-1, 1], np.float32), size=(s["N"], s["K"]))
        return {"a": a, "bT": np.ascontiguousarray(b.T), "a_packed": _pack.pack_bits(a),
                "b_packed": _pack.pack_bits(b)}
    x = rng.standard_normal((s["N"], s["C"], s["H"], s["W"])).astype(np.float32)
    w = rng.standard_normal((s["O"], s["C"], s["KH"], s["KW"])).astype(np.float32)
    return {"x": x, "w": w, "w_packed": _pack.pack_conv_weight(w),
            "w_fp32": np.ascontiguousarray(np.sign(w).reshape(s["O"], -1).T)}


def _fp32_baseline(kernel: str, s: dict, d: dict) -> Callable[[], Any]:
    if kernel == "xnor_gemm":
        return lambda: d["a"] @ d["bT"]

    def conv():  # im2col (a copy) + one fp32 matmul, as the binary path does
        xp = np.pad(d["x"], ((0, 0), (0, 0), (s["padding"],) * 2, (s["padding"],) * 2))
        win = np.lib.stride_tricks.sliding_window_view(xp, (s["KH"], s["KW"]), axis=(2, 3))
        st = s["stride"]
        win = win[:, :, ::st, ::st][:, :, :s["OH"], :s["OW"]].transpose(0, 2, 3, 1, 4, 5)
        return win.reshape(s["N"] * s["OH"] * s["OW"], -1) @ d["w_fp32"]

    return conv


def _verify(kernel: str, s: dict, d: dict, out: np.ndarray, rng: np.random.Generator) -> bool:
    if kernel == "xnor_gemm":
        rows = rng.choice(s["M"], size=min(16, s["M"]), replace=False)
        ref = _pack.xnor_gemm_ref(d["a_packed"][rows], d["b_packed"], s["K"])
        return bool(out.shape == (s["M"], s["N"]) and np.array_equal(out[rows], ref))
    if "ref" not in d:
        d["ref"] = _pack.bconv2d_ref(d["x"], d["w"], s["stride"], s["padding"])
    return bool(np.array_equal(out, d["ref"]))


def run_bench(kernel: str, backends: list[str], shapes: list, repeat: int = 10,
              warmup: int = 2) -> dict:
    """Benchmark ``kernel`` on ``backends`` x ``shapes`` plus numpy fp32 of the same shapes.

    ``shapes`` are strings (see :func:`parse_shape`) or already parsed dicts. Returns a JSON-able
    dict: ``machine`` (peak model), ``rows`` (one per shape x backend, numpy fp32 included) and
    ``skipped`` (backend -> reason).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    parsed = [parse_shape(kernel, s) if isinstance(s, str) else s for s in shapes]
    machine = machine_info()
    peak = machine["peak_binary_gops"]
    skipped: dict[str, str] = {}
    live: list[tuple[str, Any]] = []
    for name in backends:
        ok, why = backend_status(name)
        if ok:
            live.append((name, get_backend(name)))
        else:
            skipped[name] = why
    rows: list[dict] = []
    rng = np.random.default_rng(0)
    for s in parsed:
        d = _inputs(kernel, s, rng)
        ops = _ops(kernel, s)
        base = _stats(time_call(_fp32_baseline(kernel, s, d), repeat, warmup))
        base_s = base["median_ms"] / 1e3
        rows.append({"shape": s["name"], "backend": "numpy_fp32", "status": "ok", **base,
                     "gops": ops / base_s / 1e9, "speedup_vs_numpy_fp32": 1.0,
                     "frac_peak": None, "intensity": ops / _fp32_bytes(kernel, s),
                     "verified": None, "kernel_ms": None})
        for name, mod in live:
            if kernel == "xnor_gemm":
                def call(mod=mod):
                    return mod.xnor_gemm(d["a_packed"], d["b_packed"], s["K"])
            else:
                def call(mod=mod):
                    return mod.bconv2d(d["x"], d["w_packed"], s["stride"], s["padding"])
            try:
                verified = _verify(kernel, s, d, call(), rng)
                st = _stats(time_call(call, repeat, warmup))
            except Exception as e:
                rows.append({"shape": s["name"], "backend": name, "status": "error",
                             "reason": f"{type(e).__name__}: {e}"})
                continue
            kt = getattr(mod, "last_kernel_seconds", lambda: None)()
            sec = st["median_ms"] / 1e3
            on_cpu = name in ("numba", "opencl", "tvm") and not (
                name == "opencl" and "GPU" in backend_status(name)[1].upper())
            rows.append({"shape": s["name"], "backend": name, "status": "ok", **st,
                         "gops": ops / sec / 1e9, "speedup_vs_numpy_fp32": base_s / sec,
                         "frac_peak": (ops / sec / 1e9) / peak if on_cpu else None,
                         "intensity": ops / _bytes(kernel, s), "verified": verified,
                         "kernel_ms": kt * 1e3 if kt else None})
    baseline = ("numpy float32 matmul (np.matmul on +-1 float32, same M,N,K)" if kernel == "xnor_gemm"
                else "numpy float32 im2col (sliding_window_view copy) + matmul, same conv")
    return {"kernel": kernel, "machine": machine, "baseline": baseline,
            "ops_counting": "2 binary ops per bit pair (xnor + popcount-accumulate); "
                            "fp32 baseline: 2 FLOPs per multiply-add",
            "repeat": repeat, "warmup": warmup, "rows": rows, "skipped": skipped}


# ----------------------------------------------------------------------------- output
def print_table(result: dict, console: Any = None) -> None:
    """Rich table of one :func:`run_bench` result, with the peak model underneath."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m = result["machine"]
    t = Table(title=f"{result['kernel']}: median of {result['repeat']} samples")
    for col in ("shape", "backend", "median ms", "p10-p90 ms", "GOP/s", "x numpy fp32",
                "% peak", "exact", "kernel ms"):
        t.add_column(col, justify="left" if col in ("shape", "backend") else "right")
    for r in result["rows"]:
        if r["status"] != "ok":
            t.add_row(r["shape"], r["backend"], "error", r.get("reason", "")[:60], "", "", "", "", "")
            continue
        t.add_row(r["shape"], r["backend"], f"{r['median_ms']:.3f}",
                  f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}", f"{r['gops']:.0f}",
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
    import matplotlib

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
    markers = {"numpy_fp32": "s", "numba": "o", "opencl": "^", "cupy": "D", "tvm": "v"}
    for kernel, r in pts:
        ax.scatter(r["intensity"], r["gops"], marker=markers.get(r["backend"], "x"), s=45,
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


# ----------------------------------------------------------------------------- CLI
def _backend_list(text: str) -> list[str]:
    names = list(BACKENDS) if text == "all" else [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if bad:
        from ..core.errors import TvmedgeError

        raise TvmedgeError(f"unknown backend {', '.join(bad)}; choose from "
                           f"{', '.join(BACKENDS)} or all")
    return names


def cmd_kernels_bench(args: argparse.Namespace) -> int:
    """``tvmedge kernels bench``: run, print a table (or one JSON object), optionally plot."""
    from ..core.errors import TvmedgeError

    backends = _backend_list(args.backend)
    shapes = args.shapes.split(",") if args.shapes else DEFAULT_SHAPES[args.kernel]
    try:
        parsed = [parse_shape(args.kernel, s) for s in shapes]
    except ValueError as e:
        raise TvmedgeError(str(e)) from e
    if args.repeat < 1 or args.warmup < 0:
        raise TvmedgeError("--repeat must be >= 1 and --warmup >= 0")
    result = run_bench(args.kernel, backends, parsed, repeat=args.repeat, warmup=args.warmup)
    if args.plot:
        result["plot"] = plot_roofline(result, args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
        if args.plot:
            print(f"roofline -> {args.plot}")
    bad = [r for r in result["rows"] if r["status"] != "ok" or r["verified"] is False]
    return 1 if bad else 0


def register_cli(subparsers: Any) -> None:
    """Add ``kernels bench`` to the ``tvmedge`` argparse sub-commands."""
    kp = subparsers.add_parser("kernels", help="hand-written binarized (XNOR/popcount) kernels")
    ks = kp.add_subparsers(dest="kernels_command", required=True)
    p = ks.add_parser("bench", help="time xnor_gemm / bconv2d per backend against numpy fp32")
    p.add_argument("--kernel", choices=KERNELS, default="xnor_gemm")
    p.add_argument("--backend", default="all",
                   help=f"{'|'.join(BACKENDS)}|all, or a comma list (default: all)")
    p.add_argument("--shapes", default=None,
                   help="comma list; xnor_gemm: MxNxK (K in bits), bconv2d: "
                        "NxCxHxW-OxKHxKW[-sS][-pP] (default: "
                        + "; ".join(f"{k}: {','.join(v)}" for k, v in DEFAULT_SHAPES.items()) + ")")
    p.add_argument("--repeat", type=int, default=10, help="timed samples (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a roofline plot")
    p.set_defaults(func=cmd_kernels_bench)
