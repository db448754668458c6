"""Tuning over real RPC (local tracker + servers): numerics, reuse, device farm, device loss + resume."""

from __future__ import annotations

import json
import shutil
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tvmedge import zoo
from tvmedge.deploy.address import format_host_port
from tvmedge.deploy.launch import start_server, start_tracker
from tvmedge.core.schema import validate
from tvmedge.deploy.tracker import list_devices
from tvmedge.tune.database import RECORDS, STATE, WORKLOADS, export_best
from conftest import run_cli


def tvmedge(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=timeout)


def record_lines(db: Path) -> list[str]:
    p = db / RECORDS
    return [ln for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


def assert_valid_database(db: Path) -> int:
    """Every line parses and TVM's own JSONDatabase loads the files; returns the record count."""
    from tvm.s_tir import meta_schedule as ms

    for name in (WORKLOADS, RECORDS):
        for line in (db / name).read_text().splitlines():
            json.loads(line)
    database = ms.database.JSONDatabase(path_workload=str(db / WORKLOADS), path_tuning_record=str(db / RECORDS),
                                        allow_missing=False)
    return len(database)


@pytest.fixture(scope="module")
def tuned4(digits_onnx, tmp_path_factory):
    """One completed 4-trial tuning of the digits CNN (tests copy its database)."""
    db = tmp_path_factory.mktemp("tuned4") / "db"
    proc = tvmedge("tune", str(digits_onnx), "--tuning-db", str(db), "--trials", "4", "--json", "--no-compare")
    assert proc.returncode == 0, proc.stderr
    return {"db": db, "report": json.loads(proc.stdout)}


def server_env() -> dict[str, str]:
    return {"TVM_NUM_THREADS": "1", "TMPDIR": tempfile.mkdtemp(prefix="tvmedge-test-dev-")}


@pytest.mark.slow  # ~2.5 min (two tune runs with the end-to-end comparison): the longest default test
def test_tune_local_then_compile_matches_onnxruntime_and_reuses(digits_onnx, tmp_path):
    import onnxruntime as ort

    db = tmp_path / "db"
    proc = tvmedge("tune", str(digits_onnx), "--tuning-db", str(db), "--trials", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["trials_run"] >= 4 and rep["devices_used"] == 1
    validate(rep)
    assert rep["latency_ms"]["median"] > 0 and rep["baselines"]["onnxruntime"]["latency_ms"]["median"] > 0
    assert rep["baselines"]["untuned"]["latency_ms"]["runs"] >= 3 and rep["device"]["kind"] == "hardware"
    tuned = [t for t in rep["tasks"] if t["trials"]]
    assert tuned and all(t["best_us"] > 0 for t in tuned)
    assert assert_valid_database(db) >= rep["trials_run"] - 2  # a few candidates may fail to build
    state = json.loads((db / STATE).read_text())
    assert state["last_run"]["completed"] is True

    # tune's end-to-end comparison is stored for compile to follow.
    (verdict,) = state["end_to_end"].values()
    assert verdict["faster"] == ("default" if rep["tuned_slower_than_default"] else "tuned") == rep["end_to_end"]["faster"]
    assert verdict["tuned_ms"] == round(rep["latency_ms"]["median"], 4)

    # A model measured slower with its records than with the defaults is compiled with the
    # defaults, and says so; --always-apply-records overrides.
    forced = dict(state, end_to_end={k: dict(v, faster="default", tuned_ms=2.0, default_ms=1.0)
                                     for k, v in state["end_to_end"].items()})
    (db / STATE).write_text(json.dumps(forced))
    proc = tvmedge("compile", str(digits_onnx), "-o", str(tmp_path / "d.tar"), "--tuning-db", str(db))
    assert proc.returncode == 0, proc.stderr
    assert "slower end to end with these records" in proc.stdout and "kernels: 0 from tuning records" in proc.stdout
    proc = tvmedge("compile", str(digits_onnx), "-o", str(tmp_path / "t.tar"), "--tuning-db", str(db), "--json",
                   "--always-apply-records")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout)
    assert meta["tuning_db"] == str(db) and meta["tuning_db_skipped"] is None and meta["schedules"]["tuned"] > 0
    (db / STATE).write_text(json.dumps(state))
    x = zoo.example_input(zoo.get("digits-cnn"), seed=5).numpy()
    np.savez(tmp_path / "in.npz", input=x)
    proc = tvmedge("run", str(tmp_path / "t.tar"), "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "o.npz"))
    assert proc.returncode == 0, proc.stderr
    ref = ort.InferenceSession(str(digits_onnx)).run(None, {"input": x})[0]
    out = np.load(tmp_path / "o.npz")["logits"]
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4

    # Same model again: every tuned workload is reused, no trial is spent twice.
    before = record_lines(db)
    proc = tvmedge("tune", str(digits_onnx), "--tuning-db", str(db), "--trials", "8", "--json", "--no-compare")
    assert proc.returncode == 0, proc.stderr
    rep2 = json.loads(proc.stdout)
    reused = {t["name"] for t in rep2["tasks"] if t["status"] == "reused"}
    assert reused == {t["name"] for t in tuned}
    assert all(t["trials"] == 0 for t in rep2["tasks"] if t["name"] in reused)
    assert record_lines(db)[: len(before)] == before

    # What schedules/ ships: the fastest measured record of each workload, nothing else.
    best = {}
    for line in record_lines(db):
        idx, rec = json.loads(line)
        if rec[1] and all(s < 1e9 for s in rec[1]):
            t = sum(rec[1]) / len(rec[1])
            best[idx] = min(best.get(idx, t), t)
    assert export_best(db, tmp_path / "best") == len(best) == assert_valid_database(tmp_path / "best")
    for line in record_lines(tmp_path / "best"):
        idx, rec = json.loads(line)
        assert sum(rec[1]) / len(rec[1]) == best[idx]


@pytest.mark.slow
def test_device_farm_two_servers_one_key(digits_onnx, tmp_path):
    with start_tracker() as tr:
        with start_server(tr.addr, "farm", env=server_env()), start_server(tr.addr, "farm", env=server_env()):
            assert [d["free"] for d in list_devices(tr.addr) if d["key"] == "farm"] == [2]
            proc = tvmedge("tune", str(digits_onnx), "--tuning-db", str(tmp_path / "db"), "--trials", "24",
                           "--rpc-tracker", format_host_port(tr.addr), "--rpc-key", "farm", "--json", "--no-compare")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["devices_available"] == 2
    assert rep["devices_used"] == 2


@pytest.mark.slow
def test_device_killed_mid_tune_keeps_database_and_resume_finishes(digits_onnx, tmp_path):
    db = tmp_path / "db"
    with start_tracker() as tr:
        srv = start_server(tr.addr, "victim", env=server_env())
        cmd = [sys.executable, "-m", "tvmedge", "tune", str(digits_onnx), "--tuning-db", str(db), "--trials", "32",
               "--rpc-tracker", format_host_port(tr.addr), "--rpc-key", "victim", "--no-compare"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.time() + 600
            # kill at the first measured batch (4 trials of 32): most of the budget is still to come
            while not record_lines(db) and time.time() < deadline and proc.poll() is None:
                time.sleep(0.5)
            assert proc.poll() is None, "tuning ended before the device could be killed"
            srv.stop()  # the device disappears (its whole process group is killed)
            kept = len(record_lines(db))
            out, err = proc.communicate(timeout=900)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode != 0
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert lines and "lost" in lines[0] and "--resume" in lines[0], err[-2000:]
        assert "Traceback" not in err
        assert assert_valid_database(db) >= kept
        assert json.loads((db / STATE).read_text())["last_run"]["completed"] is False

        with start_server(tr.addr, "victim", env=server_env()):
            res = tvmedge("tune", str(digits_onnx), "--tuning-db", str(db), "--resume",
                          "--rpc-tracker", format_host_port(tr.addr), "--rpc-key", "victim", "--json", "--no-compare")
    assert res.returncode == 0, res.stderr
    assert json.loads((db / STATE).read_text())["last_run"]["completed"] is True
    assert assert_valid_database(db) >= kept


@pytest.mark.slow
def test_tune_on_emulated_pi4_compile_and_run_there_matches_onnxruntime(digits_onnx, tmp_path):
    """The issue's bar: tune against an emulated pi4 through a tracker, compile with the
    database for pi4, run the artifact on the emulated board over RPC, compare with ORT."""
    import onnxruntime as ort

    from tvmedge.deploy.emulate import EmulatedDevice

    db = tmp_path / "db"
    key = f"pi4-tune-{os.getpid()}"
    x = zoo.example_input(zoo.get("digits-cnn"), seed=11).numpy()
    np.savez(tmp_path / "in.npz", input=x)
    with start_tracker() as tr, EmulatedDevice("pi4", tr.addr, key=key):
        addr = format_host_port(tr.addr)
        proc = tvmedge("tune", str(digits_onnx), "--target", "pi4", "--tuning-db", str(db), "--trials", "8",
                       "--rpc-tracker", addr, "--rpc-key", key, "--json", "--no-compare")
        assert proc.returncode == 0, proc.stderr
        rep = json.loads(proc.stdout)
        validate(rep)
        # no --emulated: the board started by EmulatedDevice says what it is
        assert rep["device"]["kind"] == "emulated" and rep["device"]["board"] == "pi4"
        assert rep["devices_used"] == 1 and rep["trials_run"] >= 4
        assert [t for t in rep["tasks"] if t["best_us"]], rep["tasks"]
        assert assert_valid_database(db) >= 4

        proc = tvmedge("compile", str(digits_onnx), "--target", "pi4", "--tuning-db", str(db),
                       "-o", str(tmp_path / "pi4.tar"), "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["tuning_db"] == str(db)
        proc = tvmedge("run", str(tmp_path / "pi4.tar"), "--rpc-tracker", addr, "--rpc-key", key, "--repeat", "3",
                       "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "out.npz"), "--json")
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
    validate(info)
    assert info["device"]["target"]["mtriple"].startswith("aarch64") and info["latency_ms"]["median"] > 0
    assert info["device"]["kind"] == "emulated" and info["device"]["arch"] == "aarch64"
    ref = ort.InferenceSession(str(digits_onnx)).run(None, {"input": x})[0]
    out = np.load(tmp_path / "out.npz")["logits"]
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4


def test_serial_runner_answers_once_every_candidate_is_measured(digits_onnx, tmp_path):
    """A device on this machine's cores (the local server) gets a runner that returns from
    run() with every candidate measured, so no build overlaps a measurement."""
    from tvm.s_tir import meta_schedule as ms

    from tvmedge.frontend import load_model
    from tvmedge.lower.pipeline import first_schedule
    from tvmedge.target import resolve
    from tvmedge.tune.measure import make_builder, make_runner, serial_runner
    from tvmedge.tune.pool import device_pool
    from tvmedge.tune.tuner import tuning_tasks

    device = resolve("host")
    funcs = [t.dispatched[0]["main"] for t in tuning_tasks(load_model(digits_onnx), device)][:3]
    with device_pool(device, log=lambda *_: None, threads=1) as pool:
        assert pool.shares_host
        builder = make_builder(None, 1, timeout_s=120)
        runner = serial_runner(make_runner(pool.tracker, pool.key, 1, session_timeout_s=60,
                                           device_log=tmp_path / "devices.log", emulated=False))
        built = []
        try:
            schedules = [first_schedule(f, device.target)[0] for f in funcs]
            built = builder.build([ms.builder.BuilderInput(s.mod, device.target) for s in schedules])
            assert all(b.error_msg is None for b in built), [b.error_msg for b in built]
            futures = runner.run([ms.runner.RunnerInput(b.artifact_path, "cpu", ms.arg_info.ArgInfo.from_prim_func(f))
                                  for b, f in zip(built, funcs)])
            assert len(futures) == len(funcs) and all(f.done() for f in futures)
            results = [f.result() for f in futures]
            assert all(r.error_msg is None and len(r.run_secs) > 0 for r in results), [r.error_msg for r in results]
        finally:
            for p in (runner.pool, builder.pool):
                if p is not None:
                    p.shutdown()
            for b in built:
                if b.artifact_path:
                    ms.utils.remove_build_dir(b.artifact_path)


def test_tune_errors(digits_onnx, tmp_path):
    proc = tvmedge("tune", str(digits_onnx), "--tuning-db", str(tmp_path / "db"), "--resume")
    assert proc.returncode != 0 and "nothing to resume" in proc.stderr and "Traceback" not in proc.stderr
    proc = tvmedge("tune", str(digits_onnx), "--tuning-db", str(tmp_path / "db"), "--rpc-tracker", "127.0.0.1:1",
                   "--rpc-key", "pi4")
    assert proc.returncode != 0 and "127.0.0.1:1" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # shares a 4-trial tuning fixture: ~4 min together
def test_resume_gives_the_rest_to_tasks_the_interrupted_run_never_reached(digits_onnx, tuned4, tmp_path):
    """An interrupted run's state says how many trials each task had when it started; resume
    spends what is left on the tasks that got none (MetaSchedule's scheduler would give it to
    the tasks it already knows, leaving some with no record while the state said completed)."""
    db = tmp_path / "db"
    shutil.copytree(tuned4["db"], db)
    first = {t["name"]: t["trials"] for t in tuned4["report"]["tasks"]}
    reached = {n for n, k in first.items() if k}
    assert reached and len(reached) < len(first)
    # Make it an interrupted run of 8 trials that started from nothing.
    state = json.loads((db / STATE).read_text())
    state["last_run"].update(completed=False, trials=8,
                             start_trials={k: 0 for k in state["last_run"]["start_trials"]})
    for st in state["tasks"].values():
        st["finished"] = False
    (db / STATE).write_text(json.dumps(state))
    proc = tvmedge("tune", str(digits_onnx), "--tuning-db", str(db), "--resume", "--json", "--no-compare")
    assert proc.returncode == 0, proc.stderr
    second = {t["name"]: t["trials"] for t in json.loads(proc.stdout)["tasks"]}
    assert all(second[n] == 0 for n in reached)
    assert any(second[n] > 0 for n in first if n not in reached)
    assert json.loads((db / STATE).read_text())["last_run"]["completed"] is True


@pytest.mark.slow  # shares a 4-trial tuning fixture: ~4 min together
def test_damaged_state_file_does_not_stop_compile_or_tune(digits_onnx, tuned4, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(tuned4["db"], db)
    records = record_lines(db)
    text = (db / STATE).read_text()
    (db / STATE).write_text(text[: len(text) // 2])  # a half-written state file
    proc = tvmedge("compile", str(digits_onnx), "-o", str(tmp_path / "m.tar"), "--tuning-db", str(db), "--json")
    assert proc.returncode == 0 and "damaged" in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)["schedules"]["tuned"] > 0
    # A torn record line is left out with a warning, not an error pointing at --resume.
    (db / RECORDS).write_text((db / RECORDS).read_text() + records[-1][: len(records[-1]) // 2])
    proc = tvmedge("compile", str(digits_onnx), "-o", str(tmp_path / "m2.tar"), "--tuning-db", str(db))
    assert proc.returncode == 0 and "damaged line" in proc.stderr, proc.stderr
    proc = tvmedge("tune", str(digits_onnx), "--tuning-db", str(db), "--trials", "4", "--json", "--no-compare")
    assert proc.returncode == 0, proc.stderr
    assert (db / f"{STATE}.damaged").exists() and json.loads((db / STATE).read_text())["last_run"]["completed"]
    assert record_lines(db)[: len(records)] == records  # repaired: the torn line is gone, nothing else
