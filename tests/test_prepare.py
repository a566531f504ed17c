"""prepare: safe loading, BatchNormalization statistics and folding, graph clean-up."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxmodcap.errors import UserError
from onnxmodcap.inspect_model import inspect_model
from onnxmodcap.prepare import prepare


class ConvBnRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
            self.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 1.0]))
            self.bn.weight.copy_(torch.tensor([1.5, 0.5, -1.0, 2.0]))
            self.bn.bias.copy_(torch.tensor([0.0, 0.1, 0.2, -0.3]))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture()
def bn_model(tmp_path):
    path = tmp_path / "bn.onnx"
    torch.onnx.export(ConvBnRelu().eval(), (torch.randn(1, 3, 8, 8),), path, dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return path


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_batchnorm_statistics_recorded_and_folded(bn_model):
    before = sha256(bn_model)
    prepared = prepare(bn_model)
    assert sha256(bn_model) == before
    ops = [n.op_type for n in prepared.model.graph.node]
    assert "BatchNormalization" not in ops and "Identity" not in ops
    (tensor, stats), = prepared.bn_stats.items()
    conv = next(n for n in prepared.model.graph.node if n.op_type == "Conv")
    assert conv.output[0] == tensor
    np.testing.assert_allclose(stats.mean, [0.1, -0.2, 0.3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(stats.var, [0.5, 2.0, 1.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(stats.scale, [1.5, 0.5, -1.0, 2.0], rtol=1e-6)
    assert stats.epsilon == pytest.approx(1e-5)
    assert inspect_model(bn_model, verify=True).mirror_max_rel_err <= 1e-5


def test_metadata_is_kept_without_simplifier_entries(bn_model, tmp_path):
    model = onnx.load(bn_model)
    model.metadata_props.add(key="onnxmodcap.preprocess", value='{"scale": 1}')
    path = tmp_path / "with_metadata.onnx"
    onnx.save(model, path)
    prepared = prepare(path)
    assert "simplified with onnxsim" in prepared.notes
    assert {p.key: p.value for p in prepared.model.metadata_props} == {"onnxmodcap.preprocess": '{"scale": 1}'}


def test_folded_export_reports_missing_statistics(tmp_path):
    path = tmp_path / "folded.onnx"
    torch.onnx.export(ConvBnRelu().eval(), (torch.randn(1, 3, 8, 8),), path, dynamo=False, opset_version=17)
    prepared = prepare(path)
    assert prepared.bn_stats == {}
    assert "no BatchNormalization after a Conv in the graph: BN statistics unavailable" in prepared.notes


def test_simplifier_failure_keeps_unsimplified_graph(bn_model, monkeypatch):
    import onnxsim

    def broken(model, *args, **kwargs):
        raise RuntimeError("simulated onnxsim crash\nsecond line")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    prepared = prepare(bn_model)
    assert "onnxsim failed, continuing with the unsimplified graph: simulated onnxsim crash" in prepared.notes
    assert len(prepared.bn_stats) == 1
    assert inspect_model(bn_model, verify=True).mirror_max_rel_err <= 1e-5


def test_constant_nodes_and_passthrough_nodes_removed(tmp_path):
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32))),
        helper.make_node("Identity", ["x"], ["x1"]),
        helper.make_node("Conv", ["x1", "w"], ["c"]),
        helper.make_node("Dropout", ["c"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    prepared = prepare(path, simplify=False)
    assert [n.op_type for n in prepared.model.graph.node] == ["Conv", "Dropout"]
    assert prepared.model.graph.node[0].input[:] == ["x", "w"]
    assert [t.name for t in prepared.model.graph.initializer] == ["w"]


def external_data_model(folder, location="weights.bin"):
    """A Conv model whose weight lives in an external file next to it."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = folder / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    if location != "weights.bin":
        model = onnx.load_model(path, load_external_data=False)
        for entry in model.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save_model(model, path)
    return path


def test_external_data_inside_model_folder_loads(tmp_path):
    path = external_data_model(tmp_path)
    assert inspect_model(path, verify=True).mirror_max_rel_err <= 1e-5


@pytest.mark.parametrize("escape", ["../weights.bin", "ABSOLUTE", "link.bin"])
def test_external_data_escaping_model_folder_is_refused(tmp_path, escape):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "inside").mkdir()
    external_data_model(outside)
    location = escape
    if escape == "ABSOLUTE":
        location = str(outside / "weights.bin")
    if escape == "link.bin":
        os.symlink(outside / "weights.bin", tmp_path / "inside" / "link.bin")
    if escape == "../weights.bin":
        location = "../outside/weights.bin"
    path = external_data_model(tmp_path / "inside", location)
    with pytest.raises(UserError) as err:
        prepare(path)
    assert str(err.value) == f"external data of tensor 'w' points outside the model folder: {location}"


def test_external_data_file_shorter_than_its_tensor_is_refused(tmp_path):
    path = external_data_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes((tmp_path / "weights.bin").read_bytes()[:100])
    with pytest.raises(UserError) as err:
        prepare(path)
    assert str(err.value) == (f"invalid ONNX model {path}: External data length (432) exceeds available data "
                              "(100 bytes from offset 0) for tensor 'w'")


def test_custom_domain_op_is_refused(tmp_path):
    node = helper.make_node("FancyConv", ["x"], ["y"], domain="com.acme", name="fancy")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    with pytest.raises(UserError) as err:
        prepare(path)
    assert str(err.value) == f"custom-domain ops are not supported in {path}: com.acme::FancyConv"
