"""fp16 for CUDA targets: Relax's ``ToMixedPrecision`` with fp16 compute, checked on this CPU.

Jetson Nano's Maxwell GPU runs fp16 at twice its fp32 rate (paired ``HFMA2``, 472 vs 236
GFLOP/s) and Xavier's Volta likewise outside its tensor cores; the memory traffic of
weights and activations halves too. ``ToMixedPrecision(out_dtype="float16")`` casts the
model's inputs and weights to fp16 and computes conv2d / matmul and everything between
them in fp16 (ops that need the range, e.g. softmax's sum, stay fp32 as the pass decides);
the model keeps its fp32 interface.

The rewrite is checked before it is used: both the original and the fp16 model are built
for this machine's CPU (TVM's LLVM backend computes fp16 exactly as IEEE half, like the
GPU's fp16 units, except for fused multiply-adds) and run on the same seeded inputs; the
largest output difference, relative to the largest reference output, must stay within
``tolerance``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from ..core.errors import TvmedgeError, first_line
from ..core.model import ImportedModel, random_inputs

TOLERANCE = 2e-2  # max |fp16 - fp32| / max |fp32| over the check inputs
CHECK_INPUTS = 3


def convert(mod):
    """The Relax module with fp16 compute (fp32 interface)."""
    import tvm
    from tvm import relax

    return tvm.transform.Sequential([
        relax.transform.FoldConstant(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.ToMixedPrecision(out_dtype="float16"),
        relax.transform.FoldConstant(),  # the weights' casts: fp16 constants in the library
    ])(mod)


def _run_on_host(mod, specs: list[dict[str, Any]], seeds: range) -> list[list[np.ndarray]]:
    import tvm

    from ..core.vm import ModelVM
    from ..target import host_target_dict
    from .pipeline import build

    ex, _ = build(mod, tvm.target.Target(host_target_dict()))
    vm = ModelVM(ex, tvm.cpu(), [s["name"] for s in specs])
    return [vm(random_inputs(specs, seed)) for seed in seeds]


def to_fp16(model: ImportedModel, tolerance: float = TOLERANCE) -> ImportedModel:
    """``model`` with fp16 compute, after checking it on this CPU against the fp32 model;
    the rewrite (with its measured error) is appended to ``model.rewrites``."""
    specs = [i.to_dict() for i in model.inputs]
    if not any(np.issubdtype(np.dtype(s["dtype"]), np.floating) for s in specs + [o.to_dict() for o in model.outputs]):
        raise TvmedgeError("--fp16: the model has no floating-point inputs or outputs to convert")
    try:
        mod16 = convert(model.mod)
        seeds = range(CHECK_INPUTS)
        ref = _run_on_host(model.mod, specs, seeds)
        got = _run_on_host(mod16, specs, seeds)
    except TvmedgeError:
        raise
    except Exception as e:
        raise TvmedgeError(f"fp16 conversion failed: {first_line(e)}") from e
    abs_err = max(float(np.abs(g.astype(np.float64) - r).max()) for gs, rs in zip(got, ref) for g, r in zip(gs, rs))
    scale = max(float(np.abs(r).max()) for rs in ref for r in rs) or 1.0
    rel = abs_err / scale
    if not np.isfinite(rel) or rel > tolerance:
        raise TvmedgeError(f"--fp16 changes this model's outputs by {rel:.3g} of their range (max abs {abs_err:.3g}) "
                           f"on {CHECK_INPUTS} random inputs, more than the {tolerance:g} allowed: compile it in fp32")
    rewrite = {"name": "fp16", "pass": "relax.transform.ToMixedPrecision(out_dtype=float16)",
               "changed": "inputs cast to fp16 on entry, weights stored as fp16, compute in fp16, outputs cast to fp32",
               "check": {"against": "the fp32 model, both built for this CPU", "inputs": f"{CHECK_INPUTS} seeded random",
                         "max_abs_error": abs_err, "max_rel_error": rel, "tolerance": tolerance}}
    return replace(model, mod=mod16, rewrites=list(model.rewrites) + [rewrite])
