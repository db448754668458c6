"""Relax passes around tuning: prepare a model for task extraction, and compile with one
or more tuning databases (the shipped ones are found by :mod:`tvmedge.tune.shipped`).

Weights are constants in tvmedge's modules, so MetaSchedule's layout rewrite of weights
(prepacking, e.g. into NCHWc-friendly tiles) is folded at compile time: the deployed
``main`` keeps the model's own interface.
"""

from __future__ import annotations

import os

from .shipped import open_databases


def prepare(mod, target):
    """The kernels ``compile`` builds, weights marked layout-free. The result's PrimFuncs are
    the tasks."""
    from ..lower.pipeline import prepare as prepare_kernels

    return prepare_kernels(mod, target, layout_free=True)


def apply_database(mod, target, db_dirs: str | os.PathLike | list):
    """Compile ``mod`` with the records of one or more tuning database directories (default
    rules for the kernels they lack); returns the executable and the schedule report."""
    from ..lower.pipeline import build

    return build(mod, target, open_databases(db_dirs))
