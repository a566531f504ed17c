"""The command line as a user meets it: help, version, JSON output and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmodcap import __version__


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxmodcap.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def small_model(path, extra_nodes=(), opset_imports=None):
    weight = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"])]
    nodes += list(extra_nodes)
    out = nodes[-1].output[0]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], [weight])
    model = helper.make_model(graph, opset_imports=opset_imports or [helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(onnx.shape_inference.infer_shapes(model), path)
    return path


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"onnxmodcap, version {__version__}"


@pytest.mark.parametrize("command", [[], ["inspect"]])
def test_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert "Usage: onnxmodcap" in result.stdout


def test_inspect_json_has_the_documented_keys(tmp_path):
    result = run_cli("inspect", small_model(tmp_path / "m.onnx"), "--json", "--verify")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["unsupported_ops"] == []
    assert report["mirror_max_rel_err"] <= 1e-6
    assert report["provider"] in ("cpu", "cuda")
    (module,) = report["modules"]
    assert {"name", "nodes", "inputs", "outputs", "layers"} <= set(module)
    assert module["layers"] == ["conv"] and module["inputs"] == ["x"] and module["outputs"] == ["y"]


def test_inspect_table(tmp_path):
    result = run_cli("inspect", small_model(tmp_path / "m.onnx"), "--verify")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["#", "unit", "layers", "params", "inputs", "outputs"]
    assert lines[1].split() == ["0", "head", "1", "12", "Nx3x4x4", "Nx4x4x4"]
    assert lines[-1].startswith("mirror_max_rel_err: ")


def assert_one_error_line(result, expected):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {expected}"]


def test_missing_file(tmp_path):
    assert_one_error_line(run_cli("inspect", tmp_path / "nope.onnx"), f"model file not found: {tmp_path / 'nope.onnx'}")


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("these are not the weights you are looking for\n")
    assert_one_error_line(run_cli("inspect", path), f"not an ONNX model (cannot parse protobuf): {path}")


def test_truncated_onnx_file(tmp_path):
    whole = small_model(tmp_path / "whole.onnx").read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(whole[: len(whole) // 2])
    assert_one_error_line(run_cli("inspect", path), f"not an ONNX model (cannot parse protobuf): {path}")


def test_unsupported_op_lists_op_and_node(tmp_path):
    path = small_model(tmp_path / "m.onnx", [helper.make_node("Hardmax", ["y"], ["z"], name="pick")])
    result = run_cli("inspect", path, "--json")
    assert json.loads(result.stdout)["unsupported_ops"] == ["Hardmax"]
    assert_one_error_line(result, "unsupported ops: Hardmax (node 'pick')")


def test_custom_domain_op(tmp_path):
    path = small_model(tmp_path / "m.onnx", [helper.make_node("Magic", ["y"], ["z"], domain="com.acme")],
                       [helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)])
    assert_one_error_line(run_cli("inspect", path), f"custom-domain ops are not supported in {path}: com.acme::Magic")


def test_onnx_runtime_and_modelopt_spellings_and_the_old_ones_reach_the_same_options(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from onnxmodcap import pipeline
    from onnxmodcap.cli import main

    received = []
    monkeypatch.setattr(pipeline, "quantize", lambda model, calib, **options: received.append(options) or sys.exit(0))
    model = small_model(tmp_path / "m.onnx")
    for flags in (["--exclude-nodes", "conv", "--calibration-method", "minmax", "--exclude-op-types", "Gemm,MatMul"],
                  ["--exclude", "conv", "--init", "minmax", "--exclude-op-types", "Gemm", "--exclude-op-types", "MatMul"]):
        CliRunner().invoke(main, ["quantize", str(model), "--calib", str(tmp_path), *flags])
    assert len(received) == 2 and received[0] == received[1]
    assert (received[0]["exclude"], received[0]["init"], received[0]["exclude_op_types"]) == (
        ("conv",), "minmax", ("Gemm", "MatMul"))


@pytest.mark.parametrize("flags, message", [
    (["--exclude-op-types", "Relu"], "unknown --exclude-op-types value 'Relu': choose Conv, ConvTranspose, Gemm, MatMul"),
    (["--exclude-nodes", "conv["], "--exclude-nodes 'conv[' is not a valid regex (unterminated character set at position 4)"),
])
def test_layers_to_keep_in_float_that_cannot_match_are_refused_in_one_line(tmp_path, flags, message):
    model = small_model(tmp_path / "m.onnx")
    calib = tmp_path / "calib.npy"
    np.save(calib, np.zeros((8, 3, 4, 4), np.float32))
    result = run_cli("quantize", model, "--calib", calib, *flags, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr == f"error: {message}\n"
    assert not list(tmp_path.glob("m.w*"))
