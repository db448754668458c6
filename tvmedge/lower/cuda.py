"""Device code for CUDA targets (Jetson Nano sm_53, Xavier sm_72), compiled here without a GPU.

TVM 0.27 writes a CUDA kernel module through ``ffi.Module.create.cuda``, a function of its
CUDA runtime library (``libtvm_runtime_cuda.so``), which hands the kernels' CUDA C to the
global function ``tvm_callback_cuda_compile`` and keeps what it returns (PTX or cubin,
recognised by its first bytes). Two things stand in the way on a machine without a GPU:

* the runtime library does not load: it needs ``libcudart.so.13`` (the wheel is built
  against CUDA 13; ``nvidia-cuda-runtime`` ships it) and the driver, ``libcuda.so.1``.
  Without a driver, TVM's codegen silently keeps the CUDA C *source* in the library, which
  no device runtime loads. :func:`enable` loads the runtime library; where no driver is
  installed it first loads a driver stub built here (every entry point answers
  ``CUDA_ERROR_NO_DEVICE``): the library only needs the symbols to load, compiling never
  calls the driver, and running anything on the stub fails with TVM's own "no device"
  error. A machine with a driver uses its own.
* TVM's own callback (``tvm.support.nvcc``) looks for a CUDA toolkit install. Ours runs
  NVRTC from the CUDA 12 wheels (``nvidia-cuda-nvrtc-cu12`` through ``cuda-bindings``; CUDA 13
  no longer targets sm_53/sm_72) with the headers TVM's kernels include from
  ``nvidia-cuda-cccl-cu12`` (``cuda/std/*``) and ``nvidia-cuda-runtime-cu12``
  (``cuda_fp16.h``), for the architecture of the target in scope.

Embedded code: PTX by default (``TVMEDGE_CUDA_CODE=cubin`` embeds a cubin instead). The
driver JIT-compiles PTX once per board (cached in ``~/.nv/ComputeCache``) and needs to know
the PTX ISA version NVRTC 12.9 writes (8.8, i.e. a CUDA 12.9-capable driver); a cubin
is machine code for exactly one architecture. :func:`describe` reports what a library holds.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from ..core.errors import TvmedgeError

FORMATS = ("ptx", "cubin")

# The driver entry points libtvm_runtime_cuda.so links against (``nm -D --undefined-only``).
_DRIVER_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
                   "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload",
                   "cuTensorMapEncodeTiled")
_CUDA_ERROR_NO_DEVICE = 100

_lock = threading.Lock()
_enabled: dict[str, Any] = {}


def _nvidia_dir() -> Path:
    try:
        import nvidia  # namespace package of NVIDIA's wheels
    except ImportError:
        raise TvmedgeError("CUDA targets need NVIDIA's CUDA wheels: pip install 'tvmedge[cuda]' "
                           "(nvidia-cuda-nvrtc-cu12, nvidia-cuda-cccl-cu12, ...)") from None
    return Path(list(nvidia.__path__)[0])


def include_dirs() -> list[str]:
    """The CUDA 12 headers TVM's generated kernels include (CCCL's ``cuda/std``, ``cuda_fp16.h``)."""
    base = _nvidia_dir()
    dirs = [base / "cuda_cccl" / "include", base / "cuda_runtime" / "include"]
    missing = [d for d in dirs if not d.is_dir()]
    if missing:
        raise TvmedgeError(f"CUDA 12 headers not found ({', '.join(map(str, missing))}): "
                           "pip install nvidia-cuda-cccl-cu12 nvidia-cuda-runtime-cu12")
    return [str(d) for d in dirs]


def _stub_driver() -> Path:
    """A ``libcuda.so.1`` whose every entry point returns CUDA_ERROR_NO_DEVICE, built once."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tvmedge" / "cuda-driver-stub"
    lib = cache / "libcuda.so.1"
    if lib.exists():
        return lib
    cc = next((c for c in ("cc", "gcc", "clang", "g++") if shutil.which(c)), None)
    if cc is None:
        raise TvmedgeError("no CUDA driver here and no C compiler to build the stand-in TVM's CUDA "
                           "library needs in order to load (install gcc)")
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / "stub.c"
    src.write_text("".join(f"int {s}(void) {{ return {_CUDA_ERROR_NO_DEVICE}; }}\n" for s in _DRIVER_SYMBOLS))
    tmp = cache / f".libcuda.so.1.{os.getpid()}"
    proc = subprocess.run([cc, "-x", "c", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise TvmedgeError(f"building the CUDA driver stand-in failed: {proc.stderr.strip().splitlines()[-1:]}")
    os.replace(tmp, lib)  # atomic: parallel builder workers may race here
    return lib


def _load_runtime() -> str:
    """Load TVM's CUDA runtime library (which holds the CUDA module writer); returns which driver."""
    import tvm
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return "system"
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        driver = "system"
    except OSError:
        ctypes.CDLL(str(_stub_driver()), mode=ctypes.RTLD_GLOBAL)
        driver = "stub (no GPU driver here: compile only)"
    cudart = _nvidia_dir() / "cu13" / "lib" / "libcudart.so.13"
    try:
        ctypes.CDLL("libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        if not cudart.exists():
            raise TvmedgeError("TVM's CUDA runtime library needs libcudart.so.13: pip install "
                               "nvidia-cuda-runtime (CUDA 13)") from None
        ctypes.CDLL(str(cudart), mode=ctypes.RTLD_GLOBAL)
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                           extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as e:
        raise TvmedgeError(f"TVM's CUDA runtime library does not load: {e}") from None
    if tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise TvmedgeError("TVM's CUDA runtime library loaded but registered no CUDA module writer")
    return driver


def runtime_env() -> dict[str, str]:
    """Environment for a TVM process (an RPC server) that should load TVM's CUDA runtime
    library by itself at ``import tvm``: libcudart.so.13 from the wheel on its library path."""
    lib = _nvidia_dir() / "cu13" / "lib"
    path = os.environ.get("LD_LIBRARY_PATH", "")
    return {"LD_LIBRARY_PATH": f"{lib}:{path}" if path else str(lib)} if lib.is_dir() else {}


def code_format() -> str:
    fmt = os.environ.get("TVMEDGE_CUDA_CODE", "ptx").lower()
    if fmt not in FORMATS:
        raise TvmedgeError(f"TVMEDGE_CUDA_CODE must be one of {', '.join(FORMATS)}, not '{fmt}'")
    return fmt


def compile_source(code: str, arch: str, fmt: str = "ptx") -> bytes:
    """NVRTC: CUDA C for ``arch`` (``sm_53``) to PTX or a cubin."""
    from cuda.bindings import nvrtc

    if not re.fullmatch(r"sm_\d+", arch):
        raise TvmedgeError(f"CUDA target arch must look like sm_53, not '{arch}'")
    gpu = arch.replace("sm_", "compute_") if fmt == "ptx" else arch
    opts = [f"--gpu-architecture={gpu}", "-default-device", "--std=c++17",
            # TVM's fp16 kernels use half's operators, which cuda_fp16.h hides by default
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-D__NV_SILENCE_DEPRECATION_BEGIN=", "-D__NV_SILENCE_DEPRECATION_END="]
    opts += [f"-I{d}" for d in include_dirs()]
    err, prog = nvrtc.nvrtcCreateProgram(code.encode(), b"tvmedge_kernels.cu", 0, None, None)
    _check(nvrtc, err, "nvrtcCreateProgram")
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            errors = [ln for ln in log.decode(errors="replace").splitlines() if "error" in ln]
            raise TvmedgeError(f"NVRTC could not compile the kernels for {arch}: "
                               f"{errors[0] if errors else log.decode(errors='replace').strip()[:300]}")
        get_size, get = ((nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX) if fmt == "ptx"
                         else (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN))
        err, size = get_size(prog)
        _check(nvrtc, err, get_size.__name__)
        buf = b" " * size
        (err,) = get(prog, buf)
        _check(nvrtc, err, get.__name__)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return buf.rstrip(b"\0") if fmt == "ptx" else buf


def _check(nvrtc, err, what: str) -> None:
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise TvmedgeError(f"NVRTC {what} failed: {nvrtc.nvrtcGetErrorString(err)[1].decode()}")


def _callback(code) -> bytes:
    import tvm

    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "cuda" or not target.attrs.get("arch"):
        raise TvmedgeError("compiling CUDA kernels needs a CUDA target with an arch in scope (with target: ...)")
    return compile_source(str(code), str(target.attrs["arch"]), code_format())


def enable() -> dict[str, Any]:
    """Make TVM compile CUDA kernels to embedded PTX/cubin in this process (idempotent).
    Returns what is used: driver, NVRTC version, code format."""
    with _lock:
        if not _enabled:
            import tvm_ffi

            driver = _load_runtime()
            try:
                from cuda.bindings import nvrtc
            except ImportError:
                raise TvmedgeError("compiling CUDA kernels needs cuda-bindings 12.x and nvidia-cuda-nvrtc-cu12: "
                                   "pip install 'tvmedge[cuda]'") from None
            try:
                _, major, minor = nvrtc.nvrtcVersion()
            except RuntimeError as e:  # cuda-bindings found no libnvrtc
                raise TvmedgeError(f"NVRTC not loadable ({e}): pip install nvidia-cuda-nvrtc-cu12") from None
            if major >= 13:
                raise TvmedgeError(f"NVRTC {major}.{minor} no longer targets Jetson's sm_53/sm_72: use CUDA 12 "
                                   "(nvidia-cuda-nvrtc-cu12, cuda-bindings 12.x)")
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", _callback, override=True)
            _enabled.update(driver=driver, nvrtc=f"{major}.{minor}")
    return {**_enabled, "format": code_format()}


def gpu_present() -> bool:
    """Whether this machine has a CUDA GPU TVM can run on (loads TVM's CUDA runtime library)."""
    import tvm

    enable()
    return bool(tvm.cuda(0).exist)


def cuda_modules(mod) -> list:
    """The CUDA kernel modules imported (directly or not) by a runtime module."""
    out, todo = [], [mod]
    while todo:
        m = todo.pop()
        if m.kind == "cuda":
            out.append(m)
        todo.extend(m.imports)
    return out


def _driver_for_ptx(version: str) -> str | None:
    """The oldest CUDA driver whose JIT reads PTX ISA ``version`` (8.8 -> 12.9)."""
    try:
        from cuda.bindings.utils import get_minimal_required_cuda_ver_from_ptx_ver

        v = get_minimal_required_cuda_ver_from_ptx_ver(version)
    except (ImportError, ValueError):
        return None
    return f"{v // 1000}.{v % 1000 // 10}"


_EM_CUDA = 190
_PTX_TARGET = re.compile(rb"^\s*\.target\s+(sm_\d+)", re.M)
_PTX_VERSION = re.compile(rb"^\s*\.version\s+(\d+\.\d+)", re.M)


def describe_library(path: str | os.PathLike) -> dict[str, Any]:
    """What device code a built library embeds: PTX (with its ``.target`` and ``.version``),
    a cubin (ELF for the GPU), or CUDA C source that no device can load."""
    data = Path(path).read_bytes()
    targets = sorted({m.decode() for m in _PTX_TARGET.findall(data)})
    versions = sorted({m.decode() for m in _PTX_VERSION.findall(data)})
    if targets:
        return {"format": "ptx", "ptx_targets": targets, "ptx_isa": versions,
                "min_cuda_driver": max((_driver_for_ptx(v) for v in versions), default=None)}
    if b"__global__" in data and b"extern \"C\"" in data:
        return {"format": "cuda-source", "deployable": False}
    # A cubin is an ELF object for the GPU (e_machine EM_CUDA) embedded in the library;
    # its e_flags' low byte is the SM version.
    arches, at = set(), data.find(b"\x7fELF", 4)
    while at > 0:
        head = data[at:at + 52]
        if len(head) == 52 and int.from_bytes(head[18:20], "little") == _EM_CUDA:
            arches.add(f"sm_{int.from_bytes(head[48:52], 'little') & 0xFF}")
        at = data.find(b"\x7fELF", at + 4)
    if arches:
        return {"format": "cubin", "cubin_targets": sorted(arches)}
    return {"format": "none"}
