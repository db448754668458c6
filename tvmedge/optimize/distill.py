"""Teacher -> student distillation: train a smaller model to imitate a larger one.

The teacher is any model tvmedge imports (its Relax graph run in PyTorch by
:class:`~tvmedge.optimize.finetune.RelaxModule`, once over the training inputs: its logits and
its *hint* feature, the input of its last conv/dense layer, are kept). The student is

* a zoo student spec (:data:`STUDENTS`, e.g. ``shapes-seg/half``: the same U-Net at half
  width), trained from scratch in PyTorch with
  ``loss = T^2 * KL(teacher || student at temperature T) + alpha * CE(labels)``
  ``+ beta * ||adapter(student hint) - teacher hint||^2 / ||teacher hint||^2``
  where the adapter (a 1x1 conv or a linear map, dropped after training) maps the student's
  hint feature (the input of its last conv/linear) to the teacher's channels (FitNets-style
  hints); the student is then exported to ONNX and imported like any model; or
* a model file (ONNX, ``.pt2``, ``.relax``) with the teacher's input and output shapes: its
  weights are trained on the teacher's outputs by :func:`~tvmedge.optimize.finetune.finetune`
  (logits distillation; no hints, its layers need not correspond to the teacher's).

A student that does not fit the teacher's input or output shapes is refused with both shapes.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import TvmedgeError, first_line
from ..core.graph import CONV, MATMUL
from ..core.model import ImportedModel
from ..core.progress import Reporter
from .data import Dataset


class SmallDigitsCNN(nn.Module):
    """The digits CNN's layout (three 3x3 convs, two dense layers) at width ``w`` (zoo: 32)."""

    def __init__(self, w: int = 16) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w)
        self.conv3, self.bn3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w)
        self.fc1 = nn.Linear(2 * w * 2 * 2, 4 * w)
        self.fc2 = nn.Linear(4 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _shapes(widths: tuple[int, int, int, int]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from ..zoo.shapes import ShapesSeg

        return ShapesSeg(widths)
    return build


# spec -> (builder, description)
STUDENTS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "digits-cnn/half": (lambda: SmallDigitsCNN(16), "digits CNN at half width (16-32-32 convs, 64 hidden)"),
    "digits-cnn/quarter": (lambda: SmallDigitsCNN(8), "digits CNN at quarter width (8-16-16 convs, 32 hidden)"),
    "shapes-seg/half": (_shapes((8, 16, 32, 48)), "shapes U-Net at half width (8-16-32-48)"),
    "shapes-seg/quarter": (_shapes((4, 8, 16, 24)), "shapes U-Net at quarter width (4-8-16-24)"),
}


def build_student(spec: str) -> nn.Module:
    if spec not in STUDENTS:
        raise TvmedgeError(f"unknown student spec '{spec}' (zoo students: {', '.join(STUDENTS)}; or a model file)")
    torch.manual_seed(0)
    return STUDENTS[spec][0]()


def check_fit(student: nn.Module, spec: str, teacher: ImportedModel) -> None:
    """Refuse a student whose input or output shape differs from the teacher's."""
    shape_in, shape_out = list(teacher.inputs[0].shape), list(teacher.outputs[0].shape)
    student.eval()
    try:
        with torch.no_grad():
            out = student(torch.zeros(shape_in))
    except Exception as e:
        raise TvmedgeError(f"student {spec} does not fit the teacher's input {shape_in}: {first_line(e)}") from None
    if list(out.shape) != shape_out:
        raise TvmedgeError(f"student {spec} gives output {list(out.shape)} for input {shape_in}; "
                           f"the teacher's output is {shape_out}")


def _last_layer_input(net: Any) -> Any:
    """The Relax var feeding the last conv2d/matmul of ``net`` (the teacher's hint)."""
    last = None
    for var, value in net.bindings:
        if getattr(getattr(value, "op", None), "name", None) in (CONV, MATMUL):
            last = value.args[0]
    return last


def teacher_outputs(teacher: ImportedModel, x: np.ndarray, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's first output and hint feature for every sample of ``x`` (PyTorch, no grad)."""
    from .finetune import RelaxModule

    net = RelaxModule(teacher.mod, trainable=False).eval()
    hint_var = _last_layer_input(net)
    static = int(net.inputs[0].ty.shape[0])
    logits, hints = [], []
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            xb = torch.from_numpy(x[i:i + chunk])
            n = xb.shape[0] - xb.shape[0] % static
            if n == 0:
                break
            net._ratio = n // static
            env: dict[Any, Any] = {net.inputs[0]: xb[:n]}
            for var, value in net.bindings:
                env[var] = net._eval(value, env)
            out = net._eval(net.output, env)
            logits.append((out[0] if isinstance(out, list) else out).numpy())
            hints.append(env[hint_var].numpy() if hint_var is not None else np.zeros((n, 1), np.float32))
    return np.concatenate(logits), np.concatenate(hints)


def _hint_module(student: nn.Module) -> nn.Module:
    """The student's last conv/linear: its input is the student's hint."""
    last = None
    for m in student.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            last = m
    if last is None:
        raise TvmedgeError("distill: the student has no conv or linear layer")
    return last


def train_student(student: nn.Module, x: np.ndarray, t_logits: np.ndarray, t_hint: np.ndarray,
                  labels: np.ndarray | None, steps: int, progress: Reporter, batch: int = 32, lr: float = 3e-3,
                  temperature: float = 2.0, alpha: float = 0.5, beta: float = 1.0, seed: int = 0,
                  weights: np.ndarray | None = None) -> dict[str, Any]:
    """Train ``student`` on the teacher's logits and hints (and labels, if any); ``weights``
    (one per sample) sets how often each sample is drawn (boosting)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    captured: dict[str, torch.Tensor] = {}
    hook = _hint_module(student).register_forward_hook(lambda m, inp, out: captured.__setitem__("hint", inp[0]))
    xt, tl, th = torch.from_numpy(x), torch.from_numpy(t_logits), torch.from_numpy(t_hint)
    yt = torch.from_numpy(np.asarray(labels)).long() if labels is not None else None
    student.train()
    with torch.no_grad():
        student(xt[:2])
    sh = captured["hint"]
    adapter: nn.Module = (nn.Conv2d(sh.shape[1], th.shape[1], 1) if sh.dim() == 4 and th.dim() == 4
                          else nn.Linear(sh[0].numel(), th[0].numel()))
    params = list(student.parameters()) + list(adapter.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps))
    probs = torch.from_numpy(weights / weights.sum()).double() if weights is not None else None
    t0, losses = time.time(), []
    batch = min(batch, len(xt))
    for step in range(steps):
        idx = (torch.multinomial(probs, batch, replacement=True, generator=gen) if probs is not None
               else torch.randint(0, len(xt), (batch,), generator=gen))
        out = student(xt[idx])
        hs = captured["hint"]
        ref = tl[idx]
        kd = F.kl_div(F.log_softmax(out / temperature, 1), F.log_softmax(ref / temperature, 1), log_target=True,
                      reduction="none").sum(1).mean() * temperature ** 2
        loss = kd
        if yt is not None and alpha:
            loss = loss + alpha * F.cross_entropy(out, yt[idx])
        if beta:
            if isinstance(adapter, nn.Conv2d):
                ha = adapter(hs)
                if ha.shape[2:] != th.shape[2:]:
                    ha = F.adaptive_avg_pool2d(ha, th.shape[2:])
            else:
                ha = adapter(hs.flatten(1)).reshape(th[idx].shape)
            target = th[idx]
            loss = loss + beta * F.mse_loss(ha, target) / target.pow(2).mean().clamp_min(1e-8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            progress.line(f"distill: step {step + 1}/{steps} loss {np.mean(losses[-20:]):.4g}")
    hook.remove()
    student.eval()
    return {"steps": steps, "batch": batch, "lr": lr, "temperature": temperature, "alpha_ce": alpha if yt is not None else 0,
            "beta_hint": beta, "loss_first": float(np.mean(losses[:10])) if losses else None,
            "loss_last": float(np.mean(losses[-20:])) if losses else None, "seconds": round(time.time() - t0, 1)}


def torch_to_model(module: nn.Module, shape: list[int], input_name: str, output_name: str,
                   source: str) -> ImportedModel:
    """``module`` exported to ONNX and imported."""
    from ..frontend import load_model

    module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "student.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.zeros(shape),), str(path), dynamo=False,
                              opset_version=17, input_names=[input_name], output_names=[output_name])
        model = load_model(path)
    model.source = source
    return model


def params_of(model: ImportedModel) -> int:
    from .int8_graph import const_bytes

    return const_bytes(model) // 4


def compare(models: dict[str, ImportedModel], data: Dataset | None, repeat: int = 50) -> dict[str, dict[str, Any]]:
    """Task metric on ``data`` and latency (median ms, default schedules, this host, runs
    interleaved so that a loaded machine slows all alike) of each model."""
    from .check import HostRunner, outputs_over, score

    runners = {k: HostRunner(m) for k, m in models.items()}
    out: dict[str, dict[str, Any]] = {k: {"params": params_of(m)} for k, m in models.items()}
    if data is not None:
        for k, r in runners.items():
            out[k]["metric"] = score(outputs_over(r, data), data)
    x = data.samples[0] if data is not None else None
    if x is None:
        from ..core.model import random_inputs

        m0 = next(iter(models.values()))
        x = random_inputs([s.to_dict() for s in m0.inputs])
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeat):
        for k, r in runners.items():
            t = time.perf_counter()
            r(x)
            times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        out[k]["latency_ms"] = round(1e3 * float(np.median(v)), 4)
    return out


def distill(teacher: ImportedModel, student: str, train: Dataset, steps: int = 1000, eval_data: Dataset | None = None,
            progress: bool | Reporter = True, **kw: Any) -> tuple[ImportedModel, dict[str, Any]]:
    """Train ``student`` (a zoo spec, or a model file) from ``teacher`` on ``train``'s inputs;
    returns (student model, report with both models' metric and latency)."""
    progress = Reporter.of(progress)
    if len(teacher.inputs) != 1:
        raise TvmedgeError("distill: only single-input teachers are supported")
    if steps < 1:
        raise TvmedgeError(f"--steps takes 1 or more steps, got {steps}")
    t0 = time.time()
    name = teacher.inputs[0].name
    x = np.concatenate([s[name] for s in train.samples]).astype(np.float32)
    report: dict[str, Any] = {"rewrite": "distill", "student": student, "train_samples": len(x)}
    if student in STUDENTS or not os.path.exists(student):
        net = build_student(student)
        check_fit(net, student, teacher)
        progress.line(f"distill: teacher outputs on {len(x)} samples")
        t_logits, t_hint = teacher_outputs(teacher, x)
        x = x[: len(t_logits)]
        labels = train.labels[: len(x)] if train.labels is not None and train.metric in ("accuracy", "miou") else None
        report["training"] = train_student(net, x, t_logits, t_hint, labels, steps, progress, **kw)
        report["loss"] = "KL(T) + CE(labels) + hint MSE" if labels is not None else "KL(T) + hint MSE"
        model = torch_to_model(net, list(teacher.inputs[0].shape), teacher.inputs[0].name, teacher.outputs[0].name,
                               f"distill:{student}")
    else:
        from ..frontend import load_model
        from .finetune import finetune

        model = load_model(student)
        if [list(s.shape) for s in model.inputs] != [list(s.shape) for s in teacher.inputs] or \
                [list(s.shape) for s in model.outputs] != [list(s.shape) for s in teacher.outputs]:
            raise TvmedgeError(f"student {os.path.basename(student)} has inputs {[s.shape for s in model.inputs]} and "
                               f"outputs {[s.shape for s in model.outputs]}; the teacher's are "
                               f"{[s.shape for s in teacher.inputs]} and {[s.shape for s in teacher.outputs]}")
        model, ft = finetune(teacher, model, steps=steps, data=train, progress=progress)
        report["training"] = ft
        report["loss"] = ft["loss"]
    model.rewrites = [{"rewrite": "distill", "teacher": os.path.basename(teacher.source), "student": student}]
    report["compare"] = compare({"teacher": teacher, "student": model}, eval_data)
    report["metric"] = eval_data.metric if eval_data is not None else None
    report["seconds"] = round(time.time() - t0, 1)
    report["layers"], report["skipped"] = [], []
    return model, report
