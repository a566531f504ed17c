"""Hostile and degenerate inputs: each is one exact error line with nothing written, or it
quantizes fine. (Unreadable files, truncated protobufs, custom ops and escaping external data are in
test_cli.py and test_prepare.py; empty or corrupt calibration folders in test_quantize.py.)"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import struct
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import onnxmodcap
from onnxmodcap import pipeline, weights
from onnxmodcap.cli import main

CALIB = 48


def tiny_classifier(path, conv_weight=None, inputs=("x",), spatial=(8, 8), width=4):
    """Conv 3->width (3x3), ReLU, global pool, Gemm width->5: a small graph with two weighted layers."""
    rng = np.random.default_rng(0)
    conv_weight = rng.standard_normal((width, 3, 3, 3)).astype(np.float32) if conv_weight is None else conv_weight
    nodes = [helper.make_node("Conv", [inputs[0], "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    if len(inputs) == 2:
        nodes[0].input[0] = "sum"
        nodes.insert(0, helper.make_node("Add", list(inputs), ["sum"], name="add"))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(i, TensorProto.FLOAT, ["N", 3, *spatial]) for i in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(conv_weight, "w"),
         numpy_helper.from_array(rng.standard_normal((5, len(conv_weight))).astype(np.float32), "fc")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


@pytest.fixture()
def tensors(tmp_path):
    path = tmp_path / "inputs.npy"
    np.save(path, np.random.default_rng(1).standard_normal((CALIB, 3, 8, 8)).astype(np.float32))
    return path


def quantize_cli(model, calib, output, *extra):
    return CliRunner().invoke(main, ["quantize", str(model), "--calib", str(calib), "-o", str(output),
                                     "--method", "rtn", "--num-calib", "32", *map(str, extra)])


def assert_refused(result, message, model, output):
    """One exact error line, exit code 2, no output and no temporary file beside it."""
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == f"error: {message}"
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("bad_value, count", [(np.nan, 1), (np.inf, 27)])
def test_weights_with_nan_or_inf_are_refused(tmp_path, tensors, bad_value, count):
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    weight.reshape(4, -1)[1, :count] = bad_value
    model, output = tiny_classifier(tmp_path / "m.onnx", weight), tmp_path / "q.onnx"
    assert_refused(quantize_cli(model, tensors, output), "initializer 'w' holds "
                   f"{count} NaN or infinite values: quantization needs finite weights", model, output)


def test_multiple_graph_inputs_are_refused(tmp_path, tensors):
    model, output = tiny_classifier(tmp_path / "m.onnx", inputs=("a", "b")), tmp_path / "q.onnx"
    assert_refused(quantize_cli(model, tensors, output),
                   "the model has 2 graph inputs; quantization needs exactly one image input", model, output)


def test_reduce_range_with_the_tensorrt_target_is_refused(tmp_path, tensors):
    model, output = tiny_classifier(tmp_path / "m.onnx"), tmp_path / "q.onnx"
    assert_refused(quantize_cli(model, tensors, output, "--bits", "8", "--target", "tensorrt", "--reduce-range"),
                   "--reduce-range is for ONNX Runtime's int8 kernels; TensorRT takes full-range weights",
                   model, output)


def test_dynamic_spatial_size_needs_input_size(tmp_path):
    model, output = tiny_classifier(tmp_path / "m.onnx", spatial=("H", "W")), tmp_path / "q.onnx"
    images = write_pngs(tmp_path / "imgs", 40, (11, 9))
    assert_refused(quantize_cli(model, images, output),
                   "the model input ['N', 3, 'H', 'W'] has a dynamic image size: pass --input-size", model, output)
    assert quantize_cli(model, images, output, "--input-size", "8").exit_code == 0
    assert output.exists()


@pytest.mark.parametrize("wbits", [2, 4, 8])
def test_all_zero_weight_channels_quantize_to_zero(tmp_path, tensors, wbits):
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    weight[1] = 0
    model, output = tiny_classifier(tmp_path / "m.onnx", weight), tmp_path / "q.onnx"
    result = onnxmodcap.quantize(model, tensors, method="rtn", wbits=wbits, abits=4, keep_ends=False,
                                 num_calib=32, output=str(output))
    assert result.validation.parity_ok
    exported = dequantized_weight(onnx.load(output), "w")
    assert np.all(np.isfinite(exported)) and np.all(exported[1] == 0)
    assert np.count_nonzero(exported[0]) > 0


def test_constant_activations_quantize_without_division_by_zero(tmp_path):
    model, output = tiny_classifier(tmp_path / "m.onnx"), tmp_path / "q.onnx"
    zeros = tmp_path / "zeros.npy"
    np.save(zeros, np.zeros((CALIB, 3, 8, 8), np.float32))
    result = onnxmodcap.quantize(model, zeros, method="rtn", bits=4, num_calib=32, output=str(output))
    assert result.validation.parity_ok and result.validation.parity.max_abs_diff_relative == 0
    scales = [numpy_helper.to_array(t) for t in onnx.load(output).graph.initializer if "scale" in t.name]
    assert scales and all(np.all(np.isfinite(s)) and np.all(s > 0) for s in scales)


def dequantized_weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The float weight ONNX Runtime sees: run the model's DequantizeLinear that produces it."""
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == name)
    graph = helper.make_graph([node], "w", [], [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
                              list(model.graph.initializer))
    weight_only = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    session = ort.InferenceSession(weight_only.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {})[0]


def write_pngs(folder, count, size, mode="RGB"):
    folder.mkdir(exist_ok=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / f"{mode}{i}.png")
    return folder


def png_claiming_size(path, width, height):
    """A valid 1x1 PNG whose header claims width x height: what a decompression bomb looks like."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    path.write_bytes(bytes(data))


def test_a_large_image_under_the_bomb_limit_is_read_without_a_warning(tmp_path):
    """90 megapixels: above Pillow's warning threshold, below its error: a large photo, not a bomb.
    Read as calibration and evaluation read images, in a fresh process, where Python prints warnings
    as a user would see them; afterwards the process's warning filters are as before."""
    (tmp_path / "imgs").mkdir()
    Image.new("L", (10000, 9000)).save(tmp_path / "imgs" / "large.png")
    script = ("import sys, warnings; from onnxmodcap.datasets import Skipped, open_images, prepared_batches; "
              "from onnxmodcap.preprocess import Preprocessing; filters = list(warnings.filters); "
              "grey = Preprocessing((90, 100), 90, 1 / 255, (0.5,), (0.25,), 'grey', 'nchw'); "
              "[batch] = prepared_batches(open_images(sys.argv[1]), grey, 1, Skipped()); "
              "print(batch.inputs.shape, warnings.filters == filters)")
    read = subprocess.run([sys.executable, "-c", script, str(tmp_path / "imgs")], capture_output=True, text=True)
    assert (read.returncode, read.stdout, read.stderr) == (0, "(1, 1, 90, 100) True\n", "")


def test_messy_calibration_folder_uses_what_it_can_and_names_what_it_skips(tmp_path):
    model, output = tiny_classifier(tmp_path / "m.onnx"), tmp_path / "q.onnx"
    folder = write_pngs(tmp_path / "imgs", 12, (8, 8), "L")
    write_pngs(folder, 12, (40, 23), "RGBA")
    write_pngs(folder, 12, (5, 300), "RGB")
    (folder / "notes.txt").write_text("not an image, and not named like one")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    png_claiming_size(folder / "bomb.png", 60000, 60000)
    result = quantize_cli(model, folder, output)
    assert result.exit_code == 0, result.output
    assert f"warning: skipped {folder / 'broken.png'}: " in result.output
    assert f"warning: skipped {folder / 'bomb.png'}: Image size (3600000000 pixels) exceeds limit" in result.output
    assert "warning: skipped 2 calibration images that could not be read or converted" in result.output
    assert output.exists()


def test_folder_without_images_names_the_extensions(tmp_path):
    model, output = tiny_classifier(tmp_path / "m.onnx"), tmp_path / "q.onnx"
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    (folder / "b.csv").write_text("x")
    assert_refused(quantize_cli(model, folder, output),
                   f"{folder} has no images (.bmp, .jpeg, .jpg, .pgm, .png, .ppm, .tif, .tiff, .webp)", model, output)


def test_pickled_calibration_tensors_are_refused_without_running_them(tmp_path):
    model, output = tiny_classifier(tmp_path / "m.onnx"), tmp_path / "q.onnx"
    marker = tmp_path / "pwned"
    payload = np.empty(1, dtype=object)
    payload[0] = PickleBomb(str(marker))
    path = tmp_path / "inputs.npy"
    np.save(path, payload, allow_pickle=True)
    assert_refused(quantize_cli(model, path, output), f"cannot read calibration tensors {path}: "
                   "Object arrays cannot be loaded when allow_pickle=False", model, output)
    assert not marker.exists()


class PickleBomb:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_read_only_output_folder(tmp_path, tensors):
    """/sys is read-only even for root, so this holds whoever runs the tests."""
    model, output = tiny_classifier(tmp_path / "m.onnx"), "/sys/q.onnx"
    result = quantize_cli(model, tensors, output)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == "error: output folder is not writable: /sys (Permission denied)"


def test_a_model_with_external_data_is_written_with_external_data(tmp_path, tensors):
    model, output = tiny_classifier(tmp_path / "m.onnx", width=64), tmp_path / "q.onnx"
    onnx.save_model(onnx.load(model), model, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    result = onnxmodcap.quantize(model, tensors, method="rtn", bits=4, num_calib=32, output=str(output))
    assert result.validation.parity_ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs.npy", "m.onnx", "m.onnx.data", "q.onnx",
                                                          "q.onnx.data"]
    written = onnx.load(output, load_external_data=False)
    assert [t.name for t in written.graph.initializer if onnx.external_data_helper.uses_external_data(t)] == ["w_quantized"]
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.load(tensors)[-8:]})[0].shape == (8, 5)


def test_a_model_over_the_protobuf_limit_takes_the_large_model_path(tmp_path, tensors, monkeypatch):
    """With the limit lowered to a few kB, a small model goes the way a model over 2 GB goes: not
    simplified, written with external data. ONNX Runtime gives the same outputs as the ordinary path."""
    model = tiny_classifier(tmp_path / "m.onnx", width=64)
    ordinary = onnxmodcap.quantize(model, tensors, method="rtn", bits=4, num_calib=32, output=str(tmp_path / "a.onnx"))
    monkeypatch.setattr(weights, "PROTOBUF_LIMIT", 2048)
    large = onnxmodcap.quantize(model, tensors, method="rtn", bits=4, num_calib=32, output=str(tmp_path / "b.onnx"))
    assert large.validation.parity_ok
    assert "not simplified: onnxsim cannot take a model over 2 GB" in large.report.to_dict()["notes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "b.onnx.data", "inputs.npy", "m.onnx"]
    images = {"x": np.load(tensors)[-8:]}
    outputs = [ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"]).run(None, images)[0]
               for result in (ordinary, large)]
    np.testing.assert_array_equal(*outputs)


@pytest.mark.large
def test_a_model_over_2_gb_quantizes_and_is_written_with_external_data(tmp_path):
    """A 2.2 GB Gemm weight (one tensor above the protobuf limit) stored with external data.
    Needs about 12 GB of RAM and 3 GB of disk: run with `pytest -m large`."""
    features, classes = 16 * 16 * 64, 33000
    rng = np.random.default_rng(0)
    (rng.standard_normal((classes, features), dtype=np.float32) * 0.01).tofile(tmp_path / "big.onnx.data")
    fc_weight = TensorProto(name="fc", data_type=TensorProto.FLOAT, dims=[classes, features])
    fc_weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(classes * features * 4))):
        fc_weight.external_data.add(key=key, value=value)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
                              [numpy_helper.from_array(rng.standard_normal((64, 3, 3, 3), dtype=np.float32), "w"),
                               fc_weight])
    model = tmp_path / "big.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), model)
    assert (tmp_path / "big.onnx.data").stat().st_size > weights.PROTOBUF_LIMIT
    calib = tmp_path / "inputs.npy"
    np.save(calib, rng.standard_normal((48, 3, 16, 16)).astype(np.float32))
    before = [hashlib.sha256(path.read_bytes()).hexdigest() for path in (model, tmp_path / "big.onnx.data")]
    output = tmp_path / "big.w8a8.onnx"
    result = quantize_cli(model, calib, output, "--bits", 8, "--init", "minmax", "--report", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    assert [hashlib.sha256(path.read_bytes()).hexdigest() for path in (model, tmp_path / "big.onnx.data")] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "big.w8a8.onnx",
                                                          "big.w8a8.onnx.data", "inputs.npy", "report.json"]
    written = onnx.load(output, load_external_data=False)
    assert {t.name for t in written.graph.initializer if onnx.external_data_helper.uses_external_data(t)} >= {
        "fc_quantized", "w_quantized"}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["validation"]["parity_ok"] is True
    assert "not simplified: onnxsim cannot take a model over 2 GB" in report["notes"]


def test_a_bug_is_one_error_line_unless_the_traceback_is_asked_for(tmp_path, tensors, monkeypatch):
    def broken_writer(*args, **kwargs):
        raise ValueError("simulated bug\nsecond line")

    monkeypatch.setattr(pipeline, "export_qdq", broken_writer)
    model, output = tiny_classifier(tmp_path / "m.onnx"), tmp_path / "q.onnx"
    result = quantize_cli(model, tensors, output)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "error: internal error (ValueError: simulated bug). Please report it; ONNXMODCAP_TRACEBACK=1 shows the traceback")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs.npy", "m.onnx"]
    monkeypatch.setenv("ONNXMODCAP_TRACEBACK", "1")
    assert isinstance(quantize_cli(model, tensors, output).exception, ValueError)


def test_negative_batchnorm_variance_is_refused(tmp_path, tensors):
    """Found by the fuzzer: the folded weights would be NaN."""
    rng = np.random.default_rng(0)
    stats = {"gamma": np.ones(4), "beta": np.zeros(4), "mean": np.zeros(4), "var": np.array([1, -2, 1, 1])}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", *stats], ["y"], name="bn")]
    graph = helper.make_graph(
        nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
         *(numpy_helper.from_array(v.astype(np.float32), k) for k, v in stats.items())])
    model, output = tmp_path / "bn.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), model)
    assert_refused(quantize_cli(model, tensors, output),
                   "BatchNormalization 'bn' has a running variance below -epsilon (-2): its output is undefined",
                   model, output)


def test_constant_node_without_a_value_is_refused(tmp_path, tensors):
    """Found by the fuzzer: the ONNX checker lets it through."""
    model, output = tiny_classifier(tmp_path / "m.onnx"), tmp_path / "q.onnx"
    proto = onnx.load(model)
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["unused"], name="empty"))
    onnx.save(proto, model)
    assert_refused(quantize_cli(model, tensors, output),
                   "Constant node 'empty' must have exactly one value attribute, it has 0", model, output)


def test_tensor_of_an_unknown_data_type_is_refused(tmp_path, tensors):
    """Found by the fuzzer: the ONNX checker lets it through in a Constant node."""
    model, output = tiny_classifier(tmp_path / "m.onnx"), tmp_path / "q.onnx"
    proto = onnx.load(model)
    value = numpy_helper.from_array(np.float32(0.5), "half")
    value.data_type = 29
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["unused"], name="odd", value=value))
    onnx.save(proto, model)
    assert_refused(quantize_cli(model, tensors, output), f"invalid ONNX model {model}: tensor 'half' cannot be "
                   "decoded (KeyError: 29)", model, output)
