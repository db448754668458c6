"""Shared test fixtures.

``torchvision``: the torchvision 0.28 wheel that matches torch 2.13 is built against CUDA
torch, so its C extension does not load next to the CPU build; its import then fails while
registering fake kernels for ``torchvision::nms``/``qnms``, operators the extension would
have defined. Defining their schemas first lets it import (only the detection ops, which no
test uses, stay unavailable). Models are built with ``weights=None``: nothing is downloaded.
"""

from __future__ import annotations

import subprocess
import types

import numpy as np
import pytest

from tvmedge.deploy.launch import start_tracker


def import_torchvision() -> types.ModuleType:
    """torchvision, importable with the CPU build of torch (see the module docstring)."""
    import torch

    for op in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined: by the extension, or by an earlier call
            pass
    import torchvision

    return torchvision


@pytest.fixture(scope="session")
def torchvision() -> types.ModuleType:
    return import_torchvision()


def run_cli(*args: str, check: bool = False, timeout: float = 900,
            in_process: bool = False) -> subprocess.CompletedProcess:
    """``tvmedge ARGS``: in a fresh interpreter (the default; what a user runs, and safe for
    commands that crash natively or start servers), or in this process (``in_process``:
    no interpreter and TVM start-up, for commands whose output is the point).
    ``check``: fail the test, with both streams, unless it exits 0."""
    import contextlib
    import io
    import sys

    if in_process:
        from tvmedge.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(args))
            except SystemExit as e:  # argparse errors
                rc = e.code if isinstance(e.code, int) else 2
        proc = subprocess.CompletedProcess(["tvmedge", *args], rc, out.getvalue(), err.getvalue())
    else:
        proc = subprocess.run([sys.executable, "-m", "tvmedge", *args], capture_output=True, text=True,
                              timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"tvmedge {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tracker():
    """An RPC tracker on a free loopback port, for one test module."""
    tr = start_tracker(port=0)
    yield tr
    tr.stop()


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory):
    """The trained digits CNN exported to ONNX once per test session."""
    from tvmedge import zoo

    return zoo.export("digits-cnn", tmp_path_factory.mktemp("digits") / "digits.onnx")


@pytest.fixture(scope="session")
def shapes_seg_tar(tmp_path_factory):
    """The trained shapes-seg U-Net compiled for this host, once per test session."""
    from tvmedge import zoo
    from tvmedge.build import compile_model
    from tvmedge.frontend import load_model
    from tvmedge.target import resolve

    d = tmp_path_factory.mktemp("shapes-seg")
    onnx_path = zoo.export("shapes-seg", d / "seg.onnx")
    art = d / "seg.tar"
    compile_model(load_model(onnx_path), resolve("host"), art)
    return art


# ---------------------------------------------------------------- int8 graphs for kernel tests
def extreme_ints(rng, shape, dtype):
    """Random integers of ``dtype`` with its extremes at both ends (255 x -128 products must not wrap)."""
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max + 1, shape, dtype=dtype)
    a.flat[0] = info.max
    a.flat[-1] = info.min
    return a


def int8_conv_module(xshape, w, strides, padding, pad_value=None, layout="NCHW"):
    """An int8 conv (NCHW/OIHW, or NHWC/HWIO as ConvertLayout leaves it), as the quantizer writes it."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(xshape), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            inp = x
            if pad_value is not None:  # what quantize.py writes for a non-zero zero point
                t, left, b, r = padding
                widths = [0, 0, t, b, left, r, 0, 0] if layout == "NHWC" else [0, 0, 0, 0, t, b, left, r]
                inp = bb.emit(relax.op.nn.pad(x, widths, pad_value=float(pad_value)))
                padding = (0, 0, 0, 0)
            y = bb.emit(relax.op.nn.conv2d(inp, relax.const(w), strides=strides, padding=padding, out_dtype="int32",
                                           data_layout=layout, kernel_layout="HWIO" if layout == "NHWC" else "OIHW"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def int8_matmul_module(xshape, w):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(xshape), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(w), out_dtype="int32"))
        bb.emit_func_output(out)
    return bb.get()
