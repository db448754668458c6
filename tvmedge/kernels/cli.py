"""``tvmedge kernels bench``: argparse in, plain calls out (timing.run_bench, report.*)."""

from __future__ import annotations

import argparse
from typing import Any

from ..core.errors import TvmedgeError
from . import BACKENDS
from .report import plot_roofline, print_table, to_json
from .timing import failed_rows, run_bench
from .workload import DEFAULT_SHAPES, KERNELS, parse_shape


def parse_backends(text: str) -> list[str]:
    """``all`` or a comma list of backend names -> the names; unknown names are an error."""
    names = list(BACKENDS) if text == "all" else [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if bad:
        raise TvmedgeError(f"unknown backend {', '.join(bad)}; choose from "
                           f"{', '.join(BACKENDS)} or all")
    return names


def kernels_bench(kernel: str, backends: list[str], shapes: list[str], repeat: int, warmup: int,
                  as_json: bool = False, plot: str | None = None) -> int:
    """Run, print a table (or one JSON object), optionally plot; 1 if a backend failed, else 0."""
    try:
        parsed = [parse_shape(kernel, s) for s in shapes]
    except ValueError as e:
        raise TvmedgeError(str(e)) from e
    if repeat < 1 or warmup < 0:
        raise TvmedgeError("--repeat must be >= 1 and --warmup >= 0")
    result = run_bench(kernel, backends, parsed, repeat=repeat, warmup=warmup)
    if plot:
        result["plot"] = plot_roofline(result, plot)
    if as_json:
        print(to_json(result))
    else:
        print_table(result)
        if plot:
            print(f"roofline -> {plot}")
    return 1 if failed_rows(result) else 0


def cmd_kernels_bench(args: argparse.Namespace) -> int:
    """``tvmedge kernels bench``."""
    return kernels_bench(args.kernel, parse_backends(args.backend),
                         args.shapes.split(",") if args.shapes else DEFAULT_SHAPES[args.kernel],
                         repeat=args.repeat, warmup=args.warmup, as_json=args.json, plot=args.plot)


def register_cli(subparsers: Any) -> None:
    """Add ``kernels bench`` to the ``tvmedge`` argparse sub-commands."""
    kp = subparsers.add_parser("kernels", help="hand-written binarized (XNOR/popcount) kernels")
    ks = kp.add_subparsers(dest="kernels_command", required=True)
    p = ks.add_parser("bench", help="time xnor_gemm / bconv2d per backend against numpy fp32")
    p.add_argument("--kernel", choices=KERNELS, default="xnor_gemm", help="kernel to time (default xnor_gemm)")
    p.add_argument("--backend", default="all",
                   help=f"{'|'.join(BACKENDS)}|all, or a comma list (default: all)")
    p.add_argument("--shapes", default=None,
                   help="comma list; xnor_gemm: MxNxK (K in bits), bconv2d: "
                        "NxCxHxW-OxKHxKW[-sS][-pP] (default: "
                        + "; ".join(f"{k}: {','.join(v)}" for k, v in DEFAULT_SHAPES.items()) + ")")
    p.add_argument("--repeat", type=int, default=10, help="timed samples (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a roofline plot")
    p.set_defaults(func=cmd_kernels_bench)
