"""The README's "Deploying an artifact without tvmedge" snippet, run as printed: on the host
(full TVM) and, slow, under the emulated board's own Python (arm64 Debian bookworm Python
3.11.2 with the runtime-only TVM library), where ``tarfile``'s ``filter=`` and ``tvm.relax``
do not exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tvmedge import zoo
from tvmedge.build import compile_model
from tvmedge.frontend import load_model
from tvmedge.run import run_artifact
from tvmedge.target import resolve

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet() -> str:
    text = README.read_text()
    m = re.search(r"<!-- deploy-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its deploy snippet marker"
    return m.group(1)


def _artifact(tmp_path: Path, target: str) -> Path:
    """digits-cnn compiled for ``target``, named as the snippet names its artifact."""
    onnx = zoo.export("digits-cnn", tmp_path / "d.onnx")
    art = tmp_path / "mbv2-pi4.tar"
    compile_model(load_model(onnx), resolve(target), art, use_shipped=False)
    return art


def test_snippet_runs_on_the_host(tmp_path):
    art = _artifact(tmp_path, "host")
    want = int(run_artifact(art, {"input": np.zeros((1, 1, 8, 8), "float32")}, repeat=1).outputs[0].argmax())
    proc = subprocess.run([sys.executable, "-c", snippet()], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(want)


@pytest.mark.slow
def test_snippet_runs_on_the_emulated_boards_runtime_only_python(tmp_path):
    from tvmedge.deploy.sysroot import prepare_sysroot

    root = prepare_sysroot("aarch64")
    (tmp_path / "host").mkdir()
    host_art = _artifact(tmp_path / "host", "host")
    want = int(run_artifact(host_art, {"input": np.zeros((1, 1, 8, 8), "float32")}, repeat=1).outputs[0].argmax())
    board = tmp_path / "board"
    board.mkdir()
    _artifact(board, "pi4")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_")) and k != "VIRTUAL_ENV"}
    env.update(PYTHONPATH=str(root.site_packages), PYTHONNOUSERSITE="1", TVM_USE_RUNTIME_LIB="1")
    version = subprocess.run(root.command("cortex-a72") + ["-c", "import sys; print(sys.version.split()[0])"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert version.stdout.strip() == "3.11.2", version.stderr  # the board's Python, not a newer one
    proc = subprocess.run(root.command("cortex-a72") + ["-c", snippet()], cwd=board, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(want)  # same model, same zeros: same class on the board
