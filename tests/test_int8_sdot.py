"""int8 on AArch64 ``sdot`` (Armv8.2 dot product; ``pi5`` = Cortex-A76): the kernels emit
``sdot``, are bit-exact with TVM's generic int8 ops when run on an emulated Cortex-A76 over
RPC, leave Cortex-A72 targets alone and keep digits-cnn's predictions.

The reference for every kernel is the same Relax module compiled for this host without the
rewrite (generic int8 conv2d / matmul, int32 accumulation). The ``sdot`` libraries are
cross-linked for aarch64 and run by a real TVM RPC server under ``qemu-aarch64 -cpu
cortex-a76`` (qemu's ``cortex-a72`` would fault on ``sdot``, as a Pi 4 would).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from tvmedge import zoo
from tvmedge.build import compile_model, lower, prepare
from tvmedge.deploy.launch import start_tracker
from tvmedge.deploy.session import connect
from tvmedge.frontend import load_model
from tvmedge.optimize import data as data_mod
from tvmedge.lower.int8_dot import ENV_SWITCH, SDOT, has_dotprod, isa_for, rewrite_dot, shift_correction
from tvmedge.optimize.quantize import quantize
from tvmedge.target import resolve

PI5, PI4, HOST = resolve("pi5"), resolve("pi4"), resolve("host")
KEY = f"pi5-test-{os.getpid()}"

# (N, C, H, W), O, K, stride, padding (top, left, bottom, right) - the VNNI test's edge cases
# plus O not a multiple of 4 and a zero-point pad
CONVS = [
    ((1, 1, 8, 8), 32, 3, 1, (1, 1, 1, 1)),
    ((1, 3, 11, 9), 22, 3, 2, (1, 1, 1, 1)),
    ((1, 5, 7, 7), 17, 1, 1, (0, 0, 0, 0)),
    ((2, 16, 6, 10), 32, 3, 1, (0, 1, 2, 1)),
    ((1, 32, 16, 16), 64, 3, 1, (1, 1, 1, 1)),  # parallel
]
MATMULS = [((1, 9), 10), ((4, 37), 33), ((2, 3, 20), 17), ((32, 256), 128)]


def _rand(rng, shape, dtype):
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max + 1, shape, dtype=dtype)
    a.flat[0], a.flat[-1] = info.max, info.min  # 255 x -128 extremes
    return a


def _mod(xshape, w, make):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(xshape), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(make(bb, x, relax.const(w)))
        bb.emit_func_output(out)
    return bb.get()


def _conv(stride, padding, pad_value=None):
    from tvm import relax

    def make(bb, x, w):
        pad = padding
        if pad_value is not None:  # what quantize.py writes for a non-zero zero point
            t, left, b, r = padding
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, t, b, left, r], pad_value=float(pad_value)))
            pad = (0, 0, 0, 0)
        return relax.op.nn.conv2d(x, w, strides=(stride, stride), padding=pad, out_dtype="int32")
    return make


def _requantized(bias, scale):
    """A 3x3 conv with the quantizer's epilogue (int32 bias, float scale, requantize to uint8),
    which the rewrite fuses into the kernel after the shift correction."""
    from tvm import relax

    def make(bb, x, w):
        o = bias.shape[0]
        y = bb.emit(relax.op.nn.conv2d(x, w, padding=(1, 1, 1, 1), out_dtype="int32"))
        y = bb.emit(relax.op.astype(bb.emit(relax.op.add(y, relax.const(bias.reshape(1, o, 1, 1)))), "float32"))
        y = bb.emit(relax.op.multiply(y, relax.const(scale.reshape(1, o, 1, 1))))
        y = bb.emit(relax.op.round(bb.emit(relax.op.divide(y, relax.const(np.float32(0.05))))))
        y = bb.emit(relax.op.maximum(bb.emit(relax.op.minimum(y, relax.const(np.float32(127)))),
                                     relax.const(np.float32(-128))))
        return relax.op.astype(bb.emit(relax.op.add(y, relax.const(np.float32(128)))), "uint8")
    return make


def _matmul(bb, x, w):
    from tvm import relax

    return relax.op.matmul(x, w, out_dtype="int32")


def _cases():
    rng = np.random.default_rng(7)
    cases = []
    for xshape, o, k, s, pad in CONVS:
        w = _rand(rng, (o, xshape[1], k, k), np.int8)
        cases.append((_mod(xshape, w, _conv(s, pad)), _rand(rng, xshape, np.uint8)))
    cases.append((_mod((1, 6, 9, 7), _rand(rng, (24, 6, 3, 3), np.int8), _conv(2, (1, 2, 1, 0), pad_value=97)),
                  _rand(rng, (1, 6, 9, 7), np.uint8)))
    cases.append((_mod((1, 5, 6, 6), _rand(rng, (22, 5, 3, 3), np.int8),
                       _requantized(rng.integers(-3000, 3000, 22).astype("int32"),
                                    (rng.integers(1, 64, 22) * 2.0 ** -12).astype("float32"))),
                  _rand(rng, (1, 5, 6, 6), np.uint8)))
    for xshape, n in MATMULS:
        cases.append((_mod(xshape, _rand(rng, (xshape[-1], n), np.int8), _matmul), _rand(rng, xshape, np.uint8)))
    return cases


def _host_run(mod, x):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target=HOST.target), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _sdot_count(executable) -> int:
    asm = "\n".join(m.inspect_source("asm") for m in executable.mod.imports if m.kind == "llvm")
    return len(re.findall(r"\bsdot\s+v\d+\.4s", asm))


def test_targets():
    assert isa_for(PI5.target) is SDOT and has_dotprod(PI5.target)
    assert isa_for(PI4.target) is None and isa_for(resolve("pi3").target) is None
    assert not has_dotprod(HOST.target)


def test_shift_correction():
    """sdot reads x - 128: sum((x - 128) w) + 128 sum(w) == sum(x w), exactly."""
    rng = np.random.default_rng(0)
    x, w = _rand(rng, (5, 40), np.uint8), _rand(rng, (40, 12), np.int8)
    ref = x.astype(np.int64) @ w
    shifted = (x.astype(np.int64) - 128) @ w
    np.testing.assert_array_equal(shifted + shift_correction(w, 1), ref)


def test_rewrite_ir_and_asm():
    import tvm

    mod, _ = _cases()[3]
    new, layers = rewrite_dot(mod, PI5.target)
    text = new.script(show_meta=False)
    assert len(layers) == 1 and "sdot_conv2d" in text and "R.nn.conv2d" not in text
    assert _sdot_count(tvm.compile(new, target=PI5.target)) >= 8
    assert rewrite_dot(mod, PI4.target) == (mod, [])


# ---------------------------------------------------------------- on an emulated Cortex-A76
@pytest.fixture(scope="module")
def pi5(tmp_path_factory):
    from tvmedge.deploy.emulate import EmulatedDevice
    from tvmedge.deploy.sysroot import prepare_sysroot

    tr = start_tracker(port=0)
    dev = EmulatedDevice("pi5", tr.addr, key=KEY, sysroot=prepare_sysroot("aarch64"))
    try:
        dev.start()
        sess = connect(tr.addr, KEY, timeout=300)
        yield {"session": sess, "dir": tmp_path_factory.mktemp("sdot")}
    finally:
        dev.stop()
        tr.stop()


def _remote_vm(session, executable, path):
    from tvm import relax

    executable.export_library(str(path), fcompile=PI5.linker())
    session.upload(str(path))
    return relax.VirtualMachine(session.load_module(os.path.basename(path)), session.cpu())


@pytest.mark.slow
def test_kernels_bit_exact_on_emulated_pi5(pi5, monkeypatch):
    import tvm

    monkeypatch.setenv("TVMEDGE_INT8_EXACT", "1")  # the epilogues without float reassociation

    sess = pi5["session"]
    for i, (mod, x) in enumerate(_cases()):
        new, layers = rewrite_dot(mod, PI5.target)
        assert len(layers) == 1
        vm = _remote_vm(sess, tvm.compile(new, target=PI5.target), pi5["dir"] / f"case{i}.so")
        got = vm["main"](tvm.runtime.tensor(x, sess.cpu())).numpy()
        ref = _host_run(mod, x)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref, err_msg=f"case {i}: {layers[0]}")
    assert any(len(rewrite_dot(m, PI5.target)[1][0]["epilogue"]) > 5 for m, _ in _cases())


@pytest.mark.slow
def test_digits_int8_on_emulated_pi5(pi5, tmp_path, monkeypatch):
    import tvm

    model = load_model(zoo.export("digits-cnn", tmp_path / "digits.onnx"))
    q, _ = quantize(model, data_mod.load("digits", model, "calib", limit=64), progress=False)
    evals = data_mod.load("digits", model, "eval", limit=96)
    meta = compile_model(q, PI5, tmp_path / "d.tar")
    rec = [r for r in meta["rewrites"] if r["rewrite"] == "int8-arm-sdot"]
    assert rec and rec[0]["conv2d"] == 3 and rec[0]["matmul"] == 2
    assert prepare(q, PI4) is q  # Cortex-A72: no dot product, generic int8

    monkeypatch.setenv("TVMEDGE_INT8_EXACT", "1")  # compared with the generic path below
    ex = lower(q, PI5)
    assert _sdot_count(ex) >= 5
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert _sdot_count(lower(q, PI5)) == 0 and prepare(q, PI5) is q
    ref_vm = tvm.relax.VirtualMachine(lower(q, HOST), tvm.cpu())  # generic int8 on this host
    monkeypatch.delenv(ENV_SWITCH)

    sess = pi5["session"]
    vm = _remote_vm(sess, ex, pi5["dir"] / "digits.so")
    got = np.array([vm["main"](tvm.runtime.tensor(s["input"], sess.cpu())).numpy()[0] for s in evals.samples])
    ref = np.array([ref_vm["main"](tvm.runtime.tensor(s["input"])).numpy()[0] for s in evals.samples])
    # int32 accumulators are exact; the float requantize epilogue is compiled for another CPU
    # (FMA contraction may differ by an ulp), so logits agree closely rather than bit for bit
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert float((got.argmax(1) == evals.labels).mean()) > 0.97
