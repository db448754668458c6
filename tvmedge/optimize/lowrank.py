"""Low-rank factorization of dense, matmul and convolution layers on the Relax graph.

* ``R.matmul(x, W)`` with a constant ``W`` [K, N] (directly, or ``permute_dims`` of a
  constant, which is how the ONNX importer writes Gemm/Linear) and 1×1 convolutions become
  two thin layers from a truncated SVD: ``x @ A @ B`` with A [K, r], B [r, N].
* K×K convolutions become 1×1 → K×K → 1×1 by a Tucker-2 decomposition of the kernel along
  its two channel modes (HOSVD, refined by a few HOOI sweeps). A mode whose rank stays full
  keeps no 1×1 layer.

The rank of each layer is the smallest one that keeps ``energy`` of the squared singular
values (per mode), or the largest that brings the layer to ``flops_ratio`` of its FLOPs.
Layers whose factorization would not lower FLOPs by at least 10 % are left alone and listed in ``skipped``.
Grouped/depthwise convolutions and layouts other than NCHW/OIHW are skipped as well.

The helpers below (constant look-up, FLOP counting, emitting convolutions) are shared
with :mod:`tvmedge.optimize.compact`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from ..errors import TvmedgeError
from ..frontend import ImportedModel

CONV = "relax.nn.conv2d"
MATMUL = "relax.matmul"
HOOI_SWEEPS = 3
# A rewrite that saves less than this share of a layer's FLOPs is not worth an extra layer.
MIN_SAVING = 0.1


# ---------------------------------------------------------------- shared graph helpers
def ints(values: Any) -> list[int]:
    return [int(v) for v in values]


def shape_of(expr: Any) -> list[int] | None:
    """Static shape of a Relax expression, or None."""
    sinfo = getattr(expr, "ty", None)
    shape = getattr(sinfo, "shape", None)
    if shape is None:
        return None
    try:
        return ints(shape)
    except (TypeError, ValueError):
        return None


def constant_value(mutator: Any, expr: Any) -> np.ndarray | None:
    """The numpy value of ``expr`` when it is a constant, or a variable bound to a
    ``permute_dims``/``reshape`` of one; else None."""
    import tvm
    from tvm import relax

    if isinstance(expr, tvm.ir.Constant):
        return expr.value.numpy()
    if isinstance(expr, relax.Var):
        bound = mutator.lookup_binding(expr)
        if isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op):
            inner = constant_value(mutator, bound.args[0])
            if inner is None:
                return None
            if bound.op.name == "relax.permute_dims":
                axes = bound.attrs.axes
                return np.transpose(inner, None if axes is None else ints(axes))
            if bound.op.name == "relax.reshape":
                return inner.reshape(shape_of(bound))
        if isinstance(bound, tvm.ir.Constant):
            return bound.value.numpy()
    return None


def conv_attrs(call: Any) -> dict[str, Any]:
    a = call.attrs
    return {"strides": ints(a.strides), "padding": ints(a.padding), "dilation": ints(a.dilation),
            "groups": int(a.groups), "data_layout": str(a.data_layout), "kernel_layout": str(a.kernel_layout),
            "out_layout": str(a.out_layout), "out_dtype": str(a.out_dtype)}


def conv_unsupported(attrs: dict[str, Any], weight: np.ndarray | None) -> str | None:
    """Why a conv2d cannot be rewritten (None when it can)."""
    if weight is None:
        return "weight is not a constant"
    if attrs["data_layout"] != "NCHW" or attrs["kernel_layout"] != "OIHW" or attrs["out_layout"] not in ("NCHW", ""):
        return f"layout {attrs['data_layout']}/{attrs['kernel_layout']} (only NCHW/OIHW)"
    if attrs["groups"] != 1:
        return f"grouped convolution (groups={attrs['groups']})"
    if weight.dtype != np.float32:
        return f"weight dtype {weight.dtype} (only float32)"
    return None


def conv_flops(cin: int, cout: int, kh: int, kw: int, out_hw: int, groups: int = 1) -> int:
    """FLOPs (2 per multiply-add) of a convolution producing ``out_hw`` pixels per channel."""
    return 2 * (cin // groups) * cout * kh * kw * out_hw


def emit_conv(builder: Any, x: Any, weight: np.ndarray, strides: list[int] | tuple[int, int] = (1, 1),
              padding: list[int] | tuple[int, ...] = (0, 0, 0, 0), dilation: list[int] | tuple[int, int] = (1, 1),
              groups: int = 1, name: str = "lr") -> Any:
    """Emit ``conv2d(x, weight)`` (NCHW/OIHW, float32) and return its variable."""
    import tvm
    from tvm import relax

    w = relax.const(tvm.runtime.tensor(np.ascontiguousarray(weight, dtype=np.float32)))
    return builder.emit(relax.op.nn.conv2d(x, w, strides=list(strides), padding=list(padding),
                                           dilation=list(dilation), groups=groups), name_hint=name)


def graph_flops(mod: Any) -> int:
    """FLOPs of all conv2d and matmul calls in ``main`` (static shapes)."""
    from tvm import relax

    total = 0

    def visit(e: Any) -> None:
        nonlocal total
        if isinstance(e, relax.Call) and hasattr(e.op, "name"):
            out = shape_of(e)
            if e.op.name == CONV and out is not None:
                w = shape_of(e.args[1])
                if w:
                    total += conv_flops(w[1] * int(e.attrs.groups), w[0], w[2], w[3], out[2] * out[3], int(e.attrs.groups))
            elif e.op.name == MATMUL and out is not None:
                a = shape_of(e.args[0])
                if a:
                    total += 2 * int(np.prod(out)) * a[-1]

    relax.analysis.post_order_visit(mod["main"], visit)
    return total


def rewrite_main(model: ImportedModel, make_mutator: Callable[[Any], Any]) -> ImportedModel:
    """Run a PyExprMutator over ``main`` and drop the bindings left unused."""
    from tvm import relax

    mod = model.mod
    mutator = make_mutator(mod)
    gv = mod.get_global_var("main")
    new_func = mutator.visit_expr(mod["main"])
    mutator.builder_.update_func(gv, new_func)
    new_mod = mutator.builder_.get()
    new_mod = relax.transform.DeadCodeElimination(["main"])(new_mod)
    return replace(model, mod=new_mod, rewrites=list(model.rewrites))


def rel_error(ref: np.ndarray, approx: np.ndarray) -> float:
    n = float(np.linalg.norm(ref))
    return float(np.linalg.norm(ref - approx)) / n if n else 0.0


# ---------------------------------------------------------------- decompositions
def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` of the total squared energy."""
    e = np.cumsum(s.astype(np.float64) ** 2)
    if e[-1] <= 0:
        return 1
    return int(min(len(s), np.searchsorted(e / e[-1], energy - 1e-12) + 1))


def truncated_svd(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """W [M, N] ≈ A [M, r] @ B [r, N] (singular values split evenly between the factors)."""
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return (u[:, :rank] * root).astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32)


def _unfold(t: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)


def tucker2(w: np.ndarray, r_out: int, r_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2 of a kernel W [O, I, kh, kw] on its channel modes: W ≈ core ×₀ U_out ×₁ U_in.

    Returns (U_out [O, r_out], core [r_out, r_in, kh, kw], U_in [I, r_in]); HOSVD start,
    then HOOI sweeps (alternating projections), which only lower the error.
    """
    w64 = w.astype(np.float64)
    u_in = np.linalg.svd(_unfold(w64, 1), full_matrices=False)[0][:, :r_in]
    u_out = np.linalg.svd(_unfold(w64, 0), full_matrices=False)[0][:, :r_out]
    for _ in range(HOOI_SWEEPS):
        y = np.einsum("oikl,ir->orkl", w64, u_in)
        u_out = np.linalg.svd(_unfold(y, 0), full_matrices=False)[0][:, :r_out]
        y = np.einsum("oikl,or->rikl", w64, u_out)
        u_in = np.linalg.svd(_unfold(y, 1), full_matrices=False)[0][:, :r_in]
    core = np.einsum("oikl,or,is->rskl", w64, u_out, u_in)
    return u_out.astype(np.float32), core.astype(np.float32), u_in.astype(np.float32)


def tucker2_flops(cin: int, cout: int, kh: int, kw: int, in_hw: int, out_hw: int, r_out: int, r_in: int) -> int:
    f = conv_flops(r_in, r_out, kh, kw, out_hw)
    if r_in < cin:
        f += conv_flops(cin, r_in, 1, 1, in_hw)
    if r_out < cout:
        f += conv_flops(r_out, cout, 1, 1, out_hw)
    return f


# ---------------------------------------------------------------- the rewrite
def _make_mutator(energy: float | None, flops_ratio: float | None, report: dict[str, Any]):
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class LowRank(PyExprMutator):
        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.counts: dict[str, int] = {}

        def _name(self, kind: str) -> str:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            return f"{kind}_{self.counts[kind]}"

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call, relax.Call) or not hasattr(call.op, "name"):
                return call
            if call.op.name == CONV:
                return self._conv(call, self._name("conv2d"))
            if call.op.name == MATMUL:
                return self._matmul(call, self._name("matmul"))
            return call

        def _skip(self, layer: str, reason: str) -> None:
            report["skipped"].append({"layer": layer, "reason": reason})

        def _matmul(self, call: Any, layer: str) -> Any:
            w = constant_value(self, call.args[1])
            if w is None:
                return call  # activation × activation (attention and the like): not a weight layer
            if w.ndim != 2 or w.dtype != np.float32:
                self._skip(layer, f"weight of shape {list(w.shape)} / {w.dtype} (only 2-D float32)")
                return call
            out = shape_of(call)
            rows = int(np.prod(out[:-1])) if out else 1
            k, n = w.shape
            before = 2 * rows * k * n
            if flops_ratio is not None:
                rank = int(flops_ratio * k * n / (k + n))
            else:
                rank = energy_rank(np.linalg.svd(w.astype(np.float64), compute_uv=False), energy)
            after = 2 * rows * rank * (k + n)
            if rank < 1 or after > (1 - MIN_SAVING) * before:
                self._skip(layer, f"rank {max(rank, 1)} of {k}x{n} would not lower FLOPs by {MIN_SAVING:.0%} "
                                  f"({after} vs {before})")
                return call
            a, b = truncated_svd(w, rank)
            ca = relax.const(tvm.runtime.tensor(a))
            cb = relax.const(tvm.runtime.tensor(b))
            mid = self.builder_.emit(relax.op.matmul(call.args[0], ca), name_hint="lr")
            report["layers"].append({"layer": layer, "op": "matmul", "weight": f"{k}x{n}", "structure": "svd",
                                     "rank": rank, "flops_before": before, "flops_after": after,
                                     "weight_rel_error": rel_error(w, a @ b)})
            return relax.op.matmul(mid, cb)

        def _conv(self, call: Any, layer: str) -> Any:
            attrs = conv_attrs(call)
            w = constant_value(self, call.args[1])
            why = conv_unsupported(attrs, w)
            if why:
                self._skip(layer, why)
                return call
            o, i, kh, kw = w.shape
            out, inp = shape_of(call), shape_of(call.args[0])
            out_hw, in_hw = out[2] * out[3], inp[2] * inp[3]
            before = conv_flops(i, o, kh, kw, out_hw)
            x = call.args[0]
            if kh == kw == 1:
                w2 = w[:, :, 0, 0]
                if flops_ratio is not None:
                    # first conv runs at the output resolution too (it carries the stride)
                    rank = int(flops_ratio * o * i / (o + i))
                else:
                    rank = energy_rank(np.linalg.svd(w2.astype(np.float64), compute_uv=False), energy)
                after = conv_flops(i, rank, 1, 1, out_hw) + conv_flops(rank, o, 1, 1, out_hw)
                if rank < 1 or after > (1 - MIN_SAVING) * before:
                    self._skip(layer, f"rank {max(rank, 1)} of {o}x{i} 1x1 conv would not lower FLOPs by "
                                      f"{MIN_SAVING:.0%} ({after} vs {before})")
                    return call
                a, b = truncated_svd(w2, rank)  # a [O, r], b [r, I]
                mid = emit_conv(self.builder_, x, b[:, :, None, None], attrs["strides"], attrs["padding"],
                                attrs["dilation"])
                report["layers"].append({"layer": layer, "op": "conv2d 1x1", "weight": f"{o}x{i}x1x1",
                                         "structure": "svd", "rank": rank, "flops_before": before,
                                         "flops_after": after, "weight_rel_error": rel_error(w2, a @ b)})
                return relax.op.nn.conv2d(mid, relax.const(tvm.runtime.tensor(
                    np.ascontiguousarray(a[:, :, None, None]))))
            if flops_ratio is not None:
                r_out, r_in = self._budget_ranks(o, i, kh, kw, in_hw, out_hw, flops_ratio * before)
            else:
                r_out = energy_rank(np.linalg.svd(_unfold(w.astype(np.float64), 0), compute_uv=False), energy)
                r_in = energy_rank(np.linalg.svd(_unfold(w.astype(np.float64), 1), compute_uv=False), energy)
            after = tucker2_flops(i, o, kh, kw, in_hw, out_hw, r_out, r_in)
            if r_out < 1 or r_in < 1 or after > (1 - MIN_SAVING) * before:
                self._skip(layer, f"Tucker ranks {r_in}->{r_out} of {i}->{o} {kh}x{kw} conv would not lower "
                                  f"FLOPs by {MIN_SAVING:.0%} ({after} vs {before})")
                return call
            u_out, core, u_in = tucker2(w, r_out, r_in)
            recon = np.einsum("rskl,or,is->oikl", core, u_out, u_in)
            if r_in < i:
                x = emit_conv(self.builder_, x, u_in.T[:, :, None, None].copy(), name="lr")
            else:
                core = np.einsum("rskl,is->rikl", core, u_in)  # full input rank: fold U_in into the core
            if r_out < o:
                x = emit_conv(self.builder_, x, core, attrs["strides"], attrs["padding"], attrs["dilation"], name="lr")
                result = relax.op.nn.conv2d(x, relax.const(tvm.runtime.tensor(u_out[:, :, None, None].copy())))
            else:
                core = np.einsum("rskl,or->oskl", core, u_out)  # full output rank: fold U_out in
                result = relax.op.nn.conv2d(x, relax.const(tvm.runtime.tensor(np.ascontiguousarray(core))),
                                            strides=attrs["strides"], padding=attrs["padding"],
                                            dilation=attrs["dilation"])
            report["layers"].append({"layer": layer, "op": f"conv2d {kh}x{kw}", "weight": f"{o}x{i}x{kh}x{kw}",
                                     "structure": "tucker2", "rank": f"{r_in}->{r_out}", "flops_before": before,
                                     "flops_after": after, "weight_rel_error": rel_error(w, recon)})
            return result

        @staticmethod
        def _budget_ranks(o: int, i: int, kh: int, kw: int, in_hw: int, out_hw: int, budget: float) -> tuple[int, int]:
            """Largest ranks proportional to the channel counts that fit the FLOP budget."""
            best = (0, 0)
            for step in range(100, 0, -1):
                a = step / 100
                r_out, r_in = max(1, math.ceil(a * o)), max(1, math.ceil(a * i))
                if tucker2_flops(i, o, kh, kw, in_hw, out_hw, r_out, r_in) <= budget:
                    best = (r_out, r_in)
                    break
            return best

    return LowRank


def factorize(model: ImportedModel, energy: float | None = None,
              flops_ratio: float | None = None) -> tuple[ImportedModel, dict[str, Any]]:
    """Factorize the dense/matmul/conv layers of ``model``; returns (new model, report).

    Give ``energy`` (fraction of squared singular values kept per layer, e.g. 0.95) or
    ``flops_ratio`` (each layer's FLOPs after / before, e.g. 0.5); neither means 0.95 energy.
    """
    if energy is not None and flops_ratio is not None:
        raise TvmedgeError("factorize: give energy or flops_ratio, not both")
    if energy is None and flops_ratio is None:
        energy = 0.95
    if energy is not None and not 0 < energy <= 1:
        raise TvmedgeError(f"factorize: energy must be in (0, 1], got {energy}")
    if flops_ratio is not None and not 0 < flops_ratio < 1:
        raise TvmedgeError(f"factorize: flops_ratio must be in (0, 1), got {flops_ratio}")
    report: dict[str, Any] = {"rewrite": "lowrank", "energy": energy, "flops_ratio": flops_ratio,
                              "layers": [], "skipped": []}
    cls = _make_mutator(energy, flops_ratio, report)
    new = rewrite_main(model, cls)
    report["model_flops_before"] = graph_flops(model.mod)
    report["model_flops_after"] = graph_flops(new.mod)
    return new, report
