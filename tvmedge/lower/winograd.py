"""Winograd F(m x m, 3 x 3) for dense 3x3 stride-1 NHWC convolutions on CPUs (a Relax pass).

A 3x3 convolution computed tile by tile with Winograd's minimal filtering does the same sum
with fewer multiplications: for F(4x4, 3x3) the matrix products cost 36 instead of 144
multiply-adds per output tile and channel pair, 4x less. The conv becomes three kernels:

- ``winograd_in``: the input transform ``V = B^T d B`` of every (m+2)x(m+2) input tile
  (padding included), laid out ``[alpha*alpha, tiles, C]``;
- a batched matrix product ``M[ab] = V[ab] @ U[ab]`` (a plain ``relax.matmul``: the CPU rules
  and MetaSchedule schedule and tune it like any other); ``U = G g G^T``, the transformed
  weights, is computed here with numpy at compile time;
- ``winograd_out``: the output transform ``Y = A^T M A``, into which FuseOps fuses the conv's
  epilogue (bias, ReLU, a residual add).

The transforms are written as explicit sums with the (constant) matrix entries, selected by
the tile position; :class:`WinogradTransform` in ``cpu_rules`` unrolls those positions, so
the selects fold and only the non-zero terms remain. The matrices (Cook-Toom, with the
interpolation points of Barabasz et al.) come from TOPI's ``winograd_util``.

Numerics: Winograd is exact in real arithmetic but not a reassociation only: its float
error is larger than a direct conv's (on the order of 1e-6 relative for F(4x4, 3x3) with
these points, against ~1e-7). Tests compare with ONNX Runtime. ``TVMEDGE_WINOGRAD=0``
turns it off. RVV targets do not get it (``lower.pipeline``): TVM 0.27's RVV
lowering fails on the transforms' vector selects (a scalable-vector lane mismatch).

Which convs: 3x3, stride 1, dilation 1, groups 1, constant weights, at least
:data:`MIN_CHANNELS` input and output channels, input channels that 4 divides (the input
transform vectorizes over them), and output sides that m divides (m = 4, else 2) with at
least :data:`MIN_TILES` tiles: with fewer tiles the transformed weights (alpha^2/9 = 4x the
size for m = 4) are read for too little work (ResNet's 7x7 stage stays direct).
"""

from __future__ import annotations

import os

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..core.graph import dtype_of, rewrite_functions, shape_of

MIN_CHANNELS = 16
MIN_TILES = 49
IN_BLOCKS = ("winograd_in_t", "winograd_in")
OUT_BLOCKS = ("winograd_out_t", "winograd_out")


def matrices(m: int, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (alpha x m), B (alpha x alpha), G (alpha x r) of F(m, r)."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    return _cook_toom_convolution(_interpolation_points(m + r - 2), m, r)


def tile_size(out_h: int, out_w: int, n: int = 1) -> int | None:
    """The m to use for an output of out_h x out_w (None: leave the conv direct)."""
    for m in (4, 2):
        if out_h % m == 0 and out_w % m == 0 and n * (out_h // m) * (out_w // m) >= MIN_TILES:
            return m
    return None


def _sum(coefs: np.ndarray, col: int, term, dtype: str):
    """sum_i coefs[i, col] * term(i) over the non-zero coefficients, as a TIR expression."""
    out = None
    for i in range(coefs.shape[0]):
        c = float(coefs[i, col])
        if c == 0.0:
            continue
        t = term(i)
        if c == -1.0:
            out = -t if out is None else out - t
            continue
        if c != 1.0:
            t = t * tirx.const(c, dtype)
        out = t if out is None else out + t
    return out if out is not None else tirx.const(0.0, dtype)


def _select(index, n: int, branch):
    """branch(index) for index in 0..n-1, as a Select chain (folds once index is unrolled)."""
    expr = branch(n - 1)
    for k in range(n - 2, -1, -1):
        expr = tirx.Select(index == k, branch(k), expr)
    return expr


def input_transform(n: int, h: int, w: int, c: int, pad: tuple[int, int], m: int, dtype: str) -> tirx.PrimFunc:
    """data [n, h, w, c] (padded by ``pad`` = (top, left) and up to whole tiles) -> V [alpha^2, tiles, c]."""
    _, b, _ = matrices(m)
    alpha = m + 2
    out_h, out_w = h + 2 * pad[0] - 2, w + 2 * pad[1] - 2
    th, tw = out_h // m, out_w // m
    tiles = n * th * tw
    data = te.placeholder((n, h, w, c), dtype, "data")

    def d(p, r1, r2, ch):
        y = (p % (th * tw)) // tw * m + r1 - pad[0]
        x = p % tw * m + r2 - pad[1]
        inside = tirx.all(y >= 0, y < h, x >= 0, x < w)
        return tirx.if_then_else(inside, data[p // (th * tw), y, x, ch], tirx.const(0.0, dtype))

    # t[r1, nu] = sum_r2 d[r1, r2] B[r2, nu];  V[e, nu] = sum_r1 B[r1, e] t[r1, nu]
    t = te.compute((alpha * alpha, tiles, c),
                   lambda i, p, ch: _select(i % alpha, alpha,
                                            lambda nu: _sum(b, nu, lambda r2: d(p, i // alpha, r2, ch), dtype)),
                   name=IN_BLOCKS[0])
    v = te.compute((alpha * alpha, tiles, c),
                   lambda i, p, ch: _select(i // alpha, alpha,
                                            lambda e: _sum(b, e, lambda r1: t[r1 * alpha + i % alpha, p, ch], dtype)),
                   name=IN_BLOCKS[1])
    return te.create_prim_func([data, v], index_dtype_override="int64").with_attr("op_pattern", 8)  # opaque: nothing fuses into it


def output_transform(n: int, out_h: int, out_w: int, k: int, m: int, dtype: str) -> tirx.PrimFunc:
    """M [alpha^2, tiles, k] -> Y [n, out_h, out_w, k]."""
    a, _, _ = matrices(m)
    alpha = m + 2
    th, tw = out_h // m, out_w // m
    prod = te.placeholder((alpha * alpha, n * th * tw, k), dtype, "prod")
    # o[e, j] = sum_nu M[e, nu] A[nu, j];  Y[i, j] = sum_e A[e, i] o[e, j]
    o = te.compute((alpha * m, n * th * tw, k),
                   lambda i, p, ch: _select(i % m, m,
                                            lambda j: _sum(a, j, lambda nu: prod[i // m * alpha + nu, p, ch], dtype)),
                   name=OUT_BLOCKS[0])

    def y(b, yy, xx, ch):
        p = b * th * tw + yy // m * tw + xx // m
        return _select(yy % m, m, lambda i: _sum(a, i, lambda e: o[e * m + xx % m, p, ch], dtype))

    out = te.compute((n, out_h, out_w, k), y, name=OUT_BLOCKS[1])
    # out-elementwise-fusable: the conv's bias / activation / residual add fuse into it
    return te.create_prim_func([prod, out], index_dtype_override="int64").with_attr("op_pattern", 4)


def is_transform(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` is a Winograd input or output transform (its epilogue fused or not).

    ``tvmedge tune`` leaves these kernels to :class:`~tvmedge.lower.cpu_rules.WinogradTransform`:
    MetaSchedule's generic rules do not unroll the tile positions, and with resnet18 its
    candidates for them lost the local RPC server within a few dozen trials."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import get_root_block

    try:
        sch = s_tir.Schedule(func)
        first = sch.get_child_blocks(get_root_block(sch))[0]
    except Exception:  # noqa: BLE001 - not a single-root function: not ours
        return False
    return sch.get(first).name_hint.startswith((IN_BLOCKS[0], OUT_BLOCKS[0]))


def weight_transform(weight_hwio: np.ndarray, m: int) -> np.ndarray:
    """U = G g G^T per (input, output) channel pair: [alpha^2, C, K]."""
    _, _, g = matrices(m)
    u = np.einsum("ai,ijck,bj->abck", g, weight_hwio.astype(np.float64), g)
    alpha = m + 2
    return u.reshape(alpha * alpha, *weight_hwio.shape[2:]).astype(weight_hwio.dtype)


@mutator
class _Winograd(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.funcs: dict[str, tvm.ir.GlobalVar] = {}
        self.count = 0

    def _gv(self, name: str, make) -> tvm.ir.GlobalVar:
        if name not in self.funcs:
            self.funcs[name] = self.builder_.add_func(make().without_attr("global_symbol"), name)
        return self.funcs[name]

    def visit_call_(self, call):  # noqa: D102
        out = self._rewrite(call) if getattr(call.op, "name", None) == "relax.nn.conv2d" else None
        return out if out is not None else super().visit_call_(call)

    def _rewrite(self, call):
        at = call.attrs
        weight = call.args[1]
        if not isinstance(weight, tvm.ir.expr.GenericConst):  # a Relax constant (TVM 0.27 name)
            return None
        if (str(at.data_layout), str(at.kernel_layout), str(at.out_layout or at.data_layout)) != ("NHWC", "HWIO", "NHWC"):
            return None
        if int(at.groups) != 1 or [int(s) for s in at.strides] != [1, 1] or [int(s) for s in at.dilation] != [1, 1]:
            return None
        shape = shape_of(call.args[0])
        dtype = dtype_of(call.args[0])
        if shape is None or dtype != "float32" or str(at.out_dtype or dtype) not in ("", dtype):
            return None
        w = weight.value.numpy()
        if w.shape[:2] != (3, 3) or w.dtype != np.float32:
            return None
        n, h, wd, c = shape
        k = w.shape[3]
        pt, pl, pb, pr = (int(p) for p in at.padding)
        if pt != pb or pl != pr or c < MIN_CHANNELS or k < MIN_CHANNELS:
            return None
        if c % 4:  # the input transform vectorizes over C: 34 channels ran 20x below 32 (a 1 ms transform)
            return None
        out_h, out_w = h + 2 * pt - 2, wd + 2 * pl - 2
        m = tile_size(out_h, out_w, n)
        if m is None:
            return None
        alpha = m + 2
        tiles = n * (out_h // m) * (out_w // m)
        data = self.visit_expr(call.args[0])
        fin = self._gv(f"winograd_in_{n}x{h}x{wd}x{c}_p{pt}{pl}_m{m}",
                       lambda: input_transform(n, h, wd, c, (pt, pl), m, dtype))
        v = self.builder_.emit(relax.call_tir(fin, [data], out_ty=relax.TensorType([alpha * alpha, tiles, c], dtype)))
        prod = self.builder_.emit(relax.op.matmul(v, relax.const(weight_transform(w, m))))
        fout = self._gv(f"winograd_out_{n}x{out_h}x{out_w}x{k}_m{m}", lambda: output_transform(n, out_h, out_w, k, m, dtype))
        self.count += 1
        return relax.call_tir(fout, [prod], out_ty=relax.TensorType([n, out_h, out_w, k], dtype))


def winograd(mod: tvm.IRModule) -> tvm.IRModule:
    """Rewrite the eligible convs of every Relax function in ``mod`` (NHWC, after
    ConvertLayout and FoldConstant, before legalization)."""
    if os.environ.get("TVMEDGE_WINOGRAD", "1") == "0":
        return mod
    return rewrite_functions(mod, _Winograd(mod))


@tvm.transform.module_pass(opt_level=0, name="tvmedge.Winograd")
class Winograd:
    """:func:`winograd` as a module pass."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: D102
        return winograd(mod)
