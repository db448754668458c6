"""XNOR GEMM and binary conv2d in CUDA C (``kernels/xnor.cu``) through CuPy ``RawKernel``.

Needs an NVIDIA GPU to run; without one :func:`available` says why and :func:`compile_ptx`
still compiles the source to PTX with NVRTC (``cupy.cuda.nvrtc``, which works without a
device or driver), so the kernel is at least checked to build. Packages: ``cupy-cuda12x`` and
``nvidia-cuda-nvrtc-cu12`` (CUDA 12 NVRTC still targets sm_53 / sm_72 Jetsons; CUDA 13 does not).

Inputs and results are numpy arrays; each call copies the packed operands to the GPU and the
result back, so wall time includes transfers; :func:`last_kernel_seconds` gives the kernel alone
(CUDA events). Bit packing is the shared numpy packer of :mod:`tvmedge.kernels.pack`; B is
transposed on the host to [KW, N] for coalesced loads.
"""

from __future__ import annotations

import numpy as np

from . import kernel_source
from . import pack as _pack
from .pack import PackedConvWeight

NAME = "cupy"
TM = 4  # rows of A per thread (the -DTM of xnor.cu)
BLOCK = (32, 8)  # threads per block: 32 columns (one warp) x 8 row tiles

_state: dict = {}
_last_kernel_s: float | None = None


def compile_ptx(arch: str = "compute_72", options: tuple[str, ...] = ()) -> str:
    """Compile ``xnor.cu`` with NVRTC for ``arch`` (e.g. compute_53, compute_72) -> PTX text."""
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(kernel_source("xnor.cu"), "xnor.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", f"-DTM={TM}", *options])
        except Exception as e:
            raise RuntimeError(f"NVRTC failed for {arch}: {e}\n{nvrtc.getProgramLog(prog)}") from e
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


def available() -> tuple[bool, str]:
    """(True, GPU name) when CuPy imports and sees a CUDA device, else (False, reason)."""
    try:
        import cupy
    except Exception as e:
        return False, f"cupy not importable ({type(e).__name__}: {e}); pip install cupy-cuda12x"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return False, f"no usable CUDA device ({type(e).__name__}: {e})"
    if count < 1:
        return False, "no CUDA device"
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return True, f"{name} (sm_{props['major']}{props['minor']}, {props['multiProcessorCount']} SMs)"


def on_cpu() -> bool:
    """Never: the kernels run on the CUDA device."""
    return False


def last_kernel_seconds() -> float | None:
    """GPU time of the last ``xnor_gemm`` kernel, from CUDA events."""
    return _last_kernel_s


def _kernel():
    if not _state:
        import cupy

        _state["kernel"] = cupy.RawKernel(kernel_source("xnor.cu"), "xnor_gemm",
                                          options=(f"-DTM={TM}",))
    return _state["kernel"]


def xnor_gemm(a_packed: np.ndarray, b_packed: np.ndarray, k_bits: int) -> np.ndarray:
    """C[m, n] = K - 2*popcount(a[m] XOR b[n]) for packed a [M,W], b [N,W]; int32 [M, N]."""
    global _last_kernel_s
    import cupy

    a = np.ascontiguousarray(a_packed)
    b = np.ascontiguousarray(b_packed)
    _pack.check_gemm_operands(a, b, k_bits)
    m, kw = a.shape
    n = b.shape[0]
    if not (m and n):
        return np.empty((m, n), np.int32)
    mp = -(-m // TM) * TM
    np_ = -(-n // BLOCK[0]) * BLOCK[0]
    a_d = cupy.zeros((mp, kw), cupy.uint64)
    a_d[:m] = cupy.asarray(a)
    bt_d = cupy.zeros((kw, np_), cupy.uint64)
    bt_d[:, :n] = cupy.asarray(b).T
    c_d = cupy.empty((m, n), cupy.int32)
    grid = (np_ // BLOCK[0], -(-(mp // TM) // BLOCK[1]))
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    _kernel()(grid, BLOCK, (a_d, bt_d, c_d, np.int32(m), np.int32(n), np.int32(np_),
                            np.int32(kw), np.int32(k_bits)))
    stop.record()
    stop.synchronize()
    _last_kernel_s = cupy.cuda.get_elapsed_time(start, stop) * 1e-3
    return cupy.asnumpy(c_d)


def bconv2d(x: np.ndarray, w: np.ndarray | PackedConvWeight, stride: int = 1, padding: int = 0,
            pad_value: int = 0) -> np.ndarray:
    """Binary conv2d, NCHW int32 (padding semantics: see :mod:`tvmedge.kernels.pack`)."""
    return _pack.bconv2d_gemm(x, w, stride, padding, pad_value, xnor_gemm)
