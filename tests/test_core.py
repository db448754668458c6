"""Core path: import (ONNX, .pt2) -> compile -> artifact -> run, checked against the source framework."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from tvmedge import zoo
from tvmedge.build import compile_model
from tvmedge.deploy.address import format_host_port
from tvmedge.deploy.launch import start_server, start_tracker
from tvmedge.core.errors import TvmedgeError
from tvmedge.core.schema import validate
from tvmedge.frontend import load_model
from tvmedge.run import run_artifact
from tvmedge.target import resolve
from conftest import run_cli

ZOO_NAMES = ["digits-cnn", "mobilenet_v2", "resnet18", "lraspp_mbv3"]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return run_cli(*args, check=check)


@pytest.fixture(scope="module")
def host():
    return resolve("host")


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_onnx_matches_onnxruntime(name, host, tmp_path):
    import onnxruntime as ort

    entry = zoo.get(name)
    onnx_path = zoo.export(name, tmp_path / f"{name}.onnx")
    model = load_model(onnx_path)
    assert [i.shape for i in model.inputs] == [list(entry.input_shape)]
    meta = compile_model(model, host, tmp_path / "m.tar", use_shipped=False)
    # Untuned, every kernel gets one of tvmedge's default CPU schedules: none is left naive.
    assert meta["schedules"]["unscheduled"] == [] and meta["schedules"]["tuned"] == 0
    assert meta["schedules"]["default_rule"] > 0
    x = zoo.example_input(entry, seed=1).numpy()
    res = run_artifact(tmp_path / "m.tar", {model.inputs[0].name: x}, repeat=1)
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {entry.input_name: x})[0]
    assert res.outputs[0].shape == ref.shape
    assert rel_err(res.outputs[0], ref) < 1e-4


# .pt2 imports of the two big models take half a minute each: in the slow run (the ONNX
# test above covers them by default, the coverage matrix covers .pt2 on other families).
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("lraspp_mbv3", "mobilenet_v2")
                                  else n for n in ZOO_NAMES])
def test_pt2_matches_pytorch(name, host, tmp_path):
    entry = zoo.get(name)
    pt2 = zoo.export(name, tmp_path / f"{name}.pt2")
    model = load_model(pt2)
    compile_model(model, host, tmp_path / "m.tar")
    x = zoo.example_input(entry, seed=2)
    res = run_artifact(tmp_path / "m.tar", {model.inputs[0].name: x.numpy()}, repeat=1)
    with torch.no_grad():
        ref = entry.build()(x).numpy()
    assert rel_err(res.outputs[0], ref) < 1e-4


def test_digits_cnn_accuracy_compiled(host, tmp_path):
    """The trained zoo model keeps >= 97 % held-out accuracy once compiled."""
    import tvm
    from tvm import relax

    from tvmedge.core.artifact import read_artifact
    from tvmedge.zoo.digits import accuracy, load_split

    _, _, xte, yte = load_split()
    compile_model(load_model(zoo.export("digits-cnn", tmp_path / "d.onnx")), host, tmp_path / "d.tar")
    lib_path, _ = read_artifact(tmp_path / "d.tar", tmp_path / "x")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
    logits = np.concatenate([vm["main"](tvm.runtime.tensor(xte[i:i + 1])).numpy() for i in range(len(xte))])
    assert accuracy(logits, yte) >= 0.97


def test_artifact_contents_and_plain_runtime_load(host, tmp_path):
    """The artifact has the library + metadata, and loads with the plain TVM runtime (no tvmedge)."""
    pt = zoo.export("digits-cnn", tmp_path / "d.onnx")
    cli("compile", str(pt), "-o", str(tmp_path / "d.tar"), check=True)
    with tarfile.open(tmp_path / "d.tar") as tar:
        assert set(tar.getnames()) == {"model.so", "metadata.json"}
        tar.extractall(tmp_path / "x", filter="data")
    meta = json.loads((tmp_path / "x" / "metadata.json").read_text())
    assert meta["inputs"] == [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert meta["outputs"][0]["shape"] == [1, 10]
    assert meta["model"]["sha256"] and meta["tvm_version"].startswith("0.27")
    code = (
        "import numpy as np, tvm\nfrom tvm import relax\n"
        f"lib = tvm.runtime.load_module({str(tmp_path / 'x' / 'model.so')!r})\n"
        "vm = relax.VirtualMachine(lib, tvm.cpu())\n"
        "out = vm['main'](tvm.runtime.tensor(np.zeros((1, 1, 8, 8), 'float32')))\n"
        "import sys; print(out.numpy().shape); assert 'tvmedge' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "(1, 10)" in proc.stdout


def test_cross_compile_pi4_is_aarch64_elf(tmp_path):
    pt = zoo.export("digits-cnn", tmp_path / "d.onnx")
    cli("compile", str(pt), "-o", str(tmp_path / "pi4.tar"), "--target", "pi4", check=True)
    with tarfile.open(tmp_path / "pi4.tar") as tar:
        data = tar.extractfile("model.so").read(64)
        meta = json.loads(tar.extractfile("metadata.json").read())
    assert data[:4] == b"\x7fELF"
    assert int.from_bytes(data[18:20], "little") == 183  # EM_AARCH64
    assert meta["device"]["cross_compiler"] == "aarch64-linux-gnu-g++"
    assert meta["target"]["mtriple"] == "aarch64-linux-gnu"
    # Running it here is refused with a clear message, not a loader crash.
    proc = cli("run", str(tmp_path / "pi4.tar"))
    assert proc.returncode != 0 and "aarch64" in proc.stderr and "Traceback" not in proc.stderr


def test_run_cli_json_outputs_threads(tmp_path):
    pt = zoo.export("digits-cnn", tmp_path / "d.onnx")
    cli("compile", str(pt), "-o", str(tmp_path / "d.tar"), check=True)
    x = zoo.example_input(zoo.get("digits-cnn"), seed=3).numpy()
    np.savez(tmp_path / "in.npz", input=x)
    proc = cli("run", str(tmp_path / "d.tar"), "--inputs", str(tmp_path / "in.npz"), "--outputs",
               str(tmp_path / "out.npz"), "--repeat", "5", "--threads", "1", "--json", check=True)
    info = json.loads(proc.stdout)
    assert set(info["latency_ms"]) >= {"median", "p90", "min"}
    assert 0 < info["latency_ms"]["min"] <= info["latency_ms"]["median"] <= info["latency_ms"]["p90"]
    assert info["threads"] == 1 and info["latency_ms"]["runs"] == 5
    assert info["device"]["via"] == "local" and info["device"]["target"]["kind"] == "llvm"
    assert info["device"]["kind"] == "hardware" and info["device"]["cpu"]
    validate(info)
    # --compare: ONNX Runtime on this host, same inputs, in the same schema
    proc = run_cli("run", str(tmp_path / "d.tar"), "--inputs", str(tmp_path / "in.npz"), "--repeat", "3",
                   "--threads", "1", "--compare", str(pt), "--json", check=True, in_process=True)
    cmp = json.loads(proc.stdout)
    validate(cmp)
    ort = cmp["baselines"]["onnxruntime"]
    assert ort["max_abs_diff"] < 1e-4 and ort["latency_ms"]["runs"] == 3 and ort["device"]["threads"] == 1
    text = run_cli("run", str(tmp_path / "d.tar"), "--repeat", "2", "--compare", str(pt), check=True,
                   in_process=True).stdout
    assert "ONNX Runtime on this host" in text and "tvmedge/ORT" in text
    line = one_line_error(run_cli("run", str(tmp_path / "d.tar"), "--repeat", "1", "--compare",
                                  str(tmp_path / "in.npz"), in_process=True))
    assert "ONNX model" in line
    assert info["outputs"][0]["name"] == "logits" and info["outputs"][0]["shape"] == [1, 10]
    out = np.load(tmp_path / "out.npz")
    assert list(out.keys()) == ["logits"]
    with torch.no_grad():
        ref = zoo.get("digits-cnn").build()(torch.from_numpy(x)).numpy()
    assert rel_err(out["logits"], ref) < 1e-4
    info2 = json.loads(cli("run", str(tmp_path / "d.tar"), "--json", "--repeat", "2", check=True).stdout)
    import os
    assert info2["threads"] == os.cpu_count()


def test_zoo_cli(tmp_path):
    proc = cli("zoo", "list", "--json", check=True)
    listing = json.loads(proc.stdout)
    validate(listing)
    names = {m["name"] for m in listing["items"]}
    assert set(ZOO_NAMES) <= names
    cli("zoo", "export", "resnet18", "-o", str(tmp_path / "r.onnx"), check=True)
    assert (tmp_path / "r.onnx").stat().st_size > 40e6  # 11.7M float32 weights


def test_dynamic_input_needs_shape(tmp_path):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    path = tmp_path / "dyn.onnx"
    torch.onnx.export(m, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, input_names=["img"],
                      dynamic_axes={"img": {0: "batch", 2: "h", 3: "w"}})
    proc = cli("compile", str(path), "-o", str(tmp_path / "o.tar"))
    assert proc.returncode != 0
    assert "dynamic" in proc.stderr and "--input-shape img:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.tar").exists()
    cli("compile", str(path), "-o", str(tmp_path / "o.tar"), "--input-shape", "img:2x3x20x24", check=True)
    info = json.loads(cli("run", str(tmp_path / "o.tar"), "--json", "--repeat", "1", check=True).stdout)
    assert info["outputs"][0]["shape"] == [2, 4, 18, 22]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_error_corrupt_and_truncated_model(tmp_path):
    pt = zoo.export("digits-cnn", tmp_path / "d.onnx")
    data = pt.read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xffnot a model" * 50)
    (tmp_path / "junk.pt2").write_bytes(b"PK\x03\x04garbage")
    for bad in ("trunc.onnx", "junk.onnx", "junk.pt2"):
        line = one_line_error(cli("compile", str(tmp_path / bad), "-o", str(tmp_path / "o.tar")))
        assert bad in line
    assert not (tmp_path / "o.tar").exists()


def test_error_unsupported_operator(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.CELU()).eval()
    torch.onnx.export(m, (torch.randn(1, 4),), str(tmp_path / "celu.onnx"), dynamo=False)
    line = one_line_error(cli("compile", str(tmp_path / "celu.onnx"), "-o", str(tmp_path / "o.tar")))
    assert "unsupported" in line and "Celu" in line


def test_error_unknown_target(tmp_path):
    pt = zoo.export("digits-cnn", tmp_path / "d.onnx")
    line = one_line_error(cli("compile", str(pt), "-o", str(tmp_path / "o.tar"), "--target", "raspberry-pi/99"))
    assert "unknown target 'raspberry-pi/99'" in line
    line = one_line_error(cli("compile", str(pt), "-o", str(tmp_path / "o.tar"), "--target", '{"kind": "nosuch"}'))
    assert "invalid target" in line


def test_verbose_shows_traceback(tmp_path):
    proc = cli("--verbose", "compile", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.tar"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_device_descriptions_resolve():
    for name in ["host", "pi4", "pi3", "pi5", "jetson-nano", "jetson-xavier", "riscv-u74"]:
        dev = resolve(name)
        assert dev.name == name and dev.report.get("source")
    assert resolve("pi4").target.attrs["mcpu"] == "cortex-a72" and resolve("pi5").target.attrs["mcpu"] == "cortex-a76"
    assert resolve("jetson-nano").target.kind.name == "cuda"
    assert resolve("raspberry-pi/4b-aarch64").cross_compiler == "aarch64-linux-gnu-g++"
    assert resolve('{"kind": "llvm", "mtriple": "riscv64-linux-gnu"}').cross_compiler == "riscv64-linux-gnu-g++"


def test_emulated_boards_come_from_the_descriptions():
    """targets/*.json is the one source of device data: the emulated boards, their qemu CPU
    and the cross compilers all agree with the descriptions' TVM targets."""
    from tvmedge import devices

    boards = devices.emulated()
    assert sorted(boards) == ["bpi-f3", "pi3", "pi4", "pi5", "riscv-u74"]
    for name, emu in boards.items():
        dev = resolve(name)
        assert dev.emulator == emu.qemu == devices.qemu_for(emu.arch)
        if emu.arch == "aarch64":
            assert str(dev.target.attrs["mcpu"]) == emu.cpu  # qemu emulates the CPU the code is built for
        assert str(dev.target.attrs["mtriple"]).split("-")[0] == emu.arch
        assert dev.cross_compiler == devices.cross_compiler_for(emu.arch)
    # qemu's CPU models for the RISC-V boards: RV64GC without V (the U74), RVV 1.0 with VLEN 256 (the K1)
    assert boards["riscv-u74"].cpu == "sifive-u54" and "v=true,vlen=256" in boards["bpi-f3"].cpu
    with pytest.raises(TvmedgeError, match=r"no emulated device 'pi2' \(available: bpi-f3, pi3, pi4, pi5, riscv-u74\)"):
        devices.emulation("pi2")


def test_error_unreachable_tracker_and_remote_run(tmp_path):
    """`run` through a tracker: one line when nobody listens there; a real run when a device is up."""
    cli("zoo", "export", "digits-cnn", "-o", str(tmp_path / "d.onnx"), check=True)
    cli("compile", str(tmp_path / "d.onnx"), "-o", str(tmp_path / "d.tar"), check=True)
    line = one_line_error(cli("run", str(tmp_path / "d.tar"), "--rpc-tracker", "127.0.0.1:1", "--rpc-key", "pi4"))
    assert "127.0.0.1:1" in line
    local = json.loads(cli("run", str(tmp_path / "d.tar"), "--json", "--repeat", "2", "--outputs",
                           str(tmp_path / "local.npz"), check=True).stdout)
    with start_tracker() as tr, start_server(tr.addr, "here"):
        remote = json.loads(cli("run", str(tmp_path / "d.tar"), "--rpc-tracker", format_host_port(tr.addr),
                                "--rpc-key", "here", "--json", "--repeat", "2", "--outputs",
                                str(tmp_path / "remote.npz"), check=True).stdout)
    assert remote["latency_ms"]["median"] > 0 and remote["device"]["via"] == "rpc" and local["device"]["via"] == "local"
    # a plain TVM server says nothing about itself: assumed hardware, and the JSON says it was not reported
    assert remote["device"]["kind"] == "hardware" and remote["device"]["reported"] is False
    validate(remote)
    assert np.array_equal(np.load(tmp_path / "local.npz")["logits"], np.load(tmp_path / "remote.npz")["logits"])


def test_zoo_export_tflite_compiles(tmp_path):
    cli("zoo", "export", "digits-cnn", "-o", str(tmp_path / "d.tflite"), check=True)
    meta = json.loads(cli("compile", str(tmp_path / "d.tflite"), "-o", str(tmp_path / "t.tar"), "--json",
                          check=True).stdout)
    validate(meta)
    assert meta["inputs"][0]["shape"] == [1, 8, 8, 1]  # TFLite is NHWC
    # the binarized model's packed-bit layers have no TFLite form: one line, nothing written
    line = one_line_error(cli("zoo", "export", "digits-bnn", "-o", str(tmp_path / "r.tflite")))
    assert "TFLite" in line and not (tmp_path / "r.tflite").exists()
