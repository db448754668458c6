"""TFLite path: the trained digits-cnn exported to .tflite (no TensorFlow), checked against the
LiteRT interpreter and PyTorch, then imported, compiled and run through TVM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvmedge.core.artifact import read_artifact
from tvmedge.build import compile_model
from tvmedge.core.errors import TvmedgeError
from tvmedge.frontend import load_model
from tvmedge.run import run_artifact
from tvmedge.target import resolve
from tvmedge.zoo.digits import accuracy, load_split, load_trained
from tvmedge.zoo.tflite_export import export_tflite


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def digits():
    """(trained model, exported .tflite path, x_test NCHW, y_test, PyTorch logits on x_test)."""
    import tempfile
    from pathlib import Path

    model = load_trained()
    _, _, xte, yte = load_split()
    with torch.no_grad():
        ref = model(torch.from_numpy(xte)).numpy()
    with tempfile.TemporaryDirectory(prefix="tvmedge-tflite-") as tmp:
        path = export_tflite(model, Path(tmp) / "digits.tflite")
        yield model, path, xte, yte, ref


def litert_run(path, x_nhwc: np.ndarray) -> np.ndarray:
    """Run the model in the LiteRT interpreter (input resized to the batch of ``x_nhwc``)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        pytest.skip(f"ai-edge-litert is not installed (pip install ai-edge-litert): {e}")
    it = Interpreter(model_path=str(path))
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert list(inp["shape"]) == [1, 8, 8, 1] and inp["name"] == "input"
    it.resize_tensor_input(inp["index"], list(x_nhwc.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], x_nhwc)
    it.invoke()
    return it.get_tensor(out["index"]).copy()


def test_file_is_tflite_schema_v3(digits):
    import tflite

    _, path, *_ = digits
    buf = path.read_bytes()
    assert buf[4:8] == b"TFL3"
    m = tflite.Model.GetRootAsModel(buf, 0)
    assert m.Version() == 3 and m.SubgraphsLength() == 1
    ops = {m.OperatorCodes(i).BuiltinCode() for i in range(m.OperatorCodesLength())}
    B = tflite.BuiltinOperator
    assert ops == {B.CONV_2D, B.MAX_POOL_2D, B.RESHAPE, B.FULLY_CONNECTED}
    assert m.Subgraphs(0).OperatorsLength() == 8  # 3 conv (BN+ReLU folded), 2 pool, reshape, 2 fc


def test_litert_matches_pytorch(digits):
    _, path, xte, yte, ref = digits
    out = litert_run(path, nhwc(xte))
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4
    assert accuracy(out, yte) == accuracy(ref, yte)


def test_tvm_import_compile_run_matches(digits, tmp_path):
    import tvm
    from tvm import relax

    _, path, xte, yte, ref = digits
    model = load_model(path)
    assert model.format == "tflite"
    assert [(i.name, i.shape, i.dtype) for i in model.inputs] == [("input", [1, 8, 8, 1], "float32")]
    assert [o.shape for o in model.outputs] == [[1, 10]]
    compile_model(model, resolve("host"), tmp_path / "d.tar")
    x = nhwc(xte[:4])
    lite = None
    try:
        import ai_edge_litert  # noqa: F401
        lite = litert_run(path, x)
    except ImportError:
        pass
    for i in range(len(x)):
        res = run_artifact(tmp_path / "d.tar", {model.inputs[0].name: x[i:i + 1]}, repeat=1, warmup=0)
        assert res.outputs[0].shape == (1, 10)
        assert rel_err(res.outputs[0], ref[i:i + 1]) < 1e-4
        if lite is not None:
            assert rel_err(res.outputs[0], lite[i:i + 1]) < 1e-4
    # and the whole held-out set keeps PyTorch's accuracy once compiled
    lib, _ = read_artifact(tmp_path / "d.tar", tmp_path / "x")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    xs = nhwc(xte)
    logits = np.concatenate([vm["main"](tvm.runtime.tensor(xs[i:i + 1])).numpy() for i in range(len(xs))])
    assert rel_err(logits, ref) < 1e-4
    assert accuracy(logits, yte) == accuracy(ref, yte)


@pytest.mark.parametrize("damage", ["header-only", "half", "last-byte", "garbled"])
def test_corrupt_tflite_gives_tvmedge_error(digits, tmp_path, damage):
    _, path, *_ = digits
    buf = bytearray(path.read_bytes())
    if damage == "header-only":
        buf = buf[:16]
    elif damage == "half":
        buf = buf[:len(buf) // 2]
    elif damage == "last-byte":
        buf = buf[:-1]
    else:  # the root table offset points far past the end of the file
        buf[0:4] = (0x7FFFFF00).to_bytes(4, "little")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(bytes(buf))
    with pytest.raises(TvmedgeError, match="bad.tflite"):
        load_model(bad)


def test_unsupported_layer_is_a_clear_error(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Softplus()).eval()
    with pytest.raises(TvmedgeError, match="Softplus"):
        export_tflite(model, tmp_path / "m.tflite")
    assert not list(tmp_path.iterdir())  # nothing half-written


def _litert(path, x_nhwc: np.ndarray) -> np.ndarray:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        pytest.skip(f"ai-edge-litert is not installed (pip install ai-edge-litert): {e}")
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x_nhwc)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]).copy()


class _PadNet(torch.nn.Module):
    """What SAME/VALID cannot express: padding 1 with stride 2 on even inputs (conv, depthwise,
    max-pool), plus the other ops the zoo needs (residual add, SE multiply, hardswish, resize, cat)."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1, groups=8), nn.Hardswish())
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.se = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        import torch.nn.functional as F

        y = self.conv(x)
        z = self.dw(y)
        z = z * F.hardsigmoid(self.se(F.adaptive_avg_pool2d(z, 1))) + z
        p = torch.sigmoid(self.pool(y))
        up = F.interpolate(z, size=p.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([F.interpolate(up, scale_factor=2.0, mode="nearest"),
                                    F.interpolate(p, scale_factor=2.0, mode="nearest")], 1))


def test_explicit_pad_and_zoo_ops_match_litert_and_pytorch(tmp_path):
    torch.manual_seed(0)
    model = _PadNet().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = export_tflite(model, tmp_path / "pad.tflite", (1, 3, 16, 16))
    import tflite

    m = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    codes = {m.OperatorCodes(i).BuiltinCode() for i in range(m.OperatorCodesLength())}
    assert {tflite.BuiltinOperator.PAD, tflite.BuiltinOperator.PADV2, tflite.BuiltinOperator.DEPTHWISE_CONV_2D} <= codes
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    out = _litert(path, nhwc(x.numpy())).transpose(0, 3, 1, 2)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "lraspp_mbv3", "shapes-seg", "digits-cnn"])
def test_every_zoo_model_exports_to_tflite_like_litert(name, tmp_path):
    """zoo export NAME -o X.tflite: LiteRT runs it like PyTorch, and tvmedge imports, compiles
    and runs it like LiteRT."""
    from tvmedge import zoo

    entry = zoo.get(name)
    path = zoo.export(name, tmp_path / f"{name}.tflite")
    model = entry.build().eval()
    x = zoo.example_input(entry, seed=1)
    with torch.no_grad():
        ref = model(x).numpy()
    lite = _litert(path, nhwc(x.numpy()))
    assert rel_err(lite.transpose(0, 3, 1, 2) if lite.ndim == 4 else lite, ref) < 1e-4
    imported = load_model(path)
    compile_model(imported, resolve("host"), tmp_path / "m.tar")
    res = run_artifact(tmp_path / "m.tar", {imported.inputs[0].name: nhwc(x.numpy())}, repeat=1)
    assert rel_err(res.outputs[0], lite) < 1e-4
