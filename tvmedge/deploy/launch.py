"""Running TVM's RPC tracker and server as processes: start, wait until ready, stop for good.

``start_tracker`` / ``start_server`` run ``python -m tvm.exec.rpc_tracker`` / ``rpc_server``
and return a handle (:class:`Tracker`, :class:`Server`) once the process holds its port and
is ready (the tracker accepts connections; the server is registered with its tracker),
or fail with the process log's last line. What they add to TVM's own commands:

* processes that can really be stopped: each tracker/server runs in its own process
  group (TVM's servers start ``tvm.exec.popen_worker`` children that outlive a plain
  kill), and ``stop()`` signals the whole group; anything still running when the
  interpreter exits is stopped too, and :mod:`tvmedge.deploy.orphan_guard` stops it when
  this process is killed outright;
* loopback by default (``127.0.0.1``): a TVM RPC server runs whatever code it is sent,
  so exposing one (``host="0.0.0.0"``) is an explicit choice.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..core.errors import TvmedgeError
from .address import HostPort, as_host_port, connect_host, ephemeral_port, format_host_port, os_reason, port_free
from .procfs import group_pids
from .shm import SERVER_CODE as SHM_SERVER_CODE
from .tracker import server_registered, tracker_summary, tracker_up

DEFAULT_TRACKER_PORTS = range(9190, 9200)  # TVM's default tracker range


_LIVE: "set[_RpcProcess]" = set()  # strong refs: a dropped handle is still stopped at exit


@atexit.register
def _stop_all() -> None:
    for proc in list(_LIVE):
        try:
            proc.stop()
        except Exception:  # at exit: best effort
            pass


class _RpcProcess:
    """A TVM RPC process (and its children) in its own process group."""

    def __init__(self, popen: subprocess.Popen, host: str, port: int, workdir: Path, log_path: Path):
        self.popen = popen
        self.host = host
        self.port = port
        self.workdir = workdir
        self.log_path = log_path
        self.pgid = popen.pid  # start_new_session: the leader's pid is the group id
        self._stopped = False
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def addr(self) -> HostPort:
        """Where a client on this machine reaches it."""
        return (connect_host(self.host), self.port)

    @property
    def address(self) -> str:
        return format_host_port(self.addr)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        """The processes still running in its process group (the leader and its workers)."""
        return group_pids(self.pgid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _last_error_line(self) -> str:
        lines = [ln.strip() for ln in self.log_tail(60).splitlines() if ln.strip()]
        for ln in reversed(lines):
            if any(w in ln for w in ("Error", "error", "cannot", "Cannot", "Traceback")) and not ln.startswith("File "):
                return ln
        return lines[-1] if lines else "no output"

    def _gone_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.popen.poll() is not None and not group_pids(self.pgid):
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL what is left. Idempotent."""
        _LIVE.discard(self)
        if not self._stopped:
            self._stopped = True
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.pgid, sig)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
                if self._gone_within(timeout / 2):
                    break
            try:
                self.popen.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped"
        return f"<{type(self).__name__} {self.address} pid={self.pid} {state}>"


class Tracker(_RpcProcess):
    """A running ``tvm.exec.rpc_tracker`` (use as a context manager, or call ``stop()``)."""


class Server(_RpcProcess):
    """A running ``tvm.exec.rpc_server`` (use as a context manager, or call ``stop()``)."""

    def __init__(self, *args: Any, key: str, tracker: HostPort | None, **kw: Any):
        super().__init__(*args, **kw)
        self.key = key
        self.tracker = tracker


def _child_env(env: Mapping[str, str | None] | None) -> dict[str, str]:
    out = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = str(v)
    return out


def _launch(cls, argv: Sequence[str], *, host: str, port: int, env: dict[str, str], prefix: str,
            extra: Mapping[str, Any] | None = None) -> _RpcProcess:
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    log_path = workdir / "log.txt"
    with open(log_path, "wb") as log:
        try:
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=env, cwd=str(workdir), start_new_session=True)
        except OSError as e:
            shutil.rmtree(workdir, ignore_errors=True)
            raise TvmedgeError(f"cannot start {argv[0]} ({os_reason(e)})") from None
    # If this process is killed (SIGKILL skips every clean-up), the group must not live on.
    subprocess.Popen([sys.executable, "-m", "tvmedge.deploy.orphan_guard", str(os.getpid()), str(popen.pid)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    return cls(popen, host, port, workdir, log_path, **(extra or {}))


def _bound(proc: _RpcProcess) -> bool:
    """Our process logged that it holds its port (TVM logs ``bind to HOST:PORT``).

    Without this, a process that lost a race for the port could look ready because
    someone else's tracker/server answers on it.
    """
    try:
        return f"bind to {proc.host}:{proc.port}" in proc.log_path.read_text(errors="replace")
    except OSError:
        return False


def _wait_until(proc: _RpcProcess, ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            # the group may still be up a moment (workers); take it down before reporting
            log = proc.log_tail(200)
            line = proc._last_error_line()
            port_taken = "cannot bind" in log or "Address already in use" in log
            if port_taken:
                line = f"port {proc.port} is already in use"
            proc.stop()
            raise _StartFailed(f"{what} exited during start-up ({line})", port_taken)
        try:
            if _bound(proc) and ready() and proc.alive():
                return
        except TvmedgeError:
            pass
        if time.monotonic() > deadline:
            line = proc._last_error_line()
            proc.stop()
            raise TvmedgeError(f"{what} did not come up within {timeout:.0f} s (last log line: {line})")
        time.sleep(0.2)


class _StartFailed(TvmedgeError):
    def __init__(self, msg: str, port_taken: bool):
        super().__init__(msg)
        self.port_taken = port_taken


def start_tracker(host: str = "127.0.0.1", port: int | None = None, *, timeout: float = 30.0,
                  python: str | None = None) -> Tracker:
    """Start ``python -m tvm.exec.rpc_tracker`` and wait until it accepts connections.

    ``port=None`` takes the first free port of TVM's default range 9190-9199 (else any
    free port), ``port=0`` any free port, an int exactly that port.
    """
    if port is None:
        candidates = [p for p in DEFAULT_TRACKER_PORTS if port_free(host, p)] or [0]
    elif port == 0:
        candidates = [0]
    else:
        if not port_free(host, port):
            raise TvmedgeError(f"cannot start RPC tracker: port {port} on {host} is already in use")
        candidates = [port]
    attempts = 0
    while True:
        attempts += 1
        p = candidates.pop(0) if candidates else 0
        p = p or ephemeral_port(host)
        argv = [python or sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(p),
                "--port-end", str(p + 1)]
        tracker = _launch(Tracker, argv, host=host, port=p, env=_child_env(None), prefix="tvmedge-tracker-")
        try:
            _wait_until(tracker, lambda: tracker_up(tracker.addr), timeout,
                        f"RPC tracker on {format_host_port((host, p))}")
            return tracker  # type: ignore[return-value]
        except _StartFailed as e:
            if not (e.port_taken and port in (None, 0) and attempts < 5):
                raise


# What a server started by tvmedge says about itself. TVM's server runs in a worker process
# (PopenWorker) whose sessions are forked from it; its ``server_init_callback`` runs in that
# worker, so it registers there a global function the sessions answer remote calls with.
# This runs under the board's own Python (runtime-only TVM): standard library and tvm only.
# It also registers the shared-memory payload functions (``deploy.shm``) for clients on
# the same machine.
DEVICE_INFO_FUNC = "tvmedge.device_info"
_BOOT = (
    "import functools, json, platform, runpy, sys\n"
    "info = json.loads(sys.argv[1]); info.setdefault('arch', platform.machine())\n"
    "def register(text=json.dumps(info)):\n"
    "    import tvm_ffi\n"
    f"    tvm_ffi.register_global_func({DEVICE_INFO_FUNC!r}, lambda: text, override=True)\n"
    f"    exec({SHM_SERVER_CODE!r}, {{}})\n"
    "import tvm.rpc\n"
    "tvm.rpc.Server = functools.partial(tvm.rpc.Server, server_init_callback=register)\n"
    "mod = sys.argv[2]; sys.argv = [mod] + sys.argv[3:]\n"
    "runpy.run_module(mod, run_name='__main__', alter_sys=True)\n"
)


def start_server(tracker: HostPort | str | None, key: str, host: str = "127.0.0.1", port: int | None = None,
                 load_library: Sequence[str] | None = None, env: Mapping[str, str | None] | None = None,
                 python: str | None = None, *, custom_addr: str | None = None, timeout: float = 60.0,
                 device_info: Mapping[str, Any] | None = None, command: Sequence[str] | None = None) -> Server:
    """Start ``python -m tvm.exec.rpc_server`` and wait until it is ready.

    With a ``tracker``, the server registers there under ``key`` and this returns once the
    tracker lists it; without one it serves ``host:port`` directly (clients must then
    pass the same ``key``). ``port=None`` picks a free port. ``load_library``: shared
    libraries the server loads into each session (``--load-library``). ``env``: variables
    to set (``None`` removes one) on top of this process's environment. ``python``: the
    interpreter to run it with (default: this one), e.g. a wrapper that runs an emulator.
    ``device_info``: what the device is (``{"kind": "emulated", "board": "pi4", ...}``); its
    sessions then answer :data:`DEVICE_INFO_FUNC` with it as JSON, ``arch`` added
    (:func:`tvmedge.deploy.session.device_info` reads it).
    ``command``: another server program instead of TVM's Python one (the argv that starts
    it, e.g. tvmedge's cross-built C++ server under qemu); it takes ``--host --port --key
    --tracker --custom-addr`` like TVM's, has no ``--load-library``;
    ``device_info`` goes to it as ``--device-info JSON``.
    """
    if not key or any(c.isspace() for c in key) or ":" in key:
        raise TvmedgeError(f"invalid RPC key '{key}' (use a non-empty name without spaces or ':')")
    if tracker is not None:
        tracker = as_host_port(tracker)
        tracker_summary(tracker)  # unreachable tracker: fail now, not after a timeout
    if port is not None and port != 0 and not port_free(host, port):
        raise TvmedgeError(f"cannot start RPC server: port {port} on {host} is already in use")
    child_env = _child_env(env)
    attempts = 0
    while True:
        attempts += 1
        p = port or ephemeral_port(host)
        if command is not None:
            argv = [*command, "--host", host, "--port", str(p), "--key", key]
            if device_info is not None:
                argv += ["--device-info", json.dumps(dict(device_info))]
        else:
            launcher = (["-c", _BOOT, json.dumps(dict(device_info)), "tvm.exec.rpc_server"] if device_info is not None
                        else ["-m", "tvm.exec.rpc_server"])
            argv = [python or sys.executable, *launcher, "--host", host, "--port", str(p),
                    "--port-end", str(p + 1), "--key", key]
        if tracker is not None:
            argv += ["--tracker", f"{tracker[0]}:{tracker[1]}"]  # TVM splits at the last ':'; no brackets
        if load_library and command is None:
            argv += ["--load-library", ":".join(str(Path(lib).resolve()) for lib in load_library)]
        if custom_addr:
            argv += ["--custom-addr", custom_addr]
        server = _launch(Server, argv, host=host, port=p, env=child_env, prefix="tvmedge-server-",
                         extra={"key": key, "tracker": tracker})
        what = f"RPC server '{key}' on {format_host_port((host, p))}"
        if tracker is not None:
            def ready() -> bool:
                return bool(server_registered(tracker, key, p))
        else:
            def ready() -> bool:
                try:
                    socket.create_connection(server.addr, timeout=1.0).close()
                except OSError:
                    return False
                return True
        try:
            _wait_until(server, ready, timeout, what)
            return server  # type: ignore[return-value]
        except _StartFailed as e:
            if not (e.port_taken and not port and attempts < 5):
                raise
