"""Teacher -> student distillation (``tvmedge distill``) and ensembles as one model (``tvmedge ensemble``).

* distill: a quarter-width digits student trained from the digits teacher (logits KD, labels
  and a feature hint) learns the task; students that do not fit the teacher's input or
  output shapes are one clear error each;
* ensemble: bagged members combined into ONE ``main`` whose output is exactly the mean
  of the members' softmax (checked against the members run one by one), votes likewise;
  members with different output shapes refused with both shapes; the CLI end to end;
* slow: on digits, the ensemble of small members beats its best member.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from tvmedge import zoo
from tvmedge.core.errors import TvmedgeError
from tvmedge.frontend import load_model
from tvmedge.optimize import data as data_mod
from tvmedge.optimize.check import HostRunner
from tvmedge.optimize.distill import distill, torch_to_model
from tvmedge.optimize.ensemble import combine, train_members
from conftest import run_cli


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("kd")
    path = zoo.export("digits-cnn", d / "digits.onnx")
    model = load_model(path)
    return {"dir": d, "path": path, "model": model, "train": data_mod.load("digits", model, "train", limit=512),
            "eval": data_mod.load("digits", model, "eval", limit=200)}


@pytest.mark.slow
def test_distill_quarter_student(digits):
    student, rep = distill(digits["model"], "digits-cnn/quarter", digits["train"], steps=150,
                           eval_data=digits["eval"], progress=False)
    c = rep["compare"]
    assert c["student"]["params"] < c["teacher"]["params"] / 8
    assert c["student"]["metric"] > 0.85, c  # learned the task from 150 steps on 512 samples
    assert c["teacher"]["latency_ms"] > 0 and c["student"]["latency_ms"] > 0
    assert rep["loss"] == "KL(T) + CE(labels) + hint MSE"
    assert student.outputs[0].shape == digits["model"].outputs[0].shape


def test_distill_student_that_does_not_fit(digits, tmp_path):
    with pytest.raises(TvmedgeError, match=r"student shapes-seg/half does not fit the teacher's input \[1, 1, 8, 8\]"):
        distill(digits["model"], "shapes-seg/half", digits["train"], steps=1, progress=False)
    other = torch_to_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), [1, 1, 8, 8], "input", "logits", "five")
    from tvmedge.core.model import save_relax

    save_relax(other, tmp_path / "five.relax")
    proc = run_cli("distill", str(digits["path"]), "--student", str(tmp_path / "five.relax"), "--data", "digits",
                   "-o", str(tmp_path / "s.relax"), in_process=True)
    assert proc.returncode == 1 and "outputs [[1, 5]]" in proc.stderr and "[[1, 10]]" in proc.stderr
    assert not (tmp_path / "s.relax").exists()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_ensemble_is_one_main_and_exact(digits):
    members, _, rep = train_members("digits-cnn/quarter", digits["train"], 2, steps=30, progress=False)
    assert rep["method"] == "bagging" and all(r["bootstrap_unique"] < 512 for r in rep["rows"])
    ens = combine(members, "mean")
    assert [gv.name_hint for gv, _ in ens.mod.functions_items()] == ["main"]
    vote = combine(members, "vote")
    xs = digits["eval"].samples[:4]
    outs = [[HostRunner(m)(s)[0] for s in xs] for m in members]
    got, got_vote = HostRunner(ens), HostRunner(vote)
    for i, s in enumerate(xs):
        probs = [_softmax(o[i]) for o in outs]
        np.testing.assert_allclose(got(s)[0], np.mean(probs, axis=0), rtol=1e-4, atol=1e-6)
        votes = sum(np.eye(10)[p.argmax(1)] for p in probs)
        assert got_vote(s)[0].argmax(1) == (votes + 0.5 * np.mean(probs, axis=0)).argmax(1)


def test_ensemble_refuses_different_outputs(digits):
    five = torch_to_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), [1, 1, 8, 8], "input", "logits", "five")
    with pytest.raises(TvmedgeError, match=r"output shape \[1, 5\], member 1 .* \[1, 10\]"):
        combine([digits["model"], five], "mean")
    with pytest.raises(TvmedgeError, match="one weight per member"):
        combine([digits["model"], digits["model"]], "weighted", [1.0])


@pytest.mark.slow
def test_cli_ensemble_train_boost(digits, tmp_path):
    out = tmp_path / "ens.relax"
    proc = run_cli("ensemble", "--train", "digits-cnn/quarter", "--members", "2", "--boost", "--steps", "30",
                   "--data", "digits", "--train-size", "256", "--eval", "digits", "--combine", "weighted",
                   "-o", str(out), "--json", check=True, in_process=True)
    rep = json.loads(proc.stdout)
    from tvmedge.core.schema import validate

    validate(rep)
    assert out.exists() and rep["training"]["method"] == "boosting (SAMME)"
    assert set(rep["compare"]) == {"member 1", "member 2", "ensemble"}


@pytest.mark.slow
def test_ensemble_beats_one_member_on_digits(digits):
    train = data_mod.load("digits", digits["model"], "train")
    members, _, _ = train_members("digits-cnn/quarter", train, 5, steps=150, progress=False)
    from tvmedge.optimize.distill import compare

    ens = combine(members, "mean")
    c = compare({**{f"m{i}": m for i, m in enumerate(members)}, "ens": ens}, digits["eval"], repeat=5)
    assert c["ens"]["metric"] >= max(c[f"m{i}"]["metric"] for i in range(5)), c
