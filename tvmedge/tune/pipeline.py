"""Relax passes around tuning: prepare a model for task extraction, apply a database.

Weights are constants in tvmedge's modules, so MetaSchedule's layout rewrite of weights
(prepacking, e.g. into NCHWc-friendly tiles) is folded at compile time: the deployed
``main`` keeps the model's own interface.
"""

from __future__ import annotations

import os
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


def apply_database(mod, target, db_dir: str | os.PathLike):
    """Compile ``mod`` with the records of a tuning database directory."""
    import tvm

    from .database import TuningDatabase

    db = TuningDatabase(db_dir).open()
    return tvm.compile(apply_records(mod, target, db), target=target)
