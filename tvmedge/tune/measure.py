"""How candidates are built and measured: cross-linking builder, RPC runner, device log.

Candidates are compiled on this machine and linked with the target's cross compiler (the
device needs no compiler), then timed on the device through the tracker with
MetaSchedule's ``RPCRunner``. The functions here run in MetaSchedule's worker processes,
so they are module-level and take their settings as arguments (``functools.partial``).
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path

from ..deploy.session import connect
from ..deploy.tracker import list_devices
from ..core.errors import TvmedgeError


def export_cross(mod, cross_compiler: str | None = None) -> str:
    """Builder export: a shared library linked for the device."""
    path = os.path.join(tempfile.mkdtemp(prefix="tvmedge-cand-"), "candidate.so")
    if cross_compiler:
        from tvm.support import cc

        mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    else:
        mod.export_library(path)
    return path


def _registered(rpc_config, grace_s: float = 3.0) -> bool:
    """Whether any server is registered at the tracker under the key (polled for ``grace_s``).

    Servers stay registered while they serve a session, so "none" means the device is gone.
    """
    deadline = time.monotonic() + grace_s
    while True:
        try:
            devs = list_devices((rpc_config.tracker_host, rpc_config.tracker_port), timeout=5.0)
            if any(d["key"] == rpc_config.tracker_key and d["total"] > 0 for d in devs):
                return True
        except TvmedgeError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def create_session_logged(rpc_config, log_path: str | None = None):
    """Request a device from the tracker; note which server answered (for the farm report).

    The tracker queues a request for a key with no server forever, and MetaSchedule's
    runner waits on its workers without a time-out: a device lost between our check and
    the request (or while queued behind another session) hung tuning for good. So the
    request is bounded and re-asked in short slices, and it fails as soon as no server is
    registered under the key any more, so that the tuner can notice and stop.
    """
    tracker = (rpc_config.tracker_host, rpc_config.tracker_port)
    key = rpc_config.tracker_key
    deadline = time.monotonic() + max(30.0, float(rpc_config.session_timeout_sec or 60))
    while True:
        if not _registered(rpc_config):
            raise RuntimeError(f"no server registered under key '{key}' at the tracker (device lost)")
        try:
            session = connect(tracker=tracker, key=key, timeout=10.0,
                              session_timeout=float(rpc_config.session_timeout_sec or 0))
            break
        except TvmedgeError as e:  # all busy (someone else's session) or gone: look again
            if time.monotonic() > deadline:
                raise RuntimeError(str(e)) from None
    if log_path:
        try:
            where = session.get_function("tvm.rpc.server.workpath")("")
        except Exception:  # older servers: count the session only
            where = "unknown"
        with open(log_path, "a") as f:
            f.write(os.path.dirname(where.rstrip("/")) + "\n")
    return session


def build_candidate(mod, target, cross_compiler: str | None) -> str:
    """Builder worker: compile one scheduled candidate and link it for the device."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    if target.kind.name == "cuda":  # kernels to PTX for the device's arch (NVRTC, no GPU needed)
        from ..lower.cuda import enable

        enable()
    with target:
        return export_cross(tvm_build(mod, target=target), cross_compiler)


def make_builder(cross_compiler: str | None, workers: int, timeout_s: float, recycle_every: int = 25):
    """A MetaSchedule builder whose worker processes live across rounds.

    MetaSchedule's LocalBuilder starts new workers for every round, and each of them
    imports ``tvm.s_tir.tensor_intrin`` (25 s on this 2-core host) before building
    anything: on small models that was >90 % of tuning time. Candidates arrive already
    scheduled (tensorized blocks included), so building them needs no intrinsic table.
    Workers are recycled every ``recycle_every`` rounds (LocalBuilder's reason for
    restarting them is a slow memory leak).
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class CrossBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool = None
            self.rounds = 0

        def build(self, build_inputs):
            if self.pool is None or self.rounds >= recycle_every:
                if self.pool is not None:
                    self.pool.shutdown()
                self.pool = PopenPoolExecutor(max_workers=workers, timeout=timeout_s)
                self.rounds = 0
            self.rounds += 1
            results = []
            jobs = [(inp.mod, inp.target, cross_compiler) for inp in build_inputs]
            for res in self.pool.map_with_error_catching(lambda job: build_candidate(*job), jobs):
                if res.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(res.value, None))
                elif res.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {timeout_s} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {res.value}"))
            return results

    return CrossBuilder()


def make_runner(tracker: tuple[str, int], key: str, workers: int, session_timeout_s: int,
                device_log: Path, emulated: bool):
    from tvm.s_tir import meta_schedule as ms

    rpc_config = ms.runner.RPCConfig(tracker_host=tracker[0], tracker_port=tracker[1], tracker_key=key,
                                     session_timeout_sec=session_timeout_s)
    # Emulated devices are 10-30x slower: fewer, shorter runs; real ones: a steadier mean.
    # Caches are not flushed between runs: tried on resnet18 (2026-12-07, Intel VM with a
    # 480 MB L3), flushed timings were 2-3x the kernels' times inside the model and the
    # records picked by them made it 1.24x slower than the default rules.
    evaluator = ms.runner.EvaluatorConfig(number=1 if emulated else 3, repeat=2 if emulated else 3,
                                          min_repeat_ms=0 if emulated else 40, enable_cpu_cache_flush=False)
    runner = ms.runner.RPCRunner(rpc_config, evaluator, max_workers=workers,
                                 f_create_session=functools.partial(create_session_logged,
                                                                    log_path=str(device_log)))
    # RPCRunner's pool has no time-out (its session_timeout_sec only names the error), so
    # a measurement stuck on a dead socket would stall tuning forever. A pool with a
    # time-out kills such a worker and reports the candidate as timed out.
    from tvm.support.popen_pool import PopenPoolExecutor

    runner.pool.shutdown()
    runner.pool = PopenPoolExecutor(max_workers=workers, timeout=2 * session_timeout_s + 30)
    return runner


def serial_runner(runner):
    """``runner``, answering only once every candidate it was given has been measured.

    MetaSchedule's task scheduler does not wait for a batch's measurements: it goes on to
    the next task and builds its candidates (LLVM, in the builder's worker processes) while
    the device times the last batch. On a device that is this machine (the local server,
    qemu) those builds take the cores the candidate is being timed on, and the timings
    measure the contention. Waiting costs the overlap of building and measuring, which such
    a device cannot give.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture

    @derived_object
    class Measured(PyRunnerFuture):
        def __init__(self, result) -> None:
            super().__init__()
            self.value = result

        def done(self) -> bool:
            return True

        def result(self):
            return self.value

    @derived_object
    class SerialRunner(PyRunner):
        def __init__(self) -> None:
            super().__init__()
            self.pool = runner.pool  # shut down by the tuner when it ends

        def run(self, runner_inputs):
            return [Measured(f.result()) for f in runner.run(runner_inputs)]

    return SerialRunner()


def devices_used(device_log: Path) -> int:
    if not device_log.exists():
        return 0
    return len({ln.strip() for ln in device_log.read_text().splitlines() if ln.strip()})
