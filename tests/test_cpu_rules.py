"""tvmedge's default CPU schedules: every kernel of a model gets one, numerics stay those of
ONNX Runtime (float reassociation only), and the cross-built Pi code really uses NEON."""

from __future__ import annotations

import subprocess
import tarfile

import numpy as np
import pytest
import torch
from torch import nn

from tvmedge.build import compile_model
from tvmedge.frontend import load_model
from tvmedge.lower import cpu_rules
from tvmedge.run import run_artifact
from tvmedge.target import resolve


class OpMix(nn.Module):
    """One of each kernel kind a CNN is made of, at sizes that do not divide the vector width."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.ReLU6())
        self.dw = nn.Conv2d(24, 24, 3, 1, 1, groups=24)
        self.dw2 = nn.Conv2d(24, 24, 5, 2, 2, groups=24)
        self.grouped = nn.Conv2d(24, 36, 3, 1, 1, groups=4)
        self.pw = nn.Conv2d(36, 40, 1)
        self.dilated = nn.Conv2d(40, 40, 3, 1, 2, dilation=2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.avgpool = nn.AvgPool2d(3, 1, 1)
        self.norm = nn.LayerNorm(40)
        self.fc = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        x = x + torch.nn.functional.hardswish(self.dw(x))
        x = self.dw2(x)
        x = torch.sigmoid(self.grouped(x)) * 2.0
        n, c, h, w = x.shape  # channel shuffle: reshape / transpose / reshape
        x = x.reshape(n, 4, c // 4, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = self.pw(x)
        x = torch.cat([self.dilated(x)[:, :20], x[:, 20:]], dim=1)
        seg = torch.nn.functional.interpolate(self.avgpool(x), scale_factor=2, mode="bilinear", align_corners=False)
        x = self.maxpool(x).mean(dim=(2, 3))
        return torch.softmax(self.fc(self.norm(x)), dim=-1), seg


@pytest.fixture(scope="module")
def opmix_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = OpMix().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("opmix") / "opmix.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 30, 30),), str(path), input_names=["input"],
                      output_names=["probs", "seg"], opset_version=17, dynamo=False)
    return path


def test_every_kernel_gets_a_default_schedule_and_matches_onnxruntime(opmix_onnx, tmp_path):
    import onnxruntime as ort

    meta = compile_model(load_model(opmix_onnx), resolve("host"), tmp_path / "m.tar", use_shipped=False)
    sch = meta["schedules"]
    assert sch["unscheduled"] == [] and sch["tuned"] == 0
    # conv/depthwise/grouped/pool/mean/matmul kernels go to the spatial-reduction rule,
    # layout and elementwise kernels to the injective one.
    assert sch["rules"].get("SpatialReduction", 0) >= 7 and sch["rules"].get("Injective", 0) >= 1
    x = np.random.default_rng(0).standard_normal((1, 3, 30, 30)).astype("float32")
    res = run_artifact(tmp_path / "m.tar", {"input": x}, repeat=1)
    refs = ort.InferenceSession(str(opmix_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    for out, ref in zip(res.outputs, refs):
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


def test_rules_follow_the_target_vector_width():
    """Vector width from LLVM's view of the target, never from this machine's CPU name."""
    from tvm.target import Target

    def lanes(spec: dict) -> int:
        return cpu_rules.vector_lanes(Target(spec))

    x86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    assert lanes({**x86, "mcpu": "skylake-avx512"}) == 16
    assert lanes({**x86, "mcpu": "haswell"}) == 8
    assert lanes({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}) == 4
    assert cpu_rules.num_cores(Target({**x86, "mcpu": "haswell", "num-cores": 6})) == 6


def test_avx512_targets_build_full_width_vectors():
    """x86 targets with AVX-512 get ``-prefer-256-bit`` (LLVM otherwise splits some of the
    kernels' 16-lane vectors in two: int8 requantize epilogues ran on ymm registers); others,
    and targets that say how to prefer, are left alone."""
    import json

    from tvmedge.target import resolve

    def mattr(spec: dict) -> list[str]:
        return [str(a) for a in (resolve(json.dumps(spec)).target.attrs.get("mattr") or [])]

    x86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    assert mattr({**x86, "mcpu": "icelake-server"}) == ["-prefer-256-bit"]
    assert mattr({**x86, "mcpu": "znver4"}) == ["-prefer-256-bit"]
    assert mattr({**x86, "mcpu": "haswell"}) == []
    assert mattr({**x86, "mcpu": "icelake-server", "mattr": ["+prefer-256-bit"]}) == ["+prefer-256-bit"]
    assert mattr({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}) == []


def test_vector_factor_takes_whole_vectors_or_one_partial():
    f = cpu_rules._vector_factor
    assert f(128, 16) == 32 and f(48, 16) == 16 and f(24, 16) == 8 and f(12, 16) == 4
    # matrix-vector (no register axis): up to 8 whole vectors (the rule unrolls them), but never
    # several partial ones (LLVM re-packs a 40-lane accumulator lane by lane)
    assert f(1024, 16, max_vectors=8) == 128 and f(960, 16, max_vectors=8) == 96
    assert f(1000, 16, max_vectors=8) == 8
    assert f(7, 16) == 1


def _disassembly(tar: str, tmp_path) -> str:
    with tarfile.open(tar) as t:
        t.extract("model.so", tmp_path, filter="data")
    return subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(tmp_path / "model.so")],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("board", ["pi4", "pi5"])
def test_pi_code_uses_neon(board, opmix_onnx, tmp_path):
    """The Pi libraries' kernels are NEON code: vector fused multiply-adds on 4 fp32 lanes."""
    meta = compile_model(load_model(opmix_onnx), resolve(board), tmp_path / "m.tar", use_shipped=False)
    assert meta["schedules"]["unscheduled"] == []
    asm = _disassembly(str(tmp_path / "m.tar"), tmp_path)
    vector_fmla = sum(1 for ln in asm.splitlines() if "\tfmla\t" in ln and ".4s" in ln)
    assert vector_fmla >= 100, f"only {vector_fmla} vector fmla in the {board} library"


@pytest.mark.parametrize("board", ["pi3", "riscv-u74"])
def test_every_cpu_target_gets_default_schedules(board, opmix_onnx):
    """AArch64 and RISC-V kernels are scheduled the same way (compiled here, not linked)."""
    from tvmedge.build import build_executable

    _, report = build_executable(load_model(opmix_onnx), resolve(board))
    assert report.unscheduled == [] and len(report.default) >= 8


@pytest.mark.slow  # a short MetaSchedule tuning: ~1.5 min
def test_seeded_records_apply_and_a_broken_record_falls_back(opmix_onnx, tmp_path):
    """Each kernel's default schedule, measured here and committed as a record (how tuning
    starts), applies as a record; a record whose trace no longer replays costs only its
    kernel the record: that kernel gets the default rule, named in the report."""
    import json

    import onnxruntime as ort
    from tvm.s_tir import meta_schedule as ms

    from tvmedge.tune.database import RECORDS, WORKLOADS
    from tvmedge.tune.seed import seed_default_records
    from tvmedge.tune.tuner import tuning_tasks

    host = resolve("host")
    model = load_model(opmix_onnx)
    tasks = tuning_tasks(model, host)
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    db = ms.database.JSONDatabase(path_workload=str(db_dir / WORKLOADS), path_tuning_record=str(db_dir / RECORDS))
    builder = ms.builder.LocalBuilder(timeout_sec=600)  # a busy 2-core machine builds slowly
    measured = seed_default_records(tasks, db, host.target, builder, ms.runner.LocalRunner())
    assert len(measured) == len(tasks) and all(us > 0 for us in measured.values())

    meta = compile_model(model, host, tmp_path / "seeded.tar", tuning_db=str(db_dir))
    assert meta["schedules"]["tuned"] == len(tasks) and meta["schedules"]["record_failed"] == []

    # Break the first record's trace: its first instruction now names a block that does not exist.
    lines = (db_dir / RECORDS).read_text().splitlines()
    idx, rec = json.loads(lines[0])
    text = json.dumps(rec[0])
    broken = text.replace('"root"', '"no_such_block"', 1) if '"root"' in text else None
    assert broken is not None, "the trace names no block to break"
    rec[0] = json.loads(broken)
    (db_dir / RECORDS).write_text("\n".join([json.dumps([idx, rec])] + lines[1:]) + "\n")
    meta = compile_model(model, host, tmp_path / "broken.tar", tuning_db=str(db_dir))
    sch = meta["schedules"]
    assert len(sch["record_failed"]) == 1 and sch["tuned"] == len(tasks) - 1
    assert sch["default_rule"] == 1 and sch["unscheduled"] == []
    x = np.random.default_rng(1).standard_normal((1, 3, 30, 30)).astype("float32")
    res = run_artifact(tmp_path / "broken.tar", {"input": x}, repeat=1)
    ref = ort.InferenceSession(str(opmix_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(res.outputs[0] - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


def test_jetson_kernels_get_dlight_gpu_rules(opmix_onnx):
    """CUDA targets take dlight's GPU rules through the same pipeline (compiled here, not linked)."""
    from tvmedge.build import build_executable

    _, report = build_executable(load_model(opmix_onnx), resolve("jetson-nano"))
    assert report.unscheduled == [] and set(report.default.values()) <= {
        "Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback"}


def test_vectorized_sigmoid_is_within_3_ulp():
    """The CPU legalization of sigmoid/SiLU (tvmedge.lower.vecmath) is not libm's: its error
    bound is checked against float64 over the range where the result is a normal float."""
    import tvm
    from tvm.script import relax as R

    from tvmedge.core.vm import ModelVM
    from tvmedge.lower.pipeline import build

    n = 1 << 20

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((n,), "float32")) -> R.Tensor((n,), "float32"):
            with R.dataflow():
                y = R.sigmoid(x)
                R.output(y)
            return y

    x = np.concatenate([np.linspace(-87, 30, n - 4, dtype=np.float32), np.float32([-1e-30, 0, 1e-30, 88])])
    ex, _ = build(Mod, resolve("host").target)
    (y,) = ModelVM(ex, tvm.cpu(0), ["x"])({"x": x})
    exact = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    ulp = np.abs(y.astype(np.float64) - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert ulp.max() <= 3.0, f"sigmoid off by {ulp.max():.2f} ulp at x={x[ulp.argmax()]}"


def test_round_is_vectorized_and_rounds_half_to_even():
    """An int8 model's requantize (divide, round, clamp, cast to uint8 over NHWC channels) is
    built as vector code: with TOPI's ``nearbyint`` TVM's vectorizer gave up and LLVM
    re-vectorized the wrong loop with gathers (lower.vecmath.round_half_even). Ties go to
    even, as numpy's rint and ONNX Round."""
    import re

    import tvm
    from tvm.script import relax as R

    from tvmedge.core.vm import ModelVM
    from tvmedge.lower.pipeline import build

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((1, 32, 32, 16), "float32")) -> R.Tensor((1, 32, 32, 16), "uint8"):
            with R.dataflow():
                y = R.round(R.divide(x, R.const(0.5, "float32")))
                z = R.astype(R.clip(R.add(y, R.const(3.0, "float32")), 0, 255), "uint8")
                R.output(z)
            return z

    host = resolve("host").target
    ex, _ = build(Mod, host)
    ir = "\n".join(m.inspect_source("ll") for m in ex.mod.imports if m.kind == "llvm")
    assert "masked.gather" not in ir and re.search(r"llvm\.nearbyint\.v\d+f32", ir), "requantize not vectorized"
    x = np.random.default_rng(0).uniform(-70, 70, (1, 32, 32, 16)).astype(np.float32)
    x.flat[:6] = [0.25, 0.75, 1.25, -0.25, -0.75, 63.25]  # x / 0.5: ties 0.5, 1.5, 2.5, -0.5, -1.5, 126.5
    (y,) = ModelVM(ex, tvm.cpu(0), ["x"])({"x": x})
    np.testing.assert_array_equal(y, np.clip(np.rint(x / np.float32(0.5)) + 3, 0, 255).astype(np.uint8))


class WideConv(nn.Module):
    """A conv and a dense layer whose weights are big enough to be packed per vector tile."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(64, 128, 3, 1, 1)
        self.fc = nn.Linear(128, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_big_weights_are_packed_at_compile_time_and_match_onnxruntime(tmp_path):
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from tvmedge.lower.pipeline import finish, kernels, prepare, schedule

    torch.manual_seed(0)
    path = tmp_path / "wide.onnx"
    torch.onnx.export(WideConv().eval(), (torch.randn(1, 64, 9, 9),), str(path), input_names=["x"],
                      opset_version=17, dynamo=False)
    host = resolve("host")
    mod, report = schedule(prepare(load_model(path).mod, host.target, layout_free=True), host.target)
    assert report.unscheduled == []
    mod = finish(mod, host.target)
    # The packing copy left the kernels (folded into the constants): the conv and the dense
    # kernel now take a weight with the vector tile as its innermost axis.
    packed = [n for n, f in kernels(mod).items() if any(len(p.shape) == 5 for p in f.params)]
    assert any("conv2d" in n for n in packed), kernels(mod).keys()
    assert not any("layout_rewrite_preproc" in str(f) for f in kernels(mod).values())
    x = np.random.default_rng(0).standard_normal((1, 64, 9, 9)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(mod, host.target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(out - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


def test_batchnorm_of_a_pt2_model_is_folded_into_the_conv(tmp_path):
    """torch.export keeps BatchNorm (ONNX exporters fold it): it must become the conv's weights
    and a bias, not a per-element subtract/divide/multiply/add epilogue."""
    import tvm
    from tvm import relax

    from tvmedge.lower.pipeline import kernels, prepare, schedule

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).eval()
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 8, 10, 10)
    path = tmp_path / "convbn.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(path))
    host = resolve("host")
    mod, _ = schedule(prepare(load_model(path).mod, host.target, layout_free=True), host.target)
    names = list(kernels(mod))
    assert not any("divide" in n or "subtract" in n for n in names), names
    vm = relax.VirtualMachine(tvm.compile(mod, host.target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    out = (out if hasattr(out, "numpy") else out[0]).numpy()
    ref = net(x).detach().numpy()
    assert np.abs(out - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


def test_channel_padding_takes_counts_vectors_do_not_fit():
    from tvmedge.lower.chanpad import padded_channels

    # ShuffleNet's counts go to whole vectors; those half vectors fit stay (EfficientNet's 24/40,
    # MobileNetV3's 72/120); counts not even 4 lanes fit (low-rank's ranks) go to a multiple of 4
    # at least, whatever the growth, since scalar code is 4-16x slower.
    assert [padded_channels(c, 16) for c in (58, 116, 24, 40, 72, 120, 440, 20)] == [64, 128, None, None, None, None, None, None]
    assert [padded_channels(c, 16) for c in (18, 17, 23, 35, 10, 5, 3)] == [24, 20, 24, 40, 16, 8, None]
    assert [padded_channels(c, 16) for c in (9, 11, 12, 15, 8)] == [16, 16, 16, 16, None]
    assert [padded_channels(c, 4) for c in (58, 18, 16, 12)] == [60, 20, None, None]


def test_matrix_product_columns_are_padded_to_two_vectors():
    from tvmedge.lower.chanpad import padded_columns

    # to a multiple of 32 lanes where that grows the columns by at most a third
    assert [padded_columns(n, 16) for n in (1000, 1024, 10, 21, 100, 40)] == [1024, None, None, None, 128, None]
    assert padded_columns(1000, 4) is None and padded_columns(1002, 4) == 1008


def _exported(make: type[nn.Module], shape: tuple[int, ...], path, outputs: list[str]):
    """``make()`` (built with seed 0) exported to ONNX at ``path`` with input ``x``: (path,
    imported model, host)."""
    torch.manual_seed(0)
    torch.onnx.export(make().eval(), (torch.randn(*shape),), str(path), input_names=["x"], output_names=outputs,
                      opset_version=17, dynamo=False)
    return path, load_model(path), resolve("host")


class Classifier(nn.Module):
    """An ImageNet-style head: pooled features, 1000 classes, softmax after the padded product."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(96, 1000)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(x.mean(dim=(2, 3)))
        return logits, torch.softmax(logits, dim=-1)


def test_classifier_columns_are_padded_sliced_back_and_match_onnxruntime(tmp_path):
    import onnxruntime as ort

    from tvmedge.lower.pipeline import kernels, prepare

    path, model, host = _exported(Classifier, (1, 96, 7, 7), tmp_path / "head.onnx", ["logits", "probs"])
    products = {n: f for n, f in kernels(prepare(model.mod, host.target)).items() if "matmul" in n}
    assert len(products) == 1
    (name, func), = products.items()
    # 1024 columns computed, the slice back to 1000 fused into the product's epilogue
    assert "strided_slice" in name and any(1024 in [int(d) for d in p.shape] for p in func.params)
    # its tile of several vectors is one unrolled vector op per vector, no wider LLVM vector
    import re

    from tvmedge.lower.pipeline import schedule

    scheduled = kernels(schedule(prepare(model.mod, host.target), host.target)[0])[name].script()
    widths = {int(w) for w in re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", scheduled)}
    assert widths and max(widths) <= cpu_rules.vector_lanes(host.target) and "T.unroll" in scheduled
    x = np.random.default_rng(0).standard_normal((1, 96, 7, 7)).astype("float32")
    refs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    compile_model(model, host, tmp_path / "head.tar", use_shipped=False)
    outs = run_artifact(tmp_path / "head.tar", {"x": x}, repeat=1).outputs
    for out, ref in zip(outs, refs, strict=True):
        assert out.shape == ref.shape and np.abs(out - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


class ResidualPair(nn.Module):
    """3x3 convs Winograd takes (28x28: F(4x4), 14x14: F(2x2)) with a fused residual
    epilogue, and one it leaves (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(16, 16, 3, 1, 1)
        self.b = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
        self.down = nn.Conv2d(16, 32, 3, 2, 1)
        self.c = nn.Conv2d(32, 32, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b(torch.relu(self.a(x))) + x)
        x = torch.relu(self.down(x))
        return torch.relu(self.c(x) + x)


def test_winograd_takes_dense_3x3_convs_and_matches_onnxruntime(tmp_path, monkeypatch):
    import onnxruntime as ort

    from tvmedge.lower import winograd

    torch.manual_seed(0)
    path = tmp_path / "pair.onnx"
    torch.onnx.export(ResidualPair().eval(), (torch.randn(1, 16, 28, 28),), str(path), input_names=["x"],
                      opset_version=17, dynamo=False)
    x = np.random.default_rng(0).standard_normal((1, 16, 28, 28)).astype("float32")
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    counts = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("TVMEDGE_WINOGRAD", flag)
        meta = compile_model(load_model(path), resolve("host"), tmp_path / f"w{flag}.tar", use_shipped=False)
        assert meta["schedules"]["unscheduled"] == []
        counts[flag] = meta["schedules"]["rules"].get("WinogradTransform", 0)
        out = run_artifact(tmp_path / f"w{flag}.tar", {"x": x}, repeat=1).outputs[0]
        assert np.abs(out - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max(), flag
    # three convs qualify (two of them one kernel pair): an input and an output transform
    # for each shape, the residual add and ReLU fused into the output transforms
    assert counts["1"] >= 4 and counts["0"] == 0
    assert winograd.tile_size(28, 28) == 4 and winograd.tile_size(14, 14) == 2 and winograd.tile_size(7, 7) is None


def test_winograd_matrices_compute_a_3_tap_convolution():
    from tvmedge.lower.winograd import matrices

    rng = np.random.default_rng(1)
    for m in (2, 4):
        a, b, g = matrices(m)
        d, k = rng.standard_normal(m + 2), rng.standard_normal(3)
        y = a.T @ ((g @ k) * (b.T @ d))
        assert np.allclose(y, np.correlate(d, k, mode="valid"), atol=1e-12)


class Aspp(nn.Module):
    """DeepLabV3's ASPP on a 16x16 map: at dilation 24 and 36 only the centre taps read the
    input; at 12 each tap does for some positions only (zones); a stride-2 3x3 conv on a 1x1
    map; and a 3x5 kernel whose rows alone reach past the map."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList([nn.Conv2d(8, 4, 3, padding=d, dilation=d) for d in (1, 12, 24, 36)])
        self.wide = nn.Conv2d(8, 4, (3, 5), padding=(20, 2), dilation=(20, 1))
        self.tiny = nn.Conv2d(8, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.cat([b(x) for b in self.branches] + [self.wide(x)], dim=1)
        return y, self.tiny(nn.functional.adaptive_avg_pool2d(x, 1))


def test_taps_that_only_read_padding_are_dropped_exactly(tmp_path):
    import onnxruntime as ort

    from tvmedge.lower.pipeline import kernels, prepare
    from tvmedge.lower.taps import live_taps, zones

    assert live_taps(16, 16, 3, 1, 24, 24) == [1] and live_taps(16, 16, 3, 1, 12, 12) == [0, 1, 2]
    assert live_taps(1, 1, 3, 2, 1, 1) == [1]
    assert zones(16, 16, 3, 1, 12, 12) == [(0, 4, [1, 2]), (4, 12, [1]), (12, 16, [0, 1])]
    path, model, host = _exported(Aspp, (1, 8, 16, 16), tmp_path / "aspp.onnx", ["y", "tiny"])
    weights = sorted(tuple(int(d) for d in f.params[1].shape)
                     for name, f in kernels(prepare(model.mod, host.target)).items() if "conv2d" in name)
    # dilation 1 stays 3x3; 24 and 36 become 1x1; the 3x5 kernel keeps its middle row; the conv
    # on the 1x1 map keeps its centre tap; dilation 12 becomes 3x3 zones of at most 2x2 taps
    assert weights.count((3, 3, 8, 4)) == 1 and (1, 5, 8, 4) in weights and (1, 1, 8, 4) in weights, weights
    assert (2, 2, 8, 4) in weights and (2, 1, 8, 4) in weights, weights
    x = np.random.default_rng(0).standard_normal((1, 8, 16, 16)).astype("float32")
    refs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    compile_model(model, host, tmp_path / "aspp.tar", use_shipped=False)
    outs = run_artifact(tmp_path / "aspp.tar", {"x": x}, repeat=1).outputs
    for out, ref in zip(outs, refs, strict=True):
        assert np.abs(out - ref).max() <= 1e-5 + 1e-5 * np.abs(ref).max()
