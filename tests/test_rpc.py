"""TVM RPC plumbing with real processes: a local tracker, host-Python servers, sessions, errors."""

from __future__ import annotations

import gc
import os
import time

import numpy as np
import pytest

from tvmedge.deploy.address import ephemeral_port, format_host_port, parse_host_port
from tvmedge.deploy.launch import start_server, start_tracker
from tvmedge.deploy.session import connect
from tvmedge.deploy.tracker import list_devices
from tvmedge.core.errors import TvmedgeError

KEY = f"tvmedge-test-{os.getpid()}"


@pytest.fixture(scope="module")
def servers(tracker):
    started = []
    try:
        for _ in range(2):
            started.append(start_server(tracker.addr, KEY))
        yield started
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def host_library(tmp_path_factory):
    """A tiny Relax model (matmul + bias + relu) compiled for this host, as a shared library."""
    import tvm
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((4, 16), "float32"), w: R.Tensor((16, 8), "float32"),
                 b: R.Tensor((8,), "float32")) -> R.Tensor((4, 8), "float32"):
            with R.dataflow():
                y = R.nn.relu(R.add(R.matmul(x, w), b))
                R.output(y)
            return y

    ex = tvm.compile(Mod, tvm.target.Target({"kind": "llvm"}))
    path = tmp_path_factory.mktemp("rpc") / "tiny.so"
    ex.export_library(str(path))
    return path


def _inputs(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((4, 16)).astype("float32"), rng.standard_normal((16, 8)).astype("float32"),
            rng.standard_normal(8).astype("float32")]


def _run_remote(session, lib_path) -> np.ndarray:
    import tvm
    from tvm import relax

    session.upload(str(lib_path))
    rlib = session.load_module(os.path.basename(lib_path))
    dev = session.cpu()
    vm = relax.VirtualMachine(rlib, dev)
    return vm["main"](*[tvm.runtime.tensor(a, dev) for a in _inputs()]).numpy()


def _reference() -> np.ndarray:
    x, w, b = _inputs()
    return np.maximum(x @ w + b, 0)


def _wait_free(tracker_addr, key, n, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        entry = next((d for d in list_devices(tracker_addr) if d["key"] == key), {"free": 0})
        if entry["free"] == n or time.monotonic() > deadline:
            return entry
        time.sleep(0.3)


def test_list_devices_shows_both_servers_free(tracker, servers):
    devices = {d["key"]: d for d in list_devices(tracker.addr)}
    assert KEY in devices
    d = devices[KEY]
    assert d["total"] == 2 and d["free"] == 2 and d["busy"] == 0 and d["pending"] == 0
    assert sorted(p for _, p in d["servers"]) == sorted(s.port for s in servers)
    import json

    from conftest import run_cli
    from tvmedge.core.schema import validate

    listing = json.loads(run_cli("device", "list", "--rpc-tracker", format_host_port(tracker.addr), "--json",
                                 check=True, in_process=True).stdout)
    validate(listing)
    assert any(i["key"] == KEY and i["free"] == 2 for i in listing["items"])


def test_connect_through_tracker_runs_compiled_relax(tracker, servers, host_library):
    session = connect(tracker=tracker.addr, key=KEY, timeout=30)
    out = _run_remote(session, host_library)
    np.testing.assert_allclose(out, _reference(), rtol=1e-5, atol=1e-5)
    # the work happened in one of our servers' processes, not here
    workpath = session.get_function("tvm.rpc.server.workpath")("")
    assert workpath and not workpath.startswith(os.getcwd())


def test_busy_devices_time_out_with_clear_error(tracker, servers):
    held = [connect(tracker=tracker.addr, key=KEY, timeout=30) for _ in servers]
    try:
        d = next(d for d in list_devices(tracker.addr) if d["key"] == KEY)
        assert d["busy"] == 2 and d["free"] == 0
        t0 = time.monotonic()
        with pytest.raises(TvmedgeError, match=r"no free device under key .* all busy"):
            connect(tracker=tracker.addr, key=KEY, timeout=2)
        assert time.monotonic() - t0 < 6
    finally:
        del held
        gc.collect()
    # the servers come back to the tracker once their sessions end
    assert _wait_free(tracker.addr, KEY, 2)["free"] == 2


def test_unknown_key_fails_fast(tracker, servers):
    t0 = time.monotonic()
    with pytest.raises(TvmedgeError, match=r"no device is registered under key 'no-such-board'.*" + KEY):
        connect(tracker=tracker.addr, key="no-such-board", timeout=60)
    assert time.monotonic() - t0 < 5


def test_unreachable_tracker_fails_fast():
    import tvm  # noqa: F401  (import time is not what is measured)

    port = ephemeral_port("127.0.0.1")  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(TvmedgeError, match=rf"cannot reach RPC tracker at 127\.0\.0\.1:{port} \(connection refused\)"):
        connect(tracker=("127.0.0.1", port), key="pi4", timeout=60)
    with pytest.raises(TvmedgeError, match="cannot reach RPC tracker"):
        list_devices(("127.0.0.1", port))
    with pytest.raises(TvmedgeError, match="cannot reach RPC tracker"):
        start_server(("127.0.0.1", port), "pi4")
    with pytest.raises(TvmedgeError, match=r"cannot reach RPC server at 127\.0\.0\.1:\d+ \(connection refused\)"):
        connect(host_port=("127.0.0.1", port), timeout=60)
    assert time.monotonic() - t0 < 5


def test_direct_server_key_and_stop_kills_process_group(host_library):
    server = start_server(None, "direct")
    try:
        assert len(server.pids()) >= 2  # the server and its popen worker
        with pytest.raises(TvmedgeError, match="rejected key"):
            connect(host_port=server.addr, key="other", timeout=20)
        session = connect(host_port=server.addr, key="direct", timeout=20)
        np.testing.assert_allclose(_run_remote(session, host_library), _reference(), rtol=1e-5, atol=1e-5)
        del session
        gc.collect()
    finally:
        server.stop()
    assert server.pids() == [] and not server.alive()
    assert not server.workdir.exists()


def test_stopped_server_leaves_the_tracker(tracker):
    server = start_server(tracker.addr, KEY + "-gone")
    assert any(d["key"] == KEY + "-gone" and d["total"] == 1 for d in list_devices(tracker.addr))
    server.stop()
    assert server.pids() == []
    deadline = time.monotonic() + 10
    while any(d["key"] == KEY + "-gone" for d in list_devices(tracker.addr)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(d["key"] == KEY + "-gone" for d in list_devices(tracker.addr))


def test_tracker_port_in_use_is_a_clear_error(tracker):
    with pytest.raises(TvmedgeError, match=rf"port {tracker.port} .* already in use"):
        start_tracker(port=tracker.port)


@pytest.mark.parametrize("text, message", [
    ("localhost", "expected HOST:PORT"),
    ("localhost:http", "not a number"),
    ("localhost:0", "out of range"),
    ("localhost:70000", "out of range"),
    (":9190", "no host"),
])
def test_parse_host_port_errors(text, message):
    with pytest.raises(TvmedgeError, match=message):
        parse_host_port(text)


def test_parse_host_port_ok():
    assert parse_host_port("127.0.0.1:9190") == ("127.0.0.1", 9190)
    assert parse_host_port(" pi.local:9091 ") == ("pi.local", 9091)
    assert parse_host_port("[::1]:9190") == ("::1", 9190)
    assert format_host_port(("::1", 9190)) == "[::1]:9190"


def test_dropped_session_in_a_cycle_does_not_block_the_next_connect(tracker):
    """A session kept alive only by a reference cycle (a VM and its remote functions do
    that) is ours to release: connect must not wait on it."""
    server = start_server(tracker.addr, KEY + "-one")
    try:
        session = connect(tracker=tracker.addr, key=KEY + "-one", timeout=20)
        cycle = [session]
        cycle.append(cycle)
        del session, cycle
        again = connect(tracker=tracker.addr, key=KEY + "-one", timeout=10)
        assert again.get_function("tvm.rpc.server.workpath")("")
        del again
        gc.collect()
    finally:
        server.stop()


def test_two_artifacts_in_one_session_each_run_their_own_code(tracker, servers, tmp_path):
    """The device's dlopen caches by path: each upload must get its own name."""
    import onnx
    from onnx import TensorProto, helper

    from tvmedge.build import compile_model
    from tvmedge.frontend import load_model
    from tvmedge.run import run_artifact
    from tvmedge.target import resolve

    arts = {}
    for op in ("Relu", "Neg"):
        graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], op,
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / f"{op}.onnx")
        compile_model(load_model(tmp_path / f"{op}.onnx"), resolve("host"), tmp_path / f"{op}.tar")
        arts[op] = tmp_path / f"{op}.tar"
    x = np.linspace(-1, 1, 6, dtype="float32").reshape(2, 3)
    session = connect(tracker=tracker.addr, key=KEY, timeout=30)
    relu = run_artifact(arts["Relu"], {"x": x}, repeat=1, session=session)
    neg = run_artifact(arts["Neg"], {"x": x}, repeat=1, session=session)
    np.testing.assert_array_equal(relu.outputs[0], np.maximum(x, 0))
    np.testing.assert_array_equal(neg.outputs[0], -x)
    del session
    gc.collect()


def test_shared_memory_link_gives_the_rpc_streams_results(shapes_seg_tar, tmp_path):
    """A server tvmedge started on this machine gets frames through shared memory
    (``deploy.shm``): the same outputs, bit for bit, as through TVM's RPC stream; a plain
    ``tvm.exec.rpc_server`` gets no link; the link's file goes away when it is closed."""
    from tvmedge.core.artifact import read_artifact
    from tvmedge.deploy.shm import SharedMemoryLink
    from tvmedge.run import load_model_vm

    lib, meta = read_artifact(shapes_seg_tar, tmp_path)
    x = {"input": np.random.default_rng(0).random((1, 3, 64, 64), dtype="float32")}
    with start_server(None, "shm", env={"TVM_NUM_THREADS": "1"}, device_info={"kind": "hardware"}) as ours, \
            start_server(None, "plain", env={"TVM_NUM_THREADS": "1"}) as plain:
        sess = connect(host_port=ours.addr, key="shm")
        loaded = load_model_vm(lib, meta, session=sess, threads=1)
        link = loaded.vm.link
        assert link is not None and link.path.exists()
        fast = [loaded.vm(x)[0] for _ in range(3)]  # the device inputs are reused call after call
        x2 = {"input": x["input"][:, :, ::-1].copy()}
        fast2 = loaded.vm(x2)[0]
        loaded.vm.link = None
        slow, slow2 = loaded.vm(x)[0], loaded.vm(x2)[0]
        assert fast[0].shape == (1, 4, 64, 64) and fast[0].dtype == np.float32
        for f in fast:
            np.testing.assert_array_equal(f, slow)
        np.testing.assert_array_equal(fast2, slow2)
        assert not np.array_equal(slow, slow2)
        link.close()
        assert not link.path.exists()
        assert SharedMemoryLink.open(connect(host_port=plain.addr, key="plain")) is None
