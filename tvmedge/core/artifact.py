"""The artifact format: one ``.tar`` with ``model.so`` (the library, linked for its device)
and ``metadata.json`` (inputs, outputs, target, schedules, the library's sha256, ...).

Written by ``tvmedge.build`` and read by ``tvmedge.run`` (and anything else that deploys an
artifact) without importing the compiler.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

from .errors import TvmedgeError

LIB_NAME = "model.so"
META_NAME = "metadata.json"
FORMAT_VERSION = 2  # 2: library_sha256, checked before the library is loaded


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(out: Path, lib: Path, meta: dict[str, Any]) -> None:
    """``out`` holding ``lib`` and ``meta``, written to a temporary name and renamed."""
    partial = out.with_name(f".{out.name}.partial")
    try:
        with tarfile.open(partial, "w") as tar:
            tar.add(lib, arcname=LIB_NAME)
            data = json.dumps(meta, indent=2).encode()
            info = tarfile.TarInfo(META_NAME)
            info.size = len(data)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)  # a failed write leaves nothing behind


def read_artifact(path: str | os.PathLike, extract_to: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Unpack an artifact; returns the library path and the metadata."""
    path = Path(path)
    if not path.exists():
        raise TvmedgeError(f"artifact not found: {path}")
    try:
        with tarfile.open(path) as tar:
            names = set(tar.getnames())
            if not {LIB_NAME, META_NAME} <= names:
                raise TvmedgeError(f"{path.name} is not a tvmedge artifact (needs {LIB_NAME} and {META_NAME})")
            tar.extractall(extract_to, filter="data")
    except tarfile.TarError as e:
        raise TvmedgeError(f"cannot read artifact {path.name}: {e}") from None
    try:
        meta = json.loads((Path(extract_to) / META_NAME).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise TvmedgeError(f"{path.name}: {META_NAME} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not {"inputs", "outputs", "target", "device"} <= set(meta):
        raise TvmedgeError(f"{path.name}: {META_NAME} lacks inputs/outputs/target/device: not a tvmedge artifact")
    lib = Path(extract_to) / LIB_NAME
    # A damaged library crashes the loader (SIGBUS/SIGSEGV in dlopen): check it first.
    want = meta.get("library_sha256")
    if want is None and meta.get("format_version", 1) >= 2:
        raise TvmedgeError(f"{path.name}: {META_NAME} has no library_sha256")
    if want is not None and file_sha256(lib) != want:
        raise TvmedgeError(f"{path.name}: {LIB_NAME} is damaged (sha256 differs from the one recorded at "
                           f"compile time; {lib.stat().st_size} bytes, recorded {meta.get('library_bytes')})")
    return lib, meta
