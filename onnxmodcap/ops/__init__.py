"""ONNX operators as torch functions: the op table that the mirror executes.

Each entry takes the node's call facts (attributes, opset, output count) and its input tensors
(None for an omitted optional input) and returns one tensor or a tuple of tensors. Semantics follow
the ONNX specification, including the defaults that differ between opsets.
"""

# Importing each family registers its ops in OPS.
from . import elementwise, layers, spatial, tensors  # noqa: F401
from .registry import OPS, Call

__all__ = ["OPS", "Call"]
