"""The ``tvmedge`` command line: one sub-command per pipeline verb.

Errors a user can cause print one line (``error: ...``) on stderr and exit 1; ``--verbose``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from .deploy.address import parse_host_port
from .deploy.session import connect
from .core.errors import TvmedgeError, first_line
from .core.jsonio import dumps


def _console():
    from .core.progress import console

    return console()


# ---------------------------------------------------------------- compile
def cmd_compile(args: argparse.Namespace) -> int:
    from .build import compile_model
    from .frontend import load_model, parse_shapes
    from .target import resolve

    device = resolve(args.target)
    model = load_model(args.model, parse_shapes(args.input_shape))
    from .optimize.cli import apply_rewrites, print_report, wants_rewrites

    if wants_rewrites(args):
        model, report = apply_rewrites(model, args, progress=not args.json)
        if not args.json:
            print_report(report)
    meta = compile_model(model, device, args.output, tuning_db=args.tuning_db,
                         use_shipped=not args.no_shipped_schedules, keep_faster=not args.always_apply_records,
                         fp16=args.fp16)
    if args.json:
        from .core.schema import device_block, envelope

        # "device" is the schema's device block; the artifact's own description stays beside it.
        print(dumps(envelope("compile", {**meta, "device": device_block(device.name, meta["target"], via="none"),
                                         "device_description": meta["device"]})))
    else:
        ins = ", ".join(f"{i['name']}{i['shape']}" for i in meta["inputs"])
        tuned = f", tuning records: {meta['tuning_db']}" if meta["tuning_db"] else ", untuned"
        print(f"compiled {os.path.basename(args.model)} for {device.name} "
              f"({meta['target'].get('kind')}, {meta['target'].get('mtriple') or meta['target'].get('arch', '')}) "
              f"in {meta['compile_seconds']:.1f}s -> {args.output} "
              f"[{meta['library_bytes'] / 1e6:.1f} MB; inputs {ins}{tuned}]")
        if meta["tuning_db_skipped"]:
            print(f"note: {meta['tuning_db_skipped']}")
        if meta.get("vta"):
            from .vta.report import print_offload

            print_offload(meta["vta"])
        sch = meta["schedules"]
        line = f"kernels: {sch['tuned']} from tuning records, {sch['default_rule']} by default rules"
        if sch["unscheduled"]:
            line += f", {len(sch['unscheduled'])} unscheduled (naive loops): {', '.join(sch['unscheduled'])}"
        if sch["record_failed"]:
            line += f"; records that failed to apply (default rule used instead): {', '.join(sch['record_failed'])}"
        print(line)
        dot = {"int8-x86-vnni": "VNNI (vpdpbusd)", "int8-arm-sdot": "sdot", "int8-cuda-dp4a": "dp4a"}
        for r in meta["rewrites"]:
            if r.get("rewrite") in dot:
                print(f"int8 kernels: {r.get('conv2d', 0)} conv2d + {r.get('matmul', 0)} matmul on "
                      f"{dot[r['rewrite']]} ({r['rewrite']})")
            if r.get("name") == "fp16":
                c = r["check"]
                print(f"fp16: max error {c['max_rel_error']:.2g} of the output range vs fp32 "
                      f"(max abs {c['max_abs_error']:.2g}, allowed {c['tolerance']:g})")
        code = meta.get("device_code")
        if code:
            arches = ", ".join(code.get("ptx_targets") or code.get("cubin_targets") or [])
            isa = (f" (PTX ISA {', '.join(code['ptx_isa'])}: the board's driver must be CUDA "
                   f"{code.get('min_cuda_driver') or '?'} or newer)") if code.get("ptx_isa") else ""
            print(f"GPU code: {code['format']} for {arches}{isa}, NVRTC {code.get('nvrtc')}")
    return 0


# ---------------------------------------------------------------- run
def _session(args: argparse.Namespace):
    if not (args.rpc_tracker or args.rpc_host):
        if args.rpc_key:
            raise TvmedgeError("--rpc-key needs --rpc-tracker HOST:PORT")
        return None
    if args.rpc_tracker:
        if not args.rpc_key:
            raise TvmedgeError("--rpc-tracker needs --rpc-key KEY")
        return connect(tracker=parse_host_port(args.rpc_tracker), key=args.rpc_key, timeout=args.rpc_timeout)
    return connect(host_port=parse_host_port(args.rpc_host), timeout=args.rpc_timeout)


def cmd_run(args: argparse.Namespace) -> int:
    from .run import load_inputs, run_artifact, save_outputs
    from .core.artifact import read_artifact
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _, meta = read_artifact(args.artifact, tmp)
    inputs = load_inputs(args.inputs, meta["inputs"], warn=lambda line: print(f"warning: {line}", file=sys.stderr))
    if args.pool:
        return _run_pool(args, inputs)
    session = _session(args)
    res = run_artifact(args.artifact, inputs, repeat=args.repeat, threads=args.threads, session=session)
    if args.rpc_tracker or args.rpc_host:
        res.key = args.rpc_key or args.rpc_host
    if args.outputs:
        save_outputs(args.outputs, res)
    info = res.to_json()
    if args.compare:
        from .bench.peers import onnxruntime_baseline

        # ONNX Runtime runs here, on this host: next to a local run it is the same machine;
        # next to a device it is a different one, and says so in its own device block.
        info["baselines"] = {"onnxruntime": onnxruntime_baseline(
            args.compare, inputs, res.threads if res.device == "local" else (args.threads or os.cpu_count() or 1),
            args.repeat, res.outputs)}
    if args.json:
        print(dumps(info))
        return 0
    from .core.schema import kind_label

    lat, dev = info["latency_ms"], info["device"]
    where = f"rpc:{res.key}" if dev["via"] == "rpc" else "local"
    tag = kind_label(dev["kind"])
    print(f"{os.path.basename(args.artifact)} on {where} ({meta['device']['name']}{tag}, "
          f"{info['threads']} threads, {lat['runs']} runs): median {lat['median']:.3f} ms{tag}, "
          f"p90 {lat['p90']:.3f} ms, min {lat['min']:.3f} ms ({1e3 / lat['median']:.1f} FPS)")
    if dev["kind"] != "hardware":
        print(f"note: measured on an {dev['kind']} device ({dev.get('emulator') or dev.get('board') or dev['name']}): "
              "these times are not the real device's; use them for correctness and relative comparisons only")
    for o in info["outputs"]:
        print(f"  {o['name']}: {o['dtype']}{o['shape']} mean {o['mean']:.4g} min {o['min']:.4g} max {o['max']:.4g}")
    ort = info.get("baselines", {}).get("onnxruntime")
    if ort:
        same = dev["via"] == "local"
        print(f"ONNX Runtime on this host ({ort['device']['cpu']}, {ort['device']['threads']} threads): median "
              f"{ort['latency_ms']['median']:.3f} ms, max abs diff vs tvmedge {ort['max_abs_diff']:.3g}; "
              + (f"tvmedge/ORT {lat['median'] / ort['latency_ms']['median']:.2f}x" if same else
                 "not the device's machine: compare the outputs, not the times"))
    return 0


def _pool_target(args: argparse.Namespace):
    """``--pool KEYS`` with ``--rpc-tracker``: (tracker, keys)."""
    from .deploy.pool import parse_keys

    if not args.rpc_tracker:
        raise TvmedgeError("--pool needs --rpc-tracker HOST:PORT (the tracker the pool's servers registered with)")
    if args.rpc_key or args.rpc_host:
        raise TvmedgeError("give either --pool KEYS or --rpc-key/--rpc-host, not both")
    return parse_host_port(args.rpc_tracker), parse_keys(args.pool)


def _run_pool(args: argparse.Namespace, inputs) -> int:
    from .deploy.pool import run_over_pool
    from .run import save_outputs, RunResult

    tracker, keys = _pool_target(args)
    outputs, stats = run_over_pool(args.artifact, inputs, tracker, keys, args.repeat, inflight=args.inflight,
                                   strategy=args.pool_strategy, threads=args.threads, timeout=args.rpc_timeout)
    if args.outputs:
        import tempfile
        from .core.artifact import read_artifact

        with tempfile.TemporaryDirectory() as tmp:
            _, meta = read_artifact(args.artifact, tmp)
        save_outputs(args.outputs, RunResult(outputs, [], meta, "pool", 0))
    if args.json:
        from .core.schema import envelope

        print(dumps(envelope("run pool", {"pool": stats})))
        return 0
    print(f"{os.path.basename(args.artifact)} over pool {','.join(keys)} ({len(stats['devices'])} devices, "
          f"{stats['strategy']}, {stats['inflight']} in flight each): {stats['frames']} frames in "
          f"{stats['wall_s']:.2f} s = {stats['fps']:.1f} FPS; frames sent again: {stats['resent_frames']}")
    from .core.schema import kind_label

    for d in stats["devices"]:
        state = "ok" if d["alive"] else f"LOST ({d['error']})"
        mean = f"{d['mean_ms']:.2f} ms/frame" if d["mean_ms"] is not None else "-"
        print(f"  {d['name']}{kind_label(d['device']['kind'])}: {d['frames']} frames ({100 * d['share']:.0f} %), "
              f"{mean}, {state}")
    return 0


def _add_pool_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", metavar="KEY[,KEY...]",
                   help="spread frames over every server registered under these keys at --rpc-tracker")
    p.add_argument("--pool-strategy", choices=("least-loaded", "throughput"), default="least-loaded",
                   help="pool scheduling: fewest frames in flight, or measured throughput (default least-loaded)")
    p.add_argument("--inflight", type=int, default=2, help="frames in flight per pool device (default 2)")


# ---------------------------------------------------------------- zoo
# For the help text only (importing tvmedge.zoo imports torch: seconds on every command);
# tests/test_cli_conventions.py keeps it equal to tvmedge.zoo.ZOO.
ZOO_NAMES = ("mobilenet_v2", "resnet18", "lraspp_mbv3", "digits-cnn", "shapes-seg", "digits-bnn")

def cmd_zoo_list(args: argparse.Namespace) -> int:
    from . import zoo

    if args.json:
        from .core.schema import envelope

        print(dumps(envelope("zoo list", {"items": [
            {"name": e.name, "input_shape": list(e.input_shape), "trained": e.trained,
             "description": e.description} for e in zoo.ZOO.values()]})))
        return 0
    for e in zoo.ZOO.values():
        shape = "x".join(map(str, e.input_shape))
        print(f"{e.name:14s} {e.input_name}:{shape:14s} {e.description}")
    return 0


def cmd_zoo_export(args: argparse.Namespace) -> int:
    from . import zoo

    path = zoo.export(args.name, args.output)
    print(f"exported {args.name} -> {path}")
    return 0


# ---------------------------------------------------------------- demo (the README's main job)
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


# ---------------------------------------------------------------- parser
def _add_rpc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="run on a device reached through this RPC tracker")
    p.add_argument("--rpc-key", metavar="KEY", help="device key at the tracker (e.g. pi4)")
    p.add_argument("--rpc-host", metavar="HOST:PORT", help="run on this RPC server directly (no tracker)")
    p.add_argument("--rpc-timeout", type=float, default=60.0, metavar="S",
                   help="seconds to wait for a free device (default 60)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvmedge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile a model into a deployable library (.tar)")
    p.add_argument("model", help="ONNX (.onnx), torch.export program (.pt2), TFLite (.tflite) or tvmedge .relax")
    p.add_argument("-o", "--output", required=True, help="artifact to write (.tar)")
    p.add_argument("--target", default="host", help="device name (targets/), TVM tag or JSON target (default host)")
    p.add_argument("--tuning-db", metavar="DIR", help="apply the tuning records in DIR")
    p.add_argument("--always-apply-records", action="store_true",
                   help="apply --tuning-db's records even where `tvmedge tune` measured the model slower with them "
                        "than with the default schedules")
    p.add_argument("--no-shipped-schedules", action="store_true",
                   help="without --tuning-db, do not apply the databases shipped in schedules/ for the target's ISA class")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS", help="fix an input shape, e.g. input:1x3x224x224")
    p.add_argument("--fp16", action="store_true",
                   help="CUDA targets: compute in fp16 (checked against fp32 on this CPU; Jetson Nano: 2x fp16 rate)")
    p.add_argument("--json", action="store_true", help="print the artifact metadata as JSON")
    from .optimize.cli import add_optimize_args

    add_optimize_args(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run an artifact here or on a device over RPC and time it")
    p.add_argument("artifact", help="artifact (.tar) written by `tvmedge compile`")
    p.add_argument("--inputs", metavar="IN.npz", help="inputs by name (default: random, seeded)")
    p.add_argument("--outputs", metavar="OUT.npz", help="write outputs here, in output order")
    p.add_argument("--repeat", type=int, default=20, help="timed runs (default 20; with --pool: frames sent)")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--compare", metavar="MODEL.onnx",
                   help="also run this ONNX model (the artifact's source) in ONNX Runtime on this host, with the "
                        "same inputs: its latency and the largest output difference (JSON: baselines.onnxruntime)")
    _add_rpc_args(p)
    _add_pool_args(p)
    p.set_defaults(func=cmd_run)

    zp = sub.add_parser("zoo", help="reference models").add_subparsers(dest="zoo_command", required=True)
    p = zp.add_parser("list", help="list the zoo models")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_zoo_list)
    p = zp.add_parser("export", help="export a zoo model to .onnx, .pt2, .tflite or .relax (binarized models: packed-bit ops)")
    p.add_argument("name", help=f"zoo model: {', '.join(ZOO_NAMES)}")
    p.add_argument("-o", "--output", required=True,
                   help="file to write; its extension picks the format (.onnx, .pt2, .tflite, .relax)")
    p.set_defaults(func=cmd_zoo_export)

    p = sub.add_parser("demo", help="the built-in default job: compile, run and compare a zoo model")
    p.add_argument("--model", default="mobilenet_v2",
                   help="zoo model compiled and run on this host next to ONNX Runtime (default mobilenet_v2)")
    p.add_argument("--workdir", default=None, help="where to write the artifacts (default ./out/demo)")
    p.add_argument("--trials", type=int, default=16, help="tuning budget on the emulated pi4 (default 16)")
    p.add_argument("--skip-device", action="store_true", help="only the host part (no emulated pi4)")
    p.set_defaults(func=cmd_demo)

    # Stages that add their own verbs (device, tune, kernels, optimize).
    import importlib
    import importlib.util

    for extra in ("tvmedge.deploy.cli", "tvmedge.tune.cli", "tvmedge.kernels.cli", "tvmedge.optimize.cli",
                  "tvmedge.app.cli", "tvmedge.export.cli"):
        try:
            present = importlib.util.find_spec(extra) is not None
        except ModuleNotFoundError:  # its package is not there yet
            present = False
        if present:
            importlib.import_module(extra).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --verbose is global: accepted before or after the verb (argparse alone takes it only before).
    verbose = any(a in ("-v", "--verbose") for a in argv)
    args = parser.parse_args([a for a in argv if a not in ("-v", "--verbose")])
    args.verbose = verbose
    try:
        return int(args.func(args) or 0)
    except TvmedgeError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: still one line unless --verbose
        if args.verbose:
            raise
        print(f"error: {type(e).__name__}: {first_line(e)} (run with --verbose for details)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
