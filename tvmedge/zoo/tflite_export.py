"""Export a small PyTorch CNN to a TensorFlow Lite ``.tflite`` flatbuffer, without TensorFlow.

The zoo's models live in PyTorch, but part of the edge world ships ``.tflite`` files; this
writer lets the TFLite import path be tested (and compared with a real TFLite interpreter)
on a trained model. It traces the model with ``torch.fx`` and writes the flatbuffer with the
builder functions of the ``tflite`` package (schema version 3, identifier ``TFL3``).

Supported, in float32 only: ``Conv2d`` (groups=1; a following ``BatchNorm2d`` is folded
into it, a following ReLU/ReLU6 is fused), ``MaxPool2d`` (no padding), standalone ReLU and
ReLU6, ``flatten`` of a feature map feeding ``Linear``, and ``Linear`` (ReLU/ReLU6 fused).
The model is exported with eval-mode semantics (BatchNorm uses its running statistics).
TFLite is NHWC: a 1x1x8x8 NCHW PyTorch input becomes a 1x8x8x1 TFLite input, conv weights
are stored [O, KH, KW, I], and the columns of a ``Linear`` after ``flatten`` are permuted to
follow NHWC flattening order. Anything else raises :class:`TvmedgeError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import TvmedgeError, first_line

SUPPORTED = ("Conv2d (+BatchNorm2d, ReLU/ReLU6), MaxPool2d, ReLU, ReLU6, flatten -> Linear, Linear")


@dataclass
class _Tensor:
    name: str
    shape: list[int]  # as stored in TFLite (NHWC for rank 4)
    data: np.ndarray | None = None  # constant contents (float32 or int32)
    dtype: str = "float32"


@dataclass
class _Op:
    code: str  # BuiltinOperator name, e.g. "CONV_2D"
    inputs: list[int]
    outputs: list[int]
    options: dict[str, Any] = field(default_factory=dict)


class _Graph:
    """The flat TFLite graph being built: tensors and operators in execution order."""

    def __init__(self) -> None:
        self.tensors: list[_Tensor] = []
        self.ops: list[_Op] = []
        self.inputs: list[int] = []
        self.outputs: list[int] = []

    def tensor(self, name: str, shape: list[int], data: np.ndarray | None = None) -> int:
        dtype = "float32" if data is None else str(data.dtype)
        self.tensors.append(_Tensor(name, [int(d) for d in shape], data, dtype))
        return len(self.tensors) - 1

    def const(self, name: str, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        return self.tensor(name, list(array.shape), array)


# ---------------------------------------------------------------- torch.fx -> _Graph
def _nhwc(shape: torch.Size | list[int]) -> list[int]:
    s = list(shape)
    return [s[0], s[2], s[3], s[1]] if len(s) == 4 else s


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _activation(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str | None:
    """'RELU' / 'RELU6' if ``node`` is that activation, else None."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return "RELU" if type(m) is nn.ReLU else "RELU6" if type(m) is nn.ReLU6 else None
    if node.op == "call_function":
        return ("RELU" if node.target in (F.relu, torch.relu) else
                "RELU6" if node.target is F.relu6 else None)
    if node.op == "call_method":
        return "RELU" if node.target == "relu" else None
    return None


def _describe(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"layer '{node.target}' ({type(gm.get_submodule(str(node.target))).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"operation '{name}' ({node.op})"


def _sole_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _conv_padding(conv: nn.Conv2d, in_hw: list[int], out_hw: list[int]) -> str:
    """The TFLite padding ('SAME'/'VALID') that reproduces the conv's PyTorch padding."""
    if conv.padding == "valid":
        return "VALID"
    if conv.padding == "same":
        return "SAME"
    for i, p in enumerate(_pair(conv.padding)):
        k = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        s = conv.stride[i]
        same_out = -(-in_hw[i] // s)
        total = max((same_out - 1) * s + k - in_hw[i], 0)
        if p == 0 and out_hw[i] == (in_hw[i] - k) // s + 1:
            mode = "VALID"
        elif 2 * p == total and out_hw[i] == same_out:
            mode = "SAME"
        else:
            raise TvmedgeError(f"cannot export Conv2d padding {conv.padding} with stride {conv.stride} on a "
                               f"{in_hw[0]}x{in_hw[1]} input to TFLite: it is neither SAME nor VALID padding")
        if i == 0:
            first = mode
        elif mode != first:
            raise TvmedgeError(f"cannot export Conv2d padding {conv.padding} to TFLite (mixed SAME/VALID)")
    return first


def _trace(model: nn.Module, input_shape: tuple[int, ...]) -> torch.fx.GraphModule:
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:
        raise TvmedgeError(f"cannot trace {type(model).__name__} with torch.fx for TFLite export: "
                           f"{first_line(e)}") from None
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(input_shape, dtype=torch.float32))
    return gm


def _build_graph(model: nn.Module, input_shape: tuple[int, ...], input_name: str,
                 output_name: str) -> _Graph:
    was_training = model.training
    model.eval()
    try:
        gm = _trace(model, input_shape)
    finally:
        model.train(was_training)
    g = _Graph()
    value: dict[torch.fx.Node, int] = {}  # fx node -> TFLite tensor index
    flat_chw: dict[torch.fx.Node, tuple[int, int, int]] = {}  # flatten node -> (C, H, W) before it
    absorbed: set[torch.fx.Node] = set()

    def out_shape(n: torch.fx.Node) -> list[int]:
        meta = n.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise TvmedgeError(f"cannot export {_describe(n, gm)} to TFLite: it does not yield one tensor")
        if meta.dtype != torch.float32:
            raise TvmedgeError(f"cannot export {_describe(n, gm)} to TFLite: only float32 is supported, "
                               f"it yields {meta.dtype}")
        return list(meta.shape)

    def fuse_activation(n: torch.fx.Node) -> tuple[torch.fx.Node, str]:
        user = _sole_user(n)
        act = _activation(user, gm) if user is not None else None
        if act is None:
            return n, "NONE"
        absorbed.add(user)
        return user, act

    for node in gm.graph.nodes:
        if node in absorbed:
            continue
        if node.op == "placeholder":
            if g.inputs:
                raise TvmedgeError("TFLite export supports models with a single input tensor")
            value[node] = g.tensor(input_name, _nhwc(out_shape(node)))
            g.inputs.append(value[node])
            continue
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, torch.fx.Node):
                raise TvmedgeError("TFLite export supports models with a single output tensor")
            g.outputs.append(value[result])
            g.tensors[value[result]].name = output_name
            continue
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src not in value:
            raise TvmedgeError(f"cannot export {_describe(node, gm)} to TFLite: unsupported graph structure")
        x = value[src]

        if type(mod) is nn.Conv2d:
            if mod.groups != 1:
                raise TvmedgeError(f"cannot export layer '{node.target}' to TFLite: grouped/depthwise "
                                   f"Conv2d (groups={mod.groups}) is not supported")
            w = mod.weight.detach().double().numpy()
            b = (mod.bias.detach().double().numpy() if mod.bias is not None else np.zeros(w.shape[0]))
            last = node
            bn_node = _sole_user(node)
            if bn_node is not None and bn_node.op == "call_module" and \
                    type(gm.get_submodule(str(bn_node.target))) is nn.BatchNorm2d:
                bn = gm.get_submodule(str(bn_node.target))
                scale = (bn.weight.detach().double().numpy()
                         / np.sqrt(bn.running_var.double().numpy() + bn.eps))
                w = w * scale[:, None, None, None]
                b = (b - bn.running_mean.double().numpy()) * scale + bn.bias.detach().double().numpy()
                absorbed.add(bn_node)
                last = bn_node
            last, act = fuse_activation(last)
            in_s, o_s = out_shape(src), out_shape(node)
            padding = _conv_padding(mod, in_s[2:], o_s[2:])
            wi = g.const(f"{node.target}.weight", w.transpose(0, 2, 3, 1).astype(np.float32))
            bi = g.const(f"{node.target}.bias", b.astype(np.float32))
            y = g.tensor(last.name, _nhwc(o_s))
            g.ops.append(_Op("CONV_2D", [x, wi, bi], [y], dict(
                padding=padding, stride=mod.stride, dilation=mod.dilation, act=act)))
            value[last] = y
        elif type(mod) is nn.MaxPool2d or (node.op == "call_function" and node.target is F.max_pool2d):
            if mod is not None:
                k, s, p, d = mod.kernel_size, mod.stride, mod.padding, mod.dilation
            else:
                a = dict(zip(["kernel_size", "stride", "padding", "dilation", "ceil_mode"], node.args[1:]))
                a.update(node.kwargs)
                k, s, p, d = a["kernel_size"], a.get("stride"), a.get("padding", 0), a.get("dilation", 1)
            k, s = _pair(k), _pair(s if s not in (None, []) else k)
            in_s, o_s = out_shape(src), out_shape(node)
            valid = [(in_s[2 + i] - k[i]) // s[i] + 1 for i in range(2)]
            if _pair(p) != (0, 0) or _pair(d) != (1, 1) or valid != o_s[2:]:
                raise TvmedgeError(f"cannot export {_describe(node, gm)} to TFLite: only max-pooling "
                                   f"without padding or dilation is supported")
            last, act = fuse_activation(node)
            y = g.tensor(last.name, _nhwc(o_s))
            g.ops.append(_Op("MAX_POOL_2D", [x], [y], dict(kernel=k, stride=s, act=act)))
            value[last] = y
        elif _activation(node, gm) is not None:
            y = g.tensor(node.name, _nhwc(out_shape(node)))
            g.ops.append(_Op(_activation(node, gm), [x], [y]))
            value[node] = y
        elif (node.op == "call_method" and node.target == "flatten") or \
                (node.op == "call_function" and node.target is torch.flatten) or type(mod) is nn.Flatten:
            in_s, o_s = out_shape(src), out_shape(node)
            if len(in_s) != 4 or len(o_s) != 2:
                raise TvmedgeError(f"cannot export {_describe(node, gm)} to TFLite: only flattening an "
                                   f"NCHW feature map to [N, C*H*W] is supported")
            if in_s[2] * in_s[3] > 1 and not all(
                    u.op == "call_module" and type(gm.get_submodule(str(u.target))) is nn.Linear
                    for u in node.users):
                raise TvmedgeError(f"cannot export {_describe(node, gm)} to TFLite: a flattened feature "
                                   f"map must feed Linear layers only (NHWC vs NCHW order)")
            new_shape = [-1, o_s[1]]  # batch left free, so an interpreter may resize the input
            si = g.const(f"{node.name}.shape", np.array(new_shape, dtype=np.int32))
            y = g.tensor(node.name, o_s)
            g.ops.append(_Op("RESHAPE", [x, si], [y], dict(new_shape=new_shape)))
            value[node] = y
            flat_chw[node] = (in_s[1], in_s[2], in_s[3])
        elif type(mod) is nn.Linear:
            if len(out_shape(src)) != 2:
                raise TvmedgeError(f"cannot export layer '{node.target}' to TFLite: Linear on a rank-"
                                   f"{len(out_shape(src))} input is not supported (flatten first)")
            w = mod.weight.detach().numpy().astype(np.float32)
            b = (mod.bias.detach().numpy() if mod.bias is not None else np.zeros(w.shape[0])).astype(np.float32)
            if src in flat_chw:  # columns in NCHW flatten order -> NHWC flatten order
                c, h, ww = flat_chw[src]
                w = w[:, np.arange(c * h * ww).reshape(c, h, ww).transpose(1, 2, 0).ravel()]
            last, act = fuse_activation(node)
            wi, bi = g.const(f"{node.target}.weight", w), g.const(f"{node.target}.bias", b)
            y = g.tensor(last.name, out_shape(node))
            g.ops.append(_Op("FULLY_CONNECTED", [x, wi, bi], [y], dict(act=act)))
            value[last] = y
        else:
            raise TvmedgeError(f"cannot export {_describe(node, gm)} to TFLite: supported are {SUPPORTED}")
    return g


# ---------------------------------------------------------------- _Graph -> flatbuffer
def _serialize(g: _Graph, description: str) -> bytes:
    import flatbuffers
    import tflite as T

    b = flatbuffers.Builder(1024)

    def offsets(items: list[int]) -> int:
        b.StartVector(4, len(items), 4)
        for off in reversed(items):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    def ints(values: list[int]) -> int:
        return b.CreateNumpyVector(np.asarray(values, dtype=np.int32))

    def data_vector(raw: bytes) -> int:  # TFLite wants 16-byte aligned buffer data
        b.StartVector(1, len(raw), 16)
        b.head = b.head - len(raw)
        b.Bytes[b.head:b.head + len(raw)] = raw
        return b.EndVector()

    # buffers: index 0 is the conventional empty buffer for non-constant tensors
    buffer_of: dict[int, int] = {}
    data_offsets: list[int | None] = [None]
    for i, t in enumerate(g.tensors):
        if t.data is not None:
            buffer_of[i] = len(data_offsets)
            data_offsets.append(data_vector(t.data.tobytes()))
    buffers = []
    for off in data_offsets:
        T.BufferStart(b)
        if off is not None:
            T.BufferAddData(b, off)
        buffers.append(T.BufferEnd(b))

    tensors = []
    for i, t in enumerate(g.tensors):
        name, shape = b.CreateString(t.name), ints(t.shape)
        T.TensorStart(b)
        T.TensorAddShape(b, shape)
        T.TensorAddType(b, T.TensorType.INT32 if t.dtype == "int32" else T.TensorType.FLOAT32)
        T.TensorAddBuffer(b, buffer_of.get(i, 0))
        T.TensorAddName(b, name)
        tensors.append(T.TensorEnd(b))

    codes = list(dict.fromkeys(op.code for op in g.ops))
    acts = {"NONE": T.ActivationFunctionType.NONE, "RELU": T.ActivationFunctionType.RELU,
            "RELU6": T.ActivationFunctionType.RELU6}
    pads = {"SAME": T.Padding.SAME, "VALID": T.Padding.VALID}
    operators = []
    for op in g.ops:
        o = op.options
        if op.code == "CONV_2D":
            T.Conv2DOptionsStart(b)
            T.Conv2DOptionsAddPadding(b, pads[o["padding"]])
            T.Conv2DOptionsAddStrideH(b, o["stride"][0])
            T.Conv2DOptionsAddStrideW(b, o["stride"][1])
            T.Conv2DOptionsAddDilationHFactor(b, o["dilation"][0])
            T.Conv2DOptionsAddDilationWFactor(b, o["dilation"][1])
            T.Conv2DOptionsAddFusedActivationFunction(b, acts[o["act"]])
            opts, opts_type = T.Conv2DOptionsEnd(b), T.BuiltinOptions.Conv2DOptions
        elif op.code == "MAX_POOL_2D":
            T.Pool2DOptionsStart(b)
            T.Pool2DOptionsAddPadding(b, T.Padding.VALID)
            T.Pool2DOptionsAddStrideH(b, o["stride"][0])
            T.Pool2DOptionsAddStrideW(b, o["stride"][1])
            T.Pool2DOptionsAddFilterHeight(b, o["kernel"][0])
            T.Pool2DOptionsAddFilterWidth(b, o["kernel"][1])
            T.Pool2DOptionsAddFusedActivationFunction(b, acts[o["act"]])
            opts, opts_type = T.Pool2DOptionsEnd(b), T.BuiltinOptions.Pool2DOptions
        elif op.code == "FULLY_CONNECTED":
            T.FullyConnectedOptionsStart(b)
            T.FullyConnectedOptionsAddFusedActivationFunction(b, acts[o["act"]])
            opts, opts_type = T.FullyConnectedOptionsEnd(b), T.BuiltinOptions.FullyConnectedOptions
        elif op.code == "RESHAPE":
            new_shape = ints(o["new_shape"])
            T.ReshapeOptionsStart(b)
            T.ReshapeOptionsAddNewShape(b, new_shape)
            opts, opts_type = T.ReshapeOptionsEnd(b), T.BuiltinOptions.ReshapeOptions
        else:  # RELU, RELU6: no options
            opts, opts_type = None, T.BuiltinOptions.NONE
        inputs, outputs = ints(op.inputs), ints(op.outputs)
        T.OperatorStart(b)
        T.OperatorAddOpcodeIndex(b, codes.index(op.code))
        T.OperatorAddInputs(b, inputs)
        T.OperatorAddOutputs(b, outputs)
        T.OperatorAddBuiltinOptionsType(b, opts_type)
        if opts is not None:
            T.OperatorAddBuiltinOptions(b, opts)
        operators.append(T.OperatorEnd(b))

    op_codes = []
    for code in codes:
        value = getattr(T.BuiltinOperator, code)
        T.OperatorCodeStart(b)
        T.OperatorCodeAddDeprecatedBuiltinCode(b, min(value, 127))
        T.OperatorCodeAddBuiltinCode(b, value)
        T.OperatorCodeAddVersion(b, 1)
        op_codes.append(T.OperatorCodeEnd(b))

    tensors_v, ops_v = offsets(tensors), offsets(operators)
    inputs_v, outputs_v = ints(g.inputs), ints(g.outputs)
    sub_name = b.CreateString("main")
    T.SubGraphStart(b)
    T.SubGraphAddTensors(b, tensors_v)
    T.SubGraphAddInputs(b, inputs_v)
    T.SubGraphAddOutputs(b, outputs_v)
    T.SubGraphAddOperators(b, ops_v)
    T.SubGraphAddName(b, sub_name)
    subgraph = T.SubGraphEnd(b)

    codes_v, subgraphs_v, buffers_v = offsets(op_codes), offsets([subgraph]), offsets(buffers)
    desc = b.CreateString(description)
    T.ModelStart(b)
    T.ModelAddVersion(b, 3)
    T.ModelAddOperatorCodes(b, codes_v)
    T.ModelAddSubgraphs(b, subgraphs_v)
    T.ModelAddDescription(b, desc)
    T.ModelAddBuffers(b, buffers_v)
    b.Finish(T.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def export_tflite(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...] = (1, 1, 8, 8),
                  input_name: str = "input", output_name: str = "output") -> Path:
    """Write ``model`` as a float32 TFLite flatbuffer at ``path`` (atomically) and return the path.

    ``input_shape`` is the PyTorch (NCHW) input shape; the TFLite input is its NHWC form.
    """
    path = Path(path)
    data = _serialize(_build_graph(model, tuple(input_shape), input_name, output_name),
                      f"tvmedge export of {type(model).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
