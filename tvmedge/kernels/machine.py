"""This CPU's roofs for the binarized kernels: binary-op peak, clock, memory bandwidth, threads.

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
The measurements take a few seconds and are made once per process.
"""

from __future__ import annotations

import os

from threadpoolctl import threadpool_info

from ..core.schema import host_cpu

_machine_cache: dict | None = None


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


# The Numba probes live in numba_backend (its jitted code); numba may be missing.
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
        from .numba_backend import threads

        return threads()
    except Exception:
        return len(os.sched_getaffinity(0))


def _blas_threads() -> int | None:
    try:
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
        "cpu": host_cpu(),
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
                          "(as on Zen 4), 2/3 of the popcount peak" if vpop else None,
        "mem_bw_gbs": _stream_triad_gbs(),
        "mem_bw_source": "STREAM-style triad, 3 x 64 MiB float64, numba prange, 24 B/element",
    }
    return _machine_cache
