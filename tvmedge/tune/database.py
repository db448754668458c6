"""The tuning database directory: the user's asset, never left half-written.

Layout of ``DIR`` (MetaSchedule's own JSON database format, so TVM can read it directly):

- ``database_workload.json`` / ``database_tuning_record.json`` — the records;
- ``tvmedge-state.json`` — per (workload, target) task: trials spent, whether the task is
  finished (converged or out of budget), best latency; the last run's settings so
  ``--resume`` can continue it; and per (model, target) the end-to-end verdict of
  ``tvmedge tune``'s comparison (``end_to_end``), which ``compile`` follows: a model whose
  tuned build measured slower than its default schedules is compiled with the defaults;
- ``.lock`` — held while a ``tvmedge tune`` writes to the directory.

While tuning, MetaSchedule appends to a *staging* copy in ``DIR/.staging/``; after every
measured batch the staging files are copied over the real ones with write-to-temp,
fsync and ``os.replace``, so a crash, a kill or Ctrl-C leaves the last complete version.
Workloads are only ever appended, so record indices stay valid across versions.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..core.errors import TvmedgeError

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
STATE = "tvmedge-state.json"
# A tuned build counts as slower than the default schedules only beyond this ratio (noise).
SLOWER_MARGIN = 1.05


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def valid_lines(path: Path) -> list[bytes]:
    """Complete JSON lines of a MetaSchedule database file (a torn last line is dropped)."""
    if not path.exists():
        return []
    lines = []
    for raw in path.read_bytes().splitlines():
        if not raw.strip():
            continue
        try:
            json.loads(raw)
        except ValueError:
            continue
        lines.append(raw)
    return lines


def _warn(line: str) -> None:
    import sys

    print(f"warning: {line}", file=sys.stderr)


class TuningDatabase:
    """A tuning-database directory opened for reading, or for writing under a lock."""

    def __init__(self, path: str | os.PathLike, write: bool = False) -> None:
        self.path = Path(path)
        self.write = write
        self._lock_file = None
        if write:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.path / ".lock", "w")
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file.close()
                raise TvmedgeError(f"tuning database {self.path} is in use by another tvmedge process") from None
        elif not (self.path / WORKLOADS).exists():
            raise TvmedgeError(f"no tuning database in {self.path} (expected {WORKLOADS})")
        self.state = self._load_state()
        self.skipped = 0  # records left out by open(): they do not load in this TVM

    # ------------------------------------------------------------ state
    def _load_state(self) -> dict[str, Any]:
        p = self.path / STATE
        if p.exists():
            try:
                state = json.loads(p.read_text())
                if isinstance(state, dict) and isinstance(state.get("tasks"), dict):
                    return state
            except (ValueError, UnicodeDecodeError):
                pass
            # The records are what matters and they are intact: carry on without the
            # bookkeeping (tasks already tuned get tuned again, from their records).
            if self.write:
                aside = p.with_name(f"{STATE}.damaged")
                os.replace(p, aside)
                _warn(f"{p} was damaged (kept as {aside.name}); trial counts start again, the records are kept")
            else:
                _warn(f"{p} is damaged; compiling with the records alone")
        return {"version": 1, "tasks": {}, "last_run": None}

    def save_state(self) -> None:
        atomic_write(self.path / STATE, json.dumps(self.state, indent=1).encode())

    def task_state(self, key: str) -> dict[str, Any]:
        return self.state["tasks"].setdefault(key, {"trials": 0, "finished": False, "best_us": None})

    def end_to_end(self, model_key: str, target: str) -> dict[str, Any] | None:
        """The last end-to-end comparison of tuned vs default schedules for a model on a target."""
        entry = self.state.get("end_to_end", {}).get(f"{model_key}@{target}")
        return entry if isinstance(entry, dict) and entry.get("faster") in ("tuned", "default") else None

    def record_end_to_end(self, model_key: str, target: str, tuned_ms: float, default_ms: float,
                          emulated: bool) -> dict[str, Any]:
        """Store a comparison; the defaults win only when the tuned build is slower by more than
        :data:`SLOWER_MARGIN` (within it, the difference is the device's noise)."""
        entry = {"tuned_ms": round(tuned_ms, 4), "default_ms": round(default_ms, 4), "emulated": emulated,
                 "faster": "default" if tuned_ms > SLOWER_MARGIN * default_ms else "tuned"}
        self.state.setdefault("end_to_end", {})[f"{model_key}@{target}"] = entry
        self.save_state()
        return entry


    # ------------------------------------------------------------ MetaSchedule access
    def open_staging(self):
        """A MetaSchedule JSONDatabase on a staging copy of the records (for tuning)."""
        from tvm.s_tir import meta_schedule as ms

        staging = self.path / ".staging"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        for name in (WORKLOADS, RECORDS):
            (staging / name).write_bytes(b"".join(line + b"\n" for line in valid_lines(self.path / name)))
        return ms.database.JSONDatabase(path_workload=str(staging / WORKLOADS),
                                        path_tuning_record=str(staging / RECORDS), allow_missing=True)

    def sync(self) -> None:
        """Publish the staging records: complete lines only, atomically, workloads first."""
        staging = self.path / ".staging"
        for name in (WORKLOADS, RECORDS):
            lines = valid_lines(staging / name)
            atomic_write(self.path / name, b"".join(line + b"\n" for line in lines))
        self.save_state()

    def open(self):
        """A MetaSchedule JSONDatabase on the published records (for compiling)."""
        from tvm.s_tir import meta_schedule as ms

        for name in (WORKLOADS, RECORDS):
            lines = valid_lines(self.path / name)
            total = len([ln for ln in (self.path / name).read_bytes().splitlines() if ln.strip()]) \
                if (self.path / name).exists() else 0
            if total != len(lines):
                if name == WORKLOADS:  # record lines point into this file by position
                    raise TvmedgeError(f"{self.path / name} has {total - len(lines)} damaged line(s): the records "
                                       "cannot be matched to their workloads; restore it or tune into a new directory")
                _warn(f"{self.path / name}: {total - len(lines)} damaged line(s) left out (a torn write); "
                      "the next `tvmedge tune` on this directory rewrites it without them")
                return self._open_skipping_bad_records(lines)
        try:
            return ms.database.JSONDatabase(path_workload=str(self.path / WORKLOADS),
                                            path_tuning_record=str(self.path / RECORDS), allow_missing=False)
        except Exception:  # noqa: BLE001 - a record whose trace does not replay fails the whole load
            return self._open_skipping_bad_records()

    def _open_skipping_bad_records(self, record_lines: list[bytes] | None = None):
        """The database less the records TVM refuses to load (a trace that no longer replays
        on its workload): all records together first, else each alone; the user's files are
        not touched.
        ``self.skipped`` counts what was left out; those kernels fall back to default rules."""
        import tempfile

        from tvm.s_tir import meta_schedule as ms

        work = Path(tempfile.mkdtemp(prefix="tvmedge-db-"))
        try:
            workloads = (self.path / WORKLOADS).read_bytes()
            (work / WORKLOADS).write_bytes(workloads)
            lines = valid_lines(self.path / RECORDS) if record_lines is None else record_lines

            def loads(chunk: list[bytes]) -> bool:
                (work / RECORDS).write_bytes(b"".join(line + b"\n" for line in chunk))
                try:
                    ms.database.JSONDatabase(path_workload=str(work / WORKLOADS),
                                             path_tuning_record=str(work / RECORDS), allow_missing=False)
                    return True
                except Exception:  # noqa: BLE001
                    return False

            good = lines if loads(lines) else [line for line in lines if loads([line])]
            self.skipped = len(lines) - len(good)
            (work / RECORDS).write_bytes(b"".join(line + b"\n" for line in good))
            db = ms.database.JSONDatabase(path_workload=str(work / WORKLOADS),
                                          path_tuning_record=str(work / RECORDS), allow_missing=False)
            memory = ms.database.MemoryDatabase()  # so that the temporary files can go now
            for line in valid_lines(self.path / WORKLOADS):  # all of them: "has a record that failed"
                memory.commit_workload(ms.database.Workload.from_json(json.loads(line)).mod)
            for record in db.get_all_tuning_records():
                memory.commit_workload(record.workload.mod)
                memory.commit_tuning_record(record)
            return memory
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def close(self) -> None:
        staging = self.path / ".staging"
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> "TuningDatabase":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def count_records(path: str | os.PathLike) -> int:
    return len(valid_lines(Path(path) / RECORDS))


def export_best(src: str | os.PathLike, dest: str | os.PathLike) -> int:
    """Copy the database ``src`` to ``dest`` keeping only the fastest record per workload.

    That is all ``compile`` applies, and what ``schedules/`` ships (a full tuning history is
    ~20x larger). Workloads keep their indices; failed measurements (no run time) are
    dropped. Returns the number of records kept.
    """
    src, dest = Path(src), Path(dest)
    best: dict[int, tuple[float, bytes]] = {}
    for raw in valid_lines(src / RECORDS):
        idx, rec = json.loads(raw)
        secs = [float(s) for s in (rec[1] or [])]
        if secs and all(s < 1e9 for s in secs):
            t = sum(secs) / len(secs)
            if idx not in best or t < best[idx][0]:
                best[idx] = (t, raw)
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write(dest / WORKLOADS, b"\n".join(valid_lines(src / WORKLOADS)) + b"\n")
    atomic_write(dest / RECORDS, b"".join(raw + b"\n" for _, (_, raw) in sorted(best.items())))
    if (src / STATE).exists():
        atomic_write(dest / STATE, (src / STATE).read_bytes())
    return len(best)


def model_key(model: Any) -> str:
    """Names a model as compiled: its source file's hash plus the rewrites applied to it."""
    import hashlib

    rewrites = hashlib.sha256(json.dumps(model.rewrites, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{model.sha256[:16]}+{rewrites}"
