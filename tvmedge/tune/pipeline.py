"""Relax passes around tuning: prepare a model for task extraction, apply a database.

Weights are constants in tvmedge's modules, so MetaSchedule's layout rewrite of weights
(prepacking, e.g. into NCHWc-friendly tiles) is folded at compile time: the deployed
``main`` keeps the model's own interface.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def prepare(mod, target):
    """Legalize and fuse; mark weights as layout-free. The result's PrimFuncs are the tasks."""
    import tvm
    from tvm import relax

    with tvm.target.Target(target):
        return tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.get_pipeline("zero"),
            relax.transform.AttachAttrLayoutFreeBuffers(),
        ])(mod)


def apply_records(mod, target, database) -> Any:
    """Replace tuned PrimFuncs by their best records and fold the weight layout rewrites."""
    import tvm
    from tvm import relax

    mod = prepare(mod, target)
    with tvm.target.Target(target), database:
        return tvm.transform.Sequential([
            relax.transform.MetaScheduleApplyDatabase(enable_warning=False),
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.LiftTransformParams(),
            relax.transform.FoldConstant(),
        ])(mod)


def apply_database(mod, target, db_dirs: str | os.PathLike | list):
    """Compile ``mod`` with the records of one or more tuning database directories."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .database import TuningDatabase

    dirs = db_dirs if isinstance(db_dirs, list) else [db_dirs]
    dbs = [TuningDatabase(d).open() for d in dirs]
    db = dbs[0] if len(dbs) == 1 else ms.database.UnionDatabase(*dbs)
    return tvm.compile(apply_records(mod, target, db), target=target)


SCHEDULES_DIR = Path(__file__).resolve().parent.parent.parent / "schedules"


def shipped_databases(device) -> list[Path]:
    """Tuning databases shipped in ``schedules/<device>-<cpu>/`` for this exact target.

    Like TVM's old TopHub: a ready start when the user has no records of their own. The
    folder name pins the device description and the CPU (``host-znver4``, ``pi4-cortex-a72``)
    so records tuned for one CPU are never applied to another.
    """
    tj = device.target_json
    cpu = tj.get("mcpu") or tj.get("arch") or tj.get("kind")
    folder = SCHEDULES_DIR / f"{device.name}-{cpu}"
    return sorted(p.parent for p in folder.glob("*/database_workload.json"))
