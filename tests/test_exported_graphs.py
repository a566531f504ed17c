"""Graphs as users export them: a fixed batch size (torch's dynamo exporter writes batch 1 by
default), and a dynamic image size with several outputs (detectors), quantized end to end with the
parity checks, evaluated, and refused with one clear line where they cannot be."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from test_partition_mirror import STATIC_BATCH_HELD
from zoo import ZOO, build_fpn, export_dynamic_size

import onnxmodcap
from onnxmodcap.check import check_tensorrt
from onnxmodcap.cli import main
from onnxmodcap.evaluate import evaluate

CALIB, PARITY = 96, 64  # the conftest's calib holds 160 images: 64 are held out for parity
FREEABLE = sorted(set(ZOO) - set(STATIC_BATCH_HELD))


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def dims(info: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in info.type.tensor_type.shape.dim]


def signature(path) -> tuple[list, list]:
    model = onnx.load(path)
    return [dims(i) for i in model.graph.input], [dims(o) for o in model.graph.output]


def quantize_static(exported_model, calib, tmp_path, device, name, **options):
    path, _ = exported_model(name, "dynamo_static")
    output = tmp_path / f"{name}.static.onnx"
    result = onnxmodcap.quantize(path, calib, output=str(output), num_calib=CALIB, device=device,
                                 **{"method": "rtn", "bits": 4, **options})
    assert result.validation.held_out and result.validation.images == PARITY
    assert result.validation.parity_ok
    return path, result


@pytest.mark.parametrize("name", FREEABLE)
def test_a_batch_of_one_is_freed_for_the_tool_and_kept_in_the_written_model(exported_model, calib, tmp_path, device,
                                                                             name):
    source, result = quantize_static(exported_model, calib, tmp_path, device, name)
    assert signature(result.output) == signature(source)
    assert signature(source)[0] == [[1, 3, 32, 32]]
    assert "the model fixes its batch size at 1: prepared with a free batch size" in result.report.to_dict()["notes"]


@pytest.mark.parametrize("name", ["resnet18", "shufflenetv2", "segnet_head"])
@pytest.mark.parametrize("wbits, abits, target, fmt", [(2, 4, "tensorrt", "qdq"), (4, 8, "ort", "native")])
def test_a_fixed_batch_in_every_target_and_format(exported_model, calib, tmp_path, device, name, wbits, abits, target,
                                                  fmt):
    source, result = quantize_static(exported_model, calib, tmp_path, device, name, wbits=wbits, abits=abits,
                                     target=target, format=fmt)
    assert signature(result.output) == signature(source)
    if target == "tensorrt":
        assert check_tensorrt(str(result.output)) == []


@pytest.mark.parametrize("method", ["brecq", "qdrop", "pdquant"])
def test_reconstruction_on_a_fixed_batch(exported_model, calib, tmp_path, device, method):
    source, result = quantize_static(exported_model, calib, tmp_path, device, "mobilenetv3", method=method, iters=20,
                                     wbits=4, abits=8)
    assert signature(result.output) == signature(source)
    assert len(result.report.to_dict()["reconstruction"]) == len(result.report.to_dict()["units"])


def test_dynamic_batch_writes_the_freed_batch(exported_model, calib, tmp_path, device):
    source, result = quantize_static(exported_model, calib, tmp_path, device, "resnet18", dynamic_batch=True)
    assert signature(result.output) == ([["batch", 3, 32, 32]], [["batch", 10]])
    session = ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"])
    images = np.load(calib)[:3]
    batched = session.run(None, {"input": images})[0]
    one_by_one = np.concatenate([session.run(None, {"input": image[None]})[0] for image in images])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-5)


def fixed_batch_classifier(path, batch: int, flatten: str, opset: int = 17) -> None:
    """Conv -> Relu -> GlobalAveragePool -> (Flatten or Reshape to [batch, 8]) -> Gemm, batch fixed."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)
               for name, shape in [("conv_w", (8, 3, 3, 3)), ("conv_b", (8,)), ("fc_w", (10, 8)), ("fc_b", (10,))]]
    weights.append(numpy_helper.from_array(np.array([batch, 8], np.int64), "flat_shape"))
    to_2d = (helper.make_node("Flatten", ["pooled"], ["flat"]) if flatten == "Flatten"
             else helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]))
    graph = helper.make_graph([
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        to_2d,
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ], "fixed_batch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9), path)


@pytest.mark.parametrize("batch, flatten", [(1, "Flatten"), (4, "Reshape")])
def test_hand_built_fixed_batch_graphs_quantize_and_evaluate(calib, tmp_path, batch, flatten):
    source, output = tmp_path / "net.onnx", tmp_path / "net.q.onnx"
    fixed_batch_classifier(source, batch, flatten)
    result = onnxmodcap.quantize(source, calib, method="rtn", bits=8, output=str(output), num_calib=CALIB)
    assert result.validation.parity_ok and result.validation.images == PARITY
    assert signature(output) == ([[batch, 3, 32, 32]], [[batch, 10]])
    data = tmp_path / "data.npz"
    images = np.random.default_rng(1).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    np.savez(data, images=images, labels=np.arange(9) % 10)
    quantized = evaluate(str(output), str(data), reference_path=str(source))
    assert quantized.images == 9 and quantized.agreement >= 8 / 9


def test_a_graph_at_opset_9_is_raised_to_13_before_the_qdq_nodes_go_in(calib, tmp_path):
    """tf2onnx wrote OpenNSFW at opset 9; the version converter has no adapter for the
    DequantizeLinear nodes of opset 10, so the float graph must be raised first."""
    source, output = tmp_path / "net.onnx", tmp_path / "net.q.onnx"
    fixed_batch_classifier(source, 1, "Flatten", opset=9)
    result = onnxmodcap.quantize(source, calib, method="rtn", bits=8, output=str(output), num_calib=CALIB)
    assert result.validation.parity_ok
    assert onnx.load(output).opset_import[0].version == 13


def test_a_batch_that_cannot_be_freed_is_refused_naming_the_node(exported_model, calib, tmp_path):
    path, _ = exported_model("convnext", "dynamo_static")
    output = tmp_path / "q.onnx"
    result = run_cli("quantize", path, "--calib", calib, "--method", "rtn", "-o", output)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: the model's batch size is fixed at 1 and cannot be freed: node 'node_as_strided' (Gather) fixes "
        "it; export the model with a dynamic batch dimension")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def fpn(tmp_path_factory):
    """A detector-shaped graph with dynamic height and width and two outputs (zoo.TinyFPN)."""
    torch.manual_seed(0)
    return export_dynamic_size(build_fpn(), tmp_path_factory.mktemp("fpn") / "fpn.onnx")


@pytest.mark.parametrize("method", ["rtn", "brecq"])
def test_a_dynamic_size_graph_with_two_outputs(fpn, calib, tmp_path, device, method):
    output = tmp_path / "fpn.q.onnx"
    result = onnxmodcap.quantize(fpn, calib, method=method, iters=20, wbits=4, abits=8, output=str(output),
                                 num_calib=CALIB, device=device, preprocess={"input_size": "32"})
    validation = result.validation
    assert validation.parity_ok and validation.images == PARITY
    assert [o.name for o in validation.parity.outputs] == ["probability", "scores"]
    assert [(f.name, f.kind) for f in validation.fidelity] == [("probability", "tensor"), ("scores", "classes")]
    assert validation.fidelity[0].top1_agreement is None and validation.fidelity[1].top1_agreement is not None
    assert validation.second_size.input_shape == [3, 64, 64] and validation.second_size.ok
    units = result.report.to_dict()["units"]
    assert any(len(u["inputs"]) > 1 and len(u["outputs"]) > 1 for u in units)  # the neck: no single cut point
    assert sum(len(u["layers"]) for u in units) == 15 and max(len(u["layers"]) for u in units) <= 8
    assert signature(output) == signature(fpn)
    report = result.report.to_dict()["validation"]
    assert [o["name"] for o in report["outputs"]] == ["probability", "scores"]
    assert report["second_size"]["parity_ok"] is True
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    probability, scores = session.run(None, {"input": np.zeros((2, 3, 48, 80), np.float32)})
    assert probability.shape == (2, 1, 12, 20) and scores.shape == (2, 5)


def test_pdquant_on_a_detector_uses_the_normalised_squared_error(fpn, calib, tmp_path, device):
    """The probability map holds no class scores: the prediction difference is each output's squared
    error over its float variance, and the run is told so."""
    result = onnxmodcap.quantize(fpn, calib, method="pdquant", iters=20, bits=4, output=str(tmp_path / "q.onnx"),
                                 num_calib=CALIB, device=device, preprocess={"input_size": "32"})
    assert result.validation.parity_ok
    assert result.report.to_dict()["prediction_difference"] == {
        "objective": "mse", "description": "squared error of every output, each divided by its float variance"}
    assert [u["name"] for u in result.report.to_dict()["reconstruction"]] == [u["name"] for u in result.report.to_dict()["units"]]


def test_a_whole_network_pass_frees_each_tensor_once_no_later_unit_reads_it(fpn, calib, device):
    """On the FPN the backbone's stages wait for the neck, so some tensors must live across several
    units and the rest must not: a pass holds only what the units after it (or the graph outputs) read."""
    import weakref

    from onnxmodcap.config import QuantizeConfig
    from onnxmodcap.mirror import as_tuple
    from onnxmodcap.pipeline import simulate

    config = QuantizeConfig(method="rtn", num_calib=8, preprocess={"input_size": "32"})
    mirror = simulate(fpn, calib, config, torch.device(device)).mirror
    produced: dict[str, weakref.ref] = {}
    held_too_long = []

    def on_unit(index):
        def hook(unit, inputs, outputs):
            if index:
                alive = {name for name, ref in produced.items() if ref() is not None}
                held_too_long.extend((index, name) for name in alive - mirror.needed_after[index - 1])
            produced.update((name, weakref.ref(t)) for name, t in zip(unit.unit.outputs, as_tuple(outputs)))
        return hook

    handles = [unit.register_forward_hook(on_unit(index)) for index, unit in enumerate(mirror.units)]
    try:
        with torch.no_grad():
            mirror(torch.zeros(2, 3, 32, 32, device=device))
    finally:
        for handle in handles:
            handle.remove()
    assert len(mirror.units) > 3 and held_too_long == []
    kept_across = [name for index in range(len(mirror.units) - 1) for name in mirror.needed_after[index]
                   if name not in mirror.units[index + 1].unit.inputs and name not in mirror.output_names]
    assert kept_across  # the graph has tensors that must outlive the next unit


def test_inspect_a_dynamic_size_graph(fpn):
    result = run_cli("inspect", fpn)
    assert result.exit_code == 2
    assert result.output.strip() == ("error: the model input ['batch', 3, 'height', 'width'] has a dynamic image size: "
                                     "pass --input-size")
    result = run_cli("inspect", fpn, "--input-size", "32x48", "--verify")
    assert result.exit_code == 0, result.output
    assert "mirror_max_rel_err: " in result.output


def test_an_input_size_the_model_rejects(fpn, calib, tmp_path):
    """36 -> 18 -> 9 -> 5 -> 3: the upsampled deepest stage (6x6) no longer matches the lateral one (5x5)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    output = tmp_path / "q.onnx"
    result = run_cli("quantize", fpn, "--calib", images, "--method", "rtn", "--input-size", 36, "-o", output)
    assert result.exit_code == 2
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: the model does not run on input [3, 36, 36] (--input-size): ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_analyze_and_mixed_precision_on_a_fixed_batch_and_a_dynamic_size_graph(exported_model, fpn, calib, tmp_path):
    """Both take graphs as users export them: the dynamo exporter's batch of 1, and a detector with
    dynamic height and width (at --input-size, checked again at a second size)."""
    static, _ = exported_model("resnet18", "dynamo_static")
    for model, preprocess, layers, budget in ((static, {}, 21, 40e6), (fpn, {"input_size": "32"}, 15, 25e6)):
        analysis = onnxmodcap.analyze(model, calib, bits=4, num_calib=CALIB, preprocess=preprocess)
        assert len({s.part.name for s in analysis.ranked("layer") if s.part.quantized == "weights"}) == layers
        assert all(f.sqnr_db > 0 for s in analysis.parts for f in s.only)
        result = onnxmodcap.quantize(model, calib, method="rtn", bits=4, mixed_precision=f"{budget:.0f}BOPs",
                                     num_calib=CALIB, output=str(tmp_path / "mixed.onnx"), preprocess=preprocess)
        assert result.validation.parity_ok and signature(result.output) == signature(model)
        assert result.report.mixed_precision.bit_operations <= budget
        assert len(set(result.report.mixed_precision.activation_widths.values())) > 1
    assert result.validation.second_size.ok
