"""Emulated Raspberry Pi boards: a real TVM RPC server running arm64 code under qemu-user.

``EmulatedDevice("pi4", tracker=(host, port))`` starts ``python -m tvm.exec.rpc_server``
with Debian's arm64 Python 3.11 under ``qemu-aarch64-static -L SYSROOT`` (user space from
:mod:`tvmedge.deploy.sysroot`, prepared on first use) and registers it with the tracker
under its key, like a board on the desk would. Code built for the board (cross-linked
aarch64 libraries) is uploaded and run exactly as on hardware, so numerics, the RPC path
and MetaSchedule's measuring all get exercised without one.

Choices:

* The boards are the device descriptions in ``targets/`` with an ``"emulator"``
  (:func:`tvmedge.devices.emulated`): it names the qemu-user binary, the CPU model
  (``-cpu``: ``pi4`` the BCM2711's ``cortex-a72``, ``pi3`` ``cortex-a53``, ``pi5``
  ``cortex-a76``, Armv8.2-A with the int8 ``sdot`` dot product that int8 models compiled
  for ``pi5`` use) and the user space, the same arm64 one (64-bit Raspberry Pi OS) for
  all three. The 32-bit ``arm/rasp3b`` tag would need an armhf user space: not provided.
* The CPU model only limits the instruction set (a library using an extension the board
  lacks faults, as it would on the board); it does not model the board's speed. Emulated
  timings are 10-30x slower than native and not a Pi's: every info dict says
  ``"emulated": True``; use them for correctness and relative comparisons only.
* The server is the runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``, ``import tvm`` ~4-6 s
  under qemu) with ``libtvm_runtime_extra.so`` loaded (``--load-library``), which holds
  MetaSchedule's measuring functions (``tvm.contrib.random.random_fill_for_measure``).
* TVM's server starts workers with ``sys.executable -m tvm.exec.popen_worker``. Without
  binfmt_misc the host cannot exec an arm64 binary, so ``sys.executable`` is pointed (via
  ``TVMEDGE_EMU_EXECUTABLE`` and the sysroot's ``sitecustomize.py``) at a host shell
  wrapper that re-enters qemu.
* The server and its workers run in one process group; ``stop()`` (or leaving the
  ``with`` block) ends them all.
* riscv64 boards (``riscv-u74``, ``bpi-f3``) have no Python TVM: no wheel exists for
  riscv64. They run tvmedge's cross-built C++ RPC server instead
  (:mod:`tvmedge.deploy.crossrt`, built on first use) under ``qemu-riscv64-static -L
  /usr/riscv64-linux-gnu`` with the board's CPU model (``sifive-u54``: the U74's RV64GC;
  ``rv64,v=true,vlen=256,...``: RVV 1.0 as on the SpacemiT K1). Same tracker protocol and
  sessions; each session is a forked process of the server.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..devices import emulation
from ..core.errors import TvmedgeError
from .address import HostPort, as_host_port, format_host_port, parse_host_port, public_host
from .launch import Server, Tracker, start_server, start_tracker
from .crossrt import SUPPORTED_ARCHES as CROSS_BUILT_ARCHES, CrossRuntime, prepare_runtime
from .sysroot import Sysroot, _which_or_error, prepare_sysroot
from .tracker import server_registered, tracker_summary

START_TIMEOUT_S = 180.0  # import tvm twice under qemu (server + its popen worker) on a busy host


class EmulatedDevice:
    """A TVM RPC server for an emulated board, registered with a tracker (context manager).

    ``tracker``: ``(host, port)`` of the RPC tracker to register with under ``key``
    (default: the kind's name); ``None`` serves ``host:port`` directly. ``port=None``
    picks a free port. ``restart_on_crash``: with a tracker, bring the server back when a
    crashing session takes it down (see ``_watch``). ``log``: progress/restart messages
    (default: stderr).
    """

    def __init__(self, kind: str = "pi4", tracker: HostPort | str | None = None, key: str | None = None,
                 host: str = "127.0.0.1", port: int | None = None, *, timeout: float = START_TIMEOUT_S,
                 sysroot: Sysroot | CrossRuntime | None = None, log: Callable[[str], None] | None = None,
                 restart_on_crash: bool = True):
        self.board = emulation(kind)
        self.kind = kind
        self.tracker = as_host_port(tracker) if tracker is not None else None
        self.key = key or kind
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sysroot = sysroot
        self._log = log
        self.restart_on_crash = restart_on_crash
        self.server: Server | None = None
        self.restarts = 0
        self.failure: str | None = None
        self.started_s: float | None = None
        self._requested_port = port
        self._workdir: Path | None = None
        self._wrapper: Path | None = None
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    # -------------------------------------------------------------- lifecycle
    def start(self) -> "EmulatedDevice":
        if self.server is not None:
            return self
        if self.sysroot is None:
            self.sysroot = prepare_userspace(self.board.arch, log=self._log)
        t0 = time.monotonic()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"tvmedge-emu-{self.kind}-"))
        self._wrapper = self._workdir / "python3"
        if isinstance(self.sysroot, Sysroot):
            self._wrapper.write_text("#!/bin/sh\n"
                                     f"# tvmedge emulated {self.kind}: the arm64 Python under qemu-user\n"
                                     f"exec {shlex.join(self.sysroot.command(self.board.cpu))} \"$@\"\n")
            self._wrapper.chmod(0o755)
        try:
            self.server = self._start_server()
        except TvmedgeError:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            raise
        self.port = self.server.port
        self.started_s = round(time.monotonic() - t0, 1)
        self._stopping.clear()
        if self.tracker is not None and self.restart_on_crash:
            self._watcher = threading.Thread(target=self._watch, name=f"tvmedge-emu-{self.kind}-watch", daemon=True)
            self._watcher.start()
        return self

    def _start_server(self) -> Server:
        assert self.sysroot is not None and self._wrapper is not None
        if isinstance(self.sysroot, CrossRuntime):
            return self._start_native_server(self.sysroot)
        # The host's Python/loader settings mean nothing to the arm64 Python: drop them.
        env: dict[str, str | None] = {k: None for k in os.environ
                                      if k.startswith(("PYTHON", "LD_")) or k in ("VIRTUAL_ENV", "CONDA_PREFIX")}
        env.update(PYTHONPATH=str(self.sysroot.site_packages), PYTHONNOUSERSITE="1", TVM_USE_RUNTIME_LIB="1",
                   TVMEDGE_EMU_EXECUTABLE=str(self._wrapper), TVMEDGE_EMULATED=self.kind)
        try:
            return start_server(self.tracker, self.key, host=self.host, port=self._requested_port,
                                load_library=[str(self.sysroot.runtime_extra_lib)], env=env,
                                python=str(self._wrapper), timeout=self.timeout,
                                device_info={"kind": "emulated", "board": self.kind,
                                             "emulator": f"{self.board.qemu} -cpu {self.board.cpu}"})
        except TvmedgeError as e:
            raise TvmedgeError(f"emulated {self.kind} did not start: {e}") from None

    def _start_native_server(self, runtime: CrossRuntime) -> Server:
        """tvmedge's C++ RPC server for the board's architecture, under qemu-user."""
        qemu = _which_or_error(self.board.qemu, f"to emulate {self.kind}")
        command = [qemu, "-cpu", self.board.cpu, "-L", runtime.target_libs, str(runtime.server)]
        env: dict[str, str | None] = {k: None for k in os.environ if k.startswith(("LD_", "QEMU_"))}
        env.update(TVMEDGE_EMULATED=self.kind)
        try:
            return start_server(self.tracker, self.key, host=self.host, port=self._requested_port, env=env,
                                command=command, timeout=self.timeout,
                                device_info={"kind": "emulated", "board": self.kind, "arch": runtime.arch,
                                             "emulator": f"{self.board.qemu} -cpu {self.board.cpu}"})
        except TvmedgeError as e:
            raise TvmedgeError(f"emulated {self.kind} did not start: {e}") from None

    def _watch(self) -> None:
        """Restart the server when it drops off the tracker while not being stopped.

        A session that crashes (a kernel faulting with SIGSEGV/SIGILL, a library that
        aborts on load) ends TVM's Python server's listening thread: the server leaves
        the tracker and never serves again, on a real board too. Here the board comes
        back, like one that reboots; ``info()["restarts"]`` counts it.
        """
        missing = 0
        while not self._stopping.wait(2.0):
            srv = self.server
            if srv is None:
                return
            listed = server_registered(self.tracker, self.key, srv.port)
            if listed is None:
                continue  # the tracker is away: nothing a restart would fix
            if listed and srv.alive():
                missing = 0
                continue
            missing += 1
            if missing < 2:
                continue
            with self._lock:
                if self._stopping.is_set():
                    return
                line = srv._last_error_line()
                srv.stop()
                try:
                    self.server = self._start_server()
                except TvmedgeError as e:
                    self.server = None
                    self.failure = f"crashed ({line}) and did not restart: {e}"
                    self._say(f"emulated {self.kind} '{self.key}' {self.failure}")
                    return
                self.restarts += 1
                self.port = self.server.port
                self._say(f"emulated {self.kind} '{self.key}' lost its RPC server ({line}); "
                          f"restarted at {self.server.address}")
            missing = 0

    def _say(self, msg: str) -> None:
        (self._log or (lambda m: print(f"[tvmedge emulator] {m}", file=sys.stderr, flush=True)))(msg)

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5.0)
            self._watcher = None
        with self._lock:
            if self.server is not None:
                self.server.stop()
                self.server = None
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    def alive(self) -> bool:
        srv = self.server
        return srv is not None and srv.alive()

    def __enter__(self) -> "EmulatedDevice":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -------------------------------------------------------------- facts
    @property
    def address(self) -> str | None:
        return self.server.address if self.server else None

    def info(self) -> dict[str, Any]:
        """What this device is; ``emulated`` is always True (timings are not the board's)."""
        return {
            "kind": self.kind, "key": self.key, "emulated": True, "description": self.board.description,
            "target": self.board.kind, "arch": self.board.arch, "qemu_cpu": self.board.cpu,
            "tracker": format_host_port(self.tracker) if self.tracker else None,
            "server": self.address, "running": self.alive(), "startup_seconds": self.started_s,
            "restarts": self.restarts, "failure": self.failure,
            "sysroot": str(self.sysroot.path) if self.sysroot else None,
            "log": str(self.server.log_path) if self.server else None,
            "note": "qemu-user emulation: 10-30x slower than the board; timings are not the board's",
        }

    def __repr__(self) -> str:
        return f"<EmulatedDevice {self.kind} key={self.key} server={self.address} emulated>"


def main(kind: str = "pi4", tracker: HostPort | str | None = None, key: str | None = None,
         host: str = "127.0.0.1", port: int | None = None, count: int = 1,
         out: Callable[[str], None] | None = None) -> int:
    """Run ``count`` emulated ``kind`` boards in the foreground until Ctrl-C (SIGTERM, SIGHUP).

    Without a ``tracker``, starts a local one (first free port of 9190-9199) and prints
    its address. Returns 0 after a clean stop; raises TvmedgeError if a board cannot be
    restarted or the tracker dies.
    """
    say = out or (lambda msg: print(msg, flush=True))
    board = emulation(kind)
    key = key or kind
    tracker = as_host_port(tracker) if tracker is not None else None
    if count < 1:
        raise TvmedgeError("--count must be at least 1")
    own_tracker: Tracker | None = None
    devices: list[EmulatedDevice] = []

    def on_term(signum, frame):  # SIGTERM / SIGHUP: stop as for Ctrl-C
        raise KeyboardInterrupt

    old_handlers = {sig: signal.signal(sig, on_term) for sig in (signal.SIGTERM, signal.SIGHUP)} \
        if _main_thread() else {}
    try:
        if tracker is None:
            own_tracker = start_tracker(host)
            tracker = own_tracker.addr
            say(f"started RPC tracker at {format_host_port((public_host(host), own_tracker.port))}")
        else:
            tracker_summary(tracker)  # fail now if unreachable
        sysroot = prepare_userspace(board.arch)
        for i in range(count):
            say(f"starting emulated {kind} ({board.description}; qemu -cpu {board.cpu})"
                + (f" {i + 1}/{count}" if count > 1 else "") + " ...")
            dev = EmulatedDevice(kind, tracker, key, host=host, port=port if count == 1 else None, sysroot=sysroot,
                                 log=say)
            devices.append(dev)
            dev.start()
            say(f"  registered as '{key}' at RPC tracker {format_host_port(tracker)} "
                f"(server {dev.address}, up in {dev.started_s:.0f} s)")
        where = format_host_port((public_host(tracker[0]), tracker[1]))
        say(f"ready: --rpc-tracker {where} --rpc-key {key}  (emulated: timings are not a Pi's). Ctrl-C to stop.")
        while True:
            for dev in devices:  # crashed servers are restarted by the device's watcher
                if dev.failure:
                    raise TvmedgeError(f"emulated {kind} '{key}' {dev.failure}")
            if own_tracker is not None and not own_tracker.alive():
                raise TvmedgeError(f"the RPC tracker at {own_tracker.address} stopped unexpectedly")
            time.sleep(1.0)
    except KeyboardInterrupt:
        say("stopping ...")
        return 0
    finally:
        for dev in devices:
            dev.stop()
        if own_tracker is not None:
            own_tracker.stop()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def prepare_userspace(arch: str, log: Callable[[str], None] | None = None) -> Sysroot | CrossRuntime:
    """What an emulated board of ``arch`` runs, prepared on first use: the arm64 Python user
    space, or for riscv64 tvmedge's cross-built runtime and C++ RPC server."""
    if arch in CROSS_BUILT_ARCHES:
        return prepare_runtime(arch, log=log)
    return prepare_sysroot(arch, log=log)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # python -m tvmedge.deploy.emulate [pi4|pi3|pi5] [HOST:PORT]
    _kind = sys.argv[1] if len(sys.argv) > 1 else "pi4"
    _tracker = parse_host_port(sys.argv[2]) if len(sys.argv) > 2 else None
    try:
        sys.exit(main(_kind, _tracker))
    except TvmedgeError as _e:
        print(f"error: {_e}", file=sys.stderr)
        sys.exit(1)
