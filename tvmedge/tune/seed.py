"""Tuning starts from tvmedge's default schedules: each task's rule-based schedule is built,
measured on the device with the tuning run's own builder and runner, and committed to the
database as an ordinary record before MetaSchedule searches.

Two things follow. The database's best record for a workload is never slower than the
default rule (a kernel MetaSchedule cannot beat keeps the rule's schedule), so a tuned
model is not slower than the untuned default. And MetaSchedule's evolutionary search seeds
its first population with the database's best records, so the search starts from the
rule's schedule rather than from random samples only.
"""

from __future__ import annotations


def seed_default_records(tasks: list, database, target, builder, runner) -> dict[str, float]:
    """Measure the default schedule of every task (``ExtractedTask``s) and commit it as a
    record; returns the measured microseconds by task name (missing: no rule, or it failed)."""
    from tvm.s_tir import meta_schedule as ms

    from ..lower.pipeline import first_schedule

    items = []
    for task in tasks:
        mod = task.dispatched[0]
        if database.has_workload(mod):  # seeded or tuned before (resume, another round)
            continue
        sch, _ = first_schedule(mod["main"], target)
        if sch is not None:
            items.append((task, mod, sch))
    if not items:
        return {}
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, _, sch in items])
    runs, pending = [], []
    for (task, mod, sch), b in zip(items, built):
        if b.error_msg is not None:
            continue
        args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
        runs.append(ms.runner.RunnerInput(b.artifact_path, "cuda" if target.kind.name == "cuda" else "cpu", args))
        pending.append((task, mod, sch, args))
    measured: dict[str, float] = {}
    try:
        results = [f.result() for f in runner.run(runs)]
    finally:  # MetaSchedule's RemoveBuildArtifact callback never sees these builds
        for b in built:
            if b.artifact_path:
                ms.utils.remove_build_dir(b.artifact_path)
    for (task, mod, sch, args), result in zip(pending, results):
        if result.error_msg is not None or not result.run_secs:
            continue
        secs = [float(s) for s in result.run_secs]
        workload = database.commit_workload(mod)
        database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, secs, target, args))
        measured[task.task_name] = sum(secs) / len(secs) * 1e6
    return measured
