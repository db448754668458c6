"""The two binarized kernels as benchmark cases: shape syntax, op and byte counts, random inputs,
the numpy fp32 baseline of the same shape, the call into a backend and the exactness check.

What is counted (as in BNN papers): one XNOR and one popcount-accumulate per bit pair, so an
XNOR GEMM of M x N x K bits is ``2*M*N*K`` binary ops, a binary conv ``2*N*O*OH*OW*C*KH*KW``;
the numpy fp32 baseline of the same shape does the same number of FLOPs (multiply + add).
Arithmetic intensity uses compulsory traffic only: packed operands in, int32 result out.
"""

from __future__ import annotations

import re
from types import ModuleType
from typing import Any, Callable

import numpy as np

from . import pack as _pack

KERNELS = ("xnor_gemm", "bconv2d")
DEFAULT_SHAPES = {
    "xnor_gemm": ["1024x1024x1024", "2048x2048x2048"],
    "bconv2d": ["1x64x56x56-64x3x3-s1-p1", "1x128x28x28-128x3x3-s1-p1",
                "1x256x14x14-256x3x3-s2-p1"],
}
BASELINES = {
    "xnor_gemm": "numpy float32 matmul (np.matmul on +-1 float32, same M,N,K)",
    "bconv2d": "numpy float32 im2col (sliding_window_view copy) + matmul, same conv",
}


def check_kernel(kernel: str) -> None:
    """ValueError unless ``kernel`` is one of :data:`KERNELS`."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {', '.join(KERNELS)}")


def parse_shape(kernel: str, text: str) -> dict:
    """``MxNxK`` for xnor_gemm (K in bits); ``NxCxHxW-OxKHxKW[-sS][-pP]`` for bconv2d."""
    check_kernel(kernel)
    text = text.strip().lower()
    if kernel == "xnor_gemm":
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
        if not m:
            raise ValueError(f"xnor_gemm shape must be MxNxK (e.g. 1024x1024x1024), got {text!r}")
        mm, n, k = (int(g) for g in m.groups())
        if min(mm, n, k) < 1:
            raise ValueError(f"shape dimensions must be >= 1: {text!r}")
        return {"name": text, "M": mm, "N": n, "K": k}
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)-(\d+)x(\d+)x(\d+)(?:-s(\d+))?(?:-p(\d+))?", text)
    if not m:
        raise ValueError("bconv2d shape must be NxCxHxW-OxKHxKW[-sS][-pP] "
                         f"(e.g. 1x64x56x56-64x3x3-s1-p1), got {text!r}")
    n, c, h, w, o, kh, kw = (int(g) for g in m.groups()[:7])
    s, p = int(m.group(8) or 1), int(m.group(9) or 0)
    oh, ow = _pack.conv_out_hw(h, w, kh, kw, s, p)
    return {"name": text, "N": n, "C": c, "H": h, "W": w, "O": o, "KH": kh, "KW": kw,
            "stride": s, "padding": p, "OH": oh, "OW": ow}


def op_count(kernel: str, s: dict) -> int:
    """Binary ops of one call (2 per bit pair); also the FLOPs of the fp32 baseline."""
    if kernel == "xnor_gemm":
        return 2 * s["M"] * s["N"] * s["K"]
    return 2 * s["N"] * s["O"] * s["OH"] * s["OW"] * s["C"] * s["KH"] * s["KW"]


def binary_bytes(kernel: str, s: dict) -> int:
    """Compulsory traffic of the binary kernel: packed inputs in, int32 out."""
    if kernel == "xnor_gemm":
        return 8 * _pack.n_words(s["K"]) * (s["M"] + s["N"]) + 4 * s["M"] * s["N"]
    k = s["C"] * s["KH"] * s["KW"]
    return (4 * s["N"] * s["C"] * s["H"] * s["W"] + 8 * s["O"] * _pack.n_words(k)
            + 4 * s["N"] * s["O"] * s["OH"] * s["OW"])


def fp32_bytes(kernel: str, s: dict) -> int:
    """Compulsory traffic of the fp32 baseline: float32 operands in, float32 out."""
    if kernel == "xnor_gemm":
        return 4 * (s["M"] * s["K"] + s["K"] * s["N"] + s["M"] * s["N"])
    k = s["C"] * s["KH"] * s["KW"]
    return 4 * (s["N"] * s["C"] * s["H"] * s["W"] + s["O"] * k + s["N"] * s["O"] * s["OH"] * s["OW"])


def make_inputs(kernel: str, s: dict, rng: np.random.Generator) -> dict:
    """Random operands of shape ``s``: float for the baseline, packed for the backends."""
    if kernel == "xnor_gemm":
        a = rng.choice(np.array([-1, 1], np.float32), size=(s["M"], s["K"]))
        b = rng.choice(np.array([-1, 1], np.float32), size=(s["N"], s["K"]))
        return {"a": a, "bT": np.ascontiguousarray(b.T), "a_packed": _pack.pack_bits(a),
                "b_packed": _pack.pack_bits(b)}
    x = rng.standard_normal((s["N"], s["C"], s["H"], s["W"])).astype(np.float32)
    w = rng.standard_normal((s["O"], s["C"], s["KH"], s["KW"])).astype(np.float32)
    return {"x": x, "w": w, "w_packed": _pack.pack_conv_weight(w),
            "w_fp32": np.ascontiguousarray(np.sign(w).reshape(s["O"], -1).T)}


def fp32_baseline(kernel: str, s: dict, d: dict) -> Callable[[], Any]:
    """The numpy float32 computation of the same shape (see :data:`BASELINES`)."""
    if kernel == "xnor_gemm":
        return lambda: d["a"] @ d["bT"]

    def conv():  # im2col (a copy) + one fp32 matmul, as the binary path does
        xp = np.pad(d["x"], ((0, 0), (0, 0), (s["padding"],) * 2, (s["padding"],) * 2))
        win = np.lib.stride_tricks.sliding_window_view(xp, (s["KH"], s["KW"]), axis=(2, 3))
        st = s["stride"]
        win = win[:, :, ::st, ::st][:, :, :s["OH"], :s["OW"]].transpose(0, 2, 3, 1, 4, 5)
        return win.reshape(s["N"] * s["OH"] * s["OW"], -1) @ d["w_fp32"]

    return conv


def backend_call(kernel: str, s: dict, d: dict, backend: ModuleType) -> Callable[[], np.ndarray]:
    """One call of ``kernel`` through a backend module's shared interface on inputs ``d``."""
    if kernel == "xnor_gemm":
        return lambda: backend.xnor_gemm(d["a_packed"], d["b_packed"], s["K"])
    return lambda: backend.bconv2d(d["x"], d["w_packed"], s["stride"], s["padding"])


def verify(kernel: str, s: dict, d: dict, out: np.ndarray, rng: np.random.Generator) -> bool:
    """Whether a backend's result is bit-exact (xnor_gemm: 16 random rows; bconv2d: all)."""
    if kernel == "xnor_gemm":
        rows = rng.choice(s["M"], size=min(16, s["M"]), replace=False)
        ref = _pack.xnor_gemm_ref(d["a_packed"][rows], d["b_packed"], s["K"])
        return bool(out.shape == (s["M"], s["N"]) and np.array_equal(out[rows], ref))
    if "ref" not in d:
        d["ref"] = _pack.bconv2d_ref(d["x"], d["w"], s["stride"], s["padding"])
    return bool(np.array_equal(out, d["ref"]))
