"""Bilinear resize for CPUs: separable, and in the layout the model's output wants.

Segmentation heads end in a bilinear upsample to the input size (LR-ASPP, FCN, DeepLab), and
an NHWC graph then transposes the result back to NCHW. TOPI's ``resize2d`` computes every
output element from four input elements with the interpolation indices worked out per
element; fused with that transpose, the innermost (vectorized) axis is the output width, so
each vector gathers its four taps. On x86 VMs a vector gather is slow (tens of cycles with
the Gather Data Sampling mitigation): LR-ASPP's 21x32x64 -> 21x256x512 upsample took 4.1 ms,
a quarter of the model, where ONNX Runtime spends 1.9 ms (Upsample and its layout reorder).

Two rewrites, both for ``method="linear"`` only (nearest and cubic keep TOPI's compute):

- :func:`permute_before_resize` (a Relax pass, after ``ConvertLayout``): ``permute_dims``
  of a resize's only use is moved in front of it, so the small input is transposed and the
  resize writes the output layout itself (resize commutes with a permutation that keeps H
  before W).
- :func:`legalize_resize2d`: when upsampling in H, the interpolation is done in two stages,
  along W on the input rows (``resize_cols``, materialized) and then along H. The second
  stage reads two contiguous rows per output row, so no vector gathers, and the first stage
  touches only ``in_h`` rows. The arithmetic is TOPI's in the same order (``lerp`` along W,
  then along H, with TOPI's coordinate functions), so results are bit-identical to TOPI's.

The stage-1 block carries the annotation :data:`MATERIALIZE`, which ``cpu_rules.Injective``
respects (it does not inline such blocks into their consumers).
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..core.graph import rewrite_functions

MATERIALIZE = "tvmedge.materialize"
_MODES = ("half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel")


def _static(shape) -> list[int] | None:
    out = []
    for d in shape:
        if not isinstance(d, (int, tirx.IntImm)):
            return None
        out.append(int(d))
    return out


def separable_resize2d(data: te.Tensor, size: tuple[int, int], layout: str, mode: str,
                       out_dtype: str | None = None) -> te.Tensor:
    """Bilinear ``resize2d`` of an NCHW or NHWC tensor in two stages (W, then H), with
    TOPI's coordinates and interpolation order."""
    from tvm.topi.image.resize import _lerp, get_inx

    h_ax, w_ax = (2, 3) if layout == "NCHW" else (1, 2)
    in_shape = list(data.shape)
    ih, iw = in_shape[h_ax], in_shape[w_ax]
    oh, ow = (tirx.IntImm("int32", int(s)) for s in size)

    def taps(o, image, target):
        pos = get_inx(o, image, target, mode)
        i = te.floor(pos).astype("int32")
        frac = pos - i
        lo = te.max(te.min(i, image - 1), 0)
        hi = te.max(te.min(i + 1, image - 1), 0)
        return lo, hi, frac

    def at(tensor, idx, axis, value):
        idx = list(idx)
        idx[axis] = value
        return tensor(*idx).astype("float")

    def cols_f(*idx):
        lo, hi, frac = taps(idx[w_ax], iw, ow)
        return _lerp(at(data, idx, w_ax, lo), at(data, idx, w_ax, hi), frac)

    cols_shape = list(in_shape)
    cols_shape[w_ax] = ow
    cols = te.compute(cols_shape, cols_f, name="resize_cols", attrs={MATERIALIZE: 1})

    def out_f(*idx):
        lo, hi, frac = taps(idx[h_ax], ih, oh)
        return _lerp(at(cols, idx, h_ax, lo), at(cols, idx, h_ax, hi), frac).astype(out_dtype or data.dtype)

    out_shape = list(cols_shape)
    out_shape[h_ax] = oh
    return te.compute(out_shape, out_f, name="resize", tag="injective")


def _separable(call: relax.Call) -> bool:
    at = call.attrs
    info = call.args[0].ty
    if (str(at.method) != "linear" or str(at.coordinate_transformation_mode) not in _MODES
            or str(at.layout) not in ("NCHW", "NHWC") or not isinstance(info, relax.TensorType)
            or not str(info.dtype).startswith("float") or info.shape is None):
        return False
    shape = _static(info.shape.values) if hasattr(info.shape, "values") else None
    size = _static(call.args[1].values) if isinstance(call.args[1], relax.ShapeExpr) else None
    if shape is None or size is None:
        return False
    in_h = shape[2] if str(at.layout) == "NCHW" else shape[1]
    return size[0] >= in_h  # downsampling in H: the first stage would be the larger one


def legalize_resize2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``LegalizeOps`` override for ``relax.image.resize2d``: :func:`separable_resize2d`
    where it applies, else TOPI's (Relax's default legalization)."""
    at = call.attrs
    if _separable(call):
        size = [int(s) for s in call.args[1].values]
        out_dtype = str(call.ty.dtype)
        return bb.call_te(separable_resize2d, call.args[0], size, str(at.layout),
                          str(at.coordinate_transformation_mode), out_dtype, primfunc_name_hint="resize2d")
    return bb.call_te(topi.image.resize2d, call.args[0], roi=at.roi, size=call.args[1], layout=at.layout,
                      method=at.method, coordinate_transformation_mode=at.coordinate_transformation_mode,
                      rounding_method=at.rounding_method, bicubic_alpha=at.cubic_alpha,
                      bicubic_exclude=at.cubic_exclude, extrapolation_value=at.extrapolation_value)


def _uses(func: relax.Function) -> dict:
    counts: dict = {}

    def visit(e) -> None:
        if isinstance(e, relax.Var):
            counts[e] = counts.get(e, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


@mutator
class _PermuteFirst(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.uses: dict = {}
        self.count = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.permute_dims") or not isinstance(call.args[0], relax.Var):
            return call
        resize = self.lookup_binding(call.args[0])
        if not isinstance(resize, relax.Call) or resize.op != tvm.ir.Op.get("relax.image.resize2d"):
            return call
        at = resize.attrs
        layout = str(at.layout)
        if layout not in ("NCHW", "NHWC") or call.attrs.axes is None or self.uses.get(call.args[0], 0) != 1:
            return call
        axes = [int(a) for a in call.attrs.axes]
        new = "".join(layout[a] for a in axes)
        if new not in ("NCHW", "NHWC"):
            return call
        self.count += 1
        x = self.builder_.emit(relax.op.permute_dims(resize.args[0], axes))
        return relax.op.image.resize2d(
            x, resize.args[1], roi=[float(r) for r in at.roi], layout=new, method=str(at.method),
            coordinate_transformation_mode=str(at.coordinate_transformation_mode),
            rounding_method=str(at.rounding_method), cubic_alpha=float(at.cubic_alpha),
            cubic_exclude=int(at.cubic_exclude), extrapolation_value=float(at.extrapolation_value),
            out_dtype=at.out_dtype)


def permute_before_resize(mod: tvm.IRModule) -> tvm.IRModule:
    """Move each ``permute_dims`` that is a resize's only use in front of the resize."""
    rewriter = _PermuteFirst(mod)
    return rewrite_functions(mod, rewriter, before=lambda func: setattr(rewriter, "uses", _uses(func)))


@tvm.transform.module_pass(opt_level=0, name="tvmedge.PermuteBeforeResize")
class PermuteBeforeResize:
    """:func:`permute_before_resize` as a module pass."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: D102
        return permute_before_resize(mod)
