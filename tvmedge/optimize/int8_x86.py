"""int8 conv2d / matmul on x86 AVX-512 VNNI (``vpdpbusd``): a Relax rewrite to hand-scheduled TIR.

MetaSchedule and dlight never emit ``vpdpbusd`` for the int8 ops that
:mod:`tvmedge.optimize.quantize` writes (``R.nn.conv2d`` / ``R.matmul`` of a uint8 activation
and an int8 constant weight, ``out_dtype="int32"``), so a tuned int8 model is no faster than
fp32. :func:`rewrite_vnni` replaces each such op by ``relax.call_tir`` to a PrimFunc that is
tensorized with the VNNI intrinsic of :mod:`tvmedge.optimize.intrin`, with the weight packed
once, at rewrite time, into the layout the intrinsic reads (64 contiguous bytes per 16x4
tile). The epilogue the quantizer wrote (int32 bias, ``astype``, scale) is untouched; the
int32 result is bit-exact with the generic path (checked in ``tests/test_int8_vnni.py``).

Kernels (one PrimFunc per distinct shape, marked opaque + ``tirx.is_scheduled`` like
:mod:`tvmedge.binary.lower`, so FuseOps / dlight / MetaSchedule leave them alone):

* **conv2d** (groups 1, dilation 1, NCHW/OIHW, any stride / padding): three blocks in one
  PrimFunc. (1) relayout: uint8 NCHW -> channels-last ``[N, H+pads, W+pads, Cp]``, spatial
  padding filled with the pad value (0, or the zero point of an ``R.nn.pad`` that fed the conv,
  which is folded in), channels padded with 0 to ``Cp`` = a multiple of 4. (2) the conv over
  the reduction ``(kh, kw, c/4)`` with the 4 channel bytes contiguous, weights packed
  ``[Op/16, KH, KW, Cp/4, 16, 4]`` (zero rows/columns for the padding), into an o-blocked
  int32 ``[N, Op/16, OH, OW, 16]``; a tile of ``x_tile`` output columns x ``o_blocks`` x 16
  channels is kept in registers (``cache_write`` local, unrolled), the outer
  ``(n, o-block group, output row)`` loop runs in parallel (for layers of at least
  ``PARALLEL_MIN_MACS``: smaller ones run serially, see :func:`worth_parallel`). (3) write-back to int32 NCHW
  ``[N, O, OH, OW]``, dropping the padded channels.
* **matmul** ``[M, K] x [K, N]`` (leading batch dims of the activation are flattened by a
  reshape): K padded to a multiple of 4 (zero bytes, in a small copy block when needed), N to
  a multiple of 16, weights packed ``[Np/16, Kp/4, 16, 4]``; an ``m_tile x n_blocks*16``
  accumulator tile in registers, parallel over the N-block groups.

Tile sizes are heuristics, not a search: in a sweep of x_tile in {2, 4, 7, 8, 14} and o_blocks
in {1, 2, 4} on ResNet-18 / MobileNetV2 shapes (2 threads, znver4) the best few choices were
within ~5 % of each other, while x_tile 2 lost up to 40 % on a wide 1x1 conv, so
:func:`conv_tiles` takes the largest divisor of OW that is <= 8 (at least 4 when one exists)
and 2 channel blocks when they divide; the matmul takes up to 4 N-blocks (independent
accumulator chains for the M = 1 layers) and up to 4 rows.

Where it applies: x86 ``llvm`` targets whose CPU features include ``avx512vnni`` (asked to
LLVM for the target's triple / mcpu / mattr with ``tvm.target.codegen.target_has_features``,
as TVM's own x86 strategies do); for anything else (e.g. aarch64 ``pi4``) :func:`rewrite_vnni`
returns the module unchanged. :func:`tvmedge.build.lower` applies it by default;
``TVMEDGE_VNNI=0`` in the environment turns it off.

Not done: the first layers with 1 or 3 input channels pad C to 4 per tap (up to 4x wasted
MACs on a layer that is cheap anyway; an im2col over (kh, kw, c) would avoid it); grouped /
depthwise convs stay on the generic path; AVX-VNNI (256-bit, no AVX-512) is not targeted.
``tvmedge tune`` tunes the rewritten graph, with the kernels left out of its tasks
(:func:`tvmedge.tune.tuner.tuning_tasks`; MetaSchedule would otherwise make them tasks and
fail on their FLOP estimate).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from .intrin import VNNI_INTRIN_LOCAL, register_vnni

# ~10-20 µs of vpdpbusd work on one core: below it a kernel runs serially.
PARALLEL_MIN_MACS = 1 << 21

CONV_FUNC = "vnni_conv2d"
MATMUL_FUNC = "vnni_matmul"
ENV_SWITCH = "TVMEDGE_VNNI"


def _ceil(v: int, m: int) -> int:
    return -(-v // m) * m


# ----------------------------------------------------------------------------- target
def has_vnni(target: Any) -> bool:
    """Whether ``target`` is an x86 LLVM CPU target with AVX-512 VNNI."""
    from tvm.target import codegen

    if target is None or target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
    if triple.split("-")[0] not in ("x86_64", "i686", "i386"):
        return False
    try:
        return bool(codegen.target_has_features("avx512vnni", target))
    except Exception:  # an LLVM without that CPU / feature name
        return False


def enabled(target: Any) -> bool:
    """The rewrite runs for ``target``: VNNI is there and ``TVMEDGE_VNNI`` is not ``0``."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no") and has_vnni(target)


# ----------------------------------------------------------------------------- weights
def pack_conv_weight(wq: np.ndarray) -> np.ndarray:
    """int8 OIHW -> ``[Op/16, KH, KW, Cp/4, 16, 4]`` (O, C zero-padded to multiples of 16, 4)."""
    o, c, kh, kw = wq.shape
    op, cp = _ceil(o, 16), _ceil(c, 4)
    w = np.zeros((op, cp, kh, kw), np.int8)
    w[:o, :c] = wq
    return np.ascontiguousarray(w.reshape(op // 16, 16, cp // 4, 4, kh, kw).transpose(0, 4, 5, 2, 1, 3))


def pack_matmul_weight(wq: np.ndarray) -> np.ndarray:
    """int8 ``[K, N]`` -> ``[Np/16, Kp/4, 16, 4]`` (K, N zero-padded to multiples of 4, 16)."""
    k, n = wq.shape
    w = np.zeros((_ceil(k, 4), _ceil(n, 16)), np.int8)
    w[:k, :n] = wq
    from .intrin import pack_dense_weight

    return pack_dense_weight(w)


# ----------------------------------------------------------------------------- tiles
def _divisor(n: int, candidates: tuple[int, ...]) -> int:
    return next((c for c in candidates if n % c == 0), 1)


def conv_tiles(ow: int, o: int) -> tuple[int, int]:
    """``(x_tile, o_blocks)``: output columns x 16-channel blocks held in registers."""
    x_tile = _divisor(ow, (8, 7, 6, 5, 4, 3, 2))
    return x_tile, _divisor(_ceil(o, 16) // 16, (2,))


def matmul_tiles(m: int, n: int) -> tuple[int, int]:
    """``(m_tile, n_blocks)``: rows x 16-column blocks held in registers."""
    return _divisor(m, (4, 2)), _divisor(_ceil(n, 16) // 16, (4, 2))


# ----------------------------------------------------------------------------- TIR kernels
def conv2d_func(n: int, c: int, h: int, w: int, o: int, kh: int, kw: int, strides: tuple[int, int],
                padding: tuple[int, int, int, int], pad_value: int = 0, x_tile: int | None = None,
                o_blocks: int | None = None):
    """PrimFunc ``(x uint8 NCHW, w packed int8, out int32 NCHW)``; ``padding`` is (top, left,
    bottom, right), filled with ``pad_value``."""
    from tvm import s_tir, te, tirx

    from ..binary.lower import _finish

    register_vnni()
    sh, sw = strides
    pt, pl, pb, pr = padding
    cp, op = _ceil(c, 4), _ceil(o, 16)
    hp, wp = h + pt + pb, w + pl + pr
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    xt, obt = conv_tiles(ow, o)
    xt, obt = x_tile or xt, o_blocks or obt
    x = te.placeholder((n, c, h, w), "uint8", name="x")
    wt = te.placeholder((op // 16, kh, kw, cp // 4, 16, 4), "int8", name="w")

    def relayout(ni, yy, xx, ci):
        inside = [yy >= pt, yy < h + pt, xx >= pl, xx < w + pl] if any(padding) else []
        v = x[ni, tirx.min(ci, c - 1) if cp != c else ci, yy - pt, xx - pl]
        if inside:
            v = tirx.if_then_else(tirx.all(*inside), v, tirx.const(pad_value, "uint8"))
        if cp != c:  # channel padding is 0 (its weights are 0 too)
            v = tirx.if_then_else(ci < c, v, tirx.const(0, "uint8"))
        return v

    a = te.compute((n, hp, wp, cp), relayout, name="nhwc")
    rh, rw, rc = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw"), te.reduce_axis((0, cp), "rc")
    acc = te.compute((n, op // 16, oh, ow, 16), lambda ni, ob, y, xx, oi: te.sum(
        a[ni, y * sh + rh, xx * sw + rw, rc].astype("int32") * wt[ob, rh, rw, rc // 4, oi, rc % 4].astype("int32"),
        axis=[rh, rw, rc]), name="acc")
    out = te.compute((n, o, oh, ow), lambda ni, oc, y, xx: acc[ni, oc // 16, y, xx, oc % 16], name="out")
    sch = s_tir.Schedule(te.create_prim_func([x, wt, out]))

    blk = sch.get_sblock("acc")
    ni, ob, y, xx, oi, i, j, r = sch.get_loops(blk)
    obo, obi = sch.split(ob, [None, obt])
    xo, xi = sch.split(xx, [None, xt])
    ro, ri = sch.split(r, [None, 4])
    sch.reorder(ni, obo, y, xo, i, j, ro, xi, obi, oi, ri)
    par = worth_parallel(n * op * oh * ow * kh * kw * cp)
    outer = sch.fuse(ni, obo, y)
    if par:
        sch.parallel(outer)
    _register_tile(sch, blk, xo, i, oi, (xi, obi))  # xt x obt x 16 accumulators in registers
    if par:  # the relayout and the write-back are as big as the conv: parallel with it
        for name in ("nhwc", "out"):
            loops = sch.get_loops(sch.get_sblock(name))
            sch.parallel(sch.fuse(loops[0], loops[1]))
    return _finish(sch)


def worth_parallel(macs: int) -> bool:
    """Whether a kernel of ``macs`` multiply-adds should run on the thread pool: waking the
    pool costs a few µs per parallel loop, more than a small layer takes on one core
    (digits-cnn, 2 threads: 0.075 ms with every kernel parallel, 0.043 ms with none)."""
    return macs >= PARALLEL_MIN_MACS


def _register_tile(sch, blk, at, reduce_from, lanes, unrolled) -> None:
    """Accumulate ``blk`` in a register tile written back under loop ``at``; initialise it
    above ``reduce_from``; ``lanes`` (16 output lanes x 4 bytes) becomes one ``vpdpbusd``;
    the ``unrolled`` loops spread the tile over independent accumulators."""
    tile = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(tile, at)
    init = sch.decompose_reduction(blk, reduce_from)
    sch.tensorize(lanes, VNNI_INTRIN_LOCAL)
    for loop in unrolled:
        sch.unroll(loop)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(tile)[-1])


def matmul_func(m: int, k: int, n: int, m_tile: int | None = None, n_blocks: int | None = None):
    """PrimFunc ``(a uint8 [M, K], w packed int8, out int32 [M, N])``."""
    from tvm import s_tir, te, tirx

    from ..binary.lower import _finish

    register_vnni()
    kp, np_ = _ceil(k, 4), _ceil(n, 16)
    mt, nbt = matmul_tiles(m, n)
    mt, nbt = m_tile or mt, n_blocks or nbt
    a = te.placeholder((m, k), "uint8", name="a")
    wt = te.placeholder((np_ // 16, kp // 4, 16, 4), "int8", name="w")
    src = a
    if kp != k:
        src = te.compute((m, kp), lambda i, r: tirx.if_then_else(r < k, a[i, tirx.min(r, k - 1)],
                                                                  tirx.const(0, "uint8")), name="apad")
    r = te.reduce_axis((0, kp), "r")
    acc = te.compute((m, np_), lambda i, j: te.sum(
        src[i, r].astype("int32") * wt[j // 16, r // 4, j % 16, r % 4].astype("int32"), axis=r), name="acc")
    out = acc if np_ == n else te.compute((m, n), lambda i, j: acc[i, j], name="out")
    sch = s_tir.Schedule(te.create_prim_func([a, wt, out]))

    blk = sch.get_sblock("acc")
    i, j, rr = sch.get_loops(blk)
    jb, ji = sch.split(j, [None, 16])
    jbo, jbi = sch.split(jb, [None, nbt])
    io, ii = sch.split(i, [None, mt])
    ro, ri = sch.split(rr, [None, 4])
    sch.reorder(jbo, io, ro, ii, jbi, ji, ri)
    outer = sch.fuse(jbo, io)
    if worth_parallel(m * kp * np_):
        sch.parallel(outer)
    _register_tile(sch, blk, outer, ro, ji, (ii, jbi))
    return _finish(sch)


# ----------------------------------------------------------------------------- Relax rewrite
def _conv_plan(call: Any, defs: dict) -> dict[str, Any] | None:
    """What the conv kernel needs, or None when the conv is not one VNNI handles."""
    import tvm

    from .quantize import _dtype, _op, _shape

    a = call.attrs
    data, weight = call.args[0], call.args[1]
    layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout))
    if (_dtype(data) != "uint8" or not isinstance(weight, tvm.ir.expr.Constant) or str(weight.ty.dtype) != "int8"
            or str(a.out_dtype) != "int32" or int(a.groups) != 1 or any(int(d) != 1 for d in a.dilation)
            or layouts != ("NCHW", "OIHW", "NCHW")):
        return None
    shape = _shape(data)
    if shape is None or len(shape) != 4:
        return None
    pad = [int(v) for v in a.padding]  # top, left, bottom, right
    pad_value = 0
    if not any(pad):  # fold an explicit zero-point pad (quantize.py writes one for zp != 0)
        src = defs.get(data)
        if _op(src) == "relax.nn.pad" and str(src.attrs.pad_mode) == "constant":
            pw = [int(v) for v in src.attrs.pad_width]
            pv = float(src.attrs.pad_value)
            if len(pw) == 8 and not any(pw[:4]) and pv == int(pv) and 0 <= pv <= 255 and _dtype(src.args[0]) == "uint8":
                data, pad, pad_value = src.args[0], [pw[4], pw[6], pw[5], pw[7]], int(pv)
                shape = _shape(data)
                if shape is None:
                    return None
    return {"data": data, "shape": shape, "weight": weight.value.numpy(), "strides": tuple(int(s) for s in a.strides),
            "padding": tuple(pad), "pad_value": pad_value}


class _Rewriter:
    """Builds the rewritten ``main``; one PrimFunc per distinct kernel shape."""

    def __init__(self) -> None:
        self.funcs: dict[tuple, Any] = {}
        self.layers: list[dict[str, Any]] = []

    def func(self, builder: Any, key: tuple, make) -> Any:
        if key not in self.funcs:
            self.funcs[key] = builder.add_func(make().without_attr("global_symbol"), f"{key[0]}_{len(self.funcs)}")
        return self.funcs[key]


def rewrite_vnni(mod: Any, target: Any = None, force: bool = False) -> tuple[Any, list[dict[str, Any]]]:
    """Replace the int8 conv2d / matmul ops of ``mod["main"]`` by VNNI kernels.

    Returns the new module and one entry per rewritten op. Does nothing (returns ``mod`` and
    ``[]``) unless ``target`` has VNNI (:func:`has_vnni`) or ``force`` is set."""
    from tvm import relax

    from .quantize import _bindings, _dtype, _op, _shape

    if not force and not has_vnni(target):
        return mod, []
    if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, []
    defs = {b.var: b.value for b in _bindings(mod["main"])}
    state = _Rewriter()

    @relax.expr_functor.mutator
    class Mutator(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            op = _op(call)
            if op == "relax.nn.conv2d":
                plan = _conv_plan(call, defs)
                if plan is not None:
                    return self.conv(plan)
            elif op == "relax.matmul":
                new = self.matmul(call)
                if new is not None:
                    return new
            return super().visit_call_(call)

        def conv(self, p: dict[str, Any]) -> Any:
            n, c, h, w = p["shape"]
            wq = p["weight"]
            o, _, kh, kw = wq.shape
            (pt, pl, pb, pr), (sh, sw) = p["padding"], p["strides"]
            oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
            key = (CONV_FUNC, n, c, h, w, o, kh, kw, p["strides"], p["padding"], p["pad_value"])
            gv = state.func(self.builder_, key, lambda: conv2d_func(n, c, h, w, o, kh, kw, p["strides"],
                                                                     p["padding"], p["pad_value"]))
            state.layers.append({"op": "conv2d", "in": [n, c, h, w], "out": [n, o, oh, ow], "kernel": [kh, kw],
                                 "stride": [sh, sw], "tiles": list(conv_tiles(ow, o)),
                                 "pad_folded": p["pad_value"] != 0})
            x = self.visit_expr(p["data"])
            return relax.call_tir(gv, [x, relax.const(pack_conv_weight(wq))],
                                  out_ty=relax.TensorType([n, o, oh, ow], "int32"))

        def matmul(self, call: Any) -> Any | None:
            import tvm

            data, weight = call.args[0], call.args[1]
            if (_dtype(data) != "uint8" or not isinstance(weight, tvm.ir.expr.Constant)
                    or str(weight.ty.dtype) != "int8" or len(weight.ty.shape.values) != 2
                    or str(call.attrs.out_dtype) != "int32"):
                return None
            shape = _shape(data)
            if shape is None or len(shape) < 1:
                return None
            wq = weight.value.numpy()
            k, n = wq.shape
            if shape[-1] != k:
                return None
            m = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            key = (MATMUL_FUNC, m, k, n)
            gv = state.func(self.builder_, key, lambda: matmul_func(m, k, n))
            state.layers.append({"op": "matmul", "m": m, "k": k, "n": n, "tiles": list(matmul_tiles(m, n))})
            x = self.visit_expr(data)
            if len(shape) != 2:
                x = self.builder_.emit(relax.op.reshape(x, [m, k]))
            y = relax.call_tir(gv, [x, relax.const(pack_matmul_weight(wq))], out_ty=relax.TensorType([m, n], "int32"))
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
    """``model`` (an :class:`~tvmedge.frontend.ImportedModel`) with its int8 ops on VNNI kernels
    when :func:`enabled` for ``target``, the rewrite recorded in ``rewrites``; else ``model``."""
    if not enabled(target):
        return model
    mod, layers = rewrite_vnni(model.mod, target)
    if not layers:
        return model
    record = {"rewrite": "int8-x86-vnni", "layers": len(layers),
              "conv2d": sum(1 for x in layers if x["op"] == "conv2d"),
              "matmul": sum(1 for x in layers if x["op"] == "matmul")}
    return dataclasses.replace(model, mod=mod, rewrites=list(model.rewrites) + [record])
