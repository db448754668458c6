"""The elementwise chain after an int8 kernel (bias, scale, clamp, requantize), absorbed into it.

The quantizer follows every int8 conv with its epilogue as separate Relax ops: the int32 bias
``add``, ``astype`` to float32, the per-channel ``multiply`` by the scales, ReLU/ReLU6 as
``maximum``/``minimum``, and the requantize of the next layer's input (``divide`` by its scale,
``round``, ``add`` its zero point, clamp, ``astype`` uint8). Left to FuseOps, that chain is a
kernel of its own behind the hand-scheduled dot-product kernel (:mod:`.int8_dot`), which then
writes its int32 result to memory (4 bytes per value) only for the chain to read it back: in
int8 MobileNetV2 these requantize kernels took a fifth of the model's time.

:func:`chains` finds, for each kernel output, the longest run of single-use elementwise ops
whose other operand is a constant (a scalar, or one value per output channel);
:func:`compute` spells the chain as a TIR expression of the int32 accumulator, op for op as
TOPI's legalization writes it (the same float operations in the same order, so the result is
bit-identical), with the constants as the kernel's extra inputs (:func:`inputs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.graph import bindings, dtype_of, is_const, op_name, shape_of

BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum"}
UNARY = {"relax.round", "relax.astype"}


@dataclass(frozen=True)
class Step:
    """One op of the chain: ``op`` (without ``relax.``), the dtype it yields, its constant
    operand's kind (``channel``: one per output channel; ``scalar``; None for unary ops) and
    whether the constant is the left operand."""

    op: str
    dtype: str
    operand: str | None = None
    left: bool = False


@dataclass
class Epilogue:
    """The chain after one kernel: its steps, their constants ([O] or [1] arrays, in step
    order) and the Relax var whose value the fused kernel computes."""

    steps: tuple[Step, ...]
    consts: list[np.ndarray] = field(default_factory=list)
    end: Any = None

    @property
    def dtype(self) -> str:
        return self.steps[-1].dtype

    def key(self) -> tuple:
        """What makes two kernels' epilogues the same code (their constants are inputs)."""
        return self.steps

    def items(self) -> list[tuple[Step, np.ndarray | None]]:
        """Each step with its constant (None for unary steps)."""
        it = iter(self.consts)
        return [(step, next(it) if step.operand is not None else None) for step in self.steps]

    def with_items(self, items: list[tuple[Step, np.ndarray | None]]) -> Epilogue:
        """The same chain end with ``items`` as its steps (``self`` when they are its own)."""
        steps = tuple(step for step, _ in items)
        if steps == self.steps and all(a is b for (_, a), (_, b) in zip(items, self.items())):
            return self
        return Epilogue(steps, [c for _, c in items if c is not None], self.end)


def _uses(func: Any) -> dict[Any, int]:
    """How many times each var of ``func`` is read."""
    from tvm import relax

    counts: dict[Any, int] = {}

    @relax.expr_functor.visitor
    class Count(relax.PyExprVisitor):
        def visit_var_(self, var: Any) -> None:
            counts[var] = counts.get(var, 0) + 1

        def visit_dataflow_var_(self, var: Any) -> None:
            counts[var] = counts.get(var, 0) + 1

    Count().visit_expr(func)
    return counts


def _operand(const: Any, channels: int, channel_axis: int, rank: int, dtype: str) -> tuple[str, np.ndarray] | None:
    """('channel', [O]) or ('scalar', [1]) for a constant that broadcasts that way, else None."""
    value = const.value.numpy()
    if str(value.dtype) != dtype or value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    others = [d for k, d in enumerate(shape) if k != channel_axis]
    if any(d != 1 for d in others):
        return None
    if shape[channel_axis] == 1:
        return "scalar", value.reshape(1)
    if shape[channel_axis] == channels:
        return "channel", np.ascontiguousarray(value.reshape(channels))
    return None


def chains(func: Any, heads: dict[Any, tuple[int, int]]) -> dict[Any, Epilogue]:
    """For each var in ``heads`` (a kernel's output var -> its output channels and their axis),
    the chain of ops after it (only those with at least one step)."""
    from tvm import relax

    binds = bindings(func)
    by_input: dict[Any, list[Any]] = {}
    for b in binds:
        if isinstance(b, relax.VarBinding) and isinstance(b.value, relax.Call):
            for arg in b.value.args:
                if isinstance(arg, relax.Var):
                    by_input.setdefault(arg, []).append(b)
    uses = _uses(func)
    found: dict[Any, Epilogue] = {}
    for head, (channels, channel_axis) in heads.items():
        steps: list[Step] = []
        consts: list[np.ndarray] = []
        cur, end = head, None
        while uses.get(cur, 0) == 1 and len(by_input.get(cur, [])) == 1:
            b = by_input[cur][0]
            step = _step(b.value, cur, channels, channel_axis)
            if step is None:
                break
            steps.append(step[0])
            if step[1] is not None:
                consts.append(step[1])
            cur = end = b.var
        if steps:
            epi = merge_clamps(Epilogue(tuple(steps), consts, end))
            found[head] = epi if exact() else fold_scales(epi)
    return found


EXACT_SWITCH = "TVMEDGE_INT8_EXACT"  # "1": no float reassociation (bit-identical with the generic int8 ops)


def exact() -> bool:
    """Whether ``TVMEDGE_INT8_EXACT`` asks for epilogues bit-identical with the generic ops."""
    return os.environ.get(EXACT_SWITCH, "0").strip().lower() in ("1", "on", "true", "yes")


def fold_scales(epi: Epilogue) -> Epilogue:
    """The dequantize scale and the requantize divisor as one multiply: ``x * a / b`` ->
    ``x * (a / b)`` (a float reassociation: a value whose quotient lands within an ulp of a
    rounding tie may come out one quantization step off; ``TVMEDGE_INT8_EXACT=1`` keeps both).
    The divide was the chain's most expensive instruction (a 512-bit ``vdivps`` issues every
    5-10 cycles, the chain's other ops every cycle or two)."""
    items = epi.items()
    out: list[tuple[Step, np.ndarray | None]] = []
    k = 0
    while k < len(items):
        step, const = items[k]
        nxt = items[k + 1] if k + 1 < len(items) else None
        if (step.op == "multiply" and nxt is not None and nxt[0].op == "divide" and not nxt[0].left
                and step.dtype == "float32" and nxt[0].dtype == "float32"):
            a, b = const.astype(np.float32), nxt[1].astype(np.float32)
            c = (a / b).astype(np.float32)
            kind = "channel" if "channel" in (step.operand, nxt[0].operand) else "scalar"
            if np.all(np.isfinite(c)):
                out.append((Step("multiply", "float32", kind), c.reshape(-1)))
                k += 2
                continue
        out.append((step, const))
        k += 1
    return epi.with_items(out)


def _interval(steps: list[tuple[Step, np.ndarray | None]], lo: np.ndarray, hi: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounds (per channel) of the chain's value after ``steps``, from the accumulator's; None
    where an op is not one this follows."""
    lo, hi = lo.astype(np.float64), hi.astype(np.float64)
    for step, const in steps:
        if step.op == "astype":
            continue
        if step.op == "round":
            lo, hi = np.floor(lo), np.ceil(hi)
            continue
        c = const.astype(np.float64)
        if step.op in ("add", "subtract") and not (step.op == "subtract" and step.left):
            lo, hi = (lo + c, hi + c) if step.op == "add" else (lo - c, hi - c)
        elif step.op == "multiply" or (step.op == "divide" and not step.left and np.all(c != 0)):
            c = c if step.op == "multiply" else 1.0 / c
            lo, hi = np.minimum(lo * c, hi * c), np.maximum(lo * c, hi * c)
        elif step.op == "maximum":
            lo, hi = np.maximum(lo, c), np.maximum(hi, c)
        elif step.op == "minimum":
            lo, hi = np.minimum(lo, c), np.minimum(hi, c)
        else:
            return None
        lo, hi = lo * (1 - 2.0 ** -20) - 1, hi * (1 + 2.0 ** -20) + 1  # float32 rounding on the way
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    return lo, hi


def integer_tail(epi: Epilogue, acc_lo: np.ndarray, acc_hi: np.ndarray) -> Epilogue:
    """The chain's ``round, add zero point, clamp, astype int`` tail in integers: ``round``
    becomes one float -> int32 conversion rounding to even (``llvm.lrint``: ``vcvtps2dq``, where
    ``nearbyint`` + a truncating conversion were two instructions) and the add and clamp int32
    ops. Exact: taken only when the bounds of the value before ``round`` (followed from the
    accumulator's ``[acc_lo, acc_hi]`` per channel) stay within +-2^30, the constants are whole
    numbers, there is one add at most and the clamp keeps the result within +-2^24 and the
    target dtype (so a float sum that rounded, beyond 2^24, is clamped to the same bound as the
    exact integer one)."""
    items = epi.items()
    r = next((k for k, (st, _) in enumerate(items) if st.op == "round"), None)
    if r is None or items[r][0].dtype != "float32":
        return epi
    end = r + 1
    while end < len(items) and items[end][0].op in ("add", "subtract", "maximum", "minimum"):
        end += 1
    tail = items[r + 1:end]
    if end >= len(items) or items[end][0].op != "astype" or items[end][0].dtype not in ("uint8", "int8", "int32"):
        return epi
    bounds = _interval(items[:r], acc_lo, acc_hi)
    if bounds is None or max(np.abs(bounds[0]).max(), np.abs(bounds[1]).max()) >= 2.0 ** 30:
        return epi
    info = np.iinfo(items[end][0].dtype)
    consts = [c for st, c in tail]
    # one add at most: two float adds of large values can each round and land inside the clamp
    if sum(st.op in ("add", "subtract") for st, _ in tail) > 1 \
            or any(st.dtype != "float32" or (st.op == "subtract" and st.left) for st, _ in tail) \
            or any(not np.all(np.isfinite(c)) or not np.all(c == np.round(c)) or np.abs(c).max() >= 2.0 ** 24
                   for c in consts):
        return epi
    lows = [c for st, c in tail if st.op == "maximum"]
    highs = [c for st, c in tail if st.op == "minimum"]
    if not lows or not highs or tail[-1][0].op not in CLAMPS or tail[-2][0].op not in CLAMPS \
            or min(c.min() for c in lows) < max(info.min, -2 ** 24) or max(c.max() for c in highs) > min(info.max, 2 ** 24):
        return epi
    new = items[:r] + [(Step("round_int", "int32"), None)]
    new += [(Step(st.op, "int32", st.operand, st.left), c.astype(np.int32)) for st, c in tail]
    new += items[end:]
    return epi.with_items(new)


CLAMPS = ("maximum", "minimum")


def _monotone(items: list[tuple[Step, np.ndarray | None]]) -> bool:
    """Whether the steps are a float map that never decreases (divide / multiply by positive
    constants, round, add / subtract a constant), evaluated as the kernel evaluates it: no
    multiply directly before an add, which LLVM could contract into an FMA."""
    for k, (step, const) in enumerate(items):
        if not step.dtype.startswith("float") or step.op == "astype":
            return False
        if step.op in ("divide", "multiply"):
            if (step.left and step.op == "divide") or const is None or not np.all(const > 0):
                return False
            nxt = items[k + 1][0].op if k + 1 < len(items) else None
            if step.op == "multiply" and nxt in ("add", "subtract"):
                return False
        elif step.op == "subtract" and step.left:
            return False
        elif step.op not in ("round", "add", "subtract"):
            return False
    return True


def _apply(items: list[tuple[Step, np.ndarray | None]], value: np.ndarray) -> np.ndarray:
    """The steps on constants, in float32 as the kernel computes them (IEEE ops, round half to even)."""
    v = value.astype(np.float32)
    for step, const in items:
        v = np.rint(v) if step.op == "round" else _binary(step.op, v, const.astype(np.float32), tir=False)
    return v.astype(np.float32)


def _binary(op: str, a: Any, b: Any, tir: bool) -> Any:
    """``a op b`` for a chain step, on TIR expressions or numpy arrays."""
    import operator

    if op in ("add", "subtract", "multiply"):
        return {"add": operator.add, "subtract": operator.sub, "multiply": operator.mul}[op](a, b)
    if tir:
        from tvm import tirx

        return {"divide": tirx.Div, "maximum": tirx.max, "minimum": tirx.min}[op](a, b)
    return {"divide": np.divide, "maximum": np.maximum, "minimum": np.minimum}[op](a, b)


def _bounds(run: list[tuple[Step, np.ndarray | None]]) -> tuple[np.ndarray | None, np.ndarray | None] | None:
    """(lower, upper) of a run of at most one maximum and one minimum, None if it is not a clamp."""
    ops = [step.op for step, _ in run]
    if len(run) > 2 or len(set(ops)) != len(ops):
        return None
    lo = next((c for step, c in run if step.op == "maximum"), None)
    hi = next((c for step, c in run if step.op == "minimum"), None)
    if lo is not None and hi is not None and np.any(lo > hi):
        return None
    return lo, hi


def merge_clamps(epi: Epilogue) -> Epilogue:
    """The chain with a clamp that precedes a non-decreasing map ``f`` folded into the clamp
    that follows it: ``clamp(f(clamp(x, a, b)), lo, hi) == clamp(f(x), max(f(a), lo), min(f(b), hi))``
    exactly, for any non-decreasing ``f``. The quantizer's ReLU6 before the next layer's
    requantize (divide, round, add the zero point, clamp to 0..255) costs two vector ops per
    value less (a fifth of the chain)."""
    items = epi.items()

    def is_clamp(k: int) -> bool:
        step = items[k][0]
        return step.op in CLAMPS and not step.left and step.dtype.startswith("float")

    i = 0
    while i < len(items):
        if not is_clamp(i):
            i += 1
            continue
        j = i
        while j < len(items) and is_clamp(j):
            j += 1
        k = j
        while k < len(items) and not is_clamp(k) and items[k][0].op != "astype":
            k += 1
        end = k
        while end < len(items) and is_clamp(end):
            end += 1
        first, middle, last = items[i:j], items[j:k], items[k:end]
        b1, b2 = _bounds(first), _bounds(last) if last else None
        if not middle or b1 is None or b2 is None or not _monotone(middle) \
                or any(s.dtype != first[0][0].dtype for s, _ in first + middle + last):
            i = j
            continue
        lo = [v for v in (None if b1[0] is None else _apply(middle, b1[0]), b2[0]) if v is not None]
        hi = [v for v in (None if b1[1] is None else _apply(middle, b1[1]), b2[1]) if v is not None]
        lo_v = np.maximum.reduce(np.broadcast_arrays(*lo)) if lo else None
        hi_v = np.minimum.reduce(np.broadcast_arrays(*hi)) if hi else None
        if lo_v is not None and hi_v is not None and np.any(lo_v > hi_v):
            i = j
            continue
        dtype = first[0][0].dtype
        merged = [(Step(op, dtype, "scalar" if v.size == 1 else "channel"), v.reshape(-1).astype(dtype))
                  for op, v in (("maximum", lo_v), ("minimum", hi_v)) if v is not None]
        items = items[:i] + middle + merged + items[end:]
        i = i + len(middle) + len(merged)
    return epi.with_items(items)


def _step(call: Any, cur: Any, channels: int, channel_axis: int) -> tuple[Step, np.ndarray | None] | None:
    from tvm import relax

    op = op_name(call)
    dtype = dtype_of(call)
    shape, rank = shape_of(cur), len(shape_of(cur) or [])
    if shape is None or shape_of(call) != shape:
        return None
    if op in UNARY and call.args[0].same_as(cur):
        if op == "relax.round" and dtype.startswith("float"):
            return Step("round", dtype), None
        if op == "relax.astype":
            return Step("astype", dtype), None
        return None
    if op not in BINARY or len(call.args) != 2 or dtype != dtype_of(cur):
        return None
    a, b = call.args
    left = b.same_as(cur)
    const = a if left else b
    if not (a.same_as(cur) or left) or not is_const(const):
        return None
    if op == "relax.divide" and not dtype.startswith("float"):
        return None  # integer division rounds in ways this module does not spell out
    operand = _operand(const, channels, channel_axis, rank, dtype)
    if operand is None:
        return None
    return Step(op.split(".", 1)[1], dtype, operand[0], left), operand[1]


def inputs(epilogue: Epilogue, channels: int) -> list[Any]:
    """The kernel's placeholders for the chain's constants, in step order."""
    from tvm import te

    out = []
    for k, step in enumerate(s for s in epilogue.steps if s.operand is not None):
        out.append(te.placeholder((channels if step.operand == "channel" else 1,), step.dtype, name=f"epi{k}"))
    return out


def compute(epilogue: Epilogue, value: Any, oc: Any, tensors: list[Any], cpu: bool = True) -> Any:
    """The chain applied to ``value`` (the int32 result for output channel ``oc``); ``cpu``: the
    kernel is built for an LLVM CPU target (``round`` in the form TVM vectorizes there)."""
    from tvm import tirx

    from .vecmath import round_half_even

    it = iter(tensors)
    for step in epilogue.steps:
        if step.op == "round":
            # relax.round is nearbyint (ties to even); on CPUs as TVM vectorizes it
            value = round_half_even(value) if cpu else tirx.nearbyint(value)
            continue
        if step.op == "round_int":  # float32 -> int32, rounding half to even (integer_tail)
            value = (tirx.call_llvm_pure_intrin("int32", "llvm.lrint", value) if cpu
                     else tirx.nearbyint(value).astype("int32"))
            continue
        if step.op == "astype":
            value = value.astype(step.dtype)
            continue
        t = next(it)
        c = t[oc] if step.operand == "channel" else t[0]
        value = _binary(step.op, *((c, value) if step.left else (value, c)), tir=True)
    return value
