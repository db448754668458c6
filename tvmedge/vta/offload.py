"""Compile a model for a VTA target: partition, generate each offloaded layer's stream, and
put a call to the host-side driver function in its place.

After :func:`tvmedge.vta.partition.partition`, each ``vta.*`` composite call in ``main``
becomes::

    acc = R.call_dps_packed("tvmedge.vta.run", (x, header, program, uops, weights, bias),
                            R.Tensor((1, Cout, OH, OW), "int32"))
    [y = R.astype(acc, "float32") * scale]      # the dequantize, on the host, when it was fused

The streams, micro-ops and packed weights are constant tensors of the Relax module, so the
compiled library (``model.so``) carries them like any weight; the rest of the graph
compiles for the host CPU target as usual. The returned report says, per conv2d / matmul,
where it went and why, with each offloaded layer's tiling and the timing model's estimate.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import numpy as np

from ..core.graph import CONV, bindings, conv_attrs, dtype_of, op_name, shape_of
from ..core.model import ImportedModel
from .codegen import Compiled, ConvLayer, Tiling, compile_layer, workload_key
from .isa import HwConfig
from .partition import COMPOSITE_PREFIX, layer_report, partition
from .runtime import FUNC_NAME, header
from .timing import estimate


def _layer_from_composite(func: Any, name: str) -> tuple[ConvLayer, Any, bool, Any]:
    """``(layer, scale const or None, is_matmul, root call)`` from a ``vta.*`` composite function."""
    ops = {op_name(b.value): b.value for b in bindings(func)}
    if op_name(func.body.body) is not None:
        ops.setdefault(op_name(func.body.body), func.body.body)
    root = ops[CONV] if CONV in ops else ops["relax.matmul"]
    pad = ops.get("relax.nn.pad")
    data = pad.args[0] if pad is not None else root.args[0]
    shift = 128 if dtype_of(data) == "uint8" else 0
    w = root.args[1].value.numpy()
    add = ops.get("relax.add")
    relu = "relax.nn.relu" in ops
    scale = ops["relax.multiply"].args[1] if relu else None
    if op_name(root) == CONV:
        a = conv_attrs(root)
        _, cin, h, wd = shape_of(data)
        cout, _, kh, kw = w.shape
        t, l, b, r = a["padding"]
        pad_value = 0
        if pad is not None:
            pw = [int(v) for v in pad.attrs.pad_width]
            t, b, l, r = pw[4], pw[5], pw[6], pw[7]
            pad_value = int(float(pad.attrs.pad_value))
        layer = ConvLayer(name, cin, h, wd, cout, kh, kw, tuple(a["strides"]), (t, l, b, r), pad_value, shift,
                          w.astype(np.int8), np.zeros(cout, np.int32), relu)
        is_matmul = False
    else:
        k, n = w.shape
        layer = ConvLayer(name, k, 1, 1, n, 1, 1, (1, 1), (0, 0, 0, 0), 0, shift,
                          np.ascontiguousarray(w.T.reshape(n, k, 1, 1)).astype(np.int8), np.zeros(n, np.int32), relu)
        is_matmul = True
    if add is not None:
        layer.bias = np.broadcast_to(add.args[1].value.numpy().reshape(-1), (layer.cout,)).astype(np.int32).copy()
    return layer, scale, is_matmul, root


def _composites(mod: Any) -> list[tuple[Any, Any]]:
    """``(call, composite function)`` for each ``vta.*`` composite call in ``main``, in order."""
    from tvm import relax

    out = []
    for b in bindings(mod["main"]):
        call = b.value
        if isinstance(call, relax.Call) and isinstance(call.op, relax.GlobalVar):
            func = mod[call.op]
            comp = func.attrs.get("Composite") if func.attrs is not None else None
            if comp is not None and str(comp).startswith(COMPOSITE_PREFIX):
                out.append((call, func))
    return out


def _name_of(report: list[dict[str, Any]], func: Any) -> str:
    root_w = _layer_from_composite(func, "?")[3].args[1]
    return next((r["layer"] for r in report if r["weight"].same_as(root_w)), "?")


def offloadable_layers(model: ImportedModel, accel: Any) -> list[ConvLayer]:
    """The layers of ``model`` the partitioning would send to ``accel`` (their tuning workloads)."""
    report = layer_report(model.mod["main"])
    mod = partition(model.mod)
    return [_layer_from_composite(func, _name_of(report, func))[0] for _, func in _composites(mod)]


def offload(model: ImportedModel, accel: Any, records: dict[str, dict[str, Any]] | None = None,
            warn: Callable[[str], None] | None = None) -> tuple[ImportedModel, dict[str, Any]]:
    """``model`` with its offloadable int8 layers running on accelerator ``accel``
    (a :class:`tvmedge.devices.Accelerator`), and the report of where each layer went.

    ``records``: tuning choices by workload key (:mod:`tvmedge.vta.tune`): a layer's tiling,
    and whether to offload it at all; layers without a record get the default tiling."""
    from tvm import relax

    cfg = HwConfig.from_accelerator(accel)
    records = records or {}
    report = layer_report(model.mod["main"])
    by_weight = [(r["weight"], r) for r in report]
    for r in report:
        r["where"] = "cpu"
    if records:
        for layer in offloadable_layers(model, accel):
            rec = records.get(workload_key(layer))
            if rec is not None and not rec.get("offload", True):
                r = next(r for r in report if r["layer"] == layer.name)
                r["reason"] = "kept on the CPU by the tuning choice (estimated faster there)"
    keep = [r["weight"] for r in report if r["reason"] is not None]
    mod = partition(model.mod, refuse=lambda root: any(w.same_as(root.args[1]) for w in keep))
    compiled: dict[str, Compiled] = {}
    tuned: set[str] = set()

    @relax.expr_functor.mutator
    class Offloader(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call.op, relax.GlobalVar):
                return call
            func = mod[call.op]
            comp = func.attrs.get("Composite") if func.attrs is not None else None
            if comp is None or not str(comp).startswith(COMPOSITE_PREFIX):
                return call
            root_w = _layer_from_composite(func, "?")[3].args[1]
            entry = next((r for w, r in by_weight if w.same_as(root_w)), None)
            name = entry["layer"] if entry else f"layer_{len(compiled)}"
            layer, scale, is_matmul, _ = _layer_from_composite(func, name)
            rec = records.get(workload_key(layer))
            c = compile_layer(layer, cfg, Tiling(**rec["tiling"]) if rec else None, accel.name)
            if rec:
                tuned.add(name)
            compiled[name] = c
            x = call.args[0]
            if is_matmul:
                x = self.builder_.emit(relax.op.reshape(x, [1, layer.cin, 1, 1]))
            oh, ow = layer.out_hw
            args = [x] + [relax.const(a) for a in (header(cfg, layer), c.program, c.uops, c.weights, c.bias)]
            out = self.builder_.emit(relax.op.call_dps_packed(
                FUNC_NAME, relax.Tuple(args), relax.TensorType([1, layer.cout, oh, ow], "int32")))
            if is_matmul:
                out = self.builder_.emit(relax.op.reshape(out, [1, layer.cout]))
            if scale is None:
                return out
            out = self.builder_.emit(relax.op.astype(out, "float32"))
            return relax.op.multiply(out, scale)

    off = Offloader(mod)
    gv = mod.get_global_var("main")
    new_main = off.visit_expr(mod["main"])
    off.builder_.update_func(gv, new_main)
    new_mod = off.builder_.get()
    new_mod = relax.transform.DeadCodeElimination(["main"])(new_mod)
    new_mod = relax.transform.Normalize()(new_mod)

    layers_out = []
    total_cycles = 0
    for r in report:
        c = compiled.get(r["layer"])
        row = {"layer": r["layer"], "op": r["op"], "where": "cpu", "reason": r["reason"]}
        if c is not None:
            e = estimate(c.program, accel)
            total_cycles += e.cycles
            row.update(where=accel.name, reason=None, tiling=c.tiling.to_dict(), tuned=r["layer"] in tuned, macs=c.layer.macs,
                       estimate=e.to_dict())
        elif r["reason"] is None:
            row["reason"] = "did not match an offload pattern (an intermediate result is used elsewhere)"
        layers_out.append(row)
    offloaded = [r for r in layers_out if r["where"] != "cpu"]
    info = {
        "accelerator": accel.name, "simulated": True,
        "note": "figures from tvmedge's timing model of a VTA-style core, not measured on an FPGA; " + (
            f"the host CPU part runs on this machine (natively), not the board's {accel.host_cpu.get('name', 'CPU')}"
            if accel.host_part_runs == "native" else
            f"the host CPU part is built for the board's {accel.host_cpu.get('name', 'CPU')} and the emulated board "
            f"runs it under {accel.host_part_runs}"),
        "hw": cfg.to_dict(), "clock_mhz": accel.clock_mhz, "layers": layers_out,
        "offloaded": [r["layer"] for r in offloaded],
        "on_cpu": [{"layer": r["layer"], "reason": r["reason"]} for r in layers_out if r["where"] == "cpu"],
        "accelerator_cycles": total_cycles,
        "accelerator_ms": total_cycles / (accel.clock_mhz * 1e3),
        "bytes_moved": sum(r["estimate"]["bytes_loaded"] + r["estimate"]["bytes_stored"] for r in offloaded),
    }
    if not offloaded:
        msg = (f"no layer of this model can run on {accel.name} (no int8 conv2d/dense: quantize it with "
               "--quantize int8); it compiles entirely for the host CPU")
        info["warning"] = msg
        (warn or (lambda m: warnings.warn(m, stacklevel=2)))(msg)
    new = dataclasses.replace(model, mod=new_mod, rewrites=list(model.rewrites) + [
        {"rewrite": "vta-offload", "accelerator": accel.name, "layers": len(offloaded)}])
    return new, info


