"""A TVM runtime and RPC server cross-built for boards no TVM wheel exists for (riscv64).

The registry has no riscv64 wheels of ``apache-tvm`` or ``apache-tvm-ffi``, but both
packages installed on this host ship their C++ sources: ``tvm/src/runtime`` with its
headers, and ``tvm_ffi/src`` (the same files as the ``apache-tvm-ffi`` sdist). A few
headers those sources include are in neither package (TVM's ``src/support``,
``include/tvm/support`` and compiler-rt's fp16 conversions); tvmedge's own versions of
them live in ``crossrt/`` next to this file, together with ``rpc_server.cc``: a small TVM
RPC server (tracker registration, handshake, one forked process per session) built on
the runtime's own RPC endpoint, so the device needs no Python at all.

``prepare_runtime("riscv64")`` compiles the runtime (CPU device, Relax VM, RPC, the
random-fill measuring functions MetaSchedule needs) and links it with the server into one
executable, ``tvmedge_rpc_server`` (``-rdynamic``: the model libraries a session loads
resolve the runtime's symbols from it). Built once per machine and TVM version, under
``$XDG_CACHE_HOME/tvmedge/emulator/riscv64-runtime/``, with a manifest naming the versions
and a digest of tvmedge's sources; objects are kept in a build folder while it runs, so
an interrupted build resumes. Sources are compiled a few to a translation unit (their shared headers
are parsed once). Takes ~5-15 min on 2 idle cores. The emulator runs the server
with the cross toolchain's C/C++ libraries (``-L /usr/riscv64-linux-gnu``, Debian's
``libc6-riscv64-cross``/``libstdc++6-riscv64-cross``, installed with the cross compiler).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.errors import TvmedgeError
from ..devices import cross_compiler_for, debian_package
from .sysroot import cache_root

HERE = Path(__file__).resolve().parent / "crossrt"
FORMAT = 1
MANIFEST = "manifest.json"
SERVER = "tvmedge_rpc_server"
SUPPORTED_ARCHES = ("riscv64",)
# Where Debian's cross toolchain keeps the target's libc/libstdc++ (qemu -L).
TARGET_LIBS = {"riscv64": "/usr/riscv64-linux-gnu"}
# ISA the runtime itself is compiled for: plain RV64GC runs on every board (RVV ones too).
ARCH_FLAGS = {"riscv64": ["-march=rv64gc", "-mabi=lp64d"]}

# Runtime sources (relative to the apache-tvm package) the device needs; LLM-serving parts
# of the VM (KV caches, attention), GPU back ends and TVM's own socket/pipe layers (the
# server has its own) are left out.
TVM_SOURCES = [
    "src/runtime/*.cc", "src/runtime/memory/*.cc", "src/runtime/vm/*.cc", "src/runtime/rpc/*.cc",
    "src/runtime/extra/contrib/random/random.cc", "src/runtime/extra/contrib/sort/sort.cc",
]
TVM_SKIPPED = {
    "src/runtime/vm/paged_kv_cache.cc", "src/runtime/vm/rnn_state.cc", "src/runtime/vm/kv_state.cc",
    "src/runtime/vm/attn_backend.cc", "src/runtime/vm/lm_support.cc",
    "src/runtime/rpc/rpc_socket_impl.cc", "src/runtime/rpc/rpc_pipe_impl.cc", "src/runtime/rpc/testing.cc",
}
FFI_SOURCES = ["src/ffi/*.cc", "src/ffi/extra/*.cc"]
FFI_SKIPPED = {"src/ffi/backtrace_win.cc"}

Log = Callable[[str], None]


def _stderr_log(msg: str) -> None:
    print(f"[tvmedge cross-build] {msg}", file=sys.stderr, flush=True)


@dataclass
class CrossRuntime:
    """A built runtime: the RPC server executable for ``arch`` and what it runs with."""

    arch: str
    path: Path  # .../emulator/riscv64-runtime
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def server(self) -> Path:
        return self.path / "bin" / SERVER

    @property
    def target_libs(self) -> str:
        """The folder qemu-user takes the target's shared libraries from (``-L``)."""
        return TARGET_LIBS[self.arch]


def _package_dir(dist: str, module: str) -> Path:
    try:
        importlib.metadata.version(dist)
        mod = __import__(module)
    except (importlib.metadata.PackageNotFoundError, ImportError):
        raise TvmedgeError(f"the Python package {dist} is not installed: its C++ sources are needed to "
                           "cross-build the TVM runtime") from None
    return Path(mod.__file__).resolve().parent


def _versions() -> dict[str, str]:
    return {d: importlib.metadata.version(d) for d in ("apache-tvm", "apache-tvm-ffi")}


def _own_digest() -> str:
    """A digest of tvmedge's C++ sources and build settings: a change rebuilds."""
    h = hashlib.sha256()
    for p in sorted(HERE.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(HERE)).encode())
            h.update(p.read_bytes())
    h.update(json.dumps([FORMAT, TVM_SOURCES, sorted(TVM_SKIPPED), FFI_SOURCES, ARCH_FLAGS]).encode())
    return h.hexdigest()[:16]


def _key() -> dict[str, Any]:
    return {"format": FORMAT, "versions": _versions(), "sources": _own_digest()}


def runtime_dir(arch: str) -> Path:
    return cache_root() / f"{arch}-runtime"


def find_runtime(arch: str = "riscv64") -> CrossRuntime | None:
    """The built runtime for ``arch`` if present and built from this host's TVM, else None."""
    _check_arch(arch)
    path = runtime_dir(arch)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    rt = CrossRuntime(arch, path, manifest)
    if manifest.get("key") != _key() or not rt.server.exists():
        return None
    return rt


def _check_arch(arch: str) -> None:
    if arch not in SUPPORTED_ARCHES:
        raise TvmedgeError(f"no cross-built TVM runtime for '{arch}' (supported: {', '.join(SUPPORTED_ARCHES)})")


def _cross_compiler(arch: str) -> str:
    cxx = cross_compiler_for(arch)
    if cxx is None:
        raise TvmedgeError(f"no device description names a cross compiler for {arch}")
    path = shutil.which(cxx)
    if path is None:
        raise TvmedgeError(f"'{cxx}' not found: it is needed to cross-build the TVM runtime for {arch} "
                           f"(install the Debian package {debian_package(cxx)}, or run scripts/setup.sh)")
    return path


def prepare_runtime(arch: str = "riscv64", *, force: bool = False, log: Log | None = None,
                    jobs: int | None = None) -> CrossRuntime:
    """The cross-built runtime for ``arch``, built on first use (minutes; progress on ``log``)."""
    log = log or _stderr_log
    _check_arch(arch)
    cxx = _cross_compiler(arch)
    if not Path(TARGET_LIBS[arch]).is_dir():
        raise TvmedgeError(f"{TARGET_LIBS[arch]} not found: the {arch} C/C++ libraries come with the cross "
                           f"compiler (install the Debian package {debian_package(os.path.basename(cxx))})")
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TvmedgeError(f"cannot create the emulator cache {root} ({e.strerror})") from None
    with open(root / f"{arch}-runtime.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is building the {arch} TVM runtime; waiting for it ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        ready = None if force else find_runtime(arch)
        if ready is not None:
            return ready
        return _build(arch, cxx, root, log, jobs or os.cpu_count() or 1)


def _build(arch: str, cxx: str, root: Path, log: Log, jobs: int) -> CrossRuntime:
    key = _key()
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    build = root / f".{arch}-runtime-build-{tag}"  # kept until the end: an interrupted build resumes
    for stale in root.glob(f".{arch}-runtime-build-*"):
        if stale != build:
            shutil.rmtree(stale, ignore_errors=True)
    tvm_dir = _package_dir("apache-tvm", "tvm")
    ffi_dir = _package_dir("apache-tvm-ffi", "tvm_ffi")
    t0 = time.monotonic()
    log(f"cross-building the TVM {key['versions']['apache-tvm']} runtime and RPC server for {arch} "
        f"with {os.path.basename(cxx)} ({jobs} jobs; once per machine, ~5-15 min) ...")
    src = build / "tree"
    _assemble_tree(tvm_dir, src)
    sources: list[tuple[str, Path]] = []  # (group, source)
    for base, patterns, skipped, tag_ in ((src, TVM_SOURCES, TVM_SKIPPED, "tvm"),
                                          (ffi_dir, FFI_SOURCES, FFI_SKIPPED, "ffi")):
        for pat in patterns:
            for f in sorted(base.glob(pat)):
                rel = str(f.relative_to(base))
                if rel not in skipped:
                    sources.append((f"{tag_}-{os.path.dirname(rel).replace('/', '-')}", f))
    units = _unity_units(sources, build / "obj")
    units.append(([HERE / "rpc_server.cc"], build / "obj" / "rpc_server.o"))
    missing = [u for u in units if not u[1].exists()]
    if len(missing) < len(units):
        log(f"resuming: {len(units) - len(missing)} of {len(units)} objects already built")
    flags = ["-std=c++17", "-O2", "-fPIC", "-pthread", *ARCH_FLAGS[arch],
             "-DTVM_FFI_USE_LIBBACKTRACE=0", "-DTVM_FFI_BACKTRACE_ON_SEGFAULT=0", "-DNDEBUG",
             f"-I{src / 'include'}", f"-I{ffi_dir / 'include'}", f"-I{ffi_dir / '3rdparty' / 'dlpack' / 'include'}",
             f"-I{src / '3rdparty' / 'compiler-rt'}", f"-I{src}"]
    done = len(units) - len(missing)
    next_report = [0.0]

    def compile_source(source: Path, obj: Path) -> str | None:
        """Compile one translation unit; the first error line on failure."""
        obj.parent.mkdir(parents=True, exist_ok=True)
        tmp = obj.with_name(obj.name + f".tmp{os.getpid()}")
        proc = subprocess.run([cxx, *flags, "-c", str(source), "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            errs = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines() or ["?"]
            return errs[0].strip()
        os.replace(tmp, obj)
        return None

    def compile_one(unit: tuple[list[Path], Path]) -> None:
        files, obj = unit
        if len(files) == 1:
            err = compile_source(files[0], obj)
            if err:
                raise TvmedgeError(f"cross-compiling {files[0].name} for {arch} failed: {err}")
            return
        # several sources in one translation unit (their headers are parsed once); if they
        # clash (file-local names), each is compiled on its own instead
        unity = obj.with_suffix(".cc")
        unity.parent.mkdir(parents=True, exist_ok=True)
        unity.write_text("".join(f'#include "{f}"\n' for f in files))
        if compile_source(unity, obj) is None:
            return
        objs = [obj.with_name(f"{obj.stem}.{i}.o") for i in range(len(files))]
        for f, o in zip(files, objs):
            if not o.exists():
                err = compile_source(f, o)
                if err:
                    raise TvmedgeError(f"cross-compiling {f.name} for {arch} failed: {err}")
        _link_objects(cxx, objs, obj)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(compile_one, u) for u in missing]
        try:
            for fut in futures:
                fut.result()
                done += 1
                if done / len(units) >= next_report[0] or done == len(units):
                    log(f"compiled {done}/{len(units)} translation units ({time.monotonic() - t0:.0f} s)")
                    next_report[0] = done / len(units) + 0.1
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    final = runtime_dir(arch)
    tmp_out = Path(tempfile.mkdtemp(prefix=f".{arch}-runtime.tmp-", dir=root))
    try:
        (tmp_out / "bin").mkdir()
        log(f"linking {SERVER} ...")
        proc = subprocess.run([cxx, "-o", str(tmp_out / "bin" / SERVER),
                               *[str(o) for _, o in units], "-rdynamic", "-pthread", "-ldl", "-latomic"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            errs = [ln for ln in proc.stderr.splitlines() if "undefined" in ln or "error" in ln] or ["?"]
            raise TvmedgeError(f"linking the {arch} RPC server failed: {errs[0].strip()}")
        manifest = {"key": key, "arch": arch, "compiler": cxx, "units": len(units),
                    "seconds": round(time.monotonic() - t0, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp_out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.chmod(tmp_out, 0o755)
        if final.exists():
            old = root / f".{arch}-runtime.tmp-old-{os.getpid()}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp_out, final)
    except BaseException:
        shutil.rmtree(tmp_out, ignore_errors=True)
        raise
    shutil.rmtree(build, ignore_errors=True)
    log(f"{arch} TVM runtime ready in {time.monotonic() - t0:.0f} s: {final / 'bin' / SERVER}")
    return CrossRuntime(arch, final, manifest)


UNITY_FILES = 6  # sources per translation unit


def _unity_units(sources: list[tuple[str, Path]], obj_dir: Path) -> list[tuple[list[Path], Path]]:
    """Sources batched by folder into translation units of up to UNITY_FILES files: most of
    the time a source takes is parsing the same FFI headers, once per unit this way."""
    groups: dict[str, list[Path]] = {}
    for group, f in sources:
        groups.setdefault(group, []).append(f)
    units = []
    for group, files in groups.items():
        for i in range(0, len(files), UNITY_FILES):
            chunk = files[i:i + UNITY_FILES]
            digest = hashlib.sha256("\n".join(map(str, chunk)).encode()).hexdigest()[:8]
            units.append((chunk, obj_dir / f"{group}-{i // UNITY_FILES}-{digest}.o"))
    return units


def _link_objects(cxx: str, objs: list[Path], out: Path) -> None:
    """Several objects as one relocatable object (``ld -r``)."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    proc = subprocess.run([cxx, "-r", "-nostdlib", "-o", str(tmp), *map(str, objs)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise TvmedgeError(f"combining {out.name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    os.replace(tmp, out)


def _assemble_tree(tvm_dir: Path, dest: Path) -> None:
    """TVM's runtime sources and headers from the wheel, plus tvmedge's missing headers."""
    if (dest / ".complete").exists():
        return
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(tvm_dir / "src" / "runtime", dest / "src" / "runtime")
    shutil.copytree(tvm_dir / "include", dest / "include")
    for sub in ("include", "src", "3rdparty"):
        shutil.copytree(HERE / sub, dest / sub, dirs_exist_ok=True)
    (dest / ".complete").touch()


if __name__ == "__main__":  # python -m tvmedge.deploy.crossrt [riscv64] [--force]
    _arch = next((a for a in sys.argv[1:] if not a.startswith("-")), "riscv64")
    try:
        print(prepare_runtime(_arch, force="--force" in sys.argv).server)
    except TvmedgeError as _e:
        print(f"error: {_e}", file=sys.stderr)
        sys.exit(1)
