"""Calibration and evaluation data for the compression rewrites.

A data spec is one of:

* ``digits`` - scikit-learn's handwritten digits (held-out split; the calibration set is
  the first part of the training split), for ``digits-cnn``;
* ``shapes`` - generated segmentation scenes (coloured shapes on textured backgrounds),
  for the ``shapes-seg`` zoo model;
* a ``.npz`` - one array per model input (first axis: samples; a single array is taken as
  the first input), and for evaluation a ``labels`` array;
* a folder of images (``.png``/``.jpg``) - resized to the input's H×W, scaled to [0, 1]
  and normalized with the ImageNet mean/std (calibration only: no labels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import TvmedgeError
from ..core.model import ImportedModel, TensorSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass
class Dataset:
    """Samples shaped exactly like the model's inputs (one dict per run of the model)."""

    name: str
    samples: list[dict[str, np.ndarray]]
    labels: np.ndarray | None = None  # one label (or label map) per sample
    metric: str | None = None  # "accuracy" (class logits) or "miou" (per-pixel class scores)
    num_classes: int | None = None

    def __len__(self) -> int:
        return len(self.samples)


def _batched(arrays: dict[str, np.ndarray], specs: list[TensorSpec], what: str) -> list[dict[str, np.ndarray]]:
    """Cut per-input sample arrays into runs of the model's (static) batch size."""
    n = None
    for spec in specs:
        a = arrays[spec.name]
        per = list(spec.shape[1:])
        if list(a.shape[1:]) != per:
            raise TvmedgeError(f"{what}: input '{spec.name}' samples have shape {list(a.shape[1:])}, "
                               f"the model expects {per} (model input {spec.shape})")
        n = a.shape[0] if n is None else min(n, a.shape[0])
    batch = specs[0].shape[0] if specs[0].shape else 1
    if not n or n < batch:
        raise TvmedgeError(f"{what} is empty (needs at least {batch} sample(s))")
    out = []
    for start in range(0, n - batch + 1, batch):
        out.append({s.name: np.ascontiguousarray(arrays[s.name][start:start + batch]).astype(s.dtype)
                    for s in specs})
    return out


def _from_npz(path: Path, model: ImportedModel, what: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    try:
        z = np.load(path)
        arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise TvmedgeError(f"cannot read {what} {path.name}: {e}") from None
    labels = arrays.pop("labels", None)
    names = [s.name for s in model.inputs]
    if not set(names) <= set(arrays):
        if len(arrays) == 1 and len(names) == 1:
            arrays = {names[0]: next(iter(arrays.values()))}
        else:
            raise TvmedgeError(f"{what} {path.name} has arrays {sorted(arrays)}; the model's inputs are {names}")
    return arrays, labels


def _from_images(folder: Path, model: ImportedModel, what: str, limit: int) -> dict[str, np.ndarray]:
    from PIL import Image

    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        raise TvmedgeError(f"{what}: a folder of images needs a model with one NCHW input")
    _, c, h, w = model.inputs[0].shape
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise TvmedgeError(f"{what}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    imgs = []
    for p in files:
        im = Image.open(p).convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32) / 255.0
        a = (a - IMAGENET_MEAN) / IMAGENET_STD if c == 3 else a[..., None]
        imgs.append(a.transpose(2, 0, 1))
    return {model.inputs[0].name: np.stack(imgs).astype(np.float32)}


def _builtin(name: str, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, str, int]:
    """``split``: calib, eval, or train (for distillation; digits: the same images as calib)."""
    if name == "digits":
        from ..zoo.digits import load_split

        xtr, ytr, xte, yte = load_split()
        return (xtr, ytr, "accuracy", 10) if split in ("calib", "train") else (xte, yte, "accuracy", 10)
    if name == "shapes":
        try:
            from ..zoo.shapes import dataset
        except ImportError:
            raise TvmedgeError("the 'shapes' data set needs tvmedge.zoo.shapes") from None
        x, y = dataset(split, limit if split == "train" else None)  # train: 6000 scenes unless limited
        return x, y, "miou", int(y.max()) + 1
    raise KeyError(name)


BUILTIN = ("digits", "shapes")


def load(spec: str | os.PathLike, model: ImportedModel, split: str = "calib", limit: int | None = None) -> Dataset:
    """The data set named by ``spec`` shaped for ``model``; ``split`` is ``calib``, ``eval`` or ``train``."""
    what = "calibration data" if split == "calib" else "evaluation data"
    spec_s = str(spec)
    labels = None
    metric = None
    classes = None
    if spec_s in BUILTIN:
        x, labels, metric, classes = _builtin(spec_s, split, limit)
        if len(model.inputs) != 1:
            raise TvmedgeError(f"built-in data '{spec_s}' fits single-input models only")
        arrays = {model.inputs[0].name: x}
    else:
        path = Path(spec_s)
        if not path.exists():
            raise TvmedgeError(f"{what} not found: {spec_s} (give a .npz, a folder of images, "
                               f"or one of {', '.join(BUILTIN)})")
        if path.is_dir():
            if split == "eval":
                raise TvmedgeError(f"{what}: a folder of images has no labels; give a .npz with a 'labels' array")
            arrays = _from_images(path, model, what, limit or 1 << 30)
        else:
            arrays, labels = _from_npz(path, model, what)
    if limit is not None:
        arrays = {k: v[:limit] for k, v in arrays.items()}
        labels = labels[:limit] if labels is not None else None
    samples = _batched(arrays, model.inputs, f"{what} '{spec_s}'")
    if labels is not None:
        batch = model.inputs[0].shape[0] if model.inputs[0].shape else 1
        labels = np.asarray(labels)[: len(samples) * batch]
        if metric is None:
            metric = "accuracy" if labels.ndim == 1 else "miou"
            classes = int(labels.max()) + 1
    return Dataset(name=spec_s, samples=samples, labels=labels, metric=metric, num_classes=classes)
