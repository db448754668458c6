"""TVM RPC plumbing: tracker and server processes, sessions, device listing.

A thin layer over TVM's own RPC (``python -m tvm.exec.rpc_tracker`` / ``rpc_server``,
``tvm.rpc.connect`` and the tracker's JSON protocol from ``tvm.rpc.base``): no scheduler
or protocol of our own. What it adds:

* processes that can really be stopped: each tracker/server runs in its own process
  group (TVM's servers start ``tvm.exec.popen_worker`` children that outlive a plain
  kill), and ``stop()`` signals the whole group; anything still running when the
  interpreter exits is stopped too;
* start-up that waits until the tracker accepts connections / the server is registered
  with its tracker, and fails with the process log's last line if it does not;
* bounded waits: ``connect`` gives up after ``timeout`` seconds with a
  :class:`~tvmedge.errors.TvmedgeError` saying why (tracker unreachable, no device under
  that key, all devices busy) instead of blocking forever;
* loopback by default (``127.0.0.1``): a TVM RPC server runs whatever code it is sent,
  so exposing one (``host="0.0.0.0"``) is an explicit choice.
"""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..core.errors import TvmedgeError, first_line

DEFAULT_TRACKER_PORTS = range(9190, 9200)  # TVM's default tracker range
_WILDCARDS = ("", "0.0.0.0", "::")

HostPort = tuple[str, int]


# ---------------------------------------------------------------- addresses
def parse_host_port(text: str) -> HostPort:
    """``"host:port"`` (or ``"[v6]:port"``) -> ``(host, port)``; TvmedgeError on bad input."""
    s = str(text).strip()
    if ":" not in s:
        raise TvmedgeError(f"expected HOST:PORT, got '{text}'")
    host, port_s = s.rsplit(":", 1)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise TvmedgeError(f"expected HOST:PORT, got '{text}' (no host)")
    try:
        port = int(port_s)
    except ValueError:
        raise TvmedgeError(f"expected HOST:PORT, got '{text}' (port '{port_s}' is not a number)") from None
    if not 0 < port < 65536:
        raise TvmedgeError(f"expected HOST:PORT, got '{text}' (port {port} out of range 1-65535)")
    return host, port


def as_host_port(addr: "HostPort | str") -> HostPort:
    """``(host, port)`` from a tuple/list or a ``"host:port"`` string."""
    if isinstance(addr, str):
        return parse_host_port(addr)
    try:
        host, port = addr
        return str(host), int(port)
    except (TypeError, ValueError):
        raise TvmedgeError(f"expected HOST:PORT or (host, port), got {addr!r}") from None


def format_host_port(addr: HostPort) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _connect_host(host: str) -> str:
    """Where a client on this machine reaches something bound to ``host``."""
    return "127.0.0.1" if host in _WILDCARDS else host


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _port_free(host: str, port: int) -> bool:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TVM binds
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_port(host: str) -> int:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _os_reason(err: BaseException) -> str:
    if isinstance(err, socket.gaierror):
        return "unknown host"
    if isinstance(err, socket.timeout):
        return "timed out"
    if isinstance(err, OSError) and err.errno is not None:
        if err.errno == errno.ECONNREFUSED:
            return "connection refused"
        return os.strerror(err.errno).lower()
    return str(err) or type(err).__name__


# ---------------------------------------------------------------- tracker protocol (TVM's)
def _tracker_socket(addr: HostPort, timeout: float) -> socket.socket:
    """An open, handshaken connection to a TVM RPC tracker, or TvmedgeError."""
    from tvm.rpc import base

    where = format_host_port(addr)
    try:
        sock = socket.create_connection(addr, timeout=timeout)
    except (OSError, socket.gaierror) as e:
        raise TvmedgeError(f"cannot reach RPC tracker at {where} ({_os_reason(e)})") from None
    try:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except OSError as e:
        sock.close()
        raise TvmedgeError(f"cannot reach RPC tracker at {where} ({_os_reason(e)})") from None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise TvmedgeError(f"{where} is not a TVM RPC tracker (wrong handshake)")
    return sock


def tracker_summary(tracker: HostPort | str, timeout: float = 5.0) -> dict[str, Any]:
    """The tracker's raw summary (``queue_info`` and ``server_info``), as TVM reports it."""
    from tvm.rpc import base

    tracker = as_host_port(tracker)
    sock = _tracker_socket(tracker, timeout)
    try:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        value = base.recvjson(sock)
    except OSError as e:
        raise TvmedgeError(f"RPC tracker at {format_host_port(tracker)} did not answer ({_os_reason(e)})") from None
    finally:
        sock.close()
    if not isinstance(value, list) or value[0] != base.TrackerCode.SUCCESS:
        raise TvmedgeError(f"RPC tracker at {format_host_port(tracker)} gave an invalid summary: {value!r}")
    return value[1]


def _servers_by_key(summary: Mapping[str, Any]) -> dict[str, list[HostPort]]:
    out: dict[str, list[HostPort]] = {}
    for item in summary.get("server_info", []):
        key = str(item.get("key", ""))
        if not key.startswith("server:"):
            continue
        addr = item.get("addr") or [None, None]
        out.setdefault(key.split(":", 1)[1], []).append((str(addr[0]), int(addr[1])))
    return out


def server_registered(tracker: HostPort | str, key: str, port: int) -> bool | None:
    """Whether the server on ``port`` is registered under ``key`` (None: tracker unreachable)."""
    try:
        return any(a[1] == port for a in _servers_by_key(tracker_summary(tracker, 2.0)).get(key, []))
    except TvmedgeError:
        return None


def list_devices(tracker: HostPort | str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Devices registered at the tracker, one entry per key.

    Each entry: ``key``, ``total`` (servers registered), ``free`` (waiting for a session),
    ``busy`` (``total - free``: serving a session), ``pending`` (requests queued for that
    key) and ``servers`` (their ``[host, port]``). Keys with neither a server nor a
    pending request are left out.
    """
    summary = tracker_summary(tracker, timeout)
    servers = _servers_by_key(summary)
    queues = summary.get("queue_info", {})
    out = []
    for key in sorted(set(servers) | set(queues)):
        q = queues.get(key, {})
        total = len(servers.get(key, []))
        free = min(int(q.get("free", 0)), total)
        pending = int(q.get("pending", 0))
        if total or pending:
            out.append({"key": key, "total": total, "free": free, "busy": total - free, "pending": pending,
                        "servers": [list(a) for a in servers.get(key, [])]})
    return out


# ---------------------------------------------------------------- processes
_LIVE: "set[_RpcProcess]" = set()  # strong refs: a dropped handle is still stopped at exit


@atexit.register
def _stop_all() -> None:
    for proc in list(_LIVE):
        try:
            proc.stop()
        except Exception:  # at exit: best effort
            pass


def _group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid`` (Linux /proc)."""
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(name))
    return pids


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
        return (_connect_host(self.host), self.port)

    @property
    def address(self) -> str:
        return format_host_port(self.addr)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        """The processes still running in its process group (the leader and its workers)."""
        return _group_pids(self.pgid)

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
            if self.popen.poll() is not None and not _group_pids(self.pgid):
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
            raise TvmedgeError(f"cannot start {argv[0]} ({_os_reason(e)})") from None
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


def _tracker_up(addr: HostPort) -> bool:
    _tracker_socket(addr, timeout=1.0).close()
    return True


def start_tracker(host: str = "127.0.0.1", port: int | None = None, *, timeout: float = 30.0,
                  python: str | None = None) -> Tracker:
    """Start ``python -m tvm.exec.rpc_tracker`` and wait until it accepts connections.

    ``port=None`` takes the first free port of TVM's default range 9190-9199 (else any
    free port), ``port=0`` any free port, an int exactly that port.
    """
    if port is None:
        candidates = [p for p in DEFAULT_TRACKER_PORTS if _port_free(host, p)] or [0]
    elif port == 0:
        candidates = [0]
    else:
        if not _port_free(host, port):
            raise TvmedgeError(f"cannot start RPC tracker: port {port} on {host} is already in use")
        candidates = [port]
    attempts = 0
    while True:
        attempts += 1
        p = candidates.pop(0) if candidates else 0
        p = p or _ephemeral_port(host)
        argv = [python or sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(p),
                "--port-end", str(p + 1)]
        tracker = _launch(Tracker, argv, host=host, port=p, env=_child_env(None), prefix="tvmedge-tracker-")
        try:
            _wait_until(tracker, lambda: _tracker_up(tracker.addr), timeout,
                        f"RPC tracker on {format_host_port((host, p))}")
            return tracker  # type: ignore[return-value]
        except _StartFailed as e:
            if not (e.port_taken and port in (None, 0) and attempts < 5):
                raise


def wait_for_tracker(tracker: HostPort | str, timeout: float = 120.0, log=None) -> None:
    """Wait, retrying with exponential backoff (0.5 s doubling to 8 s), until the tracker
    answers, as a board that boots before its tracker does; TvmedgeError after ``timeout``."""
    tracker = as_host_port(tracker)
    deadline = time.monotonic() + timeout
    delay = 0.5
    said = False
    while True:
        try:
            tracker_summary(tracker, 2.0)
            return
        except TvmedgeError as e:
            if time.monotonic() + delay > deadline:
                raise TvmedgeError(f"{e} (waited {timeout:.0f} s)") from None
            if log is not None and not said:
                log(f"waiting for the RPC tracker at {format_host_port(tracker)} ({e}); retrying for up to {timeout:.0f} s")
                said = True
        time.sleep(delay)
        delay = min(delay * 2, 8.0)


def start_server(tracker: HostPort | str | None, key: str, host: str = "127.0.0.1", port: int | None = None,
                 load_library: Sequence[str] | None = None, env: Mapping[str, str | None] | None = None,
                 python: str | None = None, *, custom_addr: str | None = None, timeout: float = 60.0) -> Server:
    """Start ``python -m tvm.exec.rpc_server`` and wait until it is ready.

    With a ``tracker``, the server registers there under ``key`` and this returns once the
    tracker lists it; without one it serves ``host:port`` directly (clients must then
    pass the same ``key``). ``port=None`` picks a free port. ``load_library``: shared
    libraries the server loads into each session (``--load-library``). ``env``: variables
    to set (``None`` removes one) on top of this process's environment. ``python``: the
    interpreter to run it with (default: this one), e.g. a wrapper that runs an emulator.
    """
    if not key or any(c.isspace() for c in key) or ":" in key:
        raise TvmedgeError(f"invalid RPC key '{key}' (use a non-empty name without spaces or ':')")
    if tracker is not None:
        tracker = as_host_port(tracker)
        tracker_summary(tracker)  # unreachable tracker: fail now, not after a timeout
    if port is not None and port != 0 and not _port_free(host, port):
        raise TvmedgeError(f"cannot start RPC server: port {port} on {host} is already in use")
    child_env = _child_env(env)
    attempts = 0
    while True:
        attempts += 1
        p = port or _ephemeral_port(host)
        argv = [python or sys.executable, "-m", "tvm.exec.rpc_server", "--host", host, "--port", str(p),
                "--port-end", str(p + 1), "--key", key]
        if tracker is not None:
            argv += ["--tracker", f"{tracker[0]}:{tracker[1]}"]  # TVM splits at the last ':'; no brackets
        if load_library:
            argv += ["--load-library", ":".join(str(Path(lib).resolve()) for lib in load_library)]
        if custom_addr:
            argv += ["--custom-addr", custom_addr]
        server = _launch(Server, argv, host=host, port=p, env=child_env, prefix="tvmedge-server-",
                         extra={"key": key, "tracker": tracker})
        what = f"RPC server '{key}' on {format_host_port((host, p))}"
        if tracker is not None:
            def ready() -> bool:
                return any(a[1] == p for a in _servers_by_key(tracker_summary(tracker, 2.0)).get(key, []))
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


# ---------------------------------------------------------------- sessions
def _in_thread(fn: Callable[[], Any], timeout: float) -> tuple[bool, Any, BaseException | None]:
    """Run a blocking call (TVM's C++ connect has no time-out) for at most ``timeout`` s."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            box["error"] = e

    t = threading.Thread(target=run, name="tvmedge-rpc-connect", daemon=True)
    t.start()
    t.join(max(0.0, timeout))
    if t.is_alive():
        return False, None, None
    return True, box.get("value"), box.get("error")


def _release_dropped_sessions() -> None:
    """Close this process's own sessions that are dropped but not yet collected.

    An ``RPCSession`` referenced from a cycle (a VirtualMachine and its remote functions,
    MetaSchedule's runner futures) keeps its server busy until Python's cycle collector
    runs, so asking the tracker for that same device would wait for ourselves.
    """
    import gc

    gc.collect()


def _session_connect(url: str, port: int, key: str, session_timeout: float, timeout: float, where: str):
    import tvm.rpc

    done, sess, err = _in_thread(lambda: tvm.rpc.connect(url, port, key, session_timeout=session_timeout), timeout)
    if not done:
        raise TvmedgeError(f"RPC server at {where} did not answer within {timeout:.0f} s "
                           "(busy with another session, or hung)")
    if err is not None:
        msg = first_line(err)
        if "Connect to" in msg and "failed" in msg:
            raise TvmedgeError(f"cannot reach RPC server at {where} (connection refused)") from None
        if "mismatch" in msg.lower() or "matches key" in msg:
            raise TvmedgeError(f"RPC server at {where} rejected key '{key}' "
                               "(give the key it was started with)") from None
        raise TvmedgeError(f"cannot open an RPC session with {where}: {msg}") from None
    return sess


def connect(tracker: HostPort | str | None = None, key: str | None = None,
            host_port: HostPort | str | None = None, timeout: float = 60.0, *, session_timeout: float = 0,
            priority: int = 1):
    """Open a ``tvm.rpc.RPCSession`` on a device.

    Through a ``tracker`` (``key`` required): asks the tracker for a free server under
    ``key``, waiting at most ``timeout`` seconds while all of them are busy; fails at once
    when the tracker is unreachable or no server is registered under that key. Directly
    (``host_port``): connects to that server (``key`` must match the server's key, if it
    was started with one). ``session_timeout`` (s, 0 = none) lets the server end a session
    that runs longer.
    """
    if (tracker is None) == (host_port is None):
        raise TvmedgeError("give either an RPC tracker (with a key) or an RPC server HOST:PORT, not both")
    tracker = as_host_port(tracker) if tracker is not None else None
    host_port = as_host_port(host_port) if host_port is not None else None
    deadline = time.monotonic() + timeout
    if host_port is not None:
        return _session_connect(host_port[0], host_port[1], key or "", session_timeout, timeout,
                                format_host_port(host_port))
    if not key:
        raise TvmedgeError("connecting through an RPC tracker needs a device key")
    from tvm.rpc import base

    where = format_host_port(tracker)
    last_error = ""
    for _attempt in range(3):
        remaining = deadline - time.monotonic()
        sock = _tracker_socket(tracker, timeout=max(1.0, min(5.0, remaining)))
        try:
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            summary = base.recvjson(sock)[1]
            servers = _servers_by_key(summary)
            if not servers.get(key):
                keys = ", ".join(sorted(servers)) or "none"
                raise TvmedgeError(f"no device is registered under key '{key}' at RPC tracker {where} "
                                   f"(keys there: {keys})")
            if not int(summary.get("queue_info", {}).get(key, {}).get("free", 0)):
                _release_dropped_sessions()
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", priority])
            try:
                value = base.recvjson(sock)
            except socket.timeout:
                n = len(servers[key])
                raise TvmedgeError(f"no free device under key '{key}' at RPC tracker {where} within {timeout:.0f} s "
                                   f"({n} registered, all busy)") from None
        except OSError as e:
            raise TvmedgeError(f"RPC tracker at {where} dropped the connection ({_os_reason(e)})") from None
        finally:
            sock.close()  # the tracker forgets a request whose connection is gone
        if not isinstance(value, list) or value[0] != base.TrackerCode.SUCCESS:
            raise TvmedgeError(f"RPC tracker at {where} refused the request for '{key}': {value!r}")
        url, port, matchkey = value[1]
        remaining = deadline - time.monotonic()
        try:
            return _session_connect(url, int(port), matchkey, session_timeout, max(5.0, remaining),
                                    f"{format_host_port((url, int(port)))} (key '{key}')")
        except TvmedgeError as e:  # the server went away after the tracker handed it out: ask again
            last_error = str(e)
            if time.monotonic() > deadline:
                break
    raise TvmedgeError(f"could not open a session on a '{key}' device via RPC tracker {where}: {last_error}")
