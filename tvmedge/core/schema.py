"""The one versioned shape of every ``--json`` output (``schema: "tvmedge/1"``).

Every object a ``--json`` flag prints is an *envelope*::

    {"schema": "tvmedge/1", "command": "run", "device": {...}, "latency_ms": {...}, ...}

- ``latency_ms`` is a latency block: ``{"median", "p90", "min", "mean", "runs"}``, all in
  milliseconds except ``runs`` (how many timed runs the figures summarise). A measurement
  compared against others puts them in ``baselines``: ``{"untuned": {"latency_ms": {...}},
  "onnxruntime": {"latency_ms": {...}} or null}``, each a latency block again.
- ``device`` says where the figures were measured: ``{"name", "target", "kind", "via", ...}``
  with ``kind`` one of ``hardware`` (a real machine: this host or a board), ``emulated``
  (qemu: functional only, never a board's speed) or ``simulated`` (a cycle/behavioural
  simulator). A figure whose device kind is not ``hardware`` must never be read as a device's.
- Units are in field names (``_ms``, ``_seconds``, ``_bytes``, ``_gops``), never implied.

:data:`JSON_SCHEMA` is the machine-readable document (JSON Schema draft 2020-12); the
README's "JSON output" section describes the same. :func:`validate` checks an object with
the ``jsonschema`` package. Stages build their blocks with :func:`latency_block` and
:func:`device_block` and wrap the result with :func:`envelope`.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any, Iterable, Mapping

SCHEMA = "tvmedge/1"
DEVICE_KINDS = ("hardware", "emulated", "simulated")


def latency_block(latencies_ms: Iterable[float] | Mapping[str, Any]) -> dict[str, Any]:
    """A latency block from raw latencies (ms), or an existing summary normalised to one.

    A summary (``{"median": ..}``) must carry ``runs`` or it cannot be told apart from one run.
    """
    if isinstance(latencies_ms, Mapping):
        s = dict(latencies_ms)
        missing = [k for k in ("median", "p90", "min", "mean", "runs") if k not in s]
        if missing:
            raise ValueError(f"latency summary lacks {', '.join(missing)}")
        return {k: (int(s[k]) if k == "runs" else float(s[k])) for k in ("median", "p90", "min", "mean", "runs")}
    import numpy as np

    lat = np.asarray(list(latencies_ms), dtype=float)
    if lat.size == 0:
        raise ValueError("no latencies to summarise")
    return {"median": float(np.median(lat)), "p90": float(np.percentile(lat, 90)),
            "min": float(lat.min()), "mean": float(lat.mean()), "runs": int(lat.size)}


@lru_cache(maxsize=1)
def host_cpu() -> str:
    """This machine's CPU model as the OS names it (``/proc/cpuinfo``), else the platform's."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model", "uarch") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_block(name: str, target: Any = None, kind: str = "hardware", via: str = "local",
                 key: str | None = None, cpu: str | None = None, **extra: Any) -> dict[str, Any]:
    """Where a figure was measured.

    ``via`` is ``local`` (this process), ``rpc`` (a TVM RPC server) or ``none`` (nothing ran:
    compile); ``key`` the tracker key for RPC; ``cpu`` the CPU model when known (the host's is
    filled in for ``local``). ``target`` is the TVM target (dict) or a tag/name.
    """
    if kind not in DEVICE_KINDS:
        raise ValueError(f"device kind {kind!r} is not one of {', '.join(DEVICE_KINDS)}")
    block: dict[str, Any] = {"name": str(name), "target": target, "kind": kind, "via": via}
    if key is not None:
        block["key"] = key
    if cpu is None and via == "local":
        cpu = host_cpu()
    if cpu is not None:
        block["cpu"] = cpu
    block.update(extra)
    return block


def kind_label(kind: str) -> str:
    """The text label a human reads next to a figure: '' for hardware, ' (emulated)' etc."""
    return "" if kind == "hardware" else f" ({kind})"


def envelope(command: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` stamped with the schema version and the command that printed it."""
    out = {"schema": SCHEMA, "command": command}
    out.update({k: v for k, v in body.items() if k not in ("schema", "command")})
    return out


# ---------------------------------------------------------------- the document
_NUM = {"type": "number"}
_LATENCY = {
    "type": "object",
    "required": ["median", "p90", "min", "mean", "runs"],
    "properties": {"median": _NUM, "p90": _NUM, "min": _NUM, "mean": _NUM,
                   "runs": {"type": "integer", "minimum": 1}},
}
_DEVICE = {
    "type": "object",
    "required": ["name", "target", "kind", "via"],
    "properties": {
        "name": {"type": "string"},
        "target": {"type": ["object", "string", "null"]},
        "kind": {"enum": list(DEVICE_KINDS)},
        "via": {"enum": ["local", "rpc", "none"]},
        "key": {"type": "string"},
        "cpu": {"type": "string"},
    },
}


def _needs(command: str, *fields: str) -> dict[str, Any]:
    return {"if": {"properties": {"command": {"const": command}}},
            "then": {"required": list(fields)}}


JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://tvmedge.invalid/schema/tvmedge-1.json",
    "title": "tvmedge --json output, version 1",
    "type": "object",
    "required": ["schema", "command"],
    "$defs": {"latency": _LATENCY, "device": _DEVICE},
    "properties": {
        "schema": {"const": SCHEMA},
        "command": {"type": "string", "pattern": r"^[a-z][a-z0-9_-]*( [a-z][a-z0-9_-]*)*$"},
        "device": {"$ref": "#/$defs/device"},
        "latency_ms": {"$ref": "#/$defs/latency"},
        "baselines": {
            "type": "object",
            "additionalProperties": {
                "anyOf": [{"type": "null"},
                          {"type": "object", "required": ["latency_ms"],
                           "properties": {"latency_ms": {"$ref": "#/$defs/latency"},
                                          "device": {"$ref": "#/$defs/device"}}}]},
        },
        "items": {"type": "array"},
        "rows": {"type": "array", "items": {
            "type": "object",
            "properties": {"latency_ms": {"$ref": "#/$defs/latency"},
                           "device": {"$ref": "#/$defs/device"}}}},
    },
    "allOf": [
        _needs("run", "device", "latency_ms", "outputs"),
        _needs("tune", "device", "tasks", "trials_budget", "trials_run"),
        _needs("compile", "device", "inputs", "outputs"),
        _needs("kernels bench", "device", "rows"),
        _needs("zoo list", "items"),
        _needs("device list", "items"),
        _needs("optimize", "rewrites"),
    ],
}


def validate(obj: Any) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``obj`` follows :data:`JSON_SCHEMA`."""
    import jsonschema

    jsonschema.validate(obj, JSON_SCHEMA, cls=jsonschema.Draft202012Validator)


def device_kind_from_flags(emulated: bool = False, simulated: bool = False) -> str:
    """``hardware`` / ``emulated`` / ``simulated`` from two booleans (simulated wins)."""
    return "simulated" if simulated else "emulated" if emulated else "hardware"


def env_device_kind() -> str | None:
    """``TVMEDGE_DEVICE_KIND`` if set to a valid kind (how an RPC server launched by
    ``tvmedge device emulate`` tells its own process what it is), else None."""
    kind = os.environ.get("TVMEDGE_DEVICE_KIND")
    return kind if kind in DEVICE_KINDS else None
