"""Bias correction on real graphs of the test zoo: each corrected layer's output in the quantized
network has the float network's channel means, the prepared model is left as it was, and the
written model carries the corrected biases."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxmodcap.bias_correction import ChannelStatistics, biased_layers, correct_biases
from onnxmodcap.calibrate import CalibrationData, build_quantizers, collect_activation_stats
from onnxmodcap.cli import main
from onnxmodcap.config import QuantizeConfig
from onnxmodcap.export import export_qdq
from onnxmodcap.mirror import NetworkMirror
from onnxmodcap.partition import partition
from onnxmodcap.pipeline import Simulation, simulate
from onnxmodcap.plan import PlanOptions, make_plan
from onnxmodcap.prepare import prepare
from onnxmodcap.tensor_cache import TensorCache, image_layout
from onnxmodcap.validate import require_parity, validate
from onnxmodcap.weights import with_values


BATCH = 16


def layer_means(mirror, axes: dict[str, int], images: np.ndarray, quantized: bool) -> ChannelStatistics:
    """Channel statistics of the layer outputs in the whole network, in the batch size and memory
    layout of the correction (a Conv's float32 sums differ in their last bits with either, and a
    rounding step can flip with them)."""
    statistics = ChannelStatistics(axes)
    with mirror.observing(statistics.add), mirror.quantization(quantized), torch.no_grad():
        for start in range(0, len(images), BATCH):
            mirror(image_layout(torch.from_numpy(images[start:start + BATCH])))
    return statistics


def sequence_model(path):
    """Conv, then two linear layers on a (N, W, C) sequence as MatMul + Add (as paddle2onnx writes a
    transformer's), then a Gemm head; the width is dynamic."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], kernel_shape=[8, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Squeeze", ["r", "axis2"], ["s"]),
        helper.make_node("Transpose", ["s"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "fc1_w"], ["m1"]),
        helper.make_node("Add", ["m1", "fc1_b"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["h"]),
        helper.make_node("MatMul", ["h", "fc2_w"], ["m2"]),
        helper.make_node("Add", ["fc2_b", "m2"], ["a2"]),
        helper.make_node("ReduceMean", ["a2", "axis1"], ["pooled"], keepdims=0),
        helper.make_node("Gemm", ["pooled", "head_w", "head_b"], ["y"], transB=1),
    ]
    constants = [weight("conv_w", 16, 3, 8, 1), weight("conv_b", 16), weight("fc1_w", 16, 32), weight("fc1_b", 32),
                 weight("fc2_w", 32, 16), weight("fc2_b", 16), weight("head_w", 10, 16), weight("head_b", 10),
                 numpy_helper.from_array(np.array([2], np.int64), "axis2"),
                 numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    graph = helper.make_graph(nodes, "sequence", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def unsimplified_simulation(path, calib: np.ndarray) -> Simulation:
    """The calibrated quantized mirror of `path` as `simulate` builds it, but without onnxsim, which
    would turn each MatMul + Add into a Gemm here (it cannot where shape inference fails, as on
    PP-OCRv5's recogniser)."""
    prepared = prepare(path, simplify=False, flags={"input_size": (8, 32)})
    units = partition(prepared.model)
    plan = make_plan(prepared.model, PlanOptions(wbits=4, abits=8))
    mirror = NetworkMirror(prepared, units).eval()
    stats = collect_activation_stats(mirror, plan, calib, 16, torch.device("cpu"), 0)
    quantizers = build_quantizers(mirror, plan, stats, "lp")
    mirror.attach(quantizers)
    return Simulation(prepared, units, plan, mirror, quantizers, CalibrationData(calib, calib, False), None, 0)


@pytest.mark.parametrize("name", ["mobilenetv2", "sequence"])
def test_every_corrected_layer_has_the_float_channel_means_in_the_quantized_network(name, exported_model, calib, tmp_path):
    """mobilenetv2: Conv biases (BatchNorm folded into depthwise Convs), stored on the int32 grid.
    sequence: MatMul + Add layers, whose float Add constant is the bias, besides a Conv and a Gemm."""
    if name == "sequence":
        sequence_model(tmp_path / "sequence.onnx")
        inputs = np.random.default_rng(1).standard_normal((64, 3, 8, 32)).astype(np.float32)
        sim = unsimplified_simulation(tmp_path / "sequence.onnx", inputs)
    else:
        path, _ = exported_model(name, "legacy")
        sim = simulate(path, calib, QuantizeConfig(wbits=4, abits=8, num_calib=64), torch.device("cpu"))
    layers = {layer.output: layer for unit_layers in biased_layers(sim.mirror, sim.plan) for layer in unit_layers}
    conv_biases = {spec.node for spec in sim.plan.weights if spec.bias is not None}
    matmuls = {spec.node for spec in sim.plan.weights if spec.tensor in ("fc1_w", "fc2_w")}
    assert {layer.node for layer in layers.values()} == conv_biases | matmuls
    assert len(matmuls) == (2 if name == "sequence" else 0)
    axes = {tensor: layer.axis for tensor, layer in layers.items()}
    images = sim.data.inputs
    prepared_weights = {name: array.copy() for name, array in sim.prepared.weights.items()}
    reference = layer_means(sim.mirror, axes, images, quantized=False)
    before = layer_means(sim.mirror, axes, images, quantized=True)

    with TensorCache(1 << 30, tmp_path / "cache") as cache:
        correction = correct_biases(sim.mirror, sim.plan, images, BATCH, torch.device("cpu"), cache)

    after = layer_means(sim.mirror, axes, images, quantized=True)
    assert [(c.node, c.bias) for c in correction.layers] == [(layer.node, layer.bias) for layer in layers.values()]
    assert len(correction.layers) >= 4 and correction.images == len(images)
    gaps_before = []
    for tensor, layer in layers.items():
        # a Conv or Gemm bias is stored on the int32 grid of input scale x weight scale: within half a
        # step of exact; an Add's bias stays float
        bias_quantizer = sim.quantizers.biases.get(layer.bias)
        half_step = bias_quantizer.scale().detach().double() / 2 if bias_quantizer else 0.0
        spread = float(reference.std(tensor).square().mean().sqrt())
        gap_after = (after.mean(tensor) - reference.mean(tensor)).abs()
        rounding = 1e-3 * spread + 1e-5 * reference.mean(tensor).abs()  # float32 sums in the layer
        assert bool((gap_after <= half_step + rounding).all()), (layer.node, gap_after, half_step)
        gaps_before.append(float((before.mean(tensor) - reference.mean(tensor)).abs().max()) / spread)
    assert max(gaps_before) > 0.1  # 4-bit weights moved some channel's mean by a tenth of its layer's spread
    for name, array in sim.prepared.weights.items():  # the mirror got new bias tensors, the model kept its own
        assert np.array_equal(array, prepared_weights[name]), name

    # the written model computes what the corrected mirror does (an Add's bias written as a float constant)
    exported, weights = export_qdq(sim.prepared, sim.mirror, sim.quantizers, "qdq", "ort", {},
                                   float_biases=[layer.bias for layer in correction.layers])
    output = tmp_path / "corrected.onnx"
    onnx.save(with_values(exported, weights), output)
    validation = validate(str(output), str(sim.prepared.source),
                          sim.mirror, images[:32], False, torch.device("cpu"), "cpu")
    require_parity(validation)


def test_the_written_model_carries_the_corrected_biases_and_the_report_says_so(exported_model, calib, tmp_path):
    path, _ = exported_model("resnet18", "legacy")
    written = {}
    for flag in ("--bias-correction", "--no-bias-correction", None):  # None: the default, on with rtn
        output, report = tmp_path / f"{flag}.onnx", tmp_path / f"{flag}.json"
        result = CliRunner().invoke(main, ["quantize", str(path), "--calib", str(calib), "--bits", "4", "--abits", "8",
                                           "--method", "rtn", "--num-calib", "32", "-o", str(output),
                                           "--report", str(report)] + ([flag] if flag else []))
        assert result.exit_code == 0, result.output
        model = onnx.load(output)
        written[flag] = ({t.name: numpy_helper.to_array(t) for t in model.graph.initializer},
                         json.loads(report.read_text()))
    (corrected, report), (plain, plain_report) = written["--bias-correction"], written["--no-bias-correction"]
    default, default_report = written[None]
    assert all(np.array_equal(default[name], corrected[name]) for name in corrected) and default.keys() == corrected.keys()
    assert default_report["bias_correction"] == report["bias_correction"]
    assert "bias_correction" not in plain_report and "bias correction" not in plain_report["stage_seconds"]
    layers = {w["node"]: w["bias"] for w in report["plan"]["weights"] if w["bias"]}
    assert {layer["node"]: layer["bias"] for layer in report["bias_correction"]["layers"]} == layers
    changed = {name for name in corrected if not np.array_equal(corrected[name], plain[name])}
    stored = {name for bias in layers.values() for name in (bias, f"{bias}_quantized")}  # Gemm: int32 + DQ (ORT)
    assert changed and changed <= stored  # only biases differ; weights and scales are the same
