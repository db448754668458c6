"""ONNX export of optimized models (``tvmedge export``), run in ONNX Runtime and OpenVINO.

* digits-cnn float and int8 (QDQ with tvmedge's scales): both runtimes give tvmedge's outputs
  within the int8 quantization step, with the same top-1;
* ``--format float``: the int8 weights dequantized, no QuantizeLinear left;
* a low-rank model keeps its factorized structure in the ONNX graph;
* binarized layers are refused naming the layer, and nothing is written;
* an ensemble (one main, vote) runs in both runtimes;
* shapes-seg int8 (slow);
* mobilenet_v2 as imported (Clip as call_tir PrimFuncs, written as Max/Min), float and int8 (slow).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tvmedge import zoo
from tvmedge.export.onnx import write_onnx
from tvmedge.export.verify import int8_step, verify
from tvmedge.frontend import load_model
from tvmedge.optimize import data as data_mod
from tvmedge.optimize.lowrank import factorize
from tvmedge.optimize.quantize import quantize
from conftest import run_cli


def ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    model = load_model(zoo.export("digits-cnn", d / "digits.onnx"))
    calib = data_mod.load("digits", model, "calib", limit=16)
    return {"dir": d, "model": model, "calib": calib, "int8": quantize(model, calib, progress=False)[0]}


def test_float_export_matches(digits):
    rep = write_onnx(digits["model"], digits["dir"] / "f.onnx")
    v = verify(digits["model"], rep["output"], digits["calib"], limit=8)
    for rt in ("onnxruntime", "openvino"):
        assert v[rt]["max_abs"] < 1e-4 * v[rt]["max_abs_output"], (rt, v[rt])
        assert v[rt]["argmax_agreement"] == 1.0


def test_int8_qdq_export_matches_within_step(digits):
    rep = write_onnx(digits["int8"], digits["dir"] / "q.onnx", "qdq")
    kinds = ops(rep["output"])
    assert len(rep["int8_layers"]) == 5
    assert kinds.count("QuantizeLinear") == 5 and kinds.count("Conv") == 3 and kinds.count("MatMul") == 2
    w = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(rep["output"]).graph.initializer}
    assert sum(a.dtype == np.int8 and a.ndim >= 2 for a in w.values()) == 5  # int8 weights, not float
    step = int8_step(rep)
    assert 0 < step < 1
    v = verify(digits["int8"], rep["output"], digits["calib"], limit=16)
    for rt in ("onnxruntime", "openvino"):
        assert v[rt]["max_abs"] <= step, (rt, v[rt], step)
        assert v[rt]["argmax_agreement"] == 1.0


@pytest.mark.slow
def test_int8_float_format(digits):
    rep = write_onnx(digits["int8"], digits["dir"] / "qf.onnx", "float")
    kinds = ops(rep["output"])
    assert "QuantizeLinear" not in kinds and "DequantizeLinear" not in kinds
    assert rep["dequantized_int8_layers"] == 5
    v = verify(digits["int8"], rep["output"], digits["calib"], limit=8)
    assert v["onnxruntime"]["argmax_agreement"] == 1.0  # activations no longer rounded: close, not exact


def test_lowrank_structure_kept(digits):
    lr, _ = factorize(digits["model"], energy=0.9)
    rep = write_onnx(lr, digits["dir"] / "lr.onnx")
    assert ops(rep["output"]).count("Conv") + ops(rep["output"]).count("MatMul") > 5
    v = verify(lr, rep["output"], digits["calib"], limit=4, runtimes=("onnxruntime",))
    assert v["onnxruntime"]["max_abs"] < 1e-4 * v["onnxruntime"]["max_abs_output"]


def test_cli_export_and_binary_refused(digits, tmp_path):
    out = tmp_path / "d.onnx"
    proc = run_cli("export", str(digits["dir"] / "digits.onnx"), "-o", str(out), "--samples", "4", "--json",
                   check=True, in_process=True)
    rep = json.loads(proc.stdout)
    from tvmedge.core.schema import validate

    validate(rep)
    assert rep["command"] == "export"
    assert set(rep["verify"]) == {"onnxruntime", "openvino"} and out.exists()
    bnn = zoo.export("digits-bnn", tmp_path / "bnn.relax")
    proc = run_cli("export", str(bnn), "-o", str(tmp_path / "bnn.onnx"), in_process=True)
    assert proc.returncode == 1
    assert "error: export: layer" in proc.stderr and "bnn_" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*bnn*.onnx*"))


@pytest.mark.slow
def test_shapes_int8_export(tmp_path):
    model = load_model(zoo.export("shapes-seg", tmp_path / "s.onnx"))
    calib = data_mod.load("shapes", model, "calib", limit=16)
    q, _ = quantize(model, calib, progress=False)
    rep = write_onnx(q, tmp_path / "q.onnx")
    assert len(rep["int8_layers"]) == 15
    v = verify(q, rep["output"], calib, limit=8)
    for rt in ("onnxruntime", "openvino"):
        # a value rounded the other way at a tie in one layer moves later ones by a step or two
        assert v[rt]["max_abs"] <= 3 * int8_step(rep), (rt, v[rt])
        assert v[rt]["argmax_agreement"] > 0.999


def test_ensemble_export(tmp_path):
    import torch
    import torch.nn as nn

    from tvmedge.optimize.data import Dataset
    from tvmedge.optimize.distill import torch_to_model
    from tvmedge.optimize.ensemble import combine

    members = []
    for i in range(3):
        torch.manual_seed(i)
        members.append(torch_to_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), [1, 1, 8, 8], "input",
                                      "logits", f"m{i}"))
    data = Dataset(name="r", samples=[{"input": np.random.default_rng(i).standard_normal((1, 1, 8, 8))
                                       .astype(np.float32)} for i in range(4)])
    ens = combine(members, "vote")  # softmax, reduce-max, equal, cast: all in the ONNX graph
    rep = write_onnx(ens, tmp_path / "ens.onnx")
    assert ops(rep["output"]).count("MatMul") == 3 and "Equal" in ops(rep["output"])
    v = verify(ens, rep["output"], data)
    for rt in ("onnxruntime", "openvino"):
        assert v[rt]["max_abs"] < 1e-5 and v[rt]["argmax_agreement"] == 1.0


@pytest.mark.slow
def test_mobilenet_clip_prim_funcs_exported(tmp_path):
    """mobilenet_v2's ONNX import holds Clip as call_tir PrimFuncs: they are exported as Max/Min,
    float and int8, and both runtimes reproduce tvmedge's outputs."""
    from tvmedge.core.model import random_inputs

    model = load_model(zoo.export("mobilenet_v2", tmp_path / "m.onnx"))
    assert "R.call_tir" in model.mod["main"].script(show_meta=False)
    specs = [i.to_dict() for i in model.inputs]
    data = data_mod.Dataset("random", [random_inputs(specs, seed=i) for i in range(4)])
    rep = write_onnx(model, tmp_path / "f.onnx")
    kinds = ops(rep["output"])
    assert kinds.count("Max") == 35 and kinds.count("Min") == 35
    v = verify(model, rep["output"], data, limit=2)
    for rt in ("onnxruntime", "openvino"):
        assert v[rt]["max_abs"] < 1e-4 * v[rt]["max_abs_output"], (rt, v[rt])
    q = quantize(model, data, progress=False)[0]
    rep = write_onnx(q, tmp_path / "q.onnx", "qdq")
    assert len(rep["int8_layers"]) == 53  # 52 convs and the classifier
    v = verify(q, rep["output"], data, limit=2)
    for rt in ("onnxruntime", "openvino"):
        assert v[rt]["max_abs"] <= int8_step(rep) and v[rt]["argmax_agreement"] == 1.0, (rt, v[rt])
