"""Shipped schedules that travel: ISA classes from target features, which databases a target
gets, records tuned for 2 cores applied to another core count, and the data folders found
from an installed (non-editable) wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tvmedge.isa import isa_class, record_class, tvm_series, usable_classes
from tvmedge.tune.shipped import database_class
from tvmedge.core.resources import data_dir
from tvmedge.target import resolve
from tvmedge.tune.database import RECORDS, WORKLOADS
from tvmedge.tune.shipped import open_databases, shipped_class_dir, shipped_databases

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "schedules" / "x86_64-avx512" / f"tvm-{tvm_series()}"


def x86(mcpu: str | None = None, **extra) -> dict:
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", **({"mcpu": mcpu} if mcpu else {}), **extra}


def arm64(mcpu: str) -> dict:
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu}


@pytest.mark.parametrize("target, cls", [
    (x86("haswell"), "x86_64-avx2"),
    (x86("znver3"), "x86_64-avx2"),
    (x86("alderlake"), "x86_64-avx2"),  # AVX-VNNI without AVX-512: TVM's VNNI intrinsic is 512-bit
    (x86("skylake-avx512"), "x86_64-avx512"),
    (x86("znver4"), "x86_64-avx512-vnni"),
    (x86("cascadelake"), "x86_64-avx512-vnni"),
    (x86("znver4", mattr=["-avx512vnni"]), "x86_64-avx512"),  # mattr counts, not the CPU's name
    (x86("haswell", mattr=["+avx512f", "+avx512bw", "+avx512dq", "+avx512vl"]), "x86_64-avx512"),
    (x86(), "x86_64"),
    (arm64("cortex-a72"), "aarch64-neon"),
    (arm64("cortex-a53"), "aarch64-neon"),
    (arm64("cortex-a76"), "aarch64-dotprod"),
    ({"kind": "llvm", "mtriple": "riscv64-linux-gnu", "mattr": ["+m", "+a", "+f", "+d", "+c", "+v"]}, "riscv64-rvv"),
    ("riscv/sifive-u74", "riscv64"),
    ("raspberry-pi/4b-aarch64", "aarch64-neon"),
    ("arm/rasp3b", "arm-neon"),
    ("nvidia/jetson-agx-xavier", "cuda-sm_72"),
])
def test_isa_class_from_target_features(target, cls):
    assert isa_class(target) == cls
    assert isa_class(json.dumps(target) if isinstance(target, dict) else target) == cls


def test_device_descriptions_classes():
    assert isa_class(resolve("pi4").target) == "aarch64-neon"
    assert isa_class(resolve("pi5").target) == "aarch64-dotprod"
    assert isa_class(resolve("riscv-u74").target) == "riscv64"
    assert isa_class(resolve("jetson-nano").target) == "cuda-sm_53"


def test_superset_rule():
    assert usable_classes(x86("znver4")) == ["x86_64-avx512-vnni", "x86_64-avx512", "x86_64-avx2", "x86_64"]
    assert usable_classes(x86("skylake-avx512")) == ["x86_64-avx512", "x86_64-avx2", "x86_64"]
    assert usable_classes(x86("haswell")) == ["x86_64-avx2", "x86_64"]
    assert usable_classes(arm64("cortex-a76")) == ["aarch64-dotprod", "aarch64-neon", "aarch64"]
    assert usable_classes(arm64("cortex-a72")) == ["aarch64-neon", "aarch64"]


def test_vnni_records_keep_their_class_fp32_ones_do_not():
    assert record_class(x86("znver4"), uses_intrinsics=True) == "x86_64-avx512-vnni"
    assert record_class(x86("znver4"), uses_intrinsics=False) == "x86_64-avx512"
    assert record_class(arm64("cortex-a76"), uses_intrinsics=False) == "aarch64-neon"
    assert record_class(x86("skylake-avx512"), uses_intrinsics=False) == "x86_64-avx512"
    # The shipped database was tuned on an AVX-512 + VNNI CPU (a Zen 5) but holds fp32 records only.
    for model, mcpu in (("lraspp_mbv3", "znver5"),):
        assert json.loads((SHIPPED / model / RECORDS).read_text().splitlines()[0])[1][2]["mcpu"] == mcpu
        assert database_class(SHIPPED / model) == "x86_64-avx512"


def tensorized_copy(src: Path, dest: Path) -> Path:
    """``src`` with a Tensorize step added to each record's trace (as a VNNI-tensorized record has)."""
    dest.mkdir(parents=True)
    shutil.copy(src / WORKLOADS, dest / WORKLOADS)
    lines = []
    for raw in (src / RECORDS).read_text().splitlines():
        idx, rec = json.loads(raw)
        rec[0][0].append(["Tensorize", ["b0"], ["dot_16x4_vnni", 1], []])
        lines.append(json.dumps([idx, rec]))
    (dest / RECORDS).write_text("\n".join(lines) + "\n")
    return dest


def test_avx2_target_gets_no_avx512_database():
    assert shipped_databases(resolve(json.dumps(x86("haswell")))) == []
    assert shipped_databases(resolve(json.dumps(x86()))) == []
    assert shipped_databases(resolve("pi4")) == []


def test_avx512_targets_get_the_shipped_databases():
    want = [SHIPPED / "lraspp_mbv3"]
    for mcpu in ("skylake-avx512", "znver4", "sapphirerapids"):
        assert shipped_databases(resolve(json.dumps(x86(mcpu, **{"num-cores": 8})))) == want


def test_host_gets_the_shipped_databases_here():
    host = resolve("host")
    classes = usable_classes(host.target)
    # The development machines (AMD Zen 4/5, Intel Xeon) all have AVX-512.
    assert "x86_64-avx512" in classes, f"this machine is {classes[0]}: no database is shipped for it"
    assert shipped_databases(host) == [SHIPPED / "lraspp_mbv3"]


def test_vnni_records_never_reach_a_cpu_without_vnni(tmp_path):
    root = tmp_path / "schedules"
    vnni_dir = shipped_class_dir("x86_64-avx512-vnni", root=root)
    tensorized_copy(SHIPPED / "lraspp_mbv3", vnni_dir / "tensorized")
    assert database_class(vnni_dir / "tensorized") == "x86_64-avx512-vnni"
    # Misfiled under the avx512 class, the folder alone would let it through: the content check does not.
    misfiled = tensorized_copy(SHIPPED / "lraspp_mbv3", shipped_class_dir("x86_64-avx512", root=root) / "tensorized")
    shutil.copytree(SHIPPED / "lraspp_mbv3", misfiled.parent / "lraspp_mbv3")
    skx = resolve(json.dumps(x86("skylake-avx512")))
    with pytest.warns(UserWarning, match="need x86_64-avx512-vnni"):
        got = shipped_databases(skx, root=root)
    assert got == [misfiled.parent / "lraspp_mbv3"]
    # A VNNI CPU takes its own class first, then the plain AVX-512 ones.
    zen4 = resolve(json.dumps(x86("znver4")))
    assert shipped_databases(zen4, root=root) == [vnni_dir / "tensorized", misfiled.parent / "lraspp_mbv3",
                                                  misfiled]


def test_own_class_wins_over_the_classes_it_contains(tmp_path):
    from tvm.s_tir import meta_schedule as ms

    a = shipped_class_dir("x86_64-avx512-vnni", root=tmp_path) / "m"
    b = shipped_class_dir("x86_64-avx512", root=tmp_path) / "m"
    for d in (a, b):
        shutil.copytree(SHIPPED / "lraspp_mbv3", d)
    db = open_databases([a, b])
    assert isinstance(db, ms.database.OrderedUnionDatabase)
    same_folder = open_databases([b, b.parent / "m"])
    assert isinstance(same_folder, ms.database.UnionDatabase)


def test_data_folders_found():
    assert (data_dir("targets") / "host.json").exists()
    assert data_dir("schedules").is_dir()
    with pytest.raises(ValueError):
        data_dir("nonsense")


def scheduled_kernels(model, target, db_dirs):
    """``compile``'s kernels for ``target`` with the records of ``db_dirs`` applied, and its report."""
    import tvm
    from tvm import relax

    from tvmedge.lower.pipeline import prepare, schedule

    mod = prepare(model.mod, target)
    with tvm.target.Target(target):
        mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    return schedule(mod, target, open_databases(db_dirs))


@pytest.mark.parametrize("name", ["lraspp_mbv3"])
def test_shipped_records_match_the_kernels_compile_builds(name, tmp_path):
    """A change to the lowering that changes the kernels (their workload hashes) leaves the
    shipped records behind: re-tune them (schedules/README.md) when this fails."""
    from tvm.target import Target

    from tvmedge import zoo
    from tvmedge.frontend import load_model
    from tvmedge.target import host_target_dict

    model = load_model(zoo.export(name, tmp_path / "m.onnx"))
    _, report = scheduled_kernels(model, Target(host_target_dict()), [SHIPPED / name])
    # Winograd's transforms are never tuned (tvmedge.tune.tuner._rule_only): their rule schedules them
    rule_only = [k for k, rule in report.default.items() if rule == "WinogradTransform"]
    total = len(report.tuned) + len(report.default) + len(report.unscheduled) - len(rule_only)
    assert len(report.tuned) >= 0.8 * total, f"{len(report.tuned)} of {total} kernels got a shipped record"


@pytest.mark.slow
def test_records_tuned_for_2_cores_apply_and_run_with_the_targets_core_count(tmp_path):
    """Records carry no thread count: tuned for a 2-core target, they give the same kernels for
    an 8-core one, and the library runs on whatever thread pool the run asks for."""
    import dataclasses

    import onnxruntime as ort
    from tvm.target import Target
    from tvm_ffi import structural_equal

    from tvmedge import zoo
    from tvmedge.build import compile_model
    from tvmedge.frontend import load_model
    from tvmedge.core.model import random_inputs
    from tvmedge.target import host_target_dict
    from tvmedge.tune.pool import device_pool
    from tvmedge.tune.tuner import TuneOptions, tune_model

    onnx_path = zoo.export("digits-cnn", tmp_path / "m.onnx")
    model = load_model(onnx_path)
    host = resolve("host")
    two = dataclasses.replace(host, target=Target({**host_target_dict(), "num-cores": 2}))
    eight = dataclasses.replace(host, target=Target({**host_target_dict(), "num-cores": 8}))
    db = tmp_path / "db"
    with device_pool(two, log=lambda m: None, threads=2) as pool:
        tune_model(model, two, db, TuneOptions(8), pool, progress=False)
    records = [json.loads(ln)[1][2] for ln in (db / RECORDS).read_text().splitlines() if ln.strip()]
    assert records and {r["num-cores"] for r in records} == {2}

    mods = {}
    for dev in (two, eight):
        mods[dev.target_json["num-cores"]], report = scheduled_kernels(model, dev.target, [db])
        assert report.tuned, "no kernel got a tuning record"
    assert all(structural_equal(mods[2][n], mods[8][n]) for n in report.tuned)

    meta = compile_model(model, eight, tmp_path / "m.tar", tuning_db=db)
    assert meta["target"]["num-cores"] == 8 and meta["schedules"]["tuned"] == len(report.tuned)
    inputs = random_inputs(meta["inputs"])
    np.savez(tmp_path / "in.npz", **inputs)
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    # Each run in its own process: TVM sizes its thread pool once per process.
    for threads in ([], ["--threads", "1"]):  # []: the run's default, all of this machine's cores
        out = tmp_path / f"out{len(threads)}.npz"
        proc = subprocess.run([sys.executable, "-m", "tvmedge", "run", str(tmp_path / "m.tar"), "--inputs",
                               str(tmp_path / "in.npz"), "--outputs", str(out), "--repeat", "2", "--json", *threads],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["threads"] == (int(threads[1]) if threads else os.cpu_count())
        got = np.load(out)
        np.testing.assert_allclose(got[got.files[0]], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_installed_wheel_finds_targets_schedules_and_kernels(tmp_path):
    """Build a wheel, install it (no deps, no network) in a fresh venv, resolve data from there."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("tvmedge", "targets", "schedules", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "_data"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", str(src), "-w", str(wheels)], check=True, capture_output=True, text=True, cwd=tmp_path)
    wheel = next(wheels.glob("tvmedge-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, text=True)
    # tvm, numpy, ... from this environment, after the fresh one's own site-packages (no .pth
    # of ours is processed there, so this checkout's editable install stays out of it).
    import sysconfig

    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check = textwrap.dedent(f"""
        import json, tvmedge
        from pathlib import Path
        from tvmedge.core.resources import data_dir
        from tvmedge.devices import device_names
        from tvmedge.target import resolve
        from tvmedge.tune.shipped import shipped_databases
        pkg = Path(tvmedge.__file__).parent
        assert pkg.is_relative_to({str(venv)!r}), pkg
        assert data_dir("targets") == pkg / "_data" / "targets", data_dir("targets")
        assert "pi4" in device_names() and resolve("pi4").name == "pi4"
        dbs = shipped_databases(resolve(json.dumps({x86("skylake-avx512")!r})))
        assert [d.name for d in dbs] == ["lraspp_mbv3"], dbs
        assert all(d.is_relative_to(pkg / "_data" / "schedules") for d in dbs), dbs
        from tvmedge.kernels import kernel_source
        assert data_dir("kernels") == pkg / "_data" / "kernels" and "popc" in kernel_source("xnor.cu")
        print("ok", dbs[0])
    """)
    # Without PYTHONPATH: a checkout on it would be imported instead of the installed wheel.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(py), "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "_data/schedules/x86_64-avx512/tvm-" in proc.stdout
