"""Inference spread over a pool of devices behind TVM's RPC tracker (``--pool KEY[,KEY...]``).

:func:`open_pool` asks the tracker for every free server registered under the given keys
(a mixed pool: a CPU host's servers under one key, boards under others), opens one TVM
RPC session on each, and loads the artifact there. :class:`FramePool` then runs a stream
of inputs over those devices and hands the outputs back **in input order**:

* scheduling: ``least-loaded`` sends the next frame to the device with the fewest frames
  in flight (ties: the faster one); ``throughput`` to the one that would finish it first
  given its measured per-frame time (an exponential average) and its queue;
* up to ``inflight`` frames are assigned to each device at once; each device has a
  worker thread that runs its queue over its own session, so a device never waits for
  the dispatcher, decoding or the consumer. A TVM RPC server serves one session and one
  call at a time: the frames in flight on a device are queued on its connection, not run
  in parallel on it. A server on this machine that tvmedge started gets each frame in one
  call through shared memory (:mod:`.shm`: TVM's RPC stream moves payloads a byte at a
  time), others through the RPC stream; each device's summary says which (``payload``);
* a device whose call fails (server killed, connection lost, device error) is dropped
  from the pool and every frame it held is sent again to the others; a result is
  recorded once per frame, so no frame is lost or duplicated. When no device is left,
  :class:`PoolExhausted` says how many frames were delivered (the consumer has them all,
  in order).

The tracker is the distributed engine: the servers are plain ``tvm.exec.rpc_server``
processes (``tvmedge device serve``), found through the tracker's own protocol. A local
run (no tracker) is a pool of one device, so video and run share this one path.
"""

from __future__ import annotations

import collections
import gc
import heapq
import itertools
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..core.artifact import read_artifact
from ..core.errors import TvmedgeError, first_line
from ..core.schema import device_block
from ..run import LoadedModel, load_model_vm
from .address import HostPort, as_host_port, format_host_port
from .session import connect
from .tracker import list_devices, request_server

STRATEGIES = ("least-loaded", "throughput")
_EWMA = 0.3  # weight of the newest frame in a device's per-frame time


class PoolExhausted(TvmedgeError):
    """Every device of the pool was lost; ``delivered`` frames were handed back before that."""

    def __init__(self, msg: str, delivered: int):
        super().__init__(msg)
        self.delivered = delivered


@dataclass
class PoolDevice:
    """One device of a pool: where it is, the model loaded on it, and what it did."""

    name: str  # "local" or "KEY@HOST:PORT"
    key: str
    loaded: LoadedModel
    session: Any = None
    alive: bool = True
    error: str | None = None
    queue: collections.deque = field(default_factory=collections.deque)  # (index, inputs) in flight
    frames: int = 0  # frames it returned
    busy_s: float = 0.0  # time spent in its calls
    ewma_ms: float | None = None
    call_started: float | None = None  # time.monotonic() when its current call began
    lost_frames: int = 0  # frames it held when it was lost (sent again to others)
    block: dict[str, Any] = field(default_factory=dict)  # the schema's device block

    def summary(self, total: int) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "device": self.block, "frames": self.frames,
                "share": self.frames / total if total else 0.0,
                "mean_ms": 1e3 * self.busy_s / self.frames if self.frames else None,
                "alive": self.alive, "error": self.error, "resent_frames": self.lost_frames,
                # how frames travel: "local", "shared memory" (a server on this machine that
                # tvmedge started: deploy.shm) or "rpc" (TVM's RPC stream)
                "payload": ("local" if self.session is None
                            else "shared memory" if self.loaded.vm.link is not None else "rpc")}


class FramePool:
    """Runs inputs over ``devices`` (see the module docstring); use :meth:`map`, then :meth:`stats`."""

    def __init__(self, devices: Sequence[PoolDevice], meta: dict[str, Any], inflight: int = 2,
                 strategy: str = "least-loaded", workdir: str | None = None, stall_s: float = 60.0) -> None:
        if strategy not in STRATEGIES:
            raise TvmedgeError(f"unknown pool strategy '{strategy}' (known: {', '.join(STRATEGIES)})")
        if not devices:
            raise TvmedgeError("the device pool is empty")
        self.devices = list(devices)
        self.meta = meta
        for d in self.devices:
            info = d.loaded.info
            extra = {k: v for k, v in info.items() if k in ("board", "emulator", "arch", "reported") and v is not None}
            d.block = device_block(meta["device"]["name"], meta["target"], str(info.get("kind", "hardware")),
                                   via=d.loaded.where, key=None if d.session is None else d.key, **extra)
        self.inflight = max(1, int(inflight))
        self.strategy = strategy
        self._workdir = workdir
        self._cv = threading.Condition()
        self._closed = False
        self.stall_s = stall_s
        self._retry: list[tuple[int, int, dict[str, np.ndarray]]] = []  # (index, generation, inputs), a heap
        self._results: dict[int, list[np.ndarray]] = {}
        self._next_out = 0
        self._gen = 0  # one per map(): a result left over from an abandoned map() is dropped
        self.resent = 0
        self.duplicates = 0  # results that arrived for a frame already recorded (must stay 0)
        self.delivered = 0
        self.wall_s = 0.0
        self._threads = [threading.Thread(target=self._work, args=(d,), name=f"tvmedge-pool-{d.name}", daemon=True)
                         for d in self.devices]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ workers
    def _work(self, d: PoolDevice) -> None:
        while True:
            with self._cv:
                while d.alive and not d.queue and not self._closed:
                    self._cv.wait()
                if self._closed or not d.alive:
                    return
                item = d.queue[0]  # stays in flight until it returns
                d.call_started = time.monotonic()
                vm = d.loaded.vm
            index, gen, inputs = item
            t0 = time.perf_counter()
            try:
                outputs = vm(inputs)
            except Exception as e:  # noqa: BLE001 - any failure takes the device out of the pool
                with self._cv:
                    if d.alive:
                        self._lose(d, first_line(e) or type(e).__name__)
                return
            dt = time.perf_counter() - t0
            with self._cv:
                d.call_started = None
                if not d.alive:  # declared lost while this call hung; its frames went elsewhere
                    return
                if d.queue and d.queue[0] is item:
                    d.queue.popleft()
                if gen != self._gen:
                    continue
                d.frames += 1
                d.busy_s += dt
                ms = dt * 1e3
                d.ewma_ms = ms if d.ewma_ms is None else (1 - _EWMA) * d.ewma_ms + _EWMA * ms
                if index in self._results or index < self._next_out:
                    self.duplicates += 1
                else:
                    self._results[index] = outputs
                self._cv.notify_all()

    def _lose(self, d: PoolDevice, why: str) -> None:
        """Take ``d`` out of the pool and queue its frames for the others (caller holds the lock)."""
        d.alive = False
        d.error = why
        mine = [item for item in d.queue if item[1] == self._gen]
        d.lost_frames += len(mine)
        self.resent += len(mine)
        for item in mine:
            heapq.heappush(self._retry, item)
        d.queue.clear()
        self._cv.notify_all()

    def _watchdog(self) -> None:
        """A device whose call has not returned for ``stall_s`` (and 20x its usual time) is lost:
        a link that drops without closing the connection never raises (caller holds the lock)."""
        now = time.monotonic()
        for d in self.devices:
            started = d.call_started
            if d.alive and started is not None:
                limit = max(self.stall_s, 0.02 * (d.ewma_ms or 0.0))
                if now - started > limit:
                    self._lose(d, f"no answer within {limit:.0f} s")

    # ------------------------------------------------------------ dispatch
    def _choose(self, candidates: list[PoolDevice]) -> PoolDevice:
        if self.strategy == "throughput":
            known = [d.ewma_ms for d in candidates if d.ewma_ms is not None]
            guess = min(known) if known else 1.0
            return min(candidates, key=lambda d: ((len(d.queue) + 1) * (d.ewma_ms or guess), d.name))
        return min(candidates, key=lambda d: (len(d.queue), d.ewma_ms or 0.0, d.name))

    def map(self, frames: Iterable[dict[str, np.ndarray]]) -> Iterator[list[np.ndarray]]:
        """The outputs of each input dict of ``frames``, in order (inputs are pulled lazily)."""
        source = iter(frames)
        next_in = 0
        exhausted = False
        window = max(16, 4 * self.inflight * len(self.devices))  # bound on frames held for reordering
        t0 = time.perf_counter()
        self._cv.acquire()
        self._gen += 1
        self._retry.clear()
        self._results.clear()
        self._next_out = 0
        for d in self.devices:  # frames an abandoned map() left queued (the one running is dropped on return)
            while len(d.queue) > (1 if d.call_started is not None else 0):
                d.queue.pop()
        try:
            while True:
                # hand frames to devices with room
                while True:
                    live = [d for d in self.devices if d.alive]
                    if not live:
                        lost = "; ".join(f"{d.name}: {d.error}" for d in self.devices)
                        raise PoolExhausted(f"all devices of the pool were lost after {self.delivered} frames "
                                            f"({lost})", self.delivered)
                    room = [d for d in live if len(d.queue) < self.inflight]
                    if not room:
                        break
                    if self._retry:
                        item = heapq.heappop(self._retry)
                    elif not exhausted and next_in - self._next_out < window:
                        self._cv.release()  # decoding the next frame may take a while
                        try:
                            inputs = next(source, None)
                        finally:
                            self._cv.acquire()
                        if inputs is None:
                            exhausted = True
                            continue
                        item = (next_in, self._gen, inputs)
                        next_in += 1
                    else:
                        break
                    self._choose(room).queue.append(item)
                    self._cv.notify_all()
                # hand back the next result in order
                if self._next_out in self._results:
                    out = self._results.pop(self._next_out)
                    self._next_out += 1
                    self.delivered += 1
                    self._cv.release()
                    try:
                        yield out
                    finally:
                        self._cv.acquire()
                    continue
                if exhausted and self._next_out == next_in:
                    break
                self._cv.wait(timeout=0.5)
                self._watchdog()
        finally:
            self.wall_s += time.perf_counter() - t0
            self._cv.release()

    def stats(self) -> dict[str, Any]:
        """Frames delivered, wall time, FPS, frames sent again, and each device's share."""
        total = sum(d.frames for d in self.devices)
        return {"strategy": self.strategy, "inflight": self.inflight, "frames": self.delivered,
                "wall_s": self.wall_s, "fps": self.delivered / self.wall_s if self.wall_s else None,
                "resent_frames": self.resent, "duplicate_results": self.duplicates,
                "devices": [d.summary(total) for d in self.devices]}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=5.0)
        for d in self.devices:
            d.loaded = None  # type: ignore[assignment]
            d.session = None
        gc.collect()  # RPC sessions in reference cycles keep their servers busy until collected
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> "FramePool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def parse_keys(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` (the CLI's ``--pool``)."""
    keys = [k.strip() for k in str(text).split(",") if k.strip()]
    if not keys:
        raise TvmedgeError(f"--pool needs one or more device keys, got '{text}'")
    return keys


def open_pool(artifact: str | Path, tracker: HostPort | str | None = None, keys: Sequence[str] = (),
              *, session: Any = None, session_name: str = "rpc", inflight: int = 2, strategy: str = "least-loaded",
              threads: int | None = None, timeout: float = 60.0, stall_s: float = 60.0, log=None) -> FramePool:
    """A :class:`FramePool` over every free server under ``keys`` at ``tracker``; or over the
    one device behind an open RPC ``session``; or, with neither, this machine alone; with
    ``artifact`` loaded on each device."""
    workdir = tempfile.mkdtemp(prefix="tvmedge-pool-")
    devices: list[PoolDevice] = []
    try:
        lib_path, meta = read_artifact(artifact, workdir)
        if session is not None:
            devices.append(PoolDevice(session_name, session_name,
                                      load_model_vm(lib_path, meta, session=session, threads=threads), session=session))
        elif tracker is None:
            devices.append(PoolDevice("local", "local", load_model_vm(lib_path, meta, threads=threads)))
        else:
            tracker = as_host_port(tracker)
            where = format_host_port(tracker)
            listed = {d["key"]: d for d in list_devices(tracker)}
            for key in keys:
                entry = listed.get(key)
                if not entry or not entry["total"]:
                    continue
                deadline = time.monotonic() + timeout
                # every free one now; if all are busy, wait (up to timeout) for one
                for n in range(max(1, entry["free"])):
                    try:
                        url, port, matchkey = request_server(tracker, key, deadline if n == 0 else time.monotonic() + 2.0,
                                                             timeout)
                        sess = connect(host_port=(url, int(port)), key=matchkey, timeout=timeout)
                    except TvmedgeError as e:
                        if n == 0 and log is not None:
                            log(f"pool: no device under '{key}' ({e})")
                        break
                    name = f"{key}@{format_host_port((url, int(port)))}"
                    devices.append(PoolDevice(name, key, load_model_vm(lib_path, meta, session=sess, threads=threads),
                                              session=sess))
            if not devices:
                keys_there = ", ".join(sorted(listed)) or "none"
                raise TvmedgeError(f"the device pool is empty: no server under {', '.join(keys)} at RPC tracker "
                                   f"{where} (keys there: {keys_there})")
        return FramePool(devices, meta, inflight=inflight, strategy=strategy, workdir=workdir, stall_s=stall_s)
    except BaseException:
        devices.clear()
        gc.collect()
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def repeat_frames(inputs: dict[str, np.ndarray], count: int) -> Iterator[dict[str, np.ndarray]]:
    """The same inputs ``count`` times (``tvmedge run --pool``'s stream)."""
    return itertools.repeat(inputs, count)


def run_over_pool(artifact: str | Path, inputs: dict[str, np.ndarray], tracker: HostPort | str,
                  keys: Sequence[str], frames: int, *, inflight: int = 2, strategy: str = "least-loaded",
                  threads: int | None = None, timeout: float = 60.0) -> tuple[list[np.ndarray], dict[str, Any]]:
    """``tvmedge run --pool``: ``frames`` copies of ``inputs`` through the pool; the first
    frame's outputs and the pool's stats (plus whether every frame gave the same outputs)."""
    first: list[np.ndarray] | None = None
    same = True
    with open_pool(artifact, tracker, keys, inflight=inflight, strategy=strategy, threads=threads,
                   timeout=timeout) as pool:
        for outs in pool.map(repeat_frames(inputs, max(1, frames))):
            if first is None:
                first = outs
            else:
                same = same and all(np.array_equal(a, b) for a, b in zip(first, outs))
        stats = pool.stats()
    stats["outputs_identical"] = same
    stats["keys"] = list(keys)
    return first or [], stats
