"""The emulated VTA board's RPC server process: TVM's RPC server (``tvm.rpc.Server``) with
the accelerator's driver function registered in every session (``server_init_callback``).

Takes ``tvm.exec.rpc_server``'s options, so :func:`tvmedge.deploy.launch.start_server` can
run it through a wrapper given as its "python" (:mod:`tvmedge.vta.board`). It imports only
TVM's runtime, numpy and the simulator, so it also runs in the aarch64 Python under
qemu-user with the runtime-only TVM library.
"""

from __future__ import annotations

import argparse
import sys


def serve(argv: list[str]) -> None:
    """``tvm.exec.rpc_server``'s options, served with the accelerator's function registered."""
    import logging

    from tvm import rpc

    from .runtime import register as register_driver

    info = None
    if argv[:1] == ["-c"] and len(argv) >= 4:  # start_server's device_info boot: -c CODE INFO MODULE ARGS
        info, argv = argv[2], argv[4:]
    elif argv[:2] == ["-m", "tvm.exec.rpc_server"]:
        argv = argv[2:]

    def register() -> None:
        register_driver()
        if info is not None:
            import json
            import platform

            import tvm_ffi

            text = json.dumps({"arch": platform.machine(), **json.loads(info)})
            # the name tvmedge.deploy.session.device_info asks for (deploy.launch.DEVICE_INFO_FUNC)
            tvm_ffi.register_global_func("tvmedge.device_info", lambda: text, override=True)
    p = argparse.ArgumentParser(prog="tvmedge.vta.serve")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=9090, help="first port to try (default 9090)")
    p.add_argument("--port-end", type=int, default=9199, help="last port to try (default 9199)")
    p.add_argument("--key", default="", help="RPC key the tracker knows this board by")
    p.add_argument("--tracker", help="tracker HOST:PORT to register with")
    p.add_argument("--load-library", help="libraries to load into the server (as TVM's rpc_server)")
    p.add_argument("--custom-addr", help="address the tracker hands to clients")
    args = p.parse_args(argv)
    tracker = None
    if args.tracker:
        h, port = args.tracker.rsplit(":", 1)
        tracker = (h, int(port))
    logging.basicConfig(level=logging.INFO)
    server = rpc.Server(args.host, args.port, args.port_end, key=args.key, tracker_addr=tracker,
                        load_library=args.load_library, custom_addr=args.custom_addr, server_init_callback=register)
    server.proc.join()


if __name__ == "__main__":
    serve(sys.argv[1:])
