"""The peers tvmedge is measured against (OpenVINO next to ONNX Runtime) and benchmarks/peers.py end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tvmedge import zoo
from tvmedge.bench.peers import (onnxruntime_latency, openvino_compile, openvino_latency, openvino_precision,
                                 openvino_run)
from tvmedge.isa import BY_NAME

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = zoo.export("digits-cnn", tmp_path_factory.mktemp("m") / "digits.onnx")
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype("float32")
    return path, {"input": x}


def test_openvino_f32_matches_onnxruntime(digits):
    import onnxruntime as ort

    path, inputs = digits
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    f32 = openvino_compile(path, threads=2, precision="f32")
    assert openvino_precision(f32) == "f32"
    np.testing.assert_allclose(openvino_run(f32, inputs)[0], ref, rtol=1e-4, atol=1e-4)
    default = openvino_compile(path, threads=2)
    assert openvino_precision(default) in ("f32", "bf16", "f16")
    out = openvino_run(default, inputs)[0]
    assert out.shape == ref.shape and out.argmax() == ref.argmax()


def test_onnxruntime_int8_is_a_qdq_model_close_to_fp32(digits, tmp_path):
    import onnx
    import onnxruntime as ort

    from tvmedge.bench.peers import onnxruntime_qdq
    from tvmedge.optimize import data as data_mod

    path, _ = digits
    from tvmedge.frontend import load_model

    calib = data_mod.load("digits", load_model(path), "calib", limit=16)
    evals = data_mod.load("digits", load_model(path), "eval", limit=64)
    qdq = onnxruntime_qdq(path, tmp_path / "digits.qdq.onnx", list(calib.samples))
    ops = {n.op_type for n in onnx.load(qdq).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    f32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(qdq, providers=["CPUExecutionProvider"])
    agree = np.mean([f32.run(None, s)[0].argmax() == q.run(None, s)[0].argmax() for s in evals.samples])
    assert agree >= 0.95


def test_latencies_are_per_run_milliseconds(digits):
    path, inputs = digits
    for lat in (openvino_latency(path, inputs, threads=1, precision="f32", repeat=7),
                onnxruntime_latency(path, inputs, threads=1, repeat=7)):
        assert len(lat) == 7 and all(0 < v < 1000 for v in lat)


@pytest.mark.slow
def test_peers_benchmark_end_to_end(tmp_path):
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--models", "digits-cnn",
                           "--tune-minutes", "0", "--repeat", "5", "--threads", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    m = res["machine"]
    assert m["threads"] == 2 and m["cpu_model"] and m["logical_cores"] >= 1 and m["isa_class"] in BY_NAME
    rows = res["models"][0]["rows"]
    assert set(rows) == {"tvm untuned", "tvm shipped", "onnxruntime", "openvino f32", "openvino default"}
    assert rows["onnxruntime"]["ratio_to_onnxruntime"] == pytest.approx(1.0)
    for name in ("tvm untuned", "openvino f32"):
        assert rows[name]["latency_ms"]["median"] > 0 and rows[name]["max_abs_diff_vs_onnxruntime"] < 1e-3
    assert rows["openvino default"]["precision"] in ("f32", "bf16", "f16")
    assert "tvm shipped" in rows and ("latency_ms" in rows["tvm shipped"] or "none for" in rows["tvm shipped"]["skipped"])
    assert out.with_suffix(".png").stat().st_size > 0
    assert m["cpu_model"] in proc.stdout and "ONNX Runtime" in proc.stdout
