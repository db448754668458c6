"""XNOR GEMM and binary conv2d on the CPU with Numba (``parallel=True``), AVX-512 popcount.

The hot loop is a register-blocked micro-kernel written directly in LLVM IR through a Numba
``@intrinsic``. The packed uint64 operands are read as uint32 words (the same bits: little-endian
word k of 64 bits is 32-bit words 2k, 2k+1). A tile of ``MR`` rows of A x ``NR = 16 * NV``
columns of B is held in ``MR * NV`` vector accumulators of 16 x i32, and each step over one
32-bit word of K does

    b_v   = load 16 consecutive columns of the B panel         (NV vector loads)
    a_r   = broadcast A[i0 + r, k]                              (MR scalar loads)
    acc  += ctpop(a_r XOR b_v)                                  (MR * NV xor/popcnt/add)

which LLVM lowers to ``vpxord`` / ``vpopcntd zmm`` / ``vpaddd`` on AVX-512 VPOPCNTDQ hosts (on
others it is still correct, just slower). 32-bit lanes give int32 accumulators that are stored
as they are (64-bit lanes would need a narrowing per output vector); the per-bit cost of the
inner loop is the same. Writing it as plain Numba loops leaves the accumulators
in memory or vectorizes along K, where a horizontal reduction per output eats the gain when K is
only 16-32 words.

Cache blocking: B is re-laid out as column panels [N/NR, KW32, NR] so one panel (K * NR / 8
bytes: 16 KiB for K=2048) stays in L1 while all row tiles of A stream past it from L2; the
parallel loop runs over (panel, row tile) pairs, panel-major, so each thread keeps its panel.
There is no K blocking: for K beyond ~4096 bits a panel spills from L1 to L2 (still correct).

Bit packing here is Numba too (parallel): :func:`pack_bits` and the fused im2col + pack used by
:func:`bconv2d`. Both produce exactly the layout of :mod:`tvmedge.kernels.pack`.
"""

from __future__ import annotations

import time

import numpy as np

from . import pack as _pack
from .pack import PackedConvWeight

NAME = "numba"
MR = 4  # rows of A per micro-tile
NV = 4  # 16-column vectors of B per micro-tile
LANES = 16  # 32-bit lanes per 512-bit vector
NR = LANES * NV

_import_error: str | None = None
try:
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
except Exception as e:  # pragma: no cover - numba is a hard dependency of the project
    _import_error = f"numba not importable: {e}"


def available() -> tuple[bool, str]:
    """(True, description) when Numba imports; the description names the threads used."""
    if _import_error:
        return False, _import_error
    return True, f"numba {numba.__version__}, {numba.get_num_threads()} threads"


def on_cpu() -> bool:
    """Always: Numba's parallel loops run on this host's cores."""
    return True


def last_kernel_seconds() -> float | None:
    """None: no transfers, the wall time is the kernel's."""
    return None


def threads() -> int:
    """Threads the parallel loops use (``NUMBA_NUM_THREADS``, default: all cores)."""
    return int(numba.get_num_threads())


if not _import_error:

    @intrinsic
    def _tile(typingctx, a, a_off, lda, bp, b_off, kw, kbits, c, c_off, ldc):
        """C[c_off + r*ldc + j] = kbits - 2*popcount(A row r XOR B column j), r<MR, j<NR.

        ``a`` and ``bp`` are flat uint32 arrays, ``kw`` counts 32-bit words.
        """
        sig = types.void(a, a_off, lda, bp, b_off, kw, kbits, c, c_off, ldc)

        def codegen(context, builder, signature, args):
            a_v, a_off_v, lda_v, bp_v, b_off_v, kw_v, kbits_v, c_v, c_off_v, ldc_v = args
            i32, i64 = ir.IntType(32), ir.IntType(64)
            vec = ir.VectorType(i32, LANES)

            def data(pos, val):
                return context.make_array(signature.args[pos])(context, builder, val).data

            a_ptr = cgutils.gep(builder, data(0, a_v), a_off_v)
            b_ptr = cgutils.gep(builder, data(3, bp_v), b_off_v)
            c_ptr = cgutils.gep(builder, data(7, c_v), c_off_v)
            ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec]),
                                                   f"llvm.ctpop.v{LANES}i32")
            undef = ir.Constant(vec, ir.Undefined)
            lane0 = ir.Constant(i32, 0)
            splat = ir.Constant(vec, [0] * LANES)

            def broadcast(s):
                return builder.shuffle_vector(builder.insert_element(undef, s, lane0), undef, splat)

            # Entry-block allocas: mem2reg turns them into loop-carried registers.
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(NV)]
                   for _ in range(MR)]
            a_rows = [cgutils.gep(builder, a_ptr, builder.mul(ir.Constant(i64, r), lda_v))
                      for r in range(MR)]
            with cgutils.for_range(builder, kw_v) as loop:
                k = loop.index
                b_row = cgutils.gep(builder, b_ptr, builder.mul(k, ir.Constant(i64, NR)))
                b = [builder.load(builder.bitcast(cgutils.gep(builder, b_row, LANES * v),
                                                  vec.as_pointer()), align=4) for v in range(NV)]
                for r in range(MR):
                    a_k = broadcast(builder.load(cgutils.gep(builder, a_rows[r], k)))
                    for v in range(NV):
                        pop = builder.call(ctpop, [builder.xor(a_k, b[v])])
                        builder.store(builder.add(builder.load(acc[r][v]), pop), acc[r][v])
            kb = broadcast(builder.trunc(kbits_v, i32))
            for r in range(MR):
                c_row = cgutils.gep(builder, c_ptr, builder.mul(ir.Constant(i64, r), ldc_v))
                for v in range(NV):
                    twice = builder.shl(builder.load(acc[r][v]), ir.Constant(vec, [1] * LANES))
                    dst = builder.bitcast(cgutils.gep(builder, c_row, LANES * v), vec.as_pointer())
                    builder.store(builder.sub(kb, twice), dst, align=4)
            return context.get_dummy_value()

        return sig, codegen

    @njit(parallel=True, cache=True)
    def _gemm(a, b, m, kbits):  # pragma: no cover - jitted
        """a: uint32 [>= ceil(m/MR)*MR, kw], b: uint32 [n, kw] -> int32 [m, n]."""
        n, kw = b.shape
        n_panels = (n + NR - 1) // NR
        bp = np.zeros((n_panels, kw, NR), np.uint32)  # B as column panels, zero-padded
        for p in prange(n_panels):
            for j in range(min(NR, n - p * NR)):
                for k in range(kw):
                    bp[p, k, j] = b[p * NR + j, k]
        c = np.empty((m, n), np.int32)
        af, bf, cf = a.reshape(-1), bp.reshape(-1), c.reshape(-1)
        n_mt = (m + MR - 1) // MR
        for t in prange(n_panels * n_mt):  # panel-major: a thread keeps its B panel in L1
            jb = t // n_mt
            i0 = (t - jb * n_mt) * MR
            j0 = jb * NR
            if i0 + MR <= m and j0 + NR <= n:
                _tile(af, i0 * kw, kw, bf, jb * kw * NR, kw, kbits, cf, i0 * n + j0, n)
            else:  # edge tile: compute into scratch, copy the part inside C
                tmp = np.empty(MR * NR, np.int32)
                _tile(af, i0 * kw, kw, bf, jb * kw * NR, kw, kbits, tmp, 0, NR)
                for r in range(min(MR, m - i0)):
                    for j in range(min(NR, n - j0)):
                        cf[(i0 + r) * n + j0 + j] = tmp[r * NR + j]
        return c

    @njit(parallel=True, cache=True)
    def _pack_rows(x, bits_in):  # pragma: no cover - jitted
        rows, k = x.shape
        kw = (k + 63) // 64
        out = np.zeros((rows, kw), np.uint64)
        for r in prange(rows):
            for w in range(kw):
                base = w * 64
                word = np.uint64(0)
                for b in range(min(64, k - base)):
                    v = x[r, base + b]
                    on = (v != 0) if bits_in else (v >= 0)
                    word |= np.uint64(on) << np.uint64(b)
                out[r, w] = word
        return out

    @njit(parallel=True, cache=True)
    def _im2col_pack(x, kh, kw, stride, padding, pad_bit, rows, oh, ow):  # pragma: no cover
        n, c, h, wd = x.shape
        kbits = c * kh * kw
        out = np.zeros((rows.size, (kbits + 63) // 64), np.uint64)
        for idx in prange(rows.size):
            img, rem = divmod(rows[idx], oh * ow)
            y0 = (rem // ow) * stride - padding
            x0 = (rem % ow) * stride - padding
            word = np.uint64(0)
            bit = 0
            wi = 0
            for ci in range(c):
                for i in range(kh):
                    y = y0 + i
                    for j in range(kw):
                        xx = x0 + j
                        if 0 <= y < h and 0 <= xx < wd:
                            on = x[img, ci, y, xx] >= 0
                        else:
                            on = pad_bit != 0
                        word |= np.uint64(on) << np.uint64(bit)
                        bit += 1
                        if bit == 64:
                            out[idx, wi] = word
                            wi += 1
                            word = np.uint64(0)
                            bit = 0
            if bit:
                out[idx, wi] = word
        return out


    @njit(cache=True)
    def _clock_chain(n, x):  # pragma: no cover - jitted
        for i in range(n):
            x = (x + i) ^ (x >> 7)  # add and shift in parallel, then xor: 2 cycles/iteration
        return x

    @njit(parallel=True, cache=True)
    def _triad(a, b, c, s):  # pragma: no cover - jitted
        for i in prange(a.size):
            a[i] = b[i] + s * c[i]


def measure_clock_ghz(iterations: int = 20_000_000, tries: int = 5) -> float:
    """Core clock from a dependent chain of 1-cycle integer ops (best of ``tries``)."""
    _clock_chain(10, 1)
    best = 0.0
    for _ in range(tries):
        t0 = time.perf_counter()
        _clock_chain(iterations, 12345)
        best = max(best, 2 * iterations / (time.perf_counter() - t0) / 1e9)
    return best


def stream_triad_gbs(n: int = 1 << 23, tries: int = 5) -> float:
    """Memory bandwidth, GB/s: STREAM triad a = b + s*c over float64 on all threads, 24 B/elem."""
    a, b, c = np.zeros(n), np.ones(n), np.ones(n)
    _triad(a, b, c, 3.0)
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        _triad(a, b, c, 3.0)
        best = min(best, time.perf_counter() - t0)
    return 24 * n / best / 1e9


def pack_bits(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numba version of :func:`tvmedge.kernels.pack.pack_bits` (same layout, parallel)."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    lead = x.shape[:-1]
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    bits_in = x2.dtype == np.bool_
    if bits_in:
        x2 = x2.view(np.uint8)
    return _pack_rows(x2, bits_in).reshape(lead + (-1,))


def xnor_gemm(a_packed: np.ndarray, b_packed: np.ndarray, k_bits: int) -> np.ndarray:
    """C[m, n] = sum_k a*b = K - 2*popcount(a[m] XOR b[n]) for packed a [M,W], b [N,W]; int32."""
    a = np.ascontiguousarray(a_packed)
    b = np.ascontiguousarray(b_packed)
    _pack.check_gemm_operands(a, b, k_bits)
    m, kw = a.shape
    n = b.shape[0]
    if not (m and n):
        return np.empty((m, n), np.int32)
    if m % MR:  # the last row tile reads MR rows
        a = np.concatenate([a, np.zeros((MR - m % MR, kw), np.uint64)])
    return _gemm(a.view(np.uint32), b.view(np.uint32), m, int(k_bits))


def im2col_pack(x: np.ndarray, kh: int, kw: int, stride: int, padding: int, pad_bit: int,
                rows: np.ndarray | None = None) -> np.ndarray:
    """Numba fused im2col + pack, same result as :func:`tvmedge.kernels.pack.im2col_pack`."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:  # bits in: True (+1) -> 1, False (-1) -> -1
        x = x.astype(np.int8) * np.int8(2) - np.int8(1)
    n, _, h, w = x.shape
    oh, ow = _pack.conv_out_hw(h, w, kh, kw, stride, padding)
    if rows is None:
        rows = np.arange(n * oh * ow, dtype=np.int64)
    return _im2col_pack(x, kh, kw, stride, padding, int(pad_bit),
                        np.asarray(rows, np.int64), oh, ow)


def bconv2d(x: np.ndarray, w: np.ndarray | PackedConvWeight, stride: int = 1, padding: int = 0,
            pad_value: int = 0) -> np.ndarray:
    """Binary conv2d, NCHW int32 (padding semantics: see :mod:`tvmedge.kernels.pack`)."""
    return _pack.bconv2d_gemm(x, w, stride, padding, pad_value, xnor_gemm, im2col=im2col_pack)
