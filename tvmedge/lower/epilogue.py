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
            found[head] = merge_clamps(Epilogue(tuple(steps), consts, end))
    return found


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
        c = None if const is None else const.astype(np.float32)
        if step.op == "round":
            v = np.rint(v)
        elif step.op == "add":
            v = v + c
        elif step.op == "subtract":
            v = v - c
        elif step.op == "multiply":
            v = v * c
        else:
            v = v / c
    return v.astype(np.float32)


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
    items, it = [], iter(epi.consts)
    for step in epi.steps:
        items.append((step, next(it) if step.operand is not None else None))

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
    steps = tuple(step for step, _ in items)
    if steps == epi.steps:
        return epi
    return Epilogue(steps, [c for _, c in items if c is not None], epi.end)


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
        if step.op == "astype":
            value = value.astype(step.dtype)
            continue
        t = next(it)
        c = t[oc] if step.operand == "channel" else t[0]
        a, b = (c, value) if step.left else (value, c)
        if step.op == "add":
            value = a + b
        elif step.op == "subtract":
            value = a - b
        elif step.op == "multiply":
            value = a * b
        elif step.op == "divide":
            value = tirx.Div(a, b)
        elif step.op == "maximum":
            value = tirx.max(a, b)
        else:
            value = tirx.min(a, b)
    return value
