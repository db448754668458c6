"""Time the peers that a tvmedge latency is reported against: ONNX Runtime, OpenVINO and PyTorch eager.

Each measurement warms up, then times ``repeat`` single-batch runs and returns the
latencies in milliseconds, like :func:`tvmedge.run.run_artifact` does for TVM.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ..core.schema import latency_block


def summarize(lat_ms: list[float]) -> dict[str, float]:
    """The schema's latency block (ms)."""
    return latency_block(lat_ms)


def onnxruntime_latency(onnx_path: str | os.PathLike, inputs: dict[str, np.ndarray], threads: int,
                        repeat: int = 20, warmup: int = 3) -> list[float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, inputs)
    lat = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, inputs)
        lat.append((time.perf_counter() - t0) * 1e3)
    return lat


def onnxruntime_qdq(onnx_path: str | os.PathLike, out_path: str | os.PathLike,
                    calib: list[dict[str, np.ndarray]]) -> str:
    """ONNX Runtime's own int8: ``quantize_static`` of ``onnx_path`` on ``calib`` (QDQ format,
    per-channel int8 weights, uint8 activations, MinMax calibration: what a user of ORT's
    quantization tool gets by default on x86), written to ``out_path``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self):  # noqa: D102
            return next(self.it, None)

    pre = str(out_path) + ".pre.onnx"
    quant_pre_process(str(onnx_path), pre)
    quantize_static(pre, str(out_path), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    os.remove(pre)
    return str(out_path)


def onnxruntime_baseline(onnx_path: str | os.PathLike, inputs: dict[str, np.ndarray], threads: int,
                         repeat: int, reference: list[np.ndarray]) -> dict:
    """ONNX Runtime on this host, as a schema baseline: its latency block, its device (this
    host) and the largest difference between its outputs and ``reference`` (tvmedge's)."""
    import onnxruntime as ort

    from ..core.errors import TvmedgeError
    from ..core.schema import device_block

    if not str(onnx_path).endswith(".onnx"):
        raise TvmedgeError(f"--compare takes the ONNX model the artifact was compiled from, not {onnx_path}")
    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        outs = sess.run(None, inputs)
    except Exception as e:  # noqa: BLE001 - a model ORT cannot run: one line
        raise TvmedgeError(f"ONNX Runtime cannot run {onnx_path}: {str(e).splitlines()[0]}") from None
    if len(outs) != len(reference) or any(np.shape(a) != np.shape(b) for a, b in zip(outs, reference)):
        raise TvmedgeError(f"{onnx_path} is not the model of this artifact (its outputs differ in number or shape)")
    diff = max((float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()) if np.size(a) else 0.0)
               for a, b in zip(outs, reference))
    lat = onnxruntime_latency(onnx_path, inputs, threads, repeat=repeat)
    return {"latency_ms": latency_block(lat), "device": device_block("host", "host", via="local", threads=threads),
            "max_abs_diff": diff}


def torch_latency(model, x, threads: int, repeat: int = 20, warmup: int = 3) -> list[float]:
    import torch

    torch.set_num_threads(threads)
    lat = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(x)
            lat.append((time.perf_counter() - t0) * 1e3)
    return lat


def openvino_compile(onnx_path: str | os.PathLike, threads: int, precision: str | None = None):
    """An OpenVINO CPU model for single-batch latency; ``precision`` ``"f32"`` forces fp32
    compute, ``None`` keeps OpenVINO's default (bf16 or f16 where the CPU has it)."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    config = {props.inference_num_threads: int(threads), props.num_streams: 1,
              hints.performance_mode: hints.PerformanceMode.LATENCY}
    if precision is not None:
        config[hints.inference_precision] = getattr(ov.Type, precision)
    return ov.Core().compile_model(str(onnx_path), "CPU", config)


def openvino_precision(compiled) -> str:
    """The precision an OpenVINO compiled model computes in (``f32``, ``bf16``, ``f16``)."""
    import openvino.properties.hint as hints

    return str(compiled.get_property(hints.inference_precision).get_type_name())


def openvino_run(compiled, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One inference; the outputs in the model's output order."""
    req = compiled.create_infer_request()
    req.infer(inputs)
    return [np.array(req.get_output_tensor(i).data) for i in range(len(compiled.outputs))]


def openvino_latency(onnx_path: str | os.PathLike, inputs: dict[str, np.ndarray], threads: int,
                     precision: str | None = None, repeat: int = 20, warmup: int = 3) -> list[float]:
    compiled = openvino_compile(onnx_path, threads, precision)
    req = compiled.create_infer_request()
    for _ in range(warmup):
        req.infer(inputs)
    lat = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        req.infer(inputs)
        lat.append((time.perf_counter() - t0) * 1e3)
    return lat
