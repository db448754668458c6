"""``tvmedge device``: offer a device (serve), run a tracker, list devices, emulate a Pi."""

from __future__ import annotations

import argparse
import secrets
import sys
import time

from ..core.jsonio import dumps
from ..core.schema import envelope
from ..devices import accelerators, emulated
from ..core.errors import TvmedgeError
from .address import parse_host_port, public_host
from .emulate import main as emulate_main
from .launch import start_server, start_tracker
from .tracker import list_devices, server_registered, wait_for_tracker


def _wait_forever(what: str) -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print(f"\nstopping {what}")


def _line_buffered() -> None:
    """Long-running services write their log line by line, also into a pipe or a file."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def _warn_if_open(host: str, what: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the {what} listens on {host}: TVM RPC has no authentication, anyone who can reach "
              "this port can run code here. Keep it on loopback and reach it through an SSH tunnel "
              "(ssh -L PORT:127.0.0.1:PORT), or serve with --secret-key, unless the network is yours alone.",
              file=sys.stderr)


def cmd_tracker(args: argparse.Namespace) -> int:
    _line_buffered()
    _warn_if_open(args.host, "tracker")
    tr = start_tracker(host=args.host, port=args.port)
    print(f"RPC tracker listening on {tr.host}:{tr.port} (Ctrl-C to stop)")
    if args.host in ("127.0.0.1", "localhost"):
        print("  bound to loopback: give --host 0.0.0.0 to let devices on the network register")
    print(f"  on each device: tvmedge device serve --tracker {public_host(tr.host)}:{tr.port} --key pi4")
    try:
        _wait_forever("tracker")
    finally:
        tr.stop()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _line_buffered()
    if args.secret_key:
        if args.tracker:
            raise TvmedgeError("--secret-key serves without a tracker: a tracker hands its keys to anyone who asks")
        args.key = secrets.token_hex(16)
        print(f"secret key: {args.key}  (clients: --rpc-host HOST:PORT --rpc-key {args.key})")
    else:
        _warn_if_open(args.host, "RPC server")
    tracker = parse_host_port(args.tracker) if args.tracker else None
    if tracker is not None:
        wait_for_tracker(tracker, args.wait_tracker, log=print)

    def start():
        return start_server(tracker=tracker, key=args.key, host=args.host, port=args.port,
                            load_library=args.load_library, device_info={"kind": "hardware"})

    srv = start()
    where = f"registered with tracker {tracker[0]}:{tracker[1]} as '{args.key}'" if tracker else "no tracker"
    print(f"RPC server on {srv.host}:{srv.port}, {where} (Ctrl-C to stop)")
    print("  to start the same on a device (TVM runtime installed there):")
    print(f"    python -m tvm.exec.rpc_server --host {args.host} --port {args.port or 9090}"
          + (f" --tracker {tracker[0]}:{tracker[1]} --key {args.key}" if tracker else ""))
    if tracker is None:
        try:
            _wait_forever("server")
        finally:
            srv.stop()
    else:
        _supervise(srv, start, tracker, args.key)
    return 0


def _supervise(srv, start, tracker, key: str, every_s: float = 3.0, misses_allowed: int = 3) -> None:
    """Keep the board on the tracker, as a real board's service would: a server whose
    process died, or that dropped off the tracker (its session worker was killed), is
    restarted. Returns on Ctrl-C, with the server stopped."""
    misses = 0
    try:
        while True:
            time.sleep(every_s)
            registered = server_registered(tracker, key, srv.port)
            misses = 0 if registered is not False and srv.alive() else misses + 1
            if not srv.alive() or misses >= misses_allowed:
                why = "its process exited" if not srv.alive() else "it dropped off the tracker"
                print(f"RPC server '{key}' restarted: {why}")
                srv.stop()
                srv = start()
                misses = 0
    except KeyboardInterrupt:
        print("\nstopping server")
    finally:
        srv.stop()


def cmd_list(args: argparse.Namespace) -> int:
    tracker = parse_host_port(args.rpc_tracker)
    devices = list_devices(tracker)
    if args.json:
        print(dumps(envelope("device list", {"items": devices})))
        return 0
    if not devices:
        print(f"no devices registered at {tracker[0]}:{tracker[1]}")
    for d in devices:
        print(f"{d['key']:20s} free {d.get('free', 0):3d}  busy {d.get('busy', 0):3d}  pending {d.get('pending', 0):3d}")
    return 0


def cmd_emulate(args: argparse.Namespace) -> int:
    _line_buffered()
    if args.tracker:
        wait_for_tracker(parse_host_port(args.tracker), args.wait_tracker, log=print)
    if args.kind in accelerators():  # a VTA board: RPC server + simulated accelerator (tvmedge.vta.board)
        from ..vta.board import main as vta_main

        return int(vta_main(args.kind, tracker=args.tracker, key=args.key) or 0)
    return int(emulate_main(kind=args.kind, tracker=args.tracker, key=args.key) or 0)


def register_cli(sub) -> None:
    dp = sub.add_parser("device", help="RPC devices: serve, tracker, list, emulate").add_subparsers(
        dest="device_command", required=True)

    p = dp.add_parser("tracker", help="start an RPC tracker (the device farm's scheduler)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=9190, help="port to listen on (default 9190, TVM's)")
    p.set_defaults(func=cmd_tracker)

    p = dp.add_parser("serve", help="offer this machine as a device (TVM RPC server)")
    p.add_argument("--tracker", metavar="HOST:PORT", help="register with this tracker")
    p.add_argument("--key", default="host", help="device key at the tracker (e.g. pi4)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=None, help="port to listen on (default: a free one)")
    p.add_argument("--load-library", action="append", help="extra runtime library to load")
    p.add_argument("--wait-tracker", type=float, default=120.0, metavar="S",
                   help="keep retrying an unreachable tracker this long, with backoff (default 120)")
    p.add_argument("--secret-key", action="store_true",
                   help="serve without a tracker under a random key that only clients given it can use "
                        "(the server checks it on every connection); printed once")
    p.set_defaults(func=cmd_serve)

    p = dp.add_parser("list", help="keys registered at a tracker, with free/busy counts")
    p.add_argument("--rpc-tracker", required=True, metavar="HOST:PORT", help="the tracker to ask")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_list)

    p = dp.add_parser("emulate", help="an emulated device (qemu) registered with a tracker")
    p.add_argument("kind", choices=sorted(emulated()) + sorted(accelerators()),
                   help="board to emulate (a VTA target: its accelerator simulated); it tells every session it is "
                        "emulated, and run/tune label its timings")
    p.add_argument("--tracker", metavar="HOST:PORT", help="default: start a local tracker")
    p.add_argument("--key", default=None, help="device key (default: the kind)")
    p.add_argument("--wait-tracker", type=float, default=120.0, metavar="S",
                   help="keep retrying an unreachable --tracker this long, with backoff (default 120)")
    p.set_defaults(func=cmd_emulate)

