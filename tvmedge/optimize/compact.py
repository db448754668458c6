"""Compact-filter rewrites of K×K convolutions, fitted to the layer's real responses.

Two structures replace a dense K×K convolution (groups 1, NCHW/OIHW, float32):

* ``separable`` - (K×1) Cin→M then (1×K) M→Cout; initialised from an SVD of the kernel
  reshaped to [(Cin, kh), (Cout, kw)];
* ``dw+pw``     - depthwise K×K with a depth multiplier d (Cin→d·Cin) then pointwise 1×1
  d·Cin→Cout; initialised from a rank-d SVD of each input channel's [Cout, K·K] slice.

The second layer of each structure is then fitted by least squares to the original
layer's outputs on the calibration data: the layer's input activations are captured by
running the model on the calibration samples (the Relax graph interpreted in PyTorch,
:func:`tvmedge.optimize.finetune.capture_inputs`; it matches the compiled model to ~1e-5), the first layer
is applied to them, and the second layer solves min ||Z·W2 − Y||. For each layer the
cheapest candidate whose relative output error is within ``max_error`` and whose FLOPs are
lower than the original's is kept; the others are listed in ``skipped``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.model import ImportedModel
from ..core.progress import Reporter
from .data import Dataset
from ..core.graph import CONV, constant_value, conv_attrs, shape_of
from .lowrank import MAX_ROWS, MAX_SAMPLES, conv_flops, conv_unsupported, emit_conv, fit_linear, graph_flops, \
    rewrite_main, response_error, torch_conv



def _fit_row_conv(z: torch.Tensor, y: torch.Tensor, kw: int, stride_w: int, pad_lr: tuple[int, int],
                  dil_w: int, rng: np.random.Generator) -> np.ndarray:
    """Least-squares (1×kw) conv weight [Cout, M, 1, kw] mapping z to y."""
    zp = F.pad(z, (pad_lr[0], pad_lr[1], 0, 0))
    cols = F.unfold(zp, (1, kw), dilation=(1, dil_w), stride=(1, stride_w))  # [N, M*kw, L]
    zm = cols.permute(0, 2, 1).reshape(-1, cols.shape[1]).double().numpy()
    ym = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).double().numpy()
    if len(zm) > MAX_ROWS:
        idx = rng.choice(len(zm), MAX_ROWS, replace=False)
        zm, ym = zm[idx], ym[idx]
    reg = 1e-6 * np.trace(zm.T @ zm) / zm.shape[1]
    w = np.linalg.solve(zm.T @ zm + reg * np.eye(zm.shape[1]), zm.T @ ym)  # [M*kw, Cout]
    return w.T.reshape(y.shape[1], z.shape[1], 1, kw).astype(np.float32)


def _candidates(w: np.ndarray, x: np.ndarray, attrs: dict[str, Any], out_hw: tuple[int, int],
                max_error: float, rng: np.random.Generator) -> tuple[list[dict[str, Any]], int]:
    """All fitted candidates for one layer (cheapest first) and the layer's FLOPs."""
    o, i, kh, kw = w.shape
    sh, sw = attrs["strides"]
    dh, dw_ = attrs["dilation"]
    top, left, bottom, right = attrs["padding"]
    ho, wo = out_hw
    xt = torch.from_numpy(x)
    y = torch_conv(xt, w, (sh, sw), (top, left, bottom, right), (dh, dw_))
    before = conv_flops(i, o, kh, kw, ho * wo)
    win = x.shape[3]
    out: list[dict[str, Any]] = []
    # separable: (kh×1) i→m, stride (sh,1), then (1×kw) m→o, stride (1,sw)
    mat = w.transpose(1, 2, 0, 3).reshape(i * kh, o * kw).astype(np.float64)
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    for m in sorted({max(1, int(f * min(i, o))) for f in (0.25, 0.5, 0.75, 1.0)} | {min(i * kh, o * kw)}):
        m = min(m, len(s))
        flops = conv_flops(i, m, kh, 1, ho * win) + conv_flops(m, o, 1, kw, ho * wo)
        if flops >= before:
            continue
        w1 = (u[:, :m] * np.sqrt(s[:m])).reshape(i, kh, m).transpose(2, 0, 1)[:, :, :, None]  # [m,i,kh,1]
        z = torch_conv(xt, w1, (sh, 1), (top, 0, bottom, 0), (dh, 1))
        w2 = _fit_row_conv(z, y, kw, sw, (left, right), dw_, rng)
        yh = torch_conv(z, w2, (1, sw), (0, left, 0, right), (1, dw_))
        out.append({"structure": f"separable {kh}x1·1x{kw}", "width": m, "flops": flops, "error": response_error(y, yh),
                    "layers": [(w1.astype(np.float32), (sh, 1), (top, 0, bottom, 0), (dh, 1), 1),
                               (w2, (1, sw), (0, left, 0, right), (1, dw_), 1)]})
    # depthwise (multiplier d) + pointwise
    for d in (1, 2, 4):
        flops = conv_flops(i, i * d, kh, kw, ho * wo, groups=i) + conv_flops(i * d, o, 1, 1, ho * wo)
        if flops >= before or d > min(o, kh * kw):
            continue
        dw = np.zeros((i * d, 1, kh, kw), np.float32)
        for c in range(i):
            uu, ss, vv = np.linalg.svd(w[:, c].reshape(o, kh * kw).astype(np.float64), full_matrices=False)
            dw[c * d:(c + 1) * d, 0] = (vv[:d] * np.sqrt(ss[:d, None])).reshape(d, kh, kw)
        z = torch_conv(xt, dw, (sh, sw), (top, left, bottom, right), (dh, dw_), groups=i)
        pw = fit_linear(z, y, rng)
        yh = F.conv2d(z, torch.from_numpy(pw[:, :, None, None]))
        out.append({"structure": f"depthwise {kh}x{kw} (x{d}) + pointwise", "width": i * d, "flops": flops,
                    "error": response_error(y, yh),
                    "layers": [(dw, (sh, sw), (top, left, bottom, right), (dh, dw_), i),
                               (pw[:, :, None, None], (1, 1), (0, 0, 0, 0), (1, 1), 1)]})
    out.sort(key=lambda c: c["flops"])
    return out, before


def compact(model: ImportedModel, calib: Dataset, max_error: float = 0.05,
            progress: bool | Reporter = True) -> tuple[ImportedModel, dict[str, Any]]:
    """Replace K×K convolutions by fitted separable or depthwise+pointwise pairs where the
    layer's relative output error stays within ``max_error``; returns (new model, report)."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from ..core.errors import TvmedgeError

    progress = Reporter.of(progress)
    if calib is None or not len(calib):
        raise TvmedgeError("compact needs calibration data (--calib)")
    if len(model.inputs) != 1:
        raise TvmedgeError("compact: only single-input models are supported")
    t0 = time.time()
    from .finetune import capture_inputs

    inputs = capture_inputs(model, calib, (CONV,), MAX_SAMPLES)[CONV]
    report: dict[str, Any] = {"rewrite": "compact", "max_error": max_error, "layers": [], "skipped": []}
    rng = np.random.default_rng(0)

    @mutator
    class Compact(PyExprMutator):
        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.n = 0

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call, relax.Call) or getattr(call.op, "name", None) != CONV:
                return call
            self.n += 1
            layer = f"conv2d_{self.n}"
            attrs = conv_attrs(call)
            w = constant_value(self, call.args[1])
            why = conv_unsupported(attrs, w)
            if why is None and w.shape[2] == w.shape[3] == 1:
                why = "1x1 convolution (nothing to make compact)"
            if why:
                report["skipped"].append({"layer": layer, "reason": why})
                return call
            out = shape_of(call)
            cands, before = _candidates(w, inputs[self.n - 1], attrs, (out[2], out[3]), max_error, rng)
            ok = [c for c in cands if c["error"] <= max_error]
            if not ok:
                best = min(cands, key=lambda c: c["error"]) if cands else None
                reason = ("no structure with fewer FLOPs" if best is None else
                          f"best candidate {best['structure']} (width {best['width']}) has output error "
                          f"{best['error']:.3g} > {max_error}")
                report["skipped"].append({"layer": layer, "reason": reason})  # listed once, in the report
                return call
            c = ok[0]
            x = call.args[0]
            (w1, s1, p1, d1, g1), (w2, s2, p2, d2, g2) = c["layers"]
            x = emit_conv(self.builder_, x, w1, s1, p1, d1, g1, name="cf")
            report["layers"].append({"layer": layer, "weight": "x".join(map(str, w.shape)), "structure": c["structure"],
                                     "width": c["width"], "flops_before": before, "flops_after": c["flops"],
                                     "output_error": c["error"]})
            progress.line(f"compact: {layer} -> {c['structure']} width {c['width']}: FLOPs {before} -> {c['flops']}, "
                          f"output error {c['error']:.3g}")
            import tvm

            return relax.op.nn.conv2d(x, relax.const(tvm.runtime.tensor(np.ascontiguousarray(w2))), strides=list(s2),
                                      padding=list(p2), dilation=list(d2), groups=g2)

    new = rewrite_main(model, Compact)
    report["model_flops_before"] = graph_flops(model.mod)
    report["model_flops_after"] = graph_flops(new.mod)
    report["calib_samples"] = min(MAX_SAMPLES, len(calib))
    report["seconds"] = round(time.time() - t0, 1)
    return new, report
