"""Small helpers every stage uses to read an ONNX graph: declared shapes (numbers for fixed
dimensions, names for the others), the opset, node attributes, who reads a tensor, and which nodes
carry weights."""

from __future__ import annotations

import math
from typing import Any

import onnx
from onnx import helper

from .config import QUANTIZED_OP_TYPES

UNKNOWN = "?"  # a dimension with neither a number nor a name


def dims(info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or UNKNOWN)
            for d in info.type.tensor_type.shape.dim]


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """The declared shape of every graph input, inferred tensor and graph output that has one."""
    return {info.name: dims(info) for info in (*model.graph.input, *model.graph.value_info, *model.graph.output)
            if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape")}


def image_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that are not initializers (older exporters list initializers as inputs too)."""
    constants = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in constants]


def dynamic_image_axes(shape: list) -> list[int]:
    """The axes after the batch that an input shape (numbers for fixed dims) leaves open."""
    return [axis for axis, dim in enumerate(shape) if axis > 0 and not (isinstance(dim, int) and dim > 0)]


def model_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes by name, strings decoded."""
    attrs = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        attrs[attr.name] = value.decode() if isinstance(value, bytes) else value
    return attrs


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes that read each tensor, in graph order."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def initializer_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Every initializer's element count, by name."""
    return {t.name: math.prod(t.dims) for t in model.graph.initializer}


def produced_tensors(model: onnx.ModelProto) -> set[str]:
    return {out for node in model.graph.node for out in node.output}


def is_weighted(node: onnx.NodeProto, constants: set[str]) -> bool:
    if node.op_type not in QUANTIZED_OP_TYPES:  # Conv, ConvTranspose, Gemm, MatMul
        return False
    if node.op_type == "MatMul":
        return any(name in constants for name in node.input)
    return len(node.input) > 1 and node.input[1] in constants


def depthwise_weights(model: onnx.ModelProto) -> set[str]:
    """The weights of Convs whose every group holds one input and one output channel (the layers
    ONNX Runtime runs with its depthwise kernels)."""
    shapes = {t.name: t.dims for t in model.graph.initializer}
    found = set()
    for node in model.graph.node:
        shape = shapes.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        group = node_attributes(node).get("group", 1)
        if shape is not None and group > 1 and shape[0] == group and shape[1] == 1:
            found.add(node.input[1])
    return found


def weight_input_index(node: onnx.NodeProto, constants: set[str]) -> int:
    """Which input of a weighted node is its weight (a MatMul may carry it first)."""
    if node.op_type == "MatMul" and node.input[1] not in constants:
        return 0
    return 1


def has_depthwise_conv(model) -> bool:
    """A Conv with one input channel per group, whatever its channel multiplier: the MobileNet
    family, whose published recipes differ (recipes.network_defaults)."""
    shapes = {t.name: t.dims for t in model.graph.initializer}
    return any(node.op_type == "Conv" and node.input[1] in shapes and shapes[node.input[1]][1] == 1
               and node_attributes(node).get("group", 1) > 1 for node in model.graph.node)
