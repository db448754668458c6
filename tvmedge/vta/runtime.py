"""The host-side packed function that runs an offloaded layer on the simulator.

An offloaded layer in a compiled library is a ``call_dps_packed("tvmedge.vta.run", ...)``
whose arguments are the layer's input (NCHW, uint8 or int8) and constant tensors the
compiler embedded in the library: a header (the core's shape and scratchpad depths, the
layer's shapes, the uint8 offset), the instruction stream, the micro-ops, the packed
weights and the bias vectors. The function is what a board's driver would do: pack the
input into the accelerator's DRAM layout, run the stream (here on the functional
simulator, :mod:`tvmedge.vta.sim`), unpack the int32 output.

:func:`register` makes it callable by name in this process (via ``tvm_ffi``); tvmedge
does that before running a VTA artifact locally, and the emulated VTA board
(``tvmedge device emulate vta-pynq``) in its RPC server.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FUNC_NAME = "tvmedge.vta.run"
HEADER = ("block_in", "block_out", "inp_depth", "wgt_depth", "acc_depth", "uop_depth",
          "cin", "h", "w", "cout", "oh", "ow", "input_shift")


def header(cfg: Any, layer: Any) -> np.ndarray:
    oh, ow = layer.out_hw
    return np.concatenate([cfg.to_array(), np.array([layer.cin, layer.h, layer.w, layer.cout, oh, ow,
                                                     layer.input_shift], np.int32)])


def run_layer(x: np.ndarray, head: np.ndarray, prog: np.ndarray, uops: np.ndarray, wgt: np.ndarray,
              bias: np.ndarray) -> np.ndarray:
    """One offloaded layer on the simulator (numpy in, int32 NCHW out)."""
    from .codegen import pack_input, unpack_output
    from .isa import HwConfig
    from .queues import ProgramError
    from .sim import Dram, Simulator

    cfg = HwConfig.from_array(head[:6])
    cin, h, w, cout, oh, ow, shift = (int(v) for v in head[6:13])
    if x.ndim != 4 or x.shape[0] != 1 or tuple(x.shape[1:]) != (cin, h, w):
        raise ProgramError(f"VTA layer input has shape {list(x.shape)}, the program was compiled for [1, {cin}, {h}, {w}]")
    cob = -(-cout // cfg.block_out)
    dram = Dram(inp=pack_input(x, cfg, shift), wgt=np.ascontiguousarray(wgt), acc=np.ascontiguousarray(bias),
                uop=np.ascontiguousarray(uops), out=np.zeros((cob * oh * ow, cfg.block_out), np.int32))
    Simulator(cfg).run(prog, dram)
    return unpack_output(dram.out, cfg, cout, oh, ow)


def _packed(x: Any, head: Any, prog: Any, uops: Any, wgt: Any, bias: Any, out: Any) -> None:
    res = run_layer(x.numpy(), head.numpy(), prog.numpy(), uops.numpy(), wgt.numpy(), bias.numpy())
    out.copyfrom(res.reshape([int(d) for d in out.shape]))


def register() -> None:
    """Make ``tvmedge.vta.run`` callable in this process (idempotent)."""
    import tvm_ffi

    tvm_ffi.register_global_func(FUNC_NAME, _packed, override=True)
