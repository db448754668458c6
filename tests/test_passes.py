"""The pass pipeline: the CLI's order, and data checked before any pass runs."""

from __future__ import annotations

from typing import ClassVar

import pytest

from tvmedge.core.errors import TvmedgeError
from tvmedge.optimize.passes import (Compact, Finetune, Int8, LowRank, Pass, PassContext, Pipeline,
                                     RewriteOptions, passes_from_options)


class Record(Pass):
    name: ClassVar[str] = "record"

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def run(self, model, ctx):
        self.log.append("ran")
        return model, {"rewrite": self.name}


def test_cli_order_lowrank_compact_finetune_int8():
    opts = RewriteOptions(quantize="int8", lowrank=0.9, compact=True, finetune_steps=5, max_drop=1.0)
    assert [type(p) for p in passes_from_options(opts)] == [LowRank, Compact, Finetune, Int8]
    assert passes_from_options(RewriteOptions()) == [] and not RewriteOptions().any()


def test_missing_data_is_refused_before_any_pass_runs():
    log: list[str] = []
    with pytest.raises(TvmedgeError, match="int8 pass needs calibration data .* and labelled data"):
        Pipeline([Record(log), Int8(max_drop=1.0)], check=False)(object(), PassContext(original=object()))
    assert log == []


def test_pass_values_are_checked_where_the_pass_is_made():
    with pytest.raises(TvmedgeError, match="--lowrank takes"):
        LowRank(energy=1.5)
    with pytest.raises(TvmedgeError, match="exactly one"):
        LowRank()
    with pytest.raises(TvmedgeError, match="--max-drop"):
        Int8(max_drop=-1)
    with pytest.raises(TvmedgeError, match="not both"):
        passes_from_options(RewriteOptions(lowrank=0.9, lowrank_flops=0.5))


def test_pipeline_records_what_it_changed():
    class Model:
        rewrites: list = []

    original, log = Model(), []
    new, result = Pipeline([Record(log)], check=False)(original, PassContext(original=original))
    assert log == ["ran"] and result == {"rewrites": [{"rewrite": "record"}]}
    # The pass returned the model unchanged: nothing is recorded on the original.
    assert new is original and original.rewrites == []
