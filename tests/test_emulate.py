"""Emulated Raspberry Pi boards (qemu-user + arm64 Debian user space + real TVM RPC server).

Slow: the first run prepares the arm64 user space (Debian packages + aarch64 wheels,
needs the network); every board start imports TVM under qemu.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from tvmedge.deploy.emulate import EmulatedDevice
from tvmedge.deploy.session import connect
from tvmedge.deploy.sysroot import find_sysroot, prepare_sysroot
from tvmedge.deploy.tracker import list_devices
from tvmedge.core.errors import TvmedgeError

pytestmark = pytest.mark.slow

KEY = f"pi4-test-{os.getpid()}"


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture(scope="module")
def sysroot():
    t0 = time.monotonic()
    root = prepare_sysroot("aarch64")
    print(f"\nsysroot ready in {time.monotonic() - t0:.1f} s: {root.path}")
    return root


@pytest.fixture(scope="module")
def pi4(sysroot, tracker):
    dev = EmulatedDevice("pi4", tracker.addr, key=KEY, sysroot=sysroot)
    try:
        t0 = time.monotonic()
        dev.start()
        print(f"emulated pi4 registered in {time.monotonic() - t0:.1f} s")
        yield dev
    finally:
        dev.stop()


def _relax_matmul_relu():
    import tvm
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((8, 64), "float32"), w: R.Tensor((64, 32), "float32"),
                 b: R.Tensor((32,), "float32")) -> R.Tensor((8, 32), "float32"):
            with R.dataflow():
                y = R.nn.relu(R.add(R.matmul(x, w), b))
                R.output(y)
            return y

    rng = np.random.default_rng(0)
    args = [rng.standard_normal((8, 64)).astype("float32"), rng.standard_normal((64, 32)).astype("float32"),
            rng.standard_normal(32).astype("float32")]
    return Mod, args, np.maximum(args[0] @ args[1] + args[2], 0)


def _cross_build(mod, target, path) -> None:
    import tvm
    from tvm.support import cc

    ex = tvm.compile(mod, target)
    # a fresh cross_compiler each time: it mutates its options list when reused
    ex.export_library(str(path), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64


def _run_remote(session, lib_path, args):
    import tvm
    from tvm import relax

    session.upload(str(lib_path))
    rlib = session.load_module(os.path.basename(lib_path))
    dev = session.cpu()
    vm = relax.VirtualMachine(rlib, dev)
    out = vm["main"](*[tvm.runtime.tensor(a, dev) for a in args]).numpy()
    return out, vm, dev


def test_sysroot_is_cached_and_complete(sysroot):
    t0 = time.monotonic()
    again = prepare_sysroot("aarch64")
    assert time.monotonic() - t0 < 5 and again.path == sysroot.path
    assert find_sysroot("aarch64") is not None
    m = sysroot.manifest
    assert m["wheels"]["apache-tvm"] == "0.27.0.post1" and m["wheels"]["apache-tvm-ffi"] == "0.1.14.post0"
    assert any(p.startswith("python3.11-minimal=") for p in m["debian_packages"])
    assert sysroot.python.exists() and sysroot.runtime_extra_lib.exists()
    assert not (sysroot.site_packages / "tvm" / "lib" / "libtvm_compiler.so").exists()
    assert not list(sysroot.path.parent.glob(".aarch64.tmp-*"))  # no half-built leftovers


def test_pi4_registers_and_reports_emulated(pi4, tracker):
    info = pi4.info()
    assert info["emulated"] is True and info["kind"] == "pi4" and info["qemu_cpu"] == "cortex-a72"
    assert info["running"] and info["key"] == KEY
    d = next(d for d in list_devices(tracker.addr) if d["key"] == KEY)
    assert d["total"] == 1 and d["free"] == 1
    assert len(pi4.server.pids()) >= 2  # qemu running the server + its popen worker


def test_pi4_runs_cross_compiled_relax(pi4, tracker, tmp_path):
    import tvm

    mod, args, ref = _relax_matmul_relu()
    _cross_build(mod, tvm.target.Target("raspberry-pi/4b-aarch64"), tmp_path / "mm.so")
    session = connect(tracker=tracker.addr, key=KEY, timeout=120)
    out, vm, dev = _run_remote(session, tmp_path / "mm.so", args)
    assert rel_err(out, ref) < 1e-4
    # MetaSchedule's measuring needs these on the device (libtvm_runtime_extra.so)
    session.get_function("tvm.contrib.random.random_fill_for_measure")
    timer = vm.time_evaluator("main", dev, number=1, repeat=2)
    assert all(t > 0 for t in timer(*[tvm.runtime.tensor(a, dev) for a in args]).results)
    # the code really ran on the emulated aarch64 side
    assert session.get_function("tvm.rpc.server.workpath")("")


def test_pi4_runs_onnx_cnn_like_onnxruntime(pi4, tracker, tmp_path):
    """The project's own path: ONNX -> artifact for pi4 -> run over RPC, against ONNX Runtime."""
    import onnxruntime as ort

    from tvmedge import zoo
    from tvmedge.build import compile_model
    from tvmedge.frontend import load_model
    from tvmedge.run import run_artifact
    from tvmedge.target import resolve

    entry = zoo.get("digits-cnn")
    onnx_path = zoo.export("digits-cnn", tmp_path / "d.onnx")
    compile_model(load_model(onnx_path), resolve("pi4"), tmp_path / "d.tar")
    x = zoo.example_input(entry, seed=4).numpy()
    session = connect(tracker=tracker.addr, key=KEY, timeout=120)
    res = run_artifact(tmp_path / "d.tar", {entry.input_name: x}, repeat=2, session=session)
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {entry.input_name: x})[0]
    assert res.device == "rpc"
    assert rel_err(res.outputs[0], ref) < 1e-4


def test_pi4_serves_metaschedule_rpc_runner(pi4, tracker, tmp_path):
    """MetaSchedule's RPCRunner measures a cross-linked candidate on the board (random
    argument fill from libtvm_runtime_extra.so, remote time evaluator)."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    a, b = te.placeholder((64, 64), name="A"), te.placeholder((64, 64), name="B")
    k = te.reduce_axis((0, 64), name="k")
    c = te.compute((64, 64), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    func = te.create_prim_func([a, b, c]).with_attr("global_symbol", "main")
    _cross_build(tvm.IRModule({"main": func}), tvm.target.Target("raspberry-pi/4b-aarch64"), tmp_path / "cand.so")
    runner = ms.runner.RPCRunner(
        ms.runner.RPCConfig(tracker_host=tracker.addr[0], tracker_port=tracker.addr[1], tracker_key=KEY,
                            session_timeout_sec=120),
        ms.runner.EvaluatorConfig(number=1, repeat=2, min_repeat_ms=0, enable_cpu_cache_flush=False), max_workers=1)
    res = runner.run([ms.runner.RunnerInput(str(tmp_path / "cand.so"), "cpu",
                                            ms.arg_info.ArgInfo.from_prim_func(func))])[0].result()
    assert res.error_msg is None
    assert len(res.run_secs) == 2 and all(float(t) > 0 for t in res.run_secs)


def test_pi3_emulation_runs_cortex_a53_code(sysroot, tracker, tmp_path):
    from tvmedge.target import resolve

    mod, args, ref = _relax_matmul_relu()
    _cross_build(mod, resolve("pi3").target, tmp_path / "mm3.so")
    with EmulatedDevice("pi3", tracker.addr, key=KEY + "-pi3", sysroot=sysroot) as pi3:
        assert pi3.info()["qemu_cpu"] == "cortex-a53" and pi3.info()["emulated"] is True
        session = connect(tracker=tracker.addr, key=KEY + "-pi3", timeout=120)
        out, _, _ = _run_remote(session, tmp_path / "mm3.so", args)
        assert rel_err(out, ref) < 1e-4
        pids = pi3.server.pids()
        del session
        gc.collect()
    # stopped: every process of its group is gone and the tracker no longer lists it
    assert pids and not any(os.path.exists(f"/proc/{p}") and _not_zombie(p) for p in pids)
    deadline = time.monotonic() + 10
    while any(d["key"] == KEY + "-pi3" for d in list_devices(tracker.addr)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(d["key"] == KEY + "-pi3" for d in list_devices(tracker.addr))


def test_missing_tools_name_the_debian_package(tmp_path, monkeypatch):
    from tvmedge.deploy.sysroot import check_tools

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TvmedgeError, match="qemu-aarch64-static.*install the Debian package qemu-user-static"):
        check_tools("aarch64")
    (tmp_path / "qemu-aarch64-static").symlink_to(shutil.which("qemu-aarch64-static", path=os.defpath + ":/usr/bin"))
    with pytest.raises(TvmedgeError, match=r"aarch64-linux-gnu-g\+\+.*Debian package g\+\+-aarch64-linux-gnu"):
        check_tools("aarch64")
    with pytest.raises(TvmedgeError, match="no emulated user space for 'riscv64'"):
        check_tools("riscv64")


def test_unknown_board_is_a_clear_error():
    with pytest.raises(TvmedgeError, match=r"no emulated device 'pi2' \(available: bpi-f3, pi3, pi4, pi5, riscv-u74\)"):
        EmulatedDevice("pi2")


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def test_pi4_says_it_is_emulated_and_every_run_is_labelled(pi4, tracker, tmp_path):
    """A board from `device emulate` says what it is: `run` labels its figures in text and
    JSON without being told, and an artifact for another CPU is refused before upload."""
    import json

    from conftest import run_cli
    from tvmedge import zoo
    from tvmedge.core.schema import validate
    from tvmedge.deploy.address import format_host_port

    onnx = zoo.export("digits-cnn", tmp_path / "d.onnx")
    run_cli("compile", str(onnx), "--target", "pi4", "-o", str(tmp_path / "pi4.tar"), check=True)
    where = ["--rpc-tracker", format_host_port(tracker.addr), "--rpc-key", KEY, "--repeat", "2"]
    info = json.loads(run_cli("run", str(tmp_path / "pi4.tar"), *where, "--json", check=True).stdout)
    validate(info)
    dev = info["device"]
    assert dev["kind"] == "emulated" and dev["board"] == "pi4" and dev["arch"] == "aarch64" and dev["reported"]
    assert "cortex-a72" in dev["emulator"]
    text = run_cli("run", str(tmp_path / "pi4.tar"), *where, check=True).stdout
    assert "(emulated)" in text.splitlines()[0] and "not the real device's" in text

    run_cli("compile", str(onnx), "-o", str(tmp_path / "host.tar"), check=True)
    proc = run_cli("run", str(tmp_path / "host.tar"), *where)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1, proc.stderr
    assert "x86_64" in err[0] and "aarch64" in err[0] and "RPCError" not in err[0]


def test_tune_reads_the_board_kind_without_the_flag(pi4, tracker):
    """`tune --rpc-tracker` (its DevicePool) asks the board: emulated, without --emulated."""
    from tvmedge.deploy.address import format_host_port
    from tvmedge.target import resolve
    from tvmedge.tune.pool import device_pool

    with device_pool(resolve("pi4"), format_host_port(tracker.addr), KEY, log=lambda m: None) as pool:
        assert pool.kind == "emulated" and pool.emulated and pool.info["board"] == "pi4"


def test_pi4_comes_back_after_a_crashing_session(pi4, tracker, tmp_path):
    """A session that dies (here: a library aborting on load) takes TVM's Python server down;
    the emulated board restarts it and serves again. Runs last: it replaces the pi4 server."""
    import tvm

    src = tmp_path / "boom.c"
    src.write_text("#include <stdlib.h>\n__attribute__((constructor)) static void boom(void) { abort(); }\n")
    subprocess.run(["aarch64-linux-gnu-g++", "-x", "c", "-shared", "-fPIC", str(src), "-o", str(tmp_path / "boom.so")],
                   check=True)
    old_port = pi4.port
    session = connect(tracker=tracker.addr, key=KEY, timeout=120)
    session.upload(str(tmp_path / "boom.so"))
    with pytest.raises(Exception):
        session.load_module("boom.so")
    del session
    gc.collect()
    deadline = time.monotonic() + 120
    while pi4.restarts == 0 and time.monotonic() < deadline:
        time.sleep(1)
    assert pi4.restarts == 1 and pi4.alive() and pi4.info()["failure"] is None
    d = next(d for d in list_devices(tracker.addr) if d["key"] == KEY)
    assert d["total"] == 1 and [p for _, p in d["servers"]] == [pi4.port] and pi4.port != old_port
    mod, args, ref = _relax_matmul_relu()
    _cross_build(mod, tvm.target.Target("raspberry-pi/4b-aarch64"), tmp_path / "mm.so")
    out, _, _ = _run_remote(connect(tracker=tracker.addr, key=KEY, timeout=120), tmp_path / "mm.so", args)
    assert rel_err(out, ref) < 1e-4
