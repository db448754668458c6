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
output position reads the same input elements as before.

Where the taps that read inside the input differ between output positions and most
(output, tap) pairs read padding — ASPP's dilation-12 conv on a 16x16 map: rows 0-3 read
taps 1-2, rows 4-11 tap 1 only, rows 12-15 taps 0-1, a quarter of the dense work — the
output is cut into zones with one set of live taps each (:func:`zones`); each zone is a conv
of its own on the slice of the input it reads, with only its taps and no padding, and the
zones are concatenated back (ASPP's dilation-12 conv 4.3 -> ~1.3 ms).

Both are exact: only ``+ 0 * w`` terms disappear. Convs with constant weights in NHWC/HWIO
(after ``ConvertLayout``) are rewritten; others are left as they are.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..core.graph import conv_attrs, rewrite_functions, shape_of

MAX_DENSE_SHARE = 0.5  # zones are used when at most this share of (output, tap) pairs is live
MAX_ZONES = 3  # per axis


def live_taps(size: int, out: int, kernel: int, stride: int, dilation: int, pad_before: int) -> list[int]:
    """The kernel taps along one axis that read inside the input for some output position."""
    return [k for k in range(kernel)
            if any(0 <= o * stride + k * dilation - pad_before < size for o in range(out))]


def zones(size: int, out: int, kernel: int, stride: int, dilation: int, pad_before: int) -> list[tuple[int, int, list[int]]]:
    """Consecutive output ranges ``[o0, o1)`` along one axis whose positions read inside the
    input with the same taps, and those taps."""
    out_zones: list[tuple[int, int, list[int]]] = []
    for o in range(out):
        taps = [k for k in range(kernel) if 0 <= o * stride + k * dilation - pad_before < size]
        if out_zones and out_zones[-1][2] == taps:
            out_zones[-1] = (out_zones[-1][0], o + 1, taps)
        else:
            out_zones.append((o, o + 1, taps))
    return out_zones


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
        zoned = self._zoned(call, a, x_shape, y_shape, w)
        if zoned is not None:
            self.count += 1
            return zoned
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


    def _zoned(self, call, a, x_shape, y_shape, w):
        """The conv as a concat of per-zone convs (see the module docstring), or None."""
        pt, pl = a["padding"][0], a["padding"][1]
        per_axis = [zones(x_shape[1 + i], y_shape[1 + i], w.shape[i], a["strides"][i], a["dilation"][i], pad)
                    for i, pad in enumerate((pt, pl))]
        if all(len(z) == 1 for z in per_axis) or any(len(z) > MAX_ZONES for z in per_axis):
            return None
        for axis_zones in per_axis:
            for _, _, taps in axis_zones:
                if not taps or taps != list(range(taps[0], taps[-1] + 1)):
                    return None
        live = 1.0
        for i, axis_zones in enumerate(per_axis):
            live *= sum((o1 - o0) * len(t) for o0, o1, t in axis_zones) / (y_shape[1 + i] * w.shape[i])
        if live > MAX_DENSE_SHARE:
            return None
        x = call.args[0]
        rows = []
        for h0, h1, th in per_axis[0]:
            cols = []
            for w0, w1, tw in per_axis[1]:
                begin, end, dil = [], [], []
                for i, (o0, o1, taps) in enumerate(((h0, h1, th), (w0, w1, tw))):
                    pad = (pt, pl)[i]
                    begin.append(o0 * a["strides"][i] + taps[0] * a["dilation"][i] - pad)
                    end.append((o1 - 1) * a["strides"][i] + taps[-1] * a["dilation"][i] - pad + 1)
                    dil.append(a["dilation"][i] if len(taps) > 1 else 1)
                part = relax.op.strided_slice(x, axes=[1, 2], begin=begin, end=end)
                kernel = np.ascontiguousarray(w[th[0]:th[-1] + 1, tw[0]:tw[-1] + 1])
                cols.append(self.builder_.emit(relax.op.nn.conv2d(
                    self.builder_.emit(part), relax.const(kernel), strides=a["strides"], padding=[0, 0, 0, 0],
                    dilation=dil, groups=a["groups"], data_layout="NHWC", kernel_layout="HWIO", out_layout="NHWC",
                    out_dtype=call.attrs.out_dtype)))
            rows.append(cols[0] if len(cols) == 1 else self.builder_.emit(relax.op.concat(cols, axis=2)))
        return rows[0] if len(rows) == 1 else relax.op.concat(rows, axis=1)


def drop_padding_taps(mod: tvm.IRModule) -> tvm.IRModule:
    """Rewrite every conv of ``mod``'s Relax functions that has taps reading padding only."""
    return rewrite_functions(mod, _DropTaps(mod))


@tvm.transform.module_pass(opt_level=0, name="tvmedge.DropPaddingTaps")
class DropPaddingTaps:
    """:func:`drop_padding_taps` as a module pass."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: D102
        return drop_padding_taps(mod)
