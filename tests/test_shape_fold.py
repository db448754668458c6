"""ONNX models whose Reshape targets and Slice bounds are computed at run time from ``Shape``.

Exporters with dynamic axes (torch), Paddle2ONNX and tf2onnx write ``Shape`` -> ``Gather``/
``Slice`` -> ``Concat`` -> ``Cast`` -> ``Reshape`` chains; TVM's ONNX importer rejects such a
``Reshape`` ("Reshape requires the input new shape to be Shape"). Once ``--input-shape`` fixes
the inputs, :func:`tvmedge.frontend.fold_shape_subgraphs` evaluates those chains at import.
Each model here is checked to be of that style (the plain TVM import fails), then imported
by tvmedge, compiled for the host and compared with ONNX Runtime.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tvmedge.build import lower
from tvmedge.frontend import fold_shape_subgraphs, load_model
from tvmedge.target import resolve


@pytest.fixture(scope="module")
def host():
    return resolve("host")


def run_host(path, shapes: dict[str, list[int]], host, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Outputs of the tvmedge-compiled model and of ONNX Runtime on the same random inputs."""
    import tvm
    from tvm import relax

    model = load_model(path, shapes)
    assert [i.shape for i in model.inputs] == list(shapes.values())
    assert any(r["rewrite"] == "onnx-shape-fold" and r["nodes"] > 0 for r in model.rewrites)
    rng = np.random.default_rng(seed)
    feeds = {name: rng.standard_normal(shape).astype("float32") for name, shape in shapes.items()}
    vm = relax.VirtualMachine(lower(model, host), tvm.cpu())
    res = vm["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in model.inputs])
    got = [res.numpy()] if hasattr(res, "numpy") else [r.numpy() for r in res]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    return got, want


def assert_close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))


def assert_tvm_import_fails(path, shapes: dict[str, list[int]], match: str | None = None) -> None:
    """The model really is of the run-time-shape style: TVM's own importer rejects it."""
    from tvm.relax.frontend.onnx import from_onnx

    with pytest.raises(Exception, match=match):
        from_onnx(onnx.load(str(path)), shape_dict=shapes, keep_params_in_input=False)


class ShapeReader(torch.nn.Module):
    """Reshapes that read ``x.shape`` (traced to Shape/Gather/Concat with dynamic axes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.conv(x).reshape(n, 8, h * w).transpose(1, 2)  # [n, h*w, 8]
        y = self.fc(y)
        y = y.reshape(y.shape[0], h, w, -1)  # [n, h, w, 5]
        a, b = y.chunk(2, dim=2)  # Slice bounds from Shape too
        return torch.cat([b, a], dim=2).flatten(1)


def test_torch_dynamic_axes_reshape_from_shape(host, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "dyn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ShapeReader().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 2: "h", 3: "w"}})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Shape", "Concat", "Reshape"} <= ops
    # TVM takes the Reshapes (Gather/Unsqueeze/Concat of dims) but not the chunk's Slice bounds
    assert_tvm_import_fails(path, {"x": [2, 3, 12, 10]})
    for shape in ([2, 3, 12, 10], [1, 3, 7, 6]):
        got, want = run_host(path, {"x": shape}, host)
        assert want[0].shape == (shape[0], shape[2] * shape[3] * 5)
        assert_close(got, want)


def handmade_model(path) -> None:
    """tf2onnx / Paddle2ONNX style: dynamic batch; both Reshape targets built from Shape.

    ``flat = Reshape(x, Cast64(Cast32(Concat(Slice(Cast64(CastF(Shape(x))), 0, 1), [-1]))))`` then a
    MatMul (a shape cast to float and back is what TVM's importer trips on);
    ``rows = Reshape(x, Concat(Slice(Shape(x), 0, 2), ReduceProd(Slice(Shape(x), 2, 4))))``
    with a Gather/Unsqueeze of the channel count on the way, then a ReduceSum.
    """
    rng = np.random.default_rng(3)
    const = lambda name, value: numpy_helper.from_array(np.asarray(value), name)  # noqa: E731
    inits = [const("w", rng.standard_normal((4 * 5 * 5, 3)).astype("float32")),
             const("s0", np.array([0], "int64")), const("s1", np.array([1], "int64")),
             const("s2", np.array([2], "int64")), const("s4", np.array([4], "int64")),
             const("minus1", np.array([-1], "int64")), const("idx1", np.array(1, "int64")),
             const("axes0", np.array([0], "int64"))]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Cast", ["shape"], ["shape_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["shape_f"], ["shape_i"], to=TensorProto.INT64),
        helper.make_node("Slice", ["shape_i", "s0", "s1"], ["batch"]),
        helper.make_node("Concat", ["batch", "minus1"], ["target_a"], axis=0),
        helper.make_node("Cast", ["target_a"], ["target_a32"], to=TensorProto.INT32),
        helper.make_node("Cast", ["target_a32"], ["target_a64"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", "target_a64"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        helper.make_node("Gather", ["shape", "idx1"], ["channels"], axis=0),
        helper.make_node("Unsqueeze", ["channels", "axes0"], ["channels1"]),
        helper.make_node("Slice", ["shape", "s0", "s1"], ["batch2"]),
        helper.make_node("Slice", ["shape", "s2", "s4"], ["hw"]),
        helper.make_node("ReduceProd", ["hw", "axes0"], ["hw_size"], keepdims=1),
        helper.make_node("Concat", ["batch2", "channels1", "hw_size"], ["target_b"], axis=0),
        helper.make_node("Relu", ["x"], ["xr"]),
        helper.make_node("Reshape", ["xr", "target_b"], ["rows"]),
        helper.make_node("ReduceSum", ["rows", "minus1"], ["pooled"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "runtime_shapes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def test_handmade_shape_slice_concat_cast_reshape(host, tmp_path):
    path = tmp_path / "handmade.onnx"
    handmade_model(path)
    assert_tvm_import_fails(path, {"x": [3, 4, 5, 5]}, match="Reshape requires the input new shape to be Shape")
    folded, count = fold_shape_subgraphs(onnx.load(str(path)), {"x": [3, 4, 5, 5]})
    left = {n.op_type for n in folded.graph.node}
    assert left == {"Reshape", "MatMul", "Relu", "ReduceSum"} and count == 13
    got, want = run_host(path, {"x": [3, 4, 5, 5]}, host)
    assert [w.shape for w in want] == [(3, 3), (3, 4)]
    assert_close(got, want)


def test_fold_leaves_graphs_without_shape_ops_alone():
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])]))
    same, count = fold_shape_subgraphs(m, {"x": [1, 2]})
    assert same is m and count == 0
