"""The arm64 user space an emulated board runs: prepared once, cached, reused.

``prepare_sysroot()`` assembles, under ``$XDG_CACHE_HOME/tvmedge/emulator/aarch64/``
(``~/.cache`` when unset):

* ``sysroot/`` - Debian 12 (bookworm) arm64 packages for Python 3.11 and the C++ runtime,
  downloaded with ``apt-get`` under a private APT configuration (``APT::Architecture
  "arm64"``, its own lists/cache/status: the host's dpkg architectures are not touched)
  and unpacked with ``dpkg -x``;
* ``site-packages/`` - the manylinux aarch64 wheels of the TVM runtime this host uses
  (``apache-tvm``, ``apache-tvm-ffi`` at the host's versions, so both ends of an RPC
  session speak the same protocol), ``numpy``, ``ml_dtypes``, ``typing_extensions``,
  ``cloudpickle`` (TVM's popen workers) and ``psutil`` (TVM kills session workers with
  it), fetched with ``pip download --platform ... --only-binary=:all:`` and unzipped.
  TVM's compiler library (``libtvm_compiler.so``, ~230 MB) is left out: a board only runs
  the runtime, like a real deployment;
* ``manifest.json`` - what went in, written last.

It is built in a temporary sibling folder and renamed into place at the end, under a
file lock: an interrupted attempt leaves nothing that looks ready, and the next one
starts clean. A sysroot built for other TVM versions than the host's is rebuilt.
Nothing here needs root, but it needs Debian's ``apt-get``/``dpkg-deb`` and network
access to a Debian mirror (``TVMEDGE_DEBIAN_MIRROR``, default ``http://deb.debian.org``)
and to the Python package index pip is configured for.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..devices import cross_compiler_for, debian_package, qemu_for, targets_dir
from ..core.errors import TvmedgeError

SUPPORTED_ARCHES = ("aarch64",)
DEBIAN_SUITE = "bookworm"  # Debian 12: its python3.11 matches the host's Python and the wheels' cp311
DEBIAN_PACKAGES = ["python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1"]
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# Wheels for the device, pinned to the host's installed versions where it has them
# (fallbacks: the versions checked together, see pyproject.toml).
DEVICE_WHEELS = {
    "apache-tvm": "0.27.0.post1",
    "apache-tvm-ffi": "0.1.14.post0",
    "numpy": "2.4.6",
    "ml_dtypes": "0.6.0",
    "typing_extensions": "4.16.0",
    "cloudpickle": "3.1.3",
    "psutil": "7.2.2",
}
MUST_MATCH_HOST = ("apache-tvm", "apache-tvm-ffi")
WHEEL_PLATFORMS = ["manylinux_2_36_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64",
                   "manylinux2014_aarch64"]  # bookworm's glibc is 2.36
DROPPED_FILES = ["tvm/lib/libtvm_compiler.so"]

# Debian packages of the tools preparing a user space takes; those of the emulator and
# the cross compiler (named by the device descriptions) come from tvmedge.devices.
DEBIAN_PACKAGE_OF = {"apt-get": "apt", "dpkg-deb": "dpkg"}
MANIFEST = "manifest.json"
FORMAT = 1

Log = Callable[[str], None]


def _stderr_log(msg: str) -> None:
    print(f"[tvmedge emulator] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/tvmedge/emulator`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tvmedge" / "emulator"


@dataclass
class Sysroot:
    """A prepared emulator user space."""

    arch: str
    path: Path  # .../emulator/aarch64
    qemu: str  # absolute path of the qemu-user binary
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def sysroot(self) -> Path:
        return self.path / "sysroot"

    @property
    def site_packages(self) -> Path:
        return self.path / "site-packages"

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / "python3.11"

    @property
    def runtime_extra_lib(self) -> Path:
        """``libtvm_runtime_extra.so``: MetaSchedule's measuring functions for the device."""
        return self.site_packages / "tvm" / "lib" / "libtvm_runtime_extra.so"

    def command(self, cpu: str | None = None) -> list[str]:
        """The argv prefix that runs the emulated Python (append its arguments)."""
        argv = [self.qemu]
        if cpu:
            argv += ["-cpu", cpu]
        return argv + ["-L", str(self.sysroot), str(self.python)]


# ---------------------------------------------------------------- tools
def _which_or_error(tool: str, why: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pkg = DEBIAN_PACKAGE_OF.get(tool) or debian_package(tool)
        raise TvmedgeError(f"'{tool}' not found: it is needed {why} (install the Debian package {pkg})")
    return path


def check_tools(arch: str = "aarch64", cross_compiler: bool = True) -> dict[str, str]:
    """Paths of the emulator (and cross compiler); TvmedgeError naming the package if missing."""
    _check_arch(arch)
    tools = {"qemu": _which_or_error(_qemu(arch), f"to emulate an {arch} device")}
    if cross_compiler:
        tools["cxx"] = _which_or_error(_cross_compiler(arch), f"to link libraries for an {arch} device")
    return tools


def _check_arch(arch: str) -> None:
    if arch not in SUPPORTED_ARCHES:
        raise TvmedgeError(f"no emulated user space for '{arch}' (supported: {', '.join(SUPPORTED_ARCHES)})")


def _qemu(arch: str) -> str:
    """The qemu-user binary for ``arch``, as the device descriptions of emulated boards name it."""
    qemu = qemu_for(arch)
    if qemu is None:
        raise TvmedgeError(f"no device description in {targets_dir()} says how to emulate {arch}")
    return qemu


def _cross_compiler(arch: str) -> str:
    cxx = cross_compiler_for(arch)
    if cxx is None:
        raise TvmedgeError(f"no device description in {targets_dir()} names a cross compiler for {arch}")
    return cxx


def device_wheels() -> dict[str, str]:
    """Wheel name -> version for the device: the host's versions where it has the package."""
    out = {}
    for name, fallback in DEVICE_WHEELS.items():
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = fallback
    return out


# ---------------------------------------------------------------- state
def find_sysroot(arch: str = "aarch64") -> Sysroot | None:
    """The prepared sysroot if it is complete and matches this host's TVM, else None."""
    _check_arch(arch)
    path = cache_root() / arch
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    wanted = device_wheels()
    if manifest.get("format") != FORMAT or any(manifest.get("wheels", {}).get(n) != wanted[n] for n in MUST_MATCH_HOST):
        return None
    qemu = _qemu(arch)
    root = Sysroot(arch, path, shutil.which(qemu) or qemu, manifest)
    if not (root.python.exists() and root.runtime_extra_lib.exists()):
        return None
    return root


def prepare_sysroot(arch: str = "aarch64", *, force: bool = False, log: Log | None = None,
                    check_cross_compiler: bool = True) -> Sysroot:
    """The emulator user space for ``arch``, prepared on first use (takes a few minutes)."""
    log = log or _stderr_log
    tools = check_tools(arch, cross_compiler=check_cross_compiler)
    root_dir = cache_root()
    try:
        root_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TvmedgeError(f"cannot create the emulator cache {root_dir} ({e.strerror})") from None
    lock_path = root_dir / f"{arch}.lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is preparing the {arch} emulator user space; waiting for it ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        ready = None if force else find_sysroot(arch)
        if ready is not None:
            ready.qemu = tools["qemu"]
            return ready
        # Holding the lock: leftovers of interrupted attempts are dead; clear them.
        for stale in root_dir.glob(f".{arch}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        final = root_dir / arch
        t0 = time.monotonic()
        log(f"preparing the {arch} emulator user space in {final} (once; a few minutes) ...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{arch}.tmp-", dir=root_dir))
        try:
            debs = _debian_userspace(tmp, log)
            wheels = _wheels(tmp, log)
            manifest = {"format": FORMAT, "arch": arch, "debian_suite": DEBIAN_SUITE, "debian_packages": debs,
                        "wheels": wheels, "dropped": DROPPED_FILES, "host": platform.node(),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            _smoke_test(Sysroot(arch, tmp, tools["qemu"], manifest), log)
            manifest["seconds"] = round(time.monotonic() - t0, 1)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            for junk in ("debs", "wheels", "apt"):
                shutil.rmtree(tmp / junk, ignore_errors=True)
            if final.exists():
                old = root_dir / f".{arch}.tmp-old-{os.getpid()}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.chmod(tmp, 0o755)  # mkdtemp made it private
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"{arch} emulator user space ready ({_du(final) / 1e6:.0f} MB) in {time.monotonic() - t0:.0f} s")
        return Sysroot(arch, final, tools["qemu"], manifest)


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _run(argv: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TvmedgeError(f"{what} took longer than {timeout:.0f} s; check the network and retry") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith(("E:", "ERROR", "error"))] or lines or ["no output"]
        raise TvmedgeError(f"{what} failed: {errs[-1]}")
    return proc.stdout


# ---------------------------------------------------------------- Debian user space
def _apt_env(work: Path) -> dict[str, str]:
    """A private APT set-up: arm64 only, own lists/cache/status, the host's Acquire settings."""
    etc = work / "etc"
    for d in (etc / "parts", etc / "sources.d", etc / "preferences.d", work / "state" / "lists" / "partial",
              work / "cache" / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    (work / "state" / "status").touch()
    # Keep the host's apt.conf.d (proxies, mirror quirks); hooks are cleared below.
    host_parts = Path("/etc/apt/apt.conf.d")
    if host_parts.is_dir():
        for f in host_parts.iterdir():
            if f.is_file():
                try:
                    shutil.copy(f, etc / "parts" / f.name)
                except OSError:
                    pass
    mirror = os.environ.get("TVMEDGE_DEBIAN_MIRROR", "http://deb.debian.org").rstrip("/")
    (etc / "sources.d" / "debian.sources").write_text(
        f"Types: deb\nURIs: {mirror}/debian\nSuites: {DEBIAN_SUITE} {DEBIAN_SUITE}-updates\nComponents: main\n"
        f"Architectures: arm64\nSigned-By: {DEBIAN_KEYRING}\n\n"
        f"Types: deb\nURIs: {mirror}/debian-security\nSuites: {DEBIAN_SUITE}-security\nComponents: main\n"
        f"Architectures: arm64\nSigned-By: {DEBIAN_KEYRING}\n")
    conf = [
        # the main file is read after the parts: clear hooks that would act on the host
        "#clear APT::Update::Pre-Invoke;", "#clear APT::Update::Post-Invoke;",
        "#clear APT::Update::Post-Invoke-Success;", "#clear DPkg::Pre-Invoke;", "#clear DPkg::Post-Invoke;",
        "#clear DPkg::Pre-Install-Pkgs;", "#clear APT::Architectures;",
        'APT::Architecture "arm64";', 'APT::Architectures { "arm64"; };',
        'APT::Install-Recommends "false";', 'APT::Install-Suggests "false";',
        f'Dir::State "{work}/state";', f'Dir::State::status "{work}/state/status";',
        f'Dir::Cache "{work}/cache";', 'Dir::Etc::sourcelist "/dev/null";',
        f'Dir::Etc::sourceparts "{etc}/sources.d";', f'Dir::Etc::parts "{etc}/parts";',
        f'Dir::Etc::main "{etc}/apt.conf";', 'Dir::Etc::preferences "/dev/null";',
        f'Dir::Etc::preferencesparts "{etc}/preferences.d";', f'Dir::Log "{work}/log";',
    ]
    if os.geteuid() == 0:
        conf.append('APT::Sandbox::User "root";')  # the private dirs are not _apt's
    else:
        conf.append('Debug::NoLocking "true";')
    (etc / "apt.conf").write_text("\n".join(conf) + "\n")
    env = dict(os.environ, APT_CONFIG=str(etc / "apt.conf"), LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    return env


def _debian_userspace(tmp: Path, log: Log) -> list[str]:
    apt_get = _which_or_error("apt-get", "to download the Debian arm64 packages")
    dpkg_deb = _which_or_error("dpkg-deb", "to unpack the Debian arm64 packages")
    if not os.path.exists(DEBIAN_KEYRING):
        raise TvmedgeError(f"{DEBIAN_KEYRING} not found: it is needed to verify Debian packages "
                           "(install the Debian package debian-archive-keyring)")
    work = tmp / "apt"
    env = _apt_env(work)
    log(f"apt-get update (Debian {DEBIAN_SUITE}, arm64 package lists) ...")
    _run([apt_get, "-q", "update"], "apt-get update for arm64", env)
    log(f"downloading Debian arm64 packages: {' '.join(DEBIAN_PACKAGES)} and their dependencies ...")
    _run([apt_get, "-q", "-y", "install", "--download-only", *DEBIAN_PACKAGES],
         "downloading Debian arm64 packages", env)
    debs = sorted((work / "cache" / "archives").glob("*.deb"))
    if not debs:
        raise TvmedgeError("downloading Debian arm64 packages gave no .deb files")
    sysroot = tmp / "sysroot"
    sysroot.mkdir()
    log(f"unpacking {len(debs)} packages into the sysroot ...")
    names = []
    for deb in debs:
        _run([dpkg_deb, "-x", str(deb), str(sysroot)], f"unpacking {deb.name}")
        name, version = deb.name.split("_")[:2]
        names.append(f"{name}={version.replace('%3a', ':')}")
    if not (sysroot / "usr" / "bin" / "python3.11").exists():
        raise TvmedgeError("the unpacked Debian packages have no usr/bin/python3.11")
    return names


# ---------------------------------------------------------------- wheels
def _wheels(tmp: Path, log: Log) -> dict[str, str]:
    wheels = device_wheels()
    dl = tmp / "wheels"
    dl.mkdir()
    reqs = [f"{n}=={v}" for n, v in wheels.items()]
    log(f"downloading aarch64 wheels: {' '.join(reqs)} ...")
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
            "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
            "--abi", "cp311", "--abi", "abi3", "--abi", "none", "--dest", str(dl)]
    for plat in WHEEL_PLATFORMS:
        argv += ["--platform", plat]
    try:
        import pip  # noqa: F401
    except ImportError:
        raise TvmedgeError(f"pip is not installed in {sys.executable}: it is needed to download the "
                           "device's wheels (python -m ensurepip)") from None
    _run(argv + reqs, "downloading the aarch64 wheels", timeout=1800)
    site = tmp / "site-packages"
    site.mkdir()
    files = sorted(dl.glob("*.whl"))
    log(f"unpacking {len(files)} wheels into site-packages ...")
    for whl in files:
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
    for rel in DROPPED_FILES:
        (site / rel).unlink(missing_ok=True)
    # TVM's RPC server starts workers with ``sys.executable``; under qemu-user that is the
    # arm64 binary, which the host cannot exec: the device points it at a host wrapper
    # that re-enters the emulator (TVMEDGE_EMU_EXECUTABLE, set by tvmedge.deploy.emulate).
    (site / "sitecustomize.py").write_text(
        '"""tvmedge emulated device: sys.executable -> the host wrapper that re-enters qemu."""\n'
        "import os\nimport sys\n\n"
        "_exe = os.environ.get('TVMEDGE_EMU_EXECUTABLE')\n"
        "if _exe:\n    sys.executable = _exe\n")
    return wheels


def _smoke_test(root: Sysroot, log: Log) -> None:
    """``import tvm`` (runtime only) + the measuring library, under the emulator."""
    log("checking the user space: import tvm under qemu ...")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=str(root.site_packages), TVM_USE_RUNTIME_LIB="1", PYTHONNOUSERSITE="1")
    code = ("import ctypes, sys, tvm, tvm.exec.rpc_server, numpy, psutil, cloudpickle; "
            f"ctypes.CDLL({str(root.runtime_extra_lib)!r}, ctypes.RTLD_GLOBAL); "
            "assert tvm.get_global_func('tvm.contrib.random.random_fill_for_measure', True) is not None; "
            "print(tvm.__version__, numpy.__version__)")
    try:
        proc = subprocess.run(root.command() + ["-c", code], capture_output=True, text=True, env=env, timeout=300)
    except subprocess.TimeoutExpired:
        raise TvmedgeError("the emulated Python did not import tvm within 300 s") from None
    if proc.returncode != 0:
        last = ([ln for ln in proc.stderr.splitlines() if ln.strip()] or ["no output"])[-1]
        raise TvmedgeError(f"the emulated Python cannot import the TVM runtime: {last}")
    log(f"emulated Python runs TVM {proc.stdout.split()[0]}")
