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


# ---------------------------------------------------------------- accelerators
@dataclass(frozen=True)
class Accelerator:
    """A VTA-style int8 accelerator (a description's ``"accelerator"``; see :mod:`tvmedge.vta`).

    Buffers are in bytes as the description gives them; :mod:`tvmedge.vta.isa` turns them
    into depths (vectors, matrices, micro-ops)."""

    name: str  # the description's name, e.g. vta-pynq
    batch: int
    block_in: int
    block_out: int
    inp_buffer_bytes: int
    wgt_buffer_bytes: int
    acc_buffer_bytes: int
    uop_buffer_bytes: int
    uop_bytes: int
    clock_mhz: float
    dram_bandwidth_gbs: float
    dma_setup_cycles: int
    gemm_cycles_per_uop: int
    alu_cycles_imm: int
    alu_cycles_vector: int
    host_cpu: dict[str, Any]
    host_part_runs: str  # "native": on this machine, not the board's CPU; "qemu-aarch64": emulated
    source: dict[str, Any]
    host_emulator: dict[str, Any] | None = None  # {"qemu", "cpu", "arch"}: the emulated board runs its host part so


_ACC_INTS = ("batch", "block_in", "block_out", "inp_buffer_bytes", "wgt_buffer_bytes", "acc_buffer_bytes",
             "uop_buffer_bytes", "uop_bytes", "dma_setup_cycles", "gemm_cycles_per_uop")


def accelerator_of(desc: dict[str, Any]) -> Accelerator | None:
    """A description's accelerator, or None when the device has none."""
    acc = desc.get("accelerator")
    if acc is None:
        return None
    name = desc.get("name")
    try:
        if acc.get("kind") != "vta":
            raise TvmedgeError(f"device description '{name}': unknown accelerator kind {acc.get('kind')!r} (only 'vta')")
        for key in ("inp_dtype", "wgt_dtype", "acc_dtype"):
            want = "int32" if key == "acc_dtype" else "int8"
            if acc.get(key, want) != want:
                raise TvmedgeError(f"device description '{name}': accelerator {key} must be {want}, got {acc[key]!r}")
        ints = {k: int(acc[k]) for k in _ACC_INTS}
        bad = [k for k, v in ints.items() if v <= 0]
        if bad:
            raise TvmedgeError(f"device description '{name}': accelerator {', '.join(bad)} must be positive")
        alu = acc.get("alu_cycles_per_uop", {"imm": 1, "vector": 2})
        return Accelerator(name=str(name), **ints, clock_mhz=float(acc["clock_mhz"]),
                           dram_bandwidth_gbs=float(acc["dram_bandwidth_gbs"]), alu_cycles_imm=int(alu["imm"]),
                           alu_cycles_vector=int(alu["vector"]), host_cpu=dict(acc.get("host_cpu", {})),
                           host_part_runs=str(acc.get("host_part_runs", "native")), source=dict(acc.get("source", {})),
                           host_emulator=dict(acc["host_emulator"]) if acc.get("host_emulator") else None)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TvmedgeError(f"device description '{name}': bad \"accelerator\" section ({type(e).__name__}: {e})") from None


def accelerators() -> dict[str, Accelerator]:
    """The devices with an accelerator, by name (sorted)."""
    out = {}
    for desc in descriptions().values():
        acc = accelerator_of(desc)
        if acc is not None:
            out[acc.name] = acc
    return out


def accelerator(name: str) -> Accelerator:
    """Device ``name``'s accelerator; TvmedgeError naming the devices that have one."""
    path = description_path(name)
    acc = accelerator_of(read_description(path)) if path is not None else None
    if acc is None:
        raise TvmedgeError(f"device '{name}' has no accelerator (devices with one: {', '.join(accelerators())})")
    return acc
