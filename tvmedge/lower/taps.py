"""Drop convolution taps that only ever read padding (a Relax pass).

A kernel tap whose offset puts it outside the input for every output position multiplies
zeros only. DeepLabV3's ASPP is the common case: 3x3 convs with dilation 12, 24 and 36 on
the 16x16 (or 33x33) feature map of an output-stride-16 backbone. At dilation 24 and 36
every off-centre tap lands in the padding, so the conv is a 1x1 conv with the centre
weights; computed as 3x3 it did 9x the work on a padded copy 6x the input's size (two of
the three ASPP convs took 10 ms of a 22 ms model). The same holds for any conv on a map
smaller than its kernel's reach (a 3x3, padding 1 conv on a 1x1 map).

Per spatial axis, the taps that some output position reads inside the input are kept when
they are contiguous; the kernel is sliced to them and the padding shifted so that every
output position reads the same input elements as before. The result is exact: only
``+ 0 * w`` terms disappear. Convs with constant weights in NHWC/HWIO (after
``ConvertLayout``) are rewritten; others are left as they are.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..core.graph import conv_attrs, shape_of


def live_taps(size: int, out: int, kernel: int, stride: int, dilation: int, pad_before: int) -> list[int]:
    """The kernel taps along one axis that read inside the input for some output position."""
    return [k for k in range(kernel)
            if any(0 <= o * stride + k * dilation - pad_before < size for o in range(out))]


def _axis(size: int, out: int, kernel: int, stride: int, dilation: int, pad: tuple[int, int]):
    """(first tap, taps kept, new padding, new dilation) for one axis, or None to leave it."""
    live = live_taps(size, out, kernel, stride, dilation, pad[0])
    if not live or len(live) == kernel or live != list(range(live[0], live[-1] + 1)):
        return None
    first, n = live[0], len(live)
    before = pad[0] - first * dilation
    new_dil = dilation if n > 1 else 1
    after = (out - 1) * stride + new_dil * (n - 1) + 1 - size - before
    if before < 0 or after < 0:
        return None
    return first, n, (before, after), new_dil


@mutator
class _DropTaps(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if getattr(call.op, "name", None) != "relax.nn.conv2d" or not isinstance(call.args[1], tvm.ir.expr.GenericConst):
            return call
        a = conv_attrs(call)
        x_shape, y_shape = shape_of(call.args[0]), shape_of(call)
        if a["layouts"] != ("NHWC", "HWIO", "NHWC") or x_shape is None or y_shape is None:
            return call
        w = call.args[1].value.numpy()
        pt, pl, pb, pr = a["padding"]
        axes = [_axis(x_shape[1 + i], y_shape[1 + i], w.shape[i], a["strides"][i], a["dilation"][i], pads)
                for i, pads in enumerate(((pt, pb), (pl, pr)))]
        if all(ax is None for ax in axes):
            return call
        padding, dilation, slices = [0, 0, 0, 0], list(a["dilation"]), [slice(None), slice(None)]
        for i, ax in enumerate(axes):
            if ax is None:
                padding[i], padding[i + 2] = (pt, pb) if i == 0 else (pl, pr)
                continue
            first, n, (before, after), dilation[i] = ax
            padding[i], padding[i + 2] = before, after
            slices[i] = slice(first, first + n)
        self.count += 1
        kept = np.ascontiguousarray(w[slices[0], slices[1]])
        return relax.op.nn.conv2d(call.args[0], relax.const(kept), strides=a["strides"], padding=padding,
                                  dilation=dilation, groups=a["groups"], data_layout="NHWC", kernel_layout="HWIO",
                                  out_layout="NHWC", out_dtype=call.attrs.out_dtype)


def drop_padding_taps(mod: tvm.IRModule) -> tvm.IRModule:
    """Rewrite every conv of ``mod``'s Relax functions that has taps reading padding only."""
    rewriter = _DropTaps(mod)
    updated = {gv: rewriter.visit_expr(f) for gv, f in mod.functions.items() if isinstance(f, relax.Function)}
    if rewriter.count == 0:
        return mod
    for gv, func in updated.items():
        rewriter.builder_.update_func(gv, func)
    return rewriter.builder_.get()


@tvm.transform.module_pass(opt_level=0, name="tvmedge.DropPaddingTaps")
class DropPaddingTaps:
    """:func:`drop_padding_taps` as a module pass."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: D102
        return drop_padding_taps(mod)
