"""Time one layer, dense and factorized, on the target device: latency-aware low rank.

A low-rank factorization lowers FLOPs, but whether the two or three thin layers run faster
than the one dense layer depends on the device and its kernels (small ranks starve the
vector units; a 1x1 -> KxK -> 1x1 chain writes two intermediate tensors). :class:`LayerTimer`
answers it by measurement: each layer is compiled alone, with its input shape, as it would
be in the model (tvmedge's default schedules, or the records of a tuning database for the
workloads it holds), into an artifact that is run on the device through RPC (a local server
for this host, qemu for an emulated board, the user's tracker for a real one) with the
device's own timer. :func:`tvmedge.optimize.lowrank.factorize` (given a timer by the
``--lowrank-measure`` flag) keeps a factorization only where it measured faster, and reports
predicted (FLOPs) against measured speedups.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..core.model import ImportedModel


class LayerTimer:
    """Times single-layer models on ``device`` through ``pool`` (a :class:`~tvmedge.tune.pool.DevicePool`).

    ``tuning_db``: a database directory whose records apply where they match a layer's
    workloads; ``repeat``: timed runs per layer and variant (the median is used); the two
    variants alternate ``rounds`` times, as a device's speed drifts."""

    def __init__(self, device: Any, pool: Any, tuning_db: str | None = None, repeat: int = 20,
                 rounds: int = 2) -> None:
        self.device, self.pool, self.tuning_db = device, pool, tuning_db
        self.repeat, self.rounds = repeat, rounds
        self._dir = Path(tempfile.mkdtemp(prefix="tvmedge-layers-"))
        self._n = 0

    @property
    def where(self) -> dict[str, Any]:
        """The device block of the report: which device, hardware or emulated, which records."""
        return {"device": self.device.name, "kind": self.pool.kind, "tuning_db": self.tuning_db}

    def compare(self, dense: ImportedModel, factored: ImportedModel) -> tuple[float, float]:
        """Median latency (ms) of each model on the device."""
        from ..build import compile_model
        from ..tune.pool import time_artifact

        arts = []
        for model in (dense, factored):
            self._n += 1
            art = self._dir / f"layer{self._n}.tar"
            compile_model(model, self.device, art, tuning_db=self.tuning_db, keep_faster=False)
            arts.append(art)
        times: list[list[float]] = [[], []]
        for _ in range(self.rounds):
            for k, art in enumerate(arts):
                times[k] += time_artifact(art, self.pool, self.repeat)["latencies_ms"]
        for art in arts:
            art.unlink(missing_ok=True)
        return float(np.median(times[0])), float(np.median(times[1]))

    def close(self) -> None:
        import shutil

        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def layer_timer(device: Any, tracker: str | None = None, key: str | None = None, tuning_db: str | None = None,
                log: Callable[[str], Any] = print, threads: int | None = None) -> Iterator[LayerTimer]:
    """A :class:`LayerTimer` on ``device`` (its devices found or started by
    :func:`~tvmedge.tune.pool.device_pool`) for the duration of a ``with`` block."""
    from .pool import device_pool

    with device_pool(device, tracker=tracker, key=key, log=log, threads=threads) as pool:
        timer = LayerTimer(device, pool, tuning_db=tuning_db)
        try:
            yield timer
        finally:
            timer.close()
