"""Pad NHWC channel counts to whole SIMD vectors along conv chains (a Relax pass for CPU targets).

tvmedge's CPU rules vectorize a conv over its output channels (NHWC's innermost axis). With
channel counts that are not a multiple of the vector width (ShuffleNetV2's 58 / 116 / 232
with 16 fp32 lanes) the vector tile falls back to 4 lanes or to scalar code, and those convs
ran 10-20x below the others. This pass gives such convs zero-padded weights instead, so
they compute ``C_pad`` channels (the next multiple of the vector width), and lets the padded
tensor flow on through the ops that treat channels independently — bias add / scale,
activations, depthwise conv (zero-padded weights), pooling, spatial mean — and into the
next conv, whose weights get zero rows for the padded input channels. Everywhere else (and
at the function's outputs) the tensor is sliced back to its ``C`` channels.

Exactness: padded output channels of a conv are 0 (zero weights); the ops they flow through
keep them finite (an activation of a finite value, a bias add, a scale by 1 on the padding),
and a conv reading them multiplies them by zero weights: the real channels' sums get
``+ 0.0`` terms only. Only the summation order of the vectorized code changes, as it does
for any schedule.

Which counts are padded: those that half vectors do not fit (the rules' tile is then 4 lanes
or scalar), when they grow by at most a third (58 -> 64, 116 -> 128 with 16 lanes). Counts
that half vectors fit are left alone: padding 24 -> 32 and 40 -> 48 made EfficientNet
slower (the next conv's extra input channels cost more than whole vectors gain), and while
RegNet's 440 -> 448 helped (regnet_y_400mf 0.94x -> 0.77x ORT; ShuffleNet's 232 -> 240 was
within noise), padding such counts in MobileNetV3 (72, 120, 184, 200) changes LR-ASPP's
kernels so that the shipped tuning records no longer match them (47 or 31 of 56 kernels
instead of 56). Re-tuning the shipped databases would allow it. Counts between half a vector
and one (9-15 with 16 lanes: what pruning and low rank leave of a 16-channel layer) go to one
whole vector: their tile was 4 lanes, a quarter of the machine; a 50%-pruned shapes-seg (11 and
23 channels) ran 1.66 -> 1.28 ms with this and the Winograd restriction to input channels that
4 divides (``lower.winograd``). Smaller counts are left alone.

Matrix products with constant weights (``relax.matmul(x, W)``, W 2-D: classifier heads) get
the same treatment on their columns, to a multiple of two vectors (:func:`padded_columns`):
an ImageNet head's 1000 columns (62.5 AVX-512 vectors) left the rules a 40-lane tile,
which LLVM cannot keep in registers (it re-packed the accumulators lane by lane every step);
padded to 1024 the head ran 2x faster (mobilenet_v2's 1280x1000 product 0.21 -> 0.10 ms
in the model). The padded columns flow through the bias add and are sliced off after it.
"""

from __future__ import annotations

import os

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..core.graph import dtype_of, shape_of

_Const = tvm.ir.expr.GenericConst  # _Const before TVM 0.27

MAX_GROWTH = 4 / 3 + 1e-9  # largest C_pad / C padded

_UNARY = {"relax.nn.relu", "relax.clip", "relax.sigmoid", "relax.nn.silu", "relax.tanh", "relax.nn.gelu",
          "relax.nn.leakyrelu", "relax.nn.relu6", "relax.negative", "relax.abs", "relax.square"}
# binary op -> the value a channel-wise constant is padded with (keeps the padding finite)
_BINARY = {"relax.add": 0.0, "relax.subtract": 0.0, "relax.multiply": 1.0, "relax.divide": 1.0,
           "relax.maximum": 0.0, "relax.minimum": 0.0}
_POOL = {"relax.nn.max_pool2d", "relax.nn.avg_pool2d"}


def padded_channels(c: int, lanes: int) -> int | None:
    """The channel count to pad ``c`` to, or None to leave it.

    Counts that whole or half vectors fit are left alone; counts above half a vector and below
    one go to one vector; those below half a vector that quarter vectors (4 lanes) fit are
    left. Others go to the next multiple of whole, half or quarter vectors that grows them by
    at most :data:`MAX_GROWTH`. A count that not even 4 lanes fit (17, 18, 23: what low-rank
    factorization chooses) would run as scalar code, 4-16x slower than vectors: it is padded to
    a multiple of 4 whatever the growth."""
    if lanes <= 1 or c < 4 or c % lanes == 0:
        return None
    if lanes // 2 < c < lanes:  # a whole vector rather than 4-lane tiles (see the module's docstring)
        return lanes
    if c % 4 == 0 and (c < lanes or c % max(lanes // 2, 4) == 0):  # see the module's docstring
        return None
    for m in (lanes, lanes // 2, lanes // 4):
        if m >= 4 and c > m:
            cp = -(-c // m) * m
            if cp <= MAX_GROWTH * c:
                return cp
            if c % 4 == 0:  # 4-lane vectors fit already: only whole vectors are worth the growth
                return None
    return -(-c // 4) * 4 if c % 4 else None


def padded_columns(n: int, lanes: int) -> int | None:
    """The column count to pad a constant-weight matrix product's ``n`` columns to (a
    multiple of two vectors, growing by at most :data:`MAX_GROWTH`), or None to leave it."""
    step = 2 * lanes
    if lanes <= 1 or n < lanes or n % step == 0:
        return None
    cp = -(-n // step) * step
    return cp if cp <= MAX_GROWTH * n else None


@mutator
class _ChannelPad(PyExprMutator):
    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.padded: dict = {}  # padded var -> its real channel count
        self.count = 0

    # -- helpers
    def _padded_of(self, new_arg):
        """(padded var, C) when ``new_arg`` is the slice of a padded tensor, else None."""
        if not isinstance(new_arg, relax.Var):
            return None
        value = self.lookup_binding(new_arg)
        if (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
                and value.op.name == "relax.strided_slice" and isinstance(value.args[0], relax.Var)):
            for var, c in self.padded.items():
                if var.same_as(value.args[0]):
                    return var, c
        return None

    def _emit_padded(self, call, c: int):
        """Bind ``call`` (which computes padded channels), return the slice to ``c`` channels."""
        var = self.builder_.emit(call)
        self.padded[var] = c
        return relax.op.strided_slice(var, axes=[len(shape_of(var)) - 1], begin=[0], end=[c])

    # -- the rewrite
    def visit_call_(self, call):  # noqa: D102
        op = call.op.name if isinstance(call.op, tvm.ir.Op) else None
        try:
            out = None
            if op == "relax.nn.conv2d":
                out = self._conv2d(call)
            elif op == "relax.matmul":
                out = self._matmul(call)
            elif op in _BINARY:
                out = self._binary(call, _BINARY[op])
            elif op in _UNARY or op in _POOL or op == "relax.mean":
                out = self._channelwise(call, op)
        except Exception:  # noqa: BLE001 - any surprise: leave the op as it was
            if os.environ.get("TVMEDGE_CHANPAD_DEBUG"):
                raise
            out = None
        return out if out is not None else super().visit_call_(call)

    def _conv2d(self, call):
        a = call.attrs
        if (a.data_layout != "NHWC" or a.kernel_layout != "HWIO" or a.out_layout != "NHWC"
                or not isinstance(call.args[1], _Const) or dtype_of(call.args[1]) != "float32"):
            return None
        x = self.visit_expr(call.args[0])
        w = call.args[1].value.numpy()
        kh, kw, wi, o = w.shape
        src = self._padded_of(x)
        cin = shape_of(call.args[0])[3]
        groups = int(a.groups)

        def conv(data, weight, groups_):
            return relax.op.nn.conv2d(data, relax.const(weight), strides=a.strides, padding=a.padding,
                                      dilation=a.dilation, groups=groups_, data_layout="NHWC",
                                      kernel_layout="HWIO", out_layout="NHWC", out_dtype=a.out_dtype)

        if groups == 1:
            op_ = padded_channels(o, self.lanes)
            if src is None and op_ is None:
                return None
            data = x
            if src is not None:
                cp_in = shape_of(src[0])[3]
                w = np.pad(w, ((0, 0), (0, 0), (0, cp_in - wi), (0, 0)))
                data = src[0]
            if op_ is not None:
                w = np.pad(w, ((0, 0), (0, 0), (0, 0), (0, op_ - o)))
                self.count += 1
                return self._emit_padded(conv(data, w, 1), o)
            return conv(data, w, 1)
        if groups == cin == o and wi == 1 and src is not None:  # depthwise on a padded input
            cp = shape_of(src[0])[3]
            w = np.pad(w, ((0, 0), (0, 0), (0, 0), (0, cp - o)))
            return self._emit_padded(conv(src[0], w, cp), o)
        return None

    def _matmul(self, call):
        w = call.args[1]
        if not isinstance(w, _Const) or dtype_of(w) != "float32" or len(w.value.shape) != 2:
            return None
        n = int(w.value.shape[1])
        cp = padded_columns(n, self.lanes)
        if cp is None or shape_of(call.args[0]) is None:
            return None
        x = self.visit_expr(call.args[0])
        wp = np.pad(w.value.numpy(), ((0, 0), (0, cp - n)))
        self.count += 1
        return self._emit_padded(relax.op.matmul(x, relax.const(wp), out_dtype=call.attrs.out_dtype), n)

    def _binary(self, call, fill: float):
        out_shape = shape_of(call)
        if out_shape is None or len(out_shape) not in (2, 3, 4):
            return None
        args = [self.visit_expr(arg) for arg in call.args]
        srcs = [self._padded_of(arg) for arg in args]
        cs = {s[1] for s in srcs if s is not None}
        if len(cs) != 1:
            return None
        (c,) = cs
        if out_shape[-1] != c or any(s is not None and len(shape_of(s[0])) != len(out_shape) for s in srcs):
            return None
        cp = next(shape_of(s[0])[-1] for s in srcs if s is not None)
        new = []
        for arg, src in zip(args, srcs):
            if src is not None:
                if shape_of(src[0])[-1] != cp:
                    return None
                new.append(src[0])
            elif isinstance(arg, _Const):
                data = arg.value.numpy()
                if data.ndim and data.shape[-1] == c:
                    widths = [(0, 0)] * (data.ndim - 1) + [(0, cp - c)]
                    data = np.pad(data, widths, constant_values=fill)
                elif data.ndim and data.shape[-1] != 1:
                    return None
                new.append(relax.const(data))
            else:
                return None
        return self._emit_padded(relax.Call(call.op, new, call.attrs, call.ty_args), c)

    def _channelwise(self, call, op: str):
        a = call.attrs
        if op in _POOL and (a.layout != "NHWC" or a.out_layout != "NHWC"):
            return None
        args = [self.visit_expr(arg) for arg in call.args]
        src = self._padded_of(args[0])
        if src is None:
            return None
        if op == "relax.mean":
            ndim = len(shape_of(src[0]))
            axes = sorted(int(ax) % ndim for ax in a.axis) if a.axis is not None else None
            if not a.keepdims or axes is None or ndim - 1 in axes:
                return None
        return self._emit_padded(relax.Call(call.op, [src[0], *args[1:]], call.attrs, call.ty_args), src[1])


def pad_channels(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """Apply the padding to every Relax function of ``mod`` (NHWC, after ConvertLayout and
    FoldConstant, before legalization); dead slices are removed."""
    if lanes <= 1:
        return mod
    mutator_ = _ChannelPad(mod, lanes)
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs, global_infos=mod.global_infos)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            out[gv] = mutator_.visit_expr(func)
    if mutator_.count == 0:
        return mod
    return relax.transform.DeadCodeElimination()(out)


@tvm.transform.module_pass(opt_level=0, name="tvmedge.PadChannels")
class PadChannels:
    """:func:`pad_channels` as a module pass, the vector width from the current target."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: D102
        return pad_channels(mod, self.lanes)
