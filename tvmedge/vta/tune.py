"""Tuning for the accelerator: search each offloaded layer's knobs with the timing model as
the measurement, and keep the choices in the tuning database folder.

Knobs per layer: the output tile (rows x columns), output-channel blocks per tile (all of
them = weights resident), double buffering (the two-"virtual-thread" schedule), and
whether to offload the layer at all. Every tiling that fits the buffers is a candidate;
with ``trials`` below their number, a deterministic sample (evenly spread over the
candidates, plus the default) is measured. The offload knob compares the layer's estimate
on the accelerator with a roofline estimate for the board's host CPU
(``host_cpu.int8_macs_per_cycle`` in the description): an estimate against an estimate,
both labelled as such in the report.

Records: ``<db>/vta-records.json``, by accelerator and layer workload (shapes, stride,
padding), so any model with the same layer reuses them, as MetaSchedule records are
reused by workload. Written atomically; a damaged file is an error, not silently ignored.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..core.errors import TvmedgeError
from ..core.model import ImportedModel
from ..core.progress import Reporter
from .codegen import ConvLayer, Tiling, candidates, compile_layer, default_tiling, workload_key
from .isa import HwConfig
from .timing import estimate

RECORDS = "vta-records.json"


def read_records(db: str | os.PathLike | None) -> dict[str, Any]:
    if db is None:
        return {}
    path = Path(db) / RECORDS
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TvmedgeError(f"VTA tuning records {path} are unreadable ({e}): remove the file to start over") from None
    if not isinstance(data, dict):
        raise TvmedgeError(f"VTA tuning records {path} are not a JSON object")
    return data


def _write_records(db: str | os.PathLike, data: dict[str, Any]) -> None:
    path = Path(db)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{RECORDS}.partial"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path / RECORDS)


def choices(db: str | os.PathLike | None, accel_name: str) -> dict[str, dict[str, Any]]:
    """The recorded choice per workload key for accelerator ``accel_name``."""
    return read_records(db).get(accel_name, {})


def host_cpu_ms(macs: int, accel: Any) -> float | None:
    """Roofline estimate of ``macs`` int8 multiply-accumulates on the board's host CPU (ms),
    if the description has the figures."""
    cpu = accel.host_cpu
    try:
        per_s = float(cpu["cores"]) * float(cpu["clock_mhz"]) * 1e6 * float(cpu["int8_macs_per_cycle"])
    except (KeyError, TypeError, ValueError):
        return None
    return macs / per_s * 1e3


def _sample(cands: list[Tiling], n: int) -> list[Tiling]:
    if n >= len(cands):
        return cands
    step = len(cands) / n
    return [cands[int(i * step)] for i in range(n)]


def tune_layers(layers: list[ConvLayer], accel: Any, db: str | os.PathLike, trials: int = 64,
                progress: bool | Reporter = True) -> dict[str, Any]:
    """Search each layer's knobs, record the best in ``db``; returns the report."""
    cfg = HwConfig.from_accelerator(accel)
    data = read_records(db)
    recs = data.setdefault(accel.name, {})
    rows = []
    t0 = time.time()
    with Reporter.of(progress).bar(f"tuning {len(layers)} layers for {accel.name} (timing model)", len(layers)) as bar:
        for layer in layers:
            default = default_tiling(layer, cfg, accel.name)
            cands = _sample(candidates(layer, cfg), max(1, trials))
            if default not in cands:
                cands.append(default)
            scored = []
            for t in cands:
                scored.append((estimate(compile_layer(layer, cfg, t, accel.name).program, accel).cycles, t))
            best_cycles, best = min(scored, key=lambda s: s[0])
            default_cycles = next(c for c, t in scored if t == default)
            acc_ms = best_cycles / (accel.clock_mhz * 1e3)
            cpu_ms = host_cpu_ms(layer.macs, accel)
            offload = cpu_ms is None or acc_ms <= cpu_ms
            key = workload_key(layer)
            recs[key] = {"tiling": best.to_dict(), "cycles": best_cycles, "default_cycles": default_cycles,
                         "offload": offload, "host_cpu_ms_estimate": cpu_ms, "trials": len(scored)}
            rows.append({"layer": layer.name, "workload": key, "trials": len(scored), "default_cycles": default_cycles,
                         "best_cycles": best_cycles, "speedup": default_cycles / max(1, best_cycles),
                         "tiling": best.to_dict(), "offload": offload, "accelerator_ms": acc_ms,
                         "host_cpu_ms_estimate": cpu_ms})
            bar.advance()
    _write_records(db, data)
    return {"accelerator": accel.name, "simulated": True, "measurement": "timing model (simulated cycles)",
            "layers": rows, "records": str(Path(db) / RECORDS), "seconds": round(time.time() - t0, 2)}


def tune_model(model: ImportedModel, accel: Any, db: str | os.PathLike, trials: int = 64,
               progress: bool | Reporter = True) -> dict[str, Any]:
    """Tune every layer of ``model`` that offloads to ``accel``."""
    from .offload import offloadable_layers

    layers = offloadable_layers(model, accel)
    if not layers:
        raise TvmedgeError(f"nothing to tune for {accel.name}: the model has no int8 conv2d/dense layer the core takes "
                           "(quantize it with --quantize int8)")
    # The budget is the model's, as for `tvmedge tune` on a board: shared among the layers.
    return tune_layers(layers, accel, db, max(1, trials // len(layers)), progress)
