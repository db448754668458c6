"""int8 post-training quantization on the Relax graph (real int8 ops, int32 accumulation).

:func:`quantize` rewrites every ``R.nn.conv2d`` and every ``R.matmul`` with a constant
weight into

    xq  = R.quantize(x, scale_x, zp_x, out_dtype="uint8")        # per-tensor activation
    acc = R.nn.conv2d(xq, W_int8, out_dtype="int32")              # or R.matmul(xq, W_int8)
    acc = acc + bias_int32                                        # bias and zero-point term
    y   = R.astype(acc, "float32") * (scale_x * scale_w[c])      # dequantize, per channel

so the arithmetic is int8 x int8 -> int32 and the weights are stored as int8 constants
(about 4x smaller). After ``FuseOps`` the dequantize epilogue fuses into the conv/matmul
kernel and the quantize prologue into the producer's elementwise chain.

Choices:

* **weights: symmetric per output channel, int8 in [-127, 127]** - per-channel scales keep
  layers with uneven filter norms (folded BatchNorm) accurate; symmetric means no weight
  zero point, so no data-dependent correction term.
* **activations: per-tensor, asymmetric uint8 with a zero point** - ``vpdpbusd`` (x86
  AVX-512 VNNI / AVX-VNNI, the only int8 dot product on this host) multiplies *unsigned* 8-bit
  by *signed* 8-bit, so u8 activations x s8 weights is the pairing it can tensorize (TVM's
  shipped VNNI intrinsic is ``u8i8i32``; int8 x int8 gets no tensorized schedule). Post-ReLU
  tensors get zero point 0, so nothing is lost to the sign bit. The zero point of a tensor
  with negative values is handled exactly: the term ``zp * sum(W[c])`` is folded into the
  int32 bias, and a padded conv pads with ``zp`` explicitly (``R.nn.pad``) so that the
  padding still stands for 0.0. AArch64 ``sdot`` is s8 x s8: its kernels
  (:mod:`tvmedge.lower.int8_dot`) read ``x - 128`` and add ``128 * sum(W[c])`` back.
* **bias folded into int32** at scale ``scale_x * scale_w[c]`` when the conv/matmul output
  feeds only a per-channel constant ``add``.

Calibration runs an instrumented copy of the model (the input of every layer to quantize
added as an output of ``main``), compiled for this host, over the calibration samples, and
feeds each layer's observer (:mod:`tvmedge.optimize.observers`).

Accuracy control (``eval_data`` + ``max_drop``, in points): while the metric drop exceeds
``max_drop``, layers go back to float one at a time, the most sensitive first. Sensitivity
is measured NNCF-style: the metric (then the relative output error, as a tie-breaker) of
the quantized model with that single layer back in float.

Skipped and listed, never silently wrong: convs that are not NCHW/OIHW, non-float inputs,
non-constant ("dynamic") weights, batched matmuls with a constant weight of rank > 2.

The graph side (finding layers, emitting int8 ops, QDQ folding) is
:mod:`tvmedge.optimize.int8_graph`; this module calibrates, quantizes and controls accuracy.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..core.errors import TvmedgeError
from ..core.model import ImportedModel
from ..core.progress import Reporter
from .data import Dataset
from .int8_graph import Layer, const_bytes, find_layers, fold_qdq, has_qdq, rewrite_layers
from .observers import PerChannelWeightObserver, make_observer


# ---------------------------------------------------------------- calibration and accuracy
def _check_calib(calib: Dataset | None, model: ImportedModel) -> None:
    if calib is None or len(calib) == 0:
        raise TvmedgeError("int8 quantization needs calibration data, and the calibration set is empty")
    for s in calib.samples:
        for spec in model.inputs:
            a = s.get(spec.name)
            if a is None:
                raise TvmedgeError(f"calibration sample lacks model input '{spec.name}'")
            if list(a.shape) != list(spec.shape):
                raise TvmedgeError(f"calibration input '{spec.name}' has shape {list(a.shape)}, "
                                   f"the model expects {spec.shape}")


def calibrate(model: ImportedModel, layers: list[Layer], calib: Dataset, observer: str = "percentile",
              progress: bool | Reporter = True) -> None:
    """Run the calibration samples through an instrumented copy; sets each layer's activation qparams."""
    from .check import HostRunner

    _check_calib(calib, model)
    inst = rewrite_layers(model, layers, observe=True)
    runner = HostRunner(inst)
    observers = [make_observer(observer) for _ in layers]
    with Reporter.of(progress).bar(f"calibrating int8 ({observer})", len(calib)) as bar:
        for sample in calib.samples:
            outs = runner(sample)
            for o, obs in zip(outs, observers):
                if not np.all(np.isfinite(o)):
                    raise TvmedgeError("calibration produced non-finite activations (bad calibration data?)")
                obs.observe(o)
            bar.advance()
    for layer, obs in zip(layers, observers):
        layer.act_range = tuple(float(v) for v in obs.range())
        layer.act_scale, layer.act_zp = obs.calculate_qparams()


def _quantize_weights(layer: Layer) -> None:
    axis = 0 if layer.op == "conv2d" else 1
    layer.weight_q, layer.weight_scale = PerChannelWeightObserver(axis).quantize(layer.weight)


def _layer_report(layer: Layer) -> dict[str, Any]:
    axis = 0 if layer.op == "conv2d" else 1
    shape = [1] * layer.weight.ndim
    shape[axis] = -1
    deq = layer.weight_q.astype(np.float64) * layer.weight_scale.reshape(shape)
    werr = float(np.linalg.norm(deq - layer.weight) / max(np.linalg.norm(layer.weight), 1e-12))
    return {"layer": layer.name, "op": layer.op, "weight_shape": "x".join(map(str, layer.weight.shape)),
            "act_scale": layer.act_scale, "act_zero_point": layer.act_zp,
            "act_range": [round(v, 6) for v in layer.act_range], "weight_bits": 8,
            "weight_rel_err": werr, "bias_folded": layer.bias is not None}


class _Evaluator:
    """Metric and output error of candidate models on the evaluation set, against a reference."""

    def __init__(self, reference: ImportedModel, data: Dataset) -> None:
        from .check import HostRunner, outputs_over, score

        self.data = data
        self.ref_out = outputs_over(HostRunner(reference), data)
        self.before = score(self.ref_out, data)
        if self.before is None:
            raise TvmedgeError("accuracy control (max_drop) needs labelled evaluation data")

    def __call__(self, model: ImportedModel) -> tuple[float, float]:
        from .check import HostRunner, outputs_over, score

        out = outputs_over(HostRunner(model), self.data)
        ref = self.ref_out[0].astype(np.float64)
        err = float(np.linalg.norm(out[0] - ref) / max(np.linalg.norm(ref), 1e-12))
        return score(out, self.data), err

    def drop(self, metric: float) -> float:
        return 100.0 * (self.before - metric)


def quantize(model: ImportedModel, calib: Dataset, observer: str = "percentile", eval_data: Dataset | None = None,
             max_drop: float | None = None, reference: ImportedModel | None = None,
             progress: bool | Reporter = True) -> tuple[ImportedModel, dict]:
    """int8 post-training quantization of ``model``'s conv2d / matmul layers (see module doc)."""
    t0 = time.time()
    if observer not in ("minmax", "percentile", "kl"):
        raise TvmedgeError(f"unknown observer '{observer}' (minmax, percentile or kl)")
    report: dict[str, Any] = {"rewrite": "int8", "observer": observer, "layers": [], "skipped": [],
                              "fallback_float": []}
    _check_calib(calib, model)
    if has_qdq(model):
        model, qrep = fold_qdq(model)
        report["qdq_fold"] = {"layers": len(qrep["layers"]), "skipped": qrep["skipped"]}
    float_model = model
    layers = find_layers(model)
    report["skipped"] = [{"layer": layer.name, "reason": layer.skip} for layer in layers if layer.skip]
    active = [layer for layer in layers if not layer.skip]
    report["bytes_weights_before"] = const_bytes(model)
    if not active:
        report["bytes_weights_after"] = report["bytes_weights_before"]
        return model, report
    calibrate(model, active, calib, observer, progress)
    report["calib_samples"] = len(calib)
    for layer in active:
        _quantize_weights(layer)
    qmodel = rewrite_layers(model, active)

    if eval_data is not None and (max_drop is not None or eval_data.labels is not None):
        ev = _Evaluator(reference or float_model, eval_data)
        metric, err = ev(qmodel)
        report.update(metric=eval_data.metric, before=ev.before, after_all_int8=metric,
                      drop_points_all_int8=round(ev.drop(metric), 3), output_rel_err_all_int8=err)
        if max_drop is not None and ev.drop(metric) > max_drop:
            qmodel, metric = _fall_back(model, active, ev, metric, err, max_drop, report, progress)
        report.update(after=metric, drop_points=round(ev.drop(metric), 3))
    back = {f["layer"] for f in report["fallback_float"]}
    report["layers"] = [_layer_report(layer) for layer in active if layer.name not in back]
    report["bytes_weights_after"] = const_bytes(qmodel)
    report["seconds"] = round(time.time() - t0, 2)
    qmodel.rewrites = list(model.rewrites) + [{"rewrite": "int8", "observer": observer,
                                               "layers": len(report["layers"])}]
    return qmodel, report


def _fall_back(model: ImportedModel, active: list[Layer], ev: _Evaluator, metric: float, err: float,
               max_drop: float, report: dict[str, Any], progress: bool | Reporter) -> tuple[ImportedModel, float]:
    """Put the most sensitive layers back to float until the drop is within ``max_drop``."""
    sens = []
    with Reporter.of(progress).bar("int8 sensitivity per layer", len(active)) as bar:
        for layer in active:
            m, e = ev(rewrite_layers(model, [x for x in active if x is not layer]))
            # Gain in metric points from keeping this layer float; output error breaks ties.
            sens.append((100.0 * (m - metric), err - e, layer))
            bar.advance()
    sens.sort(key=lambda t: (t[0], t[1]), reverse=True)
    report["sensitivity"] = [{"layer": lay.name, "gain_points": round(g, 3), "err_reduction": round(d, 5)}
                             for g, d, lay in sens]
    back: list[Layer] = []
    qmodel = None
    for gain, _, layer in sens:
        back.append(layer)
        keep = [x for x in active if x not in back]
        qmodel = rewrite_layers(model, keep) if keep else model
        metric, err = ev(qmodel)
        report["fallback_float"].append({"layer": layer.name, "op": layer.op,
                                         "reason": f"sensitivity {gain:+.2f} points alone",
                                         "drop_points_after": round(ev.drop(metric), 3)})
        if ev.drop(metric) <= max_drop:
            break
    else:
        report["max_drop_met"] = ev.drop(metric) <= max_drop
    report.setdefault("max_drop_met", True)
    return qmodel, metric
