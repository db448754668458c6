"""The instruction set of tvmedge's VTA-style accelerator, and the hardware shape it runs on.

An instruction is one row of 16 int32 fields (a program is an ``int32[n, 16]`` array, so
it travels as a plain tensor constant inside a compiled library). Field 0 is the opcode,
field 1 the dependency flags; the rest depend on the opcode:

=======  ===================================================================================
LOAD     2 buffer (INP/WGT/ACC/UOP), 3 sram_base, 4 sram_stride, 5 dram_base, 6 dram_stride,
         7 y_size, 8 x_size, 9-12 pad top/bottom/left/right, 13 pad_value.
         A 2-D strided DMA of ``y_size`` rows of ``x_size`` elements (vectors for INP/ACC,
         matrices for WGT, micro-ops for UOP); rows land ``sram_stride`` apart, padded on each
         side with ``pad_value`` (INP only; VTA pads with 0, here the value is given so that an
         asymmetric-uint8 zero point can be the padding).
GEMM     2 reset, 3 uop_begin, 4 uop_end, 5 ext0, 6 ext1, 7/8 acc factors, 9/10 inp factors,
         11/12 wgt factors, 13 acc_base, 14 inp_base, 15 wgt_base.
         ``for i in ext0: for j in ext1: for (a, x, w) in uops[begin:end]:
         acc[a'] += inp[x'] @ wgt[w']^T`` with ``a' = acc_base + a + i*f0 + j*f1`` (same for x, w);
         ``reset`` writes zeros instead.
ALU      2 alu op, 3 uop_begin, 4 uop_end, 5 ext0, 6 ext1, 7/8 dst factors, 9/10 src factors,
         11 use_imm, 12 imm, 13 dst_base, 14 src_base. ``acc[d] = op(acc[d], imm or acc[s])``
         elementwise over a vector; ops ADD, SHR (arithmetic; a negative amount shifts left),
         MIN, MAX, so requantize (add, shift), ReLU (max 0) and clip (min/max) are ALU work.
STORE    3 sram_base, 4 sram_stride, 5 dram_base, 6 dram_stride, 7 y_size, 8 x_size:
         accumulator vectors (int32) to the output region of DRAM.
FINISH   no fields: the end of the program.
=======  ===================================================================================

Queues and dependency tokens (as VTA): LOAD of INP/WGT runs on the *load* queue, LOAD of
ACC/UOP, GEMM, ALU and FINISH on the *compute* queue, STORE on the *store* queue. Each
instruction may pop a token from / push a token to its neighbouring queues (load <->
compute <-> store) with the flags POP_PREV, POP_NEXT, PUSH_PREV, PUSH_NEXT; a pop waits
until the neighbour has pushed. That is what lets loads of the next tile overlap the
compute of this one (double buffering) without a race.

DRAM is four read regions (INP, WGT, ACC = bias vectors, UOP) and one write region (OUT),
each indexed in its own elements; the simulator bounds-checks every access.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..core.errors import TvmedgeError

FIELDS = 16

# opcodes
LOAD, GEMM, ALU, STORE, FINISH = range(5)
OPCODE_NAMES = ("LOAD", "GEMM", "ALU", "STORE", "FINISH")
# buffers
INP, WGT, ACC, UOP = range(4)
BUFFER_NAMES = ("INP", "WGT", "ACC", "UOP")
# ALU ops
ALU_ADD, ALU_SHR, ALU_MIN, ALU_MAX = range(4)
ALU_NAMES = ("ADD", "SHR", "MIN", "MAX")
# dependency flags
POP_PREV, POP_NEXT, PUSH_PREV, PUSH_NEXT = 1, 2, 4, 8
# queues
Q_LOAD, Q_COMPUTE, Q_STORE = range(3)
QUEUE_NAMES = ("load", "compute", "store")


@dataclass(frozen=True)
class HwConfig:
    """The core's shape and scratchpad depths (in elements of each buffer)."""

    block_in: int
    block_out: int
    inp_depth: int  # input vectors of block_in int8
    wgt_depth: int  # weight matrices of block_out x block_in int8
    acc_depth: int  # accumulator vectors of block_out int32
    uop_depth: int  # micro-ops

    @classmethod
    def from_accelerator(cls, acc: Any) -> "HwConfig":
        """From a :class:`tvmedge.devices.Accelerator` (buffer sizes in bytes)."""
        if acc.batch != 1:
            raise TvmedgeError(f"{acc.name}: only BATCH = 1 GEMM cores are supported (got {acc.batch})")
        return cls(block_in=acc.block_in, block_out=acc.block_out,
                   inp_depth=acc.inp_buffer_bytes // acc.block_in,
                   wgt_depth=acc.wgt_buffer_bytes // (acc.block_in * acc.block_out),
                   acc_depth=acc.acc_buffer_bytes // (4 * acc.block_out),
                   uop_depth=acc.uop_buffer_bytes // acc.uop_bytes)

    def to_array(self) -> np.ndarray:
        return np.array([self.block_in, self.block_out, self.inp_depth, self.wgt_depth, self.acc_depth,
                         self.uop_depth], dtype=np.int32)

    @classmethod
    def from_array(cls, a: np.ndarray) -> "HwConfig":
        return cls(*(int(v) for v in np.asarray(a).reshape(-1)[:6]))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def queue_of(insn: np.ndarray) -> int:
    """Which queue an instruction runs on."""
    op = int(insn[0])
    if op == LOAD:
        return Q_LOAD if int(insn[2]) in (INP, WGT) else Q_COMPUTE
    if op == STORE:
        return Q_STORE
    return Q_COMPUTE


def _row(op: int, deps: int, *fields: int) -> list[int]:
    row = [op, deps, *fields]
    return row + [0] * (FIELDS - len(row))


def load(buffer: int, sram_base: int, sram_stride: int, dram_base: int, dram_stride: int, y_size: int,
         x_size: int, pads: tuple[int, int, int, int] = (0, 0, 0, 0), pad_value: int = 0, deps: int = 0) -> list[int]:
    return _row(LOAD, deps, buffer, sram_base, sram_stride, dram_base, dram_stride, y_size, x_size, *pads, pad_value)


def gemm(uop_begin: int, uop_end: int, ext0: int, ext1: int, acc_f: tuple[int, int], inp_f: tuple[int, int],
         wgt_f: tuple[int, int], bases: tuple[int, int, int] = (0, 0, 0), reset: bool = False, deps: int = 0) -> list[int]:
    return _row(GEMM, deps, int(reset), uop_begin, uop_end, ext0, ext1, *acc_f, *inp_f, *wgt_f, *bases)


def alu(op: int, uop_begin: int, uop_end: int, ext0: int, ext1: int, dst_f: tuple[int, int], src_f: tuple[int, int],
        imm: int | None = None, bases: tuple[int, int] = (0, 0), deps: int = 0) -> list[int]:
    return _row(ALU, deps, op, uop_begin, uop_end, ext0, ext1, *dst_f, *src_f, int(imm is not None), imm or 0, *bases)


def store(sram_base: int, sram_stride: int, dram_base: int, dram_stride: int, y_size: int, x_size: int,
          deps: int = 0) -> list[int]:
    return _row(STORE, deps, ACC, sram_base, sram_stride, dram_base, dram_stride, y_size, x_size)


def finish(deps: int = 0) -> list[int]:
    return _row(FINISH, deps)


def program(rows: list[list[int]]) -> np.ndarray:
    """Instruction rows as the ``int32[n, 16]`` program array."""
    return np.asarray(rows, dtype=np.int32).reshape(-1, FIELDS)


def describe(insn: np.ndarray) -> str:
    """One instruction as text (for error messages and listings)."""
    op = int(insn[0])
    name = OPCODE_NAMES[op] if 0 <= op < len(OPCODE_NAMES) else f"op{op}"
    deps = int(insn[1])
    flags = [f for bit, f in ((POP_PREV, "pop_prev"), (POP_NEXT, "pop_next"), (PUSH_PREV, "push_prev"),
                              (PUSH_NEXT, "push_next")) if deps & bit]
    if op == LOAD:
        body = f"{BUFFER_NAMES[int(insn[2])] if 0 <= insn[2] < 4 else insn[2]} sram={insn[3]} dram={insn[5]} {insn[7]}x{insn[8]}"
    elif op == GEMM:
        body = f"uops[{insn[3]}:{insn[4]}] x {insn[5]}x{insn[6]}{' reset' if insn[2] else ''}"
    elif op == ALU:
        body = f"{ALU_NAMES[int(insn[2])] if 0 <= insn[2] < 4 else insn[2]} uops[{insn[3]}:{insn[4]}] x {insn[5]}x{insn[6]}"
        if insn[11]:
            body += f" imm={insn[12]}"
    elif op == STORE:
        body = f"sram={insn[3]} dram={insn[5]} {insn[7]}x{insn[8]}"
    else:
        body = ""
    return f"{name} {body}".strip() + (f" [{' '.join(flags)}]" if flags else "")
