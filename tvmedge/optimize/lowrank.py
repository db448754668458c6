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

import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import TvmedgeError
from ..core.model import ImportedModel, TensorSpec
from ..core.graph import CONV, MATMUL, constant_value, conv_attrs, shape_of
from .data import Dataset

HOOI_SWEEPS = 3
# A rewrite that saves less than this share of a layer's FLOPs is not worth an extra layer.
MIN_SAVING = 0.1
# Latency-aware: a factorization is kept where it measured at least this much faster (a smaller
# gain is within a device's run-to-run noise, and the extra layer costs accuracy).
MIN_MEASURED_SPEEDUP = 1.05
MAX_SAMPLES = 16  # calibration samples whose activations are captured for response fits
MAX_ROWS = 20000  # pixels (rows) used per least-squares fit


# ---------------------------------------------------------------- shared graph helpers
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
    then HOOI sweeps (alternating projections), which only lower the error. Every einsum here
    and in the rewrite passes ``optimize=True``: numpy's default loops over all indices of a
    three-operand contraction at once (~1e11 steps for one ResNet-18 512x512x3x3 kernel).
    """
    w64 = w.astype(np.float64)
    u_in = np.linalg.svd(_unfold(w64, 1), full_matrices=False)[0][:, :r_in]
    u_out = np.linalg.svd(_unfold(w64, 0), full_matrices=False)[0][:, :r_out]
    for _ in range(HOOI_SWEEPS):
        y = np.einsum("oikl,ir->orkl", w64, u_in, optimize=True)
        u_out = np.linalg.svd(_unfold(y, 0), full_matrices=False)[0][:, :r_out]
        y = np.einsum("oikl,or->rikl", w64, u_out, optimize=True)
        u_in = np.linalg.svd(_unfold(y, 1), full_matrices=False)[0][:, :r_in]
    core = np.einsum("oikl,or,is->rskl", w64, u_out, u_in, optimize=True)
    return u_out.astype(np.float32), core.astype(np.float32), u_in.astype(np.float32)


def tucker2_flops(cin: int, cout: int, kh: int, kw: int, in_hw: int, out_hw: int, r_out: int, r_in: int) -> int:
    f = conv_flops(r_in, r_out, kh, kw, out_hw)
    if r_in < cin:
        f += conv_flops(cin, r_in, 1, 1, in_hw)
    if r_out < cout:
        f += conv_flops(r_out, cout, 1, 1, out_hw)
    return f


# ---------------------------------------------------------------- fitting on responses
def torch_conv(x: torch.Tensor, w: np.ndarray, stride: Any = (1, 1), pad: Any = (0, 0, 0, 0),
               dilation: Any = (1, 1), groups: int = 1) -> torch.Tensor:
    """conv2d of NCHW ``x`` with OIHW ``w``; ``pad`` is Relax's (top, left, bottom, right)."""
    top, left, bottom, right = pad
    x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)), None, tuple(stride), 0,
                    tuple(dilation), groups)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] (channels) or [..., C] (features) as [pixels, C]."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) if t.dim() == 4 else t.reshape(-1, t.shape[-1])


def fit_linear(z: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    """Least-squares map W [Cout, Cz] with y ≈ W·z per pixel (1×1 conv) or per row (matmul)."""
    zm, ym = _rows(z).double().numpy(), _rows(y).double().numpy()
    if len(zm) > MAX_ROWS:
        idx = rng.choice(len(zm), MAX_ROWS, replace=False)
        zm, ym = zm[idx], ym[idx]
    reg = 1e-6 * np.trace(zm.T @ zm) / zm.shape[1]
    w = np.linalg.solve(zm.T @ zm + reg * np.eye(zm.shape[1]), zm.T @ ym)  # [Cz, Cout]
    return w.T.astype(np.float32)


def response_pca(y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Principal directions of a layer's output channels (second moment, not centred: the
    layer has no bias to absorb a mean): (root eigenvalues, descending; vectors [C, C])."""
    ym = _rows(y).double()
    lam, vec = torch.linalg.eigh(ym.T @ ym)
    lam, vec = lam.flip(0).clamp_min(0).numpy(), vec.flip(1).numpy()
    return np.sqrt(lam), vec


def response_error(y: torch.Tensor, yh: torch.Tensor) -> float:
    """Relative error of approximate layer outputs ``yh`` against the true ones ``y``."""
    return float((yh - y).norm() / y.norm().clamp_min(1e-12))


# ---------------------------------------------------------------- the rewrite
class _Layer:
    """One weight layer found by the survey pass: what it is and the spectra its ranks come from."""

    def __init__(self, name: str, kind: str, w: np.ndarray, before: int, attrs: dict[str, Any] | None = None,
                 in_hw: int = 0, out_hw: int = 0, rows: int = 0, x: np.ndarray | None = None) -> None:
        self.name, self.kind, self.w, self.before, self.attrs = name, kind, w, before, attrs
        self.in_hw, self.out_hw, self.rows, self.x = in_hw, out_hw, rows, x
        self.in_shape: list[int] = []  # the layer's input and output shapes (for timing it alone)
        self.out_shape: list[int] = []
        self.y: torch.Tensor | None = None  # the layer's output on the calibration inputs
        self.pca: np.ndarray | None = None  # principal output directions (data-aware fit)
        w64 = w.astype(np.float64)
        if x is not None:
            self.y = self.forward(torch.from_numpy(x))
            _, self.pca = response_pca(self.y)
        if kind == "matmul":
            self.s_out = np.linalg.svd(w64, compute_uv=False)
        elif kind == "1x1":
            self.s_out = np.linalg.svd(w64[:, :, 0, 0], compute_uv=False)
        else:
            self.s_out = np.linalg.svd(_unfold(w64, 0), compute_uv=False)
        self.s_in = np.linalg.svd(_unfold(w64, 1), compute_uv=False) if kind == "kxk" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "matmul":
            return x @ torch.from_numpy(self.w)
        a = self.attrs
        return torch_conv(x, self.w, a["strides"], a["padding"], a["dilation"])

    def ranks(self, energy: float) -> tuple[int, int]:
        """(output rank, input rank) keeping ``energy``; the input rank is 0 for SVD layers."""
        r_out = energy_rank(self.s_out, energy)
        return r_out, energy_rank(self.s_in, energy) if self.s_in is not None else 0

    def flops(self, r_out: int, r_in: int) -> int:
        o, i = self.w.shape[0], self.w.shape[1]
        if self.kind == "matmul":
            k, n = self.w.shape
            return 2 * self.rows * r_out * (k + n)
        if self.kind == "1x1":
            return conv_flops(i, r_out, 1, 1, self.out_hw) + conv_flops(r_out, o, 1, 1, self.out_hw)
        return tucker2_flops(i, o, self.w.shape[2], self.w.shape[3], self.in_hw, self.out_hw, r_out, r_in)

    def worth_it(self, r_out: int, r_in: int) -> bool:
        return r_out >= 1 and (self.kind != "kxk" or r_in >= 1) and \
            self.flops(r_out, r_in) <= (1 - MIN_SAVING) * self.before

    def flops_at(self, energy: float) -> int:
        r = self.ranks(energy)
        return self.flops(*r) if self.worth_it(*r) else self.before


def _budget_energy(layers: list[_Layer], ratio: float) -> float:
    """The largest energy kept in every layer for which the layers' FLOPs fit ``ratio`` of theirs."""
    budget = ratio * sum(lay.before for lay in layers)
    lo, hi = 0.0, 1.0
    if sum(lay.flops_at(hi) for lay in layers) <= budget:
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        if sum(lay.flops_at(mid) for lay in layers) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _make_mutator(layers: dict[str, _Layer], plan: dict[str, tuple[int, int]] | None,
                  inputs: dict[str, list[np.ndarray]] | None, report: dict[str, Any]):
    """Without a ``plan``: record each supported layer in ``layers`` and change nothing.
    With one: rewrite the layers it names (layer -> ranks)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    rng = np.random.default_rng(0)

    def const(a: np.ndarray) -> Any:
        return relax.const(tvm.runtime.tensor(np.ascontiguousarray(a, dtype=np.float32)))

    @mutator
    class LowRank(PyExprMutator):
        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.counts: dict[str, int] = {}

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call, relax.Call) or not hasattr(call.op, "name") or call.op.name not in (CONV, MATMUL):
                return call
            op = call.op.name
            self.counts[op] = self.counts.get(op, 0) + 1
            n = self.counts[op]
            name = f"{'conv2d' if op == CONV else 'matmul'}_{n}"
            x = inputs[op][n - 1] if inputs else None
            if plan is None:
                layer = self._survey(call, name, x)
                if layer is not None:
                    layers[name] = layer
                return call
            if name not in plan:
                return call
            return self._rewrite(call, layers[name], *plan[name])

        def _survey(self, call: Any, name: str, x: np.ndarray | None) -> _Layer | None:
            w = constant_value(self, call.args[1])
            if call.op.name == MATMUL:
                if w is None:
                    return None  # activation × activation (attention and the like): not a weight layer
                if w.ndim != 2 or w.dtype != np.float32:
                    report["skipped"].append({"layer": name, "reason": f"weight of shape {list(w.shape)} / {w.dtype} "
                                                                      "(only 2-D float32)"})
                    return None
                out = shape_of(call)
                rows = int(np.prod(out[:-1])) if out else 1
                lay = _Layer(name, "matmul", w, 2 * rows * w.shape[0] * w.shape[1], rows=rows, x=x)
            else:
                attrs = conv_attrs(call)
                why = conv_unsupported(attrs, w)
                if why:
                    report["skipped"].append({"layer": name, "reason": why})
                    return None
                o, i, kh, kw = w.shape
                out, inp = shape_of(call), shape_of(call.args[0])
                lay = _Layer(name, "1x1" if kh == kw == 1 else "kxk", w, conv_flops(i, o, kh, kw, out[2] * out[3]),
                             attrs, inp[2] * inp[3], out[2] * out[3], x=x)
            lay.in_shape, lay.out_shape = list(shape_of(call.args[0]) or []), list(shape_of(call) or [])
            return lay

        def _rewrite(self, call: Any, lay: _Layer, r_out: int, r_in: int) -> Any:
            w, x = lay.w, call.args[0]
            row: dict[str, Any] = {"layer": lay.name, "flops_before": lay.before, "flops_after": lay.flops(r_out, r_in)}
            xt = torch.from_numpy(lay.x) if lay.x is not None else None
            if lay.kind in ("matmul", "1x1"):
                w2 = w if lay.kind == "matmul" else w[:, :, 0, 0].T  # as [in, out]
                if lay.pca is not None:
                    p = lay.pca[:, :r_out]  # principal output directions [out, r]
                    a = (w2.astype(np.float64) @ p).astype(np.float32)  # [in, r]
                    first = xt @ torch.from_numpy(a) if lay.kind == "matmul" else \
                        torch_conv(xt, a.T[:, :, None, None], **_geometry(lay.attrs))
                    b = fit_linear(first, lay.y, rng).T  # [r, out], refitted to the layer's outputs
                else:
                    a, b = truncated_svd(w2, r_out)
                recon = a @ b
                row.update(op="matmul" if lay.kind == "matmul" else "conv2d 1x1", structure="svd", rank=r_out,
                           weight=("x".join(map(str, w.shape))), weight_rel_error=rel_error(w2, recon))
                if xt is not None:
                    approx = first @ torch.from_numpy(b) if lay.kind == "matmul" else \
                        torch_conv(first, b.T[:, :, None, None])
                    row["output_rel_error"] = response_error(lay.y, approx)
                report["layers"].append(row)
                if lay.kind == "matmul":
                    mid = self.builder_.emit(relax.op.matmul(x, const(a)), name_hint="lr")
                    return relax.op.matmul(mid, const(b))
                geo = _geometry(lay.attrs)
                mid = emit_conv(self.builder_, x, a.T[:, :, None, None], geo["stride"], geo["pad"], geo["dilation"])
                return relax.op.nn.conv2d(mid, const(b.T[:, :, None, None]))
            # K×K: 1×1 (input mode) → K×K core → 1×1 (output mode)
            o, i, kh, kw = w.shape
            u_out, core, u_in = tucker2(w, r_out, r_in)
            if lay.pca is not None and r_out < o:
                u_out = lay.pca[:, :r_out].astype(np.float32)
                core = np.einsum("oikl,or,is->rskl", w.astype(np.float64), u_out, u_in,
                                 optimize=True).astype(np.float32)
            recon = np.einsum("rskl,or,is->oikl", core, u_out, u_in, optimize=True)
            geo = _geometry(lay.attrs)
            if r_in < i:
                x = emit_conv(self.builder_, x, u_in.T[:, :, None, None], name="lr")
            else:
                core = np.einsum("rskl,is->rikl", core, u_in, optimize=True)  # full input rank: fold U_in into the core
                u_in = None
            if xt is not None:
                z = torch_conv(xt, u_in.T[:, :, None, None]) if u_in is not None else xt
            if r_out < o:
                x = emit_conv(self.builder_, x, core, geo["stride"], geo["pad"], geo["dilation"], name="lr")
                last = u_out
                if xt is not None:
                    z = torch_conv(z, core, **geo)
                    if lay.pca is not None:
                        last = fit_linear(z, lay.y, rng)  # [O, r_out], refitted to the layer's outputs
                    row["output_rel_error"] = response_error(lay.y, torch_conv(z, last[:, :, None, None]))
                result = relax.op.nn.conv2d(x, const(last[:, :, None, None]))
            else:
                core = np.einsum("rskl,or->oskl", core, u_out, optimize=True)  # full output rank: fold U_out in
                if xt is not None:
                    row["output_rel_error"] = response_error(lay.y, torch_conv(z, core, **geo))
                result = relax.op.nn.conv2d(x, const(core), strides=geo["stride"], padding=geo["pad"],
                                            dilation=geo["dilation"])
            row.update(op=f"conv2d {kh}x{kw}", weight=f"{o}x{i}x{kh}x{kw}", structure="tucker2",
                       rank=f"{r_in}->{r_out}", weight_rel_error=rel_error(w, recon))
            report["layers"].append(row)
            return result

    return LowRank


def _geometry(attrs: dict[str, Any]) -> dict[str, Any]:
    return {"stride": attrs["strides"], "pad": attrs["padding"], "dilation": attrs["dilation"]}


def single_layer(call_of_x: Any, in_shape: list[int], out_shape: list[int], name: str) -> ImportedModel:
    """An ImportedModel whose ``main(x)`` is one op (``call_of_x(x)`` builds it)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(in_shape), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(call_of_x(x))
        bb.emit_func_output(out)
    return ImportedModel(bb.get(), [TensorSpec("x", list(in_shape), "float32")],
                         [TensorSpec("y", list(out_shape), "float32")], "relax", name, "")


def layer_models(lay: _Layer, ranks: tuple[int, int]) -> tuple[ImportedModel, ImportedModel]:
    """The layer alone, dense and factorized with ``ranks`` (weights-only factors: the timing
    depends on the shapes, not on the fit)."""
    import copy

    from tvm import relax

    w = relax.const(np.ascontiguousarray(lay.w))
    if lay.kind == "matmul":
        op = lambda x: relax.op.matmul(x, w)  # noqa: E731
    else:
        a = lay.attrs
        op = lambda x: relax.op.nn.conv2d(x, w, strides=a["strides"], padding=a["padding"],  # noqa: E731
                                          dilation=a["dilation"])
    dense = single_layer(op, lay.in_shape, lay.out_shape, f"{lay.name} dense")
    plain = copy.copy(lay)
    plain.x = plain.y = plain.pca = None
    name = f"{'matmul' if lay.kind == 'matmul' else 'conv2d'}_1"  # the only layer of the one-layer model
    factored = rewrite_main(dense, _make_mutator({name: plain}, {name: ranks}, None, {"layers": [], "skipped": []}))
    return dense, factored


def _measure(survey: dict[str, _Layer], plan: dict[str, tuple[int, int]], timer: Any, report: dict[str, Any],
             progress: Callable[[str], Any] | None) -> dict[str, tuple[int, int]]:
    """The plan without the layers whose factorization did not run faster on ``timer``'s device;
    one row per measured layer in ``report["measured"]``."""
    kept: dict[str, tuple[int, int]] = {}
    report["latency_aware"] = timer.where
    report["measured"] = []
    for k, (name, ranks) in enumerate(plan.items()):
        lay = survey[name]
        if progress:
            progress(f"timing {name} dense and factorized ({k + 1}/{len(plan)}) on {timer.where['device']}")
        dense_ms, factored_ms = timer.compare(*layer_models(lay, ranks))
        predicted = lay.before / max(lay.flops(*ranks), 1)
        measured = round(dense_ms / factored_ms, 3) if factored_ms > 0 else 0.0  # decided on what is reported
        faster = measured >= MIN_MEASURED_SPEEDUP
        report["measured"].append({"layer": name, "ranks": list(ranks), "dense_ms": float(f"{dense_ms:.4g}"),
                                   "factored_ms": float(f"{factored_ms:.4g}"), "predicted_speedup": round(predicted, 3),
                                   "measured_speedup": measured, "kept": faster})
        if faster:
            kept[name] = ranks
        else:
            report["skipped"].append({"layer": name, "reason": f"factorized measured {measured:.2f}x on "
                                      f"{timer.where['device']} ({factored_ms:.4f} vs {dense_ms:.4f} ms dense; "
                                      f"needs {MIN_MEASURED_SPEEDUP:.2f}x; FLOPs predicted {predicted:.2f}x)"})
    return kept


def factorize(model: ImportedModel, energy: float | None = None, flops_ratio: float | None = None,
              calib: Dataset | None = None, timer: Any = None,
              progress: Callable[[str], Any] | None = None) -> tuple[ImportedModel, dict[str, Any]]:
    """Factorize the dense/matmul/conv layers of ``model``; returns (new model, report).

    Give ``energy`` (fraction of squared singular values kept per layer, e.g. 0.95) or
    ``flops_ratio`` (FLOPs of the weight layers after / before, e.g. 0.5: one energy level
    for all layers, the highest that fits, so each layer's rank follows its own spectrum);
    neither means 0.95 energy. With ``calib`` the output ranks come from the spectrum of
    each layer's responses to the calibration data and the last factor is refitted to them
    (least squares); without it, from the weights alone. With a ``timer``
    (:class:`~tvmedge.tune.layer_timing.LayerTimer`: ``where`` and ``compare(dense, factored)``
    -> ms) each planned layer is timed alone on
    its device, dense and factorized, and stays dense unless the factorization measured
    faster (``report["measured"]``: predicted vs measured speedups).
    """
    if energy is not None and flops_ratio is not None:
        raise TvmedgeError("factorize: give energy or flops_ratio, not both")
    if energy is None and flops_ratio is None:
        energy = 0.95
    if energy is not None and not 0 < energy <= 1:
        raise TvmedgeError(f"factorize: energy must be in (0, 1], got {energy}")
    if flops_ratio is not None and not 0 < flops_ratio < 1:
        raise TvmedgeError(f"factorize: flops_ratio must be in (0, 1), got {flops_ratio}")
    t0 = time.time()
    report: dict[str, Any] = {"rewrite": "lowrank", "energy": energy, "flops_ratio": flops_ratio,
                              "fit": "responses" if calib is not None else "weights", "layers": [], "skipped": []}
    inputs = None
    if calib is not None:
        from .finetune import capture_inputs

        if not len(calib):
            raise TvmedgeError("factorize: the calibration set is empty")
        inputs = capture_inputs(model, calib, (CONV, MATMUL), MAX_SAMPLES)
    survey: dict[str, _Layer] = {}
    rewrite_main(model, _make_mutator(survey, None, inputs, report))
    if flops_ratio is not None:
        energy = _budget_energy(list(survey.values()), flops_ratio)
        report["energy"] = round(energy, 6)
    plan: dict[str, tuple[int, int]] = {}
    for name, lay in survey.items():
        r = lay.ranks(energy)
        if lay.worth_it(*r):
            plan[name] = r
        else:
            what = f"rank {r[0]}" if lay.kind != "kxk" else f"Tucker ranks {r[1]}->{r[0]}"
            report["skipped"].append({"layer": name, "reason": f"{what} of {'x'.join(map(str, lay.w.shape))} would "
                                      f"not lower FLOPs by {MIN_SAVING:.0%} ({lay.flops(*r)} vs {lay.before})"})
    if timer is not None and plan:
        plan = _measure(survey, plan, timer, report, progress)
    new = rewrite_main(model, _make_mutator(survey, plan, inputs, report))
    report["model_flops_before"] = graph_flops(model.mod)
    report["model_flops_after"] = graph_flops(new.mod)
    report["seconds"] = round(time.time() - t0, 1)
    return new, report
