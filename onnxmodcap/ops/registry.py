"""The op table and what every op function shares: the node's call facts, and the helpers that
read ONNX's axes and padding conventions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import UserError

Tensor = torch.Tensor


@dataclass(frozen=True)
class Call:
    """What an op function needs to know about its node besides the input tensors."""

    name: str
    op_type: str
    attrs: dict[str, Any]
    opset: int
    num_outputs: int

    def fail(self, what: str) -> UserError:
        return UserError(f"{self.op_type} node {self.name!r}: {what}")


OpFn = Callable[..., Any]
OPS: dict[str, OpFn] = {}


def op(*op_types: str):
    def register(fn: OpFn) -> OpFn:
        for op_type in op_types:
            OPS[op_type] = fn
        return fn

    return register


def as_ints(tensor: Tensor | None) -> list[int] | None:
    return None if tensor is None else [int(v) for v in tensor.reshape(-1).tolist()]


def axes_of(call: Call, axes_input: Tensor | None, since_opset: int) -> list[int] | None:
    """Axes come from an attribute before `since_opset` and from an input from then on."""
    return call.attrs.get("axes") if call.opset < since_opset else as_ints(axes_input)


def same_pads(auto_pad: str, sizes, kernel, strides) -> list[int]:
    """Explicit begin/end pads for auto_pad SAME_UPPER / SAME_LOWER."""
    begins, ends = [], []
    for size, k, s in zip(sizes, kernel, strides):
        total = max(0, (math.ceil(size / s) - 1) * s + k - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def window_pads(call: Call, x: Tensor, kernel, strides) -> list[int]:
    """Begin/end pads of a sliding-window op (Conv, pools): pads attribute or auto_pad."""
    nd = len(kernel)
    auto_pad = call.attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(auto_pad, x.shape[2:], kernel, strides)
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    return list(call.attrs.get("pads", [0] * (2 * nd)))


def split_pads(x: Tensor, pads: list[int], value: float = 0.0) -> tuple[Tensor, list[int]]:
    """Symmetric pads are returned for the torch op; asymmetric ones are applied here."""
    nd = len(pads) // 2
    begins, ends = pads[:nd], pads[nd:]
    if begins == ends:
        return x, begins
    return F.pad(x, torch_pad_order(begins, ends), value=value), [0] * nd


def torch_pad_order(begins, ends) -> list[int]:
    """ONNX lists begins then ends from the first axis; F.pad wants pairs from the last axis."""
    order = []
    for begin, end in zip(reversed(begins), reversed(ends)):
        order += [begin, end]
    return order
