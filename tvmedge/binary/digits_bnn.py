"""``digits-bnn``: a binarized twin of the zoo's ``digits-cnn``, trained on scikit-learn digits.

As usual for BNNs the first layer (sees the image) and the last (produces logits) stay float;
the two middle convolutions and the hidden dense layer are binary (sign activations, sign
kernels with XNOR-Net per-channel scaling), each followed by BatchNorm. The shipped weights in
``tvmedge/zoo/weights/digits_bnn.pt`` come from ``train()`` (``python -m
tvmedge.binary.digits_bnn`` retrains and overwrites them); without them the model is trained on
first use and cached, like ``digits-cnn``.

Weights are stored compactly (:func:`save_compact`): a binary layer's forward depends on its
latent float kernel only through ``sign(W)`` and ``alpha = mean |W|``, so the file keeps the sign
bits (``np.packbits``) and alpha per output channel, and rebuilds ``W = alpha * sign``; float
layers are stored as they are. About 70 kB instead of 1.4 MB.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..zoo.digits import WEIGHTS, accuracy, cache_dir, load_split
from .layers import BinaryConv2d, BinaryDense, SignSTE, clip_latent_weights

SHIPPED = WEIGHTS / "digits_bnn.pt"


def _bconv(cin: int, cout: int) -> BinaryConv2d:
    return BinaryConv2d(cin, cout, 3, padding=1, input_quantizer=SignSTE(), kernel_quantizer=SignSTE())


class DigitsBNN(nn.Sequential):
    """1x1x8x8 -> 10 logits; float conv, 2 binary convs, binary dense, float classifier."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),   # float, 8x8
            _bconv(64, 128), nn.BatchNorm2d(128), nn.MaxPool2d(2),             # 4x4
            _bconv(128, 128), nn.BatchNorm2d(128), nn.MaxPool2d(2),            # 2x2
            nn.Flatten(),
            BinaryDense(512, 256, input_quantizer=SignSTE(), kernel_quantizer=SignSTE()),
            nn.BatchNorm1d(256),
            nn.Linear(256, 10),                                                # float logits
        )


def save_compact(model: nn.Module, path: str | os.PathLike) -> None:
    """Save ``model`` with its binary kernels as sign bits + per-channel alpha (atomically)."""
    binary = {f"{name}.weight": m for name, m in model.named_modules()
              if isinstance(m, (BinaryConv2d, BinaryDense)) and m.kernel_quantizer is not None}
    state = {k: v for k, v in model.state_dict().items() if k not in binary}
    bits = {}
    with torch.no_grad():
        for key, m in binary.items():
            w = m.weight.numpy()
            bits[key] = {"bits": torch.from_numpy(np.packbits(w.reshape(-1) >= 0)),
                         "shape": list(w.shape), "alpha": m.alpha().clone()}
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": "tvmedge-bnn-1", "float": state, "binary": bits}, tmp)
    os.replace(tmp, path)


def load_compact(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load what :func:`save_compact` wrote into ``model`` (kernels rebuilt as alpha * sign)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = dict(saved["float"])
    for key, b in saved["binary"].items():
        n = int(np.prod(b["shape"]))
        signs = np.unpackbits(b["bits"].numpy())[:n].astype(np.float32) * 2 - 1
        alpha = b["alpha"].view(-1, *([1] * (len(b["shape"]) - 1)))
        state[key] = torch.from_numpy(signs.reshape(b["shape"])) * alpha
    model.load_state_dict(state)
    return model


def train(epochs: int = 60, seed: int = 0, verbose: bool = True) -> DigitsBNN:
    """Train a DigitsBNN on the training split (Adam, cosine decay, latent weights clipped)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = DigitsBNN()
    xtr, ytr, xte, yte = load_split()
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    steps = epochs * ((len(xtr) + 63) // 64)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.time()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr_t))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            dx, dy = rng.integers(-1, 2, size=2)  # one-pixel random shifts
            xb = torch.roll(xtr_t[idx], shifts=(int(dy), int(dx)), dims=(2, 3))
            loss = F.cross_entropy(model(xb), ytr_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            clip_latent_weights(model)
    model.eval()
    if verbose:
        with torch.no_grad():
            acc = accuracy(model(torch.from_numpy(xte)).numpy(), yte)
        print(f"digits-bnn: trained {epochs} epochs in {time.time() - t0:.1f}s, held-out accuracy {acc:.4f}")
    return model


def load_trained() -> DigitsBNN:
    """The trained DigitsBNN: the shipped weights, else a cached or freshly trained copy."""
    model = DigitsBNN()
    cached = cache_dir() / "zoo" / "digits_bnn.pt"
    for path in (SHIPPED, cached):
        if path.exists():
            return load_compact(model, path).eval()
    model = train()
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_compact(model, cached)
    return load_compact(DigitsBNN(), cached).eval()


def held_out_accuracy(model: nn.Module) -> float:
    """Held-out accuracy of ``model`` on the digits test split."""
    _, _, xte, yte = load_split()
    with torch.no_grad():
        return accuracy(model.eval()(torch.from_numpy(xte)).numpy(), yte)


if __name__ == "__main__":
    m = train()
    SHIPPED.parent.mkdir(parents=True, exist_ok=True)
    save_compact(m, SHIPPED)
    print(f"wrote {SHIPPED} ({SHIPPED.stat().st_size / 1e3:.0f} kB)")
