"""CUDA targets (Jetson Nano sm_53, Xavier sm_72) without a GPU: the artifacts embed PTX
compiled with NVRTC for the right arch, TVM's CUDA loader reads them back, and fp16 keeps
the model's numerics. Running on a GPU is checked where one exists (else skipped)."""

from __future__ import annotations

import json
import re
import tarfile

import numpy as np
import pytest

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
