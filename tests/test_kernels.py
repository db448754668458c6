"""Binarized kernels: every available backend bit-exact against the numpy references.

Backends that cannot run here (no GPU for CuPy, no OpenCL device, ...) are skipped with the
reason their ``available()`` gives; the CUDA source is still compiled to PTX with NVRTC when
CuPy is installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tvmedge.kernels import BACKENDS, get_backend
from tvmedge.kernels import pack as P
from tvmedge.kernels.probe import backend_status
from tvmedge.kernels.report import plot_roofline
from tvmedge.kernels.timing import run_bench
from tvmedge.kernels.workload import parse_shape

GEMM_SHAPES = [  # M, N, K (bits): word edges, single rows/columns, tile edges
    (1, 1, 1), (1, 9, 65), (7, 1, 63), (5, 17, 64), (13, 70, 130), (4, 64, 128),
    (33, 97, 1000), (64, 129, 31), (9, 200, 2048),
]
CONV_CASES = [  # N, C, H, W, O, KH, KW, stride, padding
    (1, 3, 7, 9, 4, 3, 3, 1, 1),      # odd spatial, K = 27
    (2, 5, 9, 8, 3, 3, 3, 2, 1),      # stride 2, batch 2
    (1, 70, 5, 5, 2, 3, 3, 1, 0),     # K = 630 (not a multiple of 64), no padding
    (1, 8, 11, 11, 6, 1, 1, 2, 0),    # 1x1, stride 2, odd
    (1, 4, 6, 5, 5, 5, 5, 1, 2),      # 5x5, padding 2: most positions touch the border
    (1, 64, 8, 8, 7, 3, 3, 1, 1),     # K = 576
]


def _pm1(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0], np.float32), size=shape)


@pytest.fixture(params=BACKENDS)
def backend(request):
    ok, why = backend_status(request.param)
    if not ok:
        pytest.skip(f"{request.param} unavailable: {why}")
    return get_backend(request.param)


# ----------------------------------------------------------------------------- one interface
def test_backends_share_one_interface():
    """Every backend module has the same functions with the same signatures (and its NAME):
    the benchmark loop (tvmedge.kernels.timing.run_bench) calls them without asking which."""
    import inspect

    funcs = ("available", "on_cpu", "last_kernel_seconds", "xnor_gemm", "bconv2d")
    ref = get_backend(BACKENDS[0])
    for name in BACKENDS:
        mod = get_backend(name)  # imports without the backend's own packages
        assert mod.NAME == name
        for f in funcs:
            assert str(inspect.signature(getattr(mod, f))) == str(inspect.signature(getattr(ref, f))), (name, f)


# ----------------------------------------------------------------------------- packing
def test_pack_layout_and_roundtrip():
    x = np.zeros((2, 70), np.float32) - 1
    x[0, 0] = 1
    x[0, 65] = 1
    x[1, 63] = 0.0  # sign(0) = +1
    p = P.pack_bits(x)
    assert p.dtype == np.uint64 and p.shape == (2, 2)
    assert p[0, 0] == 1 and p[0, 1] == 2 and p[1, 0] == 1 << 63 and p[1, 1] == 0
    rng = np.random.default_rng(1)
    y = rng.standard_normal((3, 4, 131))
    assert np.array_equal(P.unpack_bits(P.pack_bits(y), 131), P.to_pm1(y))
    assert np.array_equal(P.pack_bits(y, axis=1), P.pack_bits(np.moveaxis(y, 1, -1)))
    assert np.array_equal(P.pack_bits(y >= 0), P.pack_bits(y))  # bool input = bits


def test_padding_bits_are_zero():
    p = P.pack_bits(np.ones((3, 100)))
    assert np.all(p[:, 1] == (1 << 36) - 1)  # 100 - 64 = 36 real bits in the last word


def test_references_agree_with_each_other_and_torch():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((6, 77)), rng.standard_normal((5, 77))
    assert np.array_equal(P.xnor_gemm_ref(P.pack_bits(a), P.pack_bits(b), 77), P.gemm_pm1_ref(a, b))
    torch = pytest.importorskip("torch")
    x, w = _pm1(rng, (2, 3, 9, 7)), _pm1(rng, (4, 3, 3, 3))
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=2,
                                      padding=1).numpy().astype(np.int32)
    assert np.array_equal(P.bconv2d_ref(x, w, 2, 1), want)


def test_shared_conv_driver_matches_reference():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((1, 6, 7, 6)), rng.standard_normal((3, 6, 3, 3))
    for pad_value in (0, 1, -1):
        got = P.bconv2d_gemm(x, w, 1, 1, pad_value, P.xnor_gemm_ref)
        assert np.array_equal(got, P.bconv2d_ref(x, w, 1, 1, pad_value)), pad_value


def test_bad_operands_raise():
    a = np.zeros((2, 2), np.uint64)
    with pytest.raises(ValueError):
        P.xnor_gemm_ref(a, np.zeros((3, 3), np.uint64), 128)
    with pytest.raises(ValueError):
        P.xnor_gemm_ref(a, a, 200)  # needs 4 words
    with pytest.raises(ValueError):
        P.conv_out_hw(2, 2, 3, 3, 1, 0)


# ----------------------------------------------------------------------------- backends
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_xnor_gemm_exact(backend, m, n, k):
    rng = np.random.default_rng(m * 1000 + n + k)
    a, b = _pm1(rng, (m, k)), _pm1(rng, (n, k))
    got = backend.xnor_gemm(P.pack_bits(a), P.pack_bits(b), k)
    assert got.dtype == np.int32 and got.shape == (m, n)
    np.testing.assert_array_equal(got, P.gemm_pm1_ref(a, b))


def test_xnor_gemm_extremes(backend):
    k = 333
    ones, neg = np.ones((5, k)), -np.ones((6, k))
    np.testing.assert_array_equal(backend.xnor_gemm(P.pack_bits(ones), P.pack_bits(neg), k),
                                  np.full((5, 6), -k))
    np.testing.assert_array_equal(backend.xnor_gemm(P.pack_bits(neg), P.pack_bits(neg), k),
                                  np.full((6, 6), k))


def test_xnor_gemm_rejects_bad_words(backend):
    with pytest.raises(ValueError):
        backend.xnor_gemm(np.zeros((2, 1), np.uint64), np.zeros((2, 2), np.uint64), 64)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_bconv2d_exact(backend, case):
    n, c, h, w, o, kh, kw, s, p = case
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c, kh, kw)).astype(np.float32)
    got = backend.bconv2d(x, wt, s, p)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, P.bconv2d_ref(x, wt, s, p))


@pytest.mark.parametrize("pad_value", [1, -1])
def test_bconv2d_pad_values_and_prepacked(backend, pad_value):
    rng = np.random.default_rng(5)
    x, wt = rng.standard_normal((2, 5, 7, 6)), rng.standard_normal((4, 5, 3, 3))
    got = backend.bconv2d(x, P.pack_conv_weight(wt), 2, 1, pad_value)
    np.testing.assert_array_equal(got, P.bconv2d_ref(x, wt, 2, 1, pad_value))


# ----------------------------------------------------------------------------- numba specifics
def test_numba_packers_match_numpy():
    nb = get_backend("numba")
    if not nb.available()[0]:
        pytest.skip(nb.available()[1])
    rng = np.random.default_rng(6)
    y = rng.standard_normal((5, 3, 150)).astype(np.float32)
    assert np.array_equal(nb.pack_bits(y), P.pack_bits(y))
    assert np.array_equal(nb.pack_bits(y >= 0, axis=1), P.pack_bits(y >= 0, axis=1))
    x = rng.standard_normal((2, 7, 9, 8))
    for pad_bit in (0, 1):
        assert np.array_equal(nb.im2col_pack(x, 3, 3, 2, 1, pad_bit),
                              P.im2col_pack(x, 3, 3, 2, 1, pad_bit))
    rows = P.border_rows(2, 9, 8, 3, 3, 2, 1)
    assert np.array_equal(nb.im2col_pack(x, 3, 3, 2, 1, 1, rows), P.im2col_pack(x, 3, 3, 2, 1, 1, rows))


# ----------------------------------------------------------------------------- CUDA source
@pytest.mark.parametrize("arch", ["compute_53", "compute_72"])
def test_cuda_source_compiles_to_ptx(arch):
    pytest.importorskip("cupy", reason="cupy-cuda12x not installed")
    from tvmedge.kernels import cupy_backend

    try:
        ptx = cupy_backend.compile_ptx(arch)
    except OSError as e:  # libnvrtc missing: the nvidia-cuda-nvrtc-cu12 wheel is needed
        pytest.skip(f"NVRTC not loadable: {e}")
    assert ".entry xnor_gemm" in ptx and "popc.b64" in ptx


def test_cuda_source_error_is_reported(monkeypatch, tmp_path):
    pytest.importorskip("cupy", reason="cupy-cuda12x not installed")
    from tvmedge.kernels import cupy_backend

    (tmp_path / "xnor.cu").write_text("this is not CUDA")
    monkeypatch.setenv("TVMEDGE_KERNELS_DIR", str(tmp_path))
    try:
        with pytest.raises(RuntimeError, match="NVRTC failed"):
            cupy_backend.compile_ptx("compute_72")
    except OSError as e:
        pytest.skip(f"NVRTC not loadable: {e}")


# ----------------------------------------------------------------------------- bench + CLI
def test_run_bench_small_and_roofline(tmp_path):
    res = run_bench("xnor_gemm", ["numba", "cupy"], ["64x80x200"], repeat=2, warmup=1)
    rows = {r["backend"]: r for r in res["rows"]}
    assert rows["numpy_fp32"]["status"] == "ok"
    if backend_status("numba")[0]:
        r = rows["numba"]
        assert r["verified"] is True and r["gops"] > 0 and r["p10_ms"] <= r["latency_ms"]["p90"]
        assert 0 < r["frac_peak"] < 1.5
    if not backend_status("cupy")[0]:
        assert "cupy" in res["skipped"]
    conv = run_bench("bconv2d", ["numba"], ["1x8x9x9-4x3x3-s2-p1"], repeat=1, warmup=0)
    assert all(r["verified"] in (True, None) for r in conv["rows"])
    png = plot_roofline([res, conv], str(tmp_path / "roof.png"))
    assert (tmp_path / "roof.png").stat().st_size > 1000 and png.endswith("roof.png")


def test_parse_shape_errors():
    assert parse_shape("xnor_gemm", "2x3x4") == {"name": "2x3x4", "M": 2, "N": 3, "K": 4}
    s = parse_shape("bconv2d", "1x3x7x7-8x3x3-s2-p1")
    assert (s["OH"], s["OW"], s["stride"], s["padding"]) == (4, 4, 2, 1)
    for kernel, text in [("xnor_gemm", "2x3"), ("xnor_gemm", "0x3x4"), ("bconv2d", "1x3x7x7")]:
        with pytest.raises(ValueError):
            parse_shape(kernel, text)


def test_cli_kernels_bench_json(capsys):
    from tvmedge.cli import main

    rc = main(["kernels", "bench", "--backend", "numba,cupy", "--shapes", "32x48x100",
               "--repeat", "1", "--warmup", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["kernel"] == "xnor_gemm"
    from tvmedge.core.schema import validate

    validate(out)
    assert out["device"]["cpu"] == out["machine"]["cpu"]
    assert {r["backend"] for r in out["rows"]} >= {"numpy_fp32"}
    assert main(["kernels", "bench", "--backend", "nope"]) == 1
    assert main(["kernels", "bench", "--shapes", "1x2"]) == 1
