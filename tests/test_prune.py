"""Structured pruning (``optimize --prune``) on Relax graphs.

* a small net with a residual add, a depthwise conv, a concat and a flatten->dense head, where
  some channels of each dependency group are exactly zero: pruning them must leave the
  outputs unchanged (this checks the grouping and every slice), and the graph must shrink;
* digits-cnn: per-layer report, FLOPs; a ratio that empties a layer and ``bn-gamma`` on a
  folded graph are one clear error each; export of the pruned model runs in ONNX Runtime;
* slow: prune + distillation fine-tune on digits within 1 point (the CLI, with --max-drop).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from tvmedge import zoo
from tvmedge.core.errors import TvmedgeError
from tvmedge.frontend import load_model
from tvmedge.optimize import data as data_mod
from tvmedge.optimize.check import check
from tvmedge.optimize.lowrank import graph_flops
from tvmedge.optimize.prune import prune
from conftest import run_cli


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)     # residual: a(stem) + stem
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b = nn.Conv2d(8, 6, 1)                 # concat [b, dw] -> 14 channels
        self.head = nn.Conv2d(14, 4, 1)
        self.fc1 = nn.Linear(4 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        r = torch.relu(self.a(s)) + s
        d = torch.relu(self.dw(r))
        c = torch.cat([torch.relu(self.b(r)), d], dim=1)
        h = nn.functional.max_pool2d(torch.relu(self.head(c)), 2)
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


@pytest.fixture(scope="module")
def branchy(tmp_path_factory):
    torch.manual_seed(0)
    net = Branchy().eval()
    with torch.no_grad():  # dead channels: the pruner must find exactly these
        for conv, dead in ((net.stem, [1, 5]), (net.a, [1, 5]), (net.b, [0, 3, 4]), (net.head, [2])):
            conv.weight[dead] = 0
            conv.bias[dead] = 0
        net.dw.bias[[1, 5]] = 0  # the depthwise conv follows the residual stream's dead channels
        net.fc1.weight[[3, 7, 8, 11]] = 0
        net.fc1.bias[[3, 7, 8, 11]] = 0
    path = tmp_path_factory.mktemp("prune") / "branchy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["out"])
    return load_model(path)


def test_dead_channels_pruned_exactly(branchy):
    new, rep = prune(branchy, ratio=0.25, progress=False)
    layers = {r["layer"]: r for r in rep["layers"]}
    # stem and a share the residual stream (8 channels: 2 removed), the depthwise conv follows it;
    # b loses 2 of 6 (round(0.25*6)), head 1 of 4, fc1 3 of 12; fc2 feeds the output
    assert layers["conv2d_0"]["out_channels"] == "8 -> 6" and layers["conv2d_1"]["out_channels"] == "8 -> 6"
    assert layers["conv2d_3"]["out_channels"] == "6 -> 4" and layers["conv2d_4"]["in_channels"] == "14 -> 10"
    assert layers["matmul_0"]["in_channels"] == "64 -> 48" and layers["matmul_0"]["out_channels"] == "12 -> 9"
    assert {"layers": ["conv2d_0", "conv2d_1"], "channels": 8} in rep["groups"]
    assert [s["layer"] for s in rep["skipped"]] == ["matmul_1"]
    assert rep["model_flops_after"] < 0.8 * rep["model_flops_before"] == 0.8 * graph_flops(branchy.mod)
    data = data_mod.Dataset(name="r", samples=[{"input": np.random.default_rng(i).standard_normal((1, 3, 8, 8))
                                               .astype(np.float32)} for i in range(4)])
    c = check(branchy, new, data)
    assert c["max_abs"] < 1e-4, c  # only dead channels went: same outputs


def test_digits_prune_and_errors(tmp_path):
    model = load_model(zoo.export("digits-cnn", tmp_path / "d.onnx"))
    new, rep = prune(model, flops_ratio=0.5, progress=False)
    assert rep["model_flops_after"] <= 0.5 * rep["model_flops_before"]
    assert len(rep["layers"]) == 5
    with pytest.raises(TvmedgeError, match="would empty layer conv2d_0"):
        prune(model, ratio=0.99, progress=False)
    with pytest.raises(TvmedgeError, match="bn-gamma.*folded"):
        prune(model, ratio=0.5, criterion="bn-gamma", progress=False)
    proc = run_cli("optimize", str(tmp_path / "d.onnx"), "-o", str(tmp_path / "p.relax"), "--prune", "0.99",
                   in_process=True)
    assert proc.returncode == 1 and "would empty layer" in proc.stderr and not (tmp_path / "p.relax").exists()
    from tvmedge.export.onnx import write_onnx
    from tvmedge.export.verify import verify

    out = write_onnx(new, tmp_path / "p.onnx")
    calib = data_mod.load("digits", model, "calib", limit=4)
    v = verify(new, out["output"], calib, runtimes=("onnxruntime",))
    assert v["onnxruntime"]["max_abs"] < 1e-4 * v["onnxruntime"]["max_abs_output"]


@pytest.mark.slow
def test_prune_finetune_digits_within_one_point(tmp_path):
    src = zoo.export("digits-cnn", tmp_path / "d.onnx")
    proc = run_cli("optimize", str(src), "-o", str(tmp_path / "p.relax"), "--prune", "0.5", "--criterion", "l1",
                   "--calib", "digits", "--calib-size", "1000", "--finetune-steps", "300", "--eval", "digits",
                   "--max-drop", "1.0", "--json", check=True, in_process=True)
    rep = json.loads(proc.stdout)
    assert rep["rewrites"][0]["model_flops_after"] < 0.3 * rep["rewrites"][0]["model_flops_before"]
    assert rep["check"]["drop_points"] <= 1.0
