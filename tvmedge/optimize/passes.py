"""Model transformations as named passes, and the :class:`Pipeline` that runs them.

A pass has a ``name``, says which data it ``needs`` (``"calib"``, ``"eval"``) and is called
as ``pass_(model, ctx) -> (model, report)``; ``report`` is a plain dict (``{"rewrite": name,
"layers": [...], "skipped": [...]}``), or ``None`` when the pass had nothing to do. The
passes wrap the rewrites of this package (each usable alone, too):

* :class:`FoldQDQ`  - models quantized elsewhere (QDQ) to real int8 ops;
* :class:`Prune`    - structured pruning: whole channels, across residual adds and concats;
* :class:`LowRank`  - truncated-SVD / Tucker-2 factorization;
* :class:`Compact`  - compact-filter rewrites fitted on calibration data;
* :class:`Finetune` - distillation from the original model into the rewritten one;
* :class:`Int8`     - post-training int8: prepare (find layers) -> calibrate (observers)
  -> convert, with per-layer fall-back to float under an accuracy budget.

A :class:`Pipeline` (in the spirit of ``tvm.transform.Sequential``) runs passes in the order
given, with one progress reporter, then checks the result against the original model
(max abs/rel error on the calibration data, and the task metric on labelled data). The CLI
(``optimize``, ``compile``), the benchmarks and the tests all build their passes here;
:func:`passes_from_options` gives the CLI's fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..core.errors import TvmedgeError
from ..core.model import ImportedModel, random_inputs
from ..core.progress import Reporter
from .data import Dataset


@dataclass
class PassContext:
    """What passes share: the original model (reference and distillation teacher), the
    calibration and labelled evaluation data, and the progress reporter."""

    original: ImportedModel
    calib: Dataset | None = None
    eval: Dataset | None = None
    progress: Reporter = field(default_factory=lambda: Reporter(False))


class Pass:
    """A named model transformation: ``(model, ctx) -> (model, report or None)``."""

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()

    def required(self) -> tuple[str, ...]:
        """The data this pass needs, as configured (some need labelled data only for an option)."""
        return self.needs

    def check(self, ctx: PassContext) -> None:
        """Refuse a context that lacks the data this pass needs."""
        missing = [n for n in self.required() if getattr(ctx, n) is None]
        if missing:
            what = {"calib": "calibration data (--calib)", "eval": "labelled data (--eval)"}
            raise TvmedgeError(f"the {self.name} pass needs {' and '.join(what[m] for m in missing)}")

    def __call__(self, model: ImportedModel, ctx: PassContext) -> tuple[ImportedModel, dict[str, Any] | None]:
        self.check(ctx)
        return self.run(model, ctx)

    def run(self, model: ImportedModel, ctx: PassContext) -> tuple[ImportedModel, dict[str, Any] | None]:
        raise NotImplementedError


@dataclass
class FoldQDQ(Pass):
    name: ClassVar[str] = "qdq-fold"

    def run(self, model, ctx):
        from .int8_graph import fold_qdq, has_qdq

        return fold_qdq(model) if has_qdq(model) else (model, None)


@dataclass
class LowRank(Pass):
    """Keep ``energy`` of each layer's spectrum, or reach ``flops_ratio`` of the weight layers' FLOPs."""

    energy: float | None = None
    flops_ratio: float | None = None
    timer: Any = None  # a LayerTimer (tune.layer_timing): keep only the factorizations measured faster
    name: ClassVar[str] = "lowrank"

    def __post_init__(self) -> None:
        if (self.energy is None) == (self.flops_ratio is None):
            raise TvmedgeError("low-rank factorization takes a kept energy or a FLOP ratio, exactly one")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise TvmedgeError(f"--lowrank takes a fraction of spectral energy in (0, 1], got {self.energy}")
        if self.flops_ratio is not None and not 0 < self.flops_ratio < 1:
            raise TvmedgeError(f"--lowrank-flops takes a FLOP ratio in (0, 1), got {self.flops_ratio}")

    def run(self, model, ctx):
        from .lowrank import factorize

        return factorize(model, energy=self.energy, flops_ratio=self.flops_ratio, calib=ctx.calib,
                         timer=self.timer, progress=ctx.progress.line)


@dataclass
class Prune(Pass):
    """Remove ``ratio`` of each dependency group's channels, or reach ``flops_ratio`` of the FLOPs."""

    ratio: float | None = None
    flops_ratio: float | None = None
    criterion: str = "l1"
    name: ClassVar[str] = "prune"

    def __post_init__(self) -> None:
        from .prune import CRITERIA

        if (self.ratio is None) == (self.flops_ratio is None):
            raise TvmedgeError("give --prune RATIO or --prune-flops RATIO, not both")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise TvmedgeError(f"--prune takes the fraction of channels to remove, in (0, 1), got {self.ratio}")
        if self.flops_ratio is not None and not 0 < self.flops_ratio < 1:
            raise TvmedgeError(f"--prune-flops takes the fraction of FLOPs to keep, in (0, 1), got {self.flops_ratio}")
        if self.criterion not in CRITERIA:
            raise TvmedgeError(f"unknown --criterion '{self.criterion}' ({', '.join(CRITERIA)})")

    def required(self) -> tuple[str, ...]:
        return ("calib",) if self.criterion == "taylor" else ()

    def run(self, model, ctx):
        from .prune import prune

        return prune(model, ratio=self.ratio, flops_ratio=self.flops_ratio, criterion=self.criterion,
                     calib=ctx.calib, progress=ctx.progress)


@dataclass
class Compact(Pass):
    max_error: float = 0.05
    name: ClassVar[str] = "compact"
    needs: ClassVar[tuple[str, ...]] = ("calib",)

    def __post_init__(self) -> None:
        if self.max_error <= 0:
            raise TvmedgeError(f"--compact-max-error must be positive, got {self.max_error}")

    def run(self, model, ctx):
        from .compact import compact

        return compact(model, ctx.calib, max_error=self.max_error, progress=ctx.progress)


@dataclass
class Finetune(Pass):
    """Distil ``ctx.original`` into the model on ``data`` (default: the calibration data);
    nothing to do when no earlier pass changed the model."""

    steps: int
    data: Dataset | None = None
    name: ClassVar[str] = "finetune"
    needs: ClassVar[tuple[str, ...]] = ("calib",)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise TvmedgeError(f"--finetune-steps takes 0 or more steps, got {self.steps}")

    def required(self) -> tuple[str, ...]:
        return () if self.data is not None else self.needs

    def run(self, model, ctx):
        if self.steps == 0 or model is ctx.original:
            return model, None
        from .finetune import finetune

        return finetune(ctx.original, model, steps=self.steps, data=self.data or ctx.calib, progress=ctx.progress)


@dataclass
class Int8(Pass):
    """Post-training int8 (see :mod:`tvmedge.optimize.quantize`); with ``max_drop`` (points)
    layers fall back to float until the accuracy drop on ``ctx.eval`` is within it."""

    observer: str = "percentile"
    max_drop: float | None = None
    name: ClassVar[str] = "int8"
    needs: ClassVar[tuple[str, ...]] = ("calib",)

    def __post_init__(self) -> None:
        if self.max_drop is not None and self.max_drop < 0:
            raise TvmedgeError(f"--max-drop is a drop in points, 0 or more, got {self.max_drop}")

    def required(self) -> tuple[str, ...]:
        return self.needs + (("eval",) if self.max_drop is not None else ())

    def run(self, model, ctx):
        from .quantize import quantize

        return quantize(model, ctx.calib, observer=self.observer, eval_data=ctx.eval, max_drop=self.max_drop,
                        reference=ctx.original, progress=ctx.progress)


class Pipeline:
    """Run ``passes`` in order; the result is checked against the original model."""

    def __init__(self, passes: list[Pass], check: bool = True) -> None:
        self.passes = list(passes)
        self.check = check

    def __call__(self, model: ImportedModel, ctx: PassContext) -> tuple[ImportedModel, dict[str, Any]]:
        """Returns the rewritten model and ``{"rewrites": [pass reports], "check": summary}``
        (no ``check`` key when the pipeline was built with ``check=False``)."""
        for p in self.passes:  # refuse before any work is done
            p.check(ctx)
        reports: list[dict[str, Any]] = []
        for p in self.passes:
            model, rep = p(model, ctx)
            if rep is not None:
                reports.append(rep)
        if model is not ctx.original:
            model.rewrites = list(ctx.original.rewrites) + [
                {k: v for k, v in r.items() if k not in ("layers", "skipped")} for r in reports]
        result: dict[str, Any] = {"rewrites": reports}
        if self.check:
            from .check import check

            result["check"] = check(ctx.original, model, ctx.calib or ctx.eval or _random_data(model), ctx.eval)
        return model, result


def _random_data(model: ImportedModel) -> Dataset:
    """Without calibration or evaluation data, numerics are checked on random inputs."""
    specs = [s.to_dict() for s in model.inputs]
    return Dataset(name="random", samples=[random_inputs(specs, seed=i) for i in range(8)])


@dataclass
class RewriteOptions:
    """The rewrites the CLI offers, as plain values (``None``/``False``/0: not asked for)."""

    quantize: str | None = None
    observer: str = "percentile"
    lowrank: float | None = None
    lowrank_flops: float | None = None
    compact: bool = False
    compact_max_error: float = 0.05
    finetune_steps: int = 0
    max_drop: float | None = None
    prune: float | None = None
    prune_flops: float | None = None
    criterion: str = "l1"
    lowrank_measure: str | None = None  # the CLI gives the LowRank pass a timer on this target

    def any(self) -> bool:
        return bool(self.quantize or self.lowrank or self.lowrank_flops or self.compact or self.prune
                    or self.prune_flops)


def passes_from_options(opts: RewriteOptions) -> list[Pass]:
    """The CLI's order: pruning, low-rank, compact filters, fine-tuning of what they changed, then int8
    (it quantizes the already-factorized layers)."""
    if opts.lowrank and opts.lowrank_flops:
        raise TvmedgeError("give --lowrank ENERGY or --lowrank-flops RATIO, not both")
    passes: list[Pass] = []
    if opts.prune or opts.prune_flops:
        if opts.prune and opts.prune_flops:
            raise TvmedgeError("give --prune RATIO or --prune-flops RATIO, not both")
        passes.append(Prune(ratio=opts.prune, flops_ratio=opts.prune_flops, criterion=opts.criterion))
    if opts.lowrank or opts.lowrank_flops:
        passes.append(LowRank(energy=opts.lowrank, flops_ratio=opts.lowrank_flops))
    elif opts.lowrank_measure:
        raise TvmedgeError("--lowrank-measure chooses which factorizations to keep: give --lowrank or --lowrank-flops")
    if opts.compact:
        passes.append(Compact(max_error=opts.compact_max_error))
    if opts.finetune_steps:
        passes.append(Finetune(steps=opts.finetune_steps))
    if opts.quantize:
        passes.append(Int8(observer=opts.observer, max_drop=opts.max_drop))
    return passes
