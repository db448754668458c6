"""The model every stage passes along: a Relax module with its tensor specs, and the
``.relax`` file that stores it (what ``tvmedge optimize`` writes, and what every command reads
back). Imports nothing from tvmedge outside ``core``.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import file_sha256
from .errors import TvmedgeError, first_line

RELAX_FILE_VERSION = 1


@dataclass
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], list(d["shape"]), d["dtype"])


@dataclass
class ImportedModel:
    mod: Any  # tvm.IRModule with a Relax "main"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    format: str
    source: str
    sha256: str
    rewrites: list[dict[str, Any]] = field(default_factory=list)


def save_relax(model: ImportedModel, path: str | os.PathLike) -> Path:
    """Write ``model`` as a ``.relax`` file (what ``tvmedge optimize`` produces).

    A zip holding ``module.json`` (the IRModule, weights included, from ``tvm.ir.save_json``)
    and ``model.json`` (inputs, outputs, source format and hash, rewrites applied). Written
    to a temporary name and renamed, so an interrupted write leaves no half file.
    """
    import tvm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"version": RELAX_FILE_VERSION, "inputs": [i.to_dict() for i in model.inputs],
            "outputs": [o.to_dict() for o in model.outputs], "source_format": model.format,
            "source": model.source, "source_sha256": model.sha256, "rewrites": model.rewrites,
            "tvm_version": tvm.__version__}
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            z.writestr("model.json", json.dumps(meta, indent=1))
            z.writestr("module.json", tvm.ir.save_json(model.mod))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_relax(path: str | os.PathLike, shapes: dict[str, list[int]] | None = None) -> ImportedModel:
    """Read a ``.relax`` file written by :func:`save_relax`; its input shapes are static already."""
    import tvm

    path = Path(path)
    shapes = shapes or {}
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read("model.json"))
            mod = tvm.ir.load_json(z.read("module.json").decode())
    except Exception as e:
        raise TvmedgeError(f"cannot read Relax model {path.name} (corrupt or truncated?): {first_line(e)}") from None
    if meta.get("version") != RELAX_FILE_VERSION:
        raise TvmedgeError(f"{path.name} is a version {meta.get('version')} .relax file; "
                           f"this tvmedge reads version {RELAX_FILE_VERSION}")
    if shapes:
        raise TvmedgeError(f"{path.name} has static input shapes already; --input-shape is not needed")
    return ImportedModel(mod=mod, inputs=[TensorSpec.from_dict(d) for d in meta["inputs"]],
                         outputs=[TensorSpec.from_dict(d) for d in meta["outputs"]], format="relax",
                         source=str(path), sha256=file_sha256(path), rewrites=list(meta.get("rewrites", [])))


def random_inputs(specs: list[dict[str, Any]], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs for tensor specs (as dicts): normal floats, small integers, booleans."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        dt = np.dtype(s["dtype"])
        if np.issubdtype(dt, np.floating):
            out[s["name"]] = rng.standard_normal(s["shape"]).astype(dt)
        elif np.issubdtype(dt, np.integer):
            out[s["name"]] = rng.integers(0, 10, size=s["shape"]).astype(dt)
        else:
            out[s["name"]] = rng.random(s["shape"]) > 0.5
    return out
