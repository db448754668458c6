"""The three instruction queues and their dependency tokens, shared by the functional
simulator (:mod:`tvmedge.vta.sim`) and the timing model (:mod:`tvmedge.vta.timing`).

A program is split, in order, into the load, compute and store queues
(:func:`tvmedge.vta.isa.queue_of`). A queue's head may issue once every token it pops is
there; what it pushes appears when it completes. Tokens on each of the four edges
(load->compute, compute->load, compute->store, store->compute) match first-in first-out,
so every instruction's earliest start is fixed by the program alone.

:func:`issue_order` gives the order in which a queue machine may execute the program.
Without durations (the functional simulator) it runs the load queue as far ahead as the
tokens let it, then the store queue, and compute last: the most eager order the tokens
allow, so a missing token shows up as a wrong result or a scratchpad clash instead of
passing by luck. With durations (the timing model) each instruction starts as soon as its
queue is free and its tokens have arrived.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np

from ..core.errors import TvmedgeError
from .isa import (FINISH, POP_NEXT, POP_PREV, PUSH_NEXT, PUSH_PREV, Q_COMPUTE, Q_LOAD, Q_STORE, QUEUE_NAMES,
                  describe, queue_of)


class ProgramError(TvmedgeError):
    """An instruction stream the accelerator cannot run (bad field, out of bounds, deadlock)."""


def _edges(q: int) -> tuple[str | None, str | None, str | None, str | None]:
    """(pop_prev, pop_next, push_prev, push_next) token edges of queue ``q``."""
    if q == Q_LOAD:
        return None, "c2l", None, "l2c"
    if q == Q_COMPUTE:
        return "l2c", "s2c", "c2l", "c2s"
    return "c2s", None, "s2c", None


def issue_order(prog: np.ndarray, durations: Callable[[int], float] | None = None
                ) -> list[tuple[int, float, float]]:
    """``(instruction index, start, end)`` in an order the queues and tokens allow.

    Raises :class:`ProgramError` on a deadlock (a pop no push will ever satisfy), a flag that
    names a queue that does not exist, or instructions after FINISH."""
    prog = np.asarray(prog)
    if prog.ndim != 2 or prog.shape[0] == 0:
        raise ProgramError("empty or malformed instruction stream")
    finish = [i for i in range(len(prog)) if int(prog[i, 0]) == FINISH]
    if not finish:
        raise ProgramError("instruction stream has no FINISH")
    if finish[0] != len(prog) - 1:
        raise ProgramError(f"instruction {finish[0]} is FINISH but {len(prog) - 1 - finish[0]} instructions follow it")
    queues: list[deque[int]] = [deque(), deque(), deque()]
    for i in range(len(prog)):
        q = queue_of(prog[i])
        flags = int(prog[i, 1])
        pops_prev, pops_next, pushes_prev, pushes_next = _edges(q)
        for bit, edge in ((POP_PREV, pops_prev), (POP_NEXT, pops_next), (PUSH_PREV, pushes_prev), (PUSH_NEXT, pushes_next)):
            if flags & bit and edge is None:
                raise ProgramError(f"instruction {i} ({describe(prog[i])}) on the {QUEUE_NAMES[q]} queue "
                                   "uses a dependency flag towards a queue that does not exist")
        queues[q].append(i)
    tokens: dict[str, deque[float]] = {e: deque() for e in ("l2c", "c2l", "c2s", "s2c")}
    free = [0.0, 0.0, 0.0]
    order: list[tuple[int, float, float]] = []
    priority = (Q_LOAD, Q_STORE, Q_COMPUTE)
    while any(queues):
        best = None
        for q in priority:
            if not queues[q]:
                continue
            i = queues[q][0]
            flags = int(prog[i, 1])
            pops_prev, pops_next, _, _ = _edges(q)
            need = [e for bit, e in ((POP_PREV, pops_prev), (POP_NEXT, pops_next)) if flags & bit]
            if any(not tokens[e] for e in need):
                continue
            start = max([free[q]] + [tokens[e][0] for e in need])
            if durations is None:
                best = (q, i, need, start)
                break
            if best is None or start < best[3]:
                best = (q, i, need, start)
        if best is None:
            heads = ", ".join(f"{QUEUE_NAMES[q]}: #{queues[q][0]} {describe(prog[queues[q][0]])}"
                              for q in range(3) if queues[q])
            raise ProgramError(f"instruction stream deadlocks (each queue head waits for a token never pushed): {heads}")
        q, i, need, start = best
        queues[q].popleft()
        for e in need:
            tokens[e].popleft()
        end = start + (durations(i) if durations else 0.0)
        free[q] = end
        flags = int(prog[i, 1])
        _, _, push_prev, push_next = _edges(q)
        if flags & PUSH_PREV:
            tokens[push_prev].append(end)
        if flags & PUSH_NEXT:
            tokens[push_next].append(end)
        order.append((i, start, end))
    return order
