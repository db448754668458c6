"""ISA classes: which shipped tuning records a target may use, from the target's CPU features.

MetaSchedule matches tuning records by workload only (the structural hash of the TIR
function), never by target: a record tuned on one CPU is applied to any other. Records
that tensorize with a CPU-specific intrinsic (AVX-512 VNNI ``vpdpbusd``, Arm ``sdot``)
would then reach CPUs without the instruction. tvmedge keys shipped records by *ISA
class* instead of by CPU name, and derives a target's class from LLVM's view of its
``mtriple`` + ``mcpu`` + ``mattr`` (``tvm.target.codegen.llvm_get_cpu_features``), so a
CPU LLVM knows by a name tvmedge has never seen still gets its class.

Classes (most specific first within an architecture)::

    x86_64-avx512-vnni  avx512f avx512bw avx512dq avx512vl avx512vnni   (Cascade Lake+, Zen 4+)
    x86_64-avx512       avx512f avx512bw avx512dq avx512vl              (Skylake-SP, x86-64-v4)
    x86_64-avx2         avx2 fma                                        (Haswell+, Zen 1+, x86-64-v3)
    x86_64              -                                               (baseline SSE2)
    aarch64-dotprod     neon dotprod                                    (Cortex-A55/A76+, Armv8.2+)
    aarch64-neon        neon                                            (Cortex-A53/A72)
    aarch64             -
    arm-neon / arm      (32-bit Arm)
    riscv64-rvv         v                                               (RVV 1.0)
    riscv64             -                                               (RV64GC, e.g. SiFive U74)

Superset rule: a target may use the records of every class of its architecture whose
features it has, its own class first (an ``x86_64-avx512-vnni`` CPU uses
``x86_64-avx512``, ``x86_64-avx2`` and ``x86_64`` records too; an ``x86_64-avx2`` CPU
never gets ``x86_64-avx512`` ones). GPU targets are keyed by kind and architecture
(``cuda-sm_72``) and use only their own class.

VNNI and dotprod are classes of their own because records that tensorize with them must
never reach a CPU without them. They add integer dot-product instructions only: a record
without a ``Tensorize`` step (every fp32 record) does not need them, so
:func:`record_class` files such records under the parent class (fp32 records tuned on a
Zen 4 are ``x86_64-avx512`` records, usable on any AVX-512 CPU, Intel's included).

What a record does *not* carry: instruction selection for plain loops is LLVM's, from the
target being compiled, not from the record; and no thread count (see ``schedules/README.md``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class IsaClass:
    """One class: its name, the architecture, and the LLVM features a CPU needs for it."""

    name: str
    arch: str
    features: tuple[str, ...]
    # Adds only integer dot-product instructions: records with no tensorized block don't
    # need it and belong to ``parent``.
    int8_only: bool = False
    parent: str | None = None


CLASSES: tuple[IsaClass, ...] = (
    IsaClass("x86_64-avx512-vnni", "x86_64", ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vnni"),
             int8_only=True, parent="x86_64-avx512"),
    IsaClass("x86_64-avx512", "x86_64", ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl")),
    IsaClass("x86_64-avx2", "x86_64", ("avx2", "fma")),
    IsaClass("x86_64", "x86_64", ()),
    IsaClass("aarch64-dotprod", "aarch64", ("neon", "dotprod"), int8_only=True, parent="aarch64-neon"),
    IsaClass("aarch64-neon", "aarch64", ("neon",)),
    IsaClass("aarch64", "aarch64", ()),
    IsaClass("arm-neon", "arm", ("neon",)),
    IsaClass("arm", "arm", ()),
    IsaClass("riscv64-rvv", "riscv64", ("v",)),
    IsaClass("riscv64", "riscv64", ()),
)
BY_NAME = {c.name: c for c in CLASSES}


def as_target(target: Any):
    """A ``tvm.target.Target`` from a Target, a dict, a JSON string or a tag."""
    from tvm.target import Target

    if isinstance(target, Target):
        return target
    if isinstance(target, str) and target.lstrip().startswith("{"):
        target = json.loads(target)
    return Target(target)


def _cpu_target(target):
    """The LLVM target whose CPU runs the code (the host of a GPU target), or None."""
    if target.kind.name == "llvm":
        return target
    return target.host if target.host is not None and target.host.kind.name == "llvm" else None


def arch_of_triple(triple: str) -> str:
    """``x86_64``, ``aarch64``, ``arm``, ``riscv64``, ... from an LLVM target triple."""
    arch = triple.split("-")[0]
    if arch in ("arm64", "aarch64_be"):
        return "aarch64"
    if arch.startswith("arm") or arch.startswith("thumb"):
        return "arm"
    if arch in ("amd64", "x86-64"):
        return "x86_64"
    return arch


def cpu_arch(target: Any) -> str:
    """The architecture of an LLVM target (its ``mtriple``; TVM fills in the host's if none)."""
    from tvm.target import codegen

    t = as_target(target)
    triple = str(t.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    return arch_of_triple(triple)


def cpu_features(target: Any) -> set[str]:
    """LLVM's feature set for the target's ``mtriple`` + ``mcpu`` + ``mattr``."""
    from tvm.target import codegen

    return set(codegen.llvm_get_cpu_features(as_target(target)))


def usable_classes(target: Any) -> list[str]:
    """Every class whose records ``target`` may use, its own class first (the superset rule)."""
    t = as_target(target)
    cpu = _cpu_target(t)
    if t.kind.name != "llvm":
        arch = t.attrs.get("arch") or (cpu.attrs.get("mcpu") if cpu is not None else None)
        return [f"{t.kind.name}-{arch}" if arch else t.kind.name]
    arch = cpu_arch(t)
    feats = cpu_features(t)
    found = [c.name for c in CLASSES if c.arch == arch and set(c.features) <= feats]
    return found or [arch]


def isa_class(target: Any) -> str:
    """The target's own ISA class (e.g. ``x86_64-avx2`` for ``mcpu=haswell``)."""
    return usable_classes(target)[0]


def tensorized(trace_json: Any) -> bool:
    """Whether a record's trace (as stored in a JSON database) tensorizes with an intrinsic."""
    text = trace_json if isinstance(trace_json, str) else json.dumps(trace_json)
    return '"Tensorize"' in text or "auto_tensorize" in text


def record_class(target: Any, uses_intrinsics: bool = True) -> str:
    """The class a record tuned for ``target`` needs: the target's own class, or its parent
    when the class only adds dot-product instructions and the record tensorizes nothing."""
    cls = isa_class(target)
    spec = BY_NAME.get(cls)
    while spec is not None and spec.int8_only and not uses_intrinsics and spec.parent:
        cls = spec.parent
        spec = BY_NAME.get(cls)
    return cls


def tvm_series() -> str:
    """``major.minor`` of the installed TVM (``0.27``): records are only valid within one."""
    import tvm

    parts = str(tvm.__version__).split(".")
    return ".".join(parts[:2])
