"""Shapes as a graph declares them: numbers for fixed dimensions, names for the others."""

from __future__ import annotations

import onnx

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
