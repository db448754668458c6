"""``tvmedge export MODEL -o model.onnx [--format qdq|float]``: write a (optimized) model as
standard ONNX, then run the file in ONNX Runtime and OpenVINO and compare with tvmedge."""

from __future__ import annotations

import argparse
from typing import Any

from ..core.errors import TvmedgeError
from ..core.jsonio import dumps


def cmd_export(args: argparse.Namespace) -> int:
    from ..core.model import random_inputs
    from ..frontend import load_model, parse_shapes
    from ..optimize import data as data_mod
    from ..optimize.data import Dataset
    from .onnx import write_onnx
    from .verify import int8_step, verify

    model = load_model(args.model, parse_shapes(args.input_shape))
    report = write_onnx(model, args.output, args.format)
    if not args.no_verify:
        if args.data:
            data = data_mod.load(args.data, model, "eval", limit=args.samples)
        else:
            specs = [s.to_dict() for s in model.inputs]
            data = Dataset(name="random", samples=[random_inputs(specs, seed=i) for i in range(args.samples)])
        report["verify"] = verify(model, args.output, data, limit=args.samples)
        report["int8_step"] = int8_step(report)
    if args.json:
        from ..core.schema import envelope

        print(dumps(envelope("export", report)))
        return 0
    n8 = len(report["int8_layers"]) or report["dequantized_int8_layers"]
    kind = {"qdq": f"{n8} int8 layer(s) as QDQ", "float": f"{n8} int8 layer(s) dequantized to float"}[args.format]
    print(f"wrote {args.output}: ONNX opset {report['opset']}, {report['nodes']} nodes, {kind}, "
          f"{report['bytes'] / 1e3:.1f} kB")
    for rt, v in report.get("verify", {}).items():
        step = f" ({v['max_abs'] / report['int8_step']:.2f} int8 steps)" if report.get("int8_step") else ""
        print(f"  {rt}: max abs error vs tvmedge {v['max_abs']:.3g}{step} (outputs up to {v['max_abs_output']:.3g}), "
              f"argmax agreement {100 * v['argmax_agreement']:.2f}% on {v['samples']} samples")
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser("export", help="write a (optimized) model as standard ONNX for other runtimes "
                                      "(int8 as QDQ), checked in ONNX Runtime and OpenVINO")
    p.add_argument("model", help="model to export: a .relax from `tvmedge optimize`, or ONNX/.pt2/TFLite")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write (.onnx)")
    p.add_argument("--format", choices=["qdq", "float"], default="qdq",
                   help="int8 layers as QuantizeLinear/DequantizeLinear with tvmedge's scales (qdq, default), "
                        "or dequantized float weights without activation quantization (float)")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                   help="fix an input shape, e.g. input:1x3x224x224")
    p.add_argument("--data", metavar="DATA", help="inputs to check the export on: digits | shapes | FILE.npz "
                                                  "(default: random inputs)")
    p.add_argument("--samples", type=int, default=16, metavar="N", help="samples to check on (default 16)")
    p.add_argument("--no-verify", action="store_true", help="skip running the file in ONNX Runtime and OpenVINO")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export)
