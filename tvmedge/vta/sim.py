"""The functional simulator: executes an instruction stream on the scratchpads, bit-exact.

Integer semantics are the hardware's: int8 x int8 products summed into int32 accumulators
that wrap modulo 2**32; ALU ops on int32 that wrap the same way. Every access is checked
first, so a bad stream (a scratchpad or DRAM index out of bounds, a micro-op range past
the micro-op buffer, an unknown opcode) stops with a :class:`ProgramError` naming the
instruction, never a crash or a silent wrap-around of an index.

Decision: numpy, not Numba or C++. An instruction is a batch of work (a GEMM is a loop
nest of micro-ops, each a BLOCK_OUT x BLOCK_IN matrix-vector product), so the simulator
gathers the whole nest's operands and does it as one vectorized integer product; the
Python overhead is per instruction, not per multiply-accumulate, and nothing needs
compiling at install time. Execution order comes from :mod:`tvmedge.vta.queues`, the most
eager order the dependency tokens allow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .isa import (ACC, ALU, ALU_ADD, ALU_MAX, ALU_MIN, ALU_NAMES, ALU_SHR, BUFFER_NAMES, FIELDS, FINISH, GEMM, INP,
                  LOAD, STORE, UOP, WGT, HwConfig, describe)
from .queues import ProgramError, issue_order

# GEMM work is done in chunks of at most this many (micro-op, iteration) pairs, to bound memory.
_CHUNK = 1 << 14


@dataclass
class Dram:
    """The accelerator's view of DRAM: input vectors, weight matrices, bias (accumulator)
    vectors and micro-ops to read; output accumulator vectors to write."""

    inp: np.ndarray  # int8 [n, block_in]
    wgt: np.ndarray  # int8 [n, block_out, block_in]
    acc: np.ndarray  # int32 [n, block_out]
    uop: np.ndarray  # int32 [n, 3]
    out: np.ndarray  # int32 [n, block_out], written by STORE
    counters: dict[str, int] = field(default_factory=lambda: {"bytes_loaded": 0, "bytes_stored": 0})


class Simulator:
    """One accelerator's scratchpads; :meth:`run` executes a program against a :class:`Dram`."""

    def __init__(self, cfg: HwConfig) -> None:
        self.cfg = cfg
        self.inp = np.zeros((cfg.inp_depth, cfg.block_in), np.int8)
        self.wgt = np.zeros((cfg.wgt_depth, cfg.block_out, cfg.block_in), np.int8)
        self.acc = np.zeros((cfg.acc_depth, cfg.block_out), np.int32)
        self.uop = np.zeros((cfg.uop_depth, 3), np.int32)

    def run(self, prog: np.ndarray, dram: Dram) -> int:
        """Execute ``prog``; returns how many instructions ran."""
        prog = np.asarray(prog)
        if prog.ndim != 2 or prog.shape[1] != FIELDS or prog.dtype != np.int32:
            raise ProgramError(f"instruction stream must be int32[n, {FIELDS}], got {prog.dtype}{list(prog.shape)}")
        self._check_dram(dram)
        for i, _, _ in issue_order(prog):
            insn = prog[i]
            try:
                self._execute(insn, dram)
            except ProgramError as e:
                raise ProgramError(f"instruction {i} ({describe(insn)}): {e}") from None
        return len(prog)

    def _check_dram(self, d: Dram) -> None:
        c = self.cfg
        for name, arr, dtype, tail in (("inp", d.inp, np.int8, (c.block_in,)),
                                       ("wgt", d.wgt, np.int8, (c.block_out, c.block_in)),
                                       ("acc", d.acc, np.int32, (c.block_out,)), ("uop", d.uop, np.int32, (3,)),
                                       ("out", d.out, np.int32, (c.block_out,))):
            if arr.dtype != dtype or tuple(arr.shape[1:]) != tail:
                raise ProgramError(f"DRAM region {name} must be {np.dtype(dtype)}[n, {', '.join(map(str, tail))}], "
                                   f"got {arr.dtype}{list(arr.shape)}")

    # ------------------------------------------------------------ instructions
    def _execute(self, insn: np.ndarray, dram: Dram) -> None:
        op = int(insn[0])
        if op == LOAD:
            self._load(insn, dram)
        elif op == GEMM:
            self._gemm(insn)
        elif op == ALU:
            self._alu(insn)
        elif op == STORE:
            self._store(insn, dram)
        elif op != FINISH:
            raise ProgramError(f"unknown opcode {op}")

    def _load(self, insn: np.ndarray, dram: Dram) -> None:
        buf = int(insn[2])
        if buf not in (INP, WGT, ACC, UOP):
            raise ProgramError(f"unknown buffer {buf}")
        sram_base, sram_stride, dram_base, dram_stride, y, x, pt, pb, pl, pr, pad_value = (int(v) for v in insn[3:14])
        if min(y, x, pt, pb, pl, pr) < 0 or sram_stride < 0 or dram_stride < 0:
            raise ProgramError("negative size, stride or padding")
        if (pt or pb or pl or pr) and buf != INP:
            raise ProgramError(f"padding is only for INP loads, not {BUFFER_NAMES[buf]}")
        sram = {INP: self.inp, WGT: self.wgt, ACC: self.acc, UOP: self.uop}[buf]
        src = {INP: dram.inp, WGT: dram.wgt, ACC: dram.acc, UOP: dram.uop}[buf]
        rows, width = pt + y + pb, pl + x + pr
        if rows == 0 or width == 0:
            return
        dst = _check_range(sram_base + np.arange(rows)[:, None] * sram_stride + np.arange(width)[None, :],
                           len(sram), f"{BUFFER_NAMES[buf]} scratchpad")
        if y and x:
            srcidx = _check_range(dram_base + np.arange(y)[:, None] * dram_stride + np.arange(x)[None, :],
                                  len(src), f"DRAM {BUFFER_NAMES[buf]} region")
        if buf == INP:
            if not -128 <= pad_value <= 127:
                raise ProgramError(f"pad value {pad_value} is not int8")
            sram[dst.reshape(-1)] = pad_value
        if y and x:
            sram[dst[pt:pt + y, pl:pl + x].reshape(-1)] = src[srcidx.reshape(-1)]
            dram.counters["bytes_loaded"] += int(srcidx.size * src[0].nbytes)

    def _nest(self, insn: np.ndarray, cols: int, factors: tuple[int, int], base: int, depth: int, what: str) -> np.ndarray:
        """Indices ``base + uop[:, cols] + i*f0 + j*f1`` over the loop nest, shape (ext0, ext1, n_uops)."""
        ub, ue, e0, e1 = (int(v) for v in insn[3:7])
        u = self.uop[ub:ue, cols]
        idx = (base + u[None, None, :].astype(np.int64) + np.arange(e0)[:, None, None] * factors[0]
               + np.arange(e1)[None, :, None] * factors[1])
        return _check_range(idx, depth, what)

    def _uop_range(self, insn: np.ndarray) -> None:
        ub, ue, e0, e1 = (int(v) for v in insn[3:7])
        if not 0 <= ub <= ue <= self.cfg.uop_depth:
            raise ProgramError(f"micro-op range [{ub}, {ue}) outside the micro-op buffer (depth {self.cfg.uop_depth})")
        if e0 < 0 or e1 < 0:
            raise ProgramError("negative loop extent")

    def _gemm(self, insn: np.ndarray) -> None:
        self._uop_range(insn)
        c = self.cfg
        reset = bool(insn[2])
        a = self._nest(insn, 0, (int(insn[7]), int(insn[8])), int(insn[13]), c.acc_depth, "ACC scratchpad").reshape(-1)
        if reset:
            self.acc[a] = 0
            return
        x = self._nest(insn, 1, (int(insn[9]), int(insn[10])), int(insn[14]), c.inp_depth, "INP scratchpad").reshape(-1)
        w = self._nest(insn, 2, (int(insn[11]), int(insn[12])), int(insn[15]), c.wgt_depth, "WGT scratchpad").reshape(-1)
        acc64 = self.acc.astype(np.int64)
        for s in range(0, len(a), _CHUNK):
            xs = self.inp[x[s:s + _CHUNK]].astype(np.int32)
            ws = self.wgt[w[s:s + _CHUNK]].astype(np.int32)
            np.add.at(acc64, a[s:s + _CHUNK], np.einsum("nk,nok->no", xs, ws))
        self.acc[:] = acc64.astype(np.int32)  # wraps modulo 2**32 as the int32 accumulators do

    def _alu(self, insn: np.ndarray) -> None:
        self._uop_range(insn)
        c = self.cfg
        op = int(insn[2])
        if op not in (ALU_ADD, ALU_SHR, ALU_MIN, ALU_MAX):
            raise ProgramError(f"unknown ALU op {op}")
        d = self._nest(insn, 0, (int(insn[7]), int(insn[8])), int(insn[13]), c.acc_depth, "ACC scratchpad").reshape(-1)
        if insn[11]:
            operand = np.int64(int(insn[12]))
            s = None
        else:
            s = self._nest(insn, 1, (int(insn[9]), int(insn[10])), int(insn[14]), c.acc_depth, "ACC scratchpad").reshape(-1)
        if len(np.unique(d)) != len(d) or (s is not None and np.intersect1d(d, s).size):
            # The loop nest revisits an element: do it one step at a time, as the hardware would.
            for k in range(len(d)):
                rhs = operand if s is None else self.acc[s[k]].astype(np.int64)
                self.acc[d[k]] = _alu_op(op, self.acc[d[k]].astype(np.int64), rhs)
            return
        rhs = np.broadcast_to(operand, (len(d), c.block_out)) if s is None else self.acc[s].astype(np.int64)
        self.acc[d] = _alu_op(op, self.acc[d].astype(np.int64), rhs)

    def _store(self, insn: np.ndarray, dram: Dram) -> None:
        if int(insn[2]) != ACC:
            raise ProgramError("STORE reads the ACC scratchpad only")
        sram_base, sram_stride, dram_base, dram_stride, y, x = (int(v) for v in insn[3:9])
        if min(y, x, sram_stride, dram_stride) < 0:
            raise ProgramError("negative size or stride")
        if y == 0 or x == 0:
            return
        src = _check_range(sram_base + np.arange(y)[:, None] * sram_stride + np.arange(x)[None, :],
                           self.cfg.acc_depth, "ACC scratchpad")
        dst = _check_range(dram_base + np.arange(y)[:, None] * dram_stride + np.arange(x)[None, :],
                           len(dram.out), "DRAM OUT region")
        dram.out[dst.reshape(-1)] = self.acc[src.reshape(-1)]
        dram.counters["bytes_stored"] += int(src.size * self.acc[0].nbytes)


def _alu_op(op: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One ALU op on int64 copies of int32 operands; the result wraps to int32."""
    if op == ALU_ADD:
        r = a + b
    elif op == ALU_MIN:
        r = np.minimum(a, b)
    elif op == ALU_MAX:
        r = np.maximum(a, b)
    else:  # arithmetic shift right; a negative amount shifts left
        sh = np.broadcast_to(b, np.shape(a))
        r = np.where(sh >= 0, a >> np.clip(sh, 0, 31), a << np.clip(-sh, 0, 31))
    return (r & 0xFFFFFFFF).astype(np.uint32).view(np.int32) if np.ndim(r) else np.int32(np.uint32(r & 0xFFFFFFFF))


def _check_range(idx: np.ndarray, depth: int, what: str) -> np.ndarray:
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= depth):
        lo, hi = int(idx.min()), int(idx.max())
        raise ProgramError(f"out-of-bounds access to the {what}: indices {lo}..{hi}, depth {depth}")
    return idx


__all__ = ["Dram", "Simulator", "ProgramError", "ALU_NAMES"]
