"""The timing model: estimated cycles of an instruction stream on the configured core.

Per instruction (figures from the device description's ``"accelerator"``, with sources):

* LOAD / STORE: ``dma_setup_cycles`` plus the bytes moved at the DRAM bandwidth expressed in
  bytes per fabric cycle, plus one cycle per padding element written;
* GEMM: ``gemm_cycles_per_uop`` per (loop iteration x micro-op) - the core finishes one
  BLOCK_OUT x BLOCK_IN matrix-vector product per cycle - resets included;
* ALU: per (iteration x micro-op), ``alu_cycles_per_uop.imm`` with an immediate, ``.vector``
  with a second accumulator operand;
* FINISH: one cycle.

The three queues overlap as their dependency tokens allow (:mod:`tvmedge.vta.queues`): the
program's makespan is the estimate. Not modelled: contention between the load and store
DMA for the one DRAM port, DRAM page effects, the host's time to start the accelerator
and flush caches. These are SIMULATED figures, not measurements on an FPGA.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .isa import ACC, ALU, BUFFER_NAMES, FINISH, GEMM, INP, LOAD, STORE, UOP, WGT
from .queues import issue_order


@dataclass
class Estimate:
    """What the timing model says about one program."""

    cycles: int
    seconds: float
    gemm_cycles: int  # cycles the GEMM core multiplies (resets excluded)
    alu_cycles: int
    load_cycles: int
    store_cycles: int
    bytes_loaded: int
    bytes_stored: int
    macs: int  # multiply-accumulates the GEMM core issues (padding lanes included)
    gemm_utilisation: float  # macs / (cycles x BLOCK_IN x BLOCK_OUT)
    instructions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _elem_bytes(acc: Any, buf: int) -> int:
    return {INP: acc.block_in, WGT: acc.block_in * acc.block_out, ACC: 4 * acc.block_out, UOP: acc.uop_bytes}[buf]


def instruction_cycles(insn: np.ndarray, acc: Any) -> tuple[int, str, int]:
    """``(cycles, unit, bytes moved)`` of one instruction on accelerator ``acc``."""
    op = int(insn[0])
    bytes_per_cycle = acc.dram_bandwidth_gbs * 1e9 / (acc.clock_mhz * 1e6)
    if op in (LOAD, STORE):
        buf = int(insn[2])
        y, x = int(insn[7]), int(insn[8])
        nbytes = y * x * _elem_bytes(acc, buf)
        pad = 0
        if op == LOAD:
            pt, pb, pl, pr = (int(v) for v in insn[9:13])
            pad = (pt + y + pb) * (pl + x + pr) - y * x
        return acc.dma_setup_cycles + math.ceil(nbytes / bytes_per_cycle) + pad, BUFFER_NAMES[buf] if op == LOAD else "STORE", nbytes
    if op == GEMM:
        n = int(insn[5]) * int(insn[6]) * (int(insn[4]) - int(insn[3]))
        return n * acc.gemm_cycles_per_uop, "GEMM_RESET" if insn[2] else "GEMM", 0
    if op == ALU:
        n = int(insn[5]) * int(insn[6]) * (int(insn[4]) - int(insn[3]))
        return n * (acc.alu_cycles_imm if insn[11] else acc.alu_cycles_vector), "ALU", 0
    if op == FINISH:
        return 1, "FINISH", 0
    return 0, "?", 0


def estimate(prog: np.ndarray, acc: Any) -> Estimate:
    """Estimate ``prog`` on accelerator ``acc`` (a :class:`tvmedge.devices.Accelerator`)."""
    prog = np.asarray(prog)
    info = [instruction_cycles(prog[i], acc) for i in range(len(prog))]
    order = issue_order(prog, durations=lambda i: float(info[i][0]))
    cycles = int(max(end for _, _, end in order))
    units: dict[str, int] = {}
    loaded = stored = macs = 0
    for i, (c, unit, nbytes) in enumerate(info):
        units[unit] = units.get(unit, 0) + c
        if int(prog[i, 0]) == LOAD:
            loaded += nbytes
        elif int(prog[i, 0]) == STORE:
            stored += nbytes
        if unit == "GEMM":
            macs += c // acc.gemm_cycles_per_uop * acc.block_in * acc.block_out
    return Estimate(cycles=cycles, seconds=cycles / (acc.clock_mhz * 1e6), gemm_cycles=units.get("GEMM", 0),
                    alu_cycles=units.get("ALU", 0),
                    load_cycles=sum(units.get(b, 0) for b in BUFFER_NAMES), store_cycles=units.get("STORE", 0),
                    bytes_loaded=loaded, bytes_stored=stored, macs=macs,
                    gemm_utilisation=macs / max(1, cycles * acc.block_in * acc.block_out), instructions=len(prog))
