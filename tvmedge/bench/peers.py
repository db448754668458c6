"""Time the peers that a tvmedge latency is reported against: ONNX Runtime and PyTorch eager.

Each measurement warms up, then times ``repeat`` single-batch runs and returns the
latencies in milliseconds, like :func:`tvmedge.run.run_artifact` does for TVM.
"""

from __future__ import annotations

import os
import time

import numpy as np


def summarize(lat_ms: list[float]) -> dict[str, float]:
    a = np.asarray(lat_ms)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "min": float(a.min())}


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
