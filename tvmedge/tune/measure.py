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
from pathlib import Path


def export_cross(mod, cross_compiler: str | None = None) -> str:
    """Builder export: a shared library linked for the device."""
    path = os.path.join(tempfile.mkdtemp(prefix="tvmedge-cand-"), "candidate.so")
    if cross_compiler:
        from tvm.support import cc

        mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    else:
        mod.export_library(path)
    return path


def create_session_logged(rpc_config, log_path: str | None = None):
    """Request a device from the tracker; note which server answered (for the farm report)."""
    session = rpc_config.connect_server()
    if log_path:
        try:
            where = session.get_function("tvm.rpc.server.workpath")("")
        except Exception:  # older servers: count the session only
            where = "unknown"
        with open(log_path, "a") as f:
            f.write(os.path.dirname(where.rstrip("/")) + "\n")
    return session


def make_builder(cross_compiler: str | None, workers: int, timeout_s: float):
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(max_workers=workers, timeout_sec=timeout_s,
                                   f_export=functools.partial(export_cross, cross_compiler=cross_compiler))


def make_runner(tracker: tuple[str, int], key: str, workers: int, session_timeout_s: int,
                device_log: Path, emulated: bool):
    from tvm.s_tir import meta_schedule as ms

    rpc_config = ms.runner.RPCConfig(tracker_host=tracker[0], tracker_port=tracker[1], tracker_key=key,
                                     session_timeout_sec=session_timeout_s)
    # Emulated devices are 10-30x slower: fewer, shorter runs; real ones: a steadier mean.
    evaluator = ms.runner.EvaluatorConfig(number=1 if emulated else 3, repeat=2 if emulated else 3,
                                          min_repeat_ms=0 if emulated else 40, enable_cpu_cache_flush=False)
    return ms.runner.RPCRunner(rpc_config, evaluator, max_workers=workers,
                               f_create_session=functools.partial(create_session_logged,
                                                                  log_path=str(device_log)))


def devices_used(device_log: Path) -> int:
    if not device_log.exists():
        return 0
    return len({ln.strip() for ln in device_log.read_text().splitlines() if ln.strip()})
