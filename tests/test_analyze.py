"""`onnxmodcap analyze`: a layer made fragile on purpose ranks first, the report is written, and bad
input gets one error line before any work."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmodcap import analyze
from onnxmodcap.inspect_model import inspect_model

CHANNELS = 8


def fragile_model(path):
    """Conv -> Relu -> Conv (fragile) -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm.

    The first Conv's last channel is always 0 after its Relu (zero weights, bias -1). The second
    Conv reads that dead channel with a weight of 50 in every output channel: it never changes the
    float output, but stretches every per-channel weight grid so far that 4 bits round all the
    useful weights of that layer to zero."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (CHANNELS, 3, 3, 3)).astype(np.float32)
    b1 = np.full(CHANNELS, 0.1, np.float32)
    w1[-1], b1[-1] = 0.0, -1.0
    w2 = rng.normal(0, 0.3, (CHANNELS, CHANNELS, 3, 3)).astype(np.float32)
    w2[:, -1] = 0.0
    w2[:, -1, 1, 1] = 50.0
    w3 = rng.normal(0, 0.3, (CHANNELS, CHANNELS, 3, 3)).astype(np.float32)
    w4 = rng.normal(0, 0.5, (4, CHANNELS)).astype(np.float32)
    conv = dict(pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", **conv),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="fragile", **conv),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3", **conv),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w4"], ["logits"], name="classifier", transB=1),
    ]
    weights = [numpy_helper.from_array(value, name) for name, value in
               (("w1", w1), ("b1", b1), ("w2", w2), ("w3", w3), ("w4", w4))]
    graph = helper.make_graph(nodes, "fragile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


@pytest.fixture
def fragile(tmp_path):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(1).normal(0, 1, (96, 3, 8, 8)).astype(np.float32))
    return fragile_model(tmp_path / "fragile.onnx"), calib


def test_a_layer_made_fragile_ranks_first_and_keeping_it_in_float_recovers_most(fragile):
    model, calib = fragile
    analysis = analyze(model, calib, bits=4)
    layers = analysis.ranked("layer")
    assert (layers[0].part.name, layers[0].part.quantized) == ("fragile", "weights")
    assert layers[0].only[0].sqnr_db < layers[1].only[0].sqnr_db - 10
    assert layers[0].all_but[0].sqnr_db > analysis.whole[0].sqnr_db + 10
    assert [s.part.name for s in analysis.parts if s.part.scope == "unit"] == [
        unit.name for unit in inspect_model(str(model)).units]


def test_the_cli_prints_the_ranking_and_writes_the_json_and_the_chart(fragile, tmp_path):
    model, calib = fragile
    report = tmp_path / "analysis.json"
    done = subprocess.run([sys.executable, "-m", "onnxmodcap.cli", "-q", "analyze", str(model), "--calib", str(calib),
                           "--report", str(report), "--top", "3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert rows[0][:3] == ["1", "fragile", "weights"]
    written = json.loads(report.read_text())
    assert (written["layers"][0]["name"], written["wbits"], written["abits"]) == ("fragile", 4, 4)
    assert [o["name"] for o in written["whole"]] == ["logits"]
    assert report.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags, message", [
    (["--bits", "9"], "weight bits must be between 2 and 8, got 9"),
    (["--report", "nowhere/analysis.json"], "report folder does not exist: nowhere"),
])
def test_bad_options_are_refused_in_one_line_before_any_work(fragile, tmp_path, flags, message):
    model, calib = fragile
    done = subprocess.run([sys.executable, "-m", "onnxmodcap.cli", "analyze", str(model), "--calib", str(calib), *flags],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr == f"error: {message}\n"
