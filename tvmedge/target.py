"""Resolve what the user calls a target into a TVM target plus what a device needs.

A target can be the name of a device description in ``targets/`` (``host``, ``pi4``,
``jetson-nano``, ...), a TVM target tag (``raspberry-pi/4b-aarch64``) or a JSON target
(``{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}``). Device descriptions are data
(:mod:`tvmedge.devices` reads them): the TVM target, the cross compiler to link with, the
default RPC key and the numbers a report needs, with their source.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .devices import (accelerator_of, cross_arch, cross_compiler_for, debian_package, description_path,
                      device_names, emulation_of, read_description)
from .core.errors import TvmedgeError, first_line


@dataclass
class Device:
    """A resolved target: the TVM target and how to build for and reach the device."""

    name: str
    target: Any  # tvm.target.Target
    cross_compiler: str | None = None
    rpc_key: str | None = None
    device: str = "cpu"  # "cpu" or "cuda": which runtime device the VM runs on
    emulator: str | None = None  # the qemu-user binary that emulates it, if tvmedge can
    report: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    accelerator: Any = None  # tvmedge.devices.Accelerator for a VTA target (tvmedge.vta), else None

    @property
    def target_json(self) -> dict[str, Any]:
        return _plain(self.target.export())

    def linker(self):
        """``fcompile`` for ``export_library``: the cross compiler, or None for the host's."""
        if not self.cross_compiler:
            return None
        if shutil.which(self.cross_compiler) is None:
            pkg = debian_package(self.cross_compiler)
            raise TvmedgeError(f"cross compiler '{self.cross_compiler}' for target '{self.name}' "
                               f"not found (install Debian package {pkg})")
        from tvm.support import cc

        return cc.cross_compiler(self.cross_compiler)


def _plain(obj: Any) -> Any:
    """TVM's exported target (ffi Map/Array/String/IntImm) as plain JSON-able Python."""
    if isinstance(obj, (bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, str):
        return str(obj)
    if hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if hasattr(obj, "__iter__"):
        return [_plain(v) for v in obj]
    if hasattr(obj, "value"):
        return obj.value
    return str(obj)


def host_target_dict() -> dict[str, Any]:
    """This machine's CPU as LLVM sees it: triple, CPU name and core count."""
    from tvm.target import codegen

    return {"kind": "llvm", "mtriple": codegen.llvm_get_system_triple(),
            "mcpu": codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}


def _make_target(spec: Any, what: str):
    from tvm.target import Target

    if isinstance(spec, dict) and spec.get("kind") == "llvm" and spec.get("mcpu"):
        _check_cpu_name(str(spec["mcpu"]), spec.get("mtriple"), what)  # before TVM prints LLVM's complaint
    try:
        target = Target(spec)
    except Exception as e:  # TVM raises ValueError / TVMError with long texts
        raise TvmedgeError(f"invalid target {what}: {first_line(e)}") from None
    _check_cpu(target, what)
    return _full_width_vectors(target)


def _full_width_vectors(target):
    """An x86 target with AVX-512, built with 512-bit vectors: ``-prefer-256-bit`` is added to
    its ``mattr`` unless the target says otherwise. LLVM's tuning for Intel CPUs since
    Skylake-X prefers 256-bit vectors, and its backend then splits the 16-lane vectors our
    kernels write in two: int8 MobileNetV2's requantize epilogues ran on 8 lanes (2.84 ->
    2.35 ms with the whole width in one A/B, output bit-identical; fp32 models unchanged)."""
    from tvm.target import Target

    from .isa import cpu_arch, cpu_features

    if target.kind.name != "llvm" or cpu_arch(target) != "x86_64" or "avx512f" not in cpu_features(target):
        return target
    mattr = [str(a) for a in (target.attrs.get("mattr") or [])]
    if any("prefer-256-bit" in a for a in mattr):
        return target
    return Target({**_plain(target.export()), "mattr": mattr + ["-prefer-256-bit"]})


def _check_cpu(target, what: str) -> None:
    """Refuse an ``mcpu`` LLVM does not know: it would print errors and build for a generic CPU."""
    for t in (target, target.host):
        if t is None or t.kind.name != "llvm" or not t.attrs.get("mcpu"):
            continue
        _check_cpu_name(str(t.attrs["mcpu"]), t.attrs.get("mtriple"), what)


def _check_cpu_name(mcpu: str, triple: Any, what: str) -> None:
    from tvm.target import codegen

    triple = str(triple or codegen.llvm_get_system_triple())
    if not codegen.llvm_is_valid_cpu(mcpu, triple):
        raise TvmedgeError(f"invalid target {what}: LLVM knows no CPU '{mcpu}' for {triple}")


def _cross_for(target) -> str | None:
    host = target.host if target.host is not None else target
    triple = str(host.attrs.get("mtriple", "")) if host.kind.name == "llvm" else ""
    if not triple:
        return None
    arch = cross_arch(triple)
    from tvm.target import codegen

    if triple == codegen.llvm_get_system_triple() or arch == codegen.llvm_get_system_triple().split("-")[0]:
        return None
    return cross_compiler_for(arch)


def load_description(path: Path) -> Device:
    desc = read_description(path)
    spec = desc["target"]
    report = dict(desc.get("report", {}))
    if spec == "detect":
        spec = host_target_dict()
        if report.get("cores") == "detect":
            report["cores"] = os.cpu_count()
    target = _make_target(spec, f"in {path.name}")
    emu = emulation_of(desc)
    return Device(name=desc["name"], target=target, cross_compiler=desc.get("cross_compiler"),
                  rpc_key=desc.get("rpc_key"), device=desc.get("device", "cpu"),
                  emulator=emu.qemu if emu else None, report=report,
                  description=desc.get("description", ""), accelerator=accelerator_of(desc))


def resolve(spec: str | None) -> Device:
    """Turn a device name, a TVM tag or a JSON target into a :class:`Device`."""
    spec = (spec or "host").strip()
    path = description_path(spec)
    if path is not None:
        return load_description(path)
    if spec.startswith("{"):
        try:
            obj = json.loads(spec)
        except json.JSONDecodeError as e:
            raise TvmedgeError(f"target is not valid JSON: {e}") from None
        target = _make_target(obj, spec)
        name = "custom"
    else:
        from tvm.target import list_tags

        if spec not in list_tags():
            raise TvmedgeError(
                f"unknown target '{spec}': use a device ({', '.join(device_names())}), "
                "a TVM target tag (e.g. raspberry-pi/4b-aarch64; see tvm.target.list_tags()) "
                "or a JSON target")
        target = _make_target(spec, spec)
        name = spec
    if target.kind.name == "cuda" and target.host is None:
        target = _make_target({**_plain(target.export()), "host": host_target_dict()}, spec)
    kind = "cuda" if target.kind.name == "cuda" else "cpu"
    return Device(name=name, target=target, cross_compiler=_cross_for(target), device=kind)
