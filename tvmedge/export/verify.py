"""Run an exported ONNX file in ONNX Runtime and OpenVINO and compare it with tvmedge's own
result for the same model on the same inputs (max abs error, top-1 / argmax agreement)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.errors import TvmedgeError
from ..core.model import ImportedModel
from ..optimize.data import Dataset

RUNTIMES = ("onnxruntime", "openvino")


def _onnxruntime(path: Path) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda feed: sess.run(None, feed)


def _openvino(path: Path) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    import openvino as ov

    core = ov.Core()
    # f32 inference precision: the default on CPUs with bf16 would round float layers to bf16
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    req = compiled.create_infer_request()

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        res = req.infer(feed)
        return [np.asarray(res[o]) for o in compiled.outputs]
    return run


def int8_step(report: dict[str, Any]) -> float:
    """The largest activation quantization step of the exported int8 layers (0 for float)."""
    return max((lay["act_scale"] for lay in report.get("int8_layers", [])), default=0.0)


def verify(model: ImportedModel, path: str | Path, data: Dataset, runtimes: tuple[str, ...] = RUNTIMES,
           limit: int = 32) -> dict[str, Any]:
    """Per runtime: max abs error of each output against tvmedge (compiled for this host) and
    the share of samples whose argmax over axis 1 (class or per-pixel class) agrees."""
    from ..optimize.check import HostRunner

    ours = HostRunner(model)
    samples = data.samples[:limit]
    ref = [ours(s) for s in samples]
    out: dict[str, Any] = {}
    for rt in runtimes:
        if rt not in RUNTIMES:
            raise TvmedgeError(f"unknown runtime '{rt}' ({', '.join(RUNTIMES)})")
        run = {"onnxruntime": _onnxruntime, "openvino": _openvino}[rt](Path(path))
        got = [run(s) for s in samples]
        max_abs = max(float(np.max(np.abs(g[i].astype(np.float64) - r[i])))
                      for g, r in zip(got, ref) for i in range(len(r)))
        scale = max(float(np.max(np.abs(r[0]))) for r in ref)
        agree = float(np.mean([np.mean(g[0].argmax(axis=1) == r[0].argmax(axis=1)) for g, r in zip(got, ref)]))
        out[rt] = {"max_abs": max_abs, "max_abs_output": scale, "argmax_agreement": agree, "samples": len(samples)}
    return out
