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
            found[head] = Epilogue(tuple(steps), consts, end)
    return found


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


def compute(epilogue: Epilogue, value: Any, oc: Any, tensors: list[Any]) -> Any:
    """The chain applied to ``value`` (the int32 result for output channel ``oc``)."""
    from tvm import tirx

    it = iter(tensors)
    for step in epilogue.steps:
        if step.op == "round":
            value = tirx.nearbyint(value)  # relax.round legalizes to nearbyint (ties to even)
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
