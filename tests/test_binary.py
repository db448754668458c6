"""Binary networks: quantizer gradients, binary layers vs float references, the trained
digits-bnn, and its lowering to packed XNOR/popcount operators (IR, exactness, host and pi4)."""

from __future__ import annotations

import subprocess
import tarfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tvmedge import zoo
from tvmedge.binary import ApproxSign, BinaryConv2d, BinaryDense, SignSTE
from tvmedge.binary.digits_bnn import held_out_accuracy
from tvmedge.binary.lower import lower_module, to_imported_model
from tvmedge.build import compile_model
from tvmedge.run import run_artifact
from tvmedge.target import resolve
from tvmedge.zoo.digits import load_split
from conftest import run_cli

BNN_MIN_ACCURACY = 0.95  # shipped weights: 97.6 % (float digits-cnn: 99.6 %)


def sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0)


def compile_and_run(mod_model, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    ex = tvm.compile(mod_model, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


# ----------------------------------------------------------------------------- layers
def test_sign_ste_gradient() -> None:
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    y = SignSTE()(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    y.backward(torch.arange(1.0, 8.0))
    assert x.grad.tolist() == [0, 2, 3, 4, 5, 6, 0]  # passes through where |x| <= 1


def test_approx_sign_gradient() -> None:
    x = torch.tensor([-1.5, -0.5, 0.0, 0.25, 1.0], requires_grad=True)
    ApproxSign()(x).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.0, 1.0, 2.0, 1.5, 0.0]))


@pytest.mark.parametrize("pad_value", [0.0, 1.0, -1.0])
def test_binary_conv_equals_float_conv_on_signs(pad_value: float) -> None:
    torch.manual_seed(0)
    layer = BinaryConv2d(5, 7, 3, stride=2, padding=1, input_quantizer=SignSTE(),
                         kernel_quantizer=SignSTE(), pad_value=pad_value)
    x = torch.randn(2, 5, 9, 9)
    alpha = layer.weight.abs().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    xp = F.pad(sign(x), [1] * 4, value=pad_value)
    ref = F.conv2d(xp, sign(layer.weight) * alpha, stride=2)
    assert torch.allclose(layer(x), ref, atol=1e-5)


def test_binary_dense_equals_float_dense_on_signs() -> None:
    torch.manual_seed(0)
    layer = BinaryDense(70, 9, bias=True, input_quantizer=SignSTE(), kernel_quantizer=SignSTE())
    x = torch.randn(3, 70)
    ref = F.linear(sign(x), sign(layer.weight) * layer.weight.abs().mean(1, keepdim=True), layer.bias)
    assert torch.allclose(layer(x), ref, atol=1e-5)
    x.requires_grad_(True)
    layer(x).sum().backward()  # the STE lets gradients reach the input and the latent weights
    assert x.grad is not None and layer.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- trained model
def test_digits_bnn_accuracy(record_property) -> None:
    bnn = held_out_accuracy(zoo.get("digits-bnn").build())
    cnn = held_out_accuracy(zoo.get("digits-cnn").build())
    record_property("accuracy", {"digits-bnn": bnn, "digits-cnn": cnn})
    print(f"held-out accuracy: digits-bnn {bnn:.4f}, float digits-cnn {cnn:.4f}")
    assert bnn >= BNN_MIN_ACCURACY
    assert cnn - bnn < 0.05


# ----------------------------------------------------------------------------- lowering
@pytest.mark.parametrize("cin,stride,pad,pad_value", [(70, 1, 1, 0.0), (64, 2, 1, -1.0),
                                                     (130, 1, 2, 1.0), (3, 1, 0, 0.0)])
def test_lowered_binary_conv_is_bit_exact(cin: int, stride: int, pad: int, pad_value: float) -> None:
    """Unscaled binary conv + binary dense: integer outputs must match exactly."""
    torch.manual_seed(cin)
    conv = BinaryConv2d(cin, 24, 3, stride=stride, padding=pad, input_quantizer=SignSTE(),
                        kernel_quantizer=SignSTE(), scale=None, pad_value=pad_value)
    net = nn.Sequential(conv).eval()
    x = torch.randn(2, cin, 7, 7)
    mod, layers = lower_module(net, tuple(x.shape))
    out = compile_and_run(mod, x.numpy())
    with torch.no_grad():
        ref = net(x).numpy()
    assert layers[0]["k_bits"] == cin * 9
    np.testing.assert_array_equal(out, ref)

    dense = nn.Sequential(nn.Flatten(), BinaryDense(cin * 49, 33, input_quantizer=SignSTE(),
                                                    kernel_quantizer=SignSTE(), scale=None)).eval()
    out = compile_and_run(lower_module(dense, tuple(x.shape))[0], x.numpy())
    with torch.no_grad():
        np.testing.assert_array_equal(out, dense(x).numpy())


@pytest.fixture(scope="module")
def digits_bnn() -> nn.Module:
    return zoo.get("digits-bnn").build()


def test_lowered_module_runs_on_packed_bits(digits_bnn) -> None:
    import tvm
    from tvm import relax

    imported = to_imported_model(digits_bnn, (1, 1, 8, 8))
    assert [layer["layer"] for layer in imported.rewrites[0]["layers"]] == \
        ["BinaryConv2d", "BinaryConv2d", "BinaryDense"]
    target = tvm.target.Target({"kind": "llvm"})
    lowered = relax.backend.cpu_generic.get_default_pipeline(target)(imported.mod)
    names = [gv.name_hint for gv in lowered.functions]
    # pack + xnor kernels survive fusion as their own functions
    assert sum(n.startswith("bnn_pack") for n in names) == 3
    assert sum(n.startswith("bnn_xnor_conv2d") for n in names) == 2
    assert sum(n.startswith("bnn_xnor_dense") for n in names) == 1
    for gv, func in lowered.functions.items():
        if gv.name_hint.startswith("bnn_xnor"):
            text = func.script()
            assert "popcount" in text and "uint64" in text
    # No float conv/matmul is left for the binary layers: the only ones are the float
    # first conv and the last linear layer.
    assert sum("conv2d" in n and not n.startswith("bnn") for n in names) == 1
    assert sum("matmul" in n for n in names) == 1


def test_lowered_digits_bnn_matches_pytorch(digits_bnn) -> None:
    _, _, xte, yte = load_split()
    out = compile_and_run(to_imported_model(digits_bnn, xte.shape).mod, xte)
    with torch.no_grad():
        ref = digits_bnn(torch.from_numpy(xte)).numpy()
    assert (out.argmax(1) == ref.argmax(1)).all()
    np.testing.assert_allclose(out, ref, atol=1e-3, rtol=1e-4)
    assert (out.argmax(1) == yte).mean() >= BNN_MIN_ACCURACY


def test_artifact_host_and_pi4(digits_bnn, tmp_path) -> None:
    _, _, xte, _ = load_split()
    imported = to_imported_model(digits_bnn, (1, 1, 8, 8))
    compile_model(imported, resolve("host"), tmp_path / "host.tar")
    res = run_artifact(tmp_path / "host.tar", {"input": xte[:1]}, repeat=3, threads=1)
    with torch.no_grad():
        ref = digits_bnn(torch.from_numpy(xte[:1])).numpy()
    np.testing.assert_allclose(res.outputs[0], ref, atol=1e-3, rtol=1e-4)

    meta = compile_model(imported, resolve("pi4"), tmp_path / "pi4.tar")
    assert meta["target"]["mtriple"].startswith("aarch64")
    with tarfile.open(tmp_path / "pi4.tar") as tar:
        head = tar.extractfile("model.so").read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64


def test_cli_export_relax_and_compile(tmp_path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return run_cli(*args, timeout=300)

    p = cli("zoo", "export", "digits-bnn", "-o", str(tmp_path / "bnn.relax"))
    assert p.returncode == 0, p.stderr
    p = cli("compile", str(tmp_path / "bnn.relax"), "-o", str(tmp_path / "bnn.tar"))
    assert p.returncode == 0, p.stderr
    res = run_artifact(tmp_path / "bnn.tar", repeat=1, threads=1)
    assert res.outputs[0].shape == (1, 10)
    p = cli("zoo", "export", "digits-cnn", "-o", str(tmp_path / "cnn.relax"))
    assert p.returncode == 1 and "binary networks" in p.stderr
