"""XNOR GEMM and binary conv2d in OpenCL C (``kernels/xnor.cl``) through PyOpenCL.

Runs on any OpenCL device; here that is PoCL's CPU device. The first GPU found is preferred,
else the first device of any kind; ``PYOPENCL_CTX`` (PyOpenCL's usual variable, e.g. ``0:0``)
picks one explicitly. Each call copies the packed operands to the device and the int32 result
back, so the wall time includes transfers; :func:`last_kernel_seconds` gives the kernel alone
(from OpenCL profiling events).

Bit packing is the shared numpy packer of :mod:`tvmedge.kernels.pack` (the kernel takes the
same uint64 words); B is transposed on the host to [KW, N] for coalesced loads.
"""

from __future__ import annotations

import os

import numpy as np

from . import kernel_source
from ..core.errors import first_line
from . import pack as _pack
from .pack import PackedConvWeight

NAME = "opencl"
TM = 4  # rows of A per work-item (the -DTM of xnor.cl)
LOCAL_X = 16  # work-items per work-group along N (vectorised by PoCL on CPUs)

_state: dict = {}
_last_kernel_s: float | None = None


def _init() -> dict:
    if _state:
        return _state
    import pyopencl as cl

    if os.environ.get("PYOPENCL_CTX"):
        ctx = cl.create_some_context(interactive=False)
    else:
        devices = [d for p in cl.get_platforms() for d in p.get_devices()]
        if not devices:
            raise RuntimeError("no OpenCL device (install pocl-opencl-icd for a CPU device)")
        gpus = [d for d in devices if d.type & cl.device_type.GPU]
        ctx = cl.Context([(gpus or devices)[0]])
    queue = cl.CommandQueue(ctx, properties=cl.command_queue_properties.PROFILING_ENABLE)
    prog = cl.Program(ctx, kernel_source("xnor.cl")).build(options=[f"-DTM={TM}"])
    _state.update(cl=cl, ctx=ctx, queue=queue, kernel=cl.Kernel(prog, "xnor_gemm"),
                  device=ctx.devices[0])
    return _state


def available() -> tuple[bool, str]:
    """(True, device description) when a device is found and ``xnor.cl`` builds."""
    try:
        st = _init()
    except Exception as e:
        return False, f"{type(e).__name__}: {first_line(e)}"
    d = st["device"]
    return True, f"{d.platform.name} / {d.name} ({d.max_compute_units} compute units)"


def on_cpu() -> bool:
    """Whether the chosen OpenCL device is a CPU (PoCL's, here), from its device type."""
    st = _init()
    return bool(st["device"].type & st["cl"].device_type.CPU)


def last_kernel_seconds() -> float | None:
    """Device time of the last ``xnor_gemm`` kernel launch, from profiling events."""
    return _last_kernel_s


def xnor_gemm(a_packed: np.ndarray, b_packed: np.ndarray, k_bits: int) -> np.ndarray:
    """C[m, n] = K - 2*popcount(a[m] XOR b[n]) for packed a [M,W], b [N,W]; int32 [M, N]."""
    global _last_kernel_s
    a = np.ascontiguousarray(a_packed)
    b = np.ascontiguousarray(b_packed)
    _pack.check_gemm_operands(a, b, k_bits)
    st = _init()
    cl, ctx, queue = st["cl"], st["ctx"], st["queue"]
    m, kw = a.shape
    n = b.shape[0]
    c = np.empty((m, n), np.int32)
    if not (m and n):
        return c
    mp = -(-m // TM) * TM
    np_ = -(-n // LOCAL_X) * LOCAL_X
    if mp != m:
        a = np.concatenate([a, np.zeros((mp - m, kw), np.uint64)])
    bt = np.zeros((kw, np_), np.uint64)
    bt[:, :n] = b.T
    mf = cl.mem_flags
    a_buf = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=a)
    b_buf = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=bt)
    c_buf = cl.Buffer(ctx, mf.WRITE_ONLY, c.nbytes)
    ev = st["kernel"](queue, (np_, mp // TM), (LOCAL_X, 1), a_buf, b_buf, c_buf,
                      np.int32(m), np.int32(n), np.int32(np_), np.int32(kw), np.int32(k_bits))
    cl.enqueue_copy(queue, c, c_buf, wait_for=[ev])
    queue.finish()
    _last_kernel_s = (ev.profile.end - ev.profile.start) * 1e-9
    return c


def bconv2d(x: np.ndarray, w: np.ndarray | PackedConvWeight, stride: int = 1, padding: int = 0,
            pad_value: int = 0) -> np.ndarray:
    """Binary conv2d, NCHW int32 (padding semantics: see :mod:`tvmedge.kernels.pack`)."""
    return _pack.bconv2d_gemm(x, w, stride, padding, pad_value, xnor_gemm)
