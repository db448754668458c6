"""``digits-bnn``: a binarized twin of the zoo's ``digits-cnn``, trained on scikit-learn digits.

As usual for BNNs the first layer (sees the image) and the last (produces logits) stay float;
the two middle convolutions and the hidden dense layer are binary (sign activations, sign
kernels with XNOR-Net per-channel scaling), each followed by BatchNorm. The shipped weights in
``tvmedge/zoo/weights/digits_bnn.pt`` come from ``train()`` (``python -m
tvmedge.binary.digits_bnn`` retrains and overwrites them); without them the model is trained on
first use and cached, like ``digits-cnn``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..zoo.digits import accuracy, cache_dir, load_split
from .layers import BinaryConv2d, BinaryDense, SignSTE, clip_latent_weights

SHIPPED = Path(__file__).resolve().parent.parent / "zoo" / "weights" / "digits_bnn.pt"


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
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
    model = train()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, cached)
    return model.eval()


def held_out_accuracy(model: nn.Module) -> float:
    """Held-out accuracy of ``model`` on the digits test split."""
    _, _, xte, yte = load_split()
    with torch.no_grad():
        return accuracy(model.eval()(torch.from_numpy(xte)).numpy(), yte)


if __name__ == "__main__":
    m = train()
    SHIPPED.parent.mkdir(parents=True, exist_ok=True)
    torch.save(m.state_dict(), SHIPPED)
    print(f"wrote {SHIPPED} ({SHIPPED.stat().st_size / 1e3:.0f} kB)")
