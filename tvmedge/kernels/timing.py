"""The timed benchmark loop: each shape on each usable backend and on numpy fp32, one row each.

Backend times are wall-clock per call from numpy in to numpy out (OpenCL / CuPy include
host<->device copies; their kernel-only time is reported separately as ``kernel_ms``).
Medians over ``repeat`` samples; a sample averages enough calls to last >= 20 ms.
Every backend result is checked bit-exact against the numpy reference before it is timed.
Backends are driven only through the interface all backend modules share (see
:mod:`tvmedge.kernels`): the % of peak is given where ``on_cpu()`` says the CPU peak applies.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from . import workload
from ..core.schema import latency_block
from .machine import machine_info
from .probe import usable_backends

MIN_SAMPLE_S = 0.02


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
    return {"latency_ms": latency_block(samples * 1e3),
            "p10_ms": float(np.percentile(samples, 10) * 1e3)}


def run_bench(kernel: str, backends: list[str], shapes: list, repeat: int = 10,
              warmup: int = 2) -> dict:
    """Benchmark ``kernel`` on ``backends`` x ``shapes`` plus numpy fp32 of the same shapes.

    ``shapes`` are strings (see :func:`~tvmedge.kernels.workload.parse_shape`) or already parsed
    dicts. Returns a JSON-able dict: ``machine`` (peak model), ``rows`` (one per shape x backend,
    numpy fp32 included) and ``skipped`` (backend -> reason).
    """
    workload.check_kernel(kernel)
    parsed = [workload.parse_shape(kernel, s) if isinstance(s, str) else s for s in shapes]
    machine = machine_info()
    peak = machine["peak_binary_gops"]
    live, skipped = usable_backends(backends)
    rows: list[dict] = []
    rng = np.random.default_rng(0)
    for s in parsed:
        d = workload.make_inputs(kernel, s, rng)
        ops = workload.op_count(kernel, s)
        base = _stats(time_call(workload.fp32_baseline(kernel, s, d), repeat, warmup))
        base_s = base["latency_ms"]["median"] / 1e3
        rows.append({"shape": s["name"], "backend": "numpy_fp32", "status": "ok", **base,
                     "gops": ops / base_s / 1e9, "speedup_vs_numpy_fp32": 1.0,
                     "frac_peak": None, "intensity": ops / workload.fp32_bytes(kernel, s),
                     "verified": None, "kernel_ms": None})
        for name, mod in live:
            call = workload.backend_call(kernel, s, d, mod)
            try:
                verified = workload.verify(kernel, s, d, call(), rng)
                st = _stats(time_call(call, repeat, warmup))
            except Exception as e:
                rows.append({"shape": s["name"], "backend": name, "status": "error",
                             "reason": f"{type(e).__name__}: {e}"})
                continue
            kt = mod.last_kernel_seconds()
            sec = st["latency_ms"]["median"] / 1e3
            rows.append({"shape": s["name"], "backend": name, "status": "ok", **st,
                         "gops": ops / sec / 1e9, "speedup_vs_numpy_fp32": base_s / sec,
                         "frac_peak": (ops / sec / 1e9) / peak if mod.on_cpu() else None,
                         "intensity": ops / workload.binary_bytes(kernel, s), "verified": verified,
                         "kernel_ms": kt * 1e3 if kt else None})
    return {"kernel": kernel, "machine": machine, "baseline": workload.BASELINES[kernel],
            "ops_counting": "2 binary ops per bit pair (xnor + popcount-accumulate); "
                            "fp32 baseline: 2 FLOPs per multiply-add",
            "repeat": repeat, "warmup": warmup, "rows": rows, "skipped": skipped}


def failed_rows(result: dict) -> list[dict]:
    """Rows of a :func:`run_bench` result whose backend crashed or gave a wrong result."""
    return [r for r in result["rows"] if r["status"] != "ok" or r.get("verified") is False]
