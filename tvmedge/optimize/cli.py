"""``tvmedge optimize``: apply compression rewrites, check them against the original, save.

The same flags work on ``tvmedge compile`` (the rewrites then run before compiling). This
module only turns flags into passes and data (:mod:`tvmedge.optimize.passes` runs them, in
the order of :func:`~tvmedge.optimize.passes.passes_from_options`) and prints the report.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from ..core.errors import TvmedgeError
from ..core.jsonio import dumps
from ..core.schema import envelope
from ..core.model import ImportedModel
from ..core.progress import Reporter
from ..core.progress import console as make_console
from .passes import LowRank, PassContext, Pipeline, RewriteOptions, passes_from_options

def add_optimize_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression rewrites")
    g.add_argument("--quantize", choices=["int8"], help="post-training quantization (needs --calib)")
    g.add_argument("--calib", metavar="DATA",
                   help="calibration data: digits | shapes | FILE.npz | a folder of images")
    g.add_argument("--calib-size", type=int, default=128, metavar="N", help="calibration samples (default 128)")
    g.add_argument("--observer", choices=["minmax", "percentile", "kl"], default="percentile",
                   help="activation observer for int8 (default percentile)")
    g.add_argument("--lowrank", type=float, metavar="ENERGY",
                   help="low-rank factorization keeping this fraction of spectral energy per layer (e.g. 0.95)")
    g.add_argument("--lowrank-flops", type=float, metavar="RATIO",
                   help="low-rank factorization to this fraction of the weight layers' FLOPs (e.g. 0.5): one "
                        "kept-energy level for all layers, so each layer's rank follows its spectrum")
    g.add_argument("--lowrank-measure", metavar="TARGET",
                   help="latency-aware low rank: time each layer alone, dense and factorized, on TARGET (a local "
                        "server for host, qemu for an emulated board, or the device at --measure-tracker) and keep "
                        "only the factorizations that ran faster; reports predicted vs measured speedups")
    g.add_argument("--measure-tracker", metavar="HOST:PORT", help="RPC tracker of the device --lowrank-measure times on")
    g.add_argument("--measure-key", metavar="KEY", help="device key at --measure-tracker")
    g.add_argument("--measure-tuning-db", metavar="DIR",
                   help="tuning records applied to the layers --lowrank-measure times (where they hold the workloads)")
    g.add_argument("--compact", action="store_true",
                   help="compact-filter rewrites of KxK convs (needs --calib)")
    g.add_argument("--compact-max-error", type=float, default=0.05, metavar="E",
                   help="largest relative output error a compact rewrite may add to its layer (default 0.05)")
    g.add_argument("--prune", type=float, metavar="RATIO",
                   help="structured pruning: remove this fraction of the channels of each dependency group "
                        "(whole filters, across residual adds and concats); add --finetune-steps to recover")
    g.add_argument("--prune-flops", type=float, metavar="RATIO",
                   help="structured pruning to this fraction of the conv/matmul FLOPs (one channel ratio for all groups)")
    g.add_argument("--criterion", choices=["l1", "taylor", "bn-gamma"], default="l1",
                   help="channel importance for pruning: filter L1 norm, first-order Taylor on --calib, "
                        "or BatchNorm gamma (default l1)")
    g.add_argument("--eval", metavar="DATA", help="labelled data to measure the accuracy drop on: digits | shapes | FILE.npz")
    g.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="largest accuracy drop allowed (points; needs --eval); int8 falls back to float per layer")
    g.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                   help="fine-tune the rewritten model N steps by distillation from the original "
                        "(PyTorch sources and zoo models only)")


def rewrite_options(args: argparse.Namespace) -> RewriteOptions:
    """The rewrite flags as plain options."""
    return RewriteOptions(quantize=args.quantize, observer=args.observer, lowrank=args.lowrank,
                          lowrank_flops=args.lowrank_flops, compact=args.compact,
                          compact_max_error=args.compact_max_error, finetune_steps=args.finetune_steps,
                          max_drop=args.max_drop, prune=args.prune, prune_flops=args.prune_flops,
                          criterion=args.criterion, lowrank_measure=args.lowrank_measure)


def wants_rewrites(args: argparse.Namespace) -> bool:
    return rewrite_options(args).any()


def _validate(args: argparse.Namespace) -> None:
    """What only the flags together can get wrong (each pass checks its own values)."""
    if (args.quantize or args.compact) and not args.calib:
        raise TvmedgeError("--quantize and --compact need calibration data: --calib digits|shapes|FILE.npz|DIR")
    if args.finetune_steps and not args.calib:
        raise TvmedgeError("--finetune-steps distils on calibration data: give --calib digits|shapes|FILE.npz")
    if args.criterion == "taylor" and (args.prune or args.prune_flops) and not args.calib:
        raise TvmedgeError("--criterion taylor scores channels on calibration data: give --calib DATA")
    if args.max_drop is not None and not args.eval:
        raise TvmedgeError("--max-drop needs labelled data to measure the drop on: --eval DATA")
    if args.calib_size is not None and args.calib_size < 1:
        raise TvmedgeError(f"--calib-size takes a number of samples, 1 or more, got {args.calib_size}")


def apply_rewrites(model: ImportedModel, args: argparse.Namespace, progress: bool = True) -> tuple[ImportedModel, dict[str, Any]]:
    """The CLI's adapter: the passes the flags ask for, on the data they name, as one pipeline."""
    from . import data as data_mod

    _validate(args)
    passes = passes_from_options(rewrite_options(args))
    calib = data_mod.load(args.calib, model, "calib", limit=args.calib_size) if args.calib else None
    evals = data_mod.load(args.eval, model, "eval") if args.eval else None
    ctx = PassContext(original=model, calib=calib, eval=evals, progress=Reporter(progress))
    with contextlib.ExitStack() as stack:
        if args.lowrank_measure:
            from ..target import resolve
            from ..tune.layer_timing import layer_timer

            timer = stack.enter_context(layer_timer(resolve(args.lowrank_measure), args.measure_tracker,
                                                    args.measure_key, args.measure_tuning_db, ctx.progress.line))
            for p in passes:
                if isinstance(p, LowRank):
                    p.timer = timer
        return Pipeline(passes)(model, ctx)


def print_report(report: dict[str, Any], out=None) -> None:
    from rich.table import Table

    stream = out or sys.stdout
    # Piped or logged output gets rich's 80 columns, too narrow for the per-layer tables.
    console = make_console(file=stream)
    for rep in report["rewrites"]:
        layers = rep.get("layers", [])
        if rep["rewrite"] == "finetune":  # trains the rewritten layers' weights, rewrites none
            console.print(f"finetune: {rep['steps']} steps ({rep['loss']}, {rep['trainable_params']} weights), "
                          f"distillation loss {rep['distill_loss_before']:.4g} -> {rep['distill_loss_after']:.4g} "
                          f"(kept step {rep['kept_step']}), {rep['seconds']} s")
        elif layers:
            table = Table(title=f"{rep['rewrite']}: {len(layers)} layer(s) rewritten")
            cols = [k for k in layers[0] if not isinstance(layers[0][k], (list, dict))]
            for c in cols:
                table.add_column(c)
            for layer in layers:
                table.add_row(*[_fmt(layer.get(c)) for c in cols])
            console.print(table)
        else:
            console.print(f"{rep['rewrite']}: no layer rewritten")
        if rep["rewrite"] == "prune":
            console.print(f"prune ({rep['criterion']}): channel ratio {rep['ratio']:.3g} removed per group; model FLOPs "
                          f"{rep['model_flops_before'] / 1e6:.1f} M -> {rep['model_flops_after'] / 1e6:.1f} M "
                          f"(ratio {rep['model_flops_after'] / rep['model_flops_before']:.3f})")
        if rep["rewrite"] == "lowrank" and rep.get("model_flops_before"):
            console.print(f"lowrank: kept spectral energy {rep['energy']:.4g} per layer; model FLOPs "
                          f"{rep['model_flops_before'] / 1e6:.1f} M -> {rep['model_flops_after'] / 1e6:.1f} M "
                          f"(ratio {rep['model_flops_after'] / rep['model_flops_before']:.3f}"
                          + (f", asked {rep['flops_ratio']:.3g} of the weight layers'" if rep.get("flops_ratio") else "")
                          + ")")
        if rep.get("measured"):
            where = rep["latency_aware"]
            table = Table(title=f"lowrank: each layer timed alone on {where['device']} ({where['kind']}"
                                + (f", records of {where['tuning_db']}" if where.get("tuning_db") else "") + ")")
            for c in ("layer", "ranks", "dense ms", "factorized ms", "predicted speedup (FLOPs)", "measured speedup", "kept"):
                table.add_column(c)
            for m in rep["measured"]:
                table.add_row(m["layer"], "->".join(map(str, m["ranks"])), _fmt(m["dense_ms"]), _fmt(m["factored_ms"]),
                              f"{m['predicted_speedup']:.2f}x", f"{m['measured_speedup']:.2f}x", "yes" if m["kept"] else "no")
            console.print(table)
        for s in rep.get("skipped", []):
            console.print(f"  skipped {s['layer']}: {s['reason']}")
    c = report["check"]
    line = f"check vs original on {c['samples']} samples: max abs err {c['max_abs']:.3g}, max rel err {c['max_rel']:.3g}"
    if c.get("metric"):
        # One unit everywhere (README, zoo, this line): accuracy and mIoU in percent.
        name = {"miou": "mIoU"}.get(c["metric"], c["metric"])
        line += (f"; {name} {100 * c['before']:.2f} % -> {100 * c['after']:.2f} % "
                 f"(drop {c['drop_points']:.2f} percentage points)")
    console.print(line)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def cmd_optimize(args: argparse.Namespace) -> int:
    from ..core.model import save_relax
    from ..frontend import load_model, parse_shapes

    if not args.output.endswith(".relax"):
        raise TvmedgeError(f"-o {args.output}: the optimized model is written as a .relax file")
    if not wants_rewrites(args):
        raise TvmedgeError("nothing to do: give --quantize int8, --prune/--prune-flops, --lowrank/--lowrank-flops "
                           "and/or --compact")
    model = load_model(args.model, parse_shapes(args.input_shape))
    new, report = apply_rewrites(model, args, progress=not args.json)
    drop = report["check"].get("drop_points")
    if (args.prune or args.prune_flops) and args.max_drop is not None and drop is not None and drop > args.max_drop:
        raise TvmedgeError(f"the pruned model drops {drop:.2f} points on {args.eval} (> --max-drop {args.max_drop:g}); "
                           f"{args.output} not written: use a smaller ratio or more --finetune-steps")
    save_relax(new, args.output)
    report.update(model=os.path.basename(args.model), output=args.output,
                  bytes_before=os.path.getsize(args.model), bytes_after=os.path.getsize(args.output))
    if args.json:
        print(dumps(envelope("optimize", report)))
    else:
        print_report(report)
        print(f"wrote {args.output}")
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser("optimize", help="compress a model (int8, low-rank, compact filters), checked against the original")
    p.add_argument("model", help="ONNX, .pt2, TFLite or .relax model")
    p.add_argument("-o", "--output", required=True, help="optimized model to write (.relax)")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                   help="fix an input shape, e.g. input:1x3x224x224")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_optimize_args(p)
    p.set_defaults(func=cmd_optimize)
    _register_distill(sub)
    _register_ensemble(sub)


# ---------------------------------------------------------------- distill
def _write_model(model: ImportedModel, path: str) -> None:
    """A student/ensemble as ``.relax`` (compile/tune/run read it) or ``.onnx`` (via tvmedge export)."""
    from ..core.model import save_relax

    if path.endswith(".relax"):
        save_relax(model, path)
    elif path.endswith(".onnx"):
        from ..export.onnx import write_onnx  # noqa: PLC0415  (cli layer: may import any stage)

        write_onnx(model, path, "float")
    else:
        raise TvmedgeError(f"-o {path}: write the model as .relax or .onnx")


def cmd_distill(args: argparse.Namespace) -> int:
    from ..frontend import load_model, parse_shapes
    from . import data as data_mod
    from .distill import distill

    if not args.output.endswith((".relax", ".onnx")):
        raise TvmedgeError(f"-o {args.output}: write the student as .relax or .onnx")
    teacher = load_model(args.teacher, parse_shapes(args.input_shape))
    train = data_mod.load(args.data, teacher, "train", limit=args.train_size)
    evals = data_mod.load(args.eval, teacher, "eval") if args.eval else None
    student, report = distill(teacher, args.student, train, steps=args.steps, eval_data=evals,
                              progress=not args.json)
    _write_model(student, args.output)
    report.update(teacher=os.path.basename(args.teacher), output=args.output)
    if args.json:
        print(dumps(envelope("distill", report)))
        return 0
    c, metric = report["compare"], report["metric"]
    for who in ("teacher", "student"):
        r = c[who]
        score = f", {metric} {100 * r['metric']:.2f}" if r.get("metric") is not None else ""
        print(f"{who}: {r['params']} parameters{score}, {r['latency_ms']:.3f} ms (default schedules, this host)")
    print(f"student {args.student}: {report['training']['steps']} steps ({report['loss']}), "
          f"{report['seconds']} s; latency ratio {c['teacher']['latency_ms'] / c['student']['latency_ms']:.2f}x")
    print(f"wrote {args.output}")
    return 0


def _register_distill(sub: Any) -> None:
    from .distill import STUDENTS

    p = sub.add_parser("distill", help="train a smaller student from a teacher model (logits KD + feature hints)")
    p.add_argument("teacher", help="teacher model: ONNX, .pt2, TFLite or .relax")
    p.add_argument("--student", required=True, metavar="SPEC|MODEL",
                   help=f"zoo student spec ({', '.join(STUDENTS)}) or a model file with the teacher's shapes")
    p.add_argument("--data", required=True, metavar="DATA", help="training inputs: digits | shapes | FILE.npz | DIR")
    p.add_argument("--train-size", type=int, default=1024, metavar="N", help="training samples (default 1024)")
    p.add_argument("--steps", type=int, default=1000, metavar="N", help="training steps (default 1000)")
    p.add_argument("--eval", metavar="DATA", help="labelled data to score teacher and student on")
    p.add_argument("-o", "--output", required=True, help="student to write (.relax or .onnx)")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                   help="fix an input shape, e.g. input:1x3x224x224")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_distill)


# ---------------------------------------------------------------- ensemble
def cmd_ensemble(args: argparse.Namespace) -> int:
    from ..frontend import load_model, parse_shapes
    from . import data as data_mod
    from .distill import compare
    from .ensemble import combine, train_members

    if not args.output.endswith((".relax", ".onnx")):
        raise TvmedgeError(f"-o {args.output}: write the ensemble as .relax or .onnx")
    if bool(args.models) == bool(args.train):
        raise TvmedgeError("give the member models, or --train SPEC --members N --data DATA to train them")
    weights = [float(v) for v in args.weights.split(",")] if args.weights else None
    report: dict[str, Any] = {}
    if args.train:
        if not args.data:
            raise TvmedgeError("--train needs labelled training data: --data digits|shapes|FILE.npz")
        from .distill import build_student

        build_student(args.train)  # unknown spec: one clear error before loading data
        train = data_mod.load(args.data, _spec_model(args.train), "train", limit=args.train_size)
        members, alphas, report["training"] = train_members(args.train, train, args.members, boost=args.boost,
                                                            steps=args.steps, progress=not args.json)
        if args.combine == "weighted" and weights is None:
            weights = alphas
    else:
        if args.boost:
            raise TvmedgeError("--boost trains members: use it with --train")
        members = [load_model(m, parse_shapes(args.input_shape)) for m in args.models]
    ens = combine(members, args.combine, weights)
    evals = data_mod.load(args.eval, ens, "eval") if args.eval else None
    named = {f"member {i + 1}": m for i, m in enumerate(members)}
    report["compare"] = compare({**named, "ensemble": ens}, evals, repeat=args.repeat)
    report.update(combine=args.combine, members=len(members), metric=evals.metric if evals else None,
                  output=args.output, weights=ens.rewrites[0]["weights"])
    _write_model(ens, args.output)
    if args.json:
        print(dumps(envelope("ensemble", report)))
        return 0
    for who, r in report["compare"].items():
        score = f", {report['metric']} {100 * r['metric']:.2f}" if r.get("metric") is not None else ""
        print(f"{who}: {r['params']} parameters{score}, {r['latency_ms']:.3f} ms (default schedules, this host)")
    print(f"ensemble ({args.combine}, weights {report['weights']}): one main, {len(members)} members; wrote {args.output}")
    return 0


def _spec_model(spec: str) -> ImportedModel:
    """The input/output shapes a zoo student spec takes (for loading its data)."""
    from ..core.model import TensorSpec
    from .distill import build_student

    import torch

    shape = {"digits-cnn": [1, 1, 8, 8], "shapes-seg": [1, 3, 64, 64]}[spec.split("/")[0]]
    with torch.no_grad():
        out = build_student(spec).eval()(torch.zeros(shape))
    return ImportedModel(mod=None, inputs=[TensorSpec("input", shape, "float32")],
                         outputs=[TensorSpec("logits", list(out.shape), "float32")], format="spec", source=spec,
                         sha256="")


def _register_ensemble(sub: Any) -> None:
    from .distill import STUDENTS

    p = sub.add_parser("ensemble", help="combine models (or train bagged/boosted members) into ONE deployable model")
    p.add_argument("models", nargs="*", help="member models (ONNX, .pt2, TFLite, .relax) with the same shapes")
    p.add_argument("--combine", choices=["mean", "vote", "weighted"], default="mean",
                   help="mean of softmax, majority vote, or weighted mean of softmax (default mean)")
    p.add_argument("--weights", metavar="W1,W2,...", help="member weights for --combine weighted")
    p.add_argument("--train", metavar="SPEC", help=f"train the members from a zoo spec ({', '.join(STUDENTS)})")
    p.add_argument("--members", type=int, default=3, metavar="N", help="members to train (default 3)")
    p.add_argument("--boost", action="store_true",
                   help="boosting (SAMME: sequential, reweighting the errors) instead of bagging (bootstrap samples)")
    p.add_argument("--data", metavar="DATA", help="labelled training data for --train: digits | shapes | FILE.npz")
    p.add_argument("--train-size", type=int, default=None, metavar="N", help="training samples (default all)")
    p.add_argument("--steps", type=int, default=300, metavar="N", help="training steps per member (default 300)")
    p.add_argument("--eval", metavar="DATA", help="labelled data to score each member and the ensemble on")
    p.add_argument("--repeat", type=int, default=50, help="timed runs per model (default 50)")
    p.add_argument("-o", "--output", required=True, help="ensemble to write (.relax or .onnx)")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                   help="fix an input shape, e.g. input:1x3x224x224")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_ensemble)
