"""The devices candidates are measured on: :class:`DevicePool` (a tracker, a key, how many
free devices, whether they are emulated) and :func:`device_pool`, which finds the user's
devices or starts local ones for the duration of a ``with`` block.

Tuning, ``tvmedge tune``'s end-to-end comparison, the demo and the benchmarks all measure
through one of these.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..core.errors import TvmedgeError
from ..deploy.address import parse_host_port
from ..deploy.launch import start_server, start_tracker
from ..deploy.session import connect, device_info
from ..deploy.tracker import list_devices


@dataclass
class DevicePool:
    """Devices registered at ``tracker`` under ``key``."""

    tracker: tuple[str, int]
    key: str
    free: int = 1
    emulated: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # what the device said it is (deploy.session.device_info)
    shares_host: bool = False  # the devices run on this machine's cores (a local server, qemu)

    @property
    def kind(self) -> str:
        """hardware | emulated | simulated (``emulated=True`` from the user wins over what the device says)."""
        return "emulated" if self.emulated else str(self.info.get("kind", "hardware"))

    def alive(self, polls: int = 6, interval_s: float = 1.0) -> bool:
        """Whether a server is still registered under the key (a few polls, to ride out a reconnect)."""
        for attempt in range(polls):
            try:
                if any(d["key"] == self.key and d["total"] > 0 for d in list_devices(self.tracker)):
                    return True
            except TvmedgeError:
                pass
            if attempt + 1 < polls:
                time.sleep(interval_s)
        return False

    def connect(self, timeout: float = 300) -> Any:
        """An RPC session on one of the devices."""
        return connect(tracker=self.tracker, key=self.key, timeout=timeout)


@contextlib.contextmanager
def device_pool(device: Any, tracker: str | None = None, key: str | None = None, emulated: bool = False,
                log: Callable[[str], Any] = print, threads: int | None = None,
                tracker_port: int | None = None) -> Iterator[DevicePool]:
    """The devices to tune and run on, for the duration of the ``with`` block.

    With ``tracker`` (``HOST:PORT``, the CLI's ``--rpc-tracker``) the user's devices are
    used; ``emulated`` says they are emulators (timings are labelled so). Without it,
    tvmedge starts a tracker on loopback and one server: a local one for a host target, an
    emulated device (qemu) for a target that has an emulator, and stops them afterwards.
    ``threads``: the local server's thread pool (candidates are timed with it); default all
    cores. ``tracker_port``: the local tracker's port (default: the first free one of 9190-9199).
    With ``tracker``, one session asks a device what it is: an emulated board (``tvmedge device
    emulate``) says so, and the pool is then labelled emulated whatever ``emulated`` says.
    """
    key = key or device.rpc_key or device.name
    if tracker:
        addr = parse_host_port(tracker)
        free = sum(d.get("free", 0) for d in list_devices(addr) if d["key"] == key)
        if free == 0:
            raise TvmedgeError(f"no free device under key '{key}' at tracker {addr[0]}:{addr[1]} "
                               f"(start one with `tvmedge device serve --tracker {addr[0]}:{addr[1]} --key {key}`)")
        sess = connect(tracker=addr, key=key, timeout=120)
        info = device_info(sess)
        del sess  # free the device for the tuner
        if info.get("kind") == "emulated" and not emulated:
            log(f"[tvmedge] the devices under key '{key}' say they are EMULATED "
                f"({info.get('emulator') or info.get('board')}): timings are labelled so")
        yield DevicePool(addr, key, free, emulated or info.get("kind") == "emulated", info)
        return
    from ..run import arch_of_target
    from ..target import host_target_dict

    native = arch_of_target(device.target_json) == host_target_dict()["mtriple"].split("-")[0]
    if device.device == "cuda" and native:
        from ..lower.cuda import gpu_present

        local_gpu = gpu_present()
    else:
        local_gpu = False
    if not (device.device == "cpu" and native) and not local_gpu and not device.emulator:
        raise TvmedgeError(f"target '{device.name}' is not this machine and has no emulator: "
                           "give --rpc-tracker HOST:PORT --rpc-key KEY of a real device")
    with contextlib.ExitStack() as stack:
        tr = start_tracker(port=tracker_port)
        stack.callback(tr.stop)
        if device.device == "cpu" and native:
            log(f"[tvmedge] local tracker {tr.host}:{tr.port} + a local RPC server (key {key})")
            # TMPDIR: each server's sessions work under its own folder, which is how the
            # measuring side tells devices apart (tvmedge.tune.measure.create_session_logged).
            tmpdir = tempfile.mkdtemp(prefix="tvmedge-dev-")
            stack.callback(shutil.rmtree, tmpdir, ignore_errors=True)
            srv = start_server(tracker=(tr.host, tr.port), key=key,
                                   env={"TVM_NUM_THREADS": str(threads or os.cpu_count() or 1), "TMPDIR": tmpdir},
                                   device_info={"kind": "hardware"})
            stack.callback(srv.stop)
            yield DevicePool((tr.host, tr.port), key, 1, False, {"kind": "hardware"}, shares_host=True)
        elif local_gpu:
            from ..lower.cuda import runtime_env

            log(f"[tvmedge] local tracker {tr.host}:{tr.port} + a local RPC server on this machine's GPU (key {key})")
            tmpdir = tempfile.mkdtemp(prefix="tvmedge-dev-")
            stack.callback(shutil.rmtree, tmpdir, ignore_errors=True)
            srv = start_server(tracker=(tr.host, tr.port), key=key, env={"TMPDIR": tmpdir, **runtime_env()},
                               device_info={"kind": "hardware"})
            stack.callback(srv.stop)
            yield DevicePool((tr.host, tr.port), key, 1, False, {"kind": "hardware"})
        elif device.emulator:
            from ..deploy.emulate import EmulatedDevice

            log(f"[tvmedge] local tracker {tr.host}:{tr.port} + an EMULATED {device.name} (qemu); "
                "its timings are not the real device's")
            stack.enter_context(EmulatedDevice(kind=device.name, tracker=(tr.host, tr.port), key=key))
            yield DevicePool((tr.host, tr.port), key, 1, True, {"kind": "emulated", "board": device.name},
                             shares_host=True)
        else:
            raise TvmedgeError(f"target '{device.name}' is not this machine and has no emulator: "
                               "give --rpc-tracker HOST:PORT --rpc-key KEY of a real device")


def measure_model(model: Any, device: Any, pool: DevicePool, db_dir: str | os.PathLike | None, repeat: int,
                  workdir: Path, label: str) -> dict[str, Any]:
    """Compile ``model`` (with all of ``db_dir``'s records, or the default schedules without
    one) and time it on one of the pool's devices; returns the artifact, latency summary,
    outputs."""
    from ..build import compile_model

    art = workdir / f"{label}.tar"
    compile_model(model, device, art, tuning_db=db_dir, keep_faster=False)
    return time_artifact(art, pool, repeat)


def compare_end_to_end(model: Any, device: Any, pool: DevicePool, db_dir: str | os.PathLike, repeat: int,
                       emulated: bool) -> dict[str, Any]:
    """Time ``model`` built with ``db_dir``'s records and with the default schedules on the
    pool's device, and record in the database which was faster: ``compile`` follows that
    verdict (a model slower with its records gets the defaults). Returns ``{"tuned", "untuned"}``
    (:func:`measure_model`'s results) and the recorded ``"end_to_end"`` verdict."""
    from .database import SLOWER_MARGIN, TuningDatabase, model_key

    with tempfile.TemporaryDirectory(prefix="tvmedge-tune-") as tmp:
        tuned = measure_model(model, device, pool, db_dir, repeat, Path(tmp), "tuned")
        untuned = measure_model(model, device, pool, None, max(3, repeat // 4), Path(tmp), "untuned")
        if tuned["latency_ms"]["median"] > SLOWER_MARGIN * untuned["latency_ms"]["median"]:
            # Each kernel's record is at least as fast as its default schedule when measured
            # alone; end to end that need not hold (noisy or emulated devices). Measure both
            # again, alternating, before deciding.
            tuned, untuned = _ab(tuned, untuned, pool, repeat)
    with TuningDatabase(db_dir, write=True) as db:
        verdict = db.record_end_to_end(model_key(model), device.name, tuned["latency_ms"]["median"],
                                       untuned["latency_ms"]["median"], emulated)
    return {"tuned": tuned, "untuned": untuned, "end_to_end": verdict}


def _ab(tuned: dict[str, Any], untuned: dict[str, Any], pool: DevicePool, repeat: int, rounds: int = 3):
    """Both artifacts timed again in alternation (a device's speed drifts: one long run
    each can favour either); each keeps all its latencies, and its median is recomputed."""
    from ..run import latency_summary

    runs = {"tuned": list(tuned["latencies_ms"]), "untuned": list(untuned["latencies_ms"])}
    for _ in range(rounds):
        for label, art in (("tuned", tuned["artifact"]), ("untuned", untuned["artifact"])):
            runs[label] += time_artifact(art, pool, max(3, repeat // 2))["latencies_ms"]
    return tuple({**first, "latencies_ms": runs[label], "latency_ms": latency_summary(runs[label])}
                 for label, first in (("tuned", tuned), ("untuned", untuned)))


def time_artifact(art: str | os.PathLike, pool: DevicePool, repeat: int) -> dict[str, Any]:
    """Time a compiled artifact on one of the pool's devices."""
    from ..run import run_artifact

    res = run_artifact(art, repeat=repeat, session=pool.connect())
    return {"artifact": str(art), "latency_ms": res.latency_summary(), "outputs": res.outputs,
            "latencies_ms": res.latencies_ms}
