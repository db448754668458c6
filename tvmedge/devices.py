"""Device descriptions as data: the one reader of ``targets/*.json``.

A description names a device's TVM target (a TVM tag, a JSON target, or ``"detect"`` for
this machine), the cross compiler that links for it, its default RPC key, the numbers a
report needs and, for a board tvmedge can emulate, how: ``"emulator"`` gives the
qemu-user binary, the CPU model it emulates (``-cpu``) and the architecture of the user
space it runs (:mod:`tvmedge.deploy.sysroot`). Code that needs one of these facts asks
here instead of keeping a copy: :mod:`tvmedge.target` (TVM targets, the cross compiler
for a TVM tag or JSON target), :mod:`tvmedge.deploy.emulate` (which boards it emulates,
on which CPU) and :mod:`tvmedge.deploy.sysroot` (which emulator and cross compiler to
check for). Plain JSON only: nothing here imports TVM, so the command line can list the
emulated boards without loading it. The folder is found by :mod:`tvmedge.resources`
(the checkout's ``targets/`` or an installed wheel's copy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core.errors import TvmedgeError
from .core.resources import data_dir

# The one cross compiler no description names: 32-bit Arm, for TVM tags such as
# arm/rasp3b (a Raspberry Pi on a 32-bit OS). Every other one comes from targets/.
_CROSS_WITHOUT_DESCRIPTION = {"arm": "arm-linux-gnueabihf-g++"}

# The Debian package that provides each host tool the descriptions name.
_DEBIAN_PACKAGE = {
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "arm-linux-gnueabihf-g++": "g++-arm-linux-gnueabihf",
    "riscv64-linux-gnu-g++": "g++-riscv64-linux-gnu",
    "qemu-aarch64-static": "qemu-user-static",
    "qemu-riscv64-static": "qemu-user-static",
}


def targets_dir() -> Path:
    """The device descriptions folder, ``targets/`` (the checkout's or the installed package's)."""
    return data_dir("targets")


def device_names() -> list[str]:
    return sorted(p.stem for p in targets_dir().glob("*.json"))


def description_path(name: str) -> Path | None:
    """The file describing device ``name``, or None if there is none."""
    path = targets_dir() / f"{name}.json"
    return path if "/" not in name and path.exists() else None


def read_description(path: Path) -> dict[str, Any]:
    """One description, as the JSON says it."""
    return json.loads(path.read_text())


def descriptions() -> dict[str, dict[str, Any]]:
    """Every description, by device name (sorted)."""
    return {name: read_description(targets_dir() / f"{name}.json") for name in device_names()}


def debian_package(tool: str) -> str:
    """The Debian package to install for ``tool`` (the tool's own name if not known)."""
    return _DEBIAN_PACKAGE.get(tool, tool)


# ---------------------------------------------------------------- cross compilers
def cross_arch(triple: str) -> str:
    """The architecture a cross compiler is chosen by: the triple's first part, any 32-bit
    Arm (``armv7l``, ``armv6``, ...) as ``arm``."""
    arch = triple.split("-")[0]
    if arch.startswith("arm") and arch != "arm64":
        arch = "arm"
    return arch


def cross_compiler_for(arch: str) -> str | None:
    """The cross compiler for code of architecture ``arch`` (see :func:`cross_arch`).

    The one a description names for that architecture: GNU cross compilers are named
    ``<triple>-g++``, so ``aarch64-linux-gnu-g++`` links for ``aarch64``.
    """
    for desc in descriptions().values():
        cxx = desc.get("cross_compiler")
        if cxx and cross_arch(cxx) == arch:
            return cxx
    return _CROSS_WITHOUT_DESCRIPTION.get(arch)


# ---------------------------------------------------------------- emulation
@dataclass(frozen=True)
class Emulation:
    """How tvmedge emulates a board (a description's ``"emulator"``)."""

    kind: str  # the description's name, e.g. pi4
    description: str
    qemu: str  # the qemu-user binary
    cpu: str  # its CPU model (qemu -cpu): limits the instruction set to the board's
    arch: str  # the user space it runs (tvmedge.deploy.sysroot)


def emulation_of(desc: dict[str, Any]) -> Emulation | None:
    """A description's emulator, or None when tvmedge cannot emulate that device."""
    emu = desc.get("emulator")
    if emu is None:
        return None
    try:
        return Emulation(str(desc["name"]), str(desc.get("description", "")), str(emu["qemu"]), str(emu["cpu"]),
                         str(emu["arch"]))
    except (KeyError, TypeError):
        raise TvmedgeError(f"device description '{desc.get('name')}': \"emulator\" must be null or "
                           f"{{\"qemu\": ..., \"cpu\": ..., \"arch\": ...}}, got {emu!r}") from None


def emulated() -> dict[str, Emulation]:
    """The boards tvmedge can emulate, by name (sorted)."""
    out = {}
    for desc in descriptions().values():
        emu = emulation_of(desc)
        if emu is not None:
            out[emu.kind] = emu
    return out


def emulation(kind: str) -> Emulation:
    """How board ``kind`` is emulated; TvmedgeError naming the ones that are."""
    kinds = emulated()
    try:
        return kinds[kind]
    except KeyError:
        raise TvmedgeError(f"no emulated device '{kind}' (available: {', '.join(kinds)})") from None


def qemu_for(arch: str) -> str | None:
    """The qemu-user binary that runs the ``arch`` user space (as the emulated boards name it)."""
    return next((e.qemu for e in emulated().values() if e.arch == arch), None)
