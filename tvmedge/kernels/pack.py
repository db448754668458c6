"""Bit-packing of ±1 tensors and the numpy reference for the binarized (XNOR/popcount) kernels.

Encoding, shared by every backend:

* A value ``v`` becomes bit 1 (= +1) when ``v >= 0`` and bit 0 (= -1) otherwise, so a float
  tensor is binarized by its sign with ``sign(0) = +1``.
* Bits are packed along the reduction axis into **uint64** words, little-endian inside a word:
  element ``k`` lands in word ``k // 64`` at bit ``k % 64``. Every backend (numba, OpenCL
  ``ulong``, CUDA ``unsigned long long``) uses the same uint64 layout.
* When K is not a multiple of 64 the last word is padded with 0 bits in *both* operands, so a
  padded position XORs to 0 and never reaches the popcount: no correction is needed and
  ``sum_k a_k * b_k = K - 2 * popcount(a XOR b)`` holds with the true K.

Binary conv2d (``bconv2d``) is im2col over the bits followed by the packed XNOR GEMM. The
reduction axis is (C, KH, KW) in that order (the order of ``w.reshape(O, -1)``). Spatial padding
follows PyTorch: a binarized input padded with zeros, i.e. padded taps contribute **0**
(``pad_value=0``, the default; what ``F.conv2d(sign(x), sign(w), padding=p)`` computes). One bit
cannot hold 0, so output positions touching the border are computed twice, once with the padded
taps as -1 and once as +1; the true value is the mean of the two (their difference is
``2 * sum(w over padded taps)``, so the mean is an exact integer). Only border rows pay for the
second pass. ``pad_value=-1`` or ``+1`` pads with that value directly (Larq-style), one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

WORD_BITS = 64

GemmFn = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def n_words(k_bits: int) -> int:
    """Number of uint64 words holding ``k_bits`` bits."""
    return -(-int(k_bits) // WORD_BITS)


def pack_bits(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pack the signs of ``x`` along ``axis`` into uint64 words (that axis moves last).

    A bool array is taken as the bits themselves (True = +1).
    """
    x = np.asarray(x)
    bits = np.moveaxis(x if x.dtype == np.bool_ else x >= 0, axis, -1)
    k = bits.shape[-1]
    pad = n_words(k) * WORD_BITS - k
    if pad:
        bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (pad,), bool)], axis=-1)
    packed = np.packbits(bits, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)


def unpack_bits(packed: np.ndarray, k_bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: int8 ±1 array with the packed axis last, length ``k_bits``."""
    u8 = np.ascontiguousarray(packed, dtype="<u8").view(np.uint8)
    bits = np.unpackbits(u8, axis=-1, bitorder="little")[..., :k_bits]
    return (bits.astype(np.int8) * 2 - 1).astype(np.int8)


def to_pm1(x: np.ndarray) -> np.ndarray:
    """The ±1 values the kernels see for ``x`` (int32), same sign rule as :func:`pack_bits`."""
    return np.where(np.asarray(x) >= 0, 1, -1).astype(np.int32)


# ----------------------------------------------------------------------------- references
def xnor_gemm_ref(a_packed: np.ndarray, b_packed: np.ndarray, k_bits: int) -> np.ndarray:
    """C[m, n] = K - 2 * popcount(a[m] XOR b[n]) with numpy (chunked over M), int32 [M, N]."""
    a = np.asarray(a_packed, np.uint64)
    b = np.asarray(b_packed, np.uint64)
    check_gemm_operands(a, b, k_bits)
    out = np.empty((a.shape[0], b.shape[0]), np.int32)
    step = max(1, (1 << 22) // max(1, b.shape[0] * b.shape[1]))
    for i in range(0, a.shape[0], step):
        pop = np.bitwise_count(a[i:i + step, None, :] ^ b[None, :, :]).sum(-1, dtype=np.int64)
        out[i:i + step] = k_bits - 2 * pop
    return out


def gemm_pm1_ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer reference without any packing: sign(a) [M,K] @ sign(b) [N,K]^T as int32."""
    return (to_pm1(a).astype(np.int64) @ to_pm1(b).astype(np.int64).T).astype(np.int32)


def bconv2d_ref(x: np.ndarray, w: np.ndarray, stride: int = 1, padding: int = 0,
                pad_value: int = 0) -> np.ndarray:
    """Direct binary conv2d in integers (no packing, no im2col), NCHW int32."""
    xs, ws = to_pm1(x).astype(np.int64), to_pm1(w).astype(np.int64)
    n, c, h, wd = xs.shape
    o, _, kh, kw = ws.shape
    oh, ow = conv_out_hw(h, wd, kh, kw, stride, padding)
    xp = np.pad(xs, ((0, 0), (0, 0), (padding, padding), (padding, padding)),
                constant_values=pad_value)
    out = np.zeros((n, o, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            out += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    return out.astype(np.int32)


# ----------------------------------------------------------------------------- checks
def check_gemm_operands(a: np.ndarray, b: np.ndarray, k_bits: int) -> None:
    """Raise ValueError unless a [M, W] and b [N, W] are uint64 with W == ceil(k_bits / 64)."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"packed operands must be 2-D, got {a.shape} and {b.shape}")
    if a.dtype != np.uint64 or b.dtype != np.uint64:
        raise ValueError(f"packed operands must be uint64, got {a.dtype} and {b.dtype}")
    if k_bits < 1 or a.shape[1] != n_words(k_bits) or b.shape[1] != n_words(k_bits):
        raise ValueError(f"k_bits={k_bits} needs {n_words(k_bits)} words per row, "
                         f"got {a.shape[1]} and {b.shape[1]}")


def conv_out_hw(h: int, w: int, kh: int, kw: int, stride: int, padding: int) -> tuple[int, int]:
    """Output spatial size of a conv; ValueError when the window does not fit."""
    if stride < 1 or padding < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got {stride}, {padding}")
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (w + 2 * padding - kw) // stride + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"kernel {kh}x{kw} does not fit input {h}x{w} with padding {padding}")
    return oh, ow


# ----------------------------------------------------------------------------- conv via GEMM
@dataclass(frozen=True)
class PackedConvWeight:
    """OIHW ±1 weights packed along (C, KH, KW): ``bits`` is uint64 [O, ceil(C*KH*KW/64)]."""

    bits: np.ndarray
    shape: tuple[int, int, int, int]


def pack_conv_weight(w: np.ndarray) -> PackedConvWeight:
    """Pack OIHW weights once so repeated :func:`bconv2d` calls skip it."""
    w = np.asarray(w)
    if w.ndim != 4:
        raise ValueError(f"conv weight must be OIHW, got shape {w.shape}")
    return PackedConvWeight(pack_bits(w.reshape(w.shape[0], -1)), tuple(int(s) for s in w.shape))


def border_rows(n: int, h: int, w: int, kh: int, kw: int, stride: int, padding: int) -> np.ndarray:
    """Flat im2col row indices (n, oh, ow order) whose window reaches into the padding."""
    oh, ow = conv_out_hw(h, w, kh, kw, stride, padding)
    r = np.arange(oh) * stride - padding
    c = np.arange(ow) * stride - padding
    bad = ((r < 0) | (r + kh > h))[:, None] | ((c < 0) | (c + kw > w))[None, :]
    per_image = np.flatnonzero(bad.ravel())
    return (np.arange(n)[:, None] * (oh * ow) + per_image[None, :]).ravel().astype(np.int64)


def im2col_pack(x: np.ndarray, kh: int, kw: int, stride: int, padding: int, pad_bit: int,
                rows: np.ndarray | None = None) -> np.ndarray:
    """Packed im2col of NCHW ``x``: uint64 [rows, ceil(C*KH*KW/64)], padded taps = ``pad_bit``.

    ``rows`` selects flat output positions (default: all N*OH*OW in order).
    """
    xb = np.asarray(x) >= 0
    n, c, h, w = xb.shape
    oh, ow = conv_out_hw(h, w, kh, kw, stride, padding)
    xp = np.pad(xb, ((0, 0), (0, 0), (padding, padding), (padding, padding)),
                constant_values=bool(pad_bit))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    win = win[:, :, ::stride, ::stride][:, :, :oh, :ow].transpose(0, 2, 3, 1, 4, 5)
    if rows is None:
        cols = win.reshape(n * oh * ow, c * kh * kw)
    else:
        ni, rem = np.divmod(np.asarray(rows, np.int64), oh * ow)
        oi, wi = np.divmod(rem, ow)
        cols = win[ni, oi, wi].reshape(len(ni), c * kh * kw)
    return pack_bits(cols, axis=-1)


def bconv2d_gemm(x: np.ndarray, w: np.ndarray | PackedConvWeight, stride: int, padding: int,
                 pad_value: int, gemm: GemmFn,
                 im2col: Callable[..., np.ndarray] = im2col_pack) -> np.ndarray:
    """Binary conv2d as packed im2col + ``gemm``; NCHW int32. See the module doc for padding."""
    if pad_value not in (0, 1, -1):
        raise ValueError(f"pad_value must be 0, 1 or -1, got {pad_value}")
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"input must be NCHW, got shape {x.shape}")
    pw = w if isinstance(w, PackedConvWeight) else pack_conv_weight(w)
    o, c, kh, kw = pw.shape
    n, cx, h, wd = x.shape
    if cx != c:
        raise ValueError(f"input has {cx} channels, weight expects {c}")
    oh, ow = conv_out_hw(h, wd, kh, kw, stride, padding)
    k_bits = c * kh * kw
    first_bit = 1 if pad_value == 1 else 0
    out = gemm(im2col(x, kh, kw, stride, padding, first_bit), pw.bits, k_bits)
    if pad_value == 0 and padding > 0:
        rows = border_rows(n, h, wd, kh, kw, stride, padding)
        if rows.size:
            plus = gemm(im2col(x, kh, kw, stride, padding, 1, rows), pw.bits, k_bits)
            out[rows] = (out[rows] + plus) // 2
    return np.ascontiguousarray(out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2))
