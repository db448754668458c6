"""Bilinear resize on CPUs (``tvmedge.lower.resize``): the separable compute equals TOPI's,
and a segmentation-style head (conv, upsample, NCHW output) compiles with the transpose moved
before the resize and matches ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tvmedge.build import compile_model
from tvmedge.frontend import load_model
from tvmedge.run import run_artifact
from tvmedge.target import resolve


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("mode,size", [("half_pixel", (40, 52)), ("align_corners", (17, 31)),
                                       ("asymmetric", (24, 26)), ("pytorch_half_pixel", (12, 1))])
def test_separable_resize_is_bit_identical_to_topi(layout, mode, size):
    import tvm
    from tvm import te, topi

    from tvmedge.lower.resize import separable_resize2d

    shape = (1, 5, 12, 13) if layout == "NCHW" else (1, 12, 13, 5)
    x = te.placeholder(shape, "float32", "x")
    ref = topi.image.resize2d(x, [0.0] * 4, size, layout=layout, method="linear",
                              coordinate_transformation_mode=mode)
    ours = separable_resize2d(x, size, layout, mode)
    data = np.random.default_rng(0).standard_normal(shape).astype("float32")
    outs = []
    for out in (ref, ours):
        lib = tvm.compile(te.create_prim_func([x, out]), target="llvm")
        buf = tvm.runtime.empty([int(d) for d in out.shape], "float32", tvm.cpu())
        lib(tvm.runtime.tensor(data), buf)
        outs.append(buf.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


class Head(nn.Module):
    """A segmentation head's end: conv, then bilinear upsample to a size that is not a multiple."""

    def __init__(self, align: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 21, 1)
        self.align = align

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        up = nn.functional.interpolate(self.conv(x), size=(61, 83), mode="bilinear", align_corners=self.align)
        down = nn.functional.interpolate(self.conv(x), scale_factor=0.5, mode="bilinear", align_corners=False)
        return up, down  # down: fewer rows than the input, so TOPI's one-stage compute


@pytest.mark.parametrize("align", [False, True])
def test_upsampling_head_writes_nchw_from_a_separable_resize_and_matches_onnxruntime(align, tmp_path):
    import onnxruntime as ort

    from tvmedge.lower.pipeline import kernels, prepare

    torch.manual_seed(0)
    path = tmp_path / "head.onnx"
    torch.onnx.export(Head(align).eval(), (torch.randn(1, 8, 16, 20),), str(path), input_names=["x"],
                      output_names=["up", "down"], opset_version=17, dynamo=False)
    model = load_model(path)
    target = resolve("host").target
    prepared = prepare(model.mod, target)
    scripts = {name: f.script() for name, f in kernels(prepared).items()}
    up = [name for name, s in scripts.items() if "resize_cols" in s]
    assert len(up) == 1, sorted(scripts)
    # the upsample writes NCHW itself: its kernel transposes the small input, nothing follows it
    assert "transpose" in up[0] and not any(name.startswith(f"{up[0]}_transpose") for name in scripts)
    x = np.random.default_rng(1).standard_normal((1, 8, 16, 20)).astype("float32")
    refs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    meta = compile_model(model, resolve("host"), tmp_path / "head.tar", use_shipped=False)
    assert meta["schedules"]["unscheduled"] == []
    outs = run_artifact(tmp_path / "head.tar", {"x": x}, repeat=1).outputs
    for out, ref in zip(outs, refs, strict=True):
        assert np.abs(out - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))
