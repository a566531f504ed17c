"""Partition and mirror on real exporter output: the zoo exported by torch's two exporters, and a
paddle2onnx-style graph (unfolded BN, HardSwish, Constant-node weights, a Shape/Slice chain)."""

from __future__ import annotations

import pytest
from zoo import PADDLE_NUM_BLOCKS, ZOO

from onnxmodcap.errors import UserError
from onnxmodcap.inspect_model import inspect_model

PARITY = 1e-4
GATES = ("Sigmoid", "HardSigmoid")


def expected_units(name: str) -> int | None:
    """Units the partitioner must find: the issue's counts; for the squeeze-excite nets one unit per
    inverted-residual block plus stem, last conv (with the first classifier Linear) and head; for
    ConvNeXt, whose dynamo export reads the batch size at the graph input, the same units as legacy."""
    entry = ZOO[name]
    if entry.expected_units is not None:
        return entry.expected_units
    if name in ("mobilenetv3", "efficientnet"):
        return entry.num_blocks + 3
    if name == "convnext":  # stem, the blocks, the downsampling layer, head
        return entry.num_blocks + 3
    return None


def assert_partition_invariants(model, units):
    nodes = {n.name: n for n in model.graph.node}
    order = [name for unit in units for name in unit.nodes]
    assert sorted(order) == sorted(nodes), "every node belongs to exactly one unit"
    produced_at = {out: i for i, name in enumerate(order) for out in nodes[name].output}
    for i, name in enumerate(order):
        assert all(produced_at.get(inp, -1) < i for inp in nodes[name].input), f"{name} runs before its inputs"
    unit_of_tensor = {out: unit.index for unit in units for name in unit.nodes for out in nodes[name].output}
    graph_inputs = {i.name for i in model.graph.input}
    for unit in units:
        assert unit.layers, f"unit {unit.name} has no weighted layer"
        for tensor in unit.inputs:
            assert tensor in graph_inputs or unit_of_tensor[tensor] < unit.index
    assert [u.index for u in units] == list(range(len(units)))


def assert_squeeze_excite_inside_blocks(model, units):
    """Every gating Mul, its gate, the SE convs and the pooling that feeds them share one unit."""
    producer = {out: n for n in model.graph.node for out in n.output}
    unit_of = {name: unit.index for unit in units for name in unit.nodes}
    gated = 0
    for node in model.graph.node:
        gates = [producer[i] for i in node.input if i in producer and producer[i].op_type in GATES]
        if node.op_type != "Mul" or not gates:
            continue
        chain = squeeze_excite_chain(gates[0], producer)
        if chain is None:
            continue  # a SiLU-style x * gate(x), not squeeze-excite
        *chain, current = chain
        gated += 1
        assert {unit_of[n.name] for n in [node, current, *chain]} == {unit_of[node.name]}, node.name
    return gated


def squeeze_excite_chain(gate, producer, longest=6):
    """gate <- conv <- act <- conv <- ... <- global pooling, or None when no pooling is that close."""
    chain, current = [], gate
    while len(chain) < longest and current.op_type not in ("GlobalAveragePool", "ReduceMean"):
        chain.append(current)
        if current.input[0] not in producer:
            return None
        current = producer[current.input[0]]
    if current.op_type not in ("GlobalAveragePool", "ReduceMean") or not any(n.op_type == "Conv" for n in chain):
        return None
    return chain + [current]


# The zoo's ConvNeXt applies LayerNorm2d to the pooled (N, C, 1, 1) tensor. At batch 1 torch's
# exporter writes that permute as a flatten and a Gather of fixed indices, which holds the batch.
STATIC_BATCH_HELD = {"convnext": "node 'node_as_strided' (Gather)"}


@pytest.mark.parametrize("exporter", ["legacy", "legacy_bn", "dynamo", "dynamo_static"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_partition_and_parity(exported_model, name, exporter):
    path, _ = exported_model(name, exporter)
    if exporter == "dynamo_static" and name in STATIC_BATCH_HELD:
        with pytest.raises(UserError) as raised:
            inspect_model(path)
        assert str(raised.value) == (f"the model's batch size is fixed at 1 and cannot be freed: "
                                     f"{STATIC_BATCH_HELD[name]} fixes it; export the model with a dynamic "
                                     "batch dimension")
        return
    inspection = inspect_model(path, verify=True)
    assert inspection.unsupported == {}
    assert inspection.mirror_max_rel_err <= PARITY
    model, units = inspection.prepared.model, inspection.units
    assert_partition_invariants(model, units)
    if expected_units(name) is not None:
        assert len(units) == expected_units(name)
        assert (units[0].name, units[-1].name) == ("stem", "head")
    if name in ("mobilenetv3", "efficientnet"):
        assert assert_squeeze_excite_inside_blocks(model, units) >= 4


def test_bn_statistics_survive_for_every_folded_conv(exported_model):
    path, _ = exported_model("resnet18", "legacy_bn")
    prepared = inspect_model(path).prepared
    conv_outputs = {n.output[0] for n in prepared.model.graph.node if n.op_type == "Conv"}
    assert len(prepared.bn_stats) == 1 + 8 * 2 + 3  # stem, two per block, three downsample shortcuts
    assert set(prepared.bn_stats) <= conv_outputs


def test_paddle_style_graph(exported_model):
    path, _ = exported_model(None, "paddle")
    inspection = inspect_model(path, verify=True)
    assert inspection.mirror_max_rel_err <= PARITY
    model, units = inspection.prepared.model, inspection.units
    assert_partition_invariants(model, units)
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    assert len(inspection.prepared.bn_stats) == sum(n.op_type == "Conv" for n in model.graph.node
                                                    if n.output[0] in inspection.prepared.bn_stats)
    # stem, the inverted-residual blocks, the last 1x1 conv, and the head with its Shape/Slice flatten
    assert [u.name for u in units] == ["stem"] + [f"block{i}" for i in range(1, PADDLE_NUM_BLOCKS + 2)] + ["head"]
    assert "p2o.Shape.0" in units[-1].nodes
    assert assert_squeeze_excite_inside_blocks(model, units) == 2
