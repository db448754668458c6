"""The Relax pipeline from an imported model to scheduled kernels, shared by compile and tune.

:func:`prepare` normalizes importer output, folds BatchNorm and constants, converts
convolutions to NHWC (channels innermost: what SIMD vectors and our CPU rules want; the
weights are transposed once, at compile time), drops conv taps that read only padding
(:mod:`.taps`), moves transposes before resizes (:mod:`.resize`), pads channels and matrix
columns to whole vectors (:mod:`.chanpad`), rewrites 3x3 convs as Winograd, legalizes and fuses. Its PrimFuncs are the
kernels that tuning records and default rules apply to, so ``tvmedge tune`` extracts its
tasks from the same module ``compile`` builds.

:func:`schedule` then gives every kernel a schedule: the tuning record where the database
has one, else the first default rule (``tvmedge.lower.cpu_rules`` on CPUs, dlight's GPU
rules on CUDA) that applies; :class:`ScheduleReport` says which function got what.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import tvm
from tvm import relax

from . import vecmath
from .foldaffine import FoldConvAffine
from .normalize import NormalizeClip, NormalizeQuantize
from .resize import PermuteBeforeResize, legalize_resize2d
from .taps import DropPaddingTaps
from .winograd import Winograd

NHWC = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


def graph_passes(target, dp4a_flavour: str = "cuda") -> list:
    """The graph-level passes ``prepare`` runs before legalization: normalize, fold, convert
    layout (CPU) and the target's int8 kernel rewrites. ``dp4a_flavour``: ``"check"`` puts the
    CPU-buildable twins of the CUDA ``dp4a`` kernels in the graph (tests build it for the host)."""
    target = tvm.target.Target(target)
    passes = [
        relax.transform.FoldConstant(),
        NormalizeClip,
        NormalizeQuantize,
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        FoldConvAffine,  # BatchNorm that torch.export kept: into the conv's weights
    ]
    if target.kind.name == "llvm":
        from .chanpad import PadChannels
        from .cpu_rules import _is_rvv, vector_lanes

        passes += [relax.transform.ConvertLayout(NHWC), relax.transform.FoldConstant(), DropPaddingTaps(),
                   PermuteBeforeResize(), DotKernels(target)]
        if os.environ.get("TVMEDGE_CHANPAD", "1") != "0":
            passes.append(PadChannels(vector_lanes(target)))
        if not _is_rvv(target):  # see lower/winograd.py
            passes.append(Winograd())
    elif target.kind.name == "cuda":
        passes.append(Dp4aKernels(target, dp4a_flavour))
    return passes


def prepare(mod: tvm.IRModule, target, layout_free: bool = False) -> tvm.IRModule:
    """Normalize, fold, convert layout (CPU), legalize and fuse. ``layout_free``: mark the
    weights layout-free, as tuning does (records may then pre-pack them)."""
    cpu = tvm.target.Target(target).kind.name == "llvm"
    passes = graph_passes(target)
    passes += [
        relax.transform.LegalizeOps({**vecmath.legalize_map(), "relax.image.resize2d": legalize_resize2d} if cpu else None),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    if layout_free:
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    with tvm.target.Target(target):
        mod = tvm.transform.Sequential(passes)(mod)
    return _drop_unknown_schedule_rules(mod, tvm.target.Target(target))


@tvm.transform.module_pass(opt_level=0, name="tvmedge.DotKernels")
class DotKernels:
    """int8 conv2d / matmul on dot-product kernels (``lower.int8_dot``), on the NHWC graph."""

    def __init__(self, target) -> None:
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: D102
        from .int8_dot import rewrite_module

        return rewrite_module(mod, self.target)


@tvm.transform.module_pass(opt_level=0, name="tvmedge.Dp4aKernels")
class Dp4aKernels:
    """int8 conv2d / matmul on CUDA ``dp4a`` kernels (``lower.dp4a``), sm_61 and newer."""

    def __init__(self, target, flavour: str = "cuda") -> None:
        self.target, self.flavour = target, flavour

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: D102
        from .dp4a import rewrite_module

        return rewrite_module(mod, self.target, self.flavour)


def _copy(mod: tvm.IRModule) -> tvm.IRModule:
    """A new module with the same functions, so that updating it leaves ``mod`` as it was."""
    return tvm.IRModule(dict(mod.functions), attrs=mod.attrs, global_infos=mod.global_infos)


def _drop_unknown_schedule_rules(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Remove blocks' ``schedule_rule`` annotations that name no rule registered for the
    target (TOPI's pooling asks for ``meta_schedule.pool_max``, which TVM 0.27 no longer
    has): MetaSchedule printed a C++ warning for each of them into tvmedge's output."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import get_root_block

    keys = [str(k) for k in target.keys]
    out = None
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        sch = s_tir.Schedule(func)
        changed = False
        for block in sch.get_child_blocks(get_root_block(sch)):
            rule = sch.get(block).annotations.get("schedule_rule")
            if rule is None or str(rule) == "None":
                continue
            if not any(tvm.get_global_func(f"s_tir.meta_schedule.{k}.{rule}", allow_missing=True) for k in keys):
                sch.unannotate(block, "schedule_rule")
                changed = True
        if changed:
            out = out or _copy(mod)
            out[gv] = sch.mod["main"].with_attrs(func.attrs)
    return out or mod


@dataclass
class ScheduleReport:
    """Which kernels got a tuning record, a default rule, or neither."""

    tuned: list[str] = field(default_factory=list)
    default: dict[str, str] = field(default_factory=dict)  # kernel -> the rule that scheduled it
    unscheduled: list[str] = field(default_factory=list)
    record_failed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        rules: dict[str, int] = {}
        for rule in self.default.values():
            rules[rule] = rules.get(rule, 0) + 1
        return {"tuned": len(self.tuned), "default_rule": len(self.default), "rules": rules,
                "unscheduled": sorted(self.unscheduled), "record_failed": sorted(self.record_failed)}


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


def first_schedule(func, target, rules: list | None = None) -> tuple[Any, str] | tuple[None, None]:
    """The schedule of the first default rule that applies to ``func``, and that rule's name
    (a rule that raises counts as not applying); (None, None) when none does."""
    for rule in rules if rules is not None else default_rules(target):
        try:
            sch = rule.apply(func, target, False)
        except Exception:  # noqa: BLE001 - a rule that cannot handle a kernel leaves it to the next
            sch = None
        if sch is not None:
            return sch, type(rule).__name__
    return None, None


def apply_rules(mod: tvm.IRModule, target, names: set[str]) -> tuple[tvm.IRModule, dict[str, str]]:
    """Schedule the kernels ``names`` with the first default rule that applies to each
    (like dlight's ``ApplyDefaultSchedule``, but the caller learns which rule scheduled what)."""
    rules = default_rules(target)
    used: dict[str, str] = {}
    mod = _copy(mod)
    for gv, func in list(mod.functions.items()):
        if gv.name_hint in names:
            sch, rule = first_schedule(func, target, rules)
            if sch is not None:
                mod[gv] = sch.mod["main"].with_attrs(func.attrs).with_attr("tirx.is_scheduled", True)
                used[gv.name_hint] = rule
    return mod, used


def apply_records(mod: tvm.IRModule, database, names: set[str]) -> tuple[tvm.IRModule, list[str], list[str]]:
    """Replace the kernels ``names`` by their best tuning records, one kernel at a time, so
    that a record that fails to apply (a damaged trace, a TVM change) costs that kernel its
    record only: it goes to the default rules. Returns the module, the kernels tuned and
    the kernels whose record failed."""
    mod = _copy(mod)
    tuned, failed = [], []
    apply = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)
    with database:
        for gv, func in list(mod.functions.items()):
            if gv.name_hint not in names:
                continue
            try:
                new = apply(tvm.IRModule({gv: func}))[gv.name_hint]
            except Exception:  # noqa: BLE001 - TVM raises TVMError/ValueError/... on a bad trace
                failed.append(gv.name_hint)
                continue
            if _scheduled(new):
                mod[gv] = new
                tuned.append(gv.name_hint)
            elif _has_workload(database, func):  # its records were left out at load time
                failed.append(gv.name_hint)
    return mod, sorted(tuned), sorted(failed)


def _has_workload(database, func) -> bool:
    try:
        return bool(database.has_workload(tvm.IRModule({"main": func.with_attr("global_symbol", "main")})))
    except Exception:  # noqa: BLE001
        return False


def schedule(mod: tvm.IRModule, target, database=None) -> tuple[tvm.IRModule, ScheduleReport]:
    """Schedule every kernel of a prepared module: records first, default rules for the rest."""
    report = ScheduleReport()
    target = tvm.target.Target(target)
    before = set(n for n, f in kernels(mod).items() if not _scheduled(f))
    with target:
        if database is not None:
            mod, report.tuned, report.record_failed = apply_records(mod, database, before)
        left = set(n for n, f in kernels(mod).items() if not _scheduled(f))
        mod, used = apply_rules(mod, target, left)
    report.default = dict(sorted(used.items()))
    report.unscheduled = sorted(left - set(used))
    return mod, report


def finish(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Fold the weight layout rewrites that tuning records and the default rules' weight
    packing ask for (weights are constants): the packed weights become the constants."""
    with tvm.target.Target(target):
        return tvm.transform.Sequential([
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.LiftTransformParams(),
            relax.transform.FoldConstant(),
        ])(mod)


def build(mod: tvm.IRModule, target, database=None) -> tuple[Any, ScheduleReport]:
    """prepare -> schedule -> compile: the VM executable and what scheduled each kernel."""
    mod = prepare(mod, target, layout_free=True)
    mod, report = schedule(mod, target, database)
    mod = finish(mod, target)
    return compile_scheduled(mod, target), report


def compile_scheduled(mod: tvm.IRModule, target) -> Any:
    """``tvm.compile`` for any target; CUDA kernels become PTX/cubin (:mod:`tvmedge.lower.cuda`)
    compiled for the target's arch, which the compile callback reads from the scope."""
    target = tvm.target.Target(target)
    if target.kind.name == "cuda":
        from .cuda import enable

        enable()
    with target:
        return tvm.compile(mod, target=target)
