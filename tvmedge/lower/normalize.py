"""Relax rewrites that let layout conversion and fusion see through importer output.

ONNX's ``Clip`` imports as ``call_tir`` PrimFuncs (``topi.maximum``/``minimum`` against a
0-d bound) and some frontends emit ``R.clip``; neither has a layout rule in
``ConvertLayout``, so an NHWC conversion would put a transpose pair around every ReLU6.
Here both become ``R.maximum``/``R.minimum`` with a constant of the tensor's rank, which
ConvertLayout, LegalizeOps and FuseOps all handle.

``R.quantize`` has no layout rule either: every per-tensor quantize the int8 rewrite writes
got a transpose pair around it in the NHWC graph. :data:`NormalizeQuantize` spells a
per-tensor quantize out as the elementwise ops its legalization computes (divide, round, add
the zero point, clamp, cast), in the same order, so the result is bit-identical.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, te, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..core.graph import constant_value

_TOPI = {"max": topi.maximum, "min": topi.minimum}
_RELAX = {"max": relax.op.maximum, "min": relax.op.minimum}


def _te_equal(func: tvm.tirx.PrimFunc, x_info, c_info, which: str) -> bool:
    x = te.placeholder(list(x_info.shape.values), str(x_info.dtype), "x")
    c = te.placeholder([], str(c_info.dtype), "c")
    ref = te.create_prim_func([x, c, _TOPI[which](x, c)])
    return tvm_ffi.structural_equal(func.with_attr("global_symbol", "f"), ref.with_attr("global_symbol", "f"),
                                   map_free_vars=True)


def _ranked(value: float, dtype: str, ndim: int) -> tvm.ir.expr.Constant:
    return relax.const(np.full([1] * ndim, value, dtype=dtype), dtype)


@mutator
class _Clip(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod

    def _scalar(self, expr) -> float | None:
        value = constant_value(self, expr)
        return float(value) if value is not None and value.ndim == 0 else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if call.op == tvm.ir.Op.get("relax.clip"):
            x = call.args[0]
            info = x.ty
            if not (isinstance(info, relax.TensorType) and str(info.dtype).startswith("float") and info.ndim > 0):
                return call
            lo, hi = (float(getattr(a.value, "value", a.value)) for a in call.args[1:3])
            return relax.op.minimum(relax.op.maximum(x, _ranked(lo, str(info.dtype), info.ndim)),
                                    _ranked(hi, str(info.dtype), info.ndim))
        if call.op != tvm.ir.Op.get("relax.call_tir") or len(call.args[1].fields) != 2:
            return call
        x, c = call.args[1].fields
        value = self._scalar(c)
        info = x.ty
        if value is None or not isinstance(info, relax.TensorType) or info.ndim <= 0 or \
                not all(isinstance(d, tvm.tirx.IntImm) for d in info.shape.values):
            return call
        func = self.mod[call.args[0]]
        for which in ("max", "min"):
            if _te_equal(func, info, c.ty, which):
                return _RELAX[which](x, _ranked(value, str(info.dtype), info.ndim))
        return call


def _rewrite_all(mod: tvm.IRModule, mutator_: PyExprMutator) -> tvm.IRModule:
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator_.builder_.update_func(gv, mutator_.visit_expr(func))
    return relax.transform.DeadCodeElimination()(mutator_.builder_.get())


@tvm.transform.module_pass(opt_level=0, name="tvmedge.NormalizeClip")
def NormalizeClip(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Rewrite clip-like ``call_tir``/``R.clip`` into ranked ``R.maximum``/``R.minimum``."""
    return _rewrite_all(mod, _Clip(mod))


@mutator
class _Quantize(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod

    def _scalar(self, expr) -> np.ndarray | None:
        value = constant_value(self, expr)
        return value.reshape(()) if value is not None and value.size == 1 else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.quantize"):
            return call
        x, scale, zp = call.args
        info = x.ty
        out = str(call.attrs.out_dtype)
        s, z = self._scalar(scale), self._scalar(zp)
        if (s is None or z is None or out not in ("int8", "uint8") or not isinstance(info, relax.TensorType)
                or str(info.dtype) != "float32" or info.ndim <= 0):
            return call
        lo, hi = np.iinfo(out).min, np.iinfo(out).max
        y = relax.op.divide(x, relax.const(s.astype("float32")))
        y = relax.op.add(relax.op.round(y), relax.const(np.float32(z)))
        y = relax.op.maximum(relax.op.minimum(y, _ranked(float(hi), "float32", info.ndim)),
                             _ranked(float(lo), "float32", info.ndim))
        return relax.op.astype(y, out)


def without_clip_prim_funcs(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with the ``call_tir`` PrimFuncs importers emit for Clip (ONNX Clip with tensor
    bounds: ReLU6 in MobileNets, bounds computed by ``isnan``/``where`` of constants) spelled as
    ``R.maximum``/``R.minimum``: constant folding settles the bounds, then :data:`NormalizeClip`
    replaces each PrimFunc it proves equal to TOPI's op. For consumers that know Relax ops but
    not TIR (the fine-tuning interpreter, the ONNX exporter); unchanged when ``main`` has no
    ``call_tir``."""
    if "R.call_tir" not in mod["main"].script(show_meta=False):
        return mod
    return tvm.transform.Sequential([relax.transform.FoldConstant(), NormalizeClip,
                                     relax.transform.DeadCodeElimination(["main"])])(mod)


@tvm.transform.module_pass(opt_level=0, name="tvmedge.NormalizeQuantize")
def NormalizeQuantize(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Rewrite per-tensor ``R.quantize`` (float32 -> int8/uint8) into its elementwise ops."""
    return _rewrite_all(mod, _Quantize(mod))
