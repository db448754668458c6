"""Numbers that compare models: output errors between two runs, and task metrics (top-1
accuracy for class logits, mean IoU for per-pixel classes). Plain numpy; no tvmedge imports.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def errors(ref: Iterable[np.ndarray], new: Iterable[np.ndarray]) -> dict[str, float]:
    """Max absolute error, and max relative error (to the reference's largest magnitude)."""
    abs_err, rel_err = 0.0, 0.0
    for r, n in zip(ref, new):
        d = float(np.abs(r.astype(np.float64) - n.astype(np.float64)).max()) if r.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        abs_err = max(abs_err, d)
        rel_err = max(rel_err, d / scale if scale else d)
    return {"max_abs": abs_err, "max_rel": rel_err}


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose highest score is the label (first axis = samples)."""
    return float((logits.reshape(logits.shape[0], -1).argmax(axis=1) == labels).mean())


def mean_iou(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean intersection-over-union of predicted and true class maps, over the classes present."""
    ious = []
    for c in range(num_classes):
        inter = np.logical_and(pred == c, labels == c).sum()
        union = np.logical_or(pred == c, labels == c).sum()
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)) if ious else 0.0
