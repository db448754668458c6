"""The one ``--json`` schema (tvmedge/1): its blocks, its document, and every verb's output."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tvmedge.core import schema


def test_blocks_build_valid_envelopes() -> None:
    lat = schema.latency_block([3.0, 1.0, 2.0, 4.0])
    assert lat["median"] == 2.5 and lat["min"] == 1.0 and lat["runs"] == 4
    assert schema.latency_block(lat) == lat
    dev = schema.device_block("pi4", {"kind": "llvm"}, kind="emulated", via="rpc", key="pi4")
    obj = schema.envelope("run", {"device": dev, "latency_ms": lat, "outputs": []})
    schema.validate(json.loads(json.dumps(obj)))
    assert obj["schema"] == schema.SCHEMA == "tvmedge/1"
    assert schema.device_block("host")["cpu"] == schema.host_cpu() != ""
    assert schema.kind_label("emulated") == " (emulated)" and schema.kind_label("hardware") == ""


def test_document_rejects_what_it_should() -> None:
    schema.validate({"schema": "tvmedge/1", "command": "zoo list", "items": []})
    lat = schema.latency_block([1.0])
    dev = schema.device_block("host")
    bad = [
        {"command": "zoo list", "items": []},  # no version
        {"schema": "tvmedge/0", "command": "zoo list", "items": []},  # wrong version
        {"schema": "tvmedge/1", "command": "run", "latency_ms": lat, "outputs": []},  # run without device
        {"schema": "tvmedge/1", "command": "run", "device": {**dev, "kind": "real"}, "latency_ms": lat, "outputs": []},
        {"schema": "tvmedge/1", "command": "run", "device": dev, "latency_ms": {"median": 1.0}, "outputs": []},
        {"schema": "tvmedge/1", "command": "tune", "device": dev, "tasks": [], "trials_budget": 1, "trials_run": 1,
         "baselines": {"untuned": {"median": 1.0}}},  # baseline not wrapped in a latency block
    ]
    for obj in bad:
        with pytest.raises(jsonschema.ValidationError):
            schema.validate(obj)
    with pytest.raises(ValueError):
        schema.device_block("pi4", kind="real")
    with pytest.raises(ValueError):
        schema.latency_block({"median": 1.0})
    jsonschema.Draft202012Validator.check_schema(schema.JSON_SCHEMA)
