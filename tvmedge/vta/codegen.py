"""Our codegen: one int8 conv2d / dense layer -> an instruction stream tiled to the buffers,
plus the DRAM images (packed weights, bias vectors, micro-ops) it reads.

The layer (:class:`ConvLayer`; a dense layer is a 1x1 conv on a 1x1 image) computes
``acc[o, y, x] = bias[o] + sum_{i,kh,kw} x[i, y*s+kh-pad, x*s+kw-pad] * W[o, i, kh, kw]``
in int32, then optionally ReLU (ALU MAX 0). Activations quantized as asymmetric uint8
(tvmedge's int8 scheme) reach the int8 core as ``x - 128`` (the host packs them so); the
``128 * sum(W[o])`` this takes away is folded into the bias, which is exact in int32.

Layouts. DRAM: input ``[Cin/BI][H][W]`` vectors of BI int8 (channels padded to whole
blocks), weights ``[Cout/BO][Cin/BI][KH][KW]`` BOxBI matrices, bias ``[Cout/BO]`` int32
vectors, output ``[Cout/BO][OH][OW]`` int32 vectors. Scratchpads hold one tile: the input
window of ``tile_h x tile_w`` output pixels for all input channels, the weights of
``tile_co`` output blocks (all of them, loaded once, when they fit: "resident"), and
``tile_co x tile_h x tile_w`` accumulators. With ``double_buffer`` the input, weight and
accumulator tiles alternate between two halves, and the tokens let the load of tile t+1
and the store of tile t-1 run while tile t computes.

The reduction over input channels is not split across tiles: a layer whose whole
``Cin x KH x KW`` window for one output block does not fit the buffers cannot run.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..core.errors import TvmedgeError
from . import isa
from .isa import (ACC, ALU_ADD, ALU_MAX, INP, POP_NEXT, POP_PREV, PUSH_NEXT, PUSH_PREV, UOP, WGT, HwConfig)


@dataclass
class ConvLayer:
    """One offloadable layer, in the accelerator's terms."""

    name: str
    cin: int
    h: int
    w: int
    cout: int
    kh: int
    kw: int
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]  # top, left, bottom, right
    pad_value: int  # in the input's own domain (uint8 zero point, or int8)
    input_shift: int  # 128 for uint8 activations (packed as x - 128), 0 for int8
    weight: np.ndarray  # int8 OIHW
    bias: np.ndarray  # int32 [cout], the graph's (0 when it adds none)
    relu: bool

    @property
    def out_hw(self) -> tuple[int, int]:
        pt, pl, pb, pr = self.pad
        return ((self.h + pt + pb - self.kh) // self.stride[0] + 1, (self.w + pl + pr - self.kw) // self.stride[1] + 1)

    @property
    def macs(self) -> int:
        oh, ow = self.out_hw
        return self.cout * oh * ow * self.cin * self.kh * self.kw


def workload_key(layer: ConvLayer) -> str:
    return (f"cin{layer.cin}_h{layer.h}_w{layer.w}_cout{layer.cout}_k{layer.kh}x{layer.kw}"
            f"_s{layer.stride[0]}x{layer.stride[1]}_p{'-'.join(map(str, layer.pad))}_relu{int(layer.relu)}")



@dataclass(frozen=True)
class Tiling:
    """The knobs of one layer's schedule."""

    tile_h: int
    tile_w: int
    tile_co: int  # output-channel blocks per tile
    double_buffer: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Compiled:
    """A layer's program and the DRAM images it reads (see :mod:`tvmedge.vta.runtime`)."""

    layer: ConvLayer
    tiling: Tiling
    program: np.ndarray  # int32 [n, 16]
    uops: np.ndarray  # int32 [n, 3]
    weights: np.ndarray  # int8 [n, BO, BI]
    bias: np.ndarray  # int32 [Cout/BO, BO]


def _blocks(layer: ConvLayer, cfg: HwConfig) -> tuple[int, int]:
    return math.ceil(layer.cin / cfg.block_in), math.ceil(layer.cout / cfg.block_out)


def _in_tile(layer: ConvLayer, t: Tiling) -> tuple[int, int]:
    return (t.tile_h - 1) * layer.stride[0] + layer.kh, (t.tile_w - 1) * layer.stride[1] + layer.kw


def needs(layer: ConvLayer, cfg: HwConfig, t: Tiling) -> dict[str, int]:
    """Scratchpad elements tiling ``t`` uses, per buffer."""
    cib, cob = _blocks(layer, cfg)
    ih, iw = _in_tile(layer, t)
    nbuf = 2 if t.double_buffer else 1
    window = cib * layer.kh * layer.kw
    resident = t.tile_co >= cob
    return {"inp": nbuf * cib * ih * iw,
            "wgt": cob * window if resident else nbuf * t.tile_co * window,
            "acc": nbuf * t.tile_co * t.tile_h * t.tile_w + cob,
            "uop": t.tile_co * window + t.tile_co}


def fits(layer: ConvLayer, cfg: HwConfig, t: Tiling) -> bool:
    n = needs(layer, cfg, t)
    return (n["inp"] <= cfg.inp_depth and n["wgt"] <= cfg.wgt_depth and n["acc"] <= cfg.acc_depth
            and n["uop"] <= cfg.uop_depth)


def _sizes(n: int) -> list[int]:
    """Candidate tile extents for a dimension of ``n``: powers of two below it, and ``n``."""
    out = {n}
    k = 1
    while k < n:
        out.add(k)
        k *= 2
    return sorted(out)


def candidates(layer: ConvLayer, cfg: HwConfig) -> list[Tiling]:
    """Every tiling from the search space that fits the buffers."""
    oh, ow = layer.out_hw
    _, cob = _blocks(layer, cfg)
    out = [Tiling(th, tw, tc, db) for th, tw, tc, db in
           itertools.product(_sizes(oh), _sizes(ow), _sizes(cob), (True, False))]
    return [t for t in out if fits(layer, cfg, t)]


def default_tiling(layer: ConvLayer, cfg: HwConfig, accel_name: str = "the accelerator") -> Tiling:
    """The untuned choice: double-buffered, weights resident if they fit, then the largest
    output tile (whole rows first). TvmedgeError naming the layer when nothing fits."""
    cands = candidates(layer, cfg)
    if not cands:
        cib, _ = _blocks(layer, cfg)
        small = needs(layer, cfg, Tiling(1, 1, 1, False))
        depth = {"inp": cfg.inp_depth, "wgt": cfg.wgt_depth, "acc": cfg.acc_depth, "uop": cfg.uop_depth}
        short = ", ".join(f"{k} needs {v} > {depth[k]}" for k, v in small.items() if v > depth[k])
        raise TvmedgeError(f"layer {layer.name}: the buffers of {accel_name} are too small for any tile "
                           f"(smallest tile, 1x1 pixel x 1 output block: {short})")
    _, cob = _blocks(layer, cfg)
    return max(cands, key=lambda t: (t.double_buffer, t.tile_co >= cob, t.tile_w, t.tile_h, t.tile_co))


# ---------------------------------------------------------------- DRAM images
def pack_weights(layer: ConvLayer, cfg: HwConfig) -> np.ndarray:
    cib, cob = _blocks(layer, cfg)
    bi, bo = cfg.block_in, cfg.block_out
    w = np.zeros((cob * bo, cib * bi, layer.kh, layer.kw), np.int8)
    w[:layer.cout, :layer.cin] = layer.weight
    # [O/bo, bo, I/bi, bi, KH, KW] -> [O/bo, I/bi, KH, KW, bo, bi]
    w = w.reshape(cob, bo, cib, bi, layer.kh, layer.kw).transpose(0, 2, 4, 5, 1, 3)
    return np.ascontiguousarray(w.reshape(-1, bo, bi))


def pack_bias(layer: ConvLayer, cfg: HwConfig) -> np.ndarray:
    _, cob = _blocks(layer, cfg)
    total = layer.bias.astype(np.int64) + layer.input_shift * layer.weight.astype(np.int64).sum(axis=(1, 2, 3))
    if np.abs(total).max(initial=0) >= 2 ** 31:
        raise TvmedgeError(f"layer {layer.name}: the int32 bias with the uint8 offset folded in overflows")
    b = np.zeros(cob * cfg.block_out, np.int32)
    b[:layer.cout] = total.astype(np.int32)
    return b.reshape(cob, cfg.block_out)


def pack_input(x: np.ndarray, cfg: HwConfig, shift: int) -> np.ndarray:
    """NCHW activations (batch 1) -> DRAM input vectors ``[Cin/BI * H * W, BI]`` int8."""
    _, c, h, w = x.shape
    cib = math.ceil(c / cfg.block_in)
    if shift:
        xi = (x.astype(np.int16) - shift).astype(np.int8)
    else:
        xi = x.astype(np.int8)
    buf = np.zeros((cib * cfg.block_in, h, w), np.int8)
    buf[:c] = xi[0]
    return np.ascontiguousarray(buf.reshape(cib, cfg.block_in, h, w).transpose(0, 2, 3, 1).reshape(-1, cfg.block_in))


def unpack_output(out: np.ndarray, cfg: HwConfig, cout: int, oh: int, ow: int) -> np.ndarray:
    """DRAM output vectors ``[Cout/BO * OH * OW, BO]`` int32 -> NCHW (batch 1)."""
    cob = math.ceil(cout / cfg.block_out)
    o = out.reshape(cob, oh, ow, cfg.block_out).transpose(0, 3, 1, 2).reshape(cob * cfg.block_out, oh, ow)
    return np.ascontiguousarray(o[:cout][None])


# ---------------------------------------------------------------- the program
def compile_layer(layer: ConvLayer, cfg: HwConfig, tiling: Tiling | None = None,
                  accel_name: str = "the accelerator") -> Compiled:
    """The instruction stream of ``layer`` under ``tiling`` (default: :func:`default_tiling`)."""
    t = tiling or default_tiling(layer, cfg, accel_name)
    if not fits(layer, cfg, t):
        raise TvmedgeError(f"layer {layer.name}: tiling {t} does not fit the buffers of {accel_name}")
    cib, cob = _blocks(layer, cfg)
    kh, kw = layer.kh, layer.kw
    sh, sw = layer.stride
    pt, pl, _, _ = layer.pad
    oh, ow = layer.out_hw
    ih_t, iw_t = _in_tile(layer, t)
    nbuf = 2 if t.double_buffer else 1
    window = cib * kh * kw
    resident = t.tile_co >= cob
    inp_half = cib * ih_t * iw_t
    wgt_half = t.tile_co * window
    acc_half = t.tile_co * t.tile_h * t.tile_w
    bias_base = nbuf * acc_half
    pad_value = layer.pad_value - layer.input_shift

    # micro-ops: GEMM (acc, inp, wgt) for each (output block, input block, kh, kw), then one
    # (dst, src) per output block for the ALU and the accumulator reset.
    gemm_uops = [(c * t.tile_h * t.tile_w, i * ih_t * iw_t + y * iw_t + x, ((c * cib + i) * kh + y) * kw + x)
                 for c in range(t.tile_co) for i in range(cib) for y in range(kh) for x in range(kw)]
    alu0 = len(gemm_uops)
    uops = np.array(gemm_uops + [(c * t.tile_h * t.tile_w, c, 0) for c in range(t.tile_co)], np.int32)

    tiles = [(co0, oy0, ox0) for co0 in range(0, cob, t.tile_co)
             for oy0 in range(0, oh, t.tile_h) for ox0 in range(0, ow, t.tile_w)]
    n_tiles = len(tiles)
    loads: list[list[list[int]]] = []
    computes: list[list[list[int]]] = []
    stores: list[list[list[int]]] = []
    prologue = [isa.load(UOP, 0, 0, 0, 0, 1, len(uops)), isa.load(ACC, bias_base, 0, 0, 0, 1, cob)]
    if resident:
        prologue_w = [isa.load(WGT, 0, 0, 0, 0, 1, cob * window)]
    for k, (co0, oy0, ox0) in enumerate(tiles):
        half = k % nbuf
        n_co, n_oy, n_ox = min(t.tile_co, cob - co0), min(t.tile_h, oh - oy0), min(t.tile_w, ow - ox0)
        inp_base, acc_base = half * inp_half, half * acc_half
        wgt_base = 0 if resident else half * wgt_half
        # load: the input window (one DMA per input block), and the weights unless resident
        iy0, ix0 = oy0 * sh - pt, ox0 * sw - pl
        iy1, ix1 = iy0 + (n_oy - 1) * sh + kh, ix0 + (n_ox - 1) * sw + kw  # exclusive
        ylo, yhi, xlo, xhi = max(0, iy0), min(layer.h, iy1), max(0, ix0), min(layer.w, ix1)
        ny, nx = max(0, yhi - ylo), max(0, xhi - xlo)
        if ny and nx:
            pads = (ylo - iy0, iy1 - yhi, xlo - ix0, ix1 - xhi)
        else:  # the window lies wholly in the padding
            ny = nx = ylo = xlo = 0
            pads = (iy1 - iy0, 0, ix1 - ix0, 0)
        group = [isa.load(INP, inp_base + i * ih_t * iw_t, iw_t, i * layer.h * layer.w + ylo * layer.w + xlo,
                          layer.w, ny, nx, pads, pad_value) for i in range(cib)]
        if k == 0 and resident:
            group = prologue_w + group
        if not resident:
            group.append(isa.load(WGT, wgt_base, 0, co0 * window, 0, 1, n_co * window))
        loads.append(group)
        # compute: reset the accumulators, multiply, add the bias, ReLU
        comp = [isa.gemm(alu0, alu0 + n_co, n_oy, n_ox, (t.tile_w, 1), (0, 0), (0, 0), (acc_base, 0, 0), reset=True),
                isa.gemm(0, n_co * window, n_oy, n_ox, (t.tile_w, 1), (sh * iw_t, sw), (0, 0),
                         (acc_base, inp_base, wgt_base)),
                isa.alu(ALU_ADD, alu0, alu0 + n_co, n_oy, n_ox, (t.tile_w, 1), (0, 0), bases=(acc_base, bias_base + co0))]
        if layer.relu:
            comp.append(isa.alu(ALU_MAX, alu0, alu0 + n_co, n_oy, n_ox, (t.tile_w, 1), (0, 0), imm=0,
                                bases=(acc_base, 0)))
        computes.append(comp)
        stores.append([isa.store(acc_base + c * t.tile_h * t.tile_w, t.tile_w, (co0 + c) * oh * ow + oy0 * ow + ox0,
                                 ow, n_oy, n_ox) for c in range(n_co)])

    # dependency tokens (see module doc): half k % nbuf is reused by tile k + nbuf
    for k in range(n_tiles):
        if k >= nbuf:
            loads[k][0][1] |= POP_NEXT  # wait until compute has finished reading this half
        loads[k][-1][1] |= PUSH_NEXT
        computes[k][0][1] |= POP_PREV  # the tile's data is in
        if k >= nbuf:
            computes[k][0][1] |= POP_NEXT  # the store of tile k - nbuf has drained this half
        if k + nbuf < n_tiles:
            computes[k][1][1] |= PUSH_PREV  # the GEMM is done with the input half
        computes[k][-1][1] |= PUSH_NEXT
        stores[k][0][1] |= POP_PREV
        if k + nbuf < n_tiles or k == n_tiles - 1:
            stores[k][-1][1] |= PUSH_PREV
    rows = list(prologue)
    for k in range(n_tiles):  # program order within each queue is what matters; interleave per tile
        rows += loads[k] + computes[k] + stores[k]
    rows.append(isa.finish(deps=POP_NEXT))
    return Compiled(layer=layer, tiling=t, program=isa.program(rows), uops=uops,
                    weights=pack_weights(layer, cfg), bias=pack_bias(layer, cfg))


def run_compiled(c: Compiled, cfg: HwConfig, x: np.ndarray) -> np.ndarray:
    """Run a compiled layer on the functional simulator: NCHW input -> int32 NCHW output."""
    from .sim import Dram, Simulator

    oh, ow = c.layer.out_hw
    _, cob = _blocks(c.layer, cfg)
    dram = Dram(inp=pack_input(x, cfg, c.layer.input_shift), wgt=c.weights, acc=c.bias, uop=c.uops,
                out=np.zeros((cob * oh * ow, cfg.block_out), np.int32))
    Simulator(cfg).run(c.program, dram)
    return unpack_output(dram.out, cfg, c.layer.cout, oh, ow)
