"""The tuning databases shipped in ``schedules/<isa-class>/tvm-<major.minor>/<model>/``.

Like TVM's old TopHub: a ready start when the user has no records of their own. Which
databases a target gets is decided by its ISA class (:mod:`tvmedge.isa`, from the target's
CPU features, never its name) and the installed TVM version series; see
``schedules/README.md``. :func:`open_databases` opens several databases as one, in that
order of precedence; ``compile`` (``tvmedge.build``) uses both.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from ..isa import BY_NAME, record_class, tensorized, usable_classes
from ..isa import tvm_series as current_series
from .database import RECORDS, valid_lines


def open_databases(db_dirs: str | os.PathLike | list):
    """One MetaSchedule database over one or more tuning database directories.

    A list is in order of preference, grouped by parent folder (how
    :func:`shipped_databases` returns them: one folder per ISA class, own class first):
    within a folder the fastest measured record of a workload wins; across folders the
    first folder that holds the workload wins, so a CPU's own class beats the classes it
    is a superset of.
    """
    from tvm.s_tir import meta_schedule as ms

    from .database import TuningDatabase

    dirs = [Path(d) for d in (db_dirs if isinstance(db_dirs, list) else [db_dirs])]
    groups: list[list] = []
    parent = None
    for d in dirs:
        if not groups or d.parent != parent:
            groups.append([])
            parent = d.parent
        groups[-1].append(TuningDatabase(d).open())
    unions = [g[0] if len(g) == 1 else ms.database.UnionDatabase(*g) for g in groups]
    return unions[0] if len(unions) == 1 else ms.database.OrderedUnionDatabase(*unions)


def schedules_dir() -> Path:
    """The shipped ``schedules/`` folder (the checkout's, or the installed package's copy)."""
    from ..core.resources import data_dir

    return data_dir("schedules")


def shipped_class_dir(isa_class: str, tvm_series: str | None = None, root: Path | None = None) -> Path:
    """``schedules/<isa-class>/tvm-<major.minor>/``: where databases of one class are shipped."""
    return (root or schedules_dir()) / isa_class / f"tvm-{tvm_series or current_series()}"


def shipped_databases(device, root: Path | None = None) -> list[Path]:
    """Tuning databases shipped for ``device``'s ISA class and this TVM version, best first.

    The target's own class first, then each class it is a superset of (the order
    :func:`open_databases` gives precedence by). A database whose records
    need a class the target lacks (e.g. VNNI-tensorized records filed in the wrong folder)
    is skipped with a warning, so such code never reaches a CPU without it. ``root``:
    another ``schedules/`` folder to look in (default: the shipped one).
    """
    classes = usable_classes(device.target)
    found: list[Path] = []
    for cls in classes:
        folder = shipped_class_dir(cls, root=root)
        for db in sorted(p.parent for p in folder.glob("*/database_workload.json")):
            try:
                needs = database_class(db)
            except ValueError as e:
                warnings.warn(f"shipped database {db} skipped: {e}", stacklevel=2)
                continue
            if needs not in classes:
                warnings.warn(f"shipped database {db} skipped: its records need {needs}, "
                              f"which {device.name} ({classes[0]}) lacks", stacklevel=2)
                continue
            found.append(db)
    return found


def database_class(db_dir: str | os.PathLike) -> str:
    """The class a tuning database's records need (the most demanding of its records).

    Raises ``ValueError`` for a database that has no records or mixes architectures.
    """
    needed: dict[str, int] = {}
    for raw in valid_lines(Path(db_dir) / RECORDS):
        _, rec = json.loads(raw)
        cls = record_class(rec[2], tensorized(rec[0]))  # (trace, run_secs, target, args_info)
        needed[cls] = needed.get(cls, 0) + 1
    if not needed:
        raise ValueError(f"{db_dir} holds no tuning records")
    specs = [BY_NAME.get(c) for c in needed]
    if None in specs or len({s.arch for s in specs}) > 1:
        if len(needed) == 1:
            return next(iter(needed))
        raise ValueError(f"{db_dir} mixes records for different architectures: {sorted(needed)}")
    # Classes of one architecture: the one with the most features must be usable for all.
    top = max(specs, key=lambda s: len(s.features))
    if not all(set(s.features) <= set(top.features) for s in specs):
        raise ValueError(f"{db_dir} mixes records of incomparable classes: {sorted(needed)}")
    return top.name
