"""Run a (rewritten) model on this host and check it against the original model.

``HostRunner`` compiles a Relax module for this machine (with the default schedules, no
tuning: this is for numerics and accuracy) and runs it on numpy inputs; ``compare`` gives the max absolute
and relative error between two models over a data set; ``score`` gives the task metric
(top-1 accuracy for class logits, mean IoU for per-pixel class scores).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..core.errors import TvmedgeError
from ..core.model import ImportedModel
from ..core.vm import ModelVM
from ..core.metrics import errors, mean_iou, top1
from .data import Dataset


class HostRunner:
    """The model compiled for this host; call it with ``{input name: array}``."""

    def __init__(self, model: ImportedModel) -> None:
        import tvm

        from ..lower.pipeline import build
        from ..target import resolve

        self.model = model
        # The default schedules: the same numerics as the naive build (float reassociation
        # only) at a fraction of the time, which matters over calibration and evaluation sets.
        ex, _ = build(model.mod, resolve("host").target)
        self.vm = ModelVM(ex, tvm.cpu(0), [s.name for s in model.inputs])

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.vm(inputs)


def nonfinite_weights(mod) -> int:
    """How many NaN/Inf values the module's float constants hold (ReLU's max() hides them in outputs)."""
    import tvm
    from tvm import relax

    count = 0

    def visit(expr) -> None:
        nonlocal count
        if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr.value, "numpy"):  # not IntImm
            value = expr.value.numpy()
            if np.issubdtype(value.dtype, np.floating):
                count += int(np.count_nonzero(~np.isfinite(value)))

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return count


def outputs_over(run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], data: Dataset,
                 limit: int | None = None) -> list[np.ndarray]:
    """Each output concatenated over the data set (first output axis = samples)."""
    samples = data.samples[:limit] if limit else data.samples
    per = [run(s) for s in samples]
    return [np.concatenate([p[i] for p in per]) for i in range(len(per[0]))]


def score(outputs: list[np.ndarray], data: Dataset) -> float | None:
    """The task metric of the first output on ``data`` (None when it has no labels)."""
    if data.labels is None:
        return None
    pred = outputs[0]
    labels = data.labels[: pred.shape[0]]
    if data.metric == "accuracy":
        return top1(pred, labels)
    return mean_iou(pred.argmax(axis=1), labels, data.num_classes or int(pred.shape[1]))


def check(original: ImportedModel, rewritten: ImportedModel, data: Dataset, eval_data: Dataset | None = None,
          limit: int = 64, ref_runner: HostRunner | None = None) -> dict[str, Any]:
    """Numerics of ``rewritten`` against ``original`` on ``data`` and, given ``eval_data``, both metrics."""
    bad_weights = nonfinite_weights(original.mod)
    if bad_weights:
        raise TvmedgeError(f"the original model has {bad_weights} NaN/Inf weight values: nothing to check a rewrite against")
    ref_run = ref_runner or HostRunner(original)
    new_run = HostRunner(rewritten)
    ref_out, new_out = outputs_over(ref_run, data, limit), outputs_over(new_run, data, limit)
    # NaN compares false with everything: max() would report an error of 0 for a NaN model.
    for which, outs in (("original", ref_out), ("rewritten", new_out)):
        bad = sum(int(np.count_nonzero(~np.isfinite(o))) for o in outs if np.issubdtype(o.dtype, np.floating))
        if bad:
            raise TvmedgeError(f"the {which} model gives {bad} NaN/Inf output values on the check data"
                               + (" (its weights or the data are not finite)" if which == "original" else ""))
    out: dict[str, Any] = errors(ref_out, new_out)
    out["samples"] = min(limit, len(data))
    if eval_data is not None and eval_data.labels is not None:
        before = score(outputs_over(ref_run, eval_data), eval_data)
        after = score(outputs_over(new_run, eval_data), eval_data)
        out.update(metric=eval_data.metric, before=before, after=after,
                   drop_points=None if before is None else round(100 * (before - after), 3))
    return out
