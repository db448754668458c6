"""XNOR GEMM and binary conv2d compiled by TVM (TE compute + a hand-written TIR schedule).

The same contract as the other backends, built with TVM's own codegen so that a binarized layer
compiled by TVM can be compared with the hand-written kernels: ``C = KBITS - 2 * P`` with
``P[i, j] = sum_k popcount(A[i, k] ^ BT[k, j])`` over uint64 words, B transposed to [KW, N].
Schedule: rows split by ``MR`` (unrolled) and columns by ``NRV`` (vectorised), the K loop
between them so each thread keeps an MR x NRV accumulator tile; the outer row loop is parallel
(TVM's thread pool, ``TVM_NUM_THREADS``). Target: host LLVM with the host CPU name, so
``tirx.popcount`` on uint64 vectors becomes ``vpopcntq`` where the CPU has it.

One module is compiled per (M, N, K-words) shape and cached (compiling takes ~40 ms). Bit
packing is the shared numpy packer of :mod:`tvmedge.kernels.pack`.
"""

from __future__ import annotations

import numpy as np

from ..core.errors import first_line
from . import pack as _pack
from .pack import PackedConvWeight

NAME = "tvm"
MR = 4  # rows per tile (unrolled)
NRV = 32  # columns per tile (vectorised)

_cache: dict[tuple[int, int, int], object] = {}
_target = None


def _host_target():
    global _target
    if _target is None:
        import tvm

        spec = {"kind": "llvm"}
        try:
            import llvmlite.binding as llvm

            spec["mcpu"] = llvm.get_host_cpu_name()
        except Exception:  # no llvmlite: generic x86-64 code, still correct
            pass
        _target = tvm.target.Target(spec)
    return _target


def _build(m: int, n: int, kw: int):
    import tvm
    import tvm.s_tir as s_tir
    from tvm import te, tirx

    a = te.placeholder((m, kw), "uint64", name="A")
    bt = te.placeholder((kw, n), "uint64", name="BT")
    k = te.reduce_axis((0, kw), name="k")
    pop = te.compute((m, n), lambda i, j: te.sum(
        tirx.popcount(a[i, k] ^ bt[k, j]).astype("int32"), axis=k), name="P")
    kbits = te.var("kbits", "int32")
    c = te.compute((m, n), lambda i, j: kbits - 2 * pop[i, j], name="C")
    sch = s_tir.Schedule(te.create_prim_func([a, bt, c, kbits]))
    blk = sch.get_sblock("P")
    i, j, kk = sch.get_loops(blk)
    io, ii = sch.split(i, [None, MR])
    jo, ji = sch.split(j, [None, NRV])
    sch.reorder(io, jo, kk, ii, ji)
    sch.parallel(io)
    sch.unroll(ii)
    sch.vectorize(ji)
    sch.reverse_compute_at(sch.get_sblock("C"), jo)
    return tvm.compile(sch.mod, target=_host_target())


def _kernel(m: int, n: int, kw: int):
    key = (m, n, kw)
    if key not in _cache:
        _cache[key] = _build(m, n, kw)
    return _cache[key]


def available() -> tuple[bool, str]:
    """(True, target) when TVM imports and compiles a tiny kernel for the host."""
    try:
        import tvm

        _kernel(MR, NRV, 1)
    except Exception as e:
        return False, f"{type(e).__name__}: {first_line(e)}"
    return True, f"tvm {tvm.__version__}, {_host_target()}"


def on_cpu() -> bool:
    """Always: the target is the host CPU (LLVM)."""
    return True


def last_kernel_seconds() -> float | None:
    """None: no transfers, the wall time is the kernel's."""
    return None


def xnor_gemm(a_packed: np.ndarray, b_packed: np.ndarray, k_bits: int) -> np.ndarray:
    """C[m, n] = K - 2*popcount(a[m] XOR b[n]) for packed a [M,W], b [N,W]; int32 [M, N]."""
    import tvm

    a = np.ascontiguousarray(a_packed)
    b = np.ascontiguousarray(b_packed)
    _pack.check_gemm_operands(a, b, k_bits)
    m, kw = a.shape
    n = b.shape[0]
    if not (m and n):
        return np.empty((m, n), np.int32)
    mp, np_ = -(-m // MR) * MR, -(-n // NRV) * NRV
    if mp != m:
        a = np.concatenate([a, np.zeros((mp - m, kw), np.uint64)])
    bt = np.zeros((kw, np_), np.uint64)
    bt[:, :n] = b.T
    dev = tvm.cpu()
    c = tvm.runtime.empty((mp, np_), "int32", dev)
    _kernel(mp, np_, kw)(tvm.runtime.tensor(a, dev), tvm.runtime.tensor(bt, dev), c, int(k_bits))
    out = c.numpy()
    return out if (mp, np_) == (m, n) else np.ascontiguousarray(out[:m, :n])


def bconv2d(x: np.ndarray, w: np.ndarray | PackedConvWeight, stride: int = 1, padding: int = 0,
            pad_value: int = 0) -> np.ndarray:
    """Binary conv2d, NCHW int32 (padding semantics: see :mod:`tvmedge.kernels.pack`)."""
    return _pack.bconv2d_gemm(x, w, stride, padding, pad_value, xnor_gemm)
