"""Activation and weight observers: tensor statistics -> int8 quantization parameters.

Modelled on ``torch.ao.quantization`` observers, in plain numpy and much smaller:

* activations are quantized **per tensor, asymmetric uint8** (``q = round(x / scale) + zero_point``,
  ``q`` in [0, 255]); an observer sees every calibration batch through :meth:`observe` and
  :meth:`calculate_qparams` returns ``(scale, zero_point)``;

  - :class:`MinMaxObserver`    - the full observed range (no clipping; outliers cost resolution);
  - :class:`PercentileObserver` - the range between two percentiles of a running histogram
    (clips rare outliers);
  - :class:`KLObserver`        - TensorRT-style entropy calibration: the clipping threshold on
    ``|x|`` that minimises the KL divergence between the observed distribution and its
    quantized version;

* weights are quantized **per output channel, symmetric int8** in [-127, 127]
  (:class:`PerChannelWeightObserver`), zero point 0.

uint8 activations with int8 weights is the operand pairing of x86 VNNI ``vpdpbusd``
(u8 x s8 -> s32); see :mod:`tvmedge.optimize.quantize` for why.
"""

from __future__ import annotations

import numpy as np

QMIN, QMAX = 0, 255  # uint8 activations
WMAX = 127  # int8 weights, restricted to [-127, 127] so that the range is symmetric


def qparams_from_range(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 ``(scale, zero_point)`` covering ``[lo, hi]`` (widened to hold 0 exactly)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError(f"non-finite activation range [{lo}, {hi}]")
    if hi - lo < 1e-12:
        return 1.0, 0
    scale = (hi - lo) / (QMAX - QMIN)
    zero_point = int(np.clip(round(QMIN - lo / scale), QMIN, QMAX))
    return float(scale), zero_point


class Observer:
    """Base class: ``observe`` arrays, then ``calculate_qparams() -> (scale, zero_point)``."""

    name = "base"

    def __init__(self) -> None:
        self.min = np.inf
        self.max = -np.inf
        self.count = 0

    def observe(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.size == 0:
            return
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        self.count += x.size
        self._observe(x)

    def _observe(self, x: np.ndarray) -> None:
        pass

    def range(self) -> tuple[float, float]:
        """The float range ``[lo, hi]`` the quantized tensor will cover."""
        raise NotImplementedError

    def calculate_qparams(self) -> tuple[float, int]:
        if not self.count:
            raise ValueError(f"{type(self).__name__}: nothing observed")
        return qparams_from_range(*self.range())


class MinMaxObserver(Observer):
    """The whole observed range."""

    name = "minmax"

    def range(self) -> tuple[float, float]:
        return self.min, self.max


class _Histogram:
    """A fixed-size histogram whose range grows with the data (old counts are re-binned)."""

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.lo = self.hi = None

    def add(self, x: np.ndarray) -> None:
        lo, hi = float(x.min()), float(x.max())
        if self.lo is None:
            self.lo, self.hi = lo, hi if hi > lo else lo + 1e-8
        elif lo < self.lo or hi > self.hi:
            old_edges = self.edges
            centres = 0.5 * (old_edges[:-1] + old_edges[1:])
            self.lo, self.hi = min(lo, self.lo), max(hi, self.hi)
            self.counts, _ = np.histogram(centres, bins=self.bins, range=(self.lo, self.hi), weights=self.counts)
        h, _ = np.histogram(x, bins=self.bins, range=(self.lo, self.hi))
        self.counts += h

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def percentile(self, q: float) -> float:
        """Value below which ``q`` percent of the counts lie (linear inside a bin)."""
        cdf = np.cumsum(self.counts)
        target = q / 100.0 * cdf[-1]
        i = int(np.searchsorted(cdf, target))
        i = min(i, self.bins - 1)
        before = cdf[i - 1] if i else 0.0
        frac = (target - before) / self.counts[i] if self.counts[i] else 0.0
        edges = self.edges
        return float(edges[i] + frac * (edges[i + 1] - edges[i]))


class PercentileObserver(Observer):
    """The range between the ``100 - percentile`` and ``percentile`` percentiles.

    The low end is only clipped when the tensor has negative values; a post-ReLU tensor keeps
    0 as its low end (zero point 0).
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__()
        self.percentile = percentile
        self.hist = _Histogram(bins)

    def _observe(self, x: np.ndarray) -> None:
        self.hist.add(x)

    def range(self) -> tuple[float, float]:
        hi = self.hist.percentile(self.percentile) if self.max > 0 else self.max
        lo = self.hist.percentile(100.0 - self.percentile) if self.min < 0 else self.min
        return min(lo, 0.0), max(hi, 0.0)


class KLObserver(Observer):
    """Entropy calibration (TensorRT): clip ``|x|`` at the threshold minimising KL(P || Q).

    P is the histogram of ``|x|`` up to a candidate threshold (the clipped tail folded into
    its last bin), Q the same bins merged into as many levels as the quantized type has on
    that side of zero (255 for a non-negative tensor, 128 otherwise) and spread back
    uniformly over the non-empty bins.
    """

    name = "kl"

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        self.hist = _Histogram(bins)

    def _observe(self, x: np.ndarray) -> None:
        a = np.abs(x)
        # Anchor the histogram at 0 so that bin i always covers [i, i+1) * width.
        self.hist.add(np.concatenate([a.ravel(), np.zeros(1, np.float32)]))

    def threshold(self) -> float:
        counts = self.hist.counts
        edges = self.hist.edges
        levels = (QMAX - QMIN) if self.min >= 0 else (QMAX - QMIN + 1) // 2
        nbins = len(counts)
        if nbins <= levels:
            return float(edges[-1])
        best_kl, best_i = np.inf, nbins
        total_tail = np.cumsum(counts[::-1])[::-1]  # total_tail[i] = counts[i:].sum()
        for i in range(levels, nbins + 1):
            ref = counts[:i]
            p = ref.copy()
            if i < nbins:
                p[-1] += total_tail[i]
            nonzero = ref > 0
            idx = (np.arange(i) * levels) // i
            sums = np.bincount(idx, weights=ref, minlength=levels)
            nz = np.bincount(idx, weights=nonzero.astype(np.float64), minlength=levels)
            q = np.where(nonzero, sums[idx] / np.maximum(nz[idx], 1.0), 0.0)
            ps, qs = p.sum(), q.sum()
            if ps <= 0 or qs <= 0:
                continue
            p = p / ps
            q = q / qs
            mask = p > 0
            # Bins with P > 0 but Q == 0 (the folded tail) get a small floor instead of infinity.
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
            if kl < best_kl:
                best_kl, best_i = kl, i
        return float(edges[best_i])

    def range(self) -> tuple[float, float]:
        t = self.threshold()
        return max(self.min, -t), min(self.max, t)


class PerChannelWeightObserver:
    """Symmetric int8 weights, one scale per output channel (``axis``)."""

    def __init__(self, axis: int = 0) -> None:
        self.axis = axis

    def calculate_qparams(self, w: np.ndarray) -> np.ndarray:
        """Per-channel scales (shape ``[w.shape[axis]]``)."""
        w = np.asarray(w, dtype=np.float64)
        reduce = tuple(i for i in range(w.ndim) if i != self.axis % w.ndim)
        amax = np.abs(w).max(axis=reduce) if reduce else np.abs(w)
        return np.where(amax > 0, amax / WMAX, 1.0).astype(np.float64)

    def quantize(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(int8 weights, per-channel scales)``."""
        scales = self.calculate_qparams(w)
        shape = [1] * w.ndim
        shape[self.axis % w.ndim] = -1
        q = np.clip(np.round(np.asarray(w, np.float64) / scales.reshape(shape)), -WMAX, WMAX).astype(np.int8)
        return q, scales


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "kl": KLObserver,
}


def make_observer(name: str) -> Observer:
    """A fresh activation observer by name (``minmax``, ``percentile``, ``kl``)."""
    try:
        return OBSERVERS[name]()
    except KeyError:
        raise ValueError(f"unknown observer '{name}' (known: {', '.join(OBSERVERS)})") from None
