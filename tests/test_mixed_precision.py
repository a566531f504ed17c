"""`quantize --mixed-precision`: the chosen widths meet the budget (weight bits, size or bit
operations), keep the given widths, export exactly (parity as for uniform widths), are recorded in
the report and the model; bad budgets get one error line before any work."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import onnxmodcap
from bench_mixed_precision import bit_operations
from onnxmodcap.config import MIXED_PRECISION_WIDTHS
from onnxmodcap.graph import initializer_sizes
from onnxmodcap.validate import MIN_EXACT_IMAGES

CALIB, PARITY = 96, 64


@pytest.fixture(scope="module")
def calib_tensors(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "inputs.npy"
    np.save(path, np.random.default_rng(0).standard_normal((CALIB + PARITY, 3, 32, 32)).astype(np.float32))
    return path


def weight_bits(result) -> tuple[int, int]:
    """The plan's weight bits and quantized weight count, sized from the written model."""
    sizes = initializer_sizes(onnx.load(result.output))
    weights = [(sizes[f"{w.tensor}_quantized"], w.bits) for w in result.report.plan.weights]
    return sum(size * bits for size, bits in weights), sum(size for size, _ in weights)


def assert_exact(result):
    validation = result.validation
    assert validation.held_out and validation.images == PARITY and validation.parity_ok
    assert validation.parity.exact_images >= MIN_EXACT_IMAGES


def test_at_a_uniform_models_size_the_widths_fit_keep_the_ends_export_exactly_and_are_as_faithful(
        exported_model, calib_tensors, tmp_path):
    path, _ = exported_model("resnet18", "legacy")
    uniform = onnxmodcap.quantize(path, calib_tensors, method="rtn", wbits=3, abits=8, num_calib=CALIB,
                                  output=tmp_path / "uniform.onnx")
    budget, parameters = weight_bits(uniform)
    result = onnxmodcap.quantize(path, calib_tensors, method="rtn", abits=8, mixed_precision=f"{budget / parameters:.4f}",
                                 num_calib=CALIB, output=tmp_path / "mixed.onnx", report=tmp_path / "mixed.json")
    assert_exact(result)
    bits, _ = weight_bits(result)
    assert bits <= budget
    assert result.validation.fidelity[0].sqnr_db >= uniform.validation.fidelity[0].sqnr_db
    plan = result.report.plan.weights
    assert (plan[0].bits, plan[-1].bits) == (8, 8)
    chosen = result.report.mixed_precision
    assert {w.node: w.bits for w in plan[1:-1]} == chosen.widths
    assert set(chosen.widths.values()) <= set(MIXED_PRECISION_WIDTHS) and len(set(chosen.widths.values())) > 1
    assert json.loads((tmp_path / "mixed.json").read_text())["mixed_precision"]["widths"] == chosen.widths
    metadata = json.loads({p.key: p.value for p in onnx.load(result.output).metadata_props}["onnxmodcap.quantization"])
    assert metadata["mixed_precision"]["average_bits"] == chosen.average_bits == round(bits / parameters, 3)


def test_reconstruction_runs_on_the_chosen_widths(exported_model, calib_tensors, tmp_path):
    path, _ = exported_model("resnet18", "legacy")
    result = onnxmodcap.quantize(path, calib_tensors, method="qdrop", iters=4, abits=8, mixed_precision="3.5",
                                 num_calib=CALIB, output=tmp_path / "mixed.onnx")
    assert_exact(result)
    assert weight_bits(result)[0] <= 3.5 * weight_bits(result)[1]
    assert len(result.report.reconstruction.units) == len(result.report.units)


def test_a_bit_operation_budget_chooses_weight_and_activation_widths(exported_model, calib_tensors, tmp_path):
    """At the bit operations of a uniform W4A4 model: weight and activation widths both vary, the
    count is the one shape inference gives, the export is exact and at least as faithful."""
    path, _ = exported_model("resnet18", "legacy")
    uniform = onnxmodcap.quantize(path, calib_tensors, method="rtn", bits=4, num_calib=CALIB,
                                  output=tmp_path / "uniform.onnx")
    budget = bit_operations(path, uniform.report.plan)
    result = onnxmodcap.quantize(path, calib_tensors, method="rtn", bits=4, mixed_precision=f"{budget / 1e6:.4f}MBOPs",
                                 num_calib=CALIB, output=tmp_path / "mixed.onnx", report=tmp_path / "mixed.json")
    assert_exact(result)
    chosen = result.report.mixed_precision
    assert chosen.bit_operations == pytest.approx(bit_operations(path, result.report.plan), rel=1e-9)
    assert chosen.bit_operations <= budget
    assert result.validation.fidelity[0].sqnr_db >= uniform.validation.fidelity[0].sqnr_db
    assert len(set(chosen.widths.values())) > 1 and len(set(chosen.activation_widths.values())) > 1
    planned = {a.tensor: a.bits for a in result.report.plan.activations}
    assert all(planned[tensor] == bits for tensor, bits in chosen.activation_widths.items())
    assert {w.node: w.bits for w in result.report.plan.weights if w.node in chosen.widths} == chosen.widths
    assert json.loads((tmp_path / "mixed.json").read_text())["mixed_precision"]["activation_widths"] == \
        chosen.activation_widths


def test_a_bit_operation_budget_at_8_bit_activations_for_onnx_runtime(exported_model, calib_tensors, tmp_path):
    """W4A8: Convs left with 8-bit inputs get the output quantizers ONNX Runtime fuses, calibrated
    on the float model like every other tensor; those outputs are never widths of their own."""
    path, _ = exported_model("resnet18", "legacy")
    result = onnxmodcap.quantize(path, calib_tensors, method="rtn", wbits=4, abits=8, mixed_precision="100MBOPs",
                                 num_calib=CALIB, output=tmp_path / "mixed.onnx")
    assert_exact(result)
    chosen, plan = result.report.mixed_precision, result.report.plan
    read = {w.input for w in plan.weights}
    assert chosen.activation_widths and set(chosen.activation_widths) <= read
    assert chosen.bit_operations == pytest.approx(bit_operations(path, plan), rel=1e-9) and chosen.bit_operations <= 100e6


def test_a_bit_operation_budget_keeps_8_bit_activations_for_tensorrt(exported_model, calib_tensors, tmp_path):
    path, _ = exported_model("resnet18", "legacy")
    result = onnxmodcap.quantize(path, calib_tensors, method="rtn", wbits=4, abits=8, target="tensorrt",
                                 mixed_precision="100MBOPs", num_calib=CALIB, output=tmp_path / "mixed.onnx")
    assert_exact(result)
    assert result.report.mixed_precision.activation_widths == {}
    assert {a.bits for a in result.report.plan.activations} == {8}
    assert result.report.mixed_precision.bit_operations <= 100e6


@pytest.mark.parametrize("budget, message", [
    ("1.5", "--mixed-precision 1.5: average weight bits must be between 2 and 8; for a size, give its unit (e.g. 3MB)"),
    ("2500", "--mixed-precision 2500: average weight bits must be between 2 and 8; for a size, give its unit (e.g. 3MB)"),
    ("3XB", "--mixed-precision '3XB': unknown unit 'XB': use B, kB, MB, GB, KiB, MiB or GiB for a weight size, "
            "BOPs, kBOPs, MBOPs, GBOPs or TBOPs for bit operations per image"),
    ("four", "--mixed-precision 'four': give average weight bits (e.g. 4.5), a weight size with its unit (e.g. 3MB) "
             "or bit operations per image (e.g. 20GBOPs)"),
])
def test_a_budget_that_is_not_one_is_refused_in_one_line(tmp_path, budget, message):
    done = subprocess.run([sys.executable, "-m", "onnxmodcap.cli", "quantize", "missing.onnx", "--calib", "none",
                           "--mixed-precision", budget], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr == f"error: {message}\n"


@pytest.mark.parametrize("budget, message", [
    ("1kB", "--mixed-precision 1kB is below what 2-bit weights everywhere give"),
    ("100MB", "--mixed-precision 100MB is at or above what 8-bit weights everywhere give"),
    ("1MBOPs", "--mixed-precision 1MBOPs is below what 2-bit widths everywhere give"),
    ("1TBOP", "--mixed-precision 1TBOP is at or above what 8-bit widths everywhere give"),
])
def test_a_budget_the_model_cannot_meet_is_refused_and_nothing_is_written(exported_model, calib_tensors, tmp_path,
                                                                          budget, message):
    path, _ = exported_model("resnet18", "legacy")
    done = subprocess.run([sys.executable, "-m", "onnxmodcap.cli", "quantize", str(path), "--calib", str(calib_tensors),
                           "--method", "rtn", "--mixed-precision", budget, "-o", str(tmp_path / "out.onnx")],
                          capture_output=True, text=True)
    assert done.returncode != 0
    [line] = done.stderr.splitlines()[-1:]
    assert line.startswith(f"error: {message} (")
    assert not (tmp_path / "out.onnx").exists()
