"""The handwritten-digits data set that ships in scikit-learn, and the trained DigitsCNN.

The weights shipped in ``weights/digits_cnn.pt`` were produced by ``train()`` below
(``python -m tvmedge.zoo.digits`` retrains and overwrites them). When the file is missing
the model is trained on first use (~20 s on 2 cores) and cached in the user cache dir.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .models import DigitsCNN

WEIGHTS = Path(__file__).parent / "weights"  # the zoo's shipped weights (package data)
SHIPPED = WEIGHTS / "digits_cnn.pt"
SPLIT_SEED = 0


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "tvmedge"


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); images as float32 N×1×8×8 in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=SPLIT_SEED, stratify=y)
    return xtr, ytr, xte, yte


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(axis=1) == labels).mean())


def train(model: torch.nn.Module | None = None, epochs: int = 30, seed: int = 0,
          verbose: bool = True) -> torch.nn.Module:
    """Train a DigitsCNN (or a given model with the same I/O) on the training split."""
    torch.manual_seed(seed)
    model = model or DigitsCNN()
    xtr, ytr, xte, yte = load_split()
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=epochs * ((len(xtr) + 63) // 64))
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr_t))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            xb = xtr_t[idx]
            # light augmentation: one-pixel random shifts
            dx, dy = np.random.randint(-1, 2, size=2)
            xb = torch.roll(xb, shifts=(int(dy), int(dx)), dims=(2, 3))
            loss = F.cross_entropy(model(xb), ytr_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = accuracy(model(torch.from_numpy(xte)).numpy(), yte)
    if verbose:
        print(f"digits-cnn: trained {epochs} epochs in {time.time() - t0:.1f}s, held-out accuracy {acc:.4f}")
    return model


def load_or_train(model: torch.nn.Module, shipped: Path, train_fn) -> torch.nn.Module:
    """``model`` with the shipped weights, else a cached copy, else trained now (and cached)."""
    cached = cache_dir() / "zoo" / shipped.name
    for path in (shipped, cached):
        if path.exists():
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
    model = train_fn(model)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, cached)
    return model.eval()


def load_trained() -> DigitsCNN:
    """The trained DigitsCNN: the shipped weights, else a cached or freshly trained copy."""
    return load_or_train(DigitsCNN(), SHIPPED, train)


if __name__ == "__main__":
    m = train()
    SHIPPED.parent.mkdir(parents=True, exist_ok=True)
    torch.save(m.state_dict(), SHIPPED)
    print(f"wrote {SHIPPED}")
