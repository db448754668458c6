"""Peak memory of running an artifact here (tvmedge.bench.memory), as report shows it."""

from __future__ import annotations

import torch

from tvmedge.bench.memory import peak_memory_bytes
from tvmedge.build import compile_model
from tvmedge.frontend import load_model
from tvmedge.target import resolve


def test_peak_memory_counts_the_weights_a_run_touches(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10)).eval()
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (torch.randn(1, 1024),), str(path), input_names=["x"], dynamo=False)
    compile_model(load_model(path), resolve("host"), tmp_path / "m.tar", use_shipped=False)
    weights = sum(p.numel() * 4 for p in model.parameters())  # 8.5 MB, embedded in the library
    got = peak_memory_bytes(tmp_path / "m.tar", threads=1)
    assert got["peak_memory_bytes"] is not None, got["note"]
    assert 0.9 * weights <= got["peak_memory_bytes"] < weights + 300 * 2**20, got
