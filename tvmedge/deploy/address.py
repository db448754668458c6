"""Network addresses for TVM RPC: ``host:port`` parsing and printing, local ports, socket errors.

Trackers and servers bind to loopback by default (``127.0.0.1``): a TVM RPC server runs
whatever code it is sent, so exposing one (``host="0.0.0.0"``) is an explicit choice.
"""

from __future__ import annotations

import errno
import os
import socket

from ..core.errors import TvmedgeError

HostPort = tuple[str, int]

WILDCARDS = ("", "0.0.0.0", "::")  # bind addresses that mean every interface


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


def connect_host(host: str) -> str:
    """Where a client on this machine reaches something bound to ``host``."""
    return "127.0.0.1" if host in WILDCARDS else host


def public_host(host: str) -> str:
    """An address to print for ``host``: the machine's name when bound to all interfaces."""
    return socket.gethostname() if host in WILDCARDS else host


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_free(host: str, port: int) -> bool:
    """Whether this process could bind ``host:port`` now (as TVM binds: SO_REUSEADDR)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TVM binds
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def ephemeral_port(host: str) -> int:
    """A port the system hands out as free on ``host`` (nothing listens there now)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def os_reason(err: BaseException) -> str:
    """A socket or OS error as the few words a message gives (``connection refused``)."""
    if isinstance(err, socket.gaierror):
        return "unknown host"
    if isinstance(err, socket.timeout):
        return "timed out"
    if isinstance(err, OSError) and err.errno is not None:
        if err.errno == errno.ECONNREFUSED:
            return "connection refused"
        return os.strerror(err.errno).lower()
    return str(err) or type(err).__name__
