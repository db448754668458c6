"""The VTA-style accelerator (tvmedge.vta): descriptions, ISA + simulator, timing model,
partitioning/codegen, tuning records, and int8 models run bit-exact with the host int8
build, locally and over RPC on the emulated VTA board (figures are simulated)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from tvmedge.core.schema import validate
from tvmedge import zoo
from tvmedge.build import compile_model
from tvmedge.core.errors import TvmedgeError
from tvmedge.devices import accelerator, accelerator_of, accelerators, read_description, description_path
from tvmedge.frontend import load_model
from tvmedge.optimize import data as data_mod
from tvmedge.optimize.data import Dataset
from tvmedge.optimize.quantize import quantize
from tvmedge.run import run_artifact
from tvmedge.target import resolve
from tvmedge.vta import isa
from tvmedge.vta.codegen import ConvLayer, Tiling, candidates, compile_layer, default_tiling, run_compiled
from tvmedge.vta.isa import HwConfig
from tvmedge.vta.queues import ProgramError
from tvmedge.vta.sim import Dram, Simulator
from tvmedge.vta.timing import estimate
from conftest import run_cli

PYNQ = accelerator("vta-pynq")
ULTRA = accelerator("vta-ultra96")


# ---------------------------------------------------------------- the design as data
def test_descriptions():
    accs = accelerators()
    assert {"vta-pynq", "vta-ultra96"} <= set(accs)
    assert (PYNQ.block_in, PYNQ.block_out, PYNQ.clock_mhz) == (16, 16, 100.0)
    assert (ULTRA.block_in, ULTRA.block_out) == (32, 32)
    assert PYNQ.host_cpu["arch"] == "armv7" and PYNQ.host_cpu["clock_mhz"] == 650
    assert ULTRA.host_cpu["arch"] == "aarch64" and ULTRA.host_emulator["arch"] == "aarch64"
    assert PYNQ.host_emulator is None  # no armv7 TVM runtime: the PYNQ's host part runs natively
    for acc in (PYNQ, ULTRA):
        for key in ("core_shape_dtypes_buffers", "clock_mhz", "host_cpu", "dram_bandwidth_gbs"):
            assert acc.source.get(key), (acc.name, key)
    cfg = HwConfig.from_accelerator(PYNQ)
    assert (cfg.inp_depth, cfg.wgt_depth, cfg.acc_depth, cfg.uop_depth) == (2048, 1024, 2048, 8192)
    assert resolve("vta-pynq").accelerator == PYNQ
    assert resolve("pi4").accelerator is None
    desc = read_description(description_path("vta-pynq"))
    bad = json.loads(json.dumps(desc))
    bad["accelerator"]["wgt_dtype"] = "int4"
    with pytest.raises(TvmedgeError, match="wgt_dtype"):
        accelerator_of(bad)
    del bad["accelerator"]["clock_mhz"]
    bad["accelerator"]["wgt_dtype"] = "int8"
    with pytest.raises(TvmedgeError, match="accelerator"):
        accelerator_of(bad)
    with pytest.raises(TvmedgeError, match="no accelerator"):
        accelerator("pi4")


# ---------------------------------------------------------------- simulator
def _reference(layer: ConvLayer, x: np.ndarray) -> np.ndarray:
    pt, pl, pb, pr = layer.pad
    xp = np.full((layer.cin, layer.h + pt + pb, layer.w + pl + pr), layer.pad_value, np.int64)
    xp[:, pt:pt + layer.h, pl:pl + layer.w] = x[0]
    oh, ow = layer.out_hw
    sh, sw = layer.stride
    out = np.zeros((layer.cout, oh, ow), np.int64)
    for y in range(layer.kh):
        for z in range(layer.kw):
            patch = xp[:, y:y + (oh - 1) * sh + 1:sh, z:z + (ow - 1) * sw + 1:sw]
            out += np.einsum("ihw,oi->ohw", patch, layer.weight[:, :, y, z].astype(np.int64))
    out += layer.bias[:, None, None]
    if layer.relu:
        out = np.maximum(out, 0)
    return out[None].astype(np.int32)


def _layer(rng, cin, h, w, cout, k, s, p, relu, pad_value=0, signed=False):
    weight = rng.integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
    bias = rng.integers(-5000, 5000, cout).astype(np.int32)
    layer = ConvLayer("t", cin, h, w, cout, k, k, (s, s), (p, p, p, p), pad_value, 0 if signed else 128, weight, bias, relu)
    x = (rng.integers(-128, 128, (1, cin, h, w)).astype(np.int8) if signed
         else rng.integers(0, 256, (1, cin, h, w)).astype(np.uint8))
    return layer, x


CASES = [  # cin, h, w, cout, k, stride, pad, relu, pad value, signed input
    (3, 9, 7, 20, 3, 1, 1, True, 0, False),
    (33, 8, 8, 40, 3, 2, 1, False, 7, False),
    (64, 4, 4, 64, 1, 1, 0, True, 0, False),
    (200, 1, 1, 70, 1, 1, 0, False, 0, False),
    (5, 6, 6, 17, 5, 1, 3, False, -3, True),
]


@pytest.mark.parametrize("acc", [PYNQ, ULTRA], ids=["1x16x16", "1x32x32"])
def test_simulator_conv_bit_exact_for_every_tiling_kind(acc):
    """Several tilings per layer (double-buffered or not, weights resident or streamed,
    edge tiles), strides, paddings with a zero point, uint8 and int8 inputs."""
    cfg = HwConfig.from_accelerator(acc)
    rng = np.random.default_rng(0)
    for case in CASES:
        layer, x = _layer(rng, *case)
        ref = _reference(layer, x)
        cands = candidates(layer, cfg)
        picks = {default_tiling(layer, cfg)} | set(cands[::max(1, len(cands) // 4)])
        picks |= {next(t for t in cands if not t.double_buffer), next(t for t in cands if t.tile_co == 1)}
        for t in picks:
            out = run_compiled(compile_layer(layer, cfg, t), cfg, x)
            assert np.array_equal(out, ref), (case, t)


def test_accumulators_wrap_like_int32():
    cfg = HwConfig(16, 16, 64, 8, 64, 64)
    layer = ConvLayer("wrap", 16, 1, 1, 16, 1, 1, (1, 1), (0, 0, 0, 0), 0, 0, np.full((16, 16, 1, 1), 127, np.int8),
                      np.full(16, 2 ** 31 - 1000, np.int32), False)
    x = np.full((1, 16, 1, 1), 127, np.int8)
    out = run_compiled(compile_layer(layer, cfg, Tiling(1, 1, 1, False)), cfg, x)
    want = (np.int64(2 ** 31 - 1000) + 16 * 127 * 127 + 2 ** 31) % 2 ** 32 - 2 ** 31
    assert np.all(out == want)


def _dram(cfg, n_inp=4, n_wgt=2, n_acc=4, uops=None, n_out=4):
    return Dram(inp=np.arange(n_inp * cfg.block_in, dtype=np.int64).reshape(n_inp, -1).astype(np.int8),
                wgt=np.ones((n_wgt, cfg.block_out, cfg.block_in), np.int8),
                acc=np.arange(n_acc * cfg.block_out, dtype=np.int32).reshape(n_acc, -1) - 20,
                uop=np.zeros((1, 3), np.int32) if uops is None else np.asarray(uops, np.int32),
                out=np.zeros((n_out, cfg.block_out), np.int32))


def test_alu_requantize_relu_clip():
    """ADD, SHR (requantize), MAX 0 (ReLU), MIN/MAX (clip) on the accumulators."""
    cfg = HwConfig(16, 16, 16, 4, 16, 16)
    dram = _dram(cfg, uops=[[0, 2, 0]])
    vals = dram.acc.astype(np.int64)
    prog = isa.program([
        isa.load(isa.UOP, 0, 0, 0, 0, 1, 1),
        isa.load(isa.ACC, 0, 0, 0, 0, 1, 4),
        isa.alu(isa.ALU_ADD, 0, 1, 2, 1, (1, 0), (1, 0)),             # acc[0:2] += acc[2:4]
        isa.alu(isa.ALU_ADD, 0, 1, 2, 1, (1, 0), (0, 0), imm=8),      # rounding offset
        isa.alu(isa.ALU_SHR, 0, 1, 2, 1, (1, 0), (0, 0), imm=4),      # >> 4
        isa.alu(isa.ALU_MAX, 0, 1, 2, 1, (1, 0), (0, 0), imm=0),      # ReLU
        isa.alu(isa.ALU_MIN, 0, 1, 2, 1, (1, 0), (0, 0), imm=3, deps=isa.PUSH_NEXT),  # clip high
        isa.store(0, 0, 0, 0, 1, 2, deps=isa.POP_PREV | isa.PUSH_PREV),  # (the tokens order it after the ALU)
        isa.finish(deps=isa.POP_NEXT)])
    Simulator(cfg).run(prog, dram)
    want = np.clip((vals[0:2] + vals[2:4] + 8) >> 4, 0, 3)
    assert np.array_equal(dram.out[:2], want)


@pytest.mark.parametrize("bad, match", [
    (isa.load(isa.INP, 15, 0, 0, 0, 1, 4), "out-of-bounds access to the INP scratchpad"),
    (isa.load(isa.INP, 0, 0, 2, 0, 1, 4), "out-of-bounds access to the DRAM INP region"),
    (isa.load(isa.WGT, 0, 0, 0, 0, 1, 5), "out-of-bounds"),
    (isa.gemm(0, 1, 1, 20, (1, 1), (1, 1), (0, 0)), "out-of-bounds access to the ACC scratchpad"),
    (isa.gemm(0, 99, 1, 1, (0, 0), (0, 0), (0, 0)), "micro-op range"),
    (isa.alu(isa.ALU_ADD, 0, 1, 1, 1, (0, 0), (0, 0), bases=(0, 40)), "out-of-bounds access to the ACC"),
    (isa.store(0, 0, 3, 0, 1, 2), "out-of-bounds access to the DRAM OUT region"),
    (isa.load(isa.ACC, 0, 0, 0, 0, 1, 1, pads=(1, 0, 0, 0)), "padding is only for INP"),
    ([9] + [0] * 15, "unknown opcode"),
])
def test_simulator_refuses_bad_streams(bad, match):
    cfg = HwConfig(16, 16, 16, 4, 16, 16)
    prog = isa.program([isa.load(isa.UOP, 0, 0, 0, 0, 1, 1), bad, isa.finish()])
    with pytest.raises(ProgramError, match=match):
        Simulator(cfg).run(prog, _dram(cfg))


def test_simulator_refuses_deadlock_and_missing_finish():
    cfg = HwConfig(16, 16, 16, 4, 16, 16)
    with pytest.raises(ProgramError, match="deadlocks"):
        Simulator(cfg).run(isa.program([isa.load(isa.INP, 0, 0, 0, 0, 1, 1, deps=isa.POP_NEXT), isa.finish()]),
                           _dram(cfg))
    with pytest.raises(ProgramError, match="no FINISH"):
        Simulator(cfg).run(isa.program([isa.load(isa.INP, 0, 0, 0, 0, 1, 1)]), _dram(cfg))
    with pytest.raises(ProgramError, match="does not exist"):
        Simulator(cfg).run(isa.program([isa.store(0, 0, 0, 0, 1, 1, deps=isa.PUSH_NEXT), isa.finish()]), _dram(cfg))


def test_dependency_tokens_are_what_keeps_double_buffering_correct():
    """Without the compute->load tokens the simulator's eager order lets loads overwrite a
    buffer half still in use: the result goes wrong (or the stream deadlocks)."""
    cfg = HwConfig.from_accelerator(PYNQ)
    layer, x = _layer(np.random.default_rng(3), 32, 16, 16, 32, 3, 1, 1, True)
    c = compile_layer(layer, cfg, Tiling(2, 16, 2, True))
    assert np.array_equal(run_compiled(c, cfg, x), _reference(layer, x))
    broken = c.program.copy()
    loads = broken[:, 0] == isa.LOAD
    broken[loads, 1] &= ~isa.POP_NEXT
    with pytest.raises((AssertionError, ProgramError)):
        assert np.array_equal(run_compiled(dataclasses.replace(c, program=broken), cfg, x), _reference(layer, x))


# ---------------------------------------------------------------- timing model
def test_timing_model():
    cfg = HwConfig.from_accelerator(PYNQ)
    layer, _ = _layer(np.random.default_rng(0), 64, 28, 28, 64, 3, 1, 1, True)
    single = estimate(compile_layer(layer, cfg, Tiling(4, 28, 4, False)).program, PYNQ)
    double = estimate(compile_layer(layer, cfg, Tiling(4, 28, 4, True)).program, PYNQ)
    assert double.cycles < single.cycles  # loads and stores overlap compute
    assert double.cycles >= max(double.gemm_cycles, double.load_cycles)
    assert double.gemm_utilisation <= 1.0
    assert double.macs == layer.macs  # whole blocks: no padding lanes here
    weights = layer.weight.size
    assert double.bytes_loaded >= weights + layer.cin * 28 * 28
    assert double.bytes_stored == layer.cout * 28 * 28 * 4
    big = estimate(compile_layer(layer, HwConfig.from_accelerator(ULTRA)).program, ULTRA)
    assert big.seconds < double.seconds


def test_buffers_too_small_name_the_layer():
    tiny = HwConfig(16, 16, 8, 2, 16, 64)
    layer, _ = _layer(np.random.default_rng(0), 64, 8, 8, 16, 3, 1, 1, False)
    layer.name = "conv2d_7"
    with pytest.raises(TvmedgeError, match="layer conv2d_7: the buffers of .* too small for any tile"):
        default_tiling(layer, tiny)


# ---------------------------------------------------------------- compiler, end to end
@pytest.fixture(scope="module")
def digits_int8(tmp_path_factory):
    d = tmp_path_factory.mktemp("vta")
    model = load_model(zoo.export("digits-cnn", d / "digits.onnx"))
    calib = data_mod.load("digits", model, "calib", limit=16)
    q, _ = quantize(model, calib, observer="minmax", progress=False)
    x = {"input": np.stack([s["input"][0] for s in calib.samples[:1]])}
    host = compile_model(q, resolve("host"), d / "host.tar")
    return {"dir": d, "model": q, "x": x, "host": d / "host.tar", "host_meta": host}


def test_digits_offloaded_and_bit_exact(digits_int8):
    d = digits_int8["dir"]
    meta = compile_model(digits_int8["model"], resolve("vta-pynq"), d / "vta.tar")
    vta = meta["vta"]
    assert vta["simulated"] and "not measured on an FPGA" in vta["note"]
    assert vta["offloaded"] == ["conv2d_0", "conv2d_1", "conv2d_2", "matmul_0", "matmul_1"]
    assert vta["on_cpu"] == [] and vta["accelerator_cycles"] > 0 and vta["bytes_moved"] > 0
    ref = run_artifact(digits_int8["host"], digits_int8["x"], repeat=1, warmup=0)
    got = run_artifact(d / "vta.tar", digits_int8["x"], repeat=1, warmup=0)
    assert np.array_equal(got.outputs[0], ref.outputs[0])


class _Mixed(torch.nn.Module):
    """A padded conv on a signed input (zero point != 0: an explicit pad), a depthwise conv,
    a dense layer and a matmul of two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = torch.nn.Linear(8 * 6 * 6, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(torch.relu(self.conv(x)))
        z = self.fc(y.flatten(1)).reshape(1, 4, 4)
        return torch.matmul(z, z.transpose(1, 2))


def _mixed(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Mixed().eval(), (torch.randn(1, 3, 6, 6),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["out"])
    return load_model(path)


def test_unfit_layers_stay_on_cpu_and_are_named(tmp_path):
    model = _mixed(tmp_path)
    rng = np.random.default_rng(1)
    calib = Dataset(name="randn", samples=[{"input": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)} for _ in range(16)])
    q, _ = quantize(model, calib, observer="minmax", progress=False)
    assert "R.nn.pad" in q.mod.script(show_meta=False)
    meta = compile_model(q, resolve("vta-pynq"), tmp_path / "vta.tar")
    where = {r["layer"]: (r["where"], r["reason"]) for r in meta["vta"]["layers"]}
    assert where["conv2d_0"][0] == "vta-pynq"  # the zero-point pad became the LOAD's padding
    assert where["matmul_0"][0] == "vta-pynq"
    assert where["conv2d_1"][0] == "cpu" and "depthwise" in where["conv2d_1"][1]
    assert where["matmul_1"][0] == "cpu" and "not int8" in where["matmul_1"][1]
    host = compile_model(q, resolve("host"), tmp_path / "host.tar")
    assert host
    x = calib.samples[0]
    assert np.array_equal(run_artifact(tmp_path / "vta.tar", x, repeat=1, warmup=0).outputs[0],
                          run_artifact(tmp_path / "host.tar", x, repeat=1, warmup=0).outputs[0])


def test_float_model_stays_on_cpu_with_a_warning(tmp_path):
    from tvmedge.vta.offload import offload

    heard = []
    new, info = offload(_mixed(tmp_path), PYNQ, warn=heard.append)
    assert info["offloaded"] == [] and len(info["on_cpu"]) == 4
    assert all("not int8" in c["reason"] for c in info["on_cpu"])
    assert heard == [info["warning"]] and "no layer of this model can run on vta-pynq" in heard[0]
    assert "call_dps_packed" not in new.mod.script(show_meta=False)


@pytest.mark.slow
def test_float_model_compiles_on_cpu_with_a_warning_cli(tmp_path):
    _mixed(tmp_path)
    proc = run_cli("compile", str(tmp_path / "mixed.onnx"), "--target", "vta-pynq", "-o", str(tmp_path / "f.tar"),
                   in_process=True)
    assert proc.returncode == 0, proc.stderr
    assert "warning: no layer of this model can run on vta-pynq" in proc.stderr
    assert "0 layer(s) offloaded, 4 on the host CPU" in proc.stdout
    assert "SIMULATED" in proc.stdout and (tmp_path / "f.tar").exists()


def test_tuning_records_drive_the_compile(digits_int8):
    from tvmedge.vta.tune import RECORDS, tune_model

    d = digits_int8["dir"]
    db = d / "db"
    rep = tune_model(digits_int8["model"], PYNQ, db, trials=20, progress=False)
    assert rep["simulated"] and len(rep["layers"]) == 5
    for row in rep["layers"]:
        assert row["best_cycles"] <= row["default_cycles"]
    recs = json.loads((db / RECORDS).read_text())["vta-pynq"]
    assert len(recs) == 5
    meta = compile_model(digits_int8["model"], resolve("vta-pynq"), d / "tuned.tar", tuning_db=db)
    rows = meta["vta"]["layers"]
    on_acc = [r for r in rows if r["where"] != "cpu"]
    assert on_acc and all(r["tuned"] for r in on_acc)
    kept = [r for r in rows if r["where"] == "cpu"]
    assert all("tuning choice" in r["reason"] for r in kept)
    assert len(on_acc) + len(kept) == 5
    ref = run_artifact(digits_int8["host"], digits_int8["x"], repeat=1, warmup=0)
    got = run_artifact(d / "tuned.tar", digits_int8["x"], repeat=1, warmup=0)
    assert np.array_equal(got.outputs[0], ref.outputs[0])
    (db / RECORDS).write_text("{broken")
    with pytest.raises(TvmedgeError, match="unreadable"):
        compile_model(digits_int8["model"], resolve("vta-pynq"), d / "t2.tar", tuning_db=db)


# ---------------------------------------------------------------- over RPC on the emulated VTA board
@pytest.fixture(scope="module")
def shapes_int8(tmp_path_factory):
    d = tmp_path_factory.mktemp("vta-shapes")
    model = load_model(zoo.export("shapes-seg", d / "shapes.onnx"))
    calib = data_mod.load("shapes", model, "calib", limit=8)
    q, _ = quantize(model, calib, observer="minmax", progress=False)
    compile_model(q, resolve("host"), d / "host.tar")
    return {"dir": d, "model": q, "x": calib.samples[0], "host": d / "host.tar"}


@pytest.mark.slow
def test_emulated_vta_board_runs_digits_and_shapes_bit_exact(digits_int8, shapes_int8, tmp_path):
    """The done-when check: int8 digits-cnn and shapes-seg compiled for vta-pynq, run over RPC
    on the emulated board through the tracker (``tvmedge run --rpc-tracker``), give the host
    int8 build's outputs bit for bit."""
    from tvmedge.vta.board import VtaBoard

    cases = []
    for name, case in (("digits", digits_int8), ("shapes", shapes_int8)):
        art = tmp_path / f"{name}-vta.tar"
        meta = compile_model(case["model"], resolve("vta-pynq"), art)
        assert meta["vta"]["offloaded"] and not meta["vta"]["on_cpu"], meta["vta"]["on_cpu"]
        np.savez(tmp_path / f"{name}-in.npz", **case["x"])
        run_cli("run", str(case["host"]), "--inputs", str(tmp_path / f"{name}-in.npz"), "--outputs",
                str(tmp_path / f"{name}-host.npz"), "--repeat", "1", check=True)
        cases.append((name, art))
    from tvmedge.deploy.launch import start_tracker

    with start_tracker(port=0, timeout=180) as tracker, VtaBoard("vta-pynq", tracker.addr, timeout=180) as board:
        where = f"{tracker.addr[0]}:{tracker.addr[1]}"
        assert board.info()["host_part"] == "native"
        for name, art in cases:
            run_cli("run", str(art), "--rpc-tracker", where, "--rpc-key", "vta-pynq", "--inputs",
                    str(tmp_path / f"{name}-in.npz"), "--outputs", str(tmp_path / f"{name}-vta.npz"), "--repeat", "1",
                    check=True)
            got, want = np.load(tmp_path / f"{name}-vta.npz"), np.load(tmp_path / f"{name}-host.npz")
            for k in want:
                assert np.array_equal(got[k], want[k]), (name, k, np.abs(got[k] - want[k]).max())
        # The board says what it is: every figure of a run on it is labelled simulated.
        proc = run_cli("run", str(cases[0][1]), "--rpc-tracker", where, "--rpc-key", "vta-pynq", "--repeat", "1",
                       "--json", check=True)
        rep = json.loads(proc.stdout)
        validate(rep)
        assert rep["device"]["kind"] == "simulated"


@pytest.mark.slow
def test_tune_cli_for_vta(shapes_int8, tmp_path):
    from tvmedge.core.model import save_relax

    path = save_relax(shapes_int8["model"], tmp_path / "shapes-int8.relax")
    proc = run_cli("tune", str(path), "--target", "vta-pynq", "--tuning-db", str(tmp_path / "db"), "--trials", "60",
                   "--json", in_process=True)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    validate(rep)
    assert rep["device"]["kind"] == "simulated"
    assert rep["simulated"] and len(rep["layers"]) == 15
    assert all(r["best_cycles"] <= r["default_cycles"] for r in rep["layers"])
    proc = run_cli("compile", str(path), "--target", "vta-pynq", "--tuning-db", str(tmp_path / "db"), "-o",
                   str(tmp_path / "s.tar"), in_process=True)
    assert proc.returncode == 0, proc.stderr
    assert "(tuned)" in proc.stdout


@pytest.mark.slow
def test_vta_artifact_on_a_plain_rpc_server_is_refused(digits_int8, tmp_path):
    from tvmedge.deploy.launch import start_server
    from tvmedge.deploy.session import connect

    art = tmp_path / "vta.tar"
    compile_model(digits_int8["model"], resolve("vta-pynq"), art)
    with start_server(None, "plain", timeout=180) as srv:
        session = connect(host_port=srv.addr, key="plain", timeout=60)
        with pytest.raises(TvmedgeError, match="no vta-pynq accelerator"):
            run_artifact(art, digits_int8["x"], repeat=1, session=session)


def test_partition_keeps_results_used_elsewhere_on_the_host():
    """The float value between the int32 accumulators and the ReLU is also a model output: the
    ReLU cannot move onto the accumulators, so only conv + bias go to the core."""
    import tvm
    from tvm import relax

    from tvmedge.core.model import ImportedModel, TensorSpec
    from tvmedge.vta import runtime
    from tvmedge.vta.offload import offload

    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 16, 6, 6], "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, relax.const(rng.integers(-127, 128, (32, 16, 3, 3)).astype("int8")),
                                           padding=[1, 1, 1, 1], out_dtype="int32"))
            a = bb.emit(relax.op.add(c, relax.const(rng.integers(-100, 100, (1, 32, 1, 1)).astype("int32"))))
            f = bb.emit(relax.op.astype(a, "float32"))
            m = bb.emit(relax.op.multiply(f, relax.const(np.full((1, 32, 1, 1), 0.01, "float32"))))
            r = bb.emit(relax.op.nn.relu(m))
            o = bb.emit_output(relax.Tuple([r, f]))
        bb.emit_func_output(o)
    mod = bb.get()
    new, info = offload(ImportedModel(mod, [TensorSpec("x", [1, 16, 6, 6], "uint8")], [], "relax", "t", "0"), PYNQ)
    assert info["offloaded"] == ["conv2d_0"]
    text = new.mod.script(show_meta=False)
    assert "call_dps_packed" in text and "R.nn.relu" in text
    runtime.register()
    xv = rng.integers(0, 256, (1, 16, 6, 6)).astype("uint8")

    def run(m):
        vm = relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu())
        return [t.numpy() for t in vm["main"](tvm.runtime.tensor(xv))]

    for got, want in zip(run(new.mod), run(mod)):
        assert np.array_equal(got, want)


@pytest.mark.slow
def test_emulated_ultra96_runs_host_part_under_qemu_bit_exact(digits_int8, tmp_path):
    """vta-ultra96's host CPU is aarch64: the artifact is cross-compiled for it and the emulated
    board runs it (and the simulator) under qemu-aarch64; outputs equal the x86 host int8 build's."""
    from tvmedge.deploy.launch import start_tracker
    from tvmedge.deploy.session import connect
    from tvmedge.vta.board import VtaBoard

    art = tmp_path / "u96.tar"
    meta = compile_model(digits_int8["model"], resolve("vta-ultra96"), art)
    assert meta["target"]["mtriple"] == "aarch64-linux-gnu"
    assert len(meta["vta"]["offloaded"]) == 5
    ref = run_artifact(digits_int8["host"], digits_int8["x"], repeat=1, warmup=0)
    with start_tracker(port=0, timeout=180) as tracker, VtaBoard("vta-ultra96", tracker.addr, timeout=300) as board:
        assert "qemu-aarch64" in board.info()["host_part"]
        session = connect(tracker=tracker.addr, key="vta-ultra96", timeout=120)
        got = run_artifact(art, digits_int8["x"], repeat=1, warmup=0, session=session)
    assert np.array_equal(got.outputs[0], ref.outputs[0])
