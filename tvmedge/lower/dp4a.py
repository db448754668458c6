"""int8 conv2d / matmul on CUDA's ``dp4a`` (sm_61 and newer: Jetson Xavier sm_72; Nano's sm_53 has none).

``dp4a`` adds the dot product of two words of 4 signed bytes to an int32 (``__dp4a(a, b, c)``
in CUDA C, ``dp4a.s32.s32`` in PTX): 4 multiply-adds per instruction, 4x the fp32 rate. TVM
0.27 has no CUDA int8 schedule that uses it (its ``dp4a_*`` tensor intrinsics expect operands
staged in shared memory and no rule applies them), so the quantizer's int8 ops
(``R.nn.conv2d`` / ``R.matmul`` of a uint8 activation and an int8 constant weight,
``out_dtype="int32"``) would run as generic int32 loops. Like :mod:`.int8_dot` for the CPU
instructions, :func:`rewrite_module` replaces each of them by a ``call_tir`` to a kernel of
this module (the same Relax rewrite, :func:`tvmedge.lower.int8_dot.rewrite_kernels`):

* weights packed at rewrite time as int32 words of 4 consecutive input channels (conv
  ``[O, KH, KW, Cp/4]``, matmul ``[N, Kp/4]``, C / K zero-padded to a multiple of 4);
* a pack stage writes the activation as words of 4 channels, ``[N, Cp/4, H+pads, W+pads]``
  (matmul ``[M, Kp/4]``), spatial padding filled with the pad value (a zero-point pad that
  fed the conv is folded in). ``dp4a`` has no uint8 x int8 form, so each byte is stored as
  ``x - 128`` and ``128 * sum(W[o])`` (a constant per output channel) is added back: the int32
  result is exactly the generic op's;
* the conv accumulates ``o_tile`` output channels x ``x_tile`` output columns per thread in
  registers (an input word feeds ``o_tile`` dp4a's, a weight word ``x_tile``), threads over
  (n, channel group, row, column group), and runs the conv's epilogue chain (bias, scale,
  ReLU6, the next layer's requantize: :mod:`.epilogue`) on the registers before writing,
  so the kernel writes uint8 rather than int32;
* the matmul computes one output per thread over the packed K words.

The kernels are marked scheduled (dlight and MetaSchedule leave them alone; ``tvmedge tune``
tunes the rest of the graph). They are a first, plain schedule: no shared-memory tiling and
not measured on a GPU (none in this project's machines). What is checked here without a GPU:
the PTX holds ``dp4a`` for sm_72 (``tests/test_cuda.py``), and the same kernels with
``dp4a`` spelled out as byte products (:data:`CHECK`, built for this CPU) are bit-exact with
the generic int8 ops, op by op and through a whole quantized model (with
``TVMEDGE_INT8_EXACT=1``: by default the epilogue folds the requantize divide into the scale,
as on CPUs, see :func:`tvmedge.lower.epilogue.fold_scales`). ``TVMEDGE_INT8_DOT=0`` turns the
rewrite off.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from ..core.graph import finish_kernel, first_divisor
from .int8_dot import Kernels, _ceil, planned_layers, rewrite_kernels, shift_correction, switched_off

REWRITE = "int8-cuda-dp4a"
CUDA = "cuda"  # kernels with __dp4a and GPU thread bindings
CHECK = "check"  # the same arithmetic, dp4a spelled out, unscheduled: for a CPU build in tests
MIN_ARCH = 61
THREADS = 128


def arch_of(target: Any) -> int | None:
    """The compute capability of a CUDA target (``sm_72`` -> 72), else None."""
    if target is None or target.kind.name != "cuda":
        return None
    m = re.fullmatch(r"sm_(\d+)", str(target.attrs.get("arch", "")))
    return int(m.group(1)) if m else None


def has_dp4a(target: Any) -> bool:
    """Whether ``target`` is a CUDA target whose arch has ``dp4a`` (sm_61+)."""
    arch = arch_of(target)
    return arch is not None and arch >= MIN_ARCH


def enabled(target: Any) -> bool:
    """:func:`has_dp4a` ``target``, unless ``TVMEDGE_INT8_DOT`` is ``0``."""
    return not switched_off() and has_dp4a(target)


# ----------------------------------------------------------------------------- packing
def pack_words(w: np.ndarray) -> np.ndarray:
    """int8 ``[..., K]`` -> int32 ``[..., Kp/4]``: 4 consecutive values per word, byte 0 lowest
    (K zero-padded to a multiple of 4)."""
    k = w.shape[-1]
    padded = np.zeros(w.shape[:-1] + (_ceil(k, 4),), np.int8)
    padded[..., :k] = w
    return np.ascontiguousarray(padded).view("<i4")


def pack_conv_weight(wq: np.ndarray) -> np.ndarray:
    """int8 OIHW -> int32 ``[O, KH, KW, Cp/4]``."""
    return pack_words(wq.transpose(0, 2, 3, 1))


def pack_matmul_weight(wq: np.ndarray) -> np.ndarray:
    """int8 ``[K, N]`` -> int32 ``[N, Kp/4]``."""
    return pack_words(wq.T)


def conv_tiles(ow: int, o: int) -> tuple[int, int]:
    """``(x_tile, o_tile)``: output columns x output channels one thread keeps in registers."""
    return first_divisor(ow, (2, 1)), first_divisor(o, (4, 2, 1))


# ----------------------------------------------------------------------------- TIR
def _word(bytes_u8: list[Any]) -> Any:
    """One int32 word from 4 uint8 values (byte 0 lowest), each stored as the int8 ``x - 128``
    (whose two's-complement byte is ``x ^ 0x80``)."""
    from tvm import tirx

    word = tirx.const(0, "uint32")
    for k, b in enumerate(bytes_u8):
        word = word | ((b.astype("uint32") ^ tirx.const(0x80, "uint32")) << tirx.const(8 * k, "uint32"))
    return tirx.reinterpret("int32", word)


def _dot4(a: Any, b: Any, flavour: str) -> Any:
    """``sum(a.byte[k] * b.byte[k])``, signed bytes: ``__dp4a`` on CUDA, byte products on :data:`CHECK`."""
    from tvm import tirx

    if flavour == CUDA:
        return tirx.call_pure_extern("int32", "__dp4a", a, b, tirx.const(0, "int32"))
    total = None
    for k in range(4):
        prod = ((a >> (8 * k)).astype("int8").astype("int32")) * ((b >> (8 * k)).astype("int8").astype("int32"))
        total = prod if total is None else total + prod
    return total


def _thread_tile(sch: Any, blk: Any, spatial: Any, reduce_from: Any) -> None:
    """``spatial`` (a fused loop of ``blk``) over blocks x :data:`THREADS` threads, each thread's
    results in registers (``local``) initialised above ``reduce_from``, and the ``out`` stage
    (correction, epilogue) applied to them on the way out."""
    bx, tx = sch.split(spatial, [None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    tile = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_inline(sch.get_sblock("out"))
    sch.reverse_compute_at(tile, tx)
    sch.decompose_reduction(blk, reduce_from)


def _bind_flat(sch: Any, block: Any) -> None:
    """All loops of ``block`` fused and spread over blocks x :data:`THREADS` threads."""
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    bx, tx = sch.split(fused, [None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def conv2d_func(n: int, c: int, h: int, w: int, o: int, kh: int, kw: int, strides: tuple[int, int],
                padding: tuple[int, int, int, int], pad_value: int = 0, epilogue: Any = None,
                flavour: str = CUDA):
    """PrimFunc ``(x uint8 NCHW, w int32 [O, KH, KW, Cp/4], corr int32 [O], *epilogue consts, out)``;
    ``out`` is int32 ``[N, O, OH, OW]``, or the epilogue chain's result."""
    from tvm import s_tir, te, tirx

    from . import epilogue as epi

    sh, sw = strides
    pt, pl, pb, pr = padding
    cw = _ceil(c, 4) // 4
    hp, wp = h + pt + pb, w + pl + pr
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    x = te.placeholder((n, c, h, w), "uint8", name="x")
    wt = te.placeholder((o, kh, kw, cw), "int32", name="w")
    corr = te.placeholder((o,), "int32", name="corr")

    def byte(ni, ci, yy, xx):
        v = x[ni, ci, yy - pt, xx - pl]
        if any(padding):
            inside = tirx.all(yy >= pt, yy < h + pt, xx >= pl, xx < w + pl)
            v = tirx.if_then_else(inside, v, tirx.const(pad_value, "uint8"))
        return v

    def pack(ni, cb, yy, xx):
        vals = []
        for k in range(4):  # channel 4 * cb + k; padded channels are 0 (their weights are 0 too)
            ci = cb * 4 + k
            vals.append(tirx.if_then_else(ci < c, byte(ni, tirx.min(ci, c - 1), yy, xx), tirx.const(0, "uint8"))
                        if c % 4 else byte(ni, ci, yy, xx))
        return _word(vals)

    xp = te.compute((n, cw, hp, wp), pack, name="pack")
    rc, rh, rw = te.reduce_axis((0, cw), "rc"), te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    acc = te.compute((n, o, oh, ow), lambda ni, oc, y, xx: te.sum(
        _dot4(xp[ni, rc, y * sh + rh, xx * sw + rw], wt[oc, rh, rw, rc], flavour), axis=[rc, rh, rw]), name="acc")
    extra = epi.inputs(epilogue, o) if epilogue is not None else []

    def write_back(ni, oc, y, xx):
        v = acc[ni, oc, y, xx] + corr[oc]
        return epi.compute(epilogue, v, oc, extra, cpu=False) if epilogue is not None else v

    out = te.compute((n, o, oh, ow), write_back, name="out")
    sch = s_tir.Schedule(te.create_prim_func([x, wt, corr] + extra + [out]))
    if flavour == CUDA:
        _bind_flat(sch, sch.get_sblock("pack"))
        xt, ot = conv_tiles(ow, o)
        blk = sch.get_sblock("acc")
        ni, oc, y, xx, r_c, r_h, r_w = sch.get_loops(blk)
        oco, oci = sch.split(oc, [None, ot])
        xo, xi = sch.split(xx, [None, xt])
        sch.reorder(ni, oco, y, xo, r_c, r_h, r_w, oci, xi)
        _thread_tile(sch, blk, sch.fuse(ni, oco, y, xo), r_c)
        sch.unroll(oci)
        sch.unroll(xi)
    return finish_kernel(sch)


def matmul_func(m: int, k: int, n: int, flavour: str = CUDA):
    """PrimFunc ``(a uint8 [M, K], w int32 [N, Kp/4], corr int32 [N], out int32 [M, N])``."""
    from tvm import s_tir, te, tirx

    kw = _ceil(k, 4) // 4
    a = te.placeholder((m, k), "uint8", name="a")
    wt = te.placeholder((n, kw), "int32", name="w")
    corr = te.placeholder((n,), "int32", name="corr")

    def pack(i, r):
        vals = []
        for j in range(4):
            ki = r * 4 + j
            vals.append(tirx.if_then_else(ki < k, a[i, tirx.min(ki, k - 1)], tirx.const(0, "uint8"))
                        if k % 4 else a[i, ki])
        return _word(vals)

    ap = te.compute((m, kw), pack, name="pack")
    r = te.reduce_axis((0, kw), "r")
    acc = te.compute((m, n), lambda i, j: te.sum(_dot4(ap[i, r], wt[j, r], flavour), axis=r), name="acc")
    out = te.compute((m, n), lambda i, j: acc[i, j] + corr[j], name="out")
    sch = s_tir.Schedule(te.create_prim_func([a, wt, corr, out]))
    if flavour == CUDA:
        _bind_flat(sch, sch.get_sblock("pack"))
        blk = sch.get_sblock("acc")
        i, j, rr = sch.get_loops(blk)
        _thread_tile(sch, blk, sch.fuse(i, j), rr)
    return finish_kernel(sch)


# ----------------------------------------------------------------------------- Relax rewrite
class Dp4aKernels(Kernels):
    """This module's kernels for :func:`~tvmedge.lower.int8_dot.rewrite_kernels` (NCHW graphs:
    CUDA targets keep the import's layout)."""

    layouts = ("NCHW",)

    def __init__(self, flavour: str = CUDA) -> None:
        self.flavour = flavour
        self.key = "dp4a" if flavour == CUDA else "dp4a_check"

    def conv(self, p: dict[str, Any], epi: Any) -> Any:
        n, c, h, w = p["shape"]
        o, _, kh, kw = p["weight"].shape
        return conv2d_func(n, c, h, w, o, kh, kw, p["strides"], p["padding"], p["pad_value"], epi, self.flavour)

    def conv_consts(self, wq: np.ndarray) -> list[np.ndarray]:
        return [pack_conv_weight(wq), shift_correction(wq, 0)]

    def conv_info(self, ow: int, o: int) -> dict[str, Any]:
        return {"tiles": list(conv_tiles(ow, o))}

    def matmul(self, m: int, k: int, n: int) -> Any:
        return matmul_func(m, k, n, self.flavour)

    def matmul_consts(self, wq: np.ndarray) -> list[np.ndarray]:
        return [pack_matmul_weight(wq), shift_correction(wq, 1)]


def rewrite(mod: Any, flavour: str = CUDA) -> tuple[Any, list[dict[str, Any]]]:
    """The int8 conv2d / matmul ops of ``mod["main"]`` on ``dp4a`` kernels (``flavour``
    :data:`CHECK`: the CPU-buildable twins, for tests)."""
    return rewrite_kernels(mod, Dp4aKernels(flavour))


def rewrite_module(mod: Any, target: Any, flavour: str = CUDA) -> Any:
    """:func:`rewrite` when :func:`enabled` for ``target`` (run by ``lower.pipeline.prepare``)."""
    return rewrite(mod, flavour)[0] if enabled(target) else mod


def apply(model: Any, target: Any) -> Any:
    """``model`` with the rewrite recorded in ``rewrites`` when :func:`enabled` for ``target``
    and it has int8 ops the kernels take (the rewrite itself runs in ``lower.pipeline.prepare``)."""
    if not enabled(target):
        return model
    counts = planned_layers(model.mod, Dp4aKernels.layouts)
    if not sum(counts.values()):
        return model
    record = {"rewrite": REWRITE, "arch": f"sm_{arch_of(target)}", "layers": sum(counts.values()), **counts}
    return dataclasses.replace(model, rewrites=list(model.rewrites) + [record])
