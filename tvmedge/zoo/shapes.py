"""Generated segmentation scenes (coloured shapes on textured backgrounds) and ShapesSeg.

Each scene is 3×64×64 in [0, 1]: a background made of a colour gradient, stripes and
noise, with one to four shapes drawn on it in random colours. Labels per pixel:
0 background, 1 circle, 2 square, 3 triangle (later shapes cover earlier ones). The colour
says nothing about the class: the network must learn the geometry.

Splits (deterministic): ``train`` is a seeded stream of scenes, ``calib`` its first part,
``eval`` a held-out set drawn with another seed.

``ShapesSeg`` is a small U-Net (~0.3 M parameters). The weights shipped in
``weights/shapes_seg.pt`` were produced by ``train()`` below (``python -m tvmedge.zoo.shapes``
retrains and overwrites them); when the file is missing the model is trained on first use
(a few minutes on 2 cores) and cached in the user cache dir.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .digits import load_or_train

SHIPPED = Path(__file__).parent / "weights" / "shapes_seg.pt"
SIZE = 64
NUM_CLASSES = 4
CLASS_NAMES = ("background", "circle", "square", "triangle")
SPLITS = {"train": (0, 6000), "calib": (0, 256), "eval": (1, 256)}  # split: (seed, samples)


def shape_mask(cls: int, cx: float, cy: float, r: float, xx: np.ndarray, yy: np.ndarray,
               flip: int = 1) -> np.ndarray:
    """Pixels of a shape of class ``cls`` (1 circle, 2 square, 3 triangle; ``flip`` -1 turns
    the triangle upside down) centred at (cx, cy) with size ``r``, on the grid ``xx``, ``yy``."""
    if cls == 1:
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if cls == 2:
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    dy = (yy - cy) * flip  # upright or inverted isosceles triangle
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(xx - cx) <= (dy + r) * 0.55)


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    # background: gradient between two colours + oriented stripes + pixel noise
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    ang = rng.uniform(0, np.pi)
    t = ((np.cos(ang) * xx + np.sin(ang) * yy) / (SIZE * 1.5) + 0.5).clip(0, 1)
    img = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
    freq, phase, sang = rng.uniform(0.2, 0.8), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
    stripes = np.sin(freq * (np.cos(sang) * xx + np.sin(sang) * yy) + phase)
    img = img + rng.uniform(0.03, 0.15) * stripes[None]
    label = np.zeros((SIZE, SIZE), np.int64)
    for _ in range(rng.integers(1, 5)):
        cls = int(rng.integers(1, NUM_CLASSES))
        r = rng.uniform(6, 14)
        cx, cy = rng.uniform(r, SIZE - r), rng.uniform(r, SIZE - r)
        flip = (1 if rng.random() < 0.5 else -1) if cls == 3 else 1
        mask = shape_mask(cls, cx, cy, r, xx, yy, flip)
        colour = rng.uniform(0, 1, 3)
        # keep the shape visible against the local background
        while np.abs(colour - img[:, mask].mean(axis=1)).max() < 0.3:
            colour = rng.uniform(0, 1, 3)
        img[:, mask] = colour[:, None] + rng.normal(0, 0.03, (3, int(mask.sum())))
        label[mask] = cls
    img = img + rng.normal(0, rng.uniform(0.02, 0.08), img.shape)
    return img.clip(0, 1).astype(np.float32), label


def moving_clip(frames: int = 48, size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A clip of shapes moving over a scene like the training ones, and its ground truth:
    (rgb uint8 [N,size,size,3], labels int64 [N,size,size]). Three shapes (one per class) of
    the training sizes, scaled by ``size / 64``, drift at constant speed and bounce off the edges."""
    rng = np.random.default_rng(seed + 2000)
    scale = size / SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    ang = rng.uniform(0, np.pi)
    t = ((np.cos(ang) * xx + np.sin(ang) * yy) / (size * 1.5) + 0.5).clip(0, 1)
    bg = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
    freq, phase, sang = rng.uniform(0.2, 0.8) / scale, rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
    bg = bg + 0.08 * np.sin(freq * (np.cos(sang) * xx + np.sin(sang) * yy) + phase)[None]
    shapes = []
    for cls in (1, 2, 3):
        r = rng.uniform(8, 13) * scale
        pos = rng.uniform(r, size - r, 2)
        vel = rng.uniform(0.8, 2.0, 2) * scale * rng.choice([-1, 1], 2)
        colour = rng.uniform(0, 1, 3)
        while np.abs(colour - bg.mean(axis=(1, 2))).max() < 0.4:
            colour = rng.uniform(0, 1, 3)
        shapes.append([cls, r, pos, vel, colour])
    imgs, labels = [], []
    for _ in range(frames):
        img, label = bg.copy(), np.zeros((size, size), np.int64)
        for cls, r, pos, vel, colour in shapes:
            mask = shape_mask(cls, pos[0], pos[1], r, xx, yy)
            img[:, mask] = colour[:, None]
            label[mask] = cls
            pos += vel
            for k in range(2):  # bounce
                if not r <= pos[k] <= size - r:
                    vel[k] = -vel[k]
                    pos[k] = np.clip(pos[k], r, size - r)
        img = img + rng.normal(0, 0.03, img.shape)
        imgs.append((img.clip(0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8))
        labels.append(label)
    return np.stack(imgs), np.stack(labels)


def dataset(split: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 [N,3,64,64], y int64 [N,64,64]) for ``split`` in train / calib / eval."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")
    seed, count = SPLITS[split]
    count = count if n is None else n
    rng = np.random.default_rng(seed + 1000)
    xs, ys = zip(*(_scene(rng) for _ in range(count)))
    return np.stack(xs), np.stack(ys)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ShapesSeg(nn.Module):
    """A small U-Net: three scales (64², 32², 16²) and a bottleneck at 8², 4 classes."""

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 64, 96)) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.enc1, self.enc2, self.enc3 = _block(3, w1), _block(w1, w2), _block(w2, w3)
        self.mid = _block(w3, w4)
        self.dec3, self.dec2, self.dec1 = _block(w4 + w3, w3), _block(w3 + w2, w2), _block(w2 + w1, w1)
        self.head = nn.Conv2d(w1, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        m = self.mid(F.max_pool2d(e3, 2))
        up = lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest")  # noqa: E731
        d3 = self.dec3(torch.cat([up(m), e3], 1))
        d2 = self.dec2(torch.cat([up(d3), e2], 1))
        d1 = self.dec1(torch.cat([up(d2), e1], 1))
        return self.head(d1)


def miou(logits: np.ndarray, labels: np.ndarray) -> float:
    from ..core.metrics import mean_iou

    return mean_iou(np.asarray(logits).argmax(axis=1), labels, NUM_CLASSES)


def train(model: nn.Module | None = None, seconds: float = 420.0, seed: int = 0,
          verbose: bool = True, lr: float = 3e-3) -> nn.Module:
    """Train ShapesSeg on the train stream for about ``seconds`` (wall clock); a given
    ``model`` is trained further from its current weights."""
    torch.manual_seed(seed)
    model = model or ShapesSeg()
    xtr, ytr = dataset("train")
    xev, yev = dataset("eval")
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    # class weights: background dominates the pixels
    freq = np.bincount(ytr.ravel(), minlength=NUM_CLASSES) / ytr.size
    weight = torch.tensor((1.0 / np.sqrt(freq)) / (1.0 / np.sqrt(freq)).mean(), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    t0, step, batch = time.time(), 0, 16
    g = torch.Generator().manual_seed(seed)
    while time.time() - t0 < seconds:
        frac = (time.time() - t0) / seconds
        for pg in opt.param_groups:  # cosine decay over the time budget
            pg["lr"] = lr * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0)))
        model.train()
        idx = torch.randint(0, len(xtr_t), (batch,), generator=g)
        xb, yb = xtr_t[idx], ytr_t[idx]
        if step % 2:  # flips keep the classes
            xb, yb = xb.flip(3), yb.flip(2)
        loss = F.cross_entropy(model(xb), yb, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if verbose and step % 100 == 0:
            print(f"shapes-seg: step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad():
        score = miou(torch.cat([model(torch.from_numpy(xev[i:i + 64])) for i in range(0, len(xev), 64)]).numpy(), yev)
    if verbose:
        print(f"shapes-seg: trained {step} steps in {time.time() - t0:.0f}s, held-out mIoU {100 * score:.2f} %")
    return model


def load_trained() -> ShapesSeg:
    """The trained ShapesSeg: the shipped weights, else a cached or freshly trained copy."""
    return load_or_train(ShapesSeg(), SHIPPED, train)


if __name__ == "__main__":
    import sys

    # python -m tvmedge.zoo.shapes [SECONDS] [--resume]: --resume trains the shipped weights further
    start = None
    if "--resume" in sys.argv:
        start = ShapesSeg()
        start.load_state_dict(torch.load(SHIPPED, map_location="cpu", weights_only=True))
    secs = [a for a in sys.argv[1:] if not a.startswith("--")]
    m = train(start, seconds=float(secs[0]) if secs else 420.0, seed=len(sys.argv),
              lr=1.5e-3 if start is not None else 3e-3)
    SHIPPED.parent.mkdir(parents=True, exist_ok=True)
    torch.save(m.state_dict(), SHIPPED)
    print(f"wrote {SHIPPED}")
