"""``tvmedge video``, ``tvmedge video-clip`` and ``tvmedge report`` (argument parsing and printing
only; the work is in :mod:`tvmedge.app.video` and :mod:`tvmedge.app.report`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..core.errors import TvmedgeError
from ..core.jsonio import dumps


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise TvmedgeError(f"{what} takes three comma-separated numbers, got '{text}'") from None
    if len(vals) != 3:
        raise TvmedgeError(f"{what} takes three comma-separated numbers (R,G,B), got '{text}'")
    return vals


def _open_video_pool(args: argparse.Namespace):
    from ..deploy.address import parse_host_port
    from ..deploy.pool import open_pool, parse_keys
    from ..deploy.session import connect

    common = dict(inflight=args.inflight, strategy=args.pool_strategy, threads=args.threads, timeout=args.rpc_timeout)
    if args.pool:
        if not args.rpc_tracker:
            raise TvmedgeError("--pool needs --rpc-tracker HOST:PORT (the tracker the pool's servers registered with)")
        if args.rpc_key or args.rpc_host:
            raise TvmedgeError("give either --pool KEYS or --rpc-key/--rpc-host, not both")
        return open_pool(args.artifact, parse_host_port(args.rpc_tracker), parse_keys(args.pool), **common)
    if args.rpc_tracker:
        if not args.rpc_key:
            raise TvmedgeError("--rpc-tracker needs --rpc-key KEY (or --pool KEYS)")
        sess = connect(tracker=parse_host_port(args.rpc_tracker), key=args.rpc_key, timeout=args.rpc_timeout)
        return open_pool(args.artifact, session=sess, session_name=args.rpc_key, **common)
    if args.rpc_host:
        sess = connect(host_port=parse_host_port(args.rpc_host), timeout=args.rpc_timeout)
        return open_pool(args.artifact, session=sess, session_name=args.rpc_host, **common)
    if args.rpc_key:
        raise TvmedgeError("--rpc-key needs --rpc-tracker HOST:PORT")
    return open_pool(args.artifact, threads=args.threads)


def cmd_video(args: argparse.Namespace) -> int:
    from .video import process_video, video_json

    mean = _floats(args.mean, "--mean")
    std = _floats(args.std, "--std")
    if any(v == 0 for v in std):
        raise TvmedgeError("--std values must be non-zero")
    labels = None
    if args.labels:
        import numpy as np

        try:
            labels = np.load(args.labels, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise TvmedgeError(f"cannot read --labels {args.labels}: {e}") from None
    say = (lambda line: print(f"note: {line}", file=sys.stderr))
    with _open_video_pool(args) as pool:
        res = process_video(args.input, args.output, pool, pool.meta, realtime=args.realtime, mean=mean, std=std,
                            keep_masks=labels is not None, log=say)
        info = video_json(res, pool, args, labels)
    if args.json:
        print(dumps(info))
        return 0
    st = info["stage_ms"]
    stages = ", ".join(f"{k} {v:.2f}" for k, v in st.items() if v is not None)
    print(f"{os.path.basename(args.input)} -> {args.output}: {info['frames']} frames in {info['wall_s']:.2f} s = "
          f"{info['fps']:.1f} FPS end to end ({info['kind']}; bottleneck: {info['bottleneck']})")
    print(f"  per stage, mean ms/frame: {stages}")
    if args.realtime:
        print(f"  at {args.realtime:g} FPS real time: {info['dropped']} of {info['decoded']} frames dropped")
    if info.get("miou") is not None:
        print(f"  mIoU against --labels: {info['miou']:.3f}")
    pool_info = info["pool"]
    if pool_info and len(pool_info["devices"]) > 1:
        for d in pool_info["devices"]:
            state = "ok" if d["alive"] else f"LOST ({d['error']})"
            print(f"  {d['name']}: {d['frames']} frames ({100 * d['share']:.0f} %), {state}")
    return 0


def cmd_video_clip(args: argparse.Namespace) -> int:
    import numpy as np

    from ..zoo.shapes import moving_clip
    from .video import write_clip

    if args.frames < 1 or args.size < 16:
        raise TvmedgeError("--frames must be >= 1 and --size >= 16")
    rgb, labels = moving_clip(args.frames, args.size, args.seed)
    write_clip(args.output, rgb, fps=args.fps)
    if args.labels:
        np.save(args.labels, labels)
    extra = f", ground truth -> {args.labels}" if args.labels else ""
    print(f"wrote {args.output}: {args.frames} frames {args.size}x{args.size} at {args.fps} FPS "
          f"(moving circle, square, triangle){extra}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    out = build_report(args.model, devices=[d.strip() for d in args.devices.split(",") if d.strip()],
                       variants=[v.strip() for v in args.variants.split(",") if v.strip()],
                       out_dir=Path(args.output), tuning_db=args.tuning_db, tracker=args.rpc_tracker,
                       repeat=args.repeat, eval_samples=args.eval_samples,
                       log=lambda line: print(line, file=sys.stderr))
    print(f"wrote {out / 'index.html'} and {out / 'report.json'}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    from ..cli import _add_pool_args, _add_rpc_args

    p = sub.add_parser("video", help="run a model over a video (decode, preprocess, infer, postprocess, encode)")
    p.add_argument("input", help="video file (anything FFmpeg reads)")
    p.add_argument("artifact", help="compiled model (.tar)")
    p.add_argument("-o", "--output", required=True, help="annotated video to write (.mp4)")
    p.add_argument("--realtime", type=float, metavar="FPS",
                   help="feed frames at this rate, like a camera, and drop those the pipeline cannot take")
    p.add_argument("--mean", default="0,0,0", help="per-channel mean subtracted from RGB in [0,1] (default 0,0,0)")
    p.add_argument("--std", default="1,1,1", help="per-channel std the RGB is divided by (default 1,1,1)")
    p.add_argument("--threads", type=int, default=None, help="runtime threads per device (default: all cores)")
    p.add_argument("--labels", metavar="GT.npy", help="ground-truth class maps [N,H,W] (video size): report mIoU")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_rpc_args(p)
    _add_pool_args(p)
    p.set_defaults(func=cmd_video)

    p = sub.add_parser("video-clip", help="generate a test clip of moving shapes (and its ground truth)")
    p.add_argument("-o", "--output", required=True, help="video to write (.mp4)")
    p.add_argument("--labels", metavar="GT.npy", help="write the per-pixel classes [N,H,W] here")
    p.add_argument("--frames", type=int, default=48, help="frames in the clip (default 48)")
    p.add_argument("--size", type=int, default=96, help="frame width and height in pixels (default 96)")
    p.add_argument("--fps", type=int, default=30, help="frame rate written to the file (default 30)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the shapes' paths (default 0)")
    p.set_defaults(func=cmd_video_clip)

    p = sub.add_parser("report", help="devices x model variants side by side: report/index.html + report.json")
    p.add_argument("model", help="zoo name (shapes-seg, digits-cnn) or model file")
    p.add_argument("--devices", default="host", help="comma-separated device names (default host), e.g. host,pi4")
    p.add_argument("--variants", default="fp32", help="comma-separated: fp32,int8,lowrank,compact (default fp32)")
    p.add_argument("--tuning-db", metavar="DIR", help="compile with the tuning records in DIR")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="devices registered here under their keys are measured on hardware; others are "
                        "emulated when tvmedge can emulate them, else 'not measured'")
    p.add_argument("--repeat", type=int, default=20, help="timed runs per row (default 20)")
    p.add_argument("--eval-samples", type=int, default=64, help="evaluation samples for accuracy/mIoU (default 64)")
    p.add_argument("-o", "--output", default="report", help="output folder (default report/)")
    p.set_defaults(func=cmd_report)
