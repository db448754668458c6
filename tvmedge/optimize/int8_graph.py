"""The int8 graph rewrite on Relax: find the conv2d/matmul layers with constant weights,
replace each by real int8 ops (see :mod:`tvmedge.optimize.quantize` for the scheme), and
fold models quantized elsewhere.

:func:`fold_qdq` handles models another tool already quantized in QDQ form (e.g. ONNX
Runtime's ``quantize_static(..., quant_format=QuantFormat.QDQ)``): the Relax ONNX importer
turns them into ``quantize -> dequantize -> float conv``; the fold replaces
``dequantize(x_q) -> conv/matmul(dequantize(W_q))`` by the int8 op above on ``x_q`` with the
tool's own scales, so the int8 data path is real.

Depends only on ``core``: the importer uses :func:`fold_qdq`, so nothing here may import
the frontend, the checker or calibration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import TvmedgeError
from ..core.graph import CONV, MATMUL, bindings, conv_attrs, dtype_of, is_const, op_name, shape_of
from ..core.model import ImportedModel


# ---------------------------------------------------------------- graph helpers
def _const_eval(expr: Any, defs: dict) -> np.ndarray | None:
    """The value of a constant sub-graph (constants through reshape/permute/astype/dequantize)."""
    from tvm import relax

    if is_const(expr):
        return expr.value.numpy()
    if isinstance(expr, relax.Var):
        return _const_eval(defs[expr], defs) if expr in defs else None
    op = op_name(expr)
    if op is None:
        return None
    if op in ("relax.reshape", "relax.permute_dims", "relax.astype", "relax.expand_dims", "relax.squeeze"):
        x = _const_eval(expr.args[0], defs)
        if x is None:
            return None
        if op == "relax.permute_dims":
            axes = expr.attrs.axes
            return np.transpose(x, None if axes is None else [int(a) for a in axes])
        if op == "relax.astype":
            return x.astype(str(expr.attrs.dtype))
        shape = shape_of(expr)
        return None if shape is None else x.reshape(shape)
    if op == "relax.dequantize":
        q, s, z = (_const_eval(a, defs) for a in expr.args[:3])
        if q is None or s is None or z is None:
            return None
        s, z = _along(s, q.ndim, int(expr.attrs.axis)), _along(z, q.ndim, int(expr.attrs.axis))
        return ((q.astype(np.float64) - z) * s).astype(np.float32)
    return None


def _along(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A scalar or 1-D per-axis parameter shaped to broadcast against a rank-``ndim`` tensor."""
    v = np.asarray(v, dtype=np.float64)
    if v.size == 1 or ndim == 0:
        return v.reshape([1] * ndim) if ndim else v.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = v.size
    return v.reshape(shape)


def _qweight_eval(expr: Any, defs: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """``(int8 values, scale broadcastable to them)`` of a ``dequantize(int8 const)`` weight.

    Follows permute_dims (the ONNX importer transposes Gemm/MatMul weights); the weight
    zero point must be 0 (symmetric), as int8 compute has no room for a weight offset."""
    from tvm import relax

    if isinstance(expr, relax.Var):
        return _qweight_eval(defs[expr], defs) if expr in defs else None
    op = op_name(expr)
    if op == "relax.permute_dims":
        inner = _qweight_eval(expr.args[0], defs)
        if inner is None:
            return None
        q, s = inner
        axes = expr.attrs.axes
        axes = list(reversed(range(q.ndim))) if axes is None else [int(a) for a in axes]
        return np.transpose(q, axes), np.transpose(np.broadcast_to(s, [1] * (q.ndim - s.ndim) + list(s.shape)), axes)
    if op != "relax.dequantize":
        return None
    q, s, z = (_const_eval(a, defs) for a in expr.args[:3])
    if q is None or s is None or z is None or q.dtype != np.int8 or np.any(z != 0):
        return None
    return q, _along(s, q.ndim, int(expr.attrs.axis))


def _channel_vector(s: np.ndarray, ndim: int, axis: int, n: int) -> np.ndarray | None:
    """``s`` (broadcastable to a rank-``ndim`` tensor) as one value per channel on ``axis``; None
    when it varies along another axis."""
    s = np.asarray(s, dtype=np.float64).reshape([1] * (ndim - s.ndim) + list(s.shape))
    if any(d != 1 for i, d in enumerate(s.shape) if i != axis % ndim):
        return None
    return np.broadcast_to(s.reshape(-1), (n,)).copy() if s.size in (1, n) else None


def _uses(func: Any) -> dict:
    """var -> bindings whose value uses it (the function output counts as a use)."""
    from tvm import relax

    uses: dict = {}
    for b in bindings(func):
        for v in relax.analysis.free_vars(b.value):
            uses.setdefault(v, []).append(b)
    for v in relax.analysis.free_vars(func.body.body):
        uses.setdefault(v, []).append(None)
    return uses


def has_qdq(model: ImportedModel) -> bool:
    """Whether ``main`` holds quantize/dequantize ops (an imported QDQ model)."""
    return any(op_name(b.value) in ("relax.quantize", "relax.dequantize") for b in bindings(model.mod["main"]))


@dataclass
class Layer:
    """A conv2d / matmul the rewrite may turn into int8."""

    name: str
    op: str  # "conv2d" | "matmul"
    var: Any  # the binding's var
    call: Any
    channels: int  # output channels (conv: O, matmul: N)
    weight: np.ndarray | None = None  # float weight (OIHW or [K, N])
    weight_q: np.ndarray | None = None  # int8 weight
    weight_scale: np.ndarray | None = None  # per output channel
    bias: np.ndarray | None = None  # per output channel, folded when not None
    bias_var: Any = None  # the add binding whose work the fold takes over
    act_scale: float | None = None
    act_zp: int | None = None
    act_range: tuple[float, float] | None = None
    source: Any = None  # fold_qdq: the already-quantized input tensor
    skip: str | None = None


def _bias_of(var: Any, channels: int, out_ndim: int, axis: int, uses: dict, defs: dict) -> tuple[np.ndarray, Any] | None:
    """A per-channel constant added to ``var`` by its only user: ``(bias vector, add var)``."""
    users = uses.get(var, [])
    if len(users) != 1 or users[0] is None or op_name(users[0].value) != "relax.add":
        return None
    add = users[0].value
    other = add.args[1] if add.args[0].same_as(var) else add.args[0]
    if other.same_as(var):
        return None
    b = _const_eval(other, defs)
    if b is None or b.ndim > out_ndim or b.size != channels:
        return None
    vec = _channel_vector(b, out_ndim, axis, channels)
    return None if vec is None else (vec, users[0].var)


def _conv_matmul_bindings(binds: list[Any]):
    """``(binding, "conv2d" | "matmul", name)`` for each conv2d / matmul, named ``conv2d_1``, ...
    (counted from 1 in graph order, as the low-rank and compact rewrites name them)."""
    counts = {"conv2d": 0, "matmul": 0}
    for b in binds:
        op = op_name(b.value)
        if op in (CONV, MATMUL):
            kind = "conv2d" if op == CONV else "matmul"
            counts[kind] += 1
            yield b, kind, f"{kind}_{counts[kind]}"


def find_layers(model: ImportedModel) -> list[Layer]:
    """Every conv2d / matmul of ``main`` with its weight, bias and (if any) why it is skipped."""
    func = model.mod["main"]
    binds = bindings(func)
    defs = {b.var: b.value for b in binds}
    uses = _uses(func)
    layers: list[Layer] = []
    for b, kind, name in _conv_matmul_bindings(binds):
        call = b.value
        data, wexpr = call.args[0], call.args[1]
        out_shape = shape_of(b.var) or []
        layer = Layer(name=name, op=kind, var=b.var, call=call, channels=0)
        layers.append(layer)
        if dtype_of(data) != "float32":
            layer.skip = f"input is {dtype_of(data)}, not float32"
            continue
        w = _const_eval(wexpr, defs)
        if w is None:
            layer.skip = "weight is not a constant (dynamic weight)"
            continue
        if kind == "conv2d":
            attrs = conv_attrs(call)
            if attrs["layouts"] != ("NCHW", "OIHW", "NCHW"):
                layer.skip = f"layout {'/'.join(attrs['layouts'])} (only NCHW/OIHW)"
                continue
            layer.channels, axis = int(w.shape[0]), 1
        else:
            if w.ndim != 2 or len(out_shape) < 1:
                layer.skip = f"constant weight of rank {w.ndim} (only [K, N] weights)"
                continue
            layer.channels, axis = int(w.shape[1]), len(out_shape) - 1
        layer.weight = w.astype(np.float32)
        bias = _bias_of(b.var, layer.channels, len(out_shape), axis, uses, defs)
        if bias is not None:
            layer.bias, layer.bias_var = bias
    return layers


# ---------------------------------------------------------------- rewriting
def _emit_int8(bb: Any, layer: Layer, xq: Any) -> Any:
    """Emit the int8 op on the quantized input ``xq``; returns the (unemitted) float32 result."""
    from tvm import relax

    R = relax.op
    zx, sx = int(layer.act_zp), float(layer.act_scale)
    wq = layer.weight_q
    eff = sx * layer.weight_scale.astype(np.float64)
    if layer.op == "conv2d":
        a = conv_attrs(layer.call)
        pad = a["padding"]  # top, left, bottom, right
        if zx != 0 and any(pad):
            # Pad with the zero point: in the quantized domain that is what 0.0 is.
            xq = bb.emit(R.nn.pad(xq, [0, 0, 0, 0, pad[0], pad[2], pad[1], pad[3]], pad_value=float(zx)))
            pad = [0, 0, 0, 0]
        acc = bb.emit(R.nn.conv2d(xq, relax.const(wq), strides=a["strides"], padding=pad, dilation=a["dilation"],
                                  groups=a["groups"], out_dtype="int32"))
        wsum = wq.astype(np.int64).sum(axis=(1, 2, 3))
        cshape = [1, layer.channels, 1, 1]
    else:
        acc = bb.emit(R.matmul(xq, relax.const(wq), out_dtype="int32"))
        wsum = wq.astype(np.int64).sum(axis=0)
        cshape = [layer.channels]
    bias_i = np.zeros(layer.channels, np.int64) if layer.bias is None else np.round(layer.bias / eff).astype(np.int64)
    bias_i = bias_i - zx * wsum
    if np.abs(bias_i).max(initial=0) >= 2 ** 31:
        raise TvmedgeError(f"{layer.name}: int32 bias overflows (activation scale {sx:g} too small?)")
    if np.any(bias_i):
        acc = bb.emit(R.add(acc, relax.const(bias_i.astype(np.int32).reshape(cshape))))
    f = bb.emit(R.astype(acc, "float32"))
    return R.multiply(f, relax.const(eff.astype(np.float32).reshape(cshape)))


def rewrite_layers(model: ImportedModel, layers: list[Layer], observe: bool = False) -> ImportedModel:
    """Quantize ``layers`` (or, with ``observe``, make their float inputs extra outputs)."""
    from tvm import relax

    by_var = {layer.var: layer for layer in layers}
    folded = {layer.bias_var: layer for layer in layers if layer.bias_var is not None and not observe}

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.current = None
            self.observed: list[Any] = []

        def visit_var_binding_(self, binding: Any) -> None:
            self.current = binding.var
            super().visit_var_binding_(binding)

        def visit_call_(self, call: Any) -> Any:
            var = self.current
            layer = by_var.get(var)
            if layer is not None and call.same_as(layer.call):
                if observe:
                    x = self.visit_expr(call.args[0])
                    try:
                        self.observed.append(self.builder_.emit_output(x))
                    except Exception:  # not inside a dataflow block
                        self.observed.append(self.builder_.emit(x))
                    return super().visit_call_(call)
                if layer.source is not None:
                    xq = self.visit_expr(layer.source)
                else:
                    x = self.visit_expr(call.args[0])
                    xq = self.builder_.emit(relax.op.quantize(
                        x, relax.const(np.float32(layer.act_scale)), relax.const(np.uint8(layer.act_zp)),
                        axis=0, out_dtype="uint8"))
                return _emit_int8(self.builder_, layer, xq)
            if var in folded and call.same_as(_value_of(var)):
                # This add's constant is already in the int32 bias: pass the layer output on.
                return self.visit_expr(folded[var].var)
            return super().visit_call_(call)

    values = {b.var: b.value for b in bindings(model.mod["main"])}

    def _value_of(var: Any) -> Any:
        return values.get(var)

    mod = model.mod
    rw = Rewriter(mod)
    gv = mod.get_global_var("main")
    new_func = rw.visit_expr(mod["main"])
    if observe:
        body = new_func.body
        new_body = relax.SeqExpr(body.blocks, relax.Tuple(rw.observed))
        ret = relax.TupleType([v.ty for v in rw.observed])
        new_func = relax.Function(new_func.params, new_body, ret, new_func.is_pure, new_func.attrs)
    rw.builder_.update_func(gv, new_func)
    new_mod = rw.builder_.get()
    new_mod = relax.transform.Normalize()(new_mod)
    new_mod = relax.transform.CanonicalizeBindings()(new_mod)
    new_mod = relax.transform.DeadCodeElimination(["main"])(new_mod)
    return dataclasses.replace(model, mod=new_mod, rewrites=list(model.rewrites))


def const_bytes(model: ImportedModel) -> int:
    """Bytes held by the constants (weights) of ``model``."""
    from tvm import relax

    total = [0]

    @relax.expr_functor.visitor
    class Counter(relax.PyExprVisitor):
        def visit_generic_const_(self, op: Any) -> None:
            arr = op.value
            total[0] += int(np.prod(arr.shape)) * np.dtype(str(arr.dtype)).itemsize

    for _, func in model.mod.functions_items():
        if isinstance(func, relax.Function):
            Counter().visit_expr(func)
    return total[0]


def int8_ops(model: ImportedModel) -> list[dict[str, str]]:
    """conv2d / matmul ops of ``main`` that compute on 8-bit inputs (with their out dtype)."""
    out = []
    for b in bindings(model.mod["main"]):
        if op_name(b.value) in (CONV, MATMUL):
            d, w = dtype_of(b.value.args[0]), dtype_of(b.value.args[1])
            if d in ("int8", "uint8") and w in ("int8", "uint8"):
                out.append({"op": op_name(b.value), "data": d, "weight": w, "out": dtype_of(b.var)})
    return out


# ---------------------------------------------------------------- QDQ import
def fold_qdq(model: ImportedModel) -> tuple[ImportedModel, dict[str, Any]]:
    """Turn ``dequantize -> conv2d/matmul`` (QDQ-format models) into real int8 ops."""
    func = model.mod["main"]
    binds = bindings(func)
    defs = {b.var: b.value for b in binds}
    uses = _uses(func)
    layers: list[Layer] = []
    skipped: list[dict[str, str]] = []
    for b, kind, name in _conv_matmul_bindings(binds):
        call = b.value
        dq = defs.get(call.args[0]) if op_name(defs.get(call.args[0])) == "relax.dequantize" else None
        qw = _qweight_eval(call.args[1], defs)
        if dq is None and qw is None:
            continue  # a float layer: not part of the QDQ graph
        if dq is None or qw is None:
            skipped.append({"layer": name, "reason": "only one of input/weight is dequantized"
                            if (dq is None) != (qw is None) else "weight is not int8 with zero point 0"})
            continue
        src = dq.args[0]
        sx, zx = _const_eval(dq.args[1], defs), _const_eval(dq.args[2], defs)
        if sx is None or zx is None or sx.size != 1 or zx.size != 1 or dtype_of(src) not in ("uint8", "int8"):
            skipped.append({"layer": name, "reason": "input quantization is not per-tensor 8-bit"})
            continue
        q, s = qw
        out_shape = shape_of(b.var) or []
        if kind == "conv2d":
            attrs = conv_attrs(call)
            if attrs["layouts"] != ("NCHW", "OIHW", "NCHW"):
                skipped.append({"layer": name, "reason": f"layout {'/'.join(attrs['layouts'])}"})
                continue
            channels, waxis, oaxis = int(q.shape[0]), 0, 1
        else:
            if q.ndim != 2:
                skipped.append({"layer": name, "reason": f"weight of rank {q.ndim}"})
                continue
            channels, waxis, oaxis = int(q.shape[1]), 1, len(out_shape) - 1
        sw = _channel_vector(s, q.ndim, waxis, channels)
        if sw is None:
            skipped.append({"layer": name, "reason": "weight scale is not per output channel"})
            continue
        layer = Layer(name=name, op=kind, var=b.var, call=call, channels=channels, weight_q=q.astype(np.int8),
                      weight_scale=sw, act_scale=float(sx.reshape(-1)[0]), act_zp=int(zx.reshape(-1)[0]), source=src)
        bias = _bias_of(b.var, channels, len(out_shape), oaxis, uses, defs)
        if bias is not None:
            layer.bias, layer.bias_var = bias
        layers.append(layer)
    report: dict[str, Any] = {"rewrite": "qdq-fold", "layers": [], "skipped": skipped}
    if not layers:
        return model, report
    new = rewrite_layers(model, layers)
    for layer in layers:
        report["layers"].append({"layer": layer.name, "op": layer.op, "weight_shape": "x".join(map(str, layer.weight_q.shape)),
                                 "act_scale": layer.act_scale, "act_zero_point": layer.act_zp, "act_dtype": dtype_of(layer.source),
                                 "weight_bits": 8, "bias_folded": layer.bias is not None})
    new.rewrites = list(model.rewrites) + [{"rewrite": "qdq-fold", "layers": len(layers)}]
    return new, report
