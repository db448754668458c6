"""CLI conventions and honest wording (issue 16): help texts everywhere, the tune budget
warning, one metric unit, emulated labels — all without compiling anything."""

from __future__ import annotations

import argparse
import io

import pytest

from tvmedge.cli import ZOO_NAMES, build_parser, main
from tvmedge.core.schema import kind_label


def _actions(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _actions(sub, path + (name,))
        elif not isinstance(a, argparse._HelpAction):
            yield path, a


def test_every_argument_has_help():
    missing = [f"{' '.join(path)} {a.option_strings or a.dest}" for path, a in _actions(build_parser()) if not a.help]
    assert not missing, missing


def test_zoo_export_help_lists_the_zoo():
    from tvmedge import zoo

    assert list(ZOO_NAMES) == list(zoo.ZOO)


def test_tracker_port_flag_and_its_conflict(capsys):
    args = build_parser().parse_args(["tune", "m.onnx", "--tuning-db", "db", "--tracker-port", "9300"])
    assert args.tracker_port == 9300
    rc = main(["tune", "m.onnx", "--tuning-db", "db", "--tracker-port", "9300", "--rpc-tracker", "127.0.0.1:9190"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--tracker-port" in err[0]


def test_budget_warning_says_when_the_budget_is_too_small():
    from tvmedge.tune.tuner import MIN_TRIALS_PER_TASK, budget_warnings

    (w,) = budget_warnings(16, 29)
    assert "16 trials for 29 tasks" in w and "at most 16 of the tasks" in w and str(29 * MIN_TRIALS_PER_TASK) in w
    assert "at most" not in budget_warnings(40, 29)[0]
    assert budget_warnings(29 * MIN_TRIALS_PER_TASK, 29) == [] and budget_warnings(0, 0) == []


def test_optimize_report_gives_metrics_in_percent():
    from tvmedge.optimize.cli import print_report

    out = io.StringIO()
    print_report({"rewrites": [], "check": {"samples": 8, "max_abs": 0.1, "max_rel": 0.01, "metric": "miou",
                                            "before": 0.9121, "after": 0.9050, "drop_points": 0.71}}, out=out)
    text = out.getvalue()
    assert "mIoU 91.21 % -> 90.50 %" in text and "0.71 percentage points" in text


@pytest.mark.parametrize("kind,label", [("hardware", ""), ("emulated", " (emulated)"), ("simulated", " (simulated)")])
def test_kind_labels(kind, label):
    assert kind_label(kind) == label


def test_lowrank_flops_report_prints_the_total_ratio_and_energy():
    from tvmedge.optimize.cli import print_report

    out = io.StringIO()
    print_report({"rewrites": [{"rewrite": "lowrank", "layers": [], "skipped": [{"layer": "conv2d_1", "reason": "1 input channel"}],
                                "energy": 0.93, "model_flops_before": 40e6, "model_flops_after": 21e6, "flops_ratio": 0.5}],
                  "check": {"samples": 4, "max_abs": 0.1, "max_rel": 0.01}}, out=out)
    text = out.getvalue()
    assert "kept spectral energy 0.93" in text and "ratio 0.525" in text and "asked 0.5" in text
    assert text.count("skipped conv2d_1") == 1  # each skipped layer once
