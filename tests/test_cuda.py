"""CUDA targets (Jetson Nano sm_53, Xavier sm_72) without a GPU: the artifacts embed PTX
compiled with NVRTC for the right arch, TVM's CUDA loader reads them back, and fp16 keeps
the model's numerics. Running on a GPU is checked where one exists (else skipped)."""

from __future__ import annotations

import json
import re
import tarfile

import numpy as np
import pytest

from conftest import extreme_ints, int8_conv_module, int8_matmul_module
from tvmedge.core.errors import TvmedgeError
from tvmedge.frontend import load_model
from tvmedge.target import host_target_dict, resolve

pytest.importorskip("cuda.bindings", reason="cuda-bindings (tvmedge[cuda]) not installed")


def _gpu() -> bool:
    from tvmedge.lower.cuda import gpu_present

    return gpu_present()


@pytest.mark.parametrize("target,arch", [("jetson-nano", "sm_53"), ("jetson-xavier", "sm_72")])
def test_jetson_artifact_embeds_ptx_for_its_arch(digits_onnx, tmp_path, target, arch):
    from tvmedge.build import compile_model

    meta = compile_model(load_model(digits_onnx), resolve(target), tmp_path / "m.tar")
    with tarfile.open(tmp_path / "m.tar") as tar:
        lib = tar.extractfile("model.so").read()
        assert json.loads(tar.extractfile("metadata.json").read())["device_code"] == meta["device_code"]
    assert lib[:4] == b"\x7fELF" and lib[18] == 183  # the host library: aarch64 (EM_AARCH64)
    targets = set(re.findall(rb"^\.target (sm_\d+)", lib, re.M))
    versions = re.findall(rb"^\.version (\d+)\.(\d+)", lib, re.M)
    assert targets == {arch.encode()} and versions, "no PTX for the target's arch in the library"
    assert all((int(a), int(b)) >= (7, 0) for a, b in versions)
    assert b"__global__" not in lib  # no CUDA C source left that a device could not load
    code = meta["device_code"]
    assert code["format"] == "ptx" and code["ptx_targets"] == [arch] and code["nvrtc"].startswith("12.")
    assert code["min_cuda_driver"].startswith("12.")  # PTX ISA 8.x: loads with a CUDA 12 driver or newer
    assert meta["schedules"]["unscheduled"] == [] and meta["schedules"]["default_rule"] > 0


def test_cuda_library_loads_back_as_a_module_graph(digits_onnx, tmp_path):
    """Built with this machine as the host, the library loads here: TVM's CUDA loader reads
    the embedded kernel module (format ptx, arch sm_53) under the VM executable."""
    import tvm

    from tvmedge.build import lower
    from tvmedge.lower.cuda import cuda_modules

    device = resolve(json.dumps({"kind": "cuda", "arch": "sm_53", "host": host_target_dict()}))
    lower(load_model(digits_onnx), device).export_library(str(tmp_path / "h.so"))
    lib = tvm.runtime.load_module(str(tmp_path / "h.so"))
    kinds, todo = [], [(lib, 0)]
    while todo:
        m, depth = todo.pop()
        kinds.append((depth, m.kind))
        todo.extend((i, depth + 1) for i in m.imports)
    assert kinds == [(0, "relax.VMExecutable"), (1, "library"), (2, "cuda")]
    (cuda,) = cuda_modules(lib)
    ptx = cuda.inspect_source("ptx")
    assert re.search(r"^\.target sm_53", ptx, re.M) and ".entry " in ptx
    assert cuda.inspect_source("cuda") == ""  # no source kept


def test_cubin_on_request(monkeypatch, tmp_path):
    from tvmedge.lower.cuda import compile_source, describe_library

    monkeypatch.setenv("TVMEDGE_CUDA_CODE", "cubin")
    cubin = compile_source('extern "C" __global__ void k(float* a) { a[threadIdx.x] *= 2.0f; }', "sm_72", "cubin")
    (tmp_path / "k.bin").write_bytes(b"\x7fELF-host-stand-in" + cubin)
    assert describe_library(tmp_path / "k.bin") == {"format": "cubin", "cubin_targets": ["sm_72"]}


def test_nvrtc_error_is_one_line():
    from tvmedge.lower.cuda import compile_source

    with pytest.raises(TvmedgeError, match=r"NVRTC could not compile the kernels for sm_53: .*error") as e:
        compile_source("this is not CUDA", "sm_53")
    assert "\n" not in str(e.value)


@pytest.mark.skipif("not _gpu()", reason="no CUDA GPU on this machine: the GPU run is checked in benchmarks/cuda.py "
                                        "where one exists")
def test_runs_on_the_gpu_like_onnxruntime(digits_onnx, tmp_path):
    import onnxruntime as ort
    import tvm

    from tvmedge.build import lower

    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    device = resolve(json.dumps({"kind": "cuda", "arch": arch, "host": host_target_dict()}))
    ex = lower(load_model(digits_onnx), device)
    vm = tvm.relax.VirtualMachine(ex, tvm.cuda(0))
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype("float32")
    out = vm["main"](tvm.runtime.tensor(x, tvm.cuda(0))).numpy()
    ref = ort.InferenceSession(str(digits_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


# ----------------------------------------------------------------------------- tuning
@pytest.mark.slow
def test_tune_builder_makes_ptx_candidates_from_the_cuda_search_space(digits_onnx, tmp_path):
    """``tvmedge tune --target jetson-nano``'s builder half, here: MetaSchedule's CUDA search
    space for the heaviest task, candidates sampled and post-processed by its search strategy,
    built by tvmedge's cross builder into aarch64 libraries holding sm_53 PTX. (The runner half
    times them on the board over RPC: see the GPU test below.)"""
    from tvm.s_tir import meta_schedule as ms

    from tvmedge.tune.measure import make_builder
    from tvmedge.tune.tuner import _flops, tuning_tasks

    device = resolve("jetson-nano")
    tasks = tuning_tasks(load_model(digits_onnx), device)
    task = max(tasks, key=lambda t: _flops(t.dispatched[0]) * t.weight)
    ctx = ms.TuneContext(mod=task.dispatched[0], target=device.target, space_generator="post-order-apply",
                         search_strategy=ms.search_strategy.ReplayTrace(), task_name=task.task_name,
                         rand_state=1, num_threads=1)
    spaces = ctx.generate_design_space()
    rules = {str(inst.kind.name) for sch in spaces for inst in sch.trace.insts}
    assert {"Split", "Bind"} <= rules  # a GPU space: tiled and bound to blocks/threads
    ctx.pre_tuning(max_trials=4, num_trials_per_iter=4, design_spaces=spaces)
    candidates = ctx.generate_measure_candidates()
    assert candidates and len({str(c.sch.trace) for c in candidates}) > 1
    builder = make_builder(device.cross_compiler, workers=2, timeout_s=300)
    try:
        results = builder.build([ms.builder.BuilderInput(c.sch.mod, device.target) for c in candidates])
    finally:
        builder.pool.shutdown()
    built = [r.artifact_path for r in results if r.error_msg is None]
    assert len(built) >= len(candidates) // 2, [r.error_msg for r in results]
    for path in built:
        lib = open(path, "rb").read()
        assert lib[18] == 183 and re.search(rb"^\.target sm_53", lib, re.M)


@pytest.mark.slow
@pytest.mark.skipif("not _gpu()", reason="no CUDA GPU on this machine: the runner half of CUDA tuning (timing "
                                        "candidates on the device over RPC) needs one")
def test_tune_over_rpc_on_this_gpu(digits_onnx, tmp_path):
    """The whole loop on this machine's GPU behind a local tracker + RPC server, as on a
    Jetson: MetaSchedule's CUDA candidates built here and timed on the GPU, then compared
    end to end with the untuned default."""
    import tvm

    from conftest import run_cli

    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    target = json.dumps({"kind": "cuda", "arch": arch, "host": host_target_dict()})
    proc = run_cli("tune", str(digits_onnx), "--target", target, "--tuning-db", str(tmp_path / "db"),
                   "--trials", "16", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["trials_run"] >= 8 and rep["devices_used"] == 1
    assert rep["latency_ms"]["tuned"]["median"] > 0 and rep["latency_ms"]["untuned"]["median"] > 0


# ----------------------------------------------------------------------------- fp16
def test_fp16_jetson_nano_ptx_computes_in_half_and_matches_onnxruntime(digits_onnx, tmp_path):
    """--fp16: the PTX computes in half precision; the same fp16 model built for this CPU
    stays within the stated tolerance of ONNX Runtime's fp32 outputs (and is not fp32)."""
    import onnxruntime as ort
    import tvm

    from tvmedge.build import compile_model
    from tvmedge.core.vm import ModelVM
    from tvmedge.lower.fp16 import TOLERANCE, convert
    from tvmedge.lower.pipeline import build

    model = load_model(digits_onnx)
    meta = compile_model(model, resolve("jetson-nano"), tmp_path / "h.tar", fp16=True)
    (rw,) = [r for r in meta["rewrites"] if r["name"] == "fp16"]
    assert 0 < rw["check"]["max_rel_error"] <= TOLERANCE
    with tarfile.open(tmp_path / "h.tar") as tar:
        lib = tar.extractfile("model.so").read()
    assert len(re.findall(rb"\b(?:fma|mul|add)(?:\.rn)?\.f16\b", lib)) > 100 and re.search(rb"^\.target sm_53", lib, re.M)

    ex, _ = build(convert(model.mod), tvm.target.Target(host_target_dict()))
    vm = ModelVM(ex, tvm.cpu(), ["input"])
    sess = ort.InferenceSession(str(digits_onnx), providers=["CPUExecutionProvider"])
    from sklearn.datasets import load_digits

    x = (load_digits().images[:16, None] / 16.0).astype("float32")
    agree = 0
    for img in x:
        out = vm({"input": img[None]})[0]
        ref = sess.run(None, {"input": img[None]})[0]
        assert np.abs(out - ref).max() <= TOLERANCE * np.abs(ref).max()
        agree += int(out.argmax() == ref.argmax())
    assert agree == len(x)


def test_fp16_refused_for_cpu_targets(digits_onnx, tmp_path):
    from tvmedge.build import compile_model

    with pytest.raises(TvmedgeError, match="--fp16 is for CUDA targets"):
        compile_model(load_model(digits_onnx), resolve("pi4"), tmp_path / "p.tar", fp16=True)
    assert not (tmp_path / "p.tar").exists()


# ----------------------------------------------------------------------------- int8 dp4a
def _host_vm(mod):
    import tvm
    from tvm import relax

    return relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())


@pytest.mark.parametrize("xshape,wshape,strides,padding,pad_value", [
    ((1, 3, 9, 9), (8, 3, 3, 3), (2, 2), (1, 1, 1, 1), None),  # stem: 3 channels padded to 4
    ((2, 16, 7, 7), (12, 16, 1, 1), (1, 1), (0, 0, 0, 0), None),  # batch 2, 1x1
    ((1, 6, 5, 6), (5, 6, 3, 3), (1, 1), (1, 0, 2, 1), 7),  # zero-point pad folded, odd O
])
def test_dp4a_conv_kernels_are_bit_exact(xshape, wshape, strides, padding, pad_value):
    """The dp4a kernels' packing, padding and ``x - 128`` correction, with dp4a spelled out
    as byte products (the CPU-buildable twin), against TVM's generic int8 conv2d."""
    from tvmedge.lower import dp4a

    rng = np.random.default_rng(0)
    x, w = extreme_ints(rng, xshape, np.uint8), extreme_ints(rng, wshape, np.int8)
    mod = int8_conv_module(xshape, w, strides, padding, pad_value)
    new, layers = dp4a.rewrite(mod, dp4a.CHECK)
    assert len(layers) == 1 and layers[0]["pad_folded"] == (pad_value is not None)
    assert "R.nn.conv2d" not in new.script(show_meta=False)
    import tvm

    ref, got = (_host_vm(m)["main"](tvm.runtime.tensor(x)).numpy() for m in (mod, new))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref)


def test_dp4a_matmul_kernel_is_bit_exact():
    import tvm

    from tvmedge.lower import dp4a

    rng = np.random.default_rng(1)
    x, w = extreme_ints(rng, (3, 10), np.uint8), extreme_ints(rng, (10, 7), np.int8)  # K = 10: padded to 12
    mod = int8_matmul_module((3, 10), w)
    new, layers = dp4a.rewrite(mod, dp4a.CHECK)
    assert [entry["op"] for entry in layers] == ["matmul"]
    ref, got = (_host_vm(m)["main"](tvm.runtime.tensor(x)).numpy() for m in (mod, new))
    np.testing.assert_array_equal(got, ref)


@pytest.fixture(scope="module")
def digits_int8(digits_onnx):
    from tvmedge.optimize import data as data_mod
    from tvmedge.optimize.quantize import quantize

    model = load_model(digits_onnx)
    q, _ = quantize(model, data_mod.load("digits", model, "calib", limit=64), progress=False)
    return q


def test_int8_on_xavier_uses_dp4a_and_nano_does_not(digits_int8, tmp_path):
    """An int8 model for Xavier (sm_72) computes its convs and matmuls with ``dp4a`` in the
    embedded PTX; Nano (sm_53) has no dp4a and keeps the generic int8 kernels."""
    from tvmedge.build import compile_model

    dp4a_ops = {}
    for target in ("jetson-xavier", "jetson-nano"):
        meta = compile_model(digits_int8, resolve(target), tmp_path / f"{target}.tar")
        with tarfile.open(tmp_path / f"{target}.tar") as tar:
            lib = tar.extractfile("model.so").read()
        dp4a_ops[target] = len(re.findall(rb"\bdp4a\.s32\.s32\b", lib))
        rewrites = [r for r in meta["rewrites"] if r.get("rewrite") == "int8-cuda-dp4a"]
        assert meta["schedules"]["unscheduled"] == []
        if target == "jetson-xavier":
            assert rewrites == [{"rewrite": "int8-cuda-dp4a", "arch": "sm_72", "layers": 5, "conv2d": 3, "matmul": 2}]
        else:
            assert rewrites == []
    assert dp4a_ops["jetson-xavier"] > 0 and dp4a_ops["jetson-nano"] == 0, dp4a_ops


def test_dp4a_graph_is_bit_exact_with_the_generic_int8_model(digits_int8, monkeypatch):
    """The whole graph as prepared for Xavier (int8 convs with their requantize epilogues and
    the matmuls on dp4a kernels), with the CPU-buildable twin kernels, gives the generic int8
    model's outputs bit for bit on real digits."""
    import tvm

    from tvmedge.lower.pipeline import graph_passes
    from tvmedge.optimize import data as data_mod

    monkeypatch.setenv("TVMEDGE_INT8_EXACT", "1")  # no float reassociation in the epilogues
    target = resolve("jetson-xavier").target
    with target:
        twin = tvm.transform.Sequential(graph_passes(target, dp4a_flavour="check"))(digits_int8.mod)
    text = twin.script(show_meta=False)
    assert text.count("def dp4a_check_") >= 3 and "R.nn.conv2d" not in text and "R.matmul" not in text
    ref, got = _host_vm(digits_int8.mod), _host_vm(twin)
    for s in data_mod.load("digits", digits_int8, "eval").samples[:64]:
        x = tvm.runtime.tensor(s["input"])
        np.testing.assert_array_equal(got["main"](x).numpy(), ref["main"](x).numpy())


@pytest.mark.skipif("not _gpu()", reason="no CUDA GPU on this machine: dp4a kernels are run where one exists")
def test_dp4a_model_runs_on_the_gpu_like_the_cpu(digits_int8):
    import tvm

    from tvmedge.build import lower

    arch = int(tvm.cuda(0).compute_version.replace(".", ""))
    if arch < 61:
        pytest.skip(f"this GPU (sm_{arch}) has no dp4a")
    device = resolve(json.dumps({"kind": "cuda", "arch": f"sm_{arch}", "host": host_target_dict()}))
    gpu = tvm.relax.VirtualMachine(lower(digits_int8, device), tvm.cuda(0))
    cpu = _host_vm(digits_int8.mod)
    x = np.random.default_rng(0).random((1, 1, 8, 8)).astype("float32")
    out, ref = gpu["main"](tvm.runtime.tensor(x, tvm.cuda(0))).numpy(), cpu["main"](tvm.runtime.tensor(x)).numpy()
    # the int32 sums are exact; the float requantize may contract to FMAs on the GPU (a step apart)
    assert out.argmax() == ref.argmax() and np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
