"""int8 conv2d / matmul on CPU dot-product instructions: a Relax rewrite to hand-scheduled TIR.

Two instruction sets, one set of kernels (:class:`DotIsa`):

* **x86 AVX-512 VNNI** (``vpdpbusd``: 16 int32 lanes += 4 uint8 x 4 int8 each), for x86
  ``llvm`` targets whose CPU features include ``avx512vnni``;
* **AArch64 dot product** (``sdot``: 4 int32 lanes += 4 int8 x 4 int8 each, Armv8.2+, e.g.
  Cortex-A76 / Raspberry Pi 5, Neoverse), for aarch64 ``llvm`` targets with ``dotprod``.
  ``sdot`` is signed x signed, while :mod:`tvmedge.optimize.quantize` writes uint8
  activations: the kernel reads ``x - 128`` (int8) and adds back ``128 * sum(W[o])``, a
  per-channel constant computed at rewrite time, so the int32 result is the same.

The feature checks ask LLVM about the target's triple / mcpu / mattr
(``tvm.target.codegen.target_has_features``), as TVM's own strategies do. Other targets
(Cortex-A72 ``pi4`` and ``pi3`` have no dot product) are left alone.

MetaSchedule and dlight never emit these instructions for the int8 ops the quantizer writes
(``R.nn.conv2d`` / ``R.matmul`` of a uint8 activation and an int8 constant weight,
``out_dtype="int32"``), so a tuned int8 model would be no faster than fp32.
:func:`rewrite_dot` replaces each such op by ``relax.call_tir`` to a PrimFunc tensorized with
the intrinsics of :mod:`tvmedge.lower.intrin`, with the weight packed once, at rewrite
time, into the layout the intrinsic reads (``lanes x 4`` contiguous bytes per tile). The
conv's epilogue the quantizer wrote (int32 bias, ``astype``, scale, ReLU6, the requantize of the
next layer's input) runs inside the kernel (:mod:`.epilogue`; ``TVMEDGE_INT8_EPILOGUE=0``
leaves it to FuseOps), so the kernel writes uint8 rather than int32 for a separate requantize
kernel to read back (int8 MobileNetV2 4.1 -> 3.7 ms on the 2-core Intel VM). Results are
bit-exact with the generic path (checked in ``tests/test_int8_vnni.py`` on this host and
``tests/test_int8_sdot.py`` on an emulated Cortex-A76).

Kernels (one PrimFunc per distinct shape, marked opaque + ``tirx.is_scheduled`` like
:mod:`tvmedge.binary.lower`, so FuseOps / dlight / MetaSchedule leave them alone); ``L`` is
the instruction's int32 lanes (16 or 4):

* **conv2d** (groups 1, dilation 1, NHWC/HWIO or NCHW/OIHW, any stride / padding): three
  blocks in one PrimFunc. (1) relayout: uint8 -> channels-last ``[N, H+pads, W+pads, Cp]``
  (int8 ``x - 128`` for ``sdot``), spatial padding filled with the pad value (0, or the zero
  point of an ``R.nn.pad`` that fed the conv, which is folded in), channels padded to ``Cp`` =
  a multiple of 4 (their weights are 0); for NHWC input with nothing to pad or shift it is
  inlined (the conv reads its input in place). (2) the conv over the reduction
  ``(kh, kw, c/4)`` with the 4 channel bytes contiguous, weights packed
  ``[Op/L, KH, KW, Cp/4, L, 4]``, into an o-blocked int32 accumulator (``[N, Op/L, OH, OW, L]``
  for NCHW, ``[N, OH, OW, Op/L, L]`` for NHWC); a tile of ``x_tile`` output columns x
  ``o_blocks`` x L channels is kept in registers (``cache_write`` local, unrolled), the outer
  ``(n, o-block group, output row)`` loop runs in parallel (for layers of at least
  ``parallel_min_macs``: smaller ones run serially, see :func:`worth_parallel`). (3)
  write-back to int32 ``[N, O, OH, OW]`` / ``[N, OH, OW, O]`` (plus the ``sdot`` correction),
  dropping the padded channels; for NHWC with whole channel blocks and no correction the
  register tile is stored straight into the output instead.

  ``compile`` runs the rewrite inside ``lower.pipeline.prepare`` after the graph is converted
  to NHWC (:func:`rewrite_module`; :func:`apply` only records it), with per-tensor quantize
  ops spelled out as elementwise ops (``lower.normalize.NormalizeQuantize``), so int8 layers
  chain with NHWC depthwise convs and epilogues without transposes. On the import's NCHW graph
  every block of an int8 MobileNetV2 transposed its activations twice: 6.6 ms there, 3.3 ms
  in NHWC (2-core Intel VM, 2 threads).
* **matmul** ``[M, K] x [K, N]`` (leading batch dims of the activation are flattened by a
  reshape): K padded to a multiple of 4 (zero bytes, in a small copy block when needed; for
  ``sdot`` that block also shifts to int8), N to a multiple of L, weights packed
  ``[Np/L, Kp/4, L, 4]``; an ``m_tile x n_blocks*L`` accumulator tile in registers, parallel
  over the N-block groups.

Tile sizes are heuristics, not a search. VNNI: in a sweep of x_tile in {2, 4, 7, 8, 14} and
o_blocks in {1, 2, 4} on ResNet-18 / MobileNetV2 shapes (2 threads, znver4) the best few
choices were within ~5 % of each other, while x_tile 2 lost up to 40 % on a wide 1x1 conv, so
the conv takes the largest divisor of OW that is <= 8 and 2 channel blocks when they divide;
the matmul up to 4 N-blocks (independent accumulator chains for the M = 1 layers) and up to 4
rows. ``sdot``: sized to AArch64's 32 vector registers (up to 4 x 4 accumulators plus the
operands); not measured on hardware (qemu timings say nothing about a core), and its
serial/parallel threshold is VNNI's scaled by the 4x fewer MACs per instruction.

Not done: the first layers with 1 or 3 input channels pad C to 4 per tap (up to 4x wasted
MACs on a layer that is cheap anyway; an im2col over (kh, kw, c) would avoid it); grouped /
depthwise convs stay on the generic path; AVX-VNNI (256-bit, no AVX-512), Arm ``i8mm``
(``usmmla``/``usdot``, which would take uint8 directly) and SVE are not targeted.
``tvmedge tune`` tunes the rewritten graph, with the kernels left out of its tasks
(:func:`tvmedge.tune.tuner.tuning_tasks`; MetaSchedule would otherwise make them tasks and
fail on their FLOP estimate).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from ..core.graph import bindings, dtype_of, finish_kernel, first_divisor, op_name, shape_of
from . import epilogue
from .intrin import SDOT_INTRIN_LOCAL, VNNI_INTRIN_LOCAL, register_sdot, register_vnni

ENV_SWITCH = "TVMEDGE_INT8_DOT"
EPILOGUE_SWITCH = "TVMEDGE_INT8_EPILOGUE"  # "0": leave the requantize chains to FuseOps


def _ceil(v: int, m: int) -> int:
    return -(-v // m) * m


@dataclasses.dataclass(frozen=True)
class DotIsa:
    """One int8 dot-product instruction: ``lanes`` int32 accumulators += 4 bytes x ``lanes`` x 4
    bytes. ``shift``: the instruction is signed x signed, so uint8 activations are read as
    ``x - 128`` and ``128 * sum(W)`` is added back per output channel."""

    key: str  # PrimFunc name prefix
    rewrite: str  # the artifact's ``rewrites`` record
    lanes: int
    shift: bool
    intrin: str  # tensor intrinsic, int32 accumulator in local scope
    register: Any  # registers the intrinsics
    x_tiles: tuple[int, ...]  # conv: output columns per register tile (largest divisor first)
    o_blocks: tuple[int, ...]  # conv: channel blocks per register tile
    m_tiles: tuple[int, ...]  # matmul: rows per register tile
    n_blocks: tuple[int, ...]  # matmul: column blocks per register tile
    parallel_min_macs: int  # below it a kernel runs serially


# ~10-20 µs of vpdpbusd work on one core: below it a kernel runs serially (measured, znver4).
# o_blocks: 2 channel blocks per tile, else 3 (a tile of one block re-reads the input once per
# block: 144 output channels, 9 blocks, ran 0.35 -> 0.30 ms in int8 MobileNetV2 with 3)
VNNI = DotIsa("vnni", "int8-x86-vnni", 16, False, VNNI_INTRIN_LOCAL, register_vnni,
              x_tiles=(8, 7, 6, 5, 4, 3, 2), o_blocks=(2, 3), m_tiles=(4, 2), n_blocks=(4, 2),
              parallel_min_macs=1 << 21)
SDOT = DotIsa("sdot", "int8-arm-sdot", 4, True, SDOT_INTRIN_LOCAL, register_sdot,
              x_tiles=(4, 3, 2), o_blocks=(4, 2), m_tiles=(4, 2), n_blocks=(4, 2),
              parallel_min_macs=1 << 19)


# ----------------------------------------------------------------------------- target
def _llvm_arch(target: Any) -> str | None:
    from tvm.target import codegen

    if target is None or target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
    return triple.split("-")[0]


def _has_feature(target: Any, feature: str) -> bool:
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features(feature, target))
    except Exception:  # an LLVM without that CPU / feature name
        return False


def has_vnni(target: Any) -> bool:
    """Whether ``target`` is an x86 LLVM CPU target with AVX-512 VNNI."""
    return _llvm_arch(target) in ("x86_64", "i686", "i386") and _has_feature(target, "avx512vnni")


def has_dotprod(target: Any) -> bool:
    """Whether ``target`` is an AArch64 LLVM CPU target with the dot-product extension."""
    return _llvm_arch(target) in ("aarch64", "arm64") and _has_feature(target, "dotprod")


def isa_for(target: Any) -> DotIsa | None:
    """The dot-product instruction set the kernels use on ``target``, or None."""
    if has_vnni(target):
        return VNNI
    if has_dotprod(target):
        return SDOT
    return None


def switched_off() -> bool:
    """Whether ``TVMEDGE_INT8_DOT=0`` turns the int8 kernel rewrites (CPU and CUDA) off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no")


def enabled(target: Any) -> DotIsa | None:
    """:func:`isa_for` ``target``, unless ``TVMEDGE_INT8_DOT`` is ``0``."""
    return None if switched_off() else isa_for(target)


# ----------------------------------------------------------------------------- weights
def pack_conv_weight(wq: np.ndarray, lanes: int = 16) -> np.ndarray:
    """int8 OIHW -> ``[Op/lanes, KH, KW, Cp/4, lanes, 4]`` (O, C zero-padded to multiples of lanes, 4)."""
    o, c, kh, kw = wq.shape
    op, cp = _ceil(o, lanes), _ceil(c, 4)
    w = np.zeros((op, cp, kh, kw), np.int8)
    w[:o, :c] = wq
    return np.ascontiguousarray(w.reshape(op // lanes, lanes, cp // 4, 4, kh, kw).transpose(0, 4, 5, 2, 1, 3))


def pack_matmul_weight(wq: np.ndarray, lanes: int = 16) -> np.ndarray:
    """int8 ``[K, N]`` -> ``[Np/lanes, Kp/4, lanes, 4]`` (K, N zero-padded to multiples of 4, lanes)."""
    from .intrin import pack_dense_weight

    k, n = wq.shape
    w = np.zeros((_ceil(k, 4), _ceil(n, lanes)), np.int8)
    w[:k, :n] = wq
    return pack_dense_weight(w, lanes)


def shift_correction(wq: np.ndarray, out_axis: int) -> np.ndarray:
    """``128 * sum(W)`` per output channel, int32: what ``sdot`` on ``x - 128`` leaves out."""
    axes = tuple(i for i in range(wq.ndim) if i != out_axis)
    return (128 * wq.astype(np.int64).sum(axis=axes)).astype(np.int32)


# ----------------------------------------------------------------------------- tiles
def conv_tiles(ow: int, o: int, isa: DotIsa = VNNI) -> tuple[int, int]:
    """``(x_tile, o_blocks)``: output columns x ``lanes``-channel blocks held in registers."""
    return first_divisor(ow, isa.x_tiles), first_divisor(_ceil(o, isa.lanes) // isa.lanes, isa.o_blocks)


def matmul_tiles(m: int, n: int, isa: DotIsa = VNNI) -> tuple[int, int]:
    """``(m_tile, n_blocks)``: rows x ``lanes``-column blocks held in registers."""
    return first_divisor(m, isa.m_tiles), first_divisor(_ceil(n, isa.lanes) // isa.lanes, isa.n_blocks)


def worth_parallel(macs: int, isa: DotIsa = VNNI) -> bool:
    """Whether a kernel of ``macs`` multiply-adds should run on the thread pool: waking the
    pool costs a few µs per parallel loop, more than a small layer takes on one core
    (digits-cnn, VNNI, 2 threads: 0.075 ms with every kernel parallel, 0.043 ms with none)."""
    return macs >= isa.parallel_min_macs


# ----------------------------------------------------------------------------- TIR kernels
def _to_act(v: Any, isa: DotIsa) -> Any:
    """A uint8 activation as the instruction reads it (``x - 128`` as int8 for ``sdot``)."""
    if not isa.shift:
        return v
    return (v.astype("int32") - 128).astype("int8")


def conv2d_func(n: int, c: int, h: int, w: int, o: int, kh: int, kw: int, strides: tuple[int, int],
                padding: tuple[int, int, int, int], pad_value: int = 0, x_tile: int | None = None,
                o_blocks: int | None = None, isa: DotIsa = VNNI, layout: str = "NCHW", epilogue: Any = None):
    """PrimFunc ``(x uint8, w packed int8, out int32)`` (``sdot``: ``(x, w, corr int32 [O], out)``),
    activations in ``layout`` (NCHW or NHWC); ``padding`` is (top, left, bottom, right), filled
    with ``pad_value``. With an ``epilogue`` (:class:`~tvmedge.lower.epilogue.Epilogue`) the
    kernel takes its constants after ``w`` / ``corr`` and writes the chain's result instead."""
    from tvm import s_tir, te, tirx

    from . import epilogue as epi


    lanes = isa.lanes
    sh, sw = strides
    pt, pl, pb, pr = padding
    cp, op = _ceil(c, 4), _ceil(o, lanes)
    hp, wp = h + pt + pb, w + pl + pr
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    xt, obt = conv_tiles(ow, o, isa)
    xt, obt = x_tile or xt, o_blocks or obt
    nhwc = layout == "NHWC"
    x = te.placeholder((n, h, w, c) if nhwc else (n, c, h, w), "uint8", name="x")
    wt = te.placeholder((op // lanes, kh, kw, cp // 4, lanes, 4), "int8", name="w")
    corr = te.placeholder((o,), "int32", name="corr") if isa.shift else None

    def relayout(ni, yy, xx, ci):
        inside = [yy >= pt, yy < h + pt, xx >= pl, xx < w + pl] if any(padding) else []
        cc = tirx.min(ci, c - 1) if cp != c else ci
        v = x[ni, yy - pt, xx - pl, cc] if nhwc else x[ni, cc, yy - pt, xx - pl]
        if inside:
            v = tirx.if_then_else(tirx.all(*inside), v, tirx.const(pad_value, "uint8"))
        if cp != c:  # channel padding is 0 (its weights are 0 too)
            v = tirx.if_then_else(ci < c, v, tirx.const(0, "uint8"))
        return _to_act(v, isa)

    a = te.compute((n, hp, wp, cp), relayout, name="nhwc")
    rh, rw, rc = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw"), te.reduce_axis((0, cp), "rc")
    def dot(ni, ob, y, xx, oi):
        return te.sum(a[ni, y * sh + rh, xx * sw + rw, rc].astype("int32")
                      * wt[ob, rh, rw, rc // 4, oi, rc % 4].astype("int32"), axis=[rh, rw, rc])

    # o-blocked int32: [N, Op/L, OH, OW, L] for NCHW output, [N, OH, OW, Op/L, L] (channels
    # last, so the write-back reads contiguous channels) for NHWC
    if nhwc:
        acc = te.compute((n, oh, ow, op // lanes, lanes), lambda ni, y, xx, ob, oi: dot(ni, ob, y, xx, oi), name="acc")
    else:
        acc = te.compute((n, op // lanes, oh, ow, lanes), dot, name="acc")

    extra = epi.inputs(epilogue, o) if epilogue is not None else []

    def write_back(ni, oc, y, xx):
        v = acc[ni, y, xx, oc // lanes, oc % lanes] if nhwc else acc[ni, oc // lanes, y, xx, oc % lanes]
        v = v + corr[oc] if corr is not None else v
        return epi.compute(epilogue, v, oc, extra) if epilogue is not None else v

    if nhwc:
        out = te.compute((n, oh, ow, o), lambda ni, y, xx, oc: write_back(ni, oc, y, xx), name="out")
    else:
        out = te.compute((n, o, oh, ow), write_back, name="out")
    sch = s_tir.Schedule(te.create_prim_func([x, wt] + ([corr] if corr is not None else []) + extra + [out]))

    blk = sch.get_sblock("acc")
    if nhwc:
        ni, y, xx, ob, oi, i, j, r = sch.get_loops(blk)
    else:
        ni, ob, y, xx, oi, i, j, r = sch.get_loops(blk)
    obo, obi = sch.split(ob, [None, obt])
    xo, xi = sch.split(xx, [None, xt])
    ro, ri = sch.split(r, [None, 4])
    sch.reorder(ni, obo, y, xo, i, j, ro, xi, obi, oi, ri)
    par = worth_parallel(n * op * oh * ow * kh * kw * cp, isa)
    outer = sch.fuse(ni, obo, y)
    if par:
        sch.parallel(outer)
    stages = ["nhwc", "out"]
    if nhwc and cp == c and not any(padding) and not isa.shift:
        # nothing to pad or shift: the kernel reads its input in place (no relayout copy)
        sch.compute_inline(sch.get_sblock("nhwc"))
        stages.remove("nhwc")
    _register_tile(sch, blk, xo, i, oi, (xi, obi), isa)  # xt x obt x lanes accumulators in registers
    if nhwc and op == o and corr is None:
        # NHWC with whole channel blocks: the o-blocked accumulator is the output's layout, so
        # the register tile is stored straight into the output (no int32 copy of the result;
        # with an epilogue, the tile goes through it on its way out)
        sch.reverse_compute_inline(sch.get_sblock("out"))
        stages.remove("out")
    if par:  # the relayout and the write-back are as big as the conv: parallel with it
        for name in stages:
            loops = sch.get_loops(sch.get_sblock(name))
            sch.parallel(sch.fuse(loops[0], loops[1]))
    return finish_kernel(sch)


def _register_tile(sch, blk, at, reduce_from, lanes, unrolled, isa: DotIsa) -> None:
    """Accumulate ``blk`` in a register tile written back under loop ``at``; initialise it
    above ``reduce_from``; ``lanes`` (the instruction's lanes x 4 bytes) becomes one dot-product
    instruction; the ``unrolled`` loops spread the tile over independent accumulators."""
    tile = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(tile, at)
    init = sch.decompose_reduction(blk, reduce_from)
    isa.register()
    sch.tensorize(lanes, isa.intrin)
    for loop in unrolled:
        sch.unroll(loop)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(tile)[-1])


def matmul_func(m: int, k: int, n: int, m_tile: int | None = None, n_blocks: int | None = None,
                isa: DotIsa = VNNI):
    """PrimFunc ``(a uint8 [M, K], w packed int8, out int32 [M, N])`` (``sdot``: ``(a, w, corr
    int32 [N], out)``)."""
    from tvm import s_tir, te, tirx


    lanes = isa.lanes
    kp, np_ = _ceil(k, 4), _ceil(n, lanes)
    mt, nbt = matmul_tiles(m, n, isa)
    mt, nbt = m_tile or mt, n_blocks or nbt
    a = te.placeholder((m, k), "uint8", name="a")
    wt = te.placeholder((np_ // lanes, kp // 4, lanes, 4), "int8", name="w")
    corr = te.placeholder((n,), "int32", name="corr") if isa.shift else None
    src = a
    if kp != k or isa.shift:
        src = te.compute((m, kp), lambda i, r: _to_act(tirx.if_then_else(
            r < k, a[i, tirx.min(r, k - 1)], tirx.const(0, "uint8")) if kp != k else a[i, r], isa), name="apad")
    r = te.reduce_axis((0, kp), "r")
    acc = te.compute((m, np_), lambda i, j: te.sum(
        src[i, r].astype("int32") * wt[j // lanes, r // 4, j % lanes, r % 4].astype("int32"), axis=r), name="acc")
    if corr is not None:
        out = te.compute((m, n), lambda i, j: acc[i, j] + corr[j], name="out")
    else:
        out = acc if np_ == n else te.compute((m, n), lambda i, j: acc[i, j], name="out")
    sch = s_tir.Schedule(te.create_prim_func([a, wt] + ([corr] if corr is not None else []) + [out]))

    blk = sch.get_sblock("acc")
    i, j, rr = sch.get_loops(blk)
    jb, ji = sch.split(j, [None, lanes])
    jbo, jbi = sch.split(jb, [None, nbt])
    io, ii = sch.split(i, [None, mt])
    ro, ri = sch.split(rr, [None, 4])
    sch.reorder(jbo, io, ro, ii, jbi, ji, ri)
    outer = sch.fuse(jbo, io)
    if worth_parallel(m * kp * np_, isa):
        sch.parallel(outer)
    _register_tile(sch, blk, outer, ro, ji, (ii, jbi), isa)
    return finish_kernel(sch)


# ----------------------------------------------------------------------------- Relax rewrite
def _conv_plan(call: Any, defs: dict) -> dict[str, Any] | None:
    """What the conv kernel needs, or None when the conv is not one the kernels handle."""
    import tvm


    a = call.attrs
    data, weight = call.args[0], call.args[1]
    layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout))
    if (dtype_of(data) != "uint8" or not isinstance(weight, tvm.ir.expr.Constant) or str(weight.ty.dtype) != "int8"
            or str(a.out_dtype) != "int32" or int(a.groups) != 1 or any(int(d) != 1 for d in a.dilation)
            or layouts not in (("NCHW", "OIHW", "NCHW"), ("NHWC", "HWIO", "NHWC"))):
        return None
    layout = layouts[0]
    shape = shape_of(data)
    if shape is None or len(shape) != 4:
        return None
    pad = [int(v) for v in a.padding]  # top, left, bottom, right
    pad_value = 0
    # (N, C, H, W) axes of the layout: where a zero-point pad's widths sit
    hw = (1, 2) if layout == "NHWC" else (2, 3)
    if not any(pad):  # fold an explicit zero-point pad (quantize.py writes one for zp != 0)
        src = defs.get(data)
        if op_name(src) == "relax.nn.pad" and str(src.attrs.pad_mode) == "constant":
            pw = [int(v) for v in src.attrs.pad_width]
            pv = float(src.attrs.pad_value)
            others = [pw[2 * i + j] for i in range(4) if i not in hw for j in (0, 1)] if len(pw) == 8 else [1]
            if not any(others) and pv == int(pv) and 0 <= pv <= 255 and dtype_of(src.args[0]) == "uint8":
                ph, pwid = pw[2 * hw[0]:2 * hw[0] + 2], pw[2 * hw[1]:2 * hw[1] + 2]
                data, pad, pad_value = src.args[0], [ph[0], pwid[0], ph[1], pwid[1]], int(pv)
                shape = shape_of(data)
                if shape is None:
                    return None
    w = weight.value.numpy()
    if layout == "NHWC":
        shape = [shape[0], shape[3], shape[1], shape[2]]  # as (N, C, H, W)
        w = w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return {"data": data, "shape": shape, "weight": w, "strides": tuple(int(s) for s in a.strides),
            "padding": tuple(pad), "pad_value": pad_value, "layout": layout}


def _matmul_plan(call: Any) -> tuple | None:
    """(data, int8 weight [K, N], data shape, M, K, N) for a matmul the kernel handles, else None."""
    import tvm

    data, weight = call.args[0], call.args[1]
    if (dtype_of(data) != "uint8" or not isinstance(weight, tvm.ir.expr.Constant)
            or str(weight.ty.dtype) != "int8" or len(weight.ty.shape.values) != 2
            or str(call.attrs.out_dtype) != "int32"):
        return None
    shape = shape_of(data)
    if shape is None or len(shape) < 1:
        return None
    wq = weight.value.numpy()
    k, n = wq.shape
    if shape[-1] != k:
        return None
    return data, wq, shape, int(np.prod(shape[:-1])) if len(shape) > 1 else 1, k, n


def planned_layers(mod: Any, layouts: tuple[str, ...] = ("NCHW", "NHWC")) -> dict[str, int]:
    """How many int8 conv2d / matmul ops of ``mod["main"]`` :func:`rewrite_kernels` would take
    (convs in ``layouts``)."""
    if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return {"conv2d": 0, "matmul": 0}
    binds = bindings(mod["main"])
    defs = {b.var: b.value for b in binds}
    ops = [b.value for b in binds]
    return {"conv2d": sum(1 for v in ops if op_name(v) == "relax.nn.conv2d"
                          and (_conv_plan(v, defs) or {}).get("layout") in layouts),
            "matmul": sum(1 for v in ops if op_name(v) == "relax.matmul" and _matmul_plan(v) is not None)}


class Kernels:
    """The kernels one instruction set gives the rewrite (:func:`rewrite_kernels`): a PrimFunc
    per conv / matmul shape and the constants each call passes after the activation (packed
    weights, correction). :class:`CpuKernels` here; CUDA ``dp4a`` in :mod:`tvmedge.lower.dp4a`."""

    key = ""  # PrimFunc name prefix
    layouts: tuple[str, ...] = ("NCHW", "NHWC")  # conv activation layouts taken

    def conv(self, p: dict[str, Any], epi: Any) -> Any:
        raise NotImplementedError

    def conv_consts(self, wq: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def conv_info(self, ow: int, o: int) -> dict[str, Any]:
        return {}

    def conv_epilogue(self, epi: Any, wq: np.ndarray) -> Any:
        """The conv's epilogue as this kernel set computes it (``wq``: int8 OIHW weights)."""
        return epi

    def matmul(self, m: int, k: int, n: int) -> Any:
        raise NotImplementedError

    def matmul_consts(self, wq: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def matmul_info(self, m: int, n: int) -> dict[str, Any]:
        return {}


class CpuKernels(Kernels):
    """VNNI / ``sdot`` kernels of this module."""

    def __init__(self, isa: DotIsa) -> None:
        self.isa, self.key = isa, isa.key

    def conv(self, p: dict[str, Any], epi: Any) -> Any:
        n, c, h, w = p["shape"]
        o, _, kh, kw = p["weight"].shape
        return conv2d_func(n, c, h, w, o, kh, kw, p["strides"], p["padding"], p["pad_value"], isa=self.isa,
                           layout=p["layout"], epilogue=epi)

    def conv_consts(self, wq: np.ndarray) -> list[np.ndarray]:
        return [pack_conv_weight(wq, self.isa.lanes)] + ([shift_correction(wq, 0)] if self.isa.shift else [])

    def conv_info(self, ow: int, o: int) -> dict[str, Any]:
        return {"tiles": list(conv_tiles(ow, o, self.isa))}

    def conv_epilogue(self, epi: Any, wq: np.ndarray) -> Any:
        # uint8 activations: the accumulator lies within 255 x the sum of the negative /
        # positive weights of its output channel
        w = wq.astype(np.int64).reshape(wq.shape[0], -1)
        return epilogue.integer_tail(epi, 255.0 * np.minimum(w, 0).sum(1), 255.0 * np.maximum(w, 0).sum(1))

    def matmul(self, m: int, k: int, n: int) -> Any:
        return matmul_func(m, k, n, isa=self.isa)

    def matmul_consts(self, wq: np.ndarray) -> list[np.ndarray]:
        return [pack_matmul_weight(wq, self.isa.lanes)] + ([shift_correction(wq, 1)] if self.isa.shift else [])

    def matmul_info(self, m: int, n: int) -> dict[str, Any]:
        return {"tiles": list(matmul_tiles(m, n, self.isa))}


class _Rewriter:
    """Builds the rewritten ``main``; one PrimFunc per distinct kernel shape."""

    def __init__(self) -> None:
        self.funcs: dict[tuple, Any] = {}
        self.layers: list[dict[str, Any]] = []

    def func(self, builder: Any, key: tuple, make) -> Any:
        if key not in self.funcs:
            self.funcs[key] = builder.add_func(make().without_attr("global_symbol"), f"{key[0]}_{len(self.funcs)}")
        return self.funcs[key]


def rewrite_dot(mod: Any, target: Any = None, isa: DotIsa | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """Replace the int8 conv2d / matmul ops of ``mod["main"]`` by dot-product kernels.

    ``isa`` defaults to :func:`isa_for` ``target``. Returns the new module and one entry per
    rewritten op; does nothing (returns ``mod`` and ``[]``) when there is no instruction set
    for the target."""
    isa = isa or isa_for(target)
    if isa is None:
        return mod, []
    return rewrite_kernels(mod, CpuKernels(isa))


def rewrite_kernels(mod: Any, kernels: Kernels) -> tuple[Any, list[dict[str, Any]]]:
    """Replace the int8 conv2d / matmul ops of ``mod["main"]`` by ``kernels``' PrimFuncs, each
    conv with its epilogue chain (:mod:`.epilogue`) inside. Returns the new module and one
    entry per rewritten op (``mod`` and ``[]`` when nothing was taken)."""
    from tvm import relax


    if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, []
    defs = {b.var: b.value for b in bindings(mod["main"])}
    state = _Rewriter()
    # each conv's epilogue chain (bias, scale, requantize) goes into its kernel: the kernel
    # computes the chain's last value, and the conv and the chain's ops are left dead
    plans = {var: _conv_plan(v, defs) for var, v in defs.items() if op_name(v) == "relax.nn.conv2d"}
    plans = {var: p for var, p in plans.items() if p is not None and p["layout"] in kernels.layouts}
    heads = {var: (int(p["weight"].shape[0]), 3 if p["layout"] == "NHWC" else 1) for var, p in plans.items()}
    found = epilogue.chains(mod["main"], heads) if os.environ.get(EPILOGUE_SWITCH, "1") != "0" else {}
    ends = {defs[e.end]: (plans[var], e) for var, e in found.items()}
    unfused = {defs[var]: p for var, p in plans.items() if var not in found}  # call -> plan

    @relax.expr_functor.mutator
    class Mutator(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            op = op_name(call)
            if call in ends:
                return self.conv(*ends[call])
            if call in unfused:
                return self.conv(unfused[call])
            elif op == "relax.matmul":
                new = self.matmul(call)
                if new is not None:
                    return new
            return super().visit_call_(call)

        def conv(self, p: dict[str, Any], epi: Any = None) -> Any:
            n, c, h, w = p["shape"]
            wq = p["weight"]
            epi = kernels.conv_epilogue(epi, wq) if epi is not None else None
            o, _, kh, kw = wq.shape
            (pt, pl, pb, pr), (sh, sw) = p["padding"], p["strides"]
            oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
            nhwc = p["layout"] == "NHWC"
            key = (f"{kernels.key}_conv2d", n, c, h, w, o, kh, kw, p["strides"], p["padding"], p["pad_value"],
                   p["layout"], epi.key() if epi is not None else None)
            gv = state.func(self.builder_, key, lambda: kernels.conv(p, epi))
            state.layers.append({"op": "conv2d", "in": [n, c, h, w], "out": [n, o, oh, ow], "kernel": [kh, kw],
                                 "stride": [sh, sw], **kernels.conv_info(ow, o),
                                 "pad_folded": p["pad_value"] != 0, "layout": p["layout"],
                                 "epilogue": [s.op for s in epi.steps] if epi is not None else []})
            x = self.visit_expr(p["data"])
            consts = kernels.conv_consts(wq) + list(epi.consts if epi is not None else [])
            dtype = epi.dtype if epi is not None else "int32"
            return relax.call_tir(gv, [x] + [relax.const(v) for v in consts],
                                  out_ty=relax.TensorType([n, oh, ow, o] if nhwc else [n, o, oh, ow], dtype))

        def matmul(self, call: Any) -> Any | None:
            plan = _matmul_plan(call)
            if plan is None:
                return None
            data, wq, shape, m, k, n = plan
            gv = state.func(self.builder_, (f"{kernels.key}_matmul", m, k, n), lambda: kernels.matmul(m, k, n))
            state.layers.append({"op": "matmul", "m": m, "k": k, "n": n, **kernels.matmul_info(m, n)})
            x = self.visit_expr(data)
            if len(shape) != 2:
                x = self.builder_.emit(relax.op.reshape(x, [m, k]))
            args = [x] + [relax.const(v) for v in kernels.matmul_consts(wq)]
            y = relax.call_tir(gv, args, out_ty=relax.TensorType([m, n], "int32"))
            if len(shape) != 2:
                y = relax.op.reshape(self.builder_.emit(y), list(shape[:-1]) + [n])
            return y

    mut = Mutator(mod)
    gv = mod.get_global_var("main")
    new_main = mut.visit_expr(mod["main"])
    if not state.layers:
        return mod, []
    mut.builder_.update_func(gv, new_main)
    new = mut.builder_.get()
    new = relax.transform.Normalize()(new)
    new = relax.transform.DeadCodeElimination(["main"])(new)
    return new, state.layers


def apply(model: Any, target: Any) -> Any:
    """``model`` (an :class:`~tvmedge.frontend.ImportedModel`) with the rewrite recorded in
    ``rewrites`` when :func:`enabled` for ``target`` and it has int8 ops the kernels take; else
    ``model``. The rewrite itself happens in ``lower.pipeline.prepare`` once the graph is NHWC
    (:func:`rewrite_module`), so the kernels chain with their NHWC neighbours (depthwise convs,
    epilogues) without transposes: run on the import's NCHW graph, every block of an int8
    MobileNetV2 transposed its activations twice (~25% of its time)."""
    isa = enabled(target)
    if isa is None:
        return model
    counts = planned_layers(model.mod)
    if not sum(counts.values()):
        return model
    record = {"rewrite": isa.rewrite, "layers": sum(counts.values()), **counts}
    return dataclasses.replace(model, rewrites=list(model.rewrites) + [record])


def rewrite_module(mod: Any, target: Any) -> Any:
    """:func:`rewrite_dot` for ``target`` when :func:`enabled` (run by ``lower.pipeline.prepare``)."""
    isa = enabled(target)
    return rewrite_dot(mod, isa=isa)[0] if isa is not None else mod
