"""int8 dot-product tensor intrinsics: x86 VNNI (compiling with the LLVM bundled in
apache-tvm 0.27) and AArch64 ``sdot``, with the accumulator in ``local`` scope.

TVM ships ``dot_16x4_vnni`` (16 int32 lanes += 4 uint8 x 16x4 int8, i.e. one ``vpdpbusd``),
but its implementation passes three ``int32x16`` operands to
``llvm.x86.avx512.vpdpbusd.512``; LLVM 22 declares that intrinsic as
``(<16 x i32>, <64 x i8>, <64 x i8>)`` and the build fails. :func:`register_vnni`
registers the same description under tvmedge's own names (:data:`VNNI_INTRIN`, and
:data:`VNNI_INTRIN_LOCAL` with the accumulator in ``local`` scope) with an implementation that
hands over the 4 activation bytes broadcast and reinterpreted as ``uint8x64`` and the 16x4
weight tile loaded as ``int8x64``. Own names, not an override of ``dot_16x4_vnni``: TVM
registers its intrinsics without override when ``tvm.s_tir.tensor_intrin`` is first imported
(MetaSchedule does that when it tunes), which fails on a name already taken; importing it
ahead of time instead costs ~20 s.

The weight tile is read as 64 contiguous bytes: a tensorized kernel must use weights packed
``[N/16, K/4, 16, 4]`` (conv: ``[O/16, I/4, KH, KW, 16, 4]``). With a plain ``[N, K]``
layout the tensorize step still succeeds but computes garbage - nothing checks it, so
every use is compared against a reference (:func:`vnni_dense_probe`).

AArch64 (Armv8.2 dot product, e.g. Cortex-A76 / Raspberry Pi 5): TVM's
``dot_4x4_i8i8s32_sdot`` (4 int32 lanes += 4 int8 x 4x4 int8, one ``sdot``) compiles as it is
but reads its accumulator from ``global`` scope only; :func:`register_sdot` registers
:data:`SDOT_INTRIN_LOCAL`, the same instruction for a ``local`` accumulator tile. Its weight
tile is 16 contiguous bytes (``[N/4, K/4, 4, 4]`` packing).
"""

from __future__ import annotations

import numpy as np

VNNI_INTRIN = "tvmedge_dot_16x4_vnni"
VNNI_INTRIN_LOCAL = "tvmedge_dot_16x4_vnni_local"
SDOT_INTRIN_LOCAL = "tvmedge_dot_4x4_sdot_local"
_registered = False
_sdot_registered = False


def register_vnni() -> str:
    """Register ``tvmedge_dot_16x4_vnni`` (TVM's ``dot_16x4_vnni`` with an LLVM-22-compatible
    body); returns its name.

    Also registers ``tvmedge_dot_16x4_vnni_local`` (:data:`VNNI_INTRIN_LOCAL`): the same with the
    int32 accumulator in ``local`` scope, for kernels that keep a tile of accumulators in
    registers (``cache_write(..., "local")``); tensorize compares buffer scopes."""
    global _registered
    if _registered:
        return VNNI_INTRIN
    from tvm.s_tir import TensorIntrin

    for name, scope in ((VNNI_INTRIN, "global"), (VNNI_INTRIN_LOCAL, "local")):
        desc, impl = _vnni_funcs(scope)
        TensorIntrin.register(name, desc, impl, override=True)
    _registered = True
    return VNNI_INTRIN


def _dot_funcs(lanes: int, a_dtype: str, c_scope: str, llvm_intrin: str):
    """(description, implementation) of ``c[0:lanes] += a[0:4] . b[0:lanes, 0:4]`` (int32
    accumulators, int8 weights) as one call of the LLVM intrinsic ``llvm_intrin``, which takes
    (int32 x lanes, the 4 activation bytes repeated in every lane, the 4*lanes weight bytes)."""
    from tvm.script import tirx as T

    a4_dtype, wide, c_dtype = f"{a_dtype}x4", f"{a_dtype}x{4 * lanes}", f"int32x{lanes}"
    b_dtype = f"int8x{4 * lanes}"

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), a_dtype, offset_factor=1), b: T.Buffer((lanes, 4), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            for lane in T.serial(0, lanes):
                for r in T.serial(0, 4):
                    with T.sblock("update"):
                        vl, vr = T.axis.remap("SR", [lane, r])
                        c[vl] = c[vl] + T.cast(a[vr], "int32") * T.cast(b[vl, vr], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), a_dtype, offset_factor=1), b: T.Buffer((lanes, 4), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            # The 4 activation bytes as one int32, repeated in all lanes, seen as 4*lanes bytes.
            a4 = T.reinterpret(a.vload([0], a4_dtype), dtype="int32")
            a_all = T.reinterpret(T.broadcast(a4, lanes), dtype=wide)
            c[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_intrin),
                c.vload([0], dtype=c_dtype), a_all, b.vload([0, 0], dtype=b_dtype), dtype=c_dtype)

    return desc, impl


def _vnni_funcs(c_scope: str):
    return _dot_funcs(16, "uint8", c_scope, "llvm.x86.avx512.vpdpbusd.512")


def register_sdot() -> str:
    """Register :data:`SDOT_INTRIN_LOCAL` (``c[0:4] += a[0:4] . b[0:4, 0:4]`` on int8, int32
    accumulator in ``local`` scope, one AArch64 ``sdot``); returns its name."""
    global _sdot_registered
    if not _sdot_registered:
        from tvm.s_tir import TensorIntrin

        funcs = _dot_funcs(4, "int8", "local", "llvm.aarch64.neon.sdot.v4i32.v16i8")
        TensorIntrin.register(SDOT_INTRIN_LOCAL, *funcs, override=True)
        _sdot_registered = True
    return SDOT_INTRIN_LOCAL


def pack_dense_weight(w_kn: np.ndarray, lanes: int = 16) -> np.ndarray:
    """int8 ``[K, N]`` -> ``[N/lanes, K/4, lanes, 4]`` (N % lanes == 0, K % 4 == 0): the tile of
    the VNNI (16 lanes) or ``sdot`` (4 lanes) intrinsic."""
    k, n = w_kn.shape
    return np.ascontiguousarray(w_kn.T.reshape(n // lanes, lanes, k // 4, 4).transpose(0, 2, 1, 3))


def vnni_dense(m: int, k: int, n: int, threads_axis: bool = True):
    """A scheduled PrimFunc ``C[m, n] (int32) = A[m, k] (uint8) x W packed (int8)`` using VNNI."""
    from tvm import s_tir, te

    register_vnni()
    a = te.placeholder((m, k), "uint8", name="A")
    w = te.placeholder((n // 16, k // 4, 16, 4), "int8", name="W")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r].astype("int32") * w[j // 16, r // 4, j % 16, r % 4].astype("int32"),
                                               axis=r), name="C")
    sch = s_tir.Schedule(te.create_prim_func([a, w, c]))
    blk = sch.get_sblock("C")
    i, j, rr = sch.get_loops(blk)
    jo, ji = sch.split(j, [None, 16])
    ro, ri = sch.split(rr, [None, 4])
    sch.reorder(jo, i, ro, ji, ri)
    if threads_axis:
        sch.parallel(jo)
    sch.decompose_reduction(blk, ro)
    sch.tensorize(ji, VNNI_INTRIN)
    return sch.mod["main"]


def vnni_dense_probe(m: int = 16, k: int = 512, n: int = 512, repeat: int = 50) -> dict[str, float]:
    """Check the VNNI dense against numpy and time it next to numpy's fp32 matmul (BLAS)."""
    import time

    import tvm

    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    fn = tvm.compile(vnni_dense(m, k, n), target=target).jit()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-127, 128, (k, n), dtype=np.int8)
    dev = tvm.cpu()
    ta, tw = tvm.runtime.tensor(a, dev), tvm.runtime.tensor(pack_dense_weight(w), dev)
    tc = tvm.runtime.tensor(np.zeros((m, n), np.int32), dev)
    fn(ta, tw, tc)
    ref = a.astype(np.int64) @ w.astype(np.int64)
    err = int(np.abs(tc.numpy() - ref).max())
    t = fn.time_evaluator(fn.entry_name, dev, number=repeat)(ta, tw, tc).mean

    af, wf = a.astype(np.float32), w.astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(repeat):
        af @ wf
    tn = (time.perf_counter() - t0) / repeat
    gop = 2 * m * k * n / 1e9
    return {"max_abs_err": err, "int8_vnni_us": t * 1e6, "numpy_fp32_us": tn * 1e6,
            "int8_gops": gop / t, "numpy_fp32_gflops": gop / tn}


if __name__ == "__main__":
    print(vnni_dense_probe())
