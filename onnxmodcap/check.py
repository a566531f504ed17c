"""`onnxmodcap check --target tensorrt`: lint a QDQ model against TensorRT's explicit-quantization rules.

The rules: Q/DQ zero points are 0 and INT8; activations are quantized per tensor; weights per output
channel (axis 0, axis 1 for ConvTranspose, axis 0 for Gemm with transB=1); every data input and
weight of Conv/ConvTranspose/Gemm/MatMul comes from a DequantizeLinear; no native sub-byte types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from onnx import TensorProto

from .config import QUANTIZED_OP_TYPES
from .graph import node_attributes
from .load import load_model
from .weights import Weights, tensor_value

@dataclass(frozen=True)
class Violation:
    node: str
    rule: str

    def __str__(self) -> str:
        return f"{self.node}: {self.rule}"


def check_tensorrt(path: str) -> list[Violation]:
    loaded = load_model(Path(path))
    model = loaded.model
    constants = {t.name: t for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    violations = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            violations += check_qdq_node(node, constants, loaded.weights)
        if node.op_type in QUANTIZED_OP_TYPES:
            violations += check_weighted_node(node, constants, producer)
    if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        violations.append(Violation(model.graph.name or "graph", "no QuantizeLinear node: not a QDQ model"))
    return violations


def zero_point_of(node, constants):
    if len(node.input) < 3 or not node.input[2]:
        return None
    return constants.get(node.input[2])


def check_qdq_node(node, constants, weights: Weights) -> list[Violation]:
    found = []
    zero_point = zero_point_of(node, constants)
    if zero_point is not None:
        if zero_point.data_type != TensorProto.INT8:
            found.append(Violation(node.name, f"zero point type {TensorProto.DataType.Name(zero_point.data_type)}, "
                                              "TensorRT needs INT8"))
        elif tensor_value(zero_point, weights).any():
            found.append(Violation(node.name, "non-zero zero point (TensorRT is symmetric)"))
    elif node.op_type == "DequantizeLinear" and node.input[0] in constants and \
            constants[node.input[0]].data_type != TensorProto.INT8:
        found.append(Violation(node.name, f"dequantizes {TensorProto.DataType.Name(constants[node.input[0]].data_type)}, "
                                          "TensorRT needs INT8"))
    scale = constants.get(node.input[1])
    is_weight = node.op_type == "DequantizeLinear" and node.input[0] in constants
    if scale is not None and not is_weight and element_count(scale) != 1:
        found.append(Violation(node.name, "activation quantized per channel (TensorRT needs per tensor)"))
    return found


def check_weighted_node(node, constants, producer) -> list[Violation]:
    found = []
    attrs = node_attributes(node)
    for index, role in ((0, "input"), (1, "weight")):
        source = producer.get(node.input[index])
        if source is None or source.op_type != "DequantizeLinear":
            found.append(Violation(node.name, f"{role} {node.input[index]!r} does not come from DequantizeLinear"))
            continue
        if role == "weight" and source.input[0] in constants:
            expected = 1 if node.op_type == "ConvTranspose" else 0
            if node.op_type == "Gemm" and not attrs.get("transB", 0):
                expected = 1
            if node.op_type == "MatMul":
                expected = len(constants[source.input[0]].dims) - 1
            axis = next((a.i for a in source.attribute if a.name == "axis"), 1)
            scale = constants.get(source.input[1])
            if scale is not None and element_count(scale) > 1 and axis != expected:
                found.append(Violation(source.name, f"weight quantized along axis {axis}, "
                                                    f"TensorRT needs axis {expected} for {node.op_type}"))
    return found


def element_count(tensor: TensorProto) -> int:
    return math.prod(tensor.dims)
