"""Write a tvmedge model (imported, or optimized: int8, low-rank, compact, pruned) as standard ONNX.

Every binding of the Relax ``main`` becomes the equivalent ONNX operator (opset 17), so the
exported graph has exactly the structure tvmedge compiles: factorized layers stay two
convolutions, pruned layers keep their smaller channel counts.

tvmedge's int8 layers (see :mod:`tvmedge.optimize.quantize`) are the chain

    xq = quantize(x, sx, zx) [-> pad(zx)] -> conv2d/matmul(xq, Wq, int32) [+ bias_i] -> astype f32 -> * (sx*sw)

which is written in the QDQ form other runtimes recognise as int8 (``--format qdq``, the default):

    QuantizeLinear(x, sx, zx) -> DequantizeLinear -> Conv(., DequantizeLinear(Wq, sw, axis 0),
                                                          DequantizeLinear(bias_q, sx*sw))

with the same scales and zero points, so ONNX Runtime / OpenVINO compute the same integers
(``bias_q = bias_i + zx * sum(Wq)`` undoes the zero-point term tvmedge folds into the bias, and
a zero-point pad becomes the conv's own padding). ``--format float`` writes the dequantized
weights as float32 and drops the activation quantization (a float model with int8-rounded
weights, for runtimes without int8).

Anything with no ONNX equivalent is refused naming the binding: hand-written TIR kernels
(``call_tir``: tvmedge's binarized XNOR/popcount layers; the Clip PrimFuncs of the ONNX
importer are written as Max/Min), and operators this exporter does not map.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import TvmedgeError
from ..core.graph import CONV, MATMUL, bindings, dtype_of, ints, is_const, op_name, shape_of
from ..core.model import ImportedModel

OPSET = 17
FORMATS = ("qdq", "float")


def _prim(e: Any) -> float:
    v = getattr(e, "value", e)
    return float(getattr(v, "value", v))


class _Exporter:
    def __init__(self, model: ImportedModel, fmt: str) -> None:
        import onnx  # noqa: F401  (fail early, with the import error, if onnx is missing)

        if fmt not in FORMATS:
            raise TvmedgeError(f"unknown export format '{fmt}' (qdq or float)")
        self.model, self.fmt = model, fmt
        self.func = model.mod["main"]
        self.binds = bindings(self.func)
        self.defs = {b.var: b.value for b in self.binds}
        self.uses: dict[Any, list[Any]] = {}
        from tvm import relax

        for b in self.binds:
            for v in relax.analysis.free_vars(b.value):
                self.uses.setdefault(v, []).append(b.var)
        for v in relax.analysis.free_vars(self.func.body.body):
            self.uses.setdefault(v, []).append(None)
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.names: dict[Any, str] = {}  # relax var / constant -> ONNX value name
        self.counter = 0
        self.int8_layers: list[dict[str, Any]] = []
        self.skip: set[Any] = set()  # bindings emitted as part of an int8 chain

    # ------------------------------------------------------------ helpers
    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_{self.counter}"

    def init(self, value: np.ndarray, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        from onnx import helper

        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def value(self, e: Any) -> str:
        """The ONNX name holding Relax expression ``e`` (a var or a constant)."""
        from tvm import relax

        if is_const(e):
            if e not in self.names:
                self.names[e] = self.init(e.value.numpy())
            return self.names[e]
        if isinstance(e, relax.Var):
            if e not in self.names:
                raise TvmedgeError(f"export: {e.name} is used before it is defined (unsupported graph form)")
            return self.names[e]
        raise TvmedgeError(f"export: argument {type(e).__name__} is not supported")

    def const(self, e: Any) -> np.ndarray | None:
        from ..optimize.int8_graph import _const_eval

        return _const_eval(e, self.defs)

    def single_user(self, var: Any) -> Any:
        users = self.uses.get(var, [])
        return users[0] if len(users) == 1 and users[0] is not None else None

    # ------------------------------------------------------------ int8 chains
    def find_int8_chains(self) -> dict[Any, dict[str, Any]]:
        """conv/matmul var -> its int8 chain (quantize source, pad, bias, scale, output var)."""
        chains = {}
        for b in self.binds:
            op = op_name(b.value)
            if op not in (CONV, MATMUL) or dtype_of(b.value.args[0]) not in ("uint8", "int8"):
                continue
            layer = f"{b.var.name} ({op.split('.')[-1]} on {dtype_of(b.value.args[0])})"
            wq = self.const(b.value.args[1])
            if wq is None or wq.dtype != np.int8:
                raise TvmedgeError(f"export: int8 layer {layer} has no constant int8 weight")
            xq, pad = b.value.args[0], None
            if op_name(self.defs.get(xq)) == "relax.nn.pad":
                pad = self.defs[xq]
                xq = pad.args[0]
            q = self.defs.get(xq)
            if op_name(q) != "relax.quantize":
                raise TvmedgeError(f"export: int8 layer {layer}: its input is not produced by a quantize")
            sx = float(self.const(q.args[1]).reshape(-1)[0])
            zx = int(self.const(q.args[2]).reshape(-1)[0])
            var, bias_i = b.var, None
            nxt = self.single_user(var)
            if nxt is not None and op_name(self.defs[nxt]) == "relax.add":
                other = [a for a in self.defs[nxt].args if not a.same_as(var)]
                bias_i = self.const(other[0]) if other else None
                if bias_i is None:
                    raise TvmedgeError(f"export: int8 layer {layer}: int32 add of a non-constant")
                self.skip.add(nxt)
                var, nxt = nxt, self.single_user(nxt)
            if nxt is None or op_name(self.defs[nxt]) != "relax.astype":
                raise TvmedgeError(f"export: int8 layer {layer}: the int32 result is not cast back to float")
            self.skip.add(nxt)
            var, nxt = nxt, self.single_user(nxt)
            eff = self.const(self.defs[nxt].args[1]) if nxt is not None and op_name(self.defs[nxt]) == "relax.multiply" else None
            if eff is None:
                raise TvmedgeError(f"export: int8 layer {layer}: no dequantize scale after the int32 result")
            channels = wq.shape[0] if op == CONV else wq.shape[1]
            eff = np.broadcast_to(eff.reshape(-1), (channels,)).astype(np.float64)
            wsum = wq.astype(np.int64).sum(axis=(1, 2, 3) if op == CONV else 0)
            bias_i = np.zeros(channels, np.int64) if bias_i is None else bias_i.reshape(-1).astype(np.int64)
            chains[b.var] = {"layer": layer, "op": op, "call": b.value, "xq": xq, "x": q.args[0], "pad": pad,
                             "sx": sx, "zx": zx, "wq": wq, "sw": eff / sx, "eff": eff,
                             "bias_q": bias_i + zx * wsum, "out": nxt}
            self.skip.add(nxt)
        return chains

    def emit_int8(self, chain: dict[str, Any]) -> None:
        call, sw, eff = chain["call"], chain["sw"], chain["eff"]
        if self.fmt == "qdq":
            x = self.node("DequantizeLinear", [self.value(chain["xq"]), self.value_of_q(chain["xq"], "scale"),
                                               self.value_of_q(chain["xq"], "zp")], "dq_x")
            w = self.node("DequantizeLinear", [self.init(chain["wq"], "wq"), self.init(sw.astype(np.float32), "w_scale"),
                                               self.init(np.zeros(len(sw), np.int8), "w_zp")],
                          "dq_w", axis=0 if chain["op"] == CONV else 1)
            bias = self.node("DequantizeLinear", [self.init(chain["bias_q"].astype(np.int32), "bias_q"),
                                                  self.init((chain["sx"] * sw).astype(np.float32), "bias_scale")],
                             "dq_b", axis=0)
        else:
            x = self.value(chain["x"])
            shape = [-1] + [1] * (chain["wq"].ndim - 1) if chain["op"] == CONV else [1, -1]
            w = self.init((chain["wq"].astype(np.float64) * sw.reshape(shape)).astype(np.float32), "w")
            bias = self.init((chain["bias_q"] * eff).astype(np.float32), "b")
        if chain["op"] == CONV:
            a = call.attrs
            pads = ints(a.padding)
            if chain["pad"] is not None:  # [n0, n1, c0, c1, top, bottom, left, right] -> conv padding
                pw = ints(chain["pad"].attrs.pad_width)
                if any(pw[:4]):
                    raise TvmedgeError(f"export: int8 layer {chain['layer']} pads batch or channels")
                pads = [pads[0] + pw[4], pads[1] + pw[6], pads[2] + pw[5], pads[3] + pw[7]]
            out = self.node("Conv", [x, w, bias], "conv", strides=ints(a.strides), pads=pads,
                            dilations=ints(a.dilation), group=int(a.groups))
        else:
            out = self.node("Add", [self.node("MatMul", [x, w], "matmul"), bias], "matmul_bias")
        self.names[chain["out"]] = out
        self.int8_layers.append({"layer": chain["layer"], "act_scale": chain["sx"], "act_zero_point": chain["zx"],
                                 "weight_shape": "x".join(map(str, chain["wq"].shape))})

    def value_of_q(self, xq: Any, what: str) -> str:
        q = self.defs[xq]
        return self.value(q.args[1] if what == "scale" else q.args[2])

    # ------------------------------------------------------------ ordinary operators
    def emit(self, b: Any, chains: dict[Any, dict[str, Any]]) -> None:
        from tvm import relax

        var, e = b.var, b.value
        hint = var.name
        if var in chains:
            self.emit_int8(chains[var])
            return
        if var in self.skip:
            return
        if is_const(e):
            self.names[var] = self.value(e)
            return
        if isinstance(e, relax.Var):
            self.names[var] = self.value(e)
            return
        if isinstance(e, relax.Tuple):
            self.names[var] = [self.value(f) for f in e.fields]  # consumed by concat
            return
        if isinstance(e, relax.TupleGetItem):
            self.names[var] = self.names[e.tuple_value][int(e.index)]
            return
        op = op_name(e)
        if op == "relax.call_tir" or not isinstance(e, relax.Call) or op is None:
            what = e.args[0].name_hint if op == "relax.call_tir" else type(e).__name__
            raise TvmedgeError(f"export: layer {hint} is a hand-written TIR kernel ({what}; e.g. a binarized "
                               f"XNOR/popcount layer) with no ONNX equivalent")
        c = self.const(e) if op in ("relax.reshape", "relax.permute_dims", "relax.astype") else None
        if c is not None:  # constant sub-graph: fold it into one initializer
            self.names[var] = self.init(c.astype(c.dtype), "k")
            return
        a = e.attrs
        args = e.args
        x = lambda i=0: self.value(args[i])  # noqa: E731
        binary = {"relax.add": "Add", "relax.subtract": "Sub", "relax.multiply": "Mul", "relax.divide": "Div",
                  "relax.maximum": "Max", "relax.minimum": "Min"}
        unary = {"relax.nn.relu": "Relu", "relax.sigmoid": "Sigmoid", "relax.tanh": "Tanh", "relax.exp": "Exp",
                 "relax.sqrt": "Sqrt", "relax.negative": "Neg", "relax.abs": "Abs"}
        if op in binary:
            out = self.node(binary[op], [x(0), x(1)], hint)
        elif op in unary:
            out = self.node(unary[op], [x()], hint)
        elif op == "relax.nn.silu":
            out = self.node("Mul", [x(), self.node("Sigmoid", [x()], hint)], hint)
        elif op == "relax.clip":
            dt = np.dtype(dtype_of(args[0]))
            out = self.node("Clip", [x(), self.init(np.array(_prim(args[1]), dt)), self.init(np.array(_prim(args[2]), dt))], hint)
        elif op == CONV:
            if (str(a.data_layout), str(a.kernel_layout)) != ("NCHW", "OIHW"):
                raise TvmedgeError(f"export: layer {hint}: conv2d layout {a.data_layout}/{a.kernel_layout} (only NCHW/OIHW)")
            out = self.node("Conv", [x(0), x(1)], hint, strides=ints(a.strides), pads=ints(a.padding),
                            dilations=ints(a.dilation), group=int(a.groups))
        elif op == MATMUL:
            out = self.node("MatMul", [x(0), x(1)], hint)
        elif op in ("relax.nn.max_pool2d", "relax.nn.avg_pool2d"):
            if str(a.layout) != "NCHW":
                raise TvmedgeError(f"export: layer {hint}: pooling layout {a.layout} (only NCHW)")
            kw = dict(kernel_shape=ints(a.pool_size), strides=ints(a.strides), pads=ints(a.padding),
                      ceil_mode=int(bool(a.ceil_mode)))
            if op == "relax.nn.max_pool2d":
                out = self.node("MaxPool", [x()], hint, dilations=ints(a.dilation), **kw)
            else:
                out = self.node("AveragePool", [x()], hint, count_include_pad=int(bool(a.count_include_pad)), **kw)
        elif op == "relax.nn.adaptive_avg_pool2d":
            if shape_of(var)[2:] != [1, 1]:
                raise TvmedgeError(f"export: layer {hint}: adaptive average pooling to {shape_of(var)[2:]} (only 1x1)")
            out = self.node("GlobalAveragePool", [x()], hint)
        elif op in ("relax.max", "relax.min") and a.axis is not None:
            out = self.node("ReduceMax" if op == "relax.max" else "ReduceMin", [x()], hint, axes=ints(a.axis),
                            keepdims=int(bool(a.keepdims)))
        elif op in ("relax.equal", "relax.greater", "relax.less"):
            out = self.node({"relax.equal": "Equal", "relax.greater": "Greater", "relax.less": "Less"}[op],
                            [x(0), x(1)], hint)
        elif op in ("relax.mean", "relax.sum"):
            axes = ints(a.axis) if a.axis is not None else list(range(len(shape_of(args[0]))))
            if op == "relax.mean":
                out = self.node("ReduceMean", [x()], hint, axes=axes, keepdims=int(bool(a.keepdims)))
            else:
                out = self.node("ReduceSum", [x(), self.init(np.array(axes, np.int64))], hint, keepdims=int(bool(a.keepdims)))
        elif op == "relax.nn.softmax":
            out = self.node("Softmax", [x()], hint, axis=int(a.axis))
        elif op == "relax.concat":
            parts = self.names[args[0]] if isinstance(args[0], relax.Var) else [self.value(f) for f in args[0].fields]
            out = self.node("Concat", parts, hint, axis=int(a.axis))
        elif op == "relax.permute_dims":
            perm = ints(a.axes) if a.axes is not None else list(range(len(shape_of(args[0]))))[::-1]
            out = self.node("Transpose", [x()], hint, perm=perm)
        elif op in ("relax.reshape", "relax.flatten", "relax.squeeze", "relax.expand_dims"):
            out = self.node("Reshape", [x(), self.init(np.array(shape_of(var), np.int64))], hint)
        elif op == "relax.astype":
            from onnx import helper

            out = self.node("Cast", [x()], hint, to=helper.np_dtype_to_tensor_dtype(np.dtype(str(a.dtype))))
        elif op == "relax.image.resize2d":
            out = self._resize(e, hint)
        elif op == "relax.quantize":
            if self.fmt == "float":
                out = x()  # the int8 chains read the float input directly
            else:
                out = self.node("QuantizeLinear", [x(0), x(1), x(2)], hint, axis=int(a.axis))
        elif op == "relax.dequantize":
            out = self.node("DequantizeLinear", [x(0), x(1), x(2)], hint, axis=int(a.axis))
        elif op == "relax.nn.pad":
            if all(u in chains for u in self.uses.get(var, [])):
                return  # folded into its int8 conv's padding
            pw = ints(a.pad_width)
            dt = np.dtype(dtype_of(args[0]))
            out = self.node("Pad", [x(), self.init(np.array(pw[0::2] + pw[1::2], np.int64)),
                                    self.init(np.array(_prim(a.pad_value), dt))], hint, mode="constant")
        else:
            raise TvmedgeError(f"export: layer {hint}: operator {op} has no ONNX mapping in tvmedge's exporter")
        self.names[var] = out

    def _resize(self, e: Any, hint: str) -> str:
        a = e.attrs
        if str(a.layout) != "NCHW":
            raise TvmedgeError(f"export: layer {hint}: resize layout {a.layout} (only NCHW)")
        in_shape = shape_of(e.args[0])
        sizes = np.array(in_shape[:2] + [int(v) for v in e.args[1].values], np.int64)
        method = {"nearest_neighbor": "nearest", "linear": "linear", "cubic": "cubic"}[str(a.method)]
        kw: dict[str, Any] = dict(mode=method, coordinate_transformation_mode=str(a.coordinate_transformation_mode))
        if method == "nearest":
            kw["nearest_mode"] = {"": "round_prefer_floor", "round": "round_prefer_ceil"}.get(
                str(a.rounding_method), str(a.rounding_method))
        if method == "cubic":
            kw["cubic_coeff_a"] = float(a.cubic_alpha)
        return self.node("Resize", [self.value(e.args[0]), "", "", self.init(sizes)], hint, **kw)

    # ------------------------------------------------------------ whole graph
    def build(self) -> tuple[Any, dict[str, Any]]:
        import onnx
        from onnx import helper
        from tvm import relax

        for spec, param in zip(self.model.inputs, self.func.params):
            self.names[param] = spec.name
        chains = self.find_int8_chains()
        for b in self.binds:
            self.emit(b, chains)
        body = self.func.body.body
        outs = [self.value(f) for f in body.fields] if isinstance(body, relax.Tuple) else [self.value(body)]
        for spec, name in zip(self.model.outputs, outs):
            self.nodes.append(helper.make_node("Identity", [name], [spec.name], name=f"output_{spec.name}"))

        def info(spec: Any) -> Any:
            return helper.make_tensor_value_info(spec.name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)),
                                                 list(spec.shape))

        graph = helper.make_graph(self.nodes, "tvmedge", [info(s) for s in self.model.inputs],
                                  [info(s) for s in self.model.outputs], self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="tvmedge")
        proto.ir_version = 8
        onnx.checker.check_model(proto)
        report = {"format": self.fmt, "opset": OPSET, "nodes": len(self.nodes),
                  "int8_layers": self.int8_layers if self.fmt == "qdq" else [],
                  "dequantized_int8_layers": len(self.int8_layers) if self.fmt == "float" else 0,
                  "rewrites": list(self.model.rewrites)}
        return proto, report


def to_onnx(model: ImportedModel, fmt: str = "qdq") -> tuple[Any, dict[str, Any]]:
    """``model`` as an ``onnx.ModelProto`` and a report (int8 layers written as QDQ, node count).
    The importer's Clip PrimFuncs are written as Max/Min (``lower.normalize.without_clip_prim_funcs``)."""
    from dataclasses import replace

    from ..lower.normalize import without_clip_prim_funcs

    return _Exporter(replace(model, mod=without_clip_prim_funcs(model.mod)), fmt).build()


def write_onnx(model: ImportedModel, path: str | os.PathLike, fmt: str = "qdq") -> dict[str, Any]:
    """Export ``model`` to ``path`` (written to a temporary name, then renamed: an error leaves
    nothing half-written). Returns the report, with the file's size."""
    import onnx

    path = Path(path)
    if path.suffix != ".onnx":
        raise TvmedgeError(f"-o {path}: the export is written as a .onnx file")
    proto, report = to_onnx(model, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    report.update(output=str(path), bytes=path.stat().st_size)
    return report
