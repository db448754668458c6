"""RISC-V boards: riscv-u74 (RV64GC, scalar) and bpi-f3 (SpacemiT K1, RVV 1.0).

Fast: the descriptions, the cross compiler's one-line error, and that the RVV target's
cross-built library holds vector instructions (and the scalar one none). Debian's objdump
2.40 prints RVV instructions as ``.4byte`` words (it does not read the arch string LLVM
writes), so instructions are classified here from their encodings (RISC-V V spec 1.0).

Slow: the emulated boards run tvmedge's cross-built TVM runtime and C++ RPC server under
qemu-riscv64 (the first run builds it: minutes); tune + compile + run over a tracker
against ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tvmedge.core.errors import TvmedgeError
from tvmedge.target import resolve

from conftest import run_cli

needs_cross = pytest.mark.skipif(shutil.which("riscv64-linux-gnu-g++") is None or
                                 shutil.which("riscv64-linux-gnu-objdump") is None,
                                 reason="riscv64 cross toolchain not installed (scripts/setup.sh)")


def rvv_kind(word: int) -> str | None:
    """The RVV instruction class of a 32-bit instruction word, or None for a non-vector one."""
    opcode, funct3, funct6 = word & 0x7F, (word >> 12) & 7, word >> 26
    if opcode == 0x57:  # OP-V
        if funct3 == 7:
            return "vsetvl"
        if funct6 == 0b101100 and funct3 in (1, 5):  # OPFVV / OPFVF
            return "vfmacc"
        if funct6 == 0b100100 and funct3 in (1, 5):
            return "vfmul"
        if funct6 == 0b000000 and funct3 in (1, 5):
            return "vfadd"
        return "other-op-v"
    if opcode in (0x07, 0x27) and funct3 in (0, 5, 6, 7):  # LOAD-FP/STORE-FP with a vector width
        width = {0: 8, 5: 16, 6: 32, 7: 64}[funct3]
        return f"{'vle' if opcode == 0x07 else 'vse'}{width}"
    return None


def vector_instructions(lib: Path) -> Counter:
    """Counts of RVV instruction classes in ``lib``'s code (objdump -d, our decoding)."""
    dis = subprocess.run(["riscv64-linux-gnu-objdump", "-d", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    counts: Counter = Counter()
    for m in re.finditer(r"^\s*[0-9a-f]+:\s+([0-9a-f]{8})\s", dis, re.M):
        kind = rvv_kind(int(m.group(1), 16))
        if kind:
            counts[kind] += 1
    return counts


def test_rvv_decoder_on_known_encodings():
    # words the riscv64 GNU assembler writes for these (objdump decodes them where the object
    # carries an arch string it reads, as the assembler's output does)
    assert rvv_kind(0x0D0572D7) == "vsetvl"  # vsetvli t0,a0,e32,m1,ta,ma
    assert rvv_kind(0x0205E407) == "vle32"  # vle32.v v8,(a1)
    assert rvv_kind(0x02066427) == "vse32"  # vse32.v v8,(a2)
    assert rvv_kind(0xB3881457) == "vfmacc"  # vfmacc.vv v8,v16,v24
    assert rvv_kind(0xB3055457) == "vfmacc"  # vfmacc.vf v8,fa0,v16
    assert rvv_kind(0x0005A787) is None  # flw fa5,0(a1): LOAD-FP with the scalar 32-bit width
    assert rvv_kind(0x00B50533) is None  # add a0,a0,a1


def test_riscv_boards_described():
    from tvmedge.isa import isa_class

    u74, f3 = resolve("riscv-u74"), resolve("bpi-f3")
    assert u74.emulator == f3.emulator == "qemu-riscv64-static"
    assert isa_class(u74.target) == "riscv64" and isa_class(f3.target) == "riscv64-rvv"
    for dev in (u74, f3):
        assert dev.cross_compiler == "riscv64-linux-gnu-g++"
        assert dev.report["peak_gflops_fp32"] > 0 and dev.report["source"]


def test_missing_cross_compiler_is_one_clear_error(tmp_path, monkeypatch):
    from tvmedge.deploy.crossrt import prepare_runtime

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TvmedgeError, match=r"riscv64-linux-gnu-g\+\+.*Debian package g\+\+-riscv64-linux-gnu"):
        prepare_runtime("riscv64")
    with pytest.raises(TvmedgeError, match="no cross-built TVM runtime for 'armv7'"):
        prepare_runtime("armv7")


def _small_cnn():
    """A 1-channel 3x3 conv (the pad pattern RVV lowering once failed on) + matmul, in Relax."""
    import tvm
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((1, 1, 8, 8), "float32"), w: R.Tensor((32, 1, 3, 3), "float32"),
                 m: R.Tensor((2048, 16), "float32")) -> R.Tensor((1, 16), "float32"):
            with R.dataflow():
                y = R.nn.relu(R.nn.conv2d(x, w, padding=(1, 1)))
                z = R.matmul(R.reshape(y, (1, 2048)), m)
                R.output(z)
            return z

    return Mod


@needs_cross
@pytest.mark.parametrize("board", ["bpi-f3", "riscv-u74"])
def test_default_rules_emit_rvv_only_for_the_rvv_board(board, tmp_path):
    from tvm.support import cc

    from tvmedge.lower.pipeline import build

    dev = resolve(board)
    ex, report = build(_small_cnn(), dev.target)
    assert not report.unscheduled, report.unscheduled
    lib = tmp_path / f"{board}.so"
    ex.export_library(str(lib), fcompile=cc.cross_compiler("riscv64-linux-gnu-g++"))
    counts = vector_instructions(lib)
    if board == "bpi-f3":
        assert counts["vsetvl"] > 0 and counts["vle32"] > 0 and counts["vfmacc"] > 0, counts
    else:
        assert sum(counts.values()) == 0, counts  # RV64GC: no vector unit, not one V instruction


# ---------------------------------------------------------------- emulated, over RPC (slow)
@pytest.fixture(scope="module")
def runtime():
    import os

    from tvmedge.deploy.crossrt import find_runtime, prepare_runtime

    if shutil.which("riscv64-linux-gnu-g++") is None or shutil.which("qemu-riscv64-static") is None:
        pytest.skip("riscv64 cross compiler or qemu-riscv64-static missing (scripts/setup.sh)")
    if find_runtime("riscv64") is None and os.environ.get("TVMEDGE_SETUP_RISCV") != "1":
        pytest.skip("the riscv64 runtime is not built on this machine: TVMEDGE_SETUP_RISCV=1 scripts/setup.sh "
                    "builds it (15-40 min on 2 cores), or set TVMEDGE_SETUP_RISCV=1 for this run")
    return prepare_runtime("riscv64")


def _ort(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.slow
def test_runtime_is_cached(runtime):
    from tvmedge.deploy.crossrt import find_runtime

    again = find_runtime("riscv64")
    assert again is not None and again.server == runtime.server
    head = runtime.server.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 243  # EM_RISCV
    assert runtime.manifest["key"]["versions"]["apache-tvm"]


@pytest.mark.slow
def test_emulated_riscv_u74_tune_compile_run_match_onnxruntime(runtime, tmp_path):
    """The issue's bar on a fresh clone: emulate riscv-u74, tune over a tracker (few trials),
    compile with the records, run digits-cnn and mobilenet_v2 there, compare with ORT."""
    from tvmedge import zoo
    from tvmedge.deploy.address import format_host_port
    from tvmedge.deploy.emulate import EmulatedDevice
    from tvmedge.deploy.launch import start_tracker

    key = f"u74-test-{os.getpid()}"
    digits = zoo.export("digits-cnn", tmp_path / "digits.onnx")
    mnet = zoo.export("mobilenet_v2", tmp_path / "mnet.onnx")
    xd = zoo.example_input(zoo.get("digits-cnn"), seed=3).numpy()
    xm = zoo.example_input(zoo.get("mobilenet_v2"), seed=3).numpy()
    with start_tracker() as tr, EmulatedDevice("riscv-u74", tr.addr, key=key, sysroot=runtime) as dev:
        assert dev.info()["emulated"] is True and dev.info()["qemu_cpu"] == "sifive-u54"
        addr = format_host_port(tr.addr)
        db = tmp_path / "db"
        proc = run_cli("tune", str(digits), "--target", "riscv-u74", "--tuning-db", str(db), "--trials", "4",
                       "--rpc-tracker", addr, "--rpc-key", key, "--emulated", "--json", "--no-compare", timeout=3600)
        assert proc.returncode == 0, proc.stderr
        rep = json.loads(proc.stdout)
        assert rep["devices_used"] == 1 and rep["trials_run"] >= 2, rep
        for name, onnx_path, x, db_arg in (("digits", digits, xd, ["--tuning-db", str(db)]),
                                           ("mnet", mnet, xm, [])):
            art = tmp_path / f"{name}.tar"
            run_cli("compile", str(onnx_path), "--target", "riscv-u74", *db_arg, "-o", str(art), check=True,
                    timeout=1800)
            np.savez(tmp_path / f"{name}-in.npz", **{_input_name(onnx_path): x})
            proc = run_cli("run", str(art), "--rpc-tracker", addr, "--rpc-key", key, "--repeat", "1",
                           "--inputs", str(tmp_path / f"{name}-in.npz"), "--outputs", str(tmp_path / f"{name}-out.npz"),
                           "--json", timeout=1800)
            assert proc.returncode == 0, proc.stderr
            info = json.loads(proc.stdout)
            assert info["device"]["target"]["mtriple"].startswith("riscv64")
            assert info["device"]["kind"] == "emulated", info["device"]  # the board says what it is
            out = next(iter(np.load(tmp_path / f"{name}-out.npz").values()))
            assert _rel(out, _ort(onnx_path, x)) < 1e-4, name


@pytest.mark.slow
@needs_cross
def test_emulated_bpi_f3_runs_rvv_code_like_onnxruntime(runtime, tmp_path):
    """RVV code (VLEN 256 in qemu) gives ONNX Runtime's outputs; the library holds vector code."""
    from tvmedge import zoo
    from tvmedge.deploy.address import format_host_port
    from tvmedge.deploy.emulate import EmulatedDevice
    from tvmedge.deploy.launch import start_tracker

    key = f"f3-test-{os.getpid()}"
    digits = zoo.export("digits-cnn", tmp_path / "digits.onnx")
    x = zoo.example_input(zoo.get("digits-cnn"), seed=5).numpy()
    art = tmp_path / "d.tar"
    run_cli("compile", str(digits), "--target", "bpi-f3", "-o", str(art), check=True)
    with tarfile.open(art) as t:
        t.extractall(tmp_path / "x")
    assert vector_instructions(next((tmp_path / "x").glob("*.so")))["vfmacc"] > 0
    np.savez(tmp_path / "in.npz", **{_input_name(digits): x})
    with start_tracker() as tr, EmulatedDevice("bpi-f3", tr.addr, key=key, sysroot=runtime):
        proc = run_cli("run", str(art), "--rpc-tracker", format_host_port(tr.addr), "--rpc-key", key,
                       "--repeat", "1", "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "out.npz"),
                       "--json", timeout=1800)
    assert proc.returncode == 0, proc.stderr
    out = next(iter(np.load(tmp_path / "out.npz").values()))
    assert _rel(out, _ort(digits, x)) < 1e-4


def _input_name(onnx_path: Path) -> str:
    import onnx

    return onnx.load(str(onnx_path)).graph.input[0].name
