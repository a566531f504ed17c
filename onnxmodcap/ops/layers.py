"""The weighted layers: Conv, ConvTranspose, Gemm, MatMul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Call, op, split_pads, torch_pad_order, window_pads

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@op("Conv")
def conv(call: Call, x, w, b=None):
    nd = w.dim() - 2
    strides = call.attrs.get("strides", [1] * nd)
    dilations = call.attrs.get("dilations", [1] * nd)
    kernel = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dilations)]
    x, padding = split_pads(x, window_pads(call, x, kernel, strides))
    return CONV[nd](x, w, b, strides, padding, dilations, call.attrs.get("group", 1))


@op("ConvTranspose")
def conv_transpose(call: Call, x, w, b=None):
    nd = w.dim() - 2
    strides = call.attrs.get("strides", [1] * nd)
    dilations = call.attrs.get("dilations", [1] * nd)
    output_padding = call.attrs.get("output_padding", [0] * nd)
    y = CONV_TRANSPOSE[nd](x, w, None, strides, 0, 0, call.attrs.get("group", 1), dilations)
    full = list(y.shape[2:])
    begins, ends = transpose_pads(call, x.shape[2:], full, output_padding, strides)
    y = F.pad(y, torch_pad_order([-p for p in begins], [op_ - p for op_, p in zip(output_padding, ends)]))
    return y if b is None else y + b.reshape(1, -1, *([1] * nd))


def transpose_pads(call: Call, in_sizes, full_sizes, output_padding, strides):
    nd = len(full_sizes)
    auto_pad = call.attrs.get("auto_pad", "NOTSET")
    target = call.attrs.get("output_shape")
    if target is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = [size * s for size, s in zip(in_sizes, strides)]
    if target is None:
        pads = list(call.attrs.get("pads", [0] * (2 * nd)))
        return pads[:nd], pads[nd:]
    begins, ends = [], []
    for full, op_, out in zip(full_sizes, output_padding, target[-nd:]):
        total = full + op_ - out
        upper = auto_pad == "SAME_UPPER"
        begins.append(total // 2 if upper else total - total // 2)
        ends.append(total - total // 2 if upper else total // 2)
    return begins, ends


@op("Gemm")
def gemm(call: Call, a, b, c=None):
    a = a.transpose(0, 1) if call.attrs.get("transA", 0) else a
    b = b.transpose(0, 1) if call.attrs.get("transB", 0) else b
    y = call.attrs.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + call.attrs.get("beta", 1.0) * c


@op("MatMul")
def matmul(call: Call, a, b):
    return torch.matmul(a, b)
