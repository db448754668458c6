"""Bad input a new user can give (issue 11's probe): one clear line and a non-zero exit, never a
native crash, a silent wrong answer or a file left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tvmedge import zoo
from tvmedge.cli import main
from tvmedge.deploy.address import format_host_port
from tvmedge.deploy.launch import start_tracker
from tvmedge.deploy.session import connect
from tvmedge.deploy.tracker import list_devices
from conftest import run_cli

PY = [sys.executable, "-m", "tvmedge"]


def _ctrl_c_stops() -> None:
    """In the child: SIGINT back to its default. A suite started as a background job (``cmd &``
    in a non-interactive shell) passes SIGINT on as ignored, and Python then installs no
    KeyboardInterrupt handler: the server would sit out the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_proc(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    onnx_path = zoo.export("digits-cnn", d / "digits.onnx")
    assert main(["compile", str(onnx_path), "-o", str(d / "digits.tar")]) == 0
    return onnx_path, d / "digits.tar"


def test_truncated_library_is_refused_before_loading(digits, tmp_path):
    _, tar = digits
    with tarfile.open(tar) as t:
        t.extractall(tmp_path / "b", filter="data")
    lib = tmp_path / "b" / "model.so"
    lib.write_bytes(lib.read_bytes()[:1000])
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as t:
        t.add(lib, arcname="model.so")
        t.add(tmp_path / "b" / "metadata.json", arcname="metadata.json")
    proc = cli_proc("run", str(bad))
    assert proc.returncode == 1, (proc.returncode, proc.stderr)  # not SIGBUS (-7) / SIGSEGV
    assert "damaged" in one_error_line(proc.stderr)


def test_broken_metadata_is_one_line(digits, tmp_path):
    _, tar = digits
    with tarfile.open(tar) as t:
        t.extractall(tmp_path / "b", filter="data")
    (tmp_path / "b" / "metadata.json").write_text("{not json")
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as t:
        t.add(tmp_path / "b" / "model.so", arcname="model.so")
        t.add(tmp_path / "b" / "metadata.json", arcname="metadata.json")
    proc = cli_proc("run", str(bad))
    assert proc.returncode == 1 and "not valid JSON" in one_error_line(proc.stderr)


def _save(model: onnx.ModelProto, path) -> str:
    path.write_bytes(model.SerializeToString())
    return str(path)


def test_malformed_einsum_is_refused_not_a_segfault(tmp_path):
    node = helper.make_node("Einsum", ["x"], ["y"], equation="ij->k")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "e.onnx")
    proc = cli_proc("compile", path, "-o", str(tmp_path / "e.tar"))
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "invalid ONNX model" in one_error_line(proc.stderr)
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*partial*"))


def test_resize_antialias_is_refused(tmp_path, capsys):
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 0.5, 0.5])
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", antialias=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], [scales])
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "r.onnx")
    assert main(["compile", path, "-o", str(tmp_path / "r.tar")]) == 1
    assert "antialias=1" in one_error_line(capsys.readouterr().err)


def test_nan_weights_fail_the_check_and_json_stays_valid(digits, tmp_path, capsys):
    onnx_path, _ = digits
    model = onnx.load(str(onnx_path))
    w = model.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[0] = np.nan
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    path = _save(model, tmp_path / "nan.onnx")
    rc = main(["optimize", path, "-o", str(tmp_path / "q.relax"), "--quantize", "int8", "--calib", "digits",
               "--calib-size", "16", "--json"])
    out = capsys.readouterr()
    assert rc == 1 and "NaN/Inf" in one_error_line(out.err)
    assert "NaN" not in out.out
    from tvmedge.core.jsonio import dumps

    assert json.loads(dumps({"x": float("nan"), "y": [np.float32(1.5), float("inf")]})) == {"x": None, "y": [1.5, None]}


def test_inputs_npy_casts_extras_and_names_are_said(digits, tmp_path, capsys):
    _, tar = digits
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8))  # float64
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(tar), "--inputs", str(tmp_path / "x.npy"), "--repeat", "1"]) == 0
    assert "float64 cast" in capsys.readouterr().err
    np.savez(tmp_path / "x.npz", image=x.astype("float32"))  # wrong name, used by position
    assert main(["run", str(tar), "--inputs", str(tmp_path / "x.npz"), "--repeat", "1"]) == 0
    assert "by position" in capsys.readouterr().err
    np.savez(tmp_path / "y.npz", input=x.astype("float32"), extra=x)
    assert main(["run", str(tar), "--inputs", str(tmp_path / "y.npz"), "--repeat", "1"]) == 0
    assert "not used: extra" in capsys.readouterr().err
    np.savez(tmp_path / "w.npz", input=x.astype("complex64"))  # no float32 reading of complex values
    assert main(["run", str(tar), "--inputs", str(tmp_path / "w.npz"), "--repeat", "1"]) == 1
    assert "takes float32" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flags, words", [
    (["--quantize", "int8", "--calib", "digits", "--eval", "digits", "--max-drop", "-1"], "--max-drop"),
    (["--quantize", "int8", "--calib", "digits", "--calib-size", "-5"], "--calib-size"),
])
def test_negative_budgets_are_refused(digits, tmp_path, capsys, flags, words):
    onnx_path, _ = digits
    assert main(["optimize", str(onnx_path), "-o", str(tmp_path / "o.relax"), *flags]) == 1
    assert words in one_error_line(capsys.readouterr().err)


def test_unknown_mcpu_is_refused(digits, tmp_path, capsys):
    onnx_path, _ = digits
    target = json.dumps({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "notacpu"})
    assert main(["compile", str(onnx_path), "-o", str(tmp_path / "o.tar"), "--target", target]) == 1
    err = capsys.readouterr().err
    assert "knows no CPU 'notacpu'" in one_error_line(err) and "llvm_instance" not in err


def test_verbose_after_the_verb(digits, tmp_path):
    proc = cli_proc("run", str(tmp_path / "missing.tar"), "--verbose")
    assert proc.returncode != 0 and "Traceback" in proc.stderr  # accepted, and it shows the traceback


def _read_until(proc: subprocess.Popen, text: str, seconds: float = 60) -> list[str]:
    """Lines of ``proc``'s stdout up to the first that contains ``text`` (fails after ``seconds``).
    Reads the pipe's file descriptor directly: a buffered readline could hold lines back."""
    import select

    fd = proc.stdout.fileno()
    pending = getattr(proc, "_pending", b"")
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            lines.append(line.decode(errors="replace"))
            if text in lines[-1]:
                proc._pending = pending
                return lines
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
    raise AssertionError(f"no line with {text!r} within {seconds} s: {lines} {pending!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_tracker_command_leaves_no_process_on_its_port(sig):
    port = _free_port()
    proc = subprocess.Popen([*PY, "device", "tracker", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _read_until(proc, "listening")
        assert not _port_free(port)
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _port_free(port):
            time.sleep(0.2)
        assert _port_free(port), "the rpc_tracker child outlived its tvmedge process"
    finally:
        proc.kill()


def test_server_waits_for_a_tracker_that_starts_later(tmp_path):
    port = _free_port()
    env = {**os.environ, "TVM_NUM_THREADS": "1"}
    srv = subprocess.Popen([*PY, "device", "serve", "--tracker", f"127.0.0.1:{port}", "--key", "late"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                           preexec_fn=_ctrl_c_stops)
    try:
        _read_until(srv, "waiting for the RPC tracker")
        time.sleep(2)
        tr = start_tracker(port=port)
        try:
            deadline = time.monotonic() + 60
            keys = []
            while time.monotonic() < deadline:
                keys = [d["key"] for d in list_devices(("127.0.0.1", port))]
                if "late" in keys:
                    break
                time.sleep(0.5)
            assert "late" in keys
        finally:
            srv.send_signal(signal.SIGINT)
            try:
                # communicate, not wait: the server's log must not fill the pipe while it stops
                out, _ = srv.communicate(timeout=90)  # a loaded CI machine stops the server group slowly
            except subprocess.TimeoutExpired:
                srv.kill()
                out, _ = srv.communicate()
                raise AssertionError(f"'device serve' did not stop on Ctrl-C within 90 s; its output:\n{out}")
            finally:
                tr.stop()
    finally:
        srv.kill()


@pytest.mark.slow  # waits out the supervisor's restart: ~1 min
def test_served_board_recovers_after_its_server_dies_and_stays_during_sessions():
    import psutil

    with start_tracker() as tr:
        addr = format_host_port(tr.addr)
        serve = subprocess.Popen([*PY, "device", "serve", "--tracker", addr, "--key", "phoenix"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, "TVM_NUM_THREADS": "1"}, preexec_fn=_ctrl_c_stops)
        try:
            def registered() -> bool:
                return any(d["key"] == "phoenix" and d["total"] > 0 for d in list_devices(tr.addr))

            deadline = time.monotonic() + 60
            while not registered() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert registered()
            # A session held for longer than the supervisor's patience does not get the server restarted.
            sess = connect(tracker=tr.addr, key="phoenix", timeout=30)
            time.sleep(12)
            assert sess.cpu(0).exist
            del sess
            def servers() -> list:
                found = []
                for p in psutil.Process(serve.pid).children(recursive=True):
                    try:
                        if p.status() != psutil.STATUS_ZOMBIE and "tvm.exec.rpc_server" in " ".join(p.cmdline()):
                            found.append(p)
                    except psutil.Error:
                        continue
                return found

            first = servers()
            assert first
            for p in first:
                p.kill()
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                time.sleep(1)
                if registered() and servers() and servers()[0].pid not in {p.pid for p in first}:
                    break
            assert registered(), "the board did not come back"
        finally:
            serve.send_signal(signal.SIGINT)
            try:
                out, _ = serve.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                serve.kill()
                out, _ = serve.communicate()
    assert "restarted: its process exited" in out and out.count("restarted") == 1, out


def test_secret_key_server_refuses_clients_without_the_key():
    """A server started with --secret-key (no tracker) serves only clients that send its key."""
    import re

    from tvmedge.core.errors import TvmedgeError

    port = _free_port()
    serve = subprocess.Popen([*PY, "device", "serve", "--port", str(port), "--secret-key"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=_ctrl_c_stops)
    try:
        key = re.search(r"secret key: (\w+)", _read_until(serve, "secret key")[-1]).group(1)
        deadline = time.monotonic() + 60
        while _port_free(port) and time.monotonic() < deadline:
            time.sleep(0.3)
        with pytest.raises(TvmedgeError):
            connect(host_port=("127.0.0.1", port), key="guess", timeout=10)
        sess = connect(host_port=("127.0.0.1", port), key=key, timeout=30)
        assert sess.cpu(0).exist
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()
