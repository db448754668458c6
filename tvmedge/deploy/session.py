"""Opening a TVM RPC session on a device, through a tracker or straight to a server.

``connect`` returns a ``tvm.rpc.RPCSession`` like ``tvm.rpc.connect`` does, but with
bounded waits: it gives up after ``timeout`` seconds with a
:class:`~tvmedge.errors.TvmedgeError` saying why (tracker unreachable, no device under
that key, all devices busy, server hung, key rejected) instead of blocking forever.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any, Callable

from ..core.errors import TvmedgeError, first_line
from .address import HostPort, as_host_port, format_host_port
from .tracker import request_server


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
    where = format_host_port(tracker)
    last_error = ""
    for _attempt in range(3):
        url, port, matchkey = request_server(tracker, key, deadline, timeout, priority,
                                             when_none_free=_release_dropped_sessions)
        remaining = deadline - time.monotonic()
        try:
            return _session_connect(url, int(port), matchkey, session_timeout, max(5.0, remaining),
                                    f"{format_host_port((url, int(port)))} (key '{key}')")
        except TvmedgeError as e:  # the server went away after the tracker handed it out: ask again
            last_error = str(e)
            if time.monotonic() > deadline:
                break
    raise TvmedgeError(f"could not open a session on a '{key}' device via RPC tracker {where}: {last_error}")


def device_info(session: Any) -> dict[str, Any]:
    """What the device behind ``session`` says it is.

    A server started by tvmedge (``device emulate``, ``device serve``, the local ones tune
    starts) answers with ``kind`` (``hardware``/``emulated``/``simulated``), ``arch`` and, for
    an emulator, ``board`` and ``emulator``; ``"reported": True``. Any other TVM RPC server
    (a board running plain ``python -m tvm.exec.rpc_server``) says nothing: ``kind``
    ``hardware``, ``arch`` None, ``"reported": False``.
    """
    import json

    from .launch import DEVICE_INFO_FUNC

    try:
        info = json.loads(str(session.get_function(DEVICE_INFO_FUNC)()))
    except Exception:  # noqa: BLE001 - not registered there: a server tvmedge did not start
        return {"kind": "hardware", "arch": None, "reported": False}
    if not isinstance(info, dict) or info.get("kind") not in ("hardware", "emulated", "simulated"):
        return {"kind": "hardware", "arch": None, "reported": False}
    return {**info, "reported": True}
