"""Export a small PyTorch CNN to a TensorFlow Lite ``.tflite`` flatbuffer, without TensorFlow.

The zoo's models live in PyTorch, but part of the edge world ships ``.tflite`` files; this
writer lets the TFLite import path be tested (and compared with a real TFLite interpreter)
on a trained model. It traces the model with ``torch.fx`` and writes the flatbuffer with the
builder functions of the ``tflite`` package (schema version 3, identifier ``TFL3``).

Supported, in float32 only: ``Conv2d`` (dense or depthwise; a following ``BatchNorm2d`` is
folded into it, a following ReLU/ReLU6 is fused), ``MaxPool2d``, ReLU, ReLU6, Hardswish,
sigmoid, hardsigmoid (as ``relu6(x + 3) / 6``), tensor ``+`` and ``*`` (broadcasting), global
average pooling (``adaptive_avg_pool2d(x, 1)``: MEAN), bilinear and nearest ``interpolate``,
``cat`` on channels, Dropout (eval: nothing), ``flatten`` of a feature map feeding ``Linear``,
and ``Linear`` (ReLU/ReLU6 fused). That covers every zoo model but the binarized one.
Padding that is neither TFLite's SAME nor VALID (``padding=1`` with stride 2 on an even input,
as in MobileNet and ResNet) is written as an explicit ``PAD`` (``PADV2`` with the lowest float
before a max-pool) followed by a VALID convolution or pool.
The model is exported with eval-mode semantics (BatchNorm uses its running statistics).
TFLite is NHWC: a 1x1x8x8 NCHW PyTorch input becomes a 1x8x8x1 TFLite input, conv weights
are stored [O, KH, KW, I], and the columns of a ``Linear`` after ``flatten`` are permuted to
follow NHWC flattening order. Anything else raises :class:`TvmedgeError`.
"""

from __future__ import annotations

import operator
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

SUPPORTED = ("Conv2d (dense, depthwise; +BatchNorm2d, ReLU/ReLU6), MaxPool2d, ReLU, ReLU6, Hardswish, sigmoid, "
             "hardsigmoid, add, mul, adaptive_avg_pool2d(1), interpolate (bilinear, nearest), cat, Dropout, "
             "flatten -> Linear, Linear")


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


def _padding(kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int], pad: tuple[int, int],
             in_hw: list[int], out_hw: list[int]) -> tuple[str, tuple[int, int] | None]:
    """The TFLite padding that reproduces PyTorch's symmetric ``pad``: ('SAME'|'VALID', None),
    or ('VALID', pad) when neither fits and the pad must be written as an explicit PAD op."""
    modes = []
    for i in range(2):
        k = dilation[i] * (kernel[i] - 1) + 1
        s = stride[i]
        same_out = -(-in_hw[i] // s)
        total = max((same_out - 1) * s + k - in_hw[i], 0)
        if pad[i] == 0 and out_hw[i] == (in_hw[i] - k) // s + 1:
            modes.append("VALID")
        elif 2 * pad[i] == total and out_hw[i] == same_out:
            modes.append("SAME")
        else:
            modes.append(None)
    if modes[0] is not None and modes[0] == modes[1]:
        return modes[0], None
    return "VALID", (int(pad[0]), int(pad[1]))


def _conv_padding(conv: nn.Conv2d, in_hw: list[int], out_hw: list[int]) -> tuple[str, tuple[int, int] | None]:
    if conv.padding == "valid":
        return "VALID", None
    if conv.padding == "same":
        return "SAME", None
    return _padding(_pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation), _pair(conv.padding),
                    in_hw, out_hw)


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

    def pad(x: int, nchw: list[int], pads: tuple[int, int], fill: float | None = None) -> int:
        """``x`` (NHWC) padded by ``pads`` (H, W) on both sides: PAD (zeros) or PADV2 (``fill``)."""
        ph, pw = pads
        pi = g.const(f"{g.tensors[x].name}.pads", np.array([[0, 0], [ph, ph], [pw, pw], [0, 0]], dtype=np.int32))
        y = g.tensor(f"{g.tensors[x].name}.padded", [nchw[0], nchw[2] + 2 * ph, nchw[3] + 2 * pw, nchw[1]])
        if fill is None:
            g.ops.append(_Op("PAD", [x, pi], [y]))
        else:
            fi = g.const(f"{g.tensors[x].name}.pad_value", np.array([fill], dtype=np.float32))
            g.ops.append(_Op("PADV2", [x, pi, fi], [y]))
        return y

    def shape_of(n: Any) -> list[int]:
        return _nhwc(out_shape(n))

    for node in gm.graph.nodes:
        if node in absorbed:
            continue
        if node.op == "call_function" and node.target in (getattr, operator.getitem) and \
                not hasattr(node.meta.get("tensor_meta"), "dtype"):
            continue  # shape arithmetic (x.shape[-2:]): interpolate reads its result's shape instead
        if node.op == "call_function" and node.target is torch.cat:
            parts = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            o_s = out_shape(node)
            if len(o_s) != 4 or dim not in (1, -3) or not all(isinstance(t, torch.fx.Node) and t in value for t in parts):
                raise TvmedgeError(f"cannot export {_describe(node, gm)} to TFLite: only cat of feature maps "
                                   "on the channel axis is supported")
            y = g.tensor(node.name, _nhwc(o_s))
            g.ops.append(_Op("CONCATENATION", [value[t] for t in parts], [y], dict(axis=3, act="NONE")))
            value[node] = y
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
            depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            if mod.groups != 1 and not depthwise:
                raise TvmedgeError(f"cannot export layer '{node.target}' to TFLite: grouped Conv2d "
                                   f"(groups={mod.groups}, not depthwise) is not supported")
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
            padding, explicit = _conv_padding(mod, in_s[2:], o_s[2:])
            if explicit:
                x = pad(x, in_s, explicit)
            # TFLite weights: conv [O, KH, KW, I]; depthwise [1, KH, KW, C] (depth multiplier 1)
            wt = w.transpose(1, 2, 3, 0) if depthwise else w.transpose(0, 2, 3, 1)
            wi = g.const(f"{node.target}.weight", wt.astype(np.float32))
            bi = g.const(f"{node.target}.bias", b.astype(np.float32))
            y = g.tensor(last.name, _nhwc(o_s))
            g.ops.append(_Op("DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", [x, wi, bi], [y], dict(
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
            p = _pair(p)
            valid = [(in_s[2 + i] + 2 * p[i] - k[i]) // s[i] + 1 for i in range(2)]
            if _pair(d) != (1, 1) or valid != o_s[2:]:
                raise TvmedgeError(f"cannot export {_describe(node, gm)} to TFLite: only max-pooling "
                                   f"without dilation or ceil_mode is supported")
            if p != (0, 0):  # padded with the lowest float: the max never picks it
                x = pad(x, in_s, p, fill=float(np.finfo(np.float32).min))
            last, act = fuse_activation(node)
            y = g.tensor(last.name, _nhwc(o_s))
            g.ops.append(_Op("MAX_POOL_2D", [x], [y], dict(kernel=k, stride=s, act=act)))
            value[last] = y
        elif type(mod) in (nn.Dropout, nn.Identity):  # eval mode: passes its input through
            value[node] = x
        elif (node.op == "call_function" and node.target in (operator.add, torch.add, operator.mul, torch.mul)) \
                or (node.op == "call_method" and node.target in ("add", "mul")):
            other = node.args[1] if len(node.args) > 1 else None
            if not isinstance(other, torch.fx.Node) or other not in value or node.kwargs:
                raise TvmedgeError(f"cannot export {_describe(node, gm)} to TFLite: only adding or multiplying "
                                   "two tensors is supported")
            code = "ADD" if node.target in (operator.add, torch.add, "add") else "MUL"
            last, act = fuse_activation(node)
            y = g.tensor(last.name, shape_of(node))
            g.ops.append(_Op(code, [x, value[other]], [y], dict(act=act)))
            value[last] = y
        elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
            if _pair(node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")) != (1, 1):
                raise TvmedgeError(f"cannot export {_describe(node, gm)} to TFLite: only global average "
                                   "pooling (output size 1) is supported")
            ai = g.const(f"{node.name}.axes", np.array([1, 2], dtype=np.int32))
            y = g.tensor(node.name, shape_of(node))
            g.ops.append(_Op("MEAN", [x, ai], [y], dict(keep_dims=True)))
            value[node] = y
        elif type(mod) is nn.Hardswish or (node.op == "call_function" and node.target is F.hardswish):
            y = g.tensor(node.name, shape_of(node))
            g.ops.append(_Op("HARD_SWISH", [x], [y]))
            value[node] = y
        elif type(mod) is nn.Sigmoid or (node.op == "call_function" and node.target in (torch.sigmoid, F.sigmoid)):
            y = g.tensor(node.name, shape_of(node))
            g.ops.append(_Op("LOGISTIC", [x], [y]))
            value[node] = y
        elif type(mod) is nn.Hardsigmoid or (node.op == "call_function" and node.target is F.hardsigmoid):
            # no TFLite op: relu6(x + 3) / 6, exactly PyTorch's definition
            three = g.const(f"{node.name}.three", np.array([3.0], dtype=np.float32))
            sixth = g.const(f"{node.name}.sixth", np.array([1.0 / 6.0], dtype=np.float32))
            t = g.tensor(f"{node.name}.relu6", shape_of(node))
            g.ops.append(_Op("ADD", [x, three], [t], dict(act="RELU6")))
            y = g.tensor(node.name, shape_of(node))
            g.ops.append(_Op("MUL", [t, sixth], [y], dict(act="NONE")))
            value[node] = y
        elif node.op == "call_function" and node.target is F.interpolate:
            mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
            corners = bool(node.kwargs.get("align_corners") or False)
            o_s = out_shape(node)
            if mode not in ("bilinear", "nearest") or len(o_s) != 4 or (mode == "nearest" and corners):
                raise TvmedgeError(f"cannot export {_describe(node, gm)} to TFLite: only bilinear and nearest "
                                   "resizing of feature maps is supported")
            si = g.const(f"{node.name}.size", np.array(o_s[2:], dtype=np.int32))
            y = g.tensor(node.name, _nhwc(o_s))
            code = "RESIZE_BILINEAR" if mode == "bilinear" else "RESIZE_NEAREST_NEIGHBOR"
            g.ops.append(_Op(code, [x, si], [y], dict(align_corners=corners,
                                                      half_pixel=mode == "bilinear" and not corners)))
            value[node] = y
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
        if op.code == "DEPTHWISE_CONV_2D":
            T.DepthwiseConv2DOptionsStart(b)
            T.DepthwiseConv2DOptionsAddPadding(b, pads[o["padding"]])
            T.DepthwiseConv2DOptionsAddStrideH(b, o["stride"][0])
            T.DepthwiseConv2DOptionsAddStrideW(b, o["stride"][1])
            T.DepthwiseConv2DOptionsAddDepthMultiplier(b, 1)
            T.DepthwiseConv2DOptionsAddDilationHFactor(b, o["dilation"][0])
            T.DepthwiseConv2DOptionsAddDilationWFactor(b, o["dilation"][1])
            T.DepthwiseConv2DOptionsAddFusedActivationFunction(b, acts[o["act"]])
            opts, opts_type = T.DepthwiseConv2DOptionsEnd(b), T.BuiltinOptions.DepthwiseConv2DOptions
        elif op.code == "ADD":
            T.AddOptionsStart(b)
            T.AddOptionsAddFusedActivationFunction(b, acts[o["act"]])
            opts, opts_type = T.AddOptionsEnd(b), T.BuiltinOptions.AddOptions
        elif op.code == "MUL":
            T.MulOptionsStart(b)
            T.MulOptionsAddFusedActivationFunction(b, acts[o["act"]])
            opts, opts_type = T.MulOptionsEnd(b), T.BuiltinOptions.MulOptions
        elif op.code == "MEAN":
            T.ReducerOptionsStart(b)
            T.ReducerOptionsAddKeepDims(b, o["keep_dims"])
            opts, opts_type = T.ReducerOptionsEnd(b), T.BuiltinOptions.ReducerOptions
        elif op.code == "CONCATENATION":
            T.ConcatenationOptionsStart(b)
            T.ConcatenationOptionsAddAxis(b, o["axis"])
            T.ConcatenationOptionsAddFusedActivationFunction(b, acts[o["act"]])
            opts, opts_type = T.ConcatenationOptionsEnd(b), T.BuiltinOptions.ConcatenationOptions
        elif op.code == "RESIZE_BILINEAR":
            T.ResizeBilinearOptionsStart(b)
            T.ResizeBilinearOptionsAddAlignCorners(b, o["align_corners"])
            T.ResizeBilinearOptionsAddHalfPixelCenters(b, o["half_pixel"])
            opts, opts_type = T.ResizeBilinearOptionsEnd(b), T.BuiltinOptions.ResizeBilinearOptions
        elif op.code == "RESIZE_NEAREST_NEIGHBOR":
            T.ResizeNearestNeighborOptionsStart(b)
            T.ResizeNearestNeighborOptionsAddAlignCorners(b, o["align_corners"])
            T.ResizeNearestNeighborOptionsAddHalfPixelCenters(b, o["half_pixel"])
            opts, opts_type = T.ResizeNearestNeighborOptionsEnd(b), T.BuiltinOptions.ResizeNearestNeighborOptions
        elif op.code == "PAD":
            T.PadOptionsStart(b)
            opts, opts_type = T.PadOptionsEnd(b), T.BuiltinOptions.PadOptions
        elif op.code == "PADV2":
            T.PadV2OptionsStart(b)
            opts, opts_type = T.PadV2OptionsEnd(b), T.BuiltinOptions.PadV2Options
        elif op.code == "CONV_2D":
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
        else:  # RELU, RELU6, HARD_SWISH, LOGISTIC: no options
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
