"""Compile an imported Relax model for a target into a deployable artifact (``.tar``).

The artifact holds ``model.so`` (the Relax VM executable and its kernels, linked for the
device — cross-linked with the target's compiler — with the weights embedded as
constants) and ``metadata.json`` (inputs, outputs, target, TVM version, model hash,
rewrites and tuning database applied). The device needs only the plain TVM runtime:
``tvm.runtime.load_module`` + ``relax.VirtualMachine``.

Target-specific rewrites run first (:func:`prepare`): on CPUs with an int8 dot-product
instruction (x86 AVX-512 VNNI, AArch64 ``dotprod``) the int8 conv2d / matmul ops go to
hand-scheduled kernels (:mod:`tvmedge.lower.int8_dot`; on CUDA sm_61+, e.g. Jetson Xavier, to
``dp4a`` kernels, :mod:`tvmedge.lower.dp4a`; ``TVMEDGE_INT8_DOT=0`` turns both off), recorded
in the artifact's ``rewrites``. Then :mod:`tvmedge.lower.pipeline` fuses the graph (NHWC on
CPUs) and schedules every kernel: from tuning records where a database has them (the
user's, or the ones shipped for the target's ISA class), else with tvmedge's default rules;
the metadata's ``schedules`` counts which kernels got what.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .core.artifact import FORMAT_VERSION, LIB_NAME, file_sha256, write_artifact
from .core.errors import TvmedgeError, first_line
from .core.model import ImportedModel
from .target import Device



def prepare(model: ImportedModel, device: Device) -> ImportedModel:
    """``model`` with the rewrites its target calls for (int8 on dot-product kernels where the
    CPU has them, on ``dp4a`` kernels for CUDA sm_61+)."""
    from .lower import dp4a, int8_dot

    try:
        return (dp4a.apply if device.device == "cuda" else int8_dot.apply)(model, device.target)
    except Exception as e:
        raise TvmedgeError(f"int8 dot-product rewrite for {device.name} failed: {first_line(e)}") from e


def half_precision(model: ImportedModel, device: Device) -> ImportedModel:
    """``model`` computing in fp16 (checked against fp32), for a CUDA device."""
    if device.device != "cuda":
        raise TvmedgeError(f"--fp16 is for CUDA targets (Jetson: fp16 at twice the fp32 rate); {device.name} is a CPU")
    if any(r.get("name") == "fp16" for r in model.rewrites):
        return model
    from .lower.fp16 import to_fp16

    return to_fp16(model)


def build_executable(model: ImportedModel, device: Device,
                     tuning_db: str | os.PathLike | list | None = None):
    """Compile the Relax module to a VM executable: tuning records where given, tvmedge's
    default schedules (``tvmedge.lower``) for every other kernel. Returns the executable
    and the :class:`~tvmedge.lower.pipeline.ScheduleReport`."""
    from .lower.pipeline import build

    model = prepare(model, device)  # a no-op when compile_model already did it
    try:
        if tuning_db:
            from .tune.pipeline import apply_database

            return apply_database(model.mod, device.target, tuning_db)
        return build(model.mod, device.target)
    except TvmedgeError:
        raise
    except Exception as e:
        raise TvmedgeError(f"compilation for {device.name} failed: {first_line(e)}") from e


def lower(model: ImportedModel, device: Device, tuning_db: str | os.PathLike | list | None = None):
    """The VM executable of :func:`build_executable`."""
    return build_executable(model, device, tuning_db)[0]


def export_library(executable, device: Device, path: str | os.PathLike) -> None:
    """Write the shared library, cross-linked for the device when it is not this machine."""
    fcompile = device.linker()
    try:
        if fcompile is None:
            executable.export_library(str(path))
        else:
            executable.export_library(str(path), fcompile=fcompile)
    except Exception as e:
        raise TvmedgeError(f"linking the library for {device.name} failed: {first_line(e)}") from e


def metadata(model: ImportedModel, device: Device, tuning_db: str | None, seconds: float) -> dict[str, Any]:
    import tvm

    return {
        "format_version": FORMAT_VERSION,
        "library": LIB_NAME,
        "inputs": [i.to_dict() for i in model.inputs],
        "outputs": [o.to_dict() for o in model.outputs],
        "target": device.target_json,
        "device": {"name": device.name, "kind": device.device, "rpc_key": device.rpc_key,
                   "cross_compiler": device.cross_compiler, "report": device.report},
        "tvm_version": tvm.__version__,
        "model": {"source": os.path.basename(model.source), "format": model.format, "sha256": model.sha256},
        "rewrites": model.rewrites,
        "tuning_db": str(tuning_db) if tuning_db else None,
        "weights": "embedded in the library as constants",
        "compile_seconds": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def compile_model(model: ImportedModel, device: Device, out: str | os.PathLike,
                  tuning_db: str | os.PathLike | None = None, use_shipped: bool = False,
                  keep_faster: bool = True, fp16: bool = False) -> dict[str, Any]:
    """Compile ``model`` for ``device`` and write the artifact ``out`` atomically.

    ``use_shipped``: without a ``tuning_db``, apply the databases shipped in ``schedules/``
    for the target's ISA class (and the classes it is a superset of), if any.
    ``keep_faster``: when ``tvmedge tune`` measured this model, tuned with ``tuning_db``,
    slower end to end on this target than with the default schedules, compile with the
    defaults (the metadata's ``tuning_db_skipped`` says why).
    ``fp16``: compute in fp16 (CUDA targets; :mod:`tvmedge.lower.fp16`, checked against fp32).
    """
    out = Path(out)
    if out.suffix != ".tar":
        raise TvmedgeError(f"artifact name must end in .tar: {out}")
    t0 = time.perf_counter()
    vta = None
    if device.accelerator is not None:
        model, vta, tuning_db = _offload(model, device, tuning_db)
    if fp16:
        model = half_precision(model, device)
    skipped = None
    if isinstance(tuning_db, (str, os.PathLike)) and keep_faster:
        skipped = _slower_than_default(model, device, tuning_db)
        if skipped:
            tuning_db = None
    if tuning_db is None and use_shipped:
        from .tune.shipped import shipped_databases

        shipped = shipped_databases(device)
        if shipped:
            tuning_db = shipped
    model = prepare(model, device)  # here too, so that the metadata lists the rewrite
    executable, schedules = build_executable(model, device, tuning_db)
    if isinstance(tuning_db, list):
        tuning_db = ", ".join(str(p) for p in tuning_db) + " (shipped)"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tvmedge-build-") as tmp:
        lib = Path(tmp) / LIB_NAME
        export_library(executable, device, lib)
        meta = metadata(model, device, str(tuning_db) if tuning_db else None, time.perf_counter() - t0)
        meta["library_bytes"] = lib.stat().st_size
        meta["library_sha256"] = file_sha256(lib)
        meta["schedules"] = schedules.to_dict()
        if device.device == "cuda":
            meta["device_code"] = _device_code(lib, device)
        meta["tuning_db_skipped"] = skipped
        if vta is not None:
            meta["vta"] = vta
        write_artifact(out, lib, meta)
    return meta


def _offload(model: ImportedModel, device: Device, tuning_db: Any) -> tuple[ImportedModel, dict[str, Any], Any]:
    """Send the int8 layers a VTA target's core takes to it (:mod:`tvmedge.vta`), with the
    tiling choices ``tvmedge tune`` recorded in ``tuning_db``; returns the model, the report
    of where each layer went, and the database to build the host part with (None when it
    holds only accelerator records)."""
    from .tune.database import count_records
    from .vta.offload import offload
    from .vta.tune import choices

    db = tuning_db if isinstance(tuning_db, (str, os.PathLike)) else None
    model, info = offload(model, device.accelerator, choices(db, device.accelerator.name), warn=lambda m: None)
    if db is not None and count_records(db) == 0:
        tuning_db = None
    return model, info, tuning_db
def _device_code(lib: Path, device: Device) -> dict[str, Any]:
    """What GPU code the library embeds (PTX/cubin and for which arch); refuses CUDA source."""
    from .lower.cuda import describe_library, enable

    info = {**describe_library(lib), **{k: v for k, v in enable().items() if k != "format"}}
    arch = str(device.target.attrs.get("arch", ""))
    found = info.get("ptx_targets") or info.get("cubin_targets") or []
    if info["format"] not in ("ptx", "cubin") or (arch and found != [arch]):
        raise TvmedgeError(f"the library built for {device.name} holds no loadable GPU code for {arch} "
                           f"({info['format']} {', '.join(found)}): not writing it")
    return info


def _slower_than_default(model: ImportedModel, device: Device, tuning_db: str | os.PathLike) -> str | None:
    """Why ``tuning_db``'s records are not applied to ``model`` (None: they are)."""
    from .tune.database import TuningDatabase, model_key

    try:
        verdict = TuningDatabase(tuning_db).end_to_end(model_key(model), device.name)
    except TvmedgeError:
        return None  # no readable database: building with it will say so
    if verdict is None or verdict["faster"] != "default":
        return None
    tag = " (emulated)" if verdict.get("emulated") else ""
    return (f"tvmedge tune measured this model slower end to end with these records than with the default "
            f"schedules on {device.name}{tag} ({verdict['tuned_ms']:.3f} vs {verdict['default_ms']:.3f} ms): "
            "compiled with the default schedules (--always-apply-records to apply them anyway)")
