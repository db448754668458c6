"""An emulated VTA board over RPC: ``tvmedge device emulate vta-pynq``.

A TVM RPC server (TVM's own, ``tvm.rpc.Server``) whose sessions have the accelerator's
driver function ``tvmedge.vta.run`` registered (``server_init_callback``), so an artifact
compiled for ``vta-*`` runs there as on a board: the host part on the server's CPU, the
offloaded layers on the functional simulator. It registers with an RPC tracker under the
device's key (``vta-pynq``), and ``tvmedge run --rpc-tracker ... --rpc-key vta-pynq`` uses
the same tracker path as for the Pis.

Said plainly: the accelerator is SIMULATED (functional simulator; figures from the timing
model), and the host CPU part runs natively on this machine, not under qemu: the PYNQ's
Cortex-A9 is 32-bit armv7 and no armv7 TVM runtime exists to run under qemu-arm (TVM
ships x86-64 and aarch64 wheels only). Timings of such a run are this machine's plus the
simulator's, not the board's.

The server is started through :func:`tvmedge.deploy.launch.start_server` (process group,
loopback by default, ready once the tracker lists it) with a small wrapper as its
"python": the wrapper runs this module, which takes ``tvm.exec.rpc_server``'s options.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ..core.errors import TvmedgeError
from ..deploy.address import HostPort, as_host_port, format_host_port, public_host
from ..deploy.launch import Server, Tracker, start_server, start_tracker
from ..deploy.tracker import tracker_summary
from ..devices import accelerator

SIMULATED = ("the accelerator is SIMULATED (tvmedge's functional simulator; latency figures come from its timing "
             "model, not an FPGA)")


def note(accel: Any) -> str:
    """What runs where on the emulated board, said plainly."""
    emu = accel.host_emulator
    cpu = accel.host_cpu.get("name", "CPU")
    if emu is not None:
        return f"{SIMULATED}; the host CPU part runs under {emu['qemu']} -cpu {emu['cpu']} (emulated {cpu}: slow)"
    return (f"{SIMULATED}; the host CPU part runs natively on this machine, not under qemu: no "
            f"{accel.host_cpu.get('arch', '')} TVM runtime exists for the board's {cpu}")


class VtaBoard:
    """A running emulated VTA board (context manager)."""

    def __init__(self, kind: str = "vta-pynq", tracker: HostPort | str | None = None, key: str | None = None,
                 host: str = "127.0.0.1", port: int | None = None, timeout: float = 90.0) -> None:
        self.accel = accelerator(kind)
        self.kind = kind
        self.tracker = as_host_port(tracker) if tracker is not None else None
        self.key = key or kind
        self.host = host
        self.port = port
        self.timeout = timeout
        self.server: Server | None = None
        self._workdir: Path | None = None

    def start(self) -> "VtaBoard":
        self._workdir = Path(tempfile.mkdtemp(prefix=f"tvmedge-{self.kind}-"))
        try:
            python, env = self._python()
            info = {"kind": "simulated", "board": self.kind, "accelerator": "functional simulator + timing model",
                    "emulator": (self.accel.host_emulator or {}).get("qemu") or "none (host part runs natively)"}
            self.server = start_server(self.tracker, self.key, host=self.host, port=self.port, env=env,
                                       python=str(python), timeout=self.timeout, device_info=info)
        except TvmedgeError as e:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            raise TvmedgeError(f"emulated {self.kind} did not start: {e}") from None
        self.port = self.server.port
        return self

    def _python(self) -> tuple[Path, dict[str, str | None]]:
        """The wrapper start_server runs as "python", and the environment for it.

        start_server runs ``<python> -m tvm.exec.rpc_server ARGS``; the wrapper runs
        :mod:`tvmedge.vta.serve` with the same ARGS, natively or, for a board whose host CPU
        this machine emulates, in the aarch64 Python under qemu-user."""
        assert self._workdir is not None
        launcher = self._workdir / "python3"
        emu = self.accel.host_emulator
        env: dict[str, str | None] = {"TVMEDGE_EMULATED": self.kind}
        if emu is None:
            launcher.write_text(f"#!/bin/sh\n# tvmedge emulated {self.kind}: TVM's RPC server with the simulated "
                                f"accelerator\nexec {shlex.quote(sys.executable)} -m tvmedge.vta.serve \"$@\"\n")
        else:
            from ..deploy.sysroot import prepare_sysroot

            sysroot = prepare_sysroot(emu["arch"])
            # The emulated Python sees tvmedge (pure Python) through a folder holding only it.
            pkg = self._workdir / "pkg"
            pkg.mkdir()
            (pkg / "tvmedge").symlink_to(Path(__file__).resolve().parents[1])
            plain = self._workdir / "python3-emulated"  # TVM's popen workers re-enter qemu through it
            plain.write_text(f"#!/bin/sh\nexec {shlex.join(sysroot.command(emu['cpu']))} \"$@\"\n")
            plain.chmod(0o755)
            launcher.write_text(f"#!/bin/sh\n# tvmedge emulated {self.kind}: host part under {emu['qemu']} "
                                f"-cpu {emu['cpu']}, simulated accelerator\nexec {shlex.quote(str(plain))} "
                                "-m tvmedge.vta.serve \"$@\"\n")
            # The host's Python/loader settings mean nothing to the emulated Python: drop them.
            env.update({k: None for k in os.environ
                        if k.startswith(("PYTHON", "LD_")) or k in ("VIRTUAL_ENV", "CONDA_PREFIX")})
            env.update(PYTHONPATH=f"{sysroot.site_packages}:{pkg}", PYTHONNOUSERSITE="1", TVM_USE_RUNTIME_LIB="1",
                       TVMEDGE_EMU_EXECUTABLE=str(plain), TVMEDGE_EMULATED=self.kind)
        launcher.chmod(0o755)
        return launcher, env

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def alive(self) -> bool:
        return self.server is not None and self.server.alive()

    @property
    def address(self) -> str | None:
        return self.server.address if self.server else None

    def info(self) -> dict[str, Any]:
        emu = self.accel.host_emulator
        return {"kind": self.kind, "key": self.key, "emulated": True, "simulated_accelerator": True,
                "host_part": "native" if emu is None else f"{emu['qemu']} -cpu {emu['cpu']}", "server": self.address,
                "note": note(self.accel)}

    def __enter__(self) -> "VtaBoard":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(kind: str, tracker: HostPort | str | None = None, key: str | None = None, host: str = "127.0.0.1",
         out: Callable[[str], None] | None = None) -> int:
    """Run an emulated VTA board in the foreground until Ctrl-C (SIGTERM, SIGHUP); starts a
    local tracker when none is given."""
    say = out or (lambda msg: print(msg, flush=True))
    acc = accelerator(kind)
    key = key or kind
    own: Tracker | None = None
    board: VtaBoard | None = None

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, on_term) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if tracker is None:
            own = start_tracker(host)
            tracker = own.addr
            say(f"started RPC tracker at {format_host_port((public_host(host), own.port))}")
        else:
            tracker = as_host_port(tracker)
            tracker_summary(tracker)
        say(f"starting emulated {kind}: {acc.block_in}x{acc.block_out} GEMM core at {acc.clock_mhz:g} MHz, "
            f"host {acc.host_cpu.get('name', '?')} ({acc.host_cpu.get('arch', '?')})")
        say(f"note: {note(acc)}")
        board = VtaBoard(kind, tracker, key, host=host).start()
        where = format_host_port((public_host(tracker[0]), tracker[1]))
        say(f"ready: --rpc-tracker {where} --rpc-key {key}  (server {board.address}). Ctrl-C to stop.")
        while True:
            if not board.alive():
                raise TvmedgeError(f"emulated {kind} '{key}': its RPC server exited ({board.server.log_tail(1)})")
            if own is not None and not own.alive():
                raise TvmedgeError(f"the RPC tracker at {own.address} stopped unexpectedly")
            time.sleep(1.0)
    except KeyboardInterrupt:
        say("stopping ...")
        return 0
    finally:
        if board is not None:
            board.stop()
        if own is not None:
            own.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
