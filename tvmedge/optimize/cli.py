"""``tvmedge optimize``: apply compression rewrites, check them against the original, save.

The same flags work on ``tvmedge compile`` (the rewrites then run before compiling).
Order: low-rank factorization, compact filters, then int8 quantization (it quantizes the
already-factorized layers). After all rewrites the result is checked against the original
model on the calibration data (max abs/rel error) and, with ``--eval``, on the task metric;
with ``--max-drop`` the quantizer keeps the layers that cost the most accuracy in float
until the drop is within bounds.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..core.errors import TvmedgeError
from ..core.jsonio import dumps
from ..core.model import ImportedModel


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
    g.add_argument("--compact", action="store_true",
                   help="compact-filter rewrites of KxK convs (needs --calib)")
    g.add_argument("--compact-max-error", type=float, default=0.05, metavar="E",
                   help="largest relative output error a compact rewrite may add to its layer (default 0.05)")
    g.add_argument("--eval", metavar="DATA", help="labelled data to measure the accuracy drop on: digits | shapes | FILE.npz")
    g.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="largest accuracy drop allowed (points; needs --eval); int8 falls back to float per layer")
    g.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                   help="fine-tune the rewritten model N steps by distillation from the original "
                        "(PyTorch sources and zoo models only)")


def wants_rewrites(args: argparse.Namespace) -> bool:
    return bool(args.quantize or args.lowrank or args.lowrank_flops or args.compact)


def _validate(args: argparse.Namespace) -> None:
    if (args.quantize or args.compact) and not args.calib:
        raise TvmedgeError("--quantize and --compact need calibration data: --calib digits|shapes|FILE.npz|DIR")
    if args.finetune_steps and not args.calib:
        raise TvmedgeError("--finetune-steps distils on calibration data: give --calib digits|shapes|FILE.npz")
    if args.lowrank and args.lowrank_flops:
        raise TvmedgeError("give --lowrank ENERGY or --lowrank-flops RATIO, not both")
    if args.lowrank is not None and not 0 < args.lowrank <= 1:
        raise TvmedgeError(f"--lowrank takes a fraction of spectral energy in (0, 1], got {args.lowrank}")
    if args.lowrank_flops is not None and not 0 < args.lowrank_flops < 1:
        raise TvmedgeError(f"--lowrank-flops takes a FLOP ratio in (0, 1), got {args.lowrank_flops}")
    if args.max_drop is not None and not args.eval:
        raise TvmedgeError("--max-drop needs labelled data to measure the drop on: --eval DATA")
    if args.max_drop is not None and args.max_drop < 0:
        raise TvmedgeError(f"--max-drop is a drop in points, 0 or more, got {args.max_drop}")
    if args.calib_size is not None and args.calib_size < 1:
        raise TvmedgeError(f"--calib-size takes a number of samples, 1 or more, got {args.calib_size}")
    if args.finetune_steps < 0:
        raise TvmedgeError(f"--finetune-steps takes 0 or more steps, got {args.finetune_steps}")
    if args.compact_max_error is not None and args.compact_max_error <= 0:
        raise TvmedgeError(f"--compact-max-error must be positive, got {args.compact_max_error}")


def apply_rewrites(model: ImportedModel, args: argparse.Namespace, progress: bool = True) -> tuple[ImportedModel, dict[str, Any]]:
    """Run the rewrites the flags ask for; returns the new model and the full report."""
    from . import data as data_mod
    from .check import HostRunner, check

    _validate(args)
    calib = data_mod.load(args.calib, model, "calib", limit=args.calib_size) if args.calib else None
    evals = data_mod.load(args.eval, model, "eval") if args.eval else None
    original = model
    reports: list[dict[str, Any]] = []
    if args.lowrank or args.lowrank_flops:
        from .lowrank import factorize

        model, rep = factorize(model, energy=args.lowrank, flops_ratio=args.lowrank_flops, calib=calib)
        reports.append(rep)
    if args.compact:
        from .compact import compact

        model, rep = compact(model, calib, max_error=args.compact_max_error, progress=progress)
        reports.append(rep)
    if args.finetune_steps and reports:
        from .finetune import finetune

        model, rep = finetune(original, model, steps=args.finetune_steps, data=calib, progress=progress)
        reports.append(rep)
    if args.quantize:
        from .quantize import quantize

        model, rep = quantize(model, calib, observer=args.observer, eval_data=evals,
                              max_drop=args.max_drop, reference=original, progress=progress)
        reports.append(rep)
    ref = HostRunner(original)
    summary = check(original, model, calib or data_mod.load(args.eval, model, "eval") if (calib or args.eval) else
                    _random_data(model), evals, ref_runner=ref)
    model.rewrites = list(original.rewrites) + [
        {k: v for k, v in r.items() if k not in ("layers", "skipped")} for r in reports]
    return model, {"rewrites": reports, "check": summary}


def _random_data(model: ImportedModel):
    """Without calibration or evaluation data, numerics are checked on random inputs."""
    from ..run import random_inputs
    from .data import Dataset

    specs = [s.to_dict() for s in model.inputs]
    return Dataset(name="random", samples=[random_inputs(specs, seed=i) for i in range(8)])


def print_report(report: dict[str, Any], out=None) -> None:
    from rich.console import Console
    from rich.table import Table

    stream = out or sys.stdout
    # Piped or logged output gets rich's 80 columns, too narrow for the per-layer tables.
    console = Console(file=stream, width=None if stream.isatty() else 160)
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
        for s in rep.get("skipped", []):
            console.print(f"  skipped {s['layer']}: {s['reason']}")
    c = report["check"]
    line = f"check vs original on {c['samples']} samples: max abs err {c['max_abs']:.3g}, max rel err {c['max_rel']:.3g}"
    if c.get("metric"):
        line += (f"; {c['metric']} {100 * c['before']:.2f} -> {100 * c['after']:.2f} "
                 f"(drop {c['drop_points']:.2f} points)")
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
        raise TvmedgeError("nothing to do: give --quantize int8, --lowrank/--lowrank-flops and/or --compact")
    model = load_model(args.model, parse_shapes(args.input_shape))
    new, report = apply_rewrites(model, args, progress=not args.json)
    save_relax(new, args.output)
    report.update(model=os.path.basename(args.model), output=args.output,
                  bytes_before=os.path.getsize(args.model), bytes_after=os.path.getsize(args.output))
    if args.json:
        print(dumps(report))
    else:
        print_report(report)
        print(f"wrote {args.output}")
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser("optimize", help="compress a model (int8, low-rank, compact filters), checked against the original")
    p.add_argument("model", help="ONNX, .pt2, TFLite or .relax model")
    p.add_argument("-o", "--output", required=True, help="optimized model to write (.relax)")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_optimize_args(p)
    p.set_defaults(func=cmd_optimize)
