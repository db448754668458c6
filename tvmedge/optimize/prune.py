"""Structured pruning on the Relax graph: remove whole channels, so every layer really gets smaller.

Why our own pass on Relax rather than ``torch-pruning`` on the torch model: every model
tvmedge handles (ONNX, ``.pt2``, TFLite, ``.relax`` from another rewrite) is a Relax graph,
while a torch module exists only for zoo models and PyTorch sources; the distillation
fine-tune (:mod:`.finetune`) already trains Relax graphs; and the pass composes with the
other rewrites (prune, then low-rank or int8) in one :class:`~.passes.Pipeline`.

**Dependency analysis.** Every channel of every rank-2 (``[N, F]``) or rank-4 (NCHW) tensor
in ``main`` is an *atom*; channels that must be removed together are merged (union-find):

* a conv2d (groups 1) / matmul with a constant weight makes new atoms (its output channels,
  the *producers*); its input channels are consumed by slicing the weight;
* a depthwise conv passes its input's atoms through (its filters go with them);
* ``add``/``multiply``/... of two tensors merge their atoms pairwise (residual adds), with a
  per-channel constant they pass them through (the constant is sliced); ReLU, clip, pooling,
  resize, pad, astype pass them through; ``concat`` on channels concatenates the lists;
* a flatten (``[N, C, H, W] -> [N, C*H*W]``) repeats each atom H*W times, so the next dense
  layer loses the rows of a removed channel;
* anything else, and the model's inputs and outputs, pins its atoms (they are never removed).

A *group* is a set of producers linked by merged atoms (e.g. every conv feeding one residual
stream). In each group the channels (merged atom classes) with the lowest importance are
removed: ``ratio`` of them, or, with ``flops_ratio``, one ratio for all groups found by
bisection so that the model's conv/matmul FLOPs reach that fraction. Importance:

* ``l1``: the L1 norm of each producer filter, divided by that producer's mean filter norm
  (comparable across layers), summed over the producers of the channel;
* ``taylor``: |activation x gradient| summed over the calibration batch (first-order Taylor
  estimate of the loss change when the channel is zeroed; loss: cross-entropy on the labels
  when the data has them, else the output energy);
* ``bn-gamma``: needs BatchNorm layers in the graph; imported models have them folded into
  the convolutions, so it is refused with that reason.

A ratio that would leave a group with no channel is refused, naming the layer.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from ..core.errors import TvmedgeError
from ..core.graph import CONV, MATMUL, bindings, dtype_of, is_const, op_name, shape_of
from ..core.model import ImportedModel
from ..core.progress import Reporter
from .data import Dataset
from .int8_graph import _const_eval
from .lowrank import graph_flops

CRITERIA = ("l1", "taylor", "bn-gamma")
PASS_THROUGH = {"relax.nn.relu", "relax.sigmoid", "relax.tanh", "relax.nn.silu", "relax.nn.gelu", "relax.clip",
                "relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d",
                "relax.image.resize2d", "relax.astype", "relax.nn.dropout"}
ELEMWISE = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum"}


class _Atoms:
    """Union-find over channel atoms; ``pinned`` atoms may not be removed."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pinned: set[int] = set()

    def new(self, n: int, pinned: bool = False) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        if pinned:
            self.pinned.update(range(start, start + n))
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def pin(self, atoms: list[int]) -> None:
        self.pinned.update(atoms)

    def is_pinned(self, a: int) -> bool:
        root = self.find(a)
        return root in self._pinned_roots()

    def _pinned_roots(self) -> set[int]:
        return {self.find(p) for p in self.pinned}


@dataclasses.dataclass
class _Producer:
    name: str  # conv2d_0, matmul_1 (tvmedge's layer names)
    var: Any
    weight: np.ndarray  # OIHW or [K, N]
    atoms: list[int]


class _Analysis:
    """The channel atoms of every tensor of ``main`` and the producers that make them."""

    def __init__(self, model: ImportedModel) -> None:
        self.func = model.mod["main"]
        self.binds = bindings(self.func)
        self.defs = {b.var: b.value for b in self.binds}
        self.consts: dict[Any, np.ndarray] = {}
        self.A = _Atoms()
        self.atoms: dict[Any, list[int]] = {}
        self.producers: list[_Producer] = []
        self.pinned_why: list[str] = []
        for p in self.func.params:
            self._track(p, pinned=True)
        counts = {"conv2d": 0, "matmul": 0}
        for b in self.binds:
            op = op_name(b.value)
            if op in (CONV, MATMUL):
                kind = "conv2d" if op == CONV else "matmul"
                self._layer(b, f"{kind}_{counts[kind]}")
                counts[kind] += 1
            else:
                self._binding(b)
        from tvm import relax

        out = self.func.body.body
        for f in (out.fields if isinstance(out, relax.Tuple) else [out]):
            self.A.pin(self.atoms.get(f, []))

    # -------------------------------------------------------- helpers
    def channels(self, e: Any) -> int | None:
        s = shape_of(e)
        return s[1] if s is not None and len(s) in (2, 4) and dtype_of(e) == "float32" else None

    def _track(self, var: Any, pinned: bool = False) -> None:
        c = self.channels(var)
        if c is not None:
            self.atoms[var] = self.A.new(c, pinned)

    def const(self, e: Any) -> np.ndarray | None:
        if is_const(e):
            return e.value.numpy()
        return self.consts.get(e)

    def _pin_args(self, e: Any) -> None:
        from tvm import relax

        for v in relax.analysis.free_vars(e):
            if v in self.atoms:
                self.A.pin(self.atoms[v])

    # -------------------------------------------------------- bindings
    def _layer(self, b: Any, name: str) -> None:
        call, var = b.value, b.var
        x, w = call.args[0], self.const(call.args[1])
        xin = self.atoms.get(x)
        if w is None or xin is None or dtype_of(var) != "float32":
            self._pin_args(call)
            self._track(var, pinned=True)
            return
        if op_name(call) == CONV:
            a = call.attrs
            if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout)) != ("NCHW", "OIHW", "NCHW"):
                self._pin_args(call)
                self._track(var, pinned=True)
                return
            g = int(a.groups)
            if g == 1:
                self.atoms[var] = self.A.new(w.shape[0])
                self.producers.append(_Producer(name, var, w, self.atoms[var]))
            elif g == len(xin) == w.shape[0]:  # depthwise: channels pass through with their filters
                self.atoms[var] = list(xin)
            else:
                self._pin_args(call)
                self._track(var, pinned=True)
        else:
            if w.ndim != 2 or len(shape_of(x) or []) != 2:
                self._pin_args(call)
                self._track(var, pinned=True)
                return
            self.atoms[var] = self.A.new(w.shape[1])
            self.producers.append(_Producer(name, var, w, self.atoms[var]))

    def _binding(self, b: Any) -> None:
        from tvm import relax

        var, e = b.var, b.value
        op = op_name(e)
        if op in ("relax.reshape", "relax.permute_dims", "relax.astype", "relax.dequantize") and not relax.analysis.free_vars(e) \
                or (op in ("relax.reshape", "relax.permute_dims") and all(v in self.consts for v in relax.analysis.free_vars(e))):
            c = _const_eval(e, self.defs)
            if c is not None:
                self.consts[var] = c
                return
        if isinstance(e, relax.Var) and e in self.atoms:
            self.atoms[var] = self.atoms[e]
            return
        if isinstance(e, relax.Tuple):
            return  # consumed by concat (checked there)
        args = list(e.args) if isinstance(e, relax.Call) else []
        if op in PASS_THROUGH and args and args[0] in self.atoms and self.channels(var) == len(self.atoms[args[0]]):
            self.atoms[var] = self.atoms[args[0]]
            return
        if op == "relax.nn.pad" and args[0] in self.atoms:
            pw = [int(v) for v in e.attrs.pad_width]
            if not any(pw[2:4]):
                self.atoms[var] = self.atoms[args[0]]
                return
        if op in ELEMWISE and len(args) == 2:
            tensors = [a for a in args if a in self.atoms]
            consts = [a for a in args if a not in self.atoms and self.const(a) is not None]
            n = self.channels(var)
            if len(tensors) == 2 and all(len(self.atoms[t]) == n for t in tensors) and \
                    len(shape_of(args[0])) == len(shape_of(args[1])):
                for p, q in zip(self.atoms[tensors[0]], self.atoms[tensors[1]]):
                    self.A.union(p, q)
                self.atoms[var] = self.atoms[tensors[0]]
                return
            if len(tensors) == 1 and len(consts) == 1 and len(self.atoms[tensors[0]]) == n:
                self.atoms[var] = self.atoms[tensors[0]]
                return
        if op == "relax.concat" and int(e.attrs.axis) == 1:
            fields = args[0].fields if isinstance(args[0], relax.Tuple) else self.defs[args[0]].fields
            if all(f in self.atoms for f in fields):
                self.atoms[var] = [a for f in fields for a in self.atoms[f]]
                return
        if op == "relax.mean" and args[0] in self.atoms and e.attrs.axis is not None \
                and 1 not in [int(v) for v in e.attrs.axis] and self.channels(var) == len(self.atoms[args[0]]):
            self.atoms[var] = self.atoms[args[0]]
            return
        if op in ("relax.reshape", "relax.flatten") and args[0] in self.atoms:
            s_in, s_out = shape_of(args[0]), shape_of(var)
            if len(s_in) == 4 and s_out == [s_in[0], s_in[1] * s_in[2] * s_in[3]]:
                hw = s_in[2] * s_in[3]
                self.atoms[var] = [a for a in self.atoms[args[0]] for _ in range(hw)]
                return
        self._pin_args(e)
        self._track(var, pinned=True)


# ------------------------------------------------------------------ importance and plan
def _importance(an: _Analysis, criterion: str, model: ImportedModel, calib: Dataset | None) -> dict[int, float]:
    """Importance per atom root (summed over the producers of the merged channel)."""
    score: dict[int, float] = {}
    if criterion == "l1":
        for p in an.producers:
            axes = (1, 2, 3) if p.weight.ndim == 4 else (0,)
            n = np.abs(p.weight).sum(axis=axes)
            n = n / max(float(n.mean()), 1e-12)
            for a, v in zip(p.atoms, n):
                r = an.A.find(a)
                score[r] = score.get(r, 0.0) + float(v)
        return score
    if criterion == "bn-gamma":
        raise TvmedgeError("--criterion bn-gamma: the graph has no BatchNorm layers (imported models have them folded "
                           "into the convolutions); use l1 or taylor")
    if calib is None or not len(calib):
        raise TvmedgeError("--criterion taylor needs calibration data (--calib)")
    import torch
    import torch.nn.functional as F

    from .finetune import RelaxModule

    net = RelaxModule(model.mod, trainable=False)
    name = model.inputs[0].name
    xs = torch.from_numpy(np.concatenate([s[name] for s in calib.samples[:32]]).astype(np.float32))
    env: dict[Any, Any] = {net.inputs[0]: xs.requires_grad_(True)}
    net._ratio = xs.shape[0] // max(1, int(net.inputs[0].ty.shape[0]))
    watched = {p.var for p in an.producers}
    for var, value in net.bindings:
        env[var] = net._eval(value, env)
        if var in watched:
            env[var].retain_grad()
    out = net._eval(net.output, env)
    out = out[0] if isinstance(out, list) else out
    if calib.labels is not None and calib.metric in ("accuracy", "miou"):
        labels = torch.from_numpy(np.asarray(calib.labels[: xs.shape[0]])).long()
        loss = F.cross_entropy(out, labels)
    else:
        loss = out.pow(2).mean()
    loss.backward()
    for p in an.producers:
        act, grad = env[p.var], env[p.var].grad
        dims = tuple(i for i in range(act.dim()) if i != 1)
        t = (act * grad).abs().sum(dim=dims).detach().numpy() if act.dim() == 2 else \
            (act * grad).sum(dim=(2, 3)).abs().sum(dim=0).detach().numpy()
        t = t / max(float(t.mean()), 1e-12)
        for a, v in zip(p.atoms, t):
            r = an.A.find(a)
            score[r] = score.get(r, 0.0) + float(v)
    return score


def _groups(an: _Analysis) -> list[dict[str, Any]]:
    """Producers linked by merged channels, with their prunable channel classes."""
    pinned_roots = an.A._pinned_roots()
    parent = list(range(len(an.producers)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, p in enumerate(an.producers):
        for a in p.atoms:
            r = an.A.find(a)
            if r in owner and find(owner[r]) != find(i):
                parent[find(i)] = find(owner[r])
            owner.setdefault(r, i)
    groups: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(an.producers):
        g = groups.setdefault(find(i), {"layers": [], "roots": []})
        g["layers"].append(p.name)
        for a in p.atoms:
            r = an.A.find(a)
            if r not in pinned_roots and r not in g["roots"]:
                g["roots"].append(r)
    return [g for g in groups.values() if g["roots"]]


def _plan(groups: list[dict[str, Any]], score: dict[int, float], ratio: float) -> set[int]:
    """Atom roots to remove: the ``ratio`` least important channels of each group."""
    removed: set[int] = set()
    for g in groups:
        n = len(g["roots"])
        k = int(round(ratio * n))
        if k >= n:
            raise TvmedgeError(f"prune ratio {ratio:g} would empty layer {g['layers'][0]} ({n} channels"
                               + (f", shared with {', '.join(g['layers'][1:])}" if len(g["layers"]) > 1 else "")
                               + "): use a ratio that keeps at least one channel")
        order = sorted(g["roots"], key=lambda r: score.get(r, 0.0))
        removed.update(order[:k])
    return removed


# ------------------------------------------------------------------ rewrite
def _rewrite(model: ImportedModel, an: _Analysis, removed: set[int]) -> ImportedModel:
    import tvm
    from tvm import relax

    def keep(var: Any) -> np.ndarray | None:
        atoms = an.atoms.get(var)
        if atoms is None:
            return None
        return np.array([an.A.find(a) not in removed for a in atoms])

    def const(v: np.ndarray) -> Any:
        return relax.const(tvm.runtime.tensor(np.ascontiguousarray(v)))

    old_values = {b.var: b.value for b in an.binds}

    @relax.expr_functor.mutator
    class Pruner(relax.PyExprMutator):
        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.current = None

        def visit_var_binding_(self, binding: Any) -> None:
            self.current = binding.var
            super().visit_var_binding_(binding)

        def visit_call_(self, call: Any) -> Any:
            var = self.current
            if var is None or not call.same_as(old_values.get(var)):
                return super().visit_call_(call)
            op = op_name(call)
            # not super(): it would infer the shapes of the old constants against the new inputs
            new = relax.Call(call.op, [self.visit_expr(a) for a in call.args], call.attrs, call.ty_args)
            out_keep = keep(var)
            if op in (CONV, MATMUL):
                w = an.const(call.args[1])
                in_keep = keep(call.args[0])
                if w is None or in_keep is None or out_keep is None:
                    return new
                if op == MATMUL:
                    return relax.op.matmul(new.args[0], const(w[in_keep][:, out_keep]), out_dtype=call.attrs.out_dtype)
                a = call.attrs
                groups = int(a.groups)
                if groups == 1:
                    w2 = w[out_keep][:, in_keep]
                else:  # depthwise
                    w2, groups = w[out_keep], int(out_keep.sum())
                return relax.op.nn.conv2d(new.args[0], const(w2), strides=a.strides, padding=a.padding,
                                          dilation=a.dilation, groups=groups, data_layout=a.data_layout,
                                          kernel_layout=a.kernel_layout, out_layout=a.out_layout,
                                          out_dtype=a.out_dtype)
            if op in ELEMWISE and out_keep is not None and not out_keep.all():
                rank = len(shape_of(var))
                args = list(new.args)
                for i, orig in enumerate(call.args):
                    c = an.const(orig)
                    if orig in an.atoms or c is None:
                        continue
                    axis = 1 - (rank - c.ndim)
                    if axis >= 0 and c.shape[axis] == len(out_keep):
                        args[i] = const(np.compress(out_keep, c, axis=axis))
                return relax.Call(new.op, args, new.attrs, new.ty_args)
            if op in ("relax.reshape", "relax.flatten") and out_keep is not None and call.args[0] in an.atoms:
                return relax.op.reshape(new.args[0], [shape_of(var)[0], int(out_keep.sum())])
            return super().visit_call_(call)

    mod = model.mod
    pr = Pruner(mod)
    gv = mod.get_global_var("main")
    pr.builder_.update_func(gv, pr.visit_expr(mod["main"]))
    new_mod = relax.transform.DeadCodeElimination(["main"])(relax.transform.Normalize()(pr.builder_.get()))
    return dataclasses.replace(model, mod=new_mod, rewrites=list(model.rewrites))


def prune(model: ImportedModel, ratio: float | None = None, flops_ratio: float | None = None,
          criterion: str = "l1", calib: Dataset | None = None,
          progress: bool | Reporter = True) -> tuple[ImportedModel, dict[str, Any]]:
    """Remove ``ratio`` of each dependency group's channels, or reach ``flops_ratio`` of the
    model's conv/matmul FLOPs; returns (smaller model, report with the channels per layer)."""
    progress = Reporter.of(progress)
    if criterion not in CRITERIA:
        raise TvmedgeError(f"unknown pruning criterion '{criterion}' ({', '.join(CRITERIA)})")
    if (ratio is None) == (flops_ratio is None):
        raise TvmedgeError("pruning takes a channel ratio or a FLOP ratio, exactly one")
    t0 = time.time()
    an = _Analysis(model)
    groups = _groups(an)
    if not groups:
        raise TvmedgeError("nothing to prune: no conv2d/matmul output channel can be removed "
                           "(every channel reaches an output or an operation the pruner does not follow)")
    score = _importance(an, criterion, model, calib)
    before = graph_flops(model.mod)
    if ratio is not None:
        new = _rewrite(model, an, _plan(groups, score, ratio))
    else:
        lo, hi, best = 0.0, 0.95, None
        for _ in range(10):  # the largest ratio not over-pruning is not needed: the smallest one reaching the goal
            mid = (lo + hi) / 2
            try:
                cand = _rewrite(model, an, _plan(groups, score, mid))
            except TvmedgeError:
                hi = mid
                continue
            if graph_flops(cand.mod) <= flops_ratio * before:
                best, ratio, hi = cand, mid, mid
            else:
                lo = mid
        if best is None:
            raise TvmedgeError(f"--prune-flops {flops_ratio:g}: no channel ratio reaches that fraction of the FLOPs "
                               f"(the pinned channels alone cost more)")
        new = best
    after = graph_flops(new.mod)
    report: dict[str, Any] = {"rewrite": "prune", "criterion": criterion, "ratio": round(ratio, 4),
                              "flops_ratio": flops_ratio, "model_flops_before": before, "model_flops_after": after,
                              "groups": [{"layers": g["layers"], "channels": len(g["roots"])} for g in groups],
                              "layers": [], "skipped": []}
    after_shapes = _producer_shapes(new)
    for p in an.producers:
        out_after = after_shapes.get(p.name)
        w = p.weight
        c_in, c_out = (w.shape[1], w.shape[0]) if w.ndim == 4 else (w.shape[0], w.shape[1])
        if out_after is None:
            continue
        report["layers"].append({"layer": p.name, "weight": "x".join(map(str, w.shape)),
                                 "in_channels": f"{c_in} -> {out_after[0]}", "out_channels": f"{c_out} -> {out_after[1]}",
                                 "removed_out": c_out - out_after[1]})
    pinned_prod = [p.name for p in an.producers if all(an.A.is_pinned(a) for a in p.atoms)]
    report["skipped"] = [{"layer": n, "reason": "its channels reach the model output or an operation the pruner "
                                                "does not follow"} for n in pinned_prod]
    report["seconds"] = round(time.time() - t0, 2)
    progress.line(f"prune: FLOPs {before / 1e6:.2f} M -> {after / 1e6:.2f} M ({criterion}, ratio {ratio:.3g})")
    return new, report


def _producer_shapes(model: ImportedModel) -> dict[str, tuple[int, int]]:
    """(input channels, output channels) of every conv2d (groups 1) / matmul, by layer name."""
    out: dict[str, tuple[int, int]] = {}
    counts = {"conv2d": 0, "matmul": 0}
    for b in bindings(model.mod["main"]):
        op = op_name(b.value)
        if op not in (CONV, MATMUL):
            continue
        kind = "conv2d" if op == CONV else "matmul"
        name = f"{kind}_{counts[kind]}"
        counts[kind] += 1
        w = shape_of(b.value.args[1])
        if w is None:
            continue
        out[name] = (w[1] * int(b.value.attrs.groups), w[0]) if op == CONV else (w[0], w[1])
    return out
