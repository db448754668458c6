"""Fine-tune a rewritten model by distillation from the original one.

The Relax ``main`` of each model is interpreted by :class:`RelaxModule`, a small PyTorch
module that walks the dataflow bindings in order and runs each call with the equivalent
torch operation; every float constant of the rewritten model becomes an ``nn.Parameter``.
The student (rewritten model) is trained to reproduce the teacher's (original model's)
outputs on the calibration inputs and on perturbed copies of them (noise, one-pixel shifts,
mixes of two samples): the teacher is evaluated on the same perturbed inputs, so no labels
are needed and any perturbation is valid. The trained values are written back as the
constants of the Relax graph.

Graphs with an operation the interpreter does not know raise a :class:`TvmedgeError`
naming it. ``call_tir`` PrimFuncs that importers write for elementwise ops (ONNX Clip, i.e.
ReLU6 in MobileNets) are first mapped back to Relax ops
(:func:`tvmedge.lower.normalize.without_clip_prim_funcs`), so fine-tuning
goes through them; an unknown one still fails, naming it.

:class:`RelaxModule` is only for training: TVM's runtime computes no gradients. Every
inference (checks, calibration, ``tvmedge run``) goes through :class:`tvmedge.core.vm.ModelVM`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import TvmedgeError
from ..core.model import ImportedModel
from ..core.progress import Reporter
from ..core.graph import ints
from .data import Dataset


def _prim(e: Any) -> float:
    """The number held by a Relax PrimValue (clip bounds and the like)."""
    v = getattr(e, "value", e)
    v = getattr(v, "value", v)
    return float(v)


def _pad_nchw(x: torch.Tensor, padding: list[int], value: float = 0.0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Relax 2-D padding is (top, left, bottom, right): pad explicitly when asymmetric."""
    if len(padding) == 2:
        return x, (padding[0], padding[1])
    top, left, bottom, right = padding
    if top == bottom and left == right:
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom), value=value), (0, 0)


def _conv2d(args: list[Any], a: Any) -> torch.Tensor:
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
        raise TvmedgeError(f"finetune: conv2d layout {a.data_layout}/{a.kernel_layout} is not supported")
    x, pad = _pad_nchw(args[0], ints(a.padding))
    return F.conv2d(x, args[1], None, ints(a.strides), pad, ints(a.dilation), int(a.groups))


def _pool(kind: str) -> Callable[[list[Any], Any], torch.Tensor]:
    def run(args: list[Any], a: Any) -> torch.Tensor:
        if str(a.layout) != "NCHW":
            raise TvmedgeError(f"finetune: {kind} layout {a.layout} is not supported")
        fill = float("-inf") if kind == "max" else 0.0
        x, pad = _pad_nchw(args[0], ints(a.padding), fill)
        if kind == "max":
            return F.max_pool2d(x, ints(a.pool_size), ints(a.strides), pad, ints(a.dilation), bool(a.ceil_mode))
        return F.avg_pool2d(x, ints(a.pool_size), ints(a.strides), pad, bool(a.ceil_mode), bool(a.count_include_pad))
    return run


def _adaptive_avg(args: list[Any], a: Any) -> torch.Tensor:
    size = ints(a.output_size) if a.output_size is not None else list(args[0].shape[2:])
    return F.adaptive_avg_pool2d(args[0], size)


def _resize2d(args: list[Any], a: Any, call: Any) -> torch.Tensor:
    size = [int(v) for v in call.args[1].values]
    method, ctm = str(a.method), str(a.coordinate_transformation_mode)
    if str(a.layout) != "NCHW":
        raise TvmedgeError(f"finetune: resize2d layout {a.layout} is not supported")
    if method == "nearest_neighbor" and ctm == "asymmetric" and str(a.rounding_method) in ("floor", ""):
        return F.interpolate(args[0], size=size, mode="nearest")
    if method == "linear" and ctm in ("half_pixel", "align_corners"):
        return F.interpolate(args[0], size=size, mode="bilinear", align_corners=ctm == "align_corners")
    raise TvmedgeError(f"finetune: resize2d {method}/{ctm} is not supported")


def _reshape(args: list[Any], a: Any, call: Any, ratio: int = 1) -> torch.Tensor:
    """Graphs are imported with a static batch; the interpreter runs ``ratio`` times that
    many samples at once, so a reshape's leading dimension scales with it."""
    x = args[0]
    shape = [int(v) for v in call.args[1].values]
    if ratio != 1 and shape and int(np.prod(shape)) * ratio == x.numel():
        shape = [shape[0] * ratio] + shape[1:]
    return x.reshape(shape)


def _permute(args: list[Any], a: Any) -> torch.Tensor:
    axes = ints(a.axes) if a.axes is not None else list(range(args[0].dim()))[::-1]
    return args[0].permute(axes)


def _reduce(fn: Callable) -> Callable[[list[Any], Any], torch.Tensor]:
    def run(args: list[Any], a: Any) -> torch.Tensor:
        axes = ints(a.axis) if a.axis is not None else list(range(args[0].dim()))
        return fn(args[0], dim=axes, keepdim=bool(a.keepdims))
    return run


# op name -> f(args, attrs) or f(args, attrs, call)
OPS: dict[str, Callable[..., torch.Tensor]] = {
    "relax.nn.conv2d": _conv2d,
    "relax.matmul": lambda args, a: torch.matmul(args[0], args[1]),
    "relax.add": lambda args, a: args[0] + args[1],
    "relax.subtract": lambda args, a: args[0] - args[1],
    "relax.multiply": lambda args, a: args[0] * args[1],
    "relax.divide": lambda args, a: args[0] / args[1],
    "relax.nn.relu": lambda args, a: F.relu(args[0]),
    "relax.sigmoid": lambda args, a: torch.sigmoid(args[0]),
    "relax.tanh": lambda args, a: torch.tanh(args[0]),
    "relax.nn.silu": lambda args, a: F.silu(args[0]),
    "relax.nn.gelu": lambda args, a: F.gelu(args[0]),
    "relax.nn.softmax": lambda args, a: F.softmax(args[0], dim=int(a.axis)),
    "relax.clip": lambda args, a: torch.clamp(args[0], args[1], args[2]),
    "relax.isnan": lambda args, a: torch.isnan(args[0]),
    "relax.maximum": lambda args, a: torch.maximum(args[0], args[1].to(args[0].dtype)),
    "relax.minimum": lambda args, a: torch.minimum(args[0], args[1].to(args[0].dtype)),
    "relax.where": lambda args, a: torch.where(args[0], args[1], args[2]),
    "relax.call_tir": None,  # RelaxModule._call_tir: the PrimFunc itself, compiled for this host
    "relax.nn.max_pool2d": _pool("max"),
    "relax.nn.avg_pool2d": _pool("avg"),
    "relax.nn.adaptive_avg_pool2d": _adaptive_avg,
    "relax.mean": _reduce(torch.mean),
    "relax.sum": _reduce(torch.sum),
    "relax.concat": lambda args, a: torch.cat(list(args[0]), dim=int(a.axis)),
    "relax.permute_dims": _permute,
    "relax.flatten": lambda args, a: args[0].flatten(1) if args[0].dim() > 1 else args[0],
    "relax.image.resize2d": _resize2d,
    "relax.reshape": _reshape,
}


class RelaxModule(nn.Module):
    """``main`` of a Relax module as a torch module (float constants as parameters)."""

    def __init__(self, mod: Any, trainable: bool = True) -> None:
        super().__init__()
        import tvm
        from tvm import relax

        self._relax, self._tvm = relax, tvm
        self._mod, self._prim_funcs = mod, {}
        func = mod["main"]
        self.inputs = list(func.params)
        body = func.body
        if not isinstance(body, relax.SeqExpr):
            raise TvmedgeError("finetune: main has no binding blocks")
        self.bindings = [(b.var, b.value) for block in body.blocks for b in block.bindings]
        self.output = body.body
        self._ratio = 1
        self.weights = nn.ParameterList()
        self.const_index: dict[Any, int] = {}
        for _, value in self.bindings:
            self._check(value)
        for p in self.weights:
            p.requires_grad_(trainable)

    def _check(self, e: Any) -> None:
        """Register the constants under ``e`` and fail early on unknown operations."""
        relax, tvm = self._relax, self._tvm
        if isinstance(e, tvm.ir.Constant):
            if e not in self.const_index:
                arr = e.value.numpy()
                self.const_index[e] = len(self.weights)
                self.weights.append(nn.Parameter(torch.from_numpy(arr.copy()),
                                                 requires_grad=arr.dtype == np.float32))
        elif isinstance(e, relax.Call):
            name = getattr(e.op, "name", None)
            if name not in OPS:
                raise TvmedgeError(f"finetune: operation {name or e.op} is not supported by the "
                                   f"distillation interpreter (known: {', '.join(sorted(OPS))})")
            for arg in e.args:
                self._check(arg)
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                self._check(f)

    def _eval(self, e: Any, env: dict[Any, Any]) -> Any:
        relax, tvm = self._relax, self._tvm
        if isinstance(e, relax.Var):
            return env[e]
        if isinstance(e, tvm.ir.Constant):
            return self.weights[self.const_index[e]]
        if isinstance(e, relax.Tuple):
            return [self._eval(f, env) for f in e.fields]
        if isinstance(e, relax.TupleGetItem):
            return self._eval(e.tuple_value, env)[int(e.index)]
        if isinstance(e, relax.ShapeExpr):
            return [int(v) for v in e.values]
        if isinstance(e, relax.Call):
            name = e.op.name
            if name == "relax.call_tir":
                return self._call_tir(e, self._eval(e.args[1], env))
            args = [self._eval(a, env) if not _is_prim(a) else _prim(a) for a in e.args]
            fn = OPS[name]
            if name == "relax.reshape":
                return fn(args, e.attrs, e, self._ratio)
            if name == "relax.image.resize2d":
                return fn(args, e.attrs, e)
            return fn(args, e.attrs)
        raise TvmedgeError(f"finetune: expression {type(e).__name__} is not supported by the interpreter")

    def _call_tir(self, call: Any, inputs: Any) -> torch.Tensor:
        """Run a ``call_tir`` (what importers emit for some elementwise ops, e.g. ONNX Clip with
        tensor bounds) with TVM on this host, sample by sample (its shapes are the static
        batch's). No gradient flows through it: fine-tuning a graph with one fails clearly."""
        tvm = self._tvm
        gv = call.args[0]
        inputs = inputs if isinstance(inputs, list) else [inputs]
        if torch.is_grad_enabled() and any(t.requires_grad for t in self.weights):
            raise TvmedgeError(f"finetune: {gv.name_hint} (a call_tir) cannot be differentiated")
        if gv.name_hint not in self._prim_funcs:
            prim = tvm.IRModule({"main": self._mod[gv].with_attr("global_symbol", "main")})
            self._prim_funcs[gv.name_hint] = tvm.compile(prim, target=tvm.target.Target({"kind": "llvm"}))["main"]
        fn = self._prim_funcs[gv.name_hint]
        out_ty = call.ty_args[0] if call.ty_args else call.ty
        shape, dtype = [int(v) for v in out_ty.shape], str(out_ty.dtype)
        # one static batch at a time; scalars (0-d) go whole to every call
        split = [t.detach().tensor_split(self._ratio) if t.dim() else [t.detach()] * self._ratio for t in inputs]
        outs = []
        for part in zip(*split):
            res = tvm.runtime.tensor(np.empty(shape, dtype))
            # .copy(): C-contiguous and, unlike np.ascontiguousarray, keeps 0-d scalars 0-d
            fn(*[tvm.runtime.tensor(p.numpy().copy()) for p in part], res)
            outs.append(torch.from_numpy(res.numpy()))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def forward(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        static = int(self.inputs[0].ty.shape[0]) if xs and xs[0].dim() else 1
        self._ratio = xs[0].shape[0] // static if xs and xs[0].dim() and static else 1
        env: dict[Any, Any] = dict(zip(self.inputs, xs))
        for var, value in self.bindings:
            env[var] = self._eval(value, env)
        out = self._eval(self.output, env)
        return out if isinstance(out, list) else [out]

    def write_back(self, mod: Any) -> Any:
        """``mod`` with each constant of ``main`` replaced by its trained value."""
        from tvm.relax.expr_functor import PyExprMutator, mutator

        relax, tvm = self._relax, self._tvm
        values = {c: self.weights[i].detach().numpy().astype(c.value.numpy().dtype)
                  for c, i in self.const_index.items()}

        def new_const(c: Any) -> Any:
            return relax.const(tvm.runtime.tensor(np.ascontiguousarray(values[c])))

        @mutator
        class WriteBack(PyExprMutator):
            def visit_call_(self, call: Any) -> Any:
                new = super().visit_call_(call)
                if not any(isinstance(a, tvm.ir.Constant) and a in values for a in new.args):
                    return new
                args = [new_const(a) if isinstance(a, tvm.ir.Constant) and a in values else a for a in new.args]
                return relax.Call(new.op, args, new.attrs, new.ty_args)

        wb = WriteBack(mod)
        gv = mod.get_global_var("main")
        wb.builder_.update_func(gv, wb.visit_expr(mod["main"]))
        return wb.builder_.get()


def capture_inputs(model: ImportedModel, data: Dataset, ops: tuple[str, ...],
                   max_samples: int = 16) -> dict[str, list[np.ndarray]]:
    """First argument of every call to each op in ``ops`` in ``main`` (binding order), with
    ``model`` run on the first ``max_samples`` samples of ``data`` as one batch."""
    captured: dict[str, list[np.ndarray]] = {op: [] for op in ops}
    saved = {op: OPS[op] for op in ops}

    def recorder(op: str) -> Callable[..., torch.Tensor]:
        def run(args: list[Any], *rest: Any) -> torch.Tensor:
            captured[op].append(args[0].detach().numpy())
            return saved[op](args, *rest)
        return run

    net = RelaxModule(model.mod, trainable=False)
    name = model.inputs[0].name
    x = torch.from_numpy(np.concatenate([s[name] for s in data.samples[:max_samples]]).astype(np.float32))
    OPS.update({op: recorder(op) for op in ops})
    try:
        with torch.no_grad():
            net(x)
    finally:
        OPS.update(saved)
    return captured


def _is_prim(e: Any) -> bool:
    return type(e).__name__ == "PrimValue"


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Perturbed copies: noise, one-pixel shifts (images), mixes of two samples."""
    b = x.shape[0]
    scale = x.std().clamp_min(1e-3)
    out = x + 0.05 * scale * torch.randn(x.shape, generator=gen)
    if x.dim() == 4:
        dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
        out = torch.roll(out, shifts=(dy, dx), dims=(2, 3))
    lam = torch.rand((b,) + (1,) * (x.dim() - 1), generator=gen) * 0.3
    perm = torch.randperm(b, generator=gen)
    mixed = (1 - lam) * out + lam * out[perm]
    keep = torch.rand(b, generator=gen) < 0.5  # half the batch stays unmixed
    return torch.where(keep.view((b,) + (1,) * (x.dim() - 1)), out, mixed)


def finetune(original: ImportedModel, model: ImportedModel, steps: int, data: Dataset | None,
             progress: bool | Reporter = True, batch: int = 32, lr: float = 1e-3, seed: int = 0,
             temperature: float | None = None) -> tuple[ImportedModel, dict[str, Any]]:
    """Train the constants of ``model`` for ``steps`` steps to match ``original``'s outputs
    on ``data`` (calibration inputs, plus perturbed copies); returns (new model, report).

    The loss is the MSE of each output relative to the teacher's output power; where the
    first output holds class scores (``data.metric`` is accuracy or mIoU: classes on axis
    1), the KL divergence between the teacher's and the student's softened class
    distributions (``temperature``, default 2) is added to it: the classic distillation
    loss, which weighs the decisions rather than the logits' scale. The model is scored on
    a fixed probe batch ten times during training and the best weights are kept, so the
    result is never worse on it than the model it starts from."""
    progress = Reporter.of(progress)
    if data is None or not len(data):
        raise TvmedgeError("finetune needs calibration data (--calib) to distil on")
    if len(model.inputs) != 1:
        raise TvmedgeError("finetune: only single-input models are supported")
    name = model.inputs[0].name
    if model.inputs[0].dtype != "float32":
        raise TvmedgeError(f"finetune: input dtype {model.inputs[0].dtype} (only float32)")
    t0 = time.time()
    torch.manual_seed(seed)
    from ..lower.normalize import without_clip_prim_funcs

    model = replace(model, mod=without_clip_prim_funcs(model.mod))  # trains through ONNX Clip's PrimFuncs
    teacher = RelaxModule(original.mod, trainable=False).eval()
    student = RelaxModule(model.mod, trainable=True).train()
    x_all = torch.from_numpy(np.concatenate([s[name] for s in data.samples]).astype(np.float32))
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in student.weights if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    batch = min(batch, len(x_all))

    classes = data.metric in ("accuracy", "miou")
    temp = temperature or 2.0

    def distill_loss(xb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = teacher(xb)
        out = student(xb)
        # per output, MSE relative to the teacher's output power: scale-free across models
        loss = sum(F.mse_loss(o, r) / r.pow(2).mean().clamp_min(1e-8) for o, r in zip(out, ref)) / len(ref)
        if classes and out[0].dim() >= 2 and out[0].shape[1] > 1:
            kl = F.kl_div(F.log_softmax(out[0] / temp, dim=1), F.log_softmax(ref[0] / temp, dim=1),
                          log_target=True, reduction="none").sum(1).mean()
            loss = loss + temp * temp * kl
        return loss

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    with torch.no_grad():
        probe = x_all[: min(len(x_all), 64)]
        before = float(distill_loss(probe))
    best, best_step, best_weights = before, 0, snapshot()
    every = max(1, steps // 10)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        xb = x_all[idx]
        if step % 2:
            xb = _augment(xb, gen)
        loss = distill_loss(xb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            with torch.no_grad():
                now = float(distill_loss(probe))
            if now < best:
                best, best_step, best_weights = now, step + 1, snapshot()
            progress.line(f"finetune: step {step + 1}/{steps} distillation loss {np.mean(losses[-10:]):.4g} "
                          f"(probe {now:.4g})")
    with torch.no_grad():
        for p, w in zip(params, best_weights):
            p.copy_(w)
    new_mod = student.write_back(model.mod)
    report = {"rewrite": "finetune", "steps": steps, "batch": batch, "lr": lr,
              "loss": f"relative MSE + KL (T={temp:g})" if classes else "relative MSE",
              "trainable_params": int(sum(p.numel() for p in params)),
              "distill_loss_before": before, "distill_loss_after": best, "kept_step": best_step,
              "seconds": round(time.time() - t0, 1), "layers": [], "skipped": []}
    return replace(model, mod=new_mod, rewrites=list(model.rewrites)), report
