"""Fold per-channel affine chains after a conv into the conv's weights (a Relax pass).

``torch.export`` keeps BatchNorm (ONNX exporters fold it); ``DecomposeOpsForInference``
turns it into ``(y - mean) / sqrt(var + eps) * gamma + beta`` — four elementwise ops, one a
divide, on every output element of the conv. TVM's ``FoldBatchnormToConv2D`` folds only a
``batch_norm`` directly on a bias-free conv. This pass takes the decomposed form instead, so
it also covers a conv with a bias and any chain of ``add``/``subtract``/``multiply``/
``divide`` by constants that are per output channel (or scalars): ``conv(x, W) * s + b``
becomes ``conv(x, W * s) + b`` with ``W * s`` computed here (the weights are constants).

The rounding changes as in every Conv+BatchNorm fusion (ONNX Runtime's too): the weights are
scaled once instead of the outputs.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..core.graph import bindings, conv_attrs, op_name, shape_of

_BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide"}


def _per_channel(value: np.ndarray, channels: int) -> np.ndarray | None:
    """``value`` as a vector over an NCHW tensor's channels, if it broadcasts that way only."""
    if value.ndim > 4:
        return None
    shape = [1] * (4 - value.ndim) + list(value.shape)
    if shape[0] != 1 or shape[2] != 1 or shape[3] != 1 or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)


class _Chain:
    """``conv * scale + bias`` of one conv call."""

    def __init__(self, conv: relax.Call, channels: int) -> None:
        self.conv, self.ops = conv, 0
        self.scale, self.bias = np.ones(channels), np.zeros(channels)


@mutator
class _Fold(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, chains: dict) -> None:
        super().__init__(mod)
        self.chains = chains

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:  # noqa: D102
        chain = self.chains.get(binding.var)
        if chain is None:
            return super().visit_var_binding_(binding)
        conv = chain.conv
        weight = conv.args[1].value.numpy()
        scaled = weight * chain.scale.reshape(-1, *[1] * (weight.ndim - 1)).astype(weight.dtype)
        dtype = str(weight.dtype)
        new_conv = self.builder_.emit(relax.Call(conv.op, [self.visit_expr(conv.args[0]),
                                                           relax.const(scaled.astype(dtype), dtype)],
                                                 conv.attrs))
        bias = relax.const(chain.bias.astype(dtype).reshape(1, -1, 1, 1), dtype)
        value = self.builder_.normalize(relax.op.add(new_conv, bias))
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(value, str(binding.var.name)))


def _chains(func: relax.Function) -> dict:
    """The ends of foldable chains (binding var -> _Chain) that gain from folding."""
    uses: dict = {}

    def count(expr) -> None:
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1
        elif isinstance(expr, relax.Call):
            for a in expr.args:
                count(a)
        elif isinstance(expr, relax.Tuple):
            for f in expr.fields:
                count(f)
        elif isinstance(expr, relax.TupleGetItem):
            count(expr.tuple_value)

    binds = bindings(func)
    for b in binds:
        count(b.value)
    count(func.body.body)
    forms: dict = {}
    for b in binds:
        v, name = b.value, op_name(b.value)
        if name == "relax.nn.conv2d" and isinstance(v.args[1], tvm.ir.expr.Constant):
            a = conv_attrs(v)
            shape = shape_of(v)
            if a["layouts"] == ("NCHW", "OIHW", "NCHW") and shape and str(v.args[1].ty.dtype).startswith("float"):
                forms[b.var] = _Chain(v, shape[1])
            continue
        if name not in _BINARY:
            continue
        x, c = v.args
        flipped = isinstance(x, tvm.ir.expr.Constant)
        if flipped:
            x, c = c, x
        prev = forms.get(x)
        if prev is None or uses.get(x, 0) != 1 or not isinstance(c, tvm.ir.expr.Constant) or shape_of(v) != shape_of(x):
            continue
        k = _per_channel(c.value.numpy(), len(prev.scale))
        if k is None:
            continue
        s, bias = prev.scale.copy(), prev.bias.copy()
        if name == "relax.add":
            bias = bias + k
        elif name == "relax.subtract":
            s, bias = (-s, k - bias) if flipped else (s, bias - k)
        elif name == "relax.multiply":
            s, bias = s * k, bias * k
        elif flipped or np.any(k == 0):  # c / y is not affine in y; y / 0 stays as it is
            continue
        else:
            s, bias = s / k, bias / k
        chain = _Chain(prev.conv, len(s))
        chain.scale, chain.bias, chain.ops = s, bias, prev.ops + 1
        forms[b.var] = chain
    # Fold at the end of each chain, where folding saves work: a scale, or several adds.
    ends = {}
    for var, chain in forms.items():
        if chain.ops == 0:
            continue
        continued = any(isinstance(b.value, relax.Call) and any(a.same_as(var) for a in b.value.args)
                        and b.var in forms for b in binds)
        if not continued and (np.any(chain.scale != 1) or chain.ops > 1):
            ends[var] = chain
    return ends


@tvm.transform.module_pass(opt_level=0, name="tvmedge.FoldConvAffine")
def FoldConvAffine(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Fold per-channel ``add``/``subtract``/``multiply``/``divide`` chains after NCHW convs
    with constant weights into the weights and one bias add."""
    out = None
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        chains = _chains(func)
        if not chains:
            continue
        m = _Fold(out or mod, chains)
        new = m.visit_expr(func)
        out = m.builder_.get()
        out[gv] = new
    return relax.transform.DeadCodeElimination()(out) if out is not None else mod
