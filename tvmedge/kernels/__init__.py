"""Hand-written binarized (XNOR/popcount) kernels: one module per backend, one interface.

Every backend module (``numba``, ``opencl``, ``cupy``, ``tvm``) provides

* ``available() -> (bool, reason)``
* ``on_cpu() -> bool``: whether the kernels run on this host's CPU cores (so the CPU's
  binary-op peak of :mod:`tvmedge.kernels.machine` applies); asked only when available
* ``last_kernel_seconds() -> float | None``: device time of the last ``xnor_gemm`` kernel alone
  where the backend can tell it apart from transfers, else None
* ``xnor_gemm(a_packed, b_packed, k_bits) -> int32 [M, N]``: ``a`` [M, W] and ``b`` [N, W] are
  uint64 words from :func:`tvmedge.kernels.pack.pack_bits` (W = ceil(K / 64)); the result is
  ``sum_k a_mk * b_nk`` over ±1 values, i.e. ``K - 2 * popcount(a XOR b)``.
* ``bconv2d(x, w, stride=1, padding=0, pad_value=0) -> int32 NCHW``: binary conv of the signs
  of NCHW ``x`` and OIHW ``w`` (or a prepacked :class:`~tvmedge.kernels.pack.PackedConvWeight`).

Bit layout, padding rules and the numpy references live in :mod:`tvmedge.kernels.pack`;
which backends are usable here (and why not) in :mod:`~tvmedge.kernels.probe`. The benchmark:
:mod:`~tvmedge.kernels.workload` (shapes, op counts, inputs, fp32 baseline),
:mod:`~tvmedge.kernels.machine` (the CPU's peak and bandwidth), :mod:`~tvmedge.kernels.timing`
(the timed loop), :mod:`~tvmedge.kernels.report` (table, roofline plot, JSON) and
:mod:`~tvmedge.kernels.cli` (``tvmedge kernels bench``).
Backend modules import lazily: importing this package pulls in none of numba, pyopencl, cupy.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

BACKENDS: tuple[str, ...] = ("numba", "opencl", "cupy", "tvm")


def get_backend(name: str) -> ModuleType:
    """The backend module ``name`` (one of :data:`BACKENDS`), imported on first use."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose from {', '.join(BACKENDS)}")
    return importlib.import_module(f"{__name__}.{name}_backend")


def kernel_source(filename: str) -> str:
    """Text of a hand-written kernel file from the ``kernels/`` data folder (the checkout's,
    or an installed wheel's copy). ``TVMEDGE_KERNELS_DIR`` overrides the folder."""
    from ..core.resources import data_dir

    folder = Path(os.environ["TVMEDGE_KERNELS_DIR"]) if os.environ.get("TVMEDGE_KERNELS_DIR") else data_dir("kernels")
    path = folder / filename
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {path} not found (set TVMEDGE_KERNELS_DIR)")
    return path.read_text()
