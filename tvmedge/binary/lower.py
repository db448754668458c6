"""Lower a PyTorch binary network into a Relax module whose binary layers run on packed bits.

The network is read module by module (an ``nn.Sequential`` of the layers below), and a Relax
``main`` is built with :class:`tvm.relax.BlockBuilder`:

* float layers (``Conv2d``, ``BatchNorm1d/2d``, ``MaxPool2d``, ``Flatten``, ``Linear``,
  ``ReLU``, ``Hardtanh``, ``Identity``/``Dropout``) become ordinary Relax operators, so TVM
  legalizes, fuses and compiles them as usual;
* each fully binary :class:`~tvmedge.binary.layers.BinaryConv2d` / ``BinaryDense`` becomes two
  hand-scheduled TIR functions called with ``call_tir``:

  1. **pack**: the signs of the float input (bit 1 = ``x >= 0``, as in
     :mod:`tvmedge.kernels.pack`) packed along the channel axis into uint64 words, with the
     spatial padding already applied as 1-bits: conv ``[N, H+2p, W+2p, ceil(C/64)]``, dense
     ``[N, ceil(K/64)]``;
  2. **xnor-popcount**: ``P = sum popcount(a XOR w)`` over (KH, KW, channel words) against the
     weights packed once at lowering time (uint64 constants, ``[KH, KW, CW, O]``), then the
     float epilogue ``(K - 2 P - corr) * scale + shift`` written NCHW. ``scale`` is XNOR-Net's
     alpha (times a following BatchNorm's factor, which is folded in), ``shift`` the bias and
     BatchNorm offset. Channel-padding bits are 0 in both operands, so they never count.

  Padded taps are packed as +1; for ``pad_value`` 0 (PyTorch's zero padding) or -1 the exact
  integer correction ``corr[o, y, x] = (1 - pad_value) * sum of sign(W) over the taps of
  (y, x) that fall into the padding`` is a precomputed int32 constant.

The TIR functions carry ``op_pattern`` opaque so that Relax's operator fusion leaves their
schedules alone. The result is an :class:`~tvmedge.frontend.ImportedModel`, so
:func:`tvmedge.build.compile_model` builds it for any CPU target (host, ``pi4``, ...) and the
artifact runs on the plain TVM runtime; :func:`export_relax` writes it as a ``.relax`` file that
``tvmedge compile`` accepts.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import TvmedgeError
from ..core.model import ImportedModel, TensorSpec, save_relax
from ..core.graph import finish_kernel, first_divisor
from ..kernels.pack import WORD_BITS, conv_out_hw, n_words, pack_bits
from .layers import BinaryConv2d, BinaryDense, is_fully_binary


PACK_FUNC = "bnn_pack"
CONV_FUNC = "bnn_xnor_conv2d"
DENSE_FUNC = "bnn_xnor_dense"


# ----------------------------------------------------------------------------- TIR kernels
def pack_conv_func(n: int, c: int, h: int, w: int, pad: int):
    """PrimFunc: float NCHW -> uint64 [N, H+2p, W+2p, ceil(C/64)], padding packed as 1-bits."""
    import tvm.s_tir as s_tir
    from tvm import te, tirx

    cw = n_words(c)
    x = te.placeholder((n, c, h, w), "float32", name="x")
    b = te.reduce_axis((0, WORD_BITS), name="b")
    one = tirx.const(1, "uint64")
    zero = tirx.const(0, "uint64")

    def word(ni, y, wi, xx):
        ch = wi * WORD_BITS + b
        sign = x[ni, tirx.min(ch, c - 1), y, xx] >= 0.0
        bit = tirx.all(ch < c, sign) if c % WORD_BITS else sign
        return te.sum(tirx.if_then_else(bit, one << b.astype("uint64"), zero), axis=b)

    # [N, H, CW, W]: a row of words is contiguous, so the row loop below vectorizes
    inner = te.compute((n, h, cw, w), word, name="inner")
    # A padded tap is +1 in every real channel, 0 in the channel padding of the last word.
    last = (1 << (c % WORD_BITS)) - 1 if c % WORD_BITS else (1 << WORD_BITS) - 1
    full = tirx.const((1 << WORD_BITS) - 1, "uint64")
    out = te.compute((n, h + 2 * pad, w + 2 * pad, cw), lambda ni, yy, xx, wi: tirx.if_then_else(
        tirx.all(yy >= pad, yy < h + pad, xx >= pad, xx < w + pad),
        inner[ni, yy - pad, wi, xx - pad],
        tirx.if_then_else(wi == cw - 1, tirx.const(last, "uint64"), full)), name="packed")
    sch = s_tir.Schedule(te.create_prim_func([x, out]))
    blk = sch.get_sblock("inner")
    ni, y, wi, xx, bb = sch.get_loops(blk)
    # Bits of one word come from 64 channel planes: walk each plane along a row so that the
    # loads are contiguous and the row loop vectorizes.
    sch.reorder(ni, y, wi, bb, xx)
    outer = sch.fuse(ni, y)
    sch.parallel(outer)
    sch.vectorize(xx)
    sch.decompose_reduction(blk, bb)
    return finish_kernel(sch)


def pack_dense_func(n: int, k: int):
    """PrimFunc: float [N, K] -> uint64 [N, ceil(K/64)]."""
    import tvm.s_tir as s_tir
    from tvm import te, tirx

    x = te.placeholder((n, k), "float32", name="x")
    b = te.reduce_axis((0, WORD_BITS), name="b")
    one, zero = tirx.const(1, "uint64"), tirx.const(0, "uint64")

    def word(ni, wi):
        idx = wi * WORD_BITS + b
        sign = x[ni, tirx.min(idx, k - 1)] >= 0.0
        bit = tirx.all(idx < k, sign) if k % WORD_BITS else sign
        return te.sum(tirx.if_then_else(bit, one << b.astype("uint64"), zero), axis=b)

    out = te.compute((n, n_words(k)), word, name="packed")
    sch = s_tir.Schedule(te.create_prim_func([x, out]))
    sch.unroll(sch.get_loops(sch.get_sblock("packed"))[-1])
    return finish_kernel(sch)


def xnor_conv_func(n: int, hp: int, wp: int, cw: int, kh: int, kw: int, o: int, stride: int,
                   oh: int, ow: int, k_bits: int, x_tile: int | None = None, o_tile: int | None = None,
                   acc: str = "int32"):
    """PrimFunc: packed [N,HP,WP,CW] x weights [KH,KW,CW,O] (+ corr [O,OH,OW], scale [O],
    shift [O]) -> float32 NCHW ``(K - 2 popcount(a^w) - corr) * scale + shift``.

    Output tile: ``x_tile`` columns (unrolled) x ``o_tile`` channels (vectorized)."""
    import tvm.s_tir as s_tir
    from tvm import te, tirx

    a = te.placeholder((n, hp, wp, cw), "uint64", name="a")
    wt = te.placeholder((kh, kw, cw, o), "uint64", name="w")
    corr = te.placeholder((o, oh, ow), "int32", name="corr")
    scale = te.placeholder((o,), "float32", name="scale")
    shift = te.placeholder((o,), "float32", name="shift")
    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")
    rc = te.reduce_axis((0, cw), name="rc")
    pop = te.compute((n, oh, ow, o), lambda ni, y, xx, oc: te.sum(
        tirx.popcount(a[ni, y * stride + ri, xx * stride + rj, rc] ^ wt[ri, rj, rc, oc]).astype(acc),
        axis=[ri, rj, rc]), name="pop")
    out = te.compute((n, o, oh, ow), lambda ni, oc, y, xx: (
        (k_bits - 2 * pop[ni, y, xx, oc].astype("int32") - corr[oc, y, xx]).astype("float32") * scale[oc] + shift[oc]),
        name="out")
    sch = s_tir.Schedule(te.create_prim_func([a, wt, corr, scale, shift, out]))
    blk = sch.get_sblock("pop")
    ni, y, xx, oc, i, j, c = sch.get_loops(blk)
    xt = x_tile or first_divisor(ow, (4, 2))
    ot = o_tile or first_divisor(o, (32, 16, 8))
    xo, xi = sch.split(xx, [None, xt])
    oo, oi = sch.split(oc, [None, ot])
    sch.reorder(ni, y, xo, oo, i, j, c, xi, oi)
    outer = sch.fuse(ni, y)
    sch.parallel(outer)
    # The xt x ot accumulator tile lives in registers across the whole reduction.
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, oo)
    epi = sch.get_sblock("out")
    sch.reverse_compute_at(epi, outer)
    sch.unroll(xi)
    sch.vectorize(oi)
    sch.decompose_reduction(blk, i)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.vectorize(sch.get_loops(epi)[-1])
    return finish_kernel(sch)


def xnor_dense_func(n: int, kw: int, o: int, k_bits: int):
    """PrimFunc: packed [N,KW] x weights [KW,O] (+ scale, shift [O]) -> float32 [N, O]."""
    import tvm.s_tir as s_tir
    from tvm import te, tirx

    a = te.placeholder((n, kw), "uint64", name="a")
    wt = te.placeholder((kw, o), "uint64", name="w")
    scale = te.placeholder((o,), "float32", name="scale")
    shift = te.placeholder((o,), "float32", name="shift")
    r = te.reduce_axis((0, kw), name="r")
    pop = te.compute((n, o), lambda ni, oc: te.sum(
        tirx.popcount(a[ni, r] ^ wt[r, oc]).astype("int32"), axis=r), name="pop")
    out = te.compute((n, o), lambda ni, oc: (k_bits - 2 * pop[ni, oc]).astype("float32") * scale[oc]
                     + shift[oc], name="out")
    sch = s_tir.Schedule(te.create_prim_func([a, wt, scale, shift, out]))
    blk = sch.get_sblock("pop")
    ni, oc, rr = sch.get_loops(blk)
    ot = first_divisor(o, (32, 16, 8))
    oo, oi = sch.split(oc, [None, ot])
    sch.reorder(ni, oo, rr, oi)
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, oo)
    sch.vectorize(oi)
    sch.decompose_reduction(blk, rr)
    return finish_kernel(sch)


# ----------------------------------------------------------------------------- weight prep
def pack_conv_weight_words(w: np.ndarray) -> np.ndarray:
    """OIHW float weights -> their sign bits, uint64 [KH, KW, ceil(C/64), O] (packed along C)."""
    packed = pack_bits(np.transpose(w, (2, 3, 0, 1)), axis=-1)  # [KH, KW, O, CW]
    return np.ascontiguousarray(np.transpose(packed, (0, 1, 3, 2)))


def padding_correction(w: np.ndarray, h: int, wd: int, stride: int, pad: int,
                       pad_value: float) -> np.ndarray:
    """int32 [O, OH, OW]: what packing padded taps as +1 adds over padding with ``pad_value``."""
    o, _, kh, kw = w.shape
    oh, ow = conv_out_hw(h, wd, kh, kw, stride, pad)
    if pad == 0 or pad_value == 1.0:
        return np.zeros((o, oh, ow), np.int32)
    tap_sums = np.where(w >= 0, 1, -1).astype(np.int64).sum(axis=1)  # [O, KH, KW]
    rows = np.arange(oh)[:, None] * stride - pad + np.arange(kh)[None, :]  # [OH, KH]
    cols = np.arange(ow)[:, None] * stride - pad + np.arange(kw)[None, :]  # [OW, KW]
    out_r = (rows < 0) | (rows >= h)
    out_c = (cols < 0) | (cols >= wd)
    padded = out_r[:, None, :, None] | out_c[None, :, None, :]  # [OH, OW, KH, KW]
    corr = np.einsum("oij,yxij->oyx", tap_sums, padded.astype(np.int64))
    return (corr * int(1 - pad_value)).astype(np.int32)


def _bn_affine(bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    t = bn.bias.detach().double() - bn.running_mean.double() * s
    return s.numpy(), t.numpy()


# ----------------------------------------------------------------------------- graph builder
class _Lowerer:
    def __init__(self) -> None:
        from tvm import relax

        self.relax = relax
        self.bb = relax.BlockBuilder()
        self.binary_layers: list[dict[str, Any]] = []
        self.funcs: dict[tuple, Any] = {}

    def const(self, arr: np.ndarray):
        return self.relax.const(np.ascontiguousarray(arr))

    def shape(self, v) -> list[int]:
        return [int(d) for d in v.ty.shape.values]

    def call(self, key: tuple, make, args: list, out_shape: list[int], dtype: str):
        if key not in self.funcs:  # one PrimFunc per distinct shape
            name = f"{key[0]}_{len(self.funcs)}"
            self.funcs[key] = self.bb.add_func(make().without_attr("global_symbol"), name)
        sinfo = self.relax.TensorType(out_shape, dtype)
        return self.bb.emit(self.relax.call_tir(self.funcs[key], args, out_ty=sinfo))

    # -- binary layers ------------------------------------------------------------------
    def binary_conv(self, x, layer: BinaryConv2d, bn: nn.Module | None):
        n, c, h, w = self.shape(x)
        wt = layer.weight.detach().numpy()
        o, _, kh, kw = wt.shape
        stride, pad = layer.stride[0], layer.pad
        if layer.stride[0] != layer.stride[1] or layer.dilation != (1, 1) or layer.groups != 1:
            raise TvmedgeError("binary conv lowering supports square stride, no dilation, groups=1")
        oh, ow = conv_out_hw(h, w, kh, kw, stride, pad)
        cw = n_words(c)
        scale, shift = self._epilogue(layer, bn, o)
        packed = self.call((PACK_FUNC, n, c, h, w, pad), lambda: pack_conv_func(n, c, h, w, pad),
                           [x], [n, h + 2 * pad, w + 2 * pad, cw], "uint64")
        corr = padding_correction(wt, h, w, stride, pad, layer.pad_value)
        args = [packed, self.const(pack_conv_weight_words(wt)), self.const(corr),
                self.const(scale), self.const(shift)]
        key = (CONV_FUNC, n, h + 2 * pad, w + 2 * pad, cw, kh, kw, o, stride)
        y = self.call(key, lambda: xnor_conv_func(n, h + 2 * pad, w + 2 * pad, cw, kh, kw, o, stride,
                                                  oh, ow, c * kh * kw), args, [n, o, oh, ow], "float32")
        self.binary_layers.append({"layer": "BinaryConv2d", "in": [n, c, h, w], "out": [n, o, oh, ow],
                                   "k_bits": c * kh * kw, "words": kh * kw * cw,
                                   "bn_folded": bn is not None})
        return y

    def binary_dense(self, x, layer: BinaryDense, bn: nn.Module | None):
        n, k = self.shape(x)
        wt = layer.weight.detach().numpy()
        o = wt.shape[0]
        scale, shift = self._epilogue(layer, bn, o)
        packed = self.call((PACK_FUNC + "_dense", n, k), lambda: pack_dense_func(n, k), [x],
                           [n, n_words(k)], "uint64")
        wp = np.ascontiguousarray(pack_bits(wt, axis=-1).T)  # [KW, O]
        y = self.call((DENSE_FUNC, n, k, o), lambda: xnor_dense_func(n, n_words(k), o, k),
                      [packed, self.const(wp), self.const(scale), self.const(shift)], [n, o], "float32")
        self.binary_layers.append({"layer": "BinaryDense", "in": [n, k], "out": [n, o], "k_bits": k,
                                   "words": n_words(k), "bn_folded": bn is not None})
        return y

    @staticmethod
    def _epilogue(layer, bn, o: int) -> tuple[np.ndarray, np.ndarray]:
        scale = (layer.alpha().detach().double().numpy() if layer.scale == "channel" else np.ones(o))
        shift = (layer.bias.detach().double().numpy() if layer.bias is not None else np.zeros(o))
        if bn is not None:
            s, t = _bn_affine(bn)
            scale, shift = scale * s, shift * s + t
        return scale.astype(np.float32), shift.astype(np.float32)

    # -- float layers -------------------------------------------------------------------
    def float_layer(self, x, m: nn.Module):
        R = self.relax.op
        emit = self.bb.emit
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return x
        if isinstance(m, nn.Conv2d):  # BinaryConv2d with a float input lands here too
            if isinstance(m, BinaryConv2d) and m.pad and m.pad_value != 0.0:
                raise TvmedgeError("a binary conv with a float input needs pad_value 0 to be lowered")
            if isinstance(m, BinaryConv2d) and m.input_quantizer is not None:
                raise TvmedgeError("a binary conv with only a binary input is not supported")
            w = m.effective_weight() if isinstance(m, BinaryConv2d) else m.weight
            pad = m.pad if isinstance(m, BinaryConv2d) else m.padding
            if isinstance(pad, str):
                raise TvmedgeError(f"conv padding '{pad}' is not supported; give integers")
            pad = (pad, pad) if isinstance(pad, int) else tuple(pad)
            y = emit(R.nn.conv2d(x, self.const(w.detach().numpy()), strides=m.stride, padding=pad,
                                 dilation=m.dilation, groups=m.groups))
            if m.bias is not None:
                y = emit(R.add(y, self.const(m.bias.detach().numpy().reshape(1, -1, 1, 1))))
            return y
        if isinstance(m, nn.Linear):
            if isinstance(m, BinaryDense) and m.input_quantizer is not None:
                raise TvmedgeError("a binary dense layer with only a binary input is not supported")
            w = m.effective_weight() if isinstance(m, BinaryDense) else m.weight
            y = emit(R.matmul(x, self.const(np.ascontiguousarray(w.detach().numpy().T))))
            if m.bias is not None:
                y = emit(R.add(y, self.const(m.bias.detach().numpy())))
            return y
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            s, t = _bn_affine(m)
            shape = (1, -1, 1, 1) if isinstance(m, nn.BatchNorm2d) else (1, -1)
            y = emit(R.multiply(x, self.const(s.astype(np.float32).reshape(shape))))
            return emit(R.add(y, self.const(t.astype(np.float32).reshape(shape))))
        if isinstance(m, nn.MaxPool2d):
            pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
            if m.dilation not in (1, (1, 1)) or m.return_indices:
                raise TvmedgeError("MaxPool2d with dilation or indices is not supported")
            return emit(R.nn.max_pool2d(x, pair(m.kernel_size), pair(m.stride or m.kernel_size),
                                        pair(m.padding), ceil_mode=m.ceil_mode))
        if isinstance(m, nn.Flatten):
            shape = self.shape(x)
            if m.start_dim != 1 or m.end_dim != -1:
                raise TvmedgeError("only Flatten(1, -1) is supported")
            return emit(R.reshape(x, [shape[0], int(np.prod(shape[1:]))]))
        if isinstance(m, nn.ReLU):
            return emit(R.nn.relu(x))
        if isinstance(m, nn.Hardtanh):
            return emit(R.clip(x, m.min_val, m.max_val))
        raise TvmedgeError(f"cannot lower layer {type(m).__name__} of a binary network "
                           "(supported: Sequential of Conv2d, Linear, BatchNorm, MaxPool2d, Flatten, "
                           "ReLU, Hardtanh and the binary layers)")

    def run(self, model: nn.Module, input_shape: tuple[int, ...]):
        relax = self.relax
        layers = list(model.children()) if isinstance(model, nn.Sequential) else None
        if layers is None:
            raise TvmedgeError(f"binary lowering reads an nn.Sequential, got {type(model).__name__}")
        x_in = relax.Var("input", relax.TensorType(list(input_shape), "float32"))
        with self.bb.function("main", [x_in]):
            with self.bb.dataflow():
                x = x_in
                i = 0
                while i < len(layers):
                    m = layers[i]
                    nxt = layers[i + 1] if i + 1 < len(layers) else None
                    if is_fully_binary(m):
                        want = nn.BatchNorm2d if isinstance(m, BinaryConv2d) else nn.BatchNorm1d
                        bn = nxt if isinstance(nxt, want) else None
                        x = (self.binary_conv if isinstance(m, BinaryConv2d) else self.binary_dense)(x, m, bn)
                        i += 2 if bn is not None else 1
                        continue
                    x = self.float_layer(x, m)
                    i += 1
                out = self.bb.emit_output(x)
            self.bb.emit_func_output(out)
        return self.bb.get()


def lower_module(model: nn.Module, input_shape: tuple[int, ...]):
    """Relax IRModule (``main(input)``) for a binary ``nn.Sequential`` in eval mode, plus
    the list of binary layers that run on bits."""
    model = model.eval()
    low = _Lowerer()
    with torch.no_grad():
        mod = low.run(model, tuple(input_shape))
    return mod, low.binary_layers


def _state_hash(model: nn.Module) -> str:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def to_imported_model(model: nn.Module, input_shape: tuple[int, ...], input_name: str = "input",
                      output_name: str = "logits", source: str = "pytorch") -> ImportedModel:
    """The binary network as an :class:`ImportedModel` ready for :func:`tvmedge.build.compile_model`."""
    mod, layers = lower_module(model, input_shape)
    if input_name != "input":
        raise TvmedgeError("the lowered module's input is always named 'input'")
    ret = mod["main"].ret_ty
    outputs = [TensorSpec(output_name, [int(d) for d in ret.shape.values], str(ret.dtype))]
    return ImportedModel(mod=mod, inputs=[TensorSpec(input_name, list(input_shape), "float32")],
                         outputs=outputs, format="pytorch-bnn", source=source, sha256=_state_hash(model),
                         rewrites=[{"rewrite": "binarize", "layers": layers}])


def contains_binary_layers(model: nn.Module) -> bool:
    return any(is_fully_binary(m) for m in model.modules())


def export_relax(model: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike,
                 input_name: str = "input", output_name: str = "logits", source: str = "pytorch") -> Path:
    """Lower ``model`` and write it as a ``.relax`` file (``tvmedge compile`` reads it)."""
    imported = to_imported_model(model, input_shape, input_name, output_name, source)
    return save_relax(imported, path)
