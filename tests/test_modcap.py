"""ModCap (schedules, merged units, oscillation) and PD-Quant (prediction difference, distribution
correction) on real graphs: the shipped models and the test zoo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import onnxmodcap
from onnxmodcap.checkpoint import Checkpointer
from onnxmodcap.cli import main
from onnxmodcap.errors import Interrupted
from onnxmodcap.inspect_model import inspect_model
from onnxmodcap.mirror import NetworkMirror
from onnxmodcap.modcap import choose_groups, data_capacities, data_free_capacities, merge_units, oscillation
from onnxmodcap.partition import Unit
from onnxmodcap.config import QuantizeConfig
from onnxmodcap.pipeline import simulate
from onnxmodcap.losses import ChannelMoments, statistics_error
from onnxmodcap.pdquant import batchnorm_targets, correct_distribution, FloatRest
from onnxmodcap.recipes import drop_probability, ReconstructionSettings
from onnxmodcap.reconstruct import start_training
from onnxmodcap.tensor_cache import CachedTensor, TensorCache

SHIPPED = Path(__file__).resolve().parent.parent / "models"
ITERS = 30


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def named_units(*names: str) -> list[Unit]:
    return [Unit(i, name, [], [], [], []) for i, name in enumerate(names)]


def test_top_pairs_merge_into_groups_of_at_most_three_and_never_the_stem_or_head():
    units = named_units("stem", "block1", "block2", "block3", "block4", "block5", "block6", "head")
    capacities = [None, 1.0, 10.0, 100.0, 1000.0, 1000.0, 1500.0, None]
    schedule = choose_groups("free", units, capacities, pairs=3)
    # block1-2 and block2-3 rank first; block3-4 would make a group of four, so the next pair merges
    assert schedule.groups == [[0], [1, 2, 3], [4], [5, 6], [7]]
    assert schedule.merged() == [["block1", "block2", "block3"], ["block5", "block6"]]
    assert schedule.text() == "1, (2, 2, 2), 3, (4, 4), 5"
    assert schedule.differentials[0] is None and schedule.differentials[-1] is None


def test_oscillation_is_total_variation_over_the_sum():
    assert oscillation([1.0, 2.0, 1.0]) == pytest.approx(0.5)
    assert oscillation([3.0, 3.0, 3.0]) == 0.0


def test_data_free_schedule_of_the_shipped_resnet():
    schedule = inspect_model(SHIPPED / "resnet18.onnx", modcap="free").schedule
    assert schedule.merged() == [["block4", "block5"], ["block6", "block7"]]
    assert schedule.text() == "1, 2, 3, 4, (5, 5), (6, 6), 7, 8"
    result = run_cli("inspect", SHIPPED / "resnet18.onnx", "--modcap", "free", "--modcap-k", "1")
    assert result.exit_code == 0, result.output
    assert "reconstructed jointly: block6+block7" in result.output.splitlines()


def test_merged_units_compute_exactly_what_the_units_computed(exported_model, calib):
    path, _ = exported_model("mobilenetv2", "legacy")
    sim = simulate(path, calib, QuantizeConfig(bits=4, num_calib=32), torch.device("cpu"))
    capacities = data_capacities(sim.mirror, sim.data.inputs, torch.device("cpu"))
    schedule = choose_groups("data", sim.units, capacities, pairs=4)
    merged = NetworkMirror(sim.prepared, merge_units(sim.prepared.model, sim.units, schedule)).eval()
    merged.attach(sim.quantizers)
    assert len(merged.units) < len(sim.units)
    batch = torch.from_numpy(sim.data.inputs)
    with torch.no_grad():
        for quantized in (True, False):
            with sim.mirror.quantization(quantized), merged.quantization(quantized):
                assert torch.equal(sim.mirror(batch)[0], merged(batch)[0])


def test_qdrop_keeps_an_element_quantized_across_a_group_as_often_as_across_one_unit(exported_model, calib):
    path, _ = exported_model("mobilenetv2", "legacy")
    sim = simulate(path, calib, QuantizeConfig(bits=4, num_calib=32), torch.device("cpu"))
    schedule = choose_groups("free", sim.units, data_free_capacities(sim.prepared.model, sim.units, sim.plan), pairs=4)
    merged = NetworkMirror(sim.prepared, merge_units(sim.prepared.model, sim.units, schedule)).eval()
    merged.attach(sim.quantizers)
    assert max(len(group) for group in schedule.groups) > 1
    for unit, group in zip(merged.units, schedule.groups):
        assert unit.unit.group_size == len(group)
        assert drop_probability(ReconstructionSettings(method="brecq"), unit.unit.group_size) == 0.0
        activations = start_training(unit, ReconstructionSettings(method="qdrop")).activations
        assert activations
        for quantizer in activations:
            assert (1.0 - quantizer.drop_prob) ** len(group) == pytest.approx(0.5)


def test_distribution_correction_moves_inputs_toward_the_bn_statistics(exported_model, calib, tmp_path):
    path, _ = exported_model("resnet18", "legacy_bn")
    sim = simulate(path, calib, QuantizeConfig(bits=4, num_calib=64), torch.device("cpu"))
    targets = batchnorm_targets(sim.prepared.bn_stats)
    stem = NetworkMirror(sim.prepared, sim.units).units[0]
    images = CachedTensor(torch.from_numpy(sim.data.inputs))

    def correct(dc_lambda):
        corrected, note = correct_distribution(stem, [images], targets, ReconstructionSettings(iters=4000,
                                               dc_lambda=dc_lambda), torch.device("cpu"), TensorCache(1 << 30, tmp_path))
        assert note == "applied (1 BatchNormalization statistics)"
        return corrected[0][:]

    def error(inputs):
        seen = {}
        with stem.observing(lambda name, value: seen.__setitem__(name, value) if name in targets else None):
            with torch.no_grad():
                stem(inputs)
        return float(statistics_error(seen, targets))

    # the penalty ||X_c - X||^2 / lambda_c holds the correction back: without it, the statistics move further
    assert error(correct(1e6)) < error(correct(0.02)) < error(images[:])


def test_channel_moments_match_torch_mean_and_variance_and_their_gradients():
    generator = torch.Generator().manual_seed(0)
    values = (torch.randn(3, 4, 25, generator=generator, dtype=torch.float64) * 3 + 5).requires_grad_(True)
    mean, variance = ChannelMoments.apply(values)
    torch.testing.assert_close(mean, values.mean(2))
    torch.testing.assert_close(variance, values.var(2))
    assert torch.autograd.gradcheck(ChannelMoments.apply, (values,))


def test_pdquant_with_data_modcap_corrects_the_inputs_of_single_units_and_not_of_groups(exported_model, calib,
                                                                                       tmp_path, device):
    path, _ = exported_model("resnet18", "legacy_bn")
    result = onnxmodcap.quantize(path, calib, wbits=2, abits=4, method="pdquant", modcap="data", preset="fast",
                                 iters=ITERS, num_calib=96, output=str(tmp_path / "q.onnx"), device=device)
    assert result.validation.parity_ok and result.validation.held_out
    merged = result.report.to_dict()["modcap"]["merged"]
    assert sum(len(group) - 1 for group in merged) == 2  # pairs merged: the default for 8 blocks
    names = [u["name"] for u in result.report.to_dict()["reconstruction"]]
    assert ["+".join(group) for group in merged] == [name for name in names if "+" in name]
    corrections = {u["name"]: u["distribution_correction"] for u in result.report.to_dict()["reconstruction"]}
    assert corrections["stem"] == "applied (1 BatchNormalization statistics)"
    assert all(corrections[name].startswith("applied (") for name in names[:-1] if "+" not in name)
    assert all(corrections[name] == "skipped: a ModCap group" for name in names if "+" in name)
    assert corrections["head"] == "skipped: no BatchNormalization statistics inside the unit"
    settings = result.report.to_dict()["reconstruction_settings"]
    assert (settings["pd_temperature"], settings["dc_lambda"], settings["round_lambda"]) == (4.0, 0.02, 0.01)
    assert result.report.to_dict()["distribution_correction"] == "on: 20 BatchNormalization statistics recorded by prepare"
    assert result.report.to_dict()["prediction_difference"]["objective"] == "kl"


def test_compare_granularity_reports_both_loss_curves(exported_model, calib, tmp_path):
    path, _ = exported_model("mobilenetv2", "legacy")
    report = tmp_path / "report.json"
    result = onnxmodcap.quantize(path, calib, wbits=2, abits=4, method="brecq", modcap="free", compare_granularity=True,
                                 iters=ITERS, num_calib=96, output=str(tmp_path / "q.onnx"), report=str(report))
    assert result.validation.parity_ok
    assert [u["name"] for u in result.report.to_dict()["reconstruction_without_modcap"]] == \
        [u["name"] for u in result.report.to_dict()["units"]]
    assert len(result.report.to_dict()["reconstruction"]) < len(result.report.to_dict()["units"])
    losses = result.report.to_dict()["unit_losses"]
    assert len(losses["before"]) == len(losses["after"]) == len(losses["after_without_modcap"]) == \
        len(result.report.to_dict()["units"])
    assert losses["oscillation"] == pytest.approx(oscillation(losses["after"]))
    assert losses["oscillation_without_modcap"] == pytest.approx(oscillation(losses["after_without_modcap"]))
    assert losses["after"] != losses["after_without_modcap"]
    assert report.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pdquant_without_bn_statistics_says_so_and_skips_the_correction(exported_model, calib, tmp_path):
    path, _ = exported_model("mobilenetv2", "legacy")
    result = onnxmodcap.quantize(path, calib, bits=4, method="pdquant", preset="fast", iters=ITERS, num_calib=96,
                                 output=str(tmp_path / "q.onnx"))
    assert result.validation.parity_ok
    assert result.report.to_dict()["distribution_correction"].startswith(
        "skipped: the graph has no BatchNormalization statistics (BN was folded before export)")
    assert {u["distribution_correction"] for u in result.report.to_dict()["reconstruction"]} == {
        "skipped: no BatchNormalization statistics inside the unit"}
    settings = result.report.to_dict()["reconstruction_settings"]  # depthwise convolutions: the MobileNet recipes
    assert (settings["pd_temperature"], settings["dc_lambda"], settings["round_lambda"]) == (1.0, 0.005, 0.1)


@pytest.mark.parametrize("preset, carried_per_unit", [("fast", 2), ("paper", 8)])
def test_prediction_difference_joins_every_iteration_of_the_paper_preset_and_every_fourth_of_the_fast_one(
        preset, carried_per_unit, tmp_path, monkeypatch):
    carries = []
    original = FloatRest.__call__
    monkeypatch.setattr(FloatRest, "__call__", lambda rest, outputs, picks: carries.append(len(picks)) or original(
        rest, outputs, picks))
    result = onnxmodcap.quantize(SHIPPED / "resnet18.onnx", SHIPPED / "calib", bits=4, method="pdquant", preset=preset, iters=8,
                                 num_calib=96, output=str(tmp_path / "q.onnx"))
    units = len(result.report.to_dict()["reconstruction"])
    probed_per_unit = 2  # the step-cost probe times two carrying steps of each unit before training
    assert carries == [8 if preset == "fast" else 32] * (units * (carried_per_unit + probed_per_unit))
    assert result.report.to_dict()["reconstruction_settings"]["pd_interval"] == (4 if preset == "fast" else 1)


def test_round_lambda_overrides_the_network_default(exported_model, calib, tmp_path):
    path, _ = exported_model("mobilenetv2", "legacy")
    result = onnxmodcap.quantize(path, calib, bits=4, method="brecq", modcap="off", iters=2, num_calib=96,
                                 round_lambda=0.05, output=str(tmp_path / "q.onnx"))
    assert result.report.to_dict()["reconstruction_settings"]["round_lambda"] == 0.05


@pytest.mark.parametrize(("options", "message"), [
    (["--method", "rtn", "--modcap", "data"], "--modcap groups units for reconstruction: use it with --method brecq, qdrop or pdquant"),
    (["--method", "qdrop", "--modcap", "off", "--compare-granularity"],
     "--compare-granularity compares against ModCap: give --modcap data or free"),
    (["--method", "pdquant", "--pd-lambda", "0"], "--pd-lambda must be positive, got 0.0"),
    (["--method", "brecq", "--round-lambda", "-1"], "--round-lambda must be positive, got -1.0"),
    (["--method", "qdrop", "--round-lr", "0"], "--round-lr must be positive, got 0.0"),
    (["--method", "qdrop", "--modcap", "free", "--modcap-k", "0"], "--modcap-k must be at least 1, got 0"),
])
def test_bad_options_give_one_error_line(calib, tmp_path, options, message):
    output = tmp_path / "q.onnx"
    result = run_cli("quantize", SHIPPED / "resnet18.onnx", "--calib", calib, "-o", output, *options)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"error: {message}"]
    assert list(tmp_path.iterdir()) == []


def test_interrupted_pdquant_modcap_run_resumes_to_the_identical_file(exported_model, calib, tmp_path, device,
                                                                       monkeypatch):
    path, _ = exported_model("resnet18", "legacy_bn")
    options = {"wbits": 2, "abits": 4, "method": "pdquant", "modcap": "free", "preset": "fast", "iters": 10,
               "num_calib": 96, "device": device}
    whole = onnxmodcap.quantize(path, calib, output=str(tmp_path / "whole.onnx"), **options).output.read_bytes()
    save = Checkpointer.save

    def save_then_interrupt(self, completed, *args):
        save(self, completed, *args)
        if completed == 5:  # stem, block1-3 and the merged group block4+block5
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "save", save_then_interrupt)
    output = tmp_path / "q.onnx"
    with pytest.raises(Interrupted):
        onnxmodcap.quantize(path, calib, output=str(output), **options)
    monkeypatch.undo()
    assert not output.exists()
    resumed = onnxmodcap.quantize(path, calib, output=str(output), resume=True, **options)
    assert [u["name"] for u in resumed.report.to_dict()["reconstruction"]][4] == "block4+block5"
    assert resumed.output.read_bytes() == whole
