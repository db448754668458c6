"""int8 on x86 AVX-512 VNNI: the VNNI kernels are bit-exact with the generic Relax int8 ops,
really emit ``vpdpbusd``, leave non-VNNI targets alone and keep digits-cnn's predictions.

Every check compares the rewritten module against the same module compiled without the
rewrite (TVM's generic int8 conv2d / matmul), on random and edge shapes. Skipped on hosts
without AVX-512 VNNI (the kernels could not run here).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from conftest import extreme_ints, int8_conv_module, int8_matmul_module
from tvmedge import zoo
from tvmedge.build import compile_model, lower, prepare
from tvmedge.frontend import load_model
from tvmedge.optimize import data as data_mod
from tvmedge.lower.int8_dot import ENV_SWITCH, apply, has_vnni, rewrite_dot
from tvmedge.optimize.quantize import quantize
from tvmedge.target import resolve

HOST = resolve("host")
pytestmark = pytest.mark.skipif(not has_vnni(HOST.target), reason="host CPU has no AVX-512 VNNI")


def _run(mod, args: list[np.ndarray]) -> np.ndarray:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target=HOST.target), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def _check(mod, args: list[np.ndarray], n_rewritten: int) -> None:
    new, layers = rewrite_dot(mod, HOST.target)
    assert len(layers) == n_rewritten, layers
    text = new.script(show_meta=False)
    assert "vnni_" in text and "R.nn.conv2d" not in text and "R.matmul" not in text
    ref, got = _run(mod, args), _run(new, args)
    assert got.dtype == np.int32 and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


# (N, C, H, W), O, K, stride, padding (top, left, bottom, right)
CONVS = [
    ((1, 1, 8, 8), 32, 3, 1, (1, 1, 1, 1)),      # 1 input channel (digits-cnn's first layer)
    ((1, 3, 11, 9), 20, 3, 2, (1, 1, 1, 1)),     # 3 channels, stride 2, O not a multiple of 16
    ((1, 5, 7, 7), 17, 1, 1, (0, 0, 0, 0)),      # 1x1, C not a multiple of 4, O = 17
    ((2, 16, 6, 10), 32, 3, 1, (0, 1, 2, 1)),    # batch 2, asymmetric padding
    ((1, 64, 14, 14), 48, 3, 2, (1, 1, 1, 1)),
    ((1, 8, 9, 9), 16, 5, 1, (2, 2, 2, 2)),
    ((1, 32, 5, 5), 64, 1, 2, (0, 0, 0, 0)),     # 1x1 stride 2 (ResNet downsample)
    ((1, 32, 16, 16), 64, 3, 1, (1, 1, 1, 1)),   # big enough to run in parallel
    ((1, 24, 6, 16), 144, 1, 1, (0, 0, 0, 0)),   # 9 channel blocks: 3 per register tile
]


@pytest.mark.parametrize("xshape,o,k,stride,padding", CONVS)
def test_conv_bit_exact(xshape, o, k, stride, padding):
    rng = np.random.default_rng(sum(xshape) + o)
    w = extreme_ints(rng, (o, xshape[1], k, k), np.int8)
    x = extreme_ints(rng, xshape, np.uint8)
    _check(int8_conv_module(xshape, w, (stride, stride), padding), [x], 1)


@pytest.mark.parametrize("xshape,o,k,stride,padding", CONVS)
def test_conv_nhwc_bit_exact(xshape, o, k, stride, padding):
    n, c, h, w_ = xshape
    rng = np.random.default_rng(sum(xshape) + o + 1)
    w = extreme_ints(rng, (k, k, c, o), np.int8)
    x = extreme_ints(rng, (n, h, w_, c), np.uint8)
    _check(int8_conv_module((n, h, w_, c), w, (stride, stride), padding, layout="NHWC"), [x], 1)


def test_conv_nhwc_zero_point_pad_folded():
    rng = np.random.default_rng(2)
    w = extreme_ints(rng, (3, 3, 6, 24), np.int8)
    x = extreme_ints(rng, (1, 9, 7, 6), np.uint8)
    mod = int8_conv_module((1, 9, 7, 6), w, (2, 2), (1, 2, 1, 0), pad_value=97, layout="NHWC")
    new, layers = rewrite_dot(mod, HOST.target)
    assert layers[0]["pad_folded"] and layers[0]["layout"] == "NHWC" and "R.nn.pad" not in new.script(show_meta=False)
    _check(mod, [x], 1)


def test_conv_zero_point_pad_folded():
    """A conv fed by ``R.nn.pad(pad_value=zp)``: the pad is folded into the kernel's relayout."""
    rng = np.random.default_rng(1)
    w = extreme_ints(rng, (24, 6, 3, 3), np.int8)
    x = extreme_ints(rng, (1, 6, 9, 7), np.uint8)
    mod = int8_conv_module((1, 6, 9, 7), w, (2, 2), (1, 2, 1, 0), pad_value=97)
    new, layers = rewrite_dot(mod, HOST.target)
    assert layers[0]["pad_folded"] and "R.nn.pad" not in new.script(show_meta=False)
    _check(mod, [x], 1)


def _requant_mod(xshape, w, bias, scale, layout, branch=False):
    """An int8 conv with the epilogue the quantizer writes: int32 bias, float scale, ReLU6,
    requantize to uint8 (``branch``: the float value before the requantize is an output too)."""
    from tvm import relax

    o = bias.shape[0]
    per_channel = (1, 1, 1, o) if layout == "NHWC" else (1, o, 1, 1)
    f32 = lambda v: relax.const(np.float32(v))  # noqa: E731
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(xshape), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=(1, 1, 1, 1), out_dtype="int32",
                                           data_layout=layout, kernel_layout="HWIO" if layout == "NHWC" else "OIHW"))
            y = bb.emit(relax.op.add(y, relax.const(bias.reshape(per_channel))))
            y = bb.emit(relax.op.astype(y, "float32"))
            y = bb.emit(relax.op.multiply(relax.const(scale.reshape(per_channel)), y))
            y = bb.emit(relax.op.maximum(y, relax.const(np.zeros((1, 1, 1, 1), "float32"))))
            f = bb.emit(relax.op.minimum(y, f32(6.0)))
            y = bb.emit(relax.op.divide(f, f32(0.0213)))
            y = bb.emit(relax.op.round(y))
            y = bb.emit(relax.op.add(y, f32(3.0)))
            y = bb.emit(relax.op.minimum(y, f32(255.0)))
            y = bb.emit(relax.op.maximum(y, f32(0.0)))
            y = bb.emit(relax.op.astype(y, "uint8"))
            out = bb.emit_output(relax.Tuple([y, f]) if branch else y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("layout,o", [("NHWC", 32), ("NHWC", 24), ("NCHW", 32)])
def test_conv_epilogue_fused_bit_exact(layout, o, monkeypatch):
    """The bias / scale / ReLU6 / requantize chain runs inside the kernel (one call, uint8 out)
    with the same result as the generic ops (``TVMEDGE_INT8_EXACT=1``); O = 24 is not whole
    channel blocks (a separate write-back stage), NCHW writes channels-first. ReLU6's clamp is
    folded into the requantize clamp and the tail (round, zero point, clamp) runs in int32:
    both exact."""
    monkeypatch.setenv("TVMEDGE_INT8_EXACT", "1")
    mod, x = _requant_case(layout, o)
    new, layers = rewrite_dot(mod, HOST.target)
    assert layers[0]["epilogue"] == ["add", "astype", "multiply", "divide", "round_int", "add", "maximum", "minimum",
                                     "astype"]
    text = new.script(show_meta=False)
    assert text.count("R.call_tir") == 1 and "R.add" not in text and "R.round" not in text
    ref, got = _run(mod, [x]), _run(new, [x])
    assert got.dtype == np.uint8 and ref.dtype == np.uint8 and 0 < got.mean() < 255
    np.testing.assert_array_equal(got, ref)


def _requant_case(layout, o):
    rng = np.random.default_rng(o)
    c = 8
    w = extreme_ints(rng, (3, 3, c, o) if layout == "NHWC" else (o, c, 3, 3), np.int8)
    x = extreme_ints(rng, (1, 10, 12, c) if layout == "NHWC" else (1, c, 10, 12), np.uint8)
    bias = rng.integers(-5000, 5000, o).astype("int32")
    scale = (rng.integers(1, 40, o) * 2.0 ** -14).astype("float32")
    return _requant_mod(x.shape, w, bias, scale, layout), x


def test_conv_epilogue_folds_the_requantize_divide_into_the_scale():
    """By default the dequantize scale and the requantize divisor are one multiply (a float
    reassociation): a value within an ulp of a rounding tie may land one step off, no more."""
    mod, x = _requant_case("NHWC", 32)
    new, layers = rewrite_dot(mod, HOST.target)
    assert layers[0]["epilogue"] == ["add", "astype", "multiply", "round_int", "add", "maximum", "minimum", "astype"]
    ref, got = _run(mod, [x]).astype(int), _run(new, [x]).astype(int)
    assert np.abs(got - ref).max() <= 1 and (got == ref).mean() >= 0.99


def test_conv_epilogue_stops_at_a_shared_value():
    """A value read twice ends the chain: the kernel computes up to it, the rest stays."""
    import tvm
    from tvm import relax

    rng = np.random.default_rng(3)
    w = extreme_ints(rng, (3, 3, 8, 16), np.int8)
    x = extreme_ints(rng, (1, 6, 6, 8), np.uint8)
    bias = rng.integers(-5000, 5000, 16).astype("int32")
    scale = np.full(16, 2.0 ** -10, "float32")
    mod = _requant_mod(x.shape, w, bias, scale, "NHWC", branch=True)
    new, layers = rewrite_dot(mod, HOST.target)
    assert layers[0]["epilogue"] == ["add", "astype", "multiply", "maximum", "minimum"]
    assert "R.round" in new.script(show_meta=False)
    run = lambda m: relax.VirtualMachine(tvm.compile(m, target=HOST.target), tvm.cpu())["main"](  # noqa: E731
        tvm.runtime.tensor(x))
    for a, b in zip(run(mod), run(new)):
        np.testing.assert_array_equal(b.numpy(), a.numpy())


@pytest.mark.parametrize("xshape,n", [((1, 9), 10), ((1, 256), 128), ((4, 37), 33), ((3, 64), 16),
                                      ((2, 3, 20), 17), ((32, 256), 512)])
def test_matmul_bit_exact(xshape, n):
    rng = np.random.default_rng(xshape[-1] + n)
    w = extreme_ints(rng, (xshape[-1], n), np.int8)
    x = extreme_ints(rng, xshape, np.uint8)
    _check(int8_matmul_module(xshape, w), [x], 1)


def test_small_kernels_run_serially():
    """Waking the thread pool costs more than a small layer's work: only big kernels are parallel."""
    from tvmedge.lower.int8_dot import conv2d_func, matmul_func, worth_parallel

    def parallel(f) -> bool:
        return "T.parallel" in f.script()

    assert not worth_parallel(64 * 8 * 8 * 9 * 32) and worth_parallel(512 * 7 * 7 * 9 * 512)
    assert not parallel(conv2d_func(1, 32, 8, 8, 64, 3, 3, (1, 1), (1, 1, 1, 1)))  # digits-cnn's 2nd conv
    assert parallel(conv2d_func(1, 64, 56, 56, 64, 3, 3, (1, 1), (1, 1, 1, 1)))  # resnet18's
    assert not parallel(matmul_func(1, 256, 128)) and parallel(matmul_func(64, 512, 512))


def test_not_rewritten():
    """Depthwise convs, non-constant weights, int8 (signed) or float inputs stay generic."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 8, 6, 6], "uint8"))
    s = relax.Var("s", relax.TensorType([2, 8], "int8"))
    wv = relax.Var("w", relax.TensorType([8, 3], "int8"))
    f = relax.Var("f", relax.TensorType([1, 8, 6, 6], "float32"))
    with bb.function("main", [x, s, wv, f]):
        with bb.dataflow():
            dw = bb.emit(relax.op.nn.conv2d(x, relax.const(np.ones((8, 1, 3, 3), np.int8)), groups=8,
                                            out_dtype="int32"))
            dyn = bb.emit(relax.op.matmul(relax.op.astype(s, "uint8"), wv, out_dtype="int32"))
            signed = bb.emit(relax.op.matmul(s, relax.const(np.ones((8, 3), np.int8)), out_dtype="int32"))
            fl = bb.emit(relax.op.nn.conv2d(f, relax.const(np.ones((4, 8, 3, 3), np.float32))))
            out = bb.emit_output(relax.Tuple([dw, dyn, signed, fl]))
        bb.emit_func_output(out)
    mod = bb.get()
    assert rewrite_dot(mod, HOST.target) == (mod, [])


def test_register_before_tvm_intrinsics():
    """Compiling with the VNNI kernels, then tuning in the same process: MetaSchedule imports
    ``tvm.s_tir.tensor_intrin``, which registers TVM's ``dot_16x4_vnni`` without override (here
    done by hand: that import takes ~20 s); tvmedge's names must not collide with it."""
    code = ("from tvmedge.lower.intrin import VNNI_INTRIN_LOCAL, _vnni_funcs, register_vnni; "
            "register_vnni(); from tvm.s_tir import TensorIntrin; "
            "TensorIntrin.register('dot_16x4_vnni', *_vnni_funcs('global')); "
            "TensorIntrin.get(VNNI_INTRIN_LOCAL); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# ---------------------------------------------------------------- digits-cnn end to end
@pytest.fixture(scope="module")
def digits_int8(tmp_path_factory):
    d = tmp_path_factory.mktemp("vnni")
    model = load_model(zoo.export("digits-cnn", d / "digits.onnx"))
    calib = data_mod.load("digits", model, "calib", limit=64)
    evals = data_mod.load("digits", model, "eval")
    q, _ = quantize(model, calib, progress=False)
    return {"dir": d, "q": q, "eval": evals}


def _predictions(executable, evals) -> np.ndarray:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    return np.array([vm["main"](tvm.runtime.tensor(s["input"])).numpy()[0] for s in evals.samples])


def _vpdpbusd(executable) -> dict[str, int]:
    """``vpdpbusd`` instructions in the generated x86 assembly, by register width."""
    asm = "\n".join(m.inspect_source("asm") for m in executable.mod.imports if m.kind == "llvm")
    return {w: len(re.findall(r"vpdpbusd\s+%" + w, asm)) for w in ("xmm", "ymm", "zmm")}


def test_digits_vnni_same_predictions_and_asm(digits_int8, monkeypatch):
    q, evals = digits_int8["q"], digits_int8["eval"]
    monkeypatch.setenv("TVMEDGE_INT8_EXACT", "1")  # the epilogues without float reassociation
    ex_vnni = lower(q, HOST)
    # 512-bit vpdpbusd from the VNNI kernels; LLVM's own vectorizer, on the generic path, at
    # most uses a few 128-bit ones in a reduction tail
    assert _vpdpbusd(ex_vnni)["zmm"] >= 5
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert prepare(q, HOST) is q
    ex_generic = lower(q, HOST)
    assert _vpdpbusd(ex_generic)["zmm"] == 0
    out_v, out_g = _predictions(ex_vnni, evals), _predictions(ex_generic, evals)
    # int32 accumulators are bit-exact, the float epilogue computes the same: same logits
    np.testing.assert_array_equal(out_v, out_g)
    acc = float((out_v.argmax(1) == evals.labels).mean())
    assert acc > 0.97


def test_digits_artifact_metadata_and_pi4(digits_int8):
    q = digits_int8["q"]
    meta = compile_model(q, HOST, digits_int8["dir"] / "d.tar")
    rec = [r for r in meta["rewrites"] if r["rewrite"] == "int8-x86-vnni"]
    assert rec and rec[0]["conv2d"] == 3 and rec[0]["matmul"] == 2
    with tarfile.open(digits_int8["dir"] / "d.tar") as tar:
        stored = json.load(tar.extractfile("metadata.json"))
    assert stored["rewrites"] == meta["rewrites"]
    pi4 = resolve("pi4")
    assert not has_vnni(pi4.target)
    assert apply(q, pi4.target) is q and prepare(q, pi4) is q
    assert rewrite_dot(q.mod, pi4.target) == (q.mod, [])


def test_tuning_tasks_skip_vnni_kernels(digits_int8):
    """`tvmedge tune` tunes the graph `compile` builds: on this host the int8 convs are VNNI
    kernels (already scheduled, not tasks); for pi4 they stay generic int8 tasks."""
    from tvmedge.tune.tuner import tuning_tasks

    def int8_tasks(device) -> list[str]:
        names = []
        for t in tuning_tasks(digits_int8["q"], device):
            text = t.dispatched[0].script()
            if "uint8" in text and "int8" in text.replace("uint8", "") and "int32" in text:
                names.append(t.task_name)
        return names

    host = tuning_tasks(digits_int8["q"], HOST)
    assert host and not int8_tasks(HOST)
    assert len(int8_tasks(resolve("pi4"))) >= 5  # 3 convs + 2 matmuls with uint8 x int8 -> int32
