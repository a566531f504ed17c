"""Nothing from a model, a calibration file or a checkpoint is unpickled or executed: the package's
source is checked for the calls that could do it, and the files a run writes are checked for their
permissions."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from test_hostile_inputs import tiny_classifier

import onnxmodcap

PACKAGE = Path(onnxmodcap.__file__).parent
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}


def keyword(call: ast.Call, name: str):
    value = next((k.value for k in call.keywords if k.arg == name), None)
    return value.value if isinstance(value, ast.Constant) else value


def unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {n}" for n in names if n and n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        function = ast.unparse(node.func)
        if function in UNSAFE_BUILTINS:
            found.append(f"{function}()")
        if function == "torch.load" and keyword(node, "weights_only") is not True:
            found.append("torch.load without weights_only=True")
        if function.endswith("np.load") and keyword(node, "allow_pickle") is True:
            found.append("np.load with allow_pickle=True")
        if function == "yaml.load" or function == "yaml.unsafe_load":
            found.append(function)
        if keyword(node, "shell") is True:
            found.append(f"{function} with shell=True")
    return found


@pytest.mark.parametrize("module", sorted(p.name for p in PACKAGE.glob("*.py")))
def test_no_code_path_unpickles_or_executes_input(module):
    tree = ast.parse((PACKAGE / module).read_text())
    assert unsafe_calls(tree) == []


def test_the_source_check_finds_what_it_looks_for():
    source = ("import pickle\nimport torch, numpy as np, yaml\ntorch.load(f)\nnp.load(f, allow_pickle=True)\n"
              "yaml.load(s)\neval(s)\nsubprocess.run(c, shell=True)\ntorch.load(f, weights_only=True)\n")
    assert unsafe_calls(ast.parse(source)) == [
        "import pickle", "torch.load without weights_only=True", "np.load with allow_pickle=True", "yaml.load",
        "eval()", "subprocess.run with shell=True"]


def test_written_files_get_the_usual_mode_and_no_temporary_file_remains(tmp_path):
    model, output = tiny_classifier(tmp_path / "m.onnx"), tmp_path / "q.onnx"
    inputs = tmp_path / "inputs.npy"
    np.save(inputs, np.random.default_rng(1).standard_normal((48, 3, 8, 8)).astype(np.float32))
    report = tmp_path / "report.json"
    mask = os.umask(0o027)
    try:
        onnxmodcap.quantize(model, inputs, method="brecq", iters=2, bits=4, num_calib=32, output=str(output),
                            report=str(report))
    finally:
        os.umask(mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs.npy", "m.onnx", "q.onnx", "report.json",
                                                          "report.png"]
    assert stat.S_IMODE(output.stat().st_mode) == 0o640
    assert stat.S_IMODE(report.stat().st_mode) == 0o640
    assert stat.S_IMODE(report.with_suffix(".png").stat().st_mode) == 0o640
