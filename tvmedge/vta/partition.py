"""Which layers go to the accelerator: the Relax partitioning (``FuseOpsByPattern``).

The int8 layers ``tvmedge optimize --quantize int8`` emits look like (see
:mod:`tvmedge.optimize.quantize`)::

    xq  = R.quantize(x, s, zp, out_dtype="uint8")      # host
    [xq = R.nn.pad(xq, ..., pad_value=zp)]              # only for a padded conv with zp != 0
    acc = R.nn.conv2d(xq, W_int8, out_dtype="int32")   # or R.matmul(xq, W_int8)
    [acc = R.add(acc, bias_int32)]
    y   = R.astype(acc, "float32") * scale[c]          # dequantize
    [y  = R.nn.relu(y)]

Each pattern below takes the conv2d / matmul with what follows it into one composite
function ``vta.<op>[.pad][.bias][.relu]``. Fused into the accelerator's ALU: the bias add
(ADD) and the ReLU (MAX 0). The ReLU is moved before the dequantize, onto the int32
accumulators, only where every ``scale[c]`` is positive: then ``relu(float(acc) * scale)``
and ``float(max(acc, 0)) * scale`` are the same float32 numbers, so the result stays
bit-exact with the host. The float dequantize and the next layer's quantize stay on the
host (their float rounding cannot be reproduced exactly by an integer shift).

A conv2d / matmul that cannot run on the core stays on the host CPU, and
:func:`layer_report` says why (float, depthwise/grouped, dilated, batch > 1, dynamic weight,
layout, ...).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from ..core.graph import CONV, MATMUL, bindings, conv_attrs, dtype_of, is_const, op_name, shape_of

COMPOSITE_PREFIX = "vta."


def refusal(call: Any, data: Any = None) -> str | None:
    """Why the int8 conv2d / matmul ``call`` cannot go to the core (None: it can).

    ``data`` is the layer's int8 input when a pad sits between it and the call."""
    op = op_name(call)
    x, w = call.args[0], call.args[1]
    xin = data if data is not None else x
    if dtype_of(xin) not in ("uint8", "int8") or dtype_of(w) not in ("int8",):
        return f"not int8 ({dtype_of(xin) or '?'} x {dtype_of(w) or '?'})"
    if not is_const(w):
        return "weight is not a constant"
    if str(call.attrs.out_dtype) != "int32":
        return f"accumulates in {call.attrs.out_dtype}, not int32"
    xs, ws = shape_of(x), shape_of(w)
    if xs is None or ws is None:
        return "dynamic shape"
    if op == CONV:
        a = conv_attrs(call)
        if a["layouts"] != ("NCHW", "OIHW", "NCHW"):
            return f"layout {'/'.join(a['layouts'])} (the core takes NCHW/OIHW)"
        if a["groups"] != 1:
            return "depthwise conv (groups = in channels): no reduction for the GEMM core" if a["groups"] == xs[1] \
                else f"grouped conv (groups = {a['groups']})"
        if any(d != 1 for d in a["dilation"]):
            return f"dilation {a['dilation']}"
        if xs[0] != 1:
            return f"batch {xs[0]} (the core is BATCH = 1)"
        return None
    if op == MATMUL:
        if len(xs) != 2 or len(ws) != 2 or xs[0] != 1:
            return f"matmul of shapes {xs} x {ws} (the core takes [1, K] x [K, N])"
        return None
    return f"op {op}"


def _positive_channel_scale(scale: Any, channels: int) -> bool:
    if not is_const(scale) or dtype_of(scale) != "float32":
        return False
    s = scale.value.numpy()
    return s.size in (1, channels) and bool(np.all(s > 0)) and bool(np.all(np.isfinite(s)))


def _patterns(refuse: Callable[[Any], bool] | None) -> list[Any]:
    from tvm.relax.dpl import is_const as p_const, is_op, wildcard
    from tvm.relax.transform import FusionPattern

    out = []
    for root_op, kind in ((CONV, "conv2d"), (MATMUL, "matmul")):
        for pad in ((True, False) if kind == "conv2d" else (False,)):
            for relu in (True, False):
                for bias in (True, False):
                    data = wildcard()
                    x = is_op("relax.nn.pad")(data) if pad else data
                    root = is_op(root_op)(x, p_const())
                    ann = {"root": root, "data": data}
                    if pad:
                        ann["pad"] = x
                    y = root
                    if bias:
                        y = is_op("relax.add")(y, p_const())
                        ann["bias"] = y
                    if relu:
                        y = is_op("relax.astype")(y)
                        ann["astype"] = y
                        y = is_op("relax.multiply")(y, p_const())
                        ann["scale"] = y
                        y = is_op("relax.nn.relu")(y)
                        ann["relu"] = y
                    name = COMPOSITE_PREFIX + kind + (".pad" if pad else "") + (".bias" if bias else "") + \
                        (".relu" if relu else "")
                    out.append(FusionPattern(name, y, ann, functools.partial(_check, refuse=refuse)))
    # Most ops first: FuseOpsByPattern takes the first pattern that matches.
    out.sort(key=lambda p: -p.name.count("."))
    return out


def _check(ctx: Any, refuse: Callable[[Any], bool] | None = None) -> bool:
    ann = ctx.annotated_expr
    root = ann["root"]
    data = ann["data"] if "pad" in ann else None
    if refusal(root, data) is not None or (refuse is not None and refuse(root)):
        return False
    if "pad" in ann:
        pad = ann["pad"]
        width = [int(v) for v in pad.attrs.pad_width]
        value = float(pad.attrs.pad_value)
        lo, hi = (0, 255) if dtype_of(ann["data"]) == "uint8" else (-128, 127)
        if str(pad.attrs.pad_mode) != "constant" or any(width[:4]) or value != int(value) or not lo <= value <= hi:
            return False
        if any(conv_attrs(root)["padding"]):
            return False
    if "bias" in ann:
        b = ann["bias"].args[1]
        channels = (shape_of(root) or [0, 0])[1]
        if dtype_of(b) != "int32" or b.value.numpy().size not in (1, channels):
            return False
    if "relu" in ann:
        astype = ann["astype"]
        if str(astype.attrs.dtype) != "float32":
            return False
        channels = (shape_of(root) or [0, 0])[1]
        if not _positive_channel_scale(ann["scale"].args[1], channels):
            return False
    # Intermediate results must not be used outside the composite.
    matched = set(ctx.matched_bindings.keys())
    final = ctx.value_to_bound_var.get(ctx.matched_expr) if hasattr(ctx.value_to_bound_var, "get") else None
    for var in matched:
        if final is not None and var.same_as(final):
            continue
        for user in ctx.var_usages.get(var, []):
            if user not in matched:
                return False
    return True


def partition(mod: Any, refuse: Callable[[Any], bool] | None = None) -> Any:
    """``mod`` with each offloadable layer grouped into a ``vta.*`` composite function;
    ``refuse(conv2d or matmul call)`` may keep a layer on the CPU."""
    from tvm import relax

    return relax.transform.FuseOpsByPattern(_patterns(refuse), bind_constants=True, annotate_codegen=False)(mod)


def layer_names(func: Any) -> list[tuple[Any, str]]:
    """``(binding, name)`` for every conv2d / matmul of ``func``: ``conv2d_0``, ``matmul_0``, ...
    (the names the int8 rewrite's report uses)."""
    counts = {"conv2d": 0, "matmul": 0}
    out = []
    for b in bindings(func):
        op = op_name(b.value)
        if op in (CONV, MATMUL):
            kind = "conv2d" if op == CONV else "matmul"
            out.append((b, f"{kind}_{counts[kind]}"))
            counts[kind] += 1
    return out


def layer_report(func: Any) -> list[dict[str, Any]]:
    """Every conv2d / matmul of ``func`` with the reason it cannot be offloaded (None: it can)."""
    defs = {b.var: b.value for b in bindings(func)}
    out = []
    for b, name in layer_names(func):
        call = b.value
        x = call.args[0]
        data = defs[x].args[0] if op_name(defs.get(x)) == "relax.nn.pad" else None
        out.append({"layer": name, "op": "conv2d" if op_name(call) == CONV else "matmul",
                    "weight": call.args[1], "reason": refusal(call, data)})
    return out
