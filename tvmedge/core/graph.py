"""Small helpers for reading and writing Relax graphs, shared by the rewrites
(``optimize/``) and the target lowering (``lower/``, ``binary/``): one place for what
each of them used to spell out for itself."""

from __future__ import annotations

from typing import Any

import numpy as np

CONV = "relax.nn.conv2d"
MATMUL = "relax.matmul"
OPAQUE = 8  # TVM's OpPatternKind kOpaque: FuseOps keeps such a kernel whole


def ints(values: Any) -> list[int]:
    return [int(v) for v in values]


def op_name(expr: Any) -> str | None:
    """``relax.nn.conv2d`` for a call of that operator; None for anything else."""
    from tvm import relax

    if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
        return str(expr.op.name)
    return None


def bindings(func: Any) -> list[Any]:
    """A Relax function's variable bindings, in order, across its blocks."""
    from tvm import relax

    out = []
    for block in func.body.blocks:
        out.extend(b for b in block.bindings if isinstance(b, relax.VarBinding))
    return out


def shape_of(expr: Any) -> list[int] | None:
    """Static shape of a Relax expression, or None."""
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if shape is None:
        return None
    try:
        return ints(shape.values if hasattr(shape, "values") else shape)
    except (TypeError, ValueError):
        return None


def dtype_of(expr: Any) -> str:
    return str(getattr(expr.ty, "dtype", ""))


def is_const(expr: Any) -> bool:
    import tvm

    return isinstance(expr, tvm.ir.expr.Constant)


def constant_value(mutator: Any, expr: Any) -> np.ndarray | None:
    """The numpy value of ``expr`` when it is a constant, or a variable bound (as ``mutator``
    sees it) to a constant or to a ``permute_dims``/``reshape`` of one; else None."""
    import tvm
    from tvm import relax

    if isinstance(expr, tvm.ir.Constant):
        return expr.value.numpy()
    if isinstance(expr, relax.Var):
        bound = mutator.lookup_binding(expr)
        if isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op):
            inner = constant_value(mutator, bound.args[0])
            if inner is None:
                return None
            if bound.op.name == "relax.permute_dims":
                axes = bound.attrs.axes
                return np.transpose(inner, None if axes is None else ints(axes))
            if bound.op.name == "relax.reshape":
                return inner.reshape(shape_of(bound))
        if isinstance(bound, tvm.ir.Constant):
            return bound.value.numpy()
    return None


def conv_attrs(call: Any) -> dict[str, Any]:
    """A conv2d call's attributes as plain Python; ``layouts`` = (data, kernel, out)."""
    a = call.attrs
    out_layout = str(a.out_layout or a.data_layout)
    return {"strides": ints(a.strides), "padding": ints(a.padding), "dilation": ints(a.dilation),
            "groups": int(a.groups), "data_layout": str(a.data_layout), "kernel_layout": str(a.kernel_layout),
            "out_layout": str(a.out_layout), "out_dtype": str(a.out_dtype),
            "layouts": (str(a.data_layout), str(a.kernel_layout), out_layout)}


def first_divisor(n: int, candidates: tuple[int, ...]) -> int:
    """The first of ``candidates`` that divides ``n`` (tile sizes, largest first), else 1."""
    return next((c for c in candidates if n % c == 0), 1)


def rewrite_functions(mod: Any, mutator: Any, before: Any = None) -> Any:
    """Run ``mutator`` (a Relax ``PyExprMutator`` that counts its rewrites in ``count``) over
    every Relax function of ``mod``, calling ``before(func)`` first where given; the rewritten
    module with dead bindings removed, or ``mod`` itself when nothing was rewritten."""
    from tvm import relax

    updated = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            if before is not None:
                before(func)
            updated[gv] = mutator.visit_expr(func)
    if mutator.count == 0:
        return mod
    for gv, func in updated.items():
        mutator.builder_.update_func(gv, func)
    return relax.transform.DeadCodeElimination()(mutator.builder_.get())


def finish_kernel(sch: Any) -> Any:
    """A hand-scheduled kernel's PrimFunc, marked so that fusion keeps it whole (opaque) and
    dlight/MetaSchedule/tvmedge's default rules leave its schedule alone."""
    return sch.mod["main"].with_attr("op_pattern", OPAQUE).with_attr("tirx.is_scheduled", True)
