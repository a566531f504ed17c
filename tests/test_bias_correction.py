"""Bias correction on real graphs of the test zoo: each corrected layer's output in the quantized
network has the float network's channel means, the prepared model is left as it was, and the
written model carries the corrected biases."""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from onnxmodcap.bias_correction import ChannelStatistics, biased_layers, correct_biases
from onnxmodcap.cli import main
from onnxmodcap.config import QuantizeConfig
from onnxmodcap.pipeline import BIAS_CORRECTION_AFTER_RECONSTRUCTION, simulate
from onnxmodcap.tensor_cache import TensorCache, image_layout


BATCH = 16


def layer_means(mirror, tensors: set[str], images: np.ndarray, quantized: bool) -> ChannelStatistics:
    """Channel statistics of the layer outputs in the whole network, in the batch size and memory
    layout of the correction (a Conv's float32 sums differ in their last bits with either, and a
    rounding step can flip with them)."""
    statistics = ChannelStatistics(tensors)
    with mirror.observing(statistics.add), mirror.quantization(quantized), torch.no_grad():
        for start in range(0, len(images), BATCH):
            mirror(image_layout(torch.from_numpy(images[start:start + BATCH])))
    return statistics


def test_every_corrected_layer_has_the_float_channel_means_in_the_quantized_network(exported_model, calib, tmp_path):
    path, _ = exported_model("mobilenetv2", "legacy")  # depthwise Convs with BatchNorm folded in
    sim = simulate(path, calib, QuantizeConfig(wbits=4, abits=8, num_calib=64), torch.device("cpu"))
    layers = {layer.output: layer for unit in sim.mirror.units for layer in biased_layers(unit, sim.plan)}
    assert {layer.node for layer in layers.values()} == {spec.node for spec in sim.plan.weights if spec.bias}
    images = sim.data.inputs
    prepared_weights = {name: array.copy() for name, array in sim.prepared.weights.items()}
    reference = layer_means(sim.mirror, set(layers), images, quantized=False)
    before = layer_means(sim.mirror, set(layers), images, quantized=True)

    with TensorCache(1 << 30, tmp_path / "cache") as cache:
        correction = correct_biases(sim.mirror, sim.plan, images, BATCH, torch.device("cpu"), cache)

    after = layer_means(sim.mirror, set(layers), images, quantized=True)
    assert [(c.node, c.bias) for c in correction.layers] == [(layer.node, layer.bias) for layer in layers.values()]
    assert len(correction.layers) > 10 and correction.images == len(images)
    gaps_before = []
    for tensor, layer in layers.items():
        # the bias is stored on the int32 grid of input scale x weight scale: within half a step of exact
        half_step = sim.quantizers.biases[layer.bias].scale().detach().double() / 2
        spread = float(reference.std(tensor).square().mean().sqrt())
        gap_after = (after.mean(tensor) - reference.mean(tensor)).abs()
        rounding = 1e-3 * spread + 1e-5 * reference.mean(tensor).abs()  # float32 sums in the layer
        assert bool((gap_after <= half_step + rounding).all()), (layer.node, gap_after, half_step)
        gaps_before.append(float((before.mean(tensor) - reference.mean(tensor)).abs().max()) / spread)
    assert max(gaps_before) > 0.1  # 4-bit weights moved some channel's mean by a tenth of its layer's spread
    for name, array in sim.prepared.weights.items():  # the mirror got new bias tensors, the model kept its own
        assert np.array_equal(array, prepared_weights[name]), name


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
    assert default.keys() == corrected.keys()
    assert all(np.array_equal(default[name], corrected[name]) for name in corrected)
    assert default_report["bias_correction"] == report["bias_correction"]
    assert "bias_correction" not in plain_report and "bias correction" not in plain_report["stage_seconds"]
    layers = {w["node"]: w["bias"] for w in report["plan"]["weights"] if w["bias"]}
    assert {layer["node"]: layer["bias"] for layer in report["bias_correction"]["layers"]} == layers
    changed = {name for name in corrected if not np.array_equal(corrected[name], plain[name])}
    stored = {name for bias in layers.values() for name in (bias, f"{bias}_quantized")}  # ORT Gemm: int32 + DQ
    assert changed and changed <= stored  # only biases differ; weights and scales are the same


def test_a_spill_folder_that_cannot_be_written_is_one_error_line_and_nothing_is_written(
        exported_model, calib, tmp_path):
    path, _ = exported_model("resnet18", "legacy")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    output = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["quantize", str(path), "--calib", str(calib), "--bits", "8", "--method", "rtn",
                                       "--num-calib", "32", "--cache-mem", "0", "--work-dir", str(blocker / "work"),
                                       "-o", str(output)])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == (
        f"error: bias correction cannot spill its tensors to {blocker / 'work' / 'bias-cache'}: Not a directory; "
        "free space there, choose another --work-dir or raise --cache-mem")
    assert not output.exists()


def test_after_reconstruction_it_runs_only_when_asked_and_then_with_a_warning(exported_model, calib, tmp_path):
    path, _ = exported_model("resnet18", "legacy")
    reports = {}
    for flag in ("--bias-correction", None):
        report = tmp_path / f"{flag}.json"
        result = CliRunner().invoke(main, ["quantize", str(path), "--calib", str(calib), "--bits", "4", "--abits", "8",
                                           "--method", "brecq", "--iters", "2", "--num-calib", "32",
                                           "-o", str(tmp_path / f"{flag}.onnx"), "--report", str(report)]
                                    + ([flag] if flag else []))
        assert result.exit_code == 0, result.output
        warned = f"warning: {BIAS_CORRECTION_AFTER_RECONSTRUCTION}" in result.output
        assert warned == (flag is not None)
        reports[flag] = json.loads(report.read_text())
    assert reports["--bias-correction"]["bias_correction"]["layers"]
    assert "bias_correction" not in reports[None] and "bias correction" not in reports[None]["stage_seconds"]
