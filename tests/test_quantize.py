"""int8 post-training quantization: real int8 ops, accuracy, size, fallback, QDQ import, CLI.

Everything runs on ``digits-cnn`` (and one tiny synthetic model for the unsupported-layer
and zero-point paths), checked against the float model or ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tvmedge import zoo
from tvmedge.core.errors import TvmedgeError
from tvmedge.core.schema import validate
from tvmedge.core.model import save_relax
from tvmedge.frontend import load_model
from tvmedge.optimize import data as data_mod
from tvmedge.optimize.check import HostRunner, outputs_over, score
from tvmedge.optimize.data import Dataset
from tvmedge.optimize.observers import (KLObserver, MinMaxObserver, PercentileObserver, PerChannelWeightObserver,
                                        qparams_from_range)
from tvmedge.optimize.int8_graph import const_bytes, fold_qdq, has_qdq, int8_ops
from tvmedge.optimize.quantize import quantize
from conftest import run_cli


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, check=True, in_process=True)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    path = zoo.export("digits-cnn", d / "digits.onnx")
    model = load_model(path)
    calib = data_mod.load("digits", model, "calib", limit=128)
    evals = data_mod.load("digits", model, "eval")
    return {"dir": d, "path": path, "model": model, "calib": calib, "eval": evals}


def assert_real_int8(model, n: int) -> None:
    ops = int8_ops(model)
    assert len(ops) == n, ops
    for op in ops:
        assert op["data"] == "uint8" and op["weight"] == "int8" and op["out"] == "int32", op
    text = model.mod.script(show_meta=False)
    assert text.count('out_dtype="int32"') >= n
    assert 'R.nn.conv2d' in text and 'R.matmul' in text


# ---------------------------------------------------------------- observers
def test_observers():
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=100_000)).astype(np.float32)
    x[-1] = 100.0  # one outlier, in the last batch
    mm, pc, kl = MinMaxObserver(), PercentileObserver(), KLObserver()
    for chunk in np.split(x, 4):  # several batches: the histograms must re-bin as the range grows
        for o in (mm, pc, kl):
            o.observe(chunk)
    assert mm.range()[1] == 100.0 and 0.0 <= mm.range()[0] < 1e-3
    assert 3.0 < pc.range()[1] < 6.0  # the outlier is clipped
    assert 1.5 < kl.range()[1] < 100.0
    for o in (mm, pc, kl):
        scale, zp = o.calculate_qparams()
        assert scale > 0 and zp == 0  # non-negative tensor: zero point 0
    scale, zp = qparams_from_range(-1.0, 3.0)
    assert abs(scale - 4 / 255) < 1e-9 and zp == 64
    w = rng.normal(size=(8, 4, 3, 3)) * np.arange(1, 9)[:, None, None, None]
    q, s = PerChannelWeightObserver(0).quantize(w)
    assert q.dtype == np.int8 and s.shape == (8,) and np.abs(q).max() == 127
    assert np.abs(q * s[:, None, None, None] - w).max() <= s.max() / 2 + 1e-9
    with pytest.raises(ValueError):
        MinMaxObserver().calculate_qparams()


# ---------------------------------------------------------------- digits-cnn
@pytest.mark.parametrize("observer", ["minmax", "percentile", "kl"])
def test_quantize_digits(digits, observer):
    q, rep = quantize(digits["model"], digits["calib"], observer=observer, eval_data=digits["eval"], progress=False)
    assert_real_int8(q, 5)  # 3 conv2d + 2 dense
    assert rep["rewrite"] == "int8" and len(rep["layers"]) == 5 and not rep["skipped"]
    assert all(layer["weight_bits"] == 8 and layer["act_scale"] > 0 and layer["bias_folded"] for layer in rep["layers"])
    assert rep["before"] > 0.98
    assert rep["drop_points"] <= 1.0, rep
    # The same numbers again, measured independently on the held-out digits.
    after = score(outputs_over(HostRunner(q), digits["eval"]), digits["eval"])
    assert abs(after - rep["after"]) < 1e-9
    # int8 weights: about 4x fewer weight bytes, and a much smaller .relax file.
    assert rep["bytes_weights_before"] / rep["bytes_weights_after"] > 3.5
    f_path = save_relax(digits["model"], digits["dir"] / f"float-{observer}.relax")
    q_path = save_relax(q, digits["dir"] / f"int8-{observer}.relax")
    assert os.path.getsize(f_path) / os.path.getsize(q_path) > 3.0
    reloaded = load_model(q_path)
    assert_real_int8(reloaded, 5)


def test_max_drop_fallback(digits):
    """A tiny max_drop on a hard set (noisy digits labelled by the float model) forces float layers."""
    model = digits["model"]
    from tvmedge.zoo.digits import load_split

    _, _, xte, _ = load_split()
    rng = np.random.default_rng(0)
    x = np.clip(xte[:200] + rng.normal(0, 0.35, xte[:200].shape), 0, 1).astype(np.float32)
    ref = HostRunner(model)
    labels = np.array([ref({"input": x[i:i + 1]})[0].argmax() for i in range(len(x))])
    np.savez(digits["dir"] / "hard.npz", input=x, labels=labels)
    hard = data_mod.load(digits["dir"] / "hard.npz", model, "eval")
    q, rep = quantize(model, digits["calib"], observer="minmax", eval_data=hard, max_drop=0.0, progress=False)
    assert rep["before"] == 1.0 and rep["drop_points_all_int8"] > 0, rep
    assert rep["fallback_float"], rep
    names = {f["layer"] for f in rep["fallback_float"]}
    assert names <= {"conv2d_1", "conv2d_2", "conv2d_3", "matmul_1", "matmul_2"}
    assert len(rep["sensitivity"]) == 5
    assert rep["drop_points"] <= 0.0 and rep["max_drop_met"]
    assert not names & {layer["layer"] for layer in rep["layers"]}
    assert len(int8_ops(q)) == 5 - len(names)


def test_bad_calibration(digits, tmp_path):
    model = digits["model"]
    np.savez(tmp_path / "empty.npz", input=np.zeros((0, 1, 8, 8), np.float32))
    with pytest.raises(TvmedgeError, match="empty"):
        data_mod.load(tmp_path / "empty.npz", model, "calib")
    np.savez(tmp_path / "shape.npz", input=np.zeros((16, 1, 4, 4), np.float32))
    with pytest.raises(TvmedgeError, match="shape"):
        data_mod.load(tmp_path / "shape.npz", model, "calib")
    with pytest.raises(TvmedgeError, match="empty"):
        quantize(model, Dataset(name="none", samples=[]), progress=False)
    bad = Dataset(name="bad", samples=[{"input": np.zeros((1, 1, 4, 4), np.float32)}])
    with pytest.raises(TvmedgeError, match="shape"):
        quantize(model, bad, progress=False)


class _Mixed(torch.nn.Module):
    """Signed input (zero point != 0) into a padded conv, a depthwise conv, a dense layer and a
    matmul of two activations (no constant weight: must be skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = torch.nn.Linear(8 * 6 * 6, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(torch.relu(self.conv(x)))
        z = self.fc(y.flatten(1)).reshape(1, 4, 4)
        return torch.matmul(z, z.transpose(1, 2))


def test_unsupported_and_zero_point(tmp_path):
    torch.manual_seed(0)
    net = _Mixed().eval()
    path = tmp_path / "mixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(net, (torch.randn(1, 3, 6, 6),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["out"])
    model = load_model(path)
    rng = np.random.default_rng(1)
    calib = Dataset(name="randn", samples=[{"input": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)} for _ in range(32)])
    q, rep = quantize(model, calib, observer="minmax", progress=False)
    assert [s["layer"] for s in rep["skipped"]] == ["matmul_2"]
    assert "not a constant" in rep["skipped"][0]["reason"]
    assert {layer["layer"] for layer in rep["layers"]} == {"conv2d_1", "conv2d_2", "matmul_1"}
    first = next(layer for layer in rep["layers"] if layer["layer"] == "conv2d_1")
    assert first["act_zero_point"] not in (0, 255)  # signed input: real zero point, padded with it
    assert "R.nn.pad" in q.mod.script(show_meta=False)
    ref, new = outputs_over(HostRunner(model), calib)[0], outputs_over(HostRunner(q), calib)[0]
    assert np.abs(new - ref).max() / np.abs(ref).max() < 0.05


# ---------------------------------------------------------------- QDQ models from ONNX Runtime
def test_qdq_import_matches_onnxruntime(digits):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(digits["calib"].samples[:64])

        def get_next(self):
            return next(self.it, None)

    qdq_path = digits["dir"] / "digits-qdq.onnx"
    quantize_static(str(digits["path"]), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    imported = load_model(qdq_path, fold_quantized=False)
    assert has_qdq(imported) and not int8_ops(imported)  # the importer leaves float convs
    # by default the import folds them (compile, tune and run see the int8 graph)
    default = load_model(qdq_path)
    assert default.rewrites and default.rewrites[-1]["rewrite"] == "qdq-fold"
    assert_real_int8(default, 5)
    folded, rep = fold_qdq(imported)
    assert_real_int8(folded, 5)
    assert len(rep["layers"]) == 5 and not rep["skipped"]
    assert const_bytes(folded) <= const_bytes(imported)
    sess = ort.InferenceSession(str(qdq_path), providers=["CPUExecutionProvider"])
    evals = digits["eval"]
    want = np.concatenate([sess.run(None, s)[0] for s in evals.samples])
    got = outputs_over(HostRunner(folded), evals)[0]
    # The output is itself quantized (uint8 logits): ORT and TVM may round an accumulator that
    # sits on a rounding boundary differently, so allow one output quantization step.
    step = float(rep_output_step(imported))
    assert np.abs(got - want).max() <= step * 1.01 + 1e-6
    assert (np.abs(got - want) > 1e-5).mean() < 0.02
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    assert abs(score([got], evals) - score([want], evals)) <= 0.005


def rep_output_step(model) -> float:
    """The scale of the last dequantize (the model's output quantization step)."""
    from tvmedge.optimize.int8_graph import _const_eval
    from tvmedge.core.graph import bindings as _bindings, op_name as _op

    binds = _bindings(model.mod["main"])
    defs = {b.var: b.value for b in binds}
    last = [b.value for b in binds if _op(b.value) == "relax.dequantize"][-1]
    return float(_const_eval(last.args[1], defs).reshape(-1)[0])


# ---------------------------------------------------------------- CLI
def test_cli_optimize_compile_run(digits):
    d = digits["dir"]
    out = d / "cli.relax"
    proc = cli("optimize", str(digits["path"]), "-o", str(out), "--quantize", "int8", "--calib", "digits",
               "--eval", "digits", "--json")
    report = json.loads(proc.stdout)
    validate(report)
    rep = report["rewrites"][-1]
    assert rep["rewrite"] == "int8" and len(rep["layers"]) == 5
    assert report["check"]["drop_points"] <= 1.0
    assert report["bytes_after"] < report["bytes_before"] / 3
    assert_real_int8(load_model(out), 5)
    tar = d / "cli.tar"
    proc = cli("compile", str(out), "-o", str(tar))
    from tvmedge.lower.int8_dot import isa_for
    from tvmedge.target import resolve

    isa = isa_for(resolve("host").target)
    if isa is not None:  # the compile output says which int8 kernels the layers got
        assert "int8 kernels: 3 conv2d + 2 matmul on" in proc.stdout and isa.rewrite in proc.stdout
    run = json.loads(cli("run", str(tar), "--json", "--repeat", "3").stdout)
    assert run["outputs"][0]["shape"] == [1, 10]


def test_rewrites_name_layers_alike(digits):
    """int8, low-rank and compact name a layer the same (conv2d_1 is the first conv2d)."""
    from tvmedge.optimize.int8_graph import find_layers
    from tvmedge.optimize.lowrank import factorize

    int8_names = [layer.name for layer in find_layers(digits["model"])]
    assert int8_names[0] == "conv2d_1" and "matmul_1" in int8_names
    _, rep = factorize(digits["model"], energy=0.9)
    lowrank = [r["layer"] for r in rep["layers"]] + [s["layer"] for s in rep["skipped"]]
    assert lowrank and set(lowrank) <= set(int8_names)
    assert "conv2d_1" in [s["layer"] for s in rep["skipped"]]  # the same first layer (1 input channel) by name


# ---------------------------------------------------------------- requantize chain in the kernels
def _run_chain(epi, x: np.ndarray) -> np.ndarray:
    """The chain on float32 values ``x`` [N, O], op by op as the kernels compute it."""
    v, consts = x.astype(np.float32), iter(epi.consts)
    for step in epi.steps:
        if step.op == "round":
            v = np.rint(v)
            continue
        if step.op == "round_int":
            v = np.rint(v).astype(np.int32)
            continue
        if step.op == "astype":
            v = v.astype(step.dtype)
            continue
        c = next(consts).astype(step.dtype)
        v = {"add": np.add, "subtract": np.subtract, "multiply": np.multiply, "divide": np.divide,
             "maximum": np.maximum, "minimum": np.minimum}[step.op](v, c).astype(step.dtype)
    return v


def test_relu6_clamp_merges_into_the_requantize_clamp_exactly():
    """ReLU6 before the next layer's requantize (divide, round, add the zero point, clamp to
    0..255) folds into the final clamp: two ops fewer, the same uint8 for every input."""
    from tvmedge.lower.epilogue import Epilogue, Step, merge_clamps

    f = "float32"
    s = lambda v: np.array([v], f)  # noqa: E731
    scale = np.array([0.5, 1.0, 3.0], f)
    for zp in (0.0, 3.0, 128.0):
        steps = (Step("multiply", f, "channel"), Step("maximum", f, "scalar"), Step("minimum", f, "scalar"),
                 Step("divide", f, "scalar"), Step("round", f), Step("add", f, "scalar"),
                 Step("minimum", f, "scalar"), Step("maximum", f, "scalar"), Step("astype", "uint8"))
        epi = Epilogue(steps, [scale, s(0), s(6), s(0.0213), s(zp), s(255), s(0)])
        merged = merge_clamps(epi)
        assert [st.op for st in merged.steps] == ["multiply", "divide", "round", "add", "maximum", "minimum", "astype"]
        x = np.concatenate([np.linspace(-20, 20, 400001, dtype=f), s(0), s(6), s(-0.0), s(2), s(12), s(1e9), s(-1e9)])
        x = np.repeat(x[:, None], 3, axis=1)
        np.testing.assert_array_equal(_run_chain(merged, x), _run_chain(epi, x))


def test_clamp_merge_keeps_chains_it_cannot_prove():
    """A map that can decrease (a negative divisor), or a multiply right before an add (which
    LLVM may fuse into one FMA), leaves the chain as it is."""
    from tvmedge.lower.epilogue import Epilogue, Step, merge_clamps

    f = "float32"
    s = lambda v: np.array([v], f)  # noqa: E731
    for mid, consts in (([Step("divide", f, "scalar"), Step("round", f)], [s(-0.5)]),
                        ([Step("multiply", f, "scalar"), Step("add", f, "scalar")], [s(2.0), s(1.0)])):
        steps = (Step("maximum", f, "scalar"), Step("minimum", f, "scalar"), *mid,
                 Step("maximum", f, "scalar"), Step("minimum", f, "scalar"))
        epi = Epilogue(steps, [s(0), s(6), *consts, s(0), s(255)])
        assert merge_clamps(epi) is epi


def test_requantize_tail_in_integers_is_exact_within_its_bounds():
    """round / add zero point / clamp / astype run as int32 ops after one rounding conversion
    when the accumulator's bounds keep the value within +-2^30; the same uint8 for every
    accumulator value in those bounds. A scale that could overflow int32 keeps the float tail."""
    from tvmedge.lower.epilogue import Epilogue, Step, integer_tail

    f = "float32"
    s = lambda v: np.array([v], f)  # noqa: E731
    steps = (Step("astype", f), Step("multiply", f, "channel"), Step("divide", f, "scalar"), Step("round", f),
             Step("add", f, "scalar"), Step("maximum", f, "scalar"), Step("minimum", f, "scalar"),
             Step("astype", "uint8"))
    scale = np.array([1e-3, 3.7e-4], f)
    epi = Epilogue(steps, [scale, s(0.0213), s(128), s(0), s(255)])
    lo, hi = np.array([-3e6, -1e5]), np.array([3e6, 2e5])
    tail = integer_tail(epi, lo, hi)
    assert [st.op for st in tail.steps] == ["astype", "multiply", "divide", "round_int", "add", "maximum", "minimum",
                                            "astype"]
    acc = np.stack([np.arange(-3_000_000, 3_000_000, 7), np.arange(-3_000_000, 3_000_000, 7) // 20], 1)
    acc[:, 1] = np.clip(acc[:, 1], -100_000, 200_000)
    np.testing.assert_array_equal(_run_chain(tail, acc.astype(np.int32)), _run_chain(epi, acc.astype(np.int32)))
    assert integer_tail(epi, lo * 1e6, hi * 1e6) is epi  # the value could leave int32
