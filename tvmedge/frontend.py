"""Import a trained model (ONNX, ``torch.export`` ``.pt2``, TFLite) into a Relax IRModule.

Every importer returns an :class:`ImportedModel`: the Relax module with static input
shapes, the names/shapes/dtypes of inputs and outputs, and a hash of the source file.
Bad input (corrupt file, unsupported operator, dynamic dims without ``--input-shape``)
raises :class:`TvmedgeError` with one clear sentence.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .core.artifact import file_sha256
from .core.errors import TvmedgeError, first_line
from .core.model import ImportedModel, TensorSpec, load_relax
from .optimize.int8_graph import fold_qdq, has_qdq

FORMATS = {".onnx": "onnx", ".pt2": "pt2", ".tflite": "tflite", ".relax": "relax"}


def parse_shapes(items: list[str] | None) -> dict[str, list[int]]:
    """Parse ``name:1x3x224x224`` items (as given to ``--input-shape``)."""
    shapes: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, dims = item.rpartition(":")
        if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims):
            raise TvmedgeError(f"bad --input-shape '{item}': expected NAME:DIMS, e.g. input:1x3x224x224")
        shapes[name] = [int(d) for d in dims.split("x")]
    return shapes


def load_model(path: str | os.PathLike, input_shapes: dict[str, list[int]] | None = None,
               fold_quantized: bool = True) -> ImportedModel:
    """Import ``path`` into Relax; ``input_shapes`` fixes dynamic input dims.

    A model quantized elsewhere (ONNX QDQ format) imports as quantize -> dequantize ->
    float op; with ``fold_quantized`` its layers become real int8 ops at import, so
    compile, tune and run all see the same int8 graph (recorded in ``rewrites``).
    """
    path = Path(path)
    if not path.exists():
        raise TvmedgeError(f"model file not found: {path}")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TvmedgeError(f"unknown model format '{path.suffix}' for {path.name}: "
                           f"expected one of {', '.join(FORMATS)}")
    shapes = dict(input_shapes or {})
    if fmt == "relax":
        return load_relax(path, shapes)
    loader = {"onnx": _load_onnx, "pt2": _load_pt2, "tflite": _load_tflite}[fmt]
    mod, inputs, out_names, rewrites = loader(path, shapes)
    unknown = set(shapes) - {i.name for i in inputs}
    if unknown:
        raise TvmedgeError(f"--input-shape names unknown input(s) {sorted(unknown)}; "
                           f"model inputs are {[i.name for i in inputs]}")
    outputs = _output_specs(mod, out_names)
    model = ImportedModel(mod=mod, inputs=inputs, outputs=outputs, format=fmt,
                          source=str(path), sha256=file_sha256(path), rewrites=rewrites)
    if fold_quantized:
        if has_qdq(model):
            model, _ = fold_qdq(model)
    return model


def _require_static(name: str, dims: list[Any], given: list[int] | None) -> list[int]:
    if given is not None:
        if len(given) != len(dims):
            raise TvmedgeError(f"--input-shape for '{name}' has rank {len(given)}, model input has rank {len(dims)}")
        for g, d in zip(given, dims):
            if isinstance(d, int) and d > 0 and d != g:
                raise TvmedgeError(f"--input-shape for '{name}' is {given} but the model fixes it to {dims}")
        return list(given)
    if any(not isinstance(d, int) or d <= 0 for d in dims):
        shown = "x".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in dims)
        raise TvmedgeError(f"input '{name}' has dynamic dims ({shown}): give its shape with "
                           f"--input-shape {name}:{shown.replace('?', 'N')}")
    return list(dims)


# ---------------------------------------------------------------- ONNX
def _load_onnx(path: Path, shapes: dict[str, list[int]]):
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise TvmedgeError(f"cannot read ONNX model {path.name} (corrupt or truncated?): {first_line(e)}") from None
    graph = model.graph
    if not graph.node:
        raise TvmedgeError(f"ONNX model {path.name} has an empty graph (corrupt or not a model?)")
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"Constant", "If"}
    missing = sorted({n.op_type for n in graph.node if n.op_type not in known})
    if missing:
        raise TvmedgeError(f"unsupported ONNX operator(s) in {path.name}: {', '.join(missing)}")
    try:
        # full_check adds strict shape inference: graphs it refuses (an Einsum whose
        # equation does not fit its inputs, say) crashed TVM's importer natively.
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise TvmedgeError(f"invalid ONNX model {path.name}: {first_line(e)}") from None
    ignored = _ignored_attributes(graph)
    if ignored:
        raise TvmedgeError(f"unsupported ONNX attribute(s) in {path.name}: {', '.join(ignored)} "
                           "(TVM's importer would ignore them and compute something else)")
    initializers = {t.name for t in graph.initializer}
    inputs: list[TensorSpec] = []
    for inp in graph.input:
        if inp.name in initializers:
            continue
        tt = inp.type.tensor_type
        dims: list[Any] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        static = _require_static(inp.name, dims, shapes.get(inp.name))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        inputs.append(TensorSpec(inp.name, static, dtype))
    model, folded = fold_shape_subgraphs(model, {i.name: i.shape for i in inputs})
    from tvm.relax.frontend.onnx import from_onnx

    try:
        mod = from_onnx(model, shape_dict={i.name: i.shape for i in inputs},
                        dtype_dict={i.name: i.dtype for i in inputs}, keep_params_in_input=False)
    except Exception as e:
        raise TvmedgeError(f"cannot import ONNX model {path.name} into Relax: {first_line(e)}") from None
    rewrites = [{"rewrite": "onnx-shape-fold", "nodes": folded}] if folded else []
    return mod, inputs, [o.name for o in graph.output], rewrites


# Attribute values TVM's ONNX importer does not implement and would silently ignore:
# (op, attribute) -> the only value it computes correctly.
_ONLY_VALUE = {
    ("Resize", "antialias"): 0,
    ("Resize", "keep_aspect_ratio_policy"): b"stretch",
    ("Resize", "axes"): None,
}


def _ignored_attributes(graph) -> list[str]:
    import onnx

    found = []
    for node in graph.node:
        for a in node.attribute:
            key = (node.op_type, a.name)
            if key in _ONLY_VALUE:
                value = onnx.helper.get_attribute_value(a)
                if value != _ONLY_VALUE[key]:
                    found.append(f"{node.op_type} {a.name}={value!r} (node {node.name or node.output[0]})")
    return found


# Ops that compute on shapes (and small index tensors) in exported graphs; folding evaluates
# them once the input shapes are fixed. Anything random or stateful stays in the graph.
_FOLDABLE_OPS = {
    "Shape", "Size", "Gather", "GatherElements", "Slice", "Concat", "Cast", "CastLike", "Unsqueeze",
    "Squeeze", "Reshape", "Flatten", "Identity", "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs",
    "Floor", "Ceil", "Round", "Sqrt", "Pow", "Min", "Max", "Equal", "Less", "LessOrEqual",
    "Greater", "GreaterOrEqual", "Not", "And", "Or", "Where", "ConstantOfShape", "Range",
    "ReduceProd", "ReduceSum", "ReduceMin", "ReduceMax", "Expand", "Tile", "Transpose", "Split",
    "Sign", "Clip", "ScatterND", "ScatterElements", "NonZero", "Constant",
}
_FOLD_MAX_ELEMENTS = 1 << 16  # a folded value larger than this stays computed in the graph


def fold_shape_subgraphs(model: Any, input_shapes: dict[str, list[int]]) -> tuple[Any, int]:
    """Evaluate the shape computations of an ONNX graph whose input shapes are now fixed.

    Exporters (torch's with dynamic axes, Paddle2ONNX, tf2onnx) compute ``Reshape``
    targets, ``Slice`` bounds and the like at run time from ``Shape``/``Size`` through
    ``Gather``/``Slice``/``Concat``/``Cast``/arithmetic. TVM's importer cannot take a
    ``Reshape`` target that is a computed tensor, and a ``Slice`` with computed bounds
    imports as a ``dynamic_strided_slice`` whose unknown output shape later ops cannot be
    compiled against. With ``input_shapes`` fixed, ONNX shape inference gives every
    ``Shape`` input's dims; each node that depends on those values (and otherwise only on
    small constants) is evaluated with ONNX's reference evaluator and replaced by an
    initializer, repeated until nothing more folds (a folded ``Reshape`` target lets
    inference see the next ``Shape``). Returns the new model and the count of nodes folded;
    a graph without ``Shape``/``Size`` nodes comes back unchanged.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if not any(n.op_type in ("Shape", "Size") for n in model.graph.node):
        return model, 0
    model = _copy_onnx(model)
    graph = model.graph
    for inp in graph.input:
        if inp.name in input_shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, input_shapes[inp.name]):
                d.Clear()
                d.dim_value = int(v)
    opsets = {o.domain or "": o.version for o in model.opset_import}
    if set(opsets) - {"", "ai.onnx"}:
        opsets = {"": opsets.get("", opsets.get("ai.onnx", 17))}
    keep = {o.name for o in graph.output}
    values: dict[str, np.ndarray] = {}  # names whose values are known (small constants, folded results)
    for t in graph.initializer:
        if int(np.prod(t.dims)) <= _FOLD_MAX_ELEMENTS:
            values[t.name] = numpy_helper.to_array(t)
    derived: set[str] = set()  # values computed from shapes: the nodes producing them are folded
    folded = 0
    for _ in range(16):
        shapes = _static_shapes(model)
        new_nodes = []
        progress = False
        for n in graph.node:
            ins = [i for i in n.input if i]
            ok = (n.domain in ("", "ai.onnx") and n.op_type in _FOLDABLE_OPS
                  and not any(o in keep for o in n.output))
            result: list[np.ndarray] | None = None
            if ok and all(i in values for i in ins) and not any(i in derived for i in ins):
                # constants only (e.g. a Constant, or a Cast of one): its value may be needed to
                # fold what follows, but the node itself stays as the exporter wrote it
                if not all(o in values for o in n.output if o):
                    outs = _evaluate(n, opsets, values)
                    for name, r in zip(n.output, outs or []):
                        if name and r.size <= _FOLD_MAX_ELEMENTS:
                            values[name] = r
                new_nodes.append(n)
                continue
            if ok and n.op_type in ("Shape", "Size") and ins[0] in shapes:
                dims = np.asarray(shapes[ins[0]], dtype=np.int64)
                if n.op_type == "Size":
                    result = [np.asarray(dims.prod(), dtype=np.int64)]
                else:
                    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
                    result = [dims[start:end]]
            elif ok and all(i in values for i in ins):
                result = _evaluate(n, opsets, values)
            if result is not None and all(r.size <= _FOLD_MAX_ELEMENTS for r in result):
                for name, r in zip(n.output, result):
                    if name:
                        values[name] = r
                        derived.add(name)
                        graph.initializer.append(numpy_helper.from_array(r, name))
                folded += 1
                progress = True
            else:
                new_nodes.append(n)
        if not progress:
            break
        del graph.node[:]
        graph.node.extend(new_nodes)
        _drop_unused(graph)
    return model, folded


def _evaluate(node: Any, opsets: dict[str, int], values: dict[str, Any]) -> list[Any] | None:
    """``node``'s outputs from ONNX's reference evaluator, or None where it cannot run it."""
    import numpy as np
    from onnx.reference import ReferenceEvaluator

    try:
        outs = ReferenceEvaluator(_single_node_model(node, opsets)).run(None, {i: values[i] for i in node.input if i})
    except Exception:
        return None
    return [np.asarray(o) for o in outs]


def _copy_onnx(model: Any) -> Any:
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _single_node_model(node: Any, opsets: dict[str, int]) -> Any:
    """A one-node ONNX model (value types left open) for the reference evaluator."""
    from onnx import helper

    graph = helper.make_graph([node], "fold", [helper.make_value_info(i, helper.TypeProto()) for i in node.input if i],
                              [helper.make_value_info(o, helper.TypeProto()) for o in node.output if o])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])


def _static_shapes(model: Any) -> dict[str, list[int]]:
    """Fully known tensor shapes from ONNX shape inference (data propagation on)."""
    from onnx import shape_inference

    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = model
    g = inferred.graph
    shapes: dict[str, list[int]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if all(d >= 0 for d in dims):
            shapes[vi.name] = dims
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _drop_unused(graph: Any) -> None:
    """Remove initializers that no node or output reads any more (folded intermediates)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in graph.node:  # inputs of nested graphs (If/Loop bodies) read outer names too
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                used |= {i for sub in g.node for i in sub.input}
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


# ---------------------------------------------------------------- PyTorch (torch.export)
def _load_pt2(path: Path, shapes: dict[str, list[int]]):
    import logging
    import zipfile

    import torch

    if not zipfile.is_zipfile(path):
        raise TvmedgeError(f"cannot read PyTorch exported program {path.name}: not a .pt2 (zip) archive "
                           "(corrupt or truncated?)")
    # torch.export.load logs a full traceback as a warning before re-raising; we report one line.
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.CRITICAL)
    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise TvmedgeError(f"cannot read PyTorch exported program {path.name}: {first_line(e)}") from None
    finally:
        export_log.setLevel(level)
    from tvm import relax, tirx
    from tvm.relax.frontend.torch import from_exported_program

    try:
        mod = from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=True)
    except AssertionError as e:
        msg = first_line(e)
        m = re.search(r"Unsupported function types \[(.*)\]", msg)
        if m:
            raise TvmedgeError(f"unsupported PyTorch operator(s) in {path.name}: {m.group(1)}") from None
        raise TvmedgeError(f"cannot import {path.name} into Relax: {msg}") from None
    except Exception as e:
        raise TvmedgeError(f"cannot import {path.name} into Relax: {first_line(e)}") from None
    user_inputs = [s.arg.name for s in ep.graph_signature.input_specs
                   if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    params = list(mod["main"].params)
    inputs: list[TensorSpec] = []
    binding: dict[Any, int] = {}
    for name, var in zip(user_inputs, params):
        sinfo = var.ty
        dims = [int(d) if isinstance(d, tirx.IntImm) else str(d) for d in sinfo.shape.values]
        static = _require_static(name, dims, shapes.get(name))
        for d, v in zip(sinfo.shape.values, static):
            if isinstance(d, tirx.Var):
                binding[d] = v
        inputs.append(TensorSpec(name, static, str(sinfo.dtype)))
    if binding:
        mod = relax.transform.BindSymbolicVars(binding, func_name="main")(mod)
    outs = [s.arg.name for s in ep.graph_signature.output_specs
            if s.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT]
    return mod, inputs, outs, []


# ---------------------------------------------------------------- TFLite
def _load_tflite(path: Path, shapes: dict[str, list[int]]):
    try:
        import tflite
    except ImportError:
        raise TvmedgeError("importing .tflite models needs the 'tflite' package (pip install tflite)") from None
    buf = path.read_bytes()
    try:
        if len(buf) < 8 or buf[4:8] != b"TFL3":
            raise ValueError("missing TFL3 file identifier")
        model = tflite.Model.GetRootAsModel(buf, 0)
        sub = model.Subgraphs(0)
        # Walk the tensor and buffer tables once, so that a truncated or garbled file fails
        # here (and not deep inside the Relax importer); a vector longer than the file is corrupt.
        if 4 * (model.BuffersLength() + sub.TensorsLength()) > len(buf):
            raise ValueError("table vectors run past the end of the file")
        for i in range(model.BuffersLength()):
            model.Buffers(i).DataAsNumpy()
        for i in range(sub.TensorsLength()):
            sub.Tensors(i).ShapeAsNumpy()
        tensors = [sub.Tensors(sub.Inputs(i)) for i in range(sub.InputsLength())]
        out_names = [sub.Tensors(sub.Outputs(i)).Name().decode() for i in range(sub.OutputsLength())]
    except Exception as e:
        raise TvmedgeError(f"cannot read TFLite model {path.name} (corrupt or truncated?): "
                           f"{first_line(e)}") from None
    enum = getattr(tflite.TensorType, "TensorType", tflite.TensorType)  # class, or module in old tflite
    type_names = {v: k.lower() for k, v in vars(enum).items() if not k.startswith("_")}
    inputs: list[TensorSpec] = []
    for t in tensors:
        name = t.Name().decode()
        sig = list(t.ShapeSignatureAsNumpy()) if t.ShapeSignatureLength() else list(t.ShapeAsNumpy())
        dims = [int(d) if d > 0 else "?" for d in sig]
        inputs.append(TensorSpec(name, _require_static(name, dims, shapes.get(name)),
                                 type_names.get(t.Type(), "float32")))
    from tvm.relax.frontend.tflite import from_tflite

    try:
        mod = from_tflite(model, shape_dict={i.name: i.shape for i in inputs},
                          dtype_dict={i.name: i.dtype for i in inputs})
    except Exception as e:
        msg = first_line(e)
        m = re.search(r"not supported[^:]*:?\s*(.*)", msg, re.I)
        if m and "operator" in msg.lower():
            raise TvmedgeError(f"unsupported TFLite operator(s) in {path.name}: {m.group(1) or msg}") from None
        raise TvmedgeError(f"cannot import TFLite model {path.name} into Relax: {msg}") from None
    if isinstance(mod, tuple):  # some versions return (mod, params)
        mod = mod[0]
    return mod, inputs, out_names, []


# ---------------------------------------------------------------- helpers
def _output_specs(mod, names: list[str]) -> list[TensorSpec]:
    from tvm import relax

    ret = mod["main"].ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    specs = []
    for i, f in enumerate(fields):
        name = names[i] if i < len(names) else f"output{i}"
        shape = [int(d) for d in f.shape.values] if f.shape is not None else []
        specs.append(TensorSpec(name, shape, str(f.dtype)))
    return specs
