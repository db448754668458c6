"""Tune a model's Relax tasks with MetaSchedule, measuring candidates on the device over RPC.

XGBoost cost model, evolutionary search and the gradient task scheduler, which gives
each task trials by its share of the model's latency (task weight x measured latency).
On top of MetaSchedule, tvmedge adds:

- database reuse: a task whose workload is already tuned for this target (by any model)
  is skipped, so no trials are spent twice;
- early stop: a task whose best latency stopped improving is terminated;
- a crash-safe database (see ``database.py``), ``--resume``, and device-loss detection;
- a report of how the budget was spent and how many devices measured.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.errors import TvmedgeError
from ..core.model import ImportedModel
from ..core.progress import Reporter
from ..target import Device
from .database import TuningDatabase
from .pool import DevicePool

# A task has converged when its best latency improved by less than this fraction over
# the last CONVERGE_ROUNDS measured batches.
CONVERGE_GAIN = 0.01
CONVERGE_ROUNDS = 2
# Below this many trials per task a budget mostly measures default schedules: one or two
# rounds of MetaSchedule's evolutionary search (Ansor's CPU guide used ~800 per task).
MIN_TRIALS_PER_TASK = 32


@dataclass
class TaskInfo:
    name: str
    key: str
    weight: int
    flops: float
    prior_trials: int = 0
    trials: int = 0
    best_us: float | None = None
    default_us: float | None = None  # the default rule's schedule, measured before the search
    history: list[float] = field(default_factory=list)
    status: str = "pending"  # pending | reused | tuned | converged | budget | stopped

    @property
    def gflops(self) -> float | None:
        return self.flops / (self.best_us * 1e3) if self.best_us else None


def _task_key(task, target) -> str:
    from tvm_ffi import structural_hash

    return f"{structural_hash(task.dispatched[0]) & 0xFFFFFFFFFFFF:012x}:{target.kind.name}:" \
           f"{target.attrs.get('mtriple', '')}:{target.attrs.get('mcpu', target.attrs.get('arch', ''))}"


def _flops(mod) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(mod))
    except Exception:
        return 0.0


def tuning_tasks(model: ImportedModel, device: Device) -> list:
    """MetaSchedule's tasks for ``model`` on ``device``: the graph ``compile`` builds (target
    rewrites included, e.g. int8 on dot-product kernels), less the hand-scheduled kernels."""
    from tvm.s_tir import meta_schedule as ms

    from ..build import prepare as prepare_model
    from .pipeline import prepare

    mod = prepare(prepare_model(model, device).mod, device.target)
    return [t for t in ms.relax_integration.extract_tasks(mod, device.target)
            if not _scheduled(t.dispatched[0]) and not _rule_only(t.dispatched[0])]


def _rule_only(mod) -> bool:
    """A kernel left to its default rule: Winograd's transforms (see ``lower.winograd.is_transform``)."""
    import tvm

    from ..lower.winograd import is_transform

    return any(isinstance(f, tvm.tirx.PrimFunc) and is_transform(f) for f in mod.functions.values())


def _scheduled(mod) -> bool:
    """A hand-scheduled kernel (binary, int8 dot product): MetaSchedule would still make it a task."""
    funcs = list(mod.functions.values())
    return bool(funcs) and all(f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled", False))
                               for f in funcs)


class _Callback:
    """Runs in the tuning loop after each measured batch (after the database commit)."""

    def __init__(self, tasks: list[TaskInfo], db: TuningDatabase, on_batch: Callable[[], None],
                 device_alive: Callable[[], bool], stopped: set[int]) -> None:
        self.tasks, self.db, self.on_batch, self.device_alive = tasks, db, on_batch, device_alive
        self.device_lost = False
        self.failed_batches = 0
        self.stopped = stopped  # converged tasks: their search hands out no more candidates

    def __call__(self, scheduler, task_id, candidates, builder_results, runner_results) -> None:
        info = self.tasks[task_id]
        info.trials += len(candidates)
        costs = []
        errors = 0
        for br, rr in zip(builder_results, runner_results):
            if br.error_msg is None and rr.error_msg is None and rr.run_secs:
                costs.append(sum(float(s) for s in rr.run_secs) / len(rr.run_secs) * 1e6)
            elif br.error_msg is None:
                errors += 1
        if costs:
            best = min(costs)
            info.best_us = best if info.best_us is None else min(info.best_us, best)
        if info.best_us is not None:
            info.history.append(info.best_us)
        st = self.db.task_state(info.key)
        st.update(trials=info.prior_trials + info.trials, best_us=info.best_us, name=info.name)
        self.db.sync()
        # Device loss: a batch where every built candidate failed to run, and the tracker
        # has no server left under the key.
        if errors and not costs:
            self.failed_batches += 1
            if not self.device_alive():
                # Abort the whole run from here: terminating every task instead trips
                # MetaSchedule's round-robin phase, which hands out task ids without
                # checking whether they were terminated.
                self.device_lost = True
                raise _DeviceLost("no RPC server left under the device key")
        else:
            self.failed_batches = 0
        h = info.history
        if len(h) > CONVERGE_ROUNDS and h[-1] > h[-1 - CONVERGE_ROUNDS] * (1 - CONVERGE_GAIN):
            info.status = "converged"
            self.stopped.add(task_id)
        self.on_batch()


class _DeviceLost(Exception):
    """Raised inside the tuning loop to stop it when the device is gone."""


def _stoppable(inner, task_id: int, stopped: set[int]) -> Any:
    """``inner`` (a MetaSchedule search strategy) that ends its task once ``task_id`` is in ``stopped``.

    Ending a converged task this way lets the scheduler terminate it itself; calling
    ``terminate_task`` from a measure callback trips the scheduler's own checks (it joins
    a task and then terminates or runs it without looking again).
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.search_strategy import PySearchStrategy

    @derived_object
    class StoppableSearch(PySearchStrategy):
        def _initialize_with_tune_context(self, context) -> None:
            inner._initialize_with_tune_context(context)

        def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
            inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

        def post_tuning(self) -> None:
            inner.post_tuning()

        def generate_measure_candidates(self):
            return None if task_id in stopped else inner.generate_measure_candidates()

        def notify_runner_results(self, measure_candidates, results) -> None:
            inner.notify_runner_results(measure_candidates, results)

        def clone(self):
            return _stoppable(inner.clone(), task_id, stopped)

    return StoppableSearch()


def _as_measure_callback(fn: Callable) -> Any:
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    @derived_object
    class TvmedgeCallback(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            fn(task_scheduler, task_id, measure_candidates, builder_results, runner_results)

    return TvmedgeCallback()


@dataclass
class TuneOptions:
    """How to spend a tuning run: ``trials`` for the model (all its tasks together);
    ``resume`` an interrupted run (its budget then comes from the database's state);
    ``retune`` tasks the database already finished (warm-started from their records) instead
    of reusing them; ``trials_per_iter``: candidates measured per round (default: from the
    budget)."""

    trials: int
    resume: bool = False
    retune: bool = False
    trials_per_iter: int | None = None


def budget_warnings(budget: int, tasks: int) -> list[str]:
    """What a user must know before reading the result: a budget too small for the task count
    leaves tasks untuned (their default schedules), and the result near untuned."""
    if tasks == 0 or budget >= tasks * MIN_TRIALS_PER_TASK:
        return []
    reached = "" if budget >= tasks else f"; at most {budget} of the tasks get any trial at all"
    return [f"a budget of {budget} trials for {tasks} tasks is below {MIN_TRIALS_PER_TASK} per task{reached}: "
            f"expect little or no gain (tasks without trials keep their default schedules); give --trials "
            f"{tasks * MIN_TRIALS_PER_TASK} or more to tune every task"]


def tune_model(model: ImportedModel, device: Device, db_dir: str | os.PathLike, options: TuneOptions,
               pool: DevicePool, progress: bool | Reporter = True,
               warn: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Tune ``model`` for ``device`` into ``db_dir``, measuring on ``pool``; returns the report.
    ``warn`` hears, before tuning starts, what the report's ``warnings`` will say."""
    from .measure import devices_used

    target = device.target
    with TuningDatabase(db_dir, write=True) as db:
        last = db.state.get("last_run")
        trials = options.trials
        if options.resume:
            if not last or last.get("completed", True):
                raise TvmedgeError(f"nothing to resume in {db_dir}: its last tuning run completed "
                                   "(run without --resume to tune more)")
            if last["model_sha256"] != model.sha256:
                raise TvmedgeError(f"{db_dir} was last tuning a different model ({last['model']}); "
                                   "resume with that model")
            trials = last["trials"]
        extracted = tuning_tasks(model, device)
        tasks = [TaskInfo(t.task_name, _task_key(t, target), int(t.weight), _flops(t.dispatched[0]))
                 for t in extracted]
        database = db.open_staging()
        todo = []
        for t, info in zip(extracted, tasks):
            st = db.state["tasks"].get(info.key, {})
            info.prior_trials = st.get("trials", 0)
            info.best_us = st.get("best_us")
            if st.get("finished") and not options.retune and database.has_workload(t.dispatched[0]):
                info.status = "reused"
            else:
                todo.append((t, info))
        if options.resume:
            # What the interrupted run spent, task by task, from the trial counts it started with.
            start = last.get("start_trials") or {i.key: 0 for _, i in todo}
            spent = {i.key: max(0, i.prior_trials - start.get(i.key, i.prior_trials)) for _, i in todo}
            budget = max(0, trials - sum(spent.values()))
            # The tasks the interrupted run never reached come first: otherwise MetaSchedule's
            # scheduler hands the rest of the budget to the tasks it already knows, and a task
            # can end with no record at all.
            untouched = [(t, i) for t, i in todo if i.key in start and spent[i.key] == 0]
            if untouched and budget > 0:
                todo = untouched
        else:
            start = {i.key: i.prior_trials for _, i in todo}
            budget = trials
        db.state["last_run"] = {"model": os.path.basename(model.source), "model_sha256": model.sha256,
                                "target": device.name, "trials": trials, "completed": False,
                                "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "start_trials": start}
        db.save_state()

        for line in budget_warnings(budget, len(todo)) if warn else []:
            warn(line)
        per_iter = options.trials_per_iter or max(4, min(64, budget // max(1, 2 * len(todo)) or 4))
        device_log = Path(tempfile.mkdtemp(prefix="tvmedge-devlog-")) / "devices.txt"
        t0 = time.perf_counter()
        lost = False
        if todo and budget > 0:
            lost = _run_tuning(todo, database, db, device, budget, per_iter, pool, Reporter.of(progress), device_log)
        for _, info in todo:
            if info.status == "pending":
                # "no trials": the budget ran out before the scheduler reached the task; it keeps
                # its default schedule (or its earlier record).
                info.status = "tuned" if info.trials else "no trials"
            if not lost and info.trials:
                db.task_state(info.key)["finished"] = True
        if not lost:
            db.state["last_run"]["completed"] = True
        db.state["last_run"]["seconds"] = round(time.perf_counter() - t0, 1)
        db.sync()
        used = devices_used(device_log)
        shutil.rmtree(device_log.parent, ignore_errors=True)
        report = {
            "model": os.path.basename(model.source), "target": device.name, "database": str(db_dir),
            "trials_budget": trials, "trials_run": sum(i.trials for i in tasks),
            "trials_per_iter": per_iter, "tuning_seconds": round(time.perf_counter() - t0, 1),
            "devices_used": used, "devices_available": pool.free, "emulated": pool.emulated,
            "tasks_to_tune": len(todo), "warnings": budget_warnings(budget, len(todo)),
            "tasks": [{"name": i.name, "weight": i.weight, "flops": i.flops, "trials": i.trials,
                       "trials_total": i.prior_trials + i.trials, "best_us": i.best_us, "default_us": i.default_us,
                       "gflops": i.gflops, "status": i.status} for i in tasks],
        }
        if lost:
            kept = sum(db.state["tasks"].get(i.key, {}).get("trials", 0) for i in tasks)
            raise TvmedgeError(f"device '{pool.key}' was lost mid-tune (no server left under that key at the tracker); "
                               f"the database {db_dir} keeps every record measured so far ({kept} trials for "
                               "this model): restart the device and run again with --resume")
    return report


def _run_tuning(todo: list, database: Any, db: TuningDatabase, device: Device, budget: int, per_iter: int,
                pool: DevicePool, progress: Reporter, device_log: Path) -> bool:
    """Run MetaSchedule over the tasks ``todo``; returns whether the device was lost."""
    from tvm.s_tir import meta_schedule as ms

    from .measure import make_builder, make_runner, serial_runner
    from .seed import seed_default_records

    # Heaviest tasks first: the scheduler's first round visits tasks in this order, and a
    # small budget should not be spent on reshapes and pools.
    todo = sorted(todo, key=lambda ti: -ti[1].flops * ti[1].weight)
    infos = [i for _, i in todo]
    per_task = budget / max(1, len(todo))
    # MetaSchedule's default search (population 512, 4 genetic rounds) costs seconds of
    # host time per round and task; with few trials per task a smaller population finds
    # as good candidates much sooner.
    population = 512 if per_task >= 128 else 256 if per_task >= 32 else 96
    stopped: set[int] = set()
    target = device.target
    contexts = [ms.TuneContext(mod=t.dispatched[0], target=target, space_generator="post-order-apply",
                               search_strategy=_stoppable(ms.search_strategy.EvolutionarySearch(
                                   population_size=population, init_min_unmeasured=min(50, population // 2),
                                   genetic_num_iters=4 if population >= 256 else 2), i, stopped),
                               task_name=t.task_name, rand_state=i + 1, num_threads="physical")
                for i, (t, _) in enumerate(todo)]
    weights = [float(t.weight) for t, _ in todo]
    workers = os.cpu_count() or 1
    builder = make_builder(device.cross_compiler, workers, timeout_s=300 if device.cross_compiler else 120)
    runner = make_runner(pool.tracker, pool.key, max(1, pool.free), session_timeout_s=300 if pool.emulated else 60,
                         device_log=device_log, emulated=pool.emulated)
    if pool.shares_host:
        runner = serial_runner(runner)
    bar: Any = None  # the progress bar, while MetaSchedule runs
    # The default rules' schedules, measured on the device, are the records to beat.
    seeded = seed_default_records([t for t, _ in todo], database, target, builder, runner)
    for t, info in todo:
        info.default_us = seeded.get(t.task_name)
        if info.default_us is not None:
            info.best_us = info.default_us if info.best_us is None else min(info.best_us, info.default_us)

    def on_batch() -> None:
        done = sum(i.trials for i in infos)
        est = sum(i.weight * i.best_us for i in infos if i.best_us) / 1e3
        # A sum of the best kernels, each timed alone: no runtime overhead, no memory traffic
        # between kernels; end to end is measured (and reported) after tuning.
        bar.update(completed=min(done, budget),
                   status=f"kernels sum {est:.2f} ms{' (emulated)' if pool.emulated else ''}, not end to end")

    callback = _Callback(infos, db, on_batch, pool.alive, stopped)
    callbacks = ms.measure_callback.MeasureCallback.create("default") + [_as_measure_callback(callback)]
    work_dir = db.path / "logs"  # MetaSchedule's per-task logs, kept for the user
    try:
        with progress.bar("tuning (trials)", budget, transient=False, remaining=True) as bar:
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir), max_trials_global=budget,
                          max_trials_per_task=budget, num_trials_per_iter=per_iter, builder=builder, runner=runner,
                          database=database, cost_model="xgb", measure_callbacks=callbacks,
                          task_scheduler="gradient")
    except Exception:
        if not callback.device_lost:
            raise
    finally:
        # The runner's worker processes hold their last RPC session open, which keeps the
        # device busy at the tracker for anyone who wants it next (measuring, the user).
        for pool in (runner.pool, builder.pool):
            if pool is not None:
                pool.shutdown()
    return callback.device_lost
