"""Low-rank factorization, compact filters and distillation fine-tune on real models.

* a synthetic model whose weights are exactly low-rank: the factorized graph must give the
  same outputs (this checks strides, padding and the Tucker/SVD wiring), grouped convs skipped;
* ``digits-cnn`` (trained): factorized IR, FLOPs as reported, accuracy before/after and
  after a short fine-tune;
* ``shapes-seg`` (trained): compact filters fitted on calibration data, mIoU drop bounded;
* the CLI (``optimize --lowrank``, ``optimize --compact``, then ``compile`` the .relax).
"""

from __future__ import annotations

import json
import re
import subprocess
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from tvmedge import zoo
from tvmedge.core.errors import TvmedgeError
from tvmedge.core.schema import validate
from tvmedge.frontend import load_model
from tvmedge.optimize import data as data_mod
from tvmedge.core.metrics import errors
from tvmedge.optimize.check import HostRunner, check, outputs_over
from tvmedge.optimize.compact import compact
from tvmedge.optimize.finetune import RelaxModule, finetune
from tvmedge.optimize.lowrank import factorize, graph_flops
from conftest import run_cli


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, check=True, in_process=True)


def count(model, op: str) -> int:
    return len(re.findall(rf"R\.{re.escape(op)}\(", model.mod.script(show_meta=False)))


def largest_const(model) -> int:
    import tvm
    from tvm import relax

    sizes = []
    relax.analysis.post_order_visit(model.mod["main"], lambda e: sizes.append(e.value.numpy().size)
                                    if isinstance(e, tvm.ir.Constant) and hasattr(e.value, "numpy") else None)
    return max(sizes)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("lr")
    path = zoo.export("digits-cnn", d / "digits.onnx")
    model = load_model(path)
    return {"dir": d, "path": path, "model": model, "calib": data_mod.load("digits", model, "calib"),
            "eval": data_mod.load("digits", model, "eval")}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("seg")
    path = zoo.export("shapes-seg", d / "shapes.onnx")
    model = load_model(path)
    return {"dir": d, "path": path, "model": model, "calib": data_mod.load("shapes", model, "calib", limit=32),
            "eval": data_mod.load("shapes", model, "eval", limit=64)}


class LowRankNet(nn.Module):
    """Weights of exact (small) rank: factorization at energy ~1 must be lossless."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = nn.Conv2d(3, 48, 3, padding=1)
        self.c2 = nn.Conv2d(48, 64, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.pw = nn.Conv2d(64, 96, 1)
        self.fc = nn.Linear(96, 80)
        with torch.no_grad():
            # c2: Tucker ranks (in 12, out 16); pw: rank 8; fc: rank 6
            core = torch.randn(16, 12, 3, 3, generator=g)
            self.c2.weight.copy_(torch.einsum("rskl,or,is->oikl", core, torch.randn(64, 16, generator=g),
                                              torch.randn(48, 12, generator=g)) * 0.05)
            self.pw.weight.copy_((torch.randn(96, 8, generator=g) @ torch.randn(8, 64, generator=g))[:, :, None, None] * 0.1)
            self.fc.weight.copy_(torch.randn(80, 6, generator=g) @ torch.randn(6, 96, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.pw(self.dw(torch.relu(self.c2(x)))))
        return self.fc(x.mean((2, 3)))


def test_lowrank_exact_on_lowrank_weights(tmp_path):
    path = tmp_path / "lr.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LowRankNet().eval(), (torch.randn(1, 3, 16, 16),), str(path), dynamo=False,
                          input_names=["input"], output_names=["out"])
    model = load_model(path)
    new, rep = factorize(model, energy=0.9999)
    layers = {row["layer"]: row for row in rep["layers"]}
    assert layers["conv2d_2"]["rank"] == "12->16" and layers["conv2d_2"]["structure"] == "tucker2"
    assert layers["conv2d_4"]["rank"] == 8 and layers["matmul_1"]["rank"] == 6
    assert all(row["weight_rel_error"] < 1e-4 and row["flops_after"] < row["flops_before"] for row in rep["layers"])
    skipped = {s["layer"]: s["reason"] for s in rep["skipped"]}
    assert "groups=64" in skipped["conv2d_3"] and "conv2d_1" in skipped  # depthwise; 3-channel input gains nothing
    assert count(new, "nn.conv2d") == count(model, "nn.conv2d") + 3 and count(new, "matmul") == 2
    data = data_mod.Dataset("r", [{"input": np.random.default_rng(i).normal(size=(1, 3, 16, 16)).astype("float32")}
                                  for i in range(4)])
    err = errors(outputs_over(HostRunner(model), data), outputs_over(HostRunner(new), data))
    assert err["max_rel"] < 1e-4, err
    assert rep["model_flops_after"] == graph_flops(new.mod) < graph_flops(model.mod)
    with pytest.raises(TvmedgeError):
        factorize(model, energy=0.9, flops_ratio=0.5)


def test_layer_models_compute_the_layer(tmp_path):
    """The single-layer models latency-aware low rank times: the dense one is the layer itself,
    the factorized one at the weights' exact ranks gives the same outputs."""
    import tvm
    from tvm import relax

    from tvmedge.optimize.lowrank import _make_mutator, layer_models
    from tvmedge.target import resolve

    path = tmp_path / "lr.onnx"
    net = LowRankNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, input_names=["input"])
    model = load_model(path)
    survey: dict = {}
    _make_mutator(survey, None, None, {"layers": [], "skipped": []})(model.mod).visit_expr(model.mod["main"])
    x = torch.randn(1, 48, 16, 16)
    for name, ranks, ref in (("conv2d_2", (16, 12), net.c2(x) - net.c2.bias[None, :, None, None]),
                             ("matmul_1", (6, 0), None)):
        lay = survey[name]
        dense, factored = layer_models(lay, ranks)
        assert dense.inputs[0].shape == lay.in_shape and count(factored, "nn.conv2d" if ref is not None else "matmul") \
            == (3 if ref is not None else 2)
        xin = x.numpy() if ref is not None else np.random.default_rng(0).normal(size=lay.in_shape).astype("float32")
        outs = [relax.VirtualMachine(tvm.compile(m.mod, target=resolve("host").target), tvm.cpu())["main"](
            tvm.runtime.tensor(xin)).numpy() for m in (dense, factored)]
        if ref is not None:
            np.testing.assert_allclose(outs[0], ref.detach().numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-3, atol=1e-3)


def test_lowrank_latency_aware_on_a_local_server(digits):
    """Every planned layer is timed dense and factorized on a real local RPC server; only those
    measured faster (by MIN_MEASURED_SPEEDUP) are rewritten, the others are skipped with the times."""
    from tvmedge.tune.layer_timing import LayerTimer
    from tvmedge.optimize.lowrank import MIN_MEASURED_SPEEDUP
    from tvmedge.target import resolve
    from tvmedge.tune.pool import device_pool

    host = resolve("host")
    with device_pool(host, log=lambda *a: None, threads=1) as pool:
        timer = LayerTimer(host, pool, repeat=5, rounds=1)
        new, rep = factorize(digits["model"], energy=0.9, timer=timer)
        timer.close()
    assert rep["latency_aware"] == {"device": "host", "kind": "hardware", "tuning_db": None}
    measured = {m["layer"]: m for m in rep["measured"]}
    assert sorted(measured) == ["conv2d_2", "conv2d_3", "matmul_1", "matmul_2"]  # the plan at energy 0.9
    for m in measured.values():
        assert m["dense_ms"] > 0 and m["factored_ms"] > 0 and m["predicted_speedup"] > 1.1
        assert m["kept"] == (m["measured_speedup"] >= MIN_MEASURED_SPEEDUP)
    assert [r["layer"] for r in rep["layers"]] == [n for n, m in measured.items() if m["kept"]]
    skipped = {s["layer"]: s["reason"] for s in rep["skipped"]}
    assert all("ms dense" in skipped[n] for n, m in measured.items() if not m["kept"])
    assert count(new, "nn.conv2d") == count(digits["model"], "nn.conv2d") + 2 * sum(
        measured[n]["kept"] for n in ("conv2d_2", "conv2d_3"))


@pytest.mark.slow
def test_cli_lowrank_measure(digits, tmp_path):
    r = run_cli("optimize", str(digits["path"]), "-o", str(tmp_path / "x.relax"), "--lowrank-measure", "host",
                "--quantize", "int8", "--calib", "digits", in_process=True)
    assert r.returncode != 0 and "--lowrank-measure" in r.stderr and "--lowrank" in r.stderr
    out = cli("optimize", str(digits["path"]), "-o", str(tmp_path / "lr.relax"), "--lowrank", "0.9",
              "--lowrank-measure", "host", "--json")
    rep = json.loads(out.stdout)["rewrites"][0]
    assert rep["latency_aware"]["device"] == "host" and len(rep["measured"]) == 4
    assert (tmp_path / "lr.relax").exists()


def test_lowrank_digits_and_finetune(digits):
    model, calib, evals = digits["model"], digits["calib"], digits["eval"]
    new, rep = factorize(model, energy=0.9)
    # conv2d_2/3 -> Tucker-2, both dense layers -> SVD; conv2d_1 (1 input channel) would save < 10 %
    assert [r["layer"] for r in rep["layers"]] == ["conv2d_2", "conv2d_3", "matmul_1", "matmul_2"]
    assert [s["layer"] for s in rep["skipped"]] == ["conv2d_1"]
    assert count(new, "nn.conv2d") > count(model, "nn.conv2d") and count(new, "matmul") == 4
    assert largest_const(new) < largest_const(model)
    saved = sum(r["flops_before"] - r["flops_after"] for r in rep["layers"])
    assert rep["model_flops_after"] == graph_flops(new.mod) == graph_flops(model.mod) - saved
    assert rep["model_flops_after"] < 0.8 * rep["model_flops_before"]
    post = check(model, new, calib, evals)
    assert post["before"] > 0.99
    # the torch interpreter used by fine-tuning reproduces the compiled model
    x = np.concatenate([s["input"] for s in calib.samples[:16]])
    ref = outputs_over(HostRunner(new), calib, limit=16)[0]
    assert np.abs(RelaxModule(new.mod)(torch.from_numpy(x))[0].detach().numpy() - ref).max() < 1e-3
    tuned, ft = finetune(model, new, steps=100, data=calib, progress=False, lr=3e-3)
    assert ft["distill_loss_after"] < ft["distill_loss_before"] and ft["kept_step"] > 0
    assert graph_flops(tuned.mod) == graph_flops(new.mod)  # same structure, new weights
    after = check(model, tuned, calib, evals)
    print(f"digits lowrank 0.9: acc {post['before']:.4f} -> {post['after']:.4f} post-training, "
          f"{after['after']:.4f} after fine-tune; FLOPs {rep['model_flops_before']} -> {rep['model_flops_after']}")
    assert after["drop_points"] <= 3.0, after
    assert after["after"] >= post["after"]


def test_compact_shapes(shapes):
    model, calib, evals = shapes["model"], shapes["calib"], shapes["eval"]
    new, rep = compact(model, calib, max_error=0.1, progress=False)
    assert len(rep["layers"]) >= 8
    for row in rep["layers"]:
        assert row["output_error"] <= 0.1 and row["flops_after"] < row["flops_before"]
    skipped = {s["layer"]: s["reason"] for s in rep["skipped"]}
    assert "conv2d_1" in skipped and "1x1" in skipped["conv2d_15"]  # RGB input layer; the 1x1 head
    assert rep["model_flops_after"] == graph_flops(new.mod) < 0.6 * graph_flops(model.mod)
    assert count(new, "nn.conv2d") == count(model, "nn.conv2d") + len(rep["layers"])
    res = check(model, new, calib, evals, limit=16)
    print(f"shapes-seg compact 0.1: mIoU {res['before']:.4f} -> {res['after']:.4f}, "
          f"FLOPs {rep['model_flops_before']} -> {rep['model_flops_after']}")
    assert res["before"] > 0.85 and res["drop_points"] <= 3.0, res


def test_lowrank_flop_budget_response_fit(shapes):
    """A model-wide FLOP budget, ranks per layer from the spectra; fitting the factors to the
    layers' responses on calibration data beats fitting the weights alone, on real mIoU."""
    model, calib, evals = shapes["model"], shapes["calib"], shapes["eval"]
    by_weights, rw = factorize(model, flops_ratio=0.5)
    by_data, rd = factorize(model, flops_ratio=0.5, calib=calib)
    assert rw["fit"] == "weights" and rd["fit"] == "responses" and 0 < rd["energy"] < 1
    for rep, new in ((rw, by_weights), (rd, by_data)):
        layers = rep["layers"]
        assert len(layers) >= 12 and [s["layer"] for s in rep["skipped"]] == ["conv2d_15"]  # 1x1 head: 4 classes
        assert sum(r["flops_after"] for r in layers) <= 0.5 * sum(r["flops_before"] for r in layers)
        assert rep["model_flops_after"] == graph_flops(new.mod)
        ratios = [r["flops_after"] / r["flops_before"] for r in layers]
        assert max(ratios) - min(ratios) > 0.1  # ranks follow each layer's spectrum, not one ratio
    assert all("output_rel_error" in r for r in rd["layers"])
    we = {r["layer"]: r for r in rw["layers"]}
    # the same ranks, but the output factor refitted to the responses: lower output error per layer
    assert [r["rank"] for r in rd["layers"]] == [we[r["layer"]]["rank"] for r in rd["layers"]]
    ref = HostRunner(model)
    w_out = check(model, by_weights, calib, evals, limit=8, ref_runner=ref)
    d_out = check(model, by_data, calib, evals, limit=8, ref_runner=ref)
    print(f"shapes-seg low-rank 0.5 FLOPs: mIoU {d_out['before']:.4f} -> weights fit {w_out['after']:.4f}, "
          f"response fit {d_out['after']:.4f}")
    assert d_out["max_abs"] < w_out["max_abs"] and d_out["after"] > w_out["after"]
    assert d_out["drop_points"] <= 5.0, d_out


def test_finetune_unknown_op_is_named():
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 4], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.cumsum(x, axis=1))
        bb.emit_func_output(y)
    with pytest.raises(TvmedgeError, match="relax.cumsum"):
        RelaxModule(bb.get())
    del tvm


@pytest.mark.slow
def test_call_tir_graph_factorized_on_responses(tmp_path):
    """mobilenet_v2's ONNX import writes Clip (ReLU6) as isnan/where + call_tir PrimFuncs: the
    interpreter runs those with TVM (batched, matching the compiled model), so response-fitted
    low-rank works on it, and fine-tuning goes through them once they are mapped back to
    R.maximum/R.minimum (lower.normalize.without_clip_prim_funcs; the same outputs)."""
    from tvmedge.optimize.data import Dataset
    from tvmedge.core.model import random_inputs

    model = load_model(zoo.export("mobilenet_v2", tmp_path / "m.onnx"))
    assert "R.call_tir" in model.mod["main"].script(show_meta=False)
    specs = [i.to_dict() for i in model.inputs]
    data = Dataset("random", [random_inputs(specs, seed=i) for i in range(3)])
    x = torch.from_numpy(np.concatenate([s["input"] for s in data.samples]))
    with torch.no_grad():
        got = RelaxModule(model.mod, trainable=False)(x)[0].numpy()
    ref = outputs_over(HostRunner(model), data)[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    new, rep = factorize(model, flops_ratio=0.7, calib=data)
    assert rep["fit"] == "responses" and len(rep["layers"]) > 10
    from tvmedge.lower.normalize import without_clip_prim_funcs

    spelled = without_clip_prim_funcs(model.mod)
    assert "R.call_tir" not in spelled["main"].script(show_meta=False)
    with torch.no_grad():
        same = RelaxModule(spelled, trainable=False)(x)[0].numpy()
    assert np.abs(same - got).max() <= 1e-5 * np.abs(got).max()  # folded weights: summation order only
    tuned, frep = finetune(model, new, 2, data, progress=False, batch=2)
    assert "R.call_tir" not in tuned.mod["main"].script(show_meta=False)
    assert frep["distill_loss_after"] <= frep["distill_loss_before"]


def test_cli_lowrank_compact_compile(digits, shapes):
    d = digits["dir"]
    out = cli("optimize", str(digits["path"]), "-o", str(d / "o.relax"), "--lowrank", "0.9", "--eval", "digits",
              "--json").stdout
    rep = json.loads(out[out.index("{"):])
    validate(rep)
    lr = rep["rewrites"][0]
    assert lr["rewrite"] == "lowrank" and len(lr["layers"]) == 4
    assert [s["layer"] for s in lr["skipped"]] == ["conv2d_1"]  # 1 input channel: saves < 10 %
    assert rep["check"]["metric"] == "accuracy" and rep["check"]["before"] > 0.99
    cli("compile", str(d / "o.relax"), "-o", str(d / "o.tar"))
    from tvmedge.run import run_artifact

    res = run_artifact(d / "o.tar", {"input": digits["eval"].samples[0]["input"]}, repeat=2)
    assert res.outputs[0].shape == (1, 10)
    s = shapes["dir"]
    out = cli("optimize", str(shapes["path"]), "-o", str(s / "c.relax"), "--compact", "--calib", "shapes",
              "--calib-size", "16", "--compact-max-error", "0.1", "--json").stdout
    rep = json.loads(out[out.index("{"):])
    assert rep["rewrites"][0]["rewrite"] == "compact" and len(rep["rewrites"][0]["layers"]) >= 8
    assert rep["check"]["max_rel"] < 0.5
    cli("compile", str(s / "c.relax"), "-o", str(s / "c.tar"))
