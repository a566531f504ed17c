"""The package leaves the user's process as it found it: importing it sets nothing global, a run
restores what it changes, and the command line decides what is printed."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import torch

import onnxmodcap

IMPORTS = ("onnxmodcap", "onnxmodcap.cli", "onnxmodcap.pipeline", "onnxmodcap.datasets", "onnxmodcap.plot",
           "onnxmodcap.evaluate", "onnxmodcap.runtime", "onnxmodcap.sensitivity")


def test_importing_the_package_changes_no_global_state():
    script = f"""
import os, sys, warnings, importlib
import torch
filters, environment, seed = list(warnings.filters), dict(os.environ), torch.initial_seed()
state = torch.get_rng_state()
for name in {IMPORTS!r}:
    importlib.import_module(name)
assert "matplotlib" not in sys.modules, "matplotlib imported"
assert warnings.filters == filters, "warning filters changed"
assert dict(os.environ) == environment, "environment changed"
assert torch.initial_seed() == seed and torch.equal(torch.get_rng_state(), state), "torch seed changed"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_run_restores_the_random_state_warning_filters_and_environment(exported_model, calib, tmp_path):
    """The first run imports what torch and onnx load lazily (sympy adds its warning filters then);
    the second must leave everything as it found it."""
    path, _ = exported_model("resnet18", "legacy")
    options = {"bits": 4, "method": "brecq", "modcap": "off", "iters": 2, "num_calib": 32}
    onnxmodcap.quantize(path, calib, output=str(tmp_path / "first.onnx"), **options)
    torch.manual_seed(1234)
    state, filters, environment = torch.get_rng_state(), list(warnings.filters), dict(os.environ)
    onnxmodcap.quantize(path, calib, output=str(tmp_path / "second.onnx"), **options)
    assert torch.equal(torch.get_rng_state(), state)
    assert warnings.filters == filters
    assert dict(os.environ) == environment
    assert "matplotlib.pyplot" not in sys.modules


def quantize_cli(model, calib, output, *flags: str) -> subprocess.CompletedProcess:
    """PD-Quant, which notes its prediction difference, for two iterations per unit."""
    return subprocess.run([sys.executable, "-m", "onnxmodcap.cli", *flags, "quantize", str(model), "--calib", str(calib),
                           "-o", str(output), "--bits", "4", "--method", "pdquant", "--modcap", "off", "--iters", "2",
                           "--num-calib", "32"], capture_output=True, text=True)


def test_notes_go_to_stderr_and_quiet_leaves_only_the_results(exported_model, calib, tmp_path):
    path, _ = exported_model("resnet18", "legacy")
    default = quantize_cli(path, calib, tmp_path / "q.onnx")
    assert default.returncode == 0, default.stderr
    assert [line for line in default.stderr.splitlines() if line.startswith("note: prediction difference: ")]
    quiet = quantize_cli(path, calib, tmp_path / "q.onnx", "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    def results(stdout: str) -> list[str]:
        return [line for line in stdout.splitlines() if not line.startswith("time:")]

    assert results(quiet.stdout) == results(default.stdout)
