"""Run a compiled artifact, here or on a remote device through TVM RPC, and time it.

Remote runs upload the library, load it on the device, run the Relax VM there and time
it with the device's own timer (``time_evaluator``), so the latency is the device's.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .core.artifact import read_artifact
from .core.model import random_inputs
from .core.errors import TvmedgeError
from .core.schema import device_block, envelope, latency_block
from .core.vm import ModelVM


def latency_summary(latencies_ms: list[float]) -> dict[str, float]:
    """The schema's latency block: median, 90th percentile, min, mean (ms) and runs."""
    return latency_block(latencies_ms)


@dataclass
class RunResult:
    outputs: list[np.ndarray]
    latencies_ms: list[float]
    meta: dict[str, Any]
    device: str  # local | rpc
    threads: int
    # What the device said it is (tvmedge.deploy.session.device_info); local runs: this host.
    device_info: dict[str, Any] = field(default_factory=lambda: {"kind": "hardware", "reported": True})
    key: str | None = None  # the RPC key (or server address) it ran under

    @property
    def device_kind(self) -> str:
        """hardware | emulated | simulated."""
        return str(self.device_info.get("kind", "hardware"))

    def device_block(self) -> dict[str, Any]:
        """The schema's device block for where this ran."""
        extra = {k: v for k, v in self.device_info.items() if k in ("board", "emulator", "arch", "reported") and v is not None}
        return device_block(self.meta["device"]["name"], self.meta["target"], self.device_kind,
                            via=self.device, key=self.key, **extra)

    def latency_summary(self) -> dict[str, float]:
        return latency_summary(self.latencies_ms)

    def to_json(self) -> dict[str, Any]:
        outs = [{"name": spec["name"], "shape": list(o.shape), "dtype": str(o.dtype),
                 "mean": float(o.mean()) if o.size else 0.0, "min": float(o.min()) if o.size else 0.0,
                 "max": float(o.max()) if o.size else 0.0}
                for spec, o in zip(self.meta["outputs"], self.outputs)]
        return envelope("run", {"device": self.device_block(), "latency_ms": self.latency_summary(),
                                "threads": self.threads, "outputs": outs})


def load_inputs(path: str | os.PathLike | None, specs: list[dict[str, Any]],
                warn=None) -> dict[str, np.ndarray]:
    """Inputs from an ``.npz`` (by input name, or in input order), else random ones.

    ``warn`` (a callable taking one line) hears what was adapted: an array taken by
    position because no array has the input's name, a dtype cast, arrays left unused.
    """
    if path is None:
        return random_inputs(specs)
    path = Path(path)
    if not path.exists():
        raise TvmedgeError(f"inputs file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise TvmedgeError(f"cannot read inputs {path}: {e}") from None
    if not hasattr(data, "keys"):  # a .npy: one bare array
        if len(specs) != 1:
            raise TvmedgeError(f"{path} holds one array (.npy); the model has {len(specs)} inputs: "
                               "give an .npz with one array per input name")
        data = {specs[0]["name"]: data}
    keys = list(data.keys())
    say = warn or (lambda line: None)
    out, used = {}, set()
    for i, s in enumerate(specs):
        if s["name"] in keys:
            key = s["name"]
        elif len(keys) == len(specs):
            key = keys[i]
            say(f"input '{s['name']}': no array of that name in {path.name}; using '{key}' (by position)")
        else:
            raise TvmedgeError(f"{path} has no array for input '{s['name']}' (has {keys})")
        used.add(key)
        arr = np.asarray(data[key])
        if list(arr.shape) != list(s["shape"]):
            raise TvmedgeError(f"input '{s['name']}' in {path} has shape {list(arr.shape)}, model expects {s['shape']}")
        if arr.dtype != np.dtype(s["dtype"]):
            if not np.can_cast(arr.dtype, s["dtype"], casting="same_kind"):
                raise TvmedgeError(f"input '{s['name']}' in {path} is {arr.dtype}; the model takes {s['dtype']}")
            say(f"input '{s['name']}': {arr.dtype} cast to the model's {s['dtype']}")
        out[s["name"]] = arr.astype(s["dtype"], copy=False)
    unused = [k for k in keys if k not in used]
    if unused:
        say(f"arrays in {path.name} that match no input, not used: {', '.join(unused)}")
    return out


def run_artifact(artifact: str | os.PathLike, inputs: dict[str, np.ndarray] | None = None,
                 repeat: int = 20, threads: int | None = None, session=None,
                 warmup: int = 2) -> RunResult:
    """Load ``artifact`` (locally, or on the device behind ``session``) and time ``main``."""
    with tempfile.TemporaryDirectory(prefix="tvmedge-run-") as tmp:
        lib_path, meta = read_artifact(artifact, tmp)
        inputs = inputs if inputs is not None else random_inputs(meta["inputs"])
        loaded = load_model_vm(lib_path, meta, session=session, threads=threads)
        outputs = loaded.vm(inputs)
        lat = loaded.vm.time_ms(inputs, repeat, warmup)
    return RunResult(outputs=outputs, latencies_ms=lat, meta=meta, device=loaded.where, threads=loaded.threads,
                     device_info=loaded.info)


@dataclass
class LoadedModel:
    """An artifact's library loaded here or on a device: its VM, where, with how many threads."""

    vm: ModelVM
    where: str  # "local" or "rpc"
    threads: int
    info: dict[str, Any]  # what the device says it is (deploy.session.device_info)


def load_model_vm(lib_path: str | os.PathLike, meta: dict[str, Any], session=None,
                  threads: int | None = None) -> LoadedModel:
    """Load an unpacked artifact's library (``read_artifact``) here, or upload and load it on
    the device behind ``session``, and size the runtime's thread pool."""
    import tvm

    lib_path = Path(lib_path)
    kind = meta["device"]["kind"]
    if session is None:
        _check_runs_here(meta)
        if meta.get("vta"):  # offloaded layers call the accelerator's driver function (simulated)
            from .vta.runtime import register

            register()
        # TVM sizes its thread pool once, from TVM_NUM_THREADS (else half the cores on
        # x86, to skip hyper-threads even where there are none): set it before first use.
        os.environ["TVM_NUM_THREADS"] = str(threads or os.cpu_count() or 1)
        if kind == "cuda":
            _local_gpu()
        lib = tvm.runtime.load_module(str(lib_path))
        dev = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
        config = tvm.get_global_func("runtime.config_threadpool")
        num_threads = tvm.get_global_func("runtime.NumThreads")
        where = "local"
        info = {"kind": "simulated" if meta.get("vta") else "hardware", "arch": arch_of_target(meta["target"]),
                "reported": True}
    else:
        from .deploy.session import device_info

        info = device_info(session)
        _check_runs_there(meta, info)
        if meta.get("vta"):
            _check_vta_device(session, meta)
        # A fresh name per upload: the device's dlopen hands back an already loaded
        # library for a path it has seen, so a second artifact in one session would
        # silently run the first one's code.
        remote_name = f"tvmedge-{uuid.uuid4().hex[:12]}{lib_path.suffix}"
        session.upload(str(lib_path), target=remote_name)
        lib = session.load_module(remote_name)
        dev = session.cuda(0) if kind == "cuda" else session.cpu(0)
        config = session.get_function("runtime.config_threadpool")
        num_threads = session.get_function("runtime.NumThreads")
        where = "rpc"
    if not threads:
        # "All cores" by default: on x86 TVM would otherwise halve the count to skip
        # hyper-threads, even where there are none. On a device: the description's core
        # count, else the target's num-cores (tuning records carry no thread count).
        cores = meta["device"].get("report", {}).get("cores")
        if not isinstance(cores, int):
            cores = target_cores(meta["target"])
        threads = (os.cpu_count() or 1) if session is None else (cores or 0)
    if threads:
        config(1, int(threads))
    link = None
    if session is not None and kind != "cuda" and os.environ.get("TVMEDGE_RPC_SHM", "1") != "0":
        from .deploy.shm import SharedMemoryLink

        link = SharedMemoryLink.open(session)
    vm = ModelVM(lib, dev, [s["name"] for s in meta["inputs"]], link=link)
    return LoadedModel(vm=vm, where=where, threads=int(num_threads()), info=info)


def _check_vta_device(session, meta: dict[str, Any]) -> None:
    """A VTA artifact needs the accelerator's driver function on the device: refuse early, in one line."""
    from .vta.runtime import FUNC_NAME

    try:
        session.get_function(FUNC_NAME)
    except Exception:
        name = meta["vta"].get("accelerator", "vta")
        raise TvmedgeError(f"the device behind this RPC session has no {name} accelerator ({FUNC_NAME} missing): "
                           f"serve it with 'tvmedge device emulate {name}'") from None


def target_cores(target: dict[str, Any]) -> int | None:
    """The ``num-cores`` of a target's CPU (its host's for a GPU target), if it says."""
    host = target if target.get("kind") == "llvm" else (target.get("host") or target)
    cores = host.get("num-cores") if isinstance(host, dict) else None
    return int(cores) if isinstance(cores, int) and cores > 0 else None


def arch_of_target(target: dict[str, Any]) -> str:
    """CPU architecture a target's host code is for (``x86_64``, ``aarch64``, ...)."""
    from .target import host_target_dict

    host = target.get("host", target) if target.get("kind") == "cuda" else target
    return str(host.get("mtriple") or host_target_dict()["mtriple"]).split("-")[0]


def _local_gpu() -> None:
    """TVM's CUDA runtime library loaded here, and a GPU to run on (else one clear error)."""
    from .lower.cuda import gpu_present

    if not gpu_present():
        raise TvmedgeError("artifact is for a CUDA GPU and this machine has none: run it on the device "
                           "with --rpc-tracker/--rpc-key or --rpc-host")


def _check_runs_here(meta: dict[str, Any]) -> None:
    from .target import host_target_dict

    here = host_target_dict()["mtriple"].split("-")[0]
    arch = arch_of_target(meta["target"])
    if arch != here:
        raise TvmedgeError(f"artifact was built for {arch} ({meta['device']['name']}), this machine is {here}: "
                           "run it on the device with --rpc-tracker/--rpc-key or --rpc-host")


def _check_runs_there(meta: dict[str, Any], info: dict[str, Any]) -> None:
    """Refuse, before uploading, an artifact built for another CPU than the device's (when
    the device says which; a server tvmedge did not start does not)."""
    there = info.get("arch")
    arch = arch_of_target(meta["target"])
    if there and arch != there:
        raise TvmedgeError(f"artifact was built for {arch} ({meta['device']['name']}), the device is {there}"
                           f"{' (' + info['board'] + ')' if info.get('board') else ''}: compile it with "
                           "--target for that device")


def save_outputs(path: str | os.PathLike, result: RunResult) -> None:
    """Write outputs to ``.npz`` in output order, keyed by output name (atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial.npz")
    names = [o["name"] for o in result.meta["outputs"]]
    try:
        np.savez(tmp, **{n: o for n, o in zip(names, result.outputs)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
