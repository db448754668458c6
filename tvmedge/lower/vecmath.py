"""Vectorizable float32 ``sigmoid`` and ``round`` for CPU kernels (legalizations tvmedge uses instead of TOPI's).

TOPI's ``sigmoid`` is ``tirx.sigmoid``, which LLVM lowers to ``1 / (1 + llvm.exp(-x))``; with
no vector math library, LLVM splits every vector ``exp`` into scalar ``expf`` calls (16 per
AVX-512 vector). In EfficientNet (SiLU after every conv) that made the conv kernels 5-20x
slower than their arithmetic. Here ``exp`` is written out in plain arithmetic (Cephes'
``expf``: range reduction with a two-part ln 2, a degree-7 polynomial, the exponent put in
with integer bit operations), which vectorizes on any target like the rest of the kernel.

``round`` (ties to even, as ONNX and Relax define it): TOPI writes ``tirx.nearbyint``, which
TVM 0.27's loop vectorizer does not know as vectorizable: a vectorized loop holding it is
emitted as scalar code, which LLVM's own vectorizer then vectorizes along the wrong loop with
gathers and byte-by-byte stores (an int8 model's requantize kernels: 0.5 ns per element, ~20x
their arithmetic). ``tirx.round`` lowers to the same ``llvm.nearbyint`` on LLVM targets and
is vectorized (:func:`round_half_even`; bit-identical, tested).

Accuracy of ``sigmoid`` (measured against float64 on 4M points over [-100, 100]): within 2.5 ulp of the
exact sigmoid for inputs above -87 (where the result is a normal float; ``1 / (1 + expf(-x))``
in float32 is within 3.7 ulp there); below that the result is ~6e-39 instead of the denormal
or zero sigmoid gives. Not bit-identical to the libm path, as ONNX Runtime's own sigmoid is
not either (MLAS uses a rational approximation).
"""

from __future__ import annotations

from tvm import te, tirx

_LOG2E = 1.44269504088896341
# ln 2 in two parts (Cody-Waite): n * _LN2_HI is exact for |n| < 2**9.
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
# Cephes expf polynomial for exp(r) - 1 - r over |r| <= ln(2) / 2, highest power first.
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
# exp's argument is clamped so that 2**n stays a normal float: n in [-126, 127].
_X_MAX = 88.0
_X_MIN = -87.33654


def _f(v: float) -> tirx.PrimExpr:
    return tirx.const(v, "float32")


def exp_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``exp(x)`` for a float32 expression, in arithmetic only (no libm call); ``x`` is
    clamped to [-87.34, 88] (the result stays a normal, finite float)."""
    x = tirx.max(tirx.min(x, _f(_X_MAX)), _f(_X_MIN))
    n = tirx.floor(x * _f(_LOG2E) + _f(0.5))
    r = x - n * _f(_LN2_HI) - n * _f(_LN2_LO)
    p = _f(_POLY[0])
    for c in _POLY[1:]:
        p = p * r + _f(c)
    y = p * (r * r) + r + _f(1.0)
    scale = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"),
                                                           tirx.const(23, "int32")))
    return y * scale


def sigmoid_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``1 / (1 + exp(-x))`` with :func:`exp_f32`."""
    return _f(1.0) / (_f(1.0) + exp_f32(-x))


def sigmoid(x: te.Tensor) -> te.Tensor:
    """TOPI's ``sigmoid`` for float32 tensors with :func:`sigmoid_f32` (other dtypes: TOPI's)."""
    if x.dtype != "float32":
        from tvm import topi

        return topi.sigmoid(x)
    return te.compute(x.shape, lambda *i: sigmoid_f32(x(*i)), name="compute", tag="elemwise")


def round_half_even(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``nearbyint(x)`` (round half to even) for LLVM CPU targets, in a form TVM vectorizes:
    ``tirx.round`` is ``llvm.nearbyint`` there (on CUDA it is ``roundf``, ties away from zero:
    CPU kernels only)."""
    return tirx.round(x)


def round_(x: te.Tensor) -> te.Tensor:
    """TOPI's ``round`` with :func:`round_half_even` (float dtypes; others as TOPI)."""
    if not str(x.dtype).startswith("float"):
        from tvm import topi

        return topi.round(x)
    return te.compute(x.shape, lambda *i: round_half_even(x(*i)), name="compute", tag="elemwise")


def legalize_map() -> dict:
    """``LegalizeOps`` overrides for CPU targets: ``relax.sigmoid``, ``relax.nn.silu`` and ``relax.round``."""
    from tvm import topi

    def _sigmoid(bb, call):
        return bb.call_te(sigmoid, call.args[0], primfunc_name_hint="tir_sigmoid")

    def _silu(bb, call):
        return bb.call_te(lambda x: topi.multiply(x, sigmoid(x)), call.args[0], primfunc_name_hint="silu")

    def _round(bb, call):
        return bb.call_te(round_, call.args[0], primfunc_name_hint="tir_round")

    return {"relax.sigmoid": _sigmoid, "relax.nn.silu": _silu, "relax.round": _round}
