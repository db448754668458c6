"""Ensembles as ONE deployable model: several members combined in a single Relax ``main``.

:func:`combine` puts each member's ``main`` into one IRModule as a private function, calls
them all from a new ``main`` on the same input, combines their first outputs, and inlines the
members (``InlinePrivateFunctions``): the result is an ordinary model with one ``main``, so
one VM call runs every member, and ``compile``/``tune``/``run``/``export`` take it as is.

Combination over axis 1 (classes; per pixel for segmentation):

* ``mean``     - the mean of the members' softmax probabilities;
* ``weighted`` - the same with one weight per member (given, or boosting's member weights);
* ``vote``     - each member's arg-max counts one vote; ties go to the higher mean probability.

Members whose input or output shapes differ are refused, naming the shapes.

:func:`train_members` trains members from a zoo student spec on labelled data: **bagging**
(each member on a bootstrap sample of the data) or **boosting** (SAMME: members trained in
sequence on samples drawn with weights that grow on the samples the previous members got
wrong; each member's weight is ``log((1 - err) / err) + log(K - 1)``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from ..core.errors import TvmedgeError
from ..core.model import ImportedModel
from ..core.progress import Reporter
from .data import Dataset

COMBINE = ("mean", "vote", "weighted")


def combine(members: list[ImportedModel], how: str = "mean", weights: list[float] | None = None) -> ImportedModel:
    """One model running every member on the same input and combining their first outputs."""
    from tvm import relax
    from tvm.relax.utils import copy_with_new_vars

    if how not in COMBINE:
        raise TvmedgeError(f"unknown --combine '{how}' ({', '.join(COMBINE)})")
    if len(members) < 2:
        raise TvmedgeError("an ensemble needs at least two members")
    ins = [[list(s.shape) for s in m.inputs] for m in members]
    outs = [list(m.outputs[0].shape) for m in members]
    for i, m in enumerate(members[1:], 1):
        if outs[i] != outs[0]:
            raise TvmedgeError(f"member {i + 1} ({m.source}) has output shape {outs[i]}, member 1 ({members[0].source}) "
                               f"{outs[0]}: ensemble members must have the same output shape")
        if ins[i] != ins[0] or [s.dtype for s in m.inputs] != [s.dtype for s in members[0].inputs]:
            raise TvmedgeError(f"member {i + 1} ({m.source}) has inputs {ins[i]}, member 1 {ins[0]}: "
                               f"ensemble members must take the same inputs")
    if len(outs[0]) < 2 or outs[0][1] < 2:
        raise TvmedgeError(f"members' output {outs[0]} has no class axis (axis 1) to combine over")
    if how == "weighted":
        if weights is None or len(weights) != len(members):
            raise TvmedgeError(f"--combine weighted needs one weight per member ({len(members)}), "
                               f"got {0 if weights is None else len(weights)}")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise TvmedgeError(f"member weights must be non-negative with a positive sum, got {weights}")
    w = np.asarray(weights if how == "weighted" else [1.0] * len(members), np.float64)
    w = w / w.sum()

    bb = relax.BlockBuilder()
    gvs = []
    for i, m in enumerate(members):
        for gv, func in m.mod.functions_items():
            if gv.name_hint != "main":
                raise TvmedgeError(f"member {i + 1} ({m.source}) holds function {gv.name_hint} besides main "
                                   f"(hand-written kernels): only plain Relax graphs can be combined")
        gvs.append(bb.add_func(copy_with_new_vars(m.mod["main"]).without_attr("global_symbol"), f"member_{i}"))

    spec = members[0].inputs
    params = [relax.Var(s.name, relax.TensorType(s.shape, s.dtype)) for s in spec]
    R = relax.op
    f32 = lambda v: relax.const(np.float32(v))  # noqa: E731
    with bb.function("main", params, attrs={"num_input": len(params)}):
        with bb.dataflow():
            acc = None
            votes = None
            for gv, wi, m in zip(gvs, w, members):
                out = bb.emit(relax.Call(gv, params))
                if len(m.outputs) > 1:
                    out = bb.emit(relax.TupleGetItem(out, 0))
                prob = bb.emit(R.nn.softmax(out, axis=1))
                term = bb.emit(R.multiply(prob, f32(wi)))
                acc = term if acc is None else bb.emit(R.add(acc, term))
                if how == "vote":
                    hit = bb.emit(R.astype(R.equal(out, R.max(out, axis=1, keepdims=True)), "float32"))
                    votes = hit if votes is None else bb.emit(R.add(votes, hit))
            if how == "vote":  # mean probability (< 1) only breaks ties between vote counts
                acc = bb.emit(R.add(votes, R.multiply(acc, f32(0.5))))
            result = bb.emit_output(acc)
        bb.emit_func_output(result)
    new = bb.get()
    new = relax.transform.InlinePrivateFunctions()(new)
    new = relax.transform.DeadCodeElimination(["main"])(new)
    new = relax.transform.CanonicalizeBindings()(relax.transform.Normalize()(new))
    from ..core.model import TensorSpec

    first = members[0]
    return dataclasses.replace(first, mod=new, source=f"ensemble of {len(members)}", format="relax",
                               outputs=[TensorSpec(first.outputs[0].name, outs[0], "float32")],
                               rewrites=[{"rewrite": "ensemble", "combine": how, "members": len(members),
                                          "weights": [round(float(v), 4) for v in w]}])


# ------------------------------------------------------------------ training members
def _train_ce(net: Any, x: np.ndarray, y: np.ndarray, idx_sampler: Any, steps: int, lr: float = 4e-3,
              batch: int = 64, seed: int = 0) -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps))
    net.train()
    for _ in range(steps):
        idx = torch.from_numpy(idx_sampler(batch))
        loss = F.cross_entropy(net(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()


def train_members(spec: str, data: Dataset, n: int, boost: bool = False, steps: int = 300, seed: int = 0,
                  progress: bool | Reporter = True) -> tuple[list[ImportedModel], list[float], dict[str, Any]]:
    """``n`` members of zoo student ``spec`` trained on ``data`` (labelled): bagging, or boosting.
    Returns (members, member weights, report)."""
    import torch

    from .distill import build_student, torch_to_model

    progress = Reporter.of(progress)
    if n < 2:
        raise TvmedgeError(f"--members takes 2 or more, got {n}")
    if data.labels is None:
        raise TvmedgeError("training ensemble members needs labelled data (digits | shapes | FILE.npz with labels)")
    if boost and np.asarray(data.labels).ndim != 1:
        raise TvmedgeError("--boost needs one class label per sample (classification data)")
    name = next(iter(data.samples[0]))
    x = np.concatenate([s[name] for s in data.samples]).astype(np.float32)
    y = np.asarray(data.labels)[: len(x)]
    classes = int(data.num_classes or y.max() + 1)
    rng = np.random.default_rng(seed)
    shape = [1] + list(x.shape[1:])
    members, alphas, rows = [], [], []
    w = np.full(len(x), 1.0 / len(x))
    t0 = time.time()
    for i in range(n):
        net = build_student(spec)
        torch.manual_seed(seed + i)
        for p in net.parameters():  # each member its own initialisation
            if p.dim() > 1:
                torch.nn.init.kaiming_uniform_(p, a=5 ** 0.5)
        if boost:
            probs = w / w.sum()
            sampler = lambda b, p=probs: rng.choice(len(x), b, p=p)  # noqa: E731
        else:
            boot = rng.integers(0, len(x), len(x))  # a bootstrap sample, drawn once per member
            sampler = lambda b, boot=boot: boot[rng.integers(0, len(boot), b)]  # noqa: E731
        _train_ce(net, x, y, sampler, steps, seed=seed + i)
        row: dict[str, Any] = {"member": i + 1}
        if boost:
            with torch.no_grad():
                pred = net(torch.from_numpy(x)).argmax(1).numpy()
            miss = pred != y
            err = float(np.clip((w * miss).sum() / w.sum(), 1e-6, 1 - 1e-6))
            alpha = float(np.log((1 - err) / err) + np.log(classes - 1))
            w = w * np.exp(alpha * miss)
            w = w / w.sum()
            row.update(weighted_train_error=round(err, 5), weight=round(alpha, 4))
            alphas.append(alpha)
        else:
            row["bootstrap_unique"] = int(len(np.unique(boot)))
            alphas.append(1.0)
        members.append(torch_to_model(net, shape, name, "logits", f"{spec}#{i + 1}"))
        rows.append(row)
        progress.line(f"ensemble: member {i + 1}/{n} trained ({'boosting' if boost else 'bagging'})")
    report = {"rewrite": "ensemble-train", "spec": spec, "members": n, "method": "boosting (SAMME)" if boost else "bagging",
              "steps": steps, "train_samples": len(x), "rows": rows, "seconds": round(time.time() - t0, 1)}
    return members, alphas, report
