"""Tensor data through shared memory for RPC servers on this machine.

TVM 0.27's RPC moves tensor and byte payloads one byte at a time through its stream
(``support::Stream::WriteArray`` is element-wise): about 25 ns per byte on each side, so a
64x64 RGB frame in and a 4x64x64 output back cost ~2.5 ms of CPU per frame on client and
server together, more than shapes-seg itself. A server that tvmedge started (its boot code,
:data:`SERVER_CODE`, registers the functions below) and that sees this machine's files gets
the data through a file in ``/dev/shm`` instead: the client writes the frame there, one RPC
call copies it into the device tensor, and the output comes back the same way. Calls and
their results are still TVM RPC; only the payload bytes skip the stream.

:meth:`SharedMemoryLink.open` returns ``None`` (use plain RPC) unless a round trip through
the file reproduces the data: a server on another machine, a plain ``tvm.exec.rpc_server``
or a C++ server never takes this path.
"""

from __future__ import annotations

import mmap
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

PROBE_FUNC = "tvmedge.shm_probe"
IN_FUNC = "tvmedge.shm_in"
OUT_FUNC = "tvmedge.shm_out"
CALL_FUNC = "tvmedge.shm_call"

# Runs in the server's session process (launch._BOOT), under the board's Python too:
# standard library and tvm only.
SERVER_CODE = f"""
def _tvmedge_shm():
    import ctypes, mmap, os
    import tvm_ffi
    maps = {{}}
    def mapped(path, nbytes):
        m = maps.get(path)
        if m is None or len(m[0]) < nbytes:
            fd = os.open(path, os.O_RDWR)
            try:
                mm = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
            m = maps[path] = (mm, ctypes.c_char.from_buffer(mm))
        return ctypes.c_void_p(ctypes.addressof(m[1]))
    def probe(path):
        with open(path, 'rb') as f:
            return f.read(64).decode('ascii', 'replace')
    copy_from = tvm_ffi.get_global_func('runtime.TVMTensorCopyFromBytes')
    copy_to = tvm_ffi.get_global_func('runtime.TVMTensorCopyToBytes')
    tvm_ffi.register_global_func({PROBE_FUNC!r}, probe, override=True)
    tvm_ffi.register_global_func({IN_FUNC!r}, lambda t, path, n: copy_from(t, mapped(path, n), n), override=True)
    tvm_ffi.register_global_func({OUT_FUNC!r}, lambda t, path, n: copy_to(t, mapped(path, n), n), override=True)
    def nbytes(t):
        n = 1
        for d in t.shape:
            n *= int(d)
        return (n * t.dtype.bits * t.dtype.lanes + 7) // 8
    def flat(r):
        if isinstance(r, tvm_ffi.Tensor):
            return [r]
        return [t for x in r for t in flat(x)]
    def call(mod, name, path, *args):
        # One round trip per frame: inputs in from the file, f(*inputs), outputs out to it;
        # returns each output's shape and dtype ("1x4x64x64:float32;...").
        sizes = [nbytes(t) for t in args]
        base = mapped(path, sum(sizes)).value
        off = 0
        for t, n in zip(args, sizes):
            copy_from(t, ctypes.c_void_p(base + off), n)
            off += n
        outs = flat(mod[name](*args))
        sizes = [nbytes(t) for t in outs]
        if os.path.getsize(path) < sum(sizes):
            os.truncate(path, sum(sizes))
        base = mapped(path, sum(sizes)).value
        off = 0
        for t, n in zip(outs, sizes):
            copy_to(t, ctypes.c_void_p(base + off), n)
            off += n
        return ';'.join('x'.join(str(int(d)) for d in t.shape) + ':' + str(t.dtype) for t in outs)
    tvm_ffi.register_global_func({CALL_FUNC!r}, call, override=True)
_tvmedge_shm()
"""


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class SharedMemoryLink:
    """One session's shared-memory file: inputs go in and outputs come out through it, one
    tensor at a time (a session runs one call at a time)."""

    def __init__(self, session: Any, path: Path) -> None:
        self.path = path
        self._mm: mmap.mmap | None = None
        self._in = session.get_function(IN_FUNC)
        self._out = session.get_function(OUT_FUNC)
        self._call = session.get_function(CALL_FUNC)

    @classmethod
    def open(cls, session: Any) -> "SharedMemoryLink | None":
        """A link to ``session``'s server, or ``None`` where the server cannot use one."""
        try:
            probe = session.get_function(PROBE_FUNC)
        except Exception:  # noqa: BLE001 - not a server tvmedge started
            return None
        token = secrets.token_hex(16)
        fd, name = tempfile.mkstemp(prefix="tvmedge-shm-", dir=_shm_dir())
        path = Path(name)
        link = None
        try:
            os.write(fd, token.encode("ascii"))
            os.close(fd)
            if str(probe(str(path))) != token:  # another machine, or a filesystem of its own
                return None
            link = cls(session, path)
            check = np.arange(257, dtype="float32") * 0.5
            import tvm

            remote = tvm.runtime.empty(check.shape, "float32", session.cpu(0))
            link.put(remote, check)
            if not np.array_equal(remote.numpy(), check) or not np.array_equal(link.get(remote), check):
                link.close()
                return None
            return link
        except Exception:  # noqa: BLE001 - any failure: plain RPC
            if link is not None:
                link.close()
            else:
                path.unlink(missing_ok=True)
            return None

    def _buffer(self, nbytes: int) -> mmap.mmap:
        if self._mm is None or len(self._mm) < nbytes:
            # Never shrink the file: the server may map more of it than this side does.
            size = max(nbytes, 4096, self.path.stat().st_size)
            with open(self.path, "r+b") as f:
                f.truncate(size)
                if self._mm is not None:
                    self._mm.close()
                self._mm = mmap.mmap(f.fileno(), size)
        return self._mm

    def _write(self, arrays: list[np.ndarray]) -> None:
        """``arrays``' bytes one after the other from the file's start."""
        view = np.frombuffer(self._buffer(sum(a.nbytes for a in arrays)), dtype=np.uint8)
        off = 0
        for a in arrays:
            view[off:off + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            off += a.nbytes

    def _read(self, shape: tuple[int, ...], dtype: np.dtype, offset: int = 0) -> np.ndarray:
        """A copy of the array of ``shape`` and ``dtype`` at byte ``offset`` of the file."""
        count = int(np.prod(shape, dtype=np.int64))
        buf = self._buffer(offset + count * dtype.itemsize)
        return np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape).copy()

    def put(self, tensor: Any, array: np.ndarray) -> None:
        """Copy ``array`` into the remote ``tensor`` (same shape and dtype)."""
        array = np.ascontiguousarray(array, dtype=tensor.dtype)
        self._write([array])
        self._in(tensor, str(self.path), array.nbytes)

    def get(self, tensor: Any) -> np.ndarray:
        """The remote ``tensor``'s data."""
        shape, dtype = tuple(int(d) for d in tensor.shape), np.dtype(str(tensor.dtype))
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self._buffer(nbytes)
        self._out(tensor, str(self.path), nbytes)
        return self._read(shape, dtype)

    def call(self, module: Any, name: str, tensors: list[Any], arrays: list[np.ndarray]) -> list[np.ndarray]:
        """``module[name](*tensors)`` on the device with ``arrays`` as the tensors' data, in one
        round trip: the outputs' data, in order. (``module``: a remote module, e.g. a Relax
        VM's; TVM's RPC cannot pass a remote function as an argument.)"""
        self._write([np.asarray(a, dtype=str(t.dtype)) for t, a in zip(tensors, arrays)])
        desc = str(self._call(module, name, str(self.path), *tensors))
        outs, off = [], 0
        for item in desc.split(";") if desc else []:
            dims, dtype = item.rsplit(":", 1)
            shape = tuple(int(d) for d in dims.split("x")) if dims else ()
            out = self._read(shape, np.dtype(dtype), off)
            outs.append(out)
            off += out.nbytes
        return outs

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self.path.unlink(missing_ok=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
