"""Talking to a TVM RPC tracker: its JSON protocol (``tvm.rpc.base``), device queries, waits.

No protocol of our own: the handshake, ``SUMMARY`` and ``REQUEST`` messages are TVM's.
What this adds is bounded waits and errors that say why (tracker unreachable, not a
tracker, no device under that key, all devices busy) as :class:`~tvmedge.errors.TvmedgeError`.
Starting a tracker process is :mod:`tvmedge.deploy.launch`'s job.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, Callable, Mapping

from ..core.errors import TvmedgeError
from .address import HostPort, as_host_port, format_host_port, os_reason


def tracker_socket(addr: HostPort, timeout: float) -> socket.socket:
    """An open, handshaken connection to a TVM RPC tracker, or TvmedgeError."""
    from tvm.rpc import base

    where = format_host_port(addr)
    try:
        sock = socket.create_connection(addr, timeout=timeout)
    except (OSError, socket.gaierror) as e:
        raise TvmedgeError(f"cannot reach RPC tracker at {where} ({os_reason(e)})") from None
    try:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except OSError as e:
        sock.close()
        raise TvmedgeError(f"cannot reach RPC tracker at {where} ({os_reason(e)})") from None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise TvmedgeError(f"{where} is not a TVM RPC tracker (wrong handshake)")
    return sock


def tracker_up(addr: HostPort) -> bool:
    """True once a tracker answers the handshake at ``addr`` (TvmedgeError until then)."""
    tracker_socket(addr, timeout=1.0).close()
    return True


def tracker_summary(tracker: HostPort | str, timeout: float = 5.0) -> dict[str, Any]:
    """The tracker's raw summary (``queue_info`` and ``server_info``), as TVM reports it."""
    from tvm.rpc import base

    tracker = as_host_port(tracker)
    sock = tracker_socket(tracker, timeout)
    try:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        value = base.recvjson(sock)
    except OSError as e:
        raise TvmedgeError(f"RPC tracker at {format_host_port(tracker)} did not answer ({os_reason(e)})") from None
    finally:
        sock.close()
    if not isinstance(value, list) or value[0] != base.TrackerCode.SUCCESS:
        raise TvmedgeError(f"RPC tracker at {format_host_port(tracker)} gave an invalid summary: {value!r}")
    return value[1]


def servers_by_key(summary: Mapping[str, Any]) -> dict[str, list[HostPort]]:
    """The servers a tracker summary lists, by device key."""
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
        return any(a[1] == port for a in servers_by_key(tracker_summary(tracker, 2.0)).get(key, []))
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
    servers = servers_by_key(summary)
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


def request_server(tracker: HostPort, key: str, deadline: float, timeout: float, priority: int = 1,
                   when_none_free: Callable[[], None] | None = None) -> tuple[str, Any, str]:
    """Ask the tracker for a free server under ``key``: its ``(url, port, matchkey)``.

    Fails at once when no server is registered under ``key``; waits until ``deadline``
    (``time.monotonic()``) while all of them are busy, then fails saying so (``timeout``
    is the wait the message names). ``when_none_free`` runs before that wait, when the
    summary shows no free server. The request ends with its connection: the tracker
    forgets a request whose connection is gone.
    """
    from tvm.rpc import base

    where = format_host_port(tracker)
    remaining = deadline - time.monotonic()
    sock = tracker_socket(tracker, timeout=max(1.0, min(5.0, remaining)))
    try:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        summary = base.recvjson(sock)[1]
        servers = servers_by_key(summary)
        if not servers.get(key):
            keys = ", ".join(sorted(servers)) or "none"
            raise TvmedgeError(f"no device is registered under key '{key}' at RPC tracker {where} "
                               f"(keys there: {keys})")
        if not int(summary.get("queue_info", {}).get(key, {}).get("free", 0)) and when_none_free is not None:
            when_none_free()
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", priority])
        try:
            value = base.recvjson(sock)
        except socket.timeout:
            n = len(servers[key])
            raise TvmedgeError(f"no free device under key '{key}' at RPC tracker {where} within {timeout:.0f} s "
                               f"({n} registered, all busy)") from None
    except OSError as e:
        raise TvmedgeError(f"RPC tracker at {where} dropped the connection ({os_reason(e)})") from None
    finally:
        sock.close()  # the tracker forgets a request whose connection is gone
    if not isinstance(value, list) or value[0] != base.TrackerCode.SUCCESS:
        raise TvmedgeError(f"RPC tracker at {where} refused the request for '{key}': {value!r}")
    url, port, matchkey = value[1]
    return url, port, matchkey
