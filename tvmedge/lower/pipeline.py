"""The Relax pipeline from an imported model to scheduled kernels, shared by compile and tune.

:func:`prepare` normalizes importer output, folds BatchNorm and constants, converts
convolutions to NHWC (channels innermost: what SIMD vectors and our CPU rules want; the
weights are transposed once, at compile time), legalizes and fuses. Its PrimFuncs are the
kernels that tuning records and default rules apply to, so ``tvmedge tune`` extracts its
tasks from the same module ``compile`` builds.

:func:`schedule` then gives every kernel a schedule: the tuning record where the database
has one, else the first default rule (``tvmedge.lower.cpu_rules`` on CPUs, dlight's GPU
rules on CUDA) that applies; :class:`ScheduleReport` says which function got what.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tvm
from tvm import relax

from .normalize import NormalizeClip

NHWC = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


def prepare(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Normalize, fold, convert layout (CPU), legalize and fuse; weights marked layout-free."""
    cpu = tvm.target.Target(target).kind.name == "llvm"
    passes = [
        relax.transform.FoldConstant(),
        NormalizeClip,
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
    ]
    if cpu:
        passes.append(relax.transform.ConvertLayout(NHWC))
    passes += [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    with tvm.target.Target(target):
        return tvm.transform.Sequential(passes)(mod)


@dataclass
class ScheduleReport:
    """Which kernels got a tuning record, a default rule, or neither."""

    tuned: list[str] = field(default_factory=list)
    default: list[str] = field(default_factory=list)
    unscheduled: list[str] = field(default_factory=list)
    record_failed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"tuned": len(self.tuned), "default_rule": len(self.default),
                "unscheduled": sorted(self.unscheduled), "record_failed": sorted(self.record_failed)}

    def summary(self) -> str:
        text = f"{len(self.tuned)} kernels tuned, {len(self.default)} by default rules"
        if self.unscheduled:
            text += f", {len(self.unscheduled)} unscheduled ({', '.join(sorted(self.unscheduled))})"
        if self.record_failed:
            text += f"; records that failed to apply (default rule used): {', '.join(sorted(self.record_failed))}"
        return text


def _scheduled(func) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def kernels(mod: tvm.IRModule) -> dict[str, Any]:
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def default_rules(target) -> list:
    target = tvm.target.Target(target)
    if target.kind.name == "cuda":
        from tvm.s_tir import dlight as dl

        return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    from .cpu_rules import default_rules as cpu

    return cpu()


def schedule(mod: tvm.IRModule, target, database=None) -> tuple[tvm.IRModule, ScheduleReport]:
    """Schedule every kernel of a prepared module: records first, default rules for the rest."""
    from tvm.s_tir import dlight as dl

    report = ScheduleReport()
    target = tvm.target.Target(target)
    before = set(n for n, f in kernels(mod).items() if not _scheduled(f))
    with target:
        if database is not None:
            with database:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            report.tuned = sorted(n for n, f in kernels(mod).items() if n in before and _scheduled(f))
        left = set(n for n, f in kernels(mod).items() if not _scheduled(f))
        mod = dl.ApplyDefaultSchedule(*default_rules(target))(mod)
    after = kernels(mod)
    report.default = sorted(n for n in left if n in after and _scheduled(after[n]))
    report.unscheduled = sorted(n for n in left if n in after and not _scheduled(after[n]))
    return mod, report


def finish(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Fold the weight layout rewrites tuning records ask for (weights are constants)."""
    with tvm.target.Target(target):
        return tvm.transform.Sequential([
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.LiftTransformParams(),
            relax.transform.FoldConstant(),
        ])(mod)


def build(mod: tvm.IRModule, target, database=None) -> tuple[Any, ScheduleReport]:
    """prepare -> schedule -> compile: the VM executable and what scheduled each kernel."""
    mod = prepare(mod, target)
    if database is not None:
        with tvm.target.Target(target):
            mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    mod, report = schedule(mod, target, database)
    if database is not None:
        mod = finish(mod, target)
    return tvm.compile(mod, target=target), report
