"""Pooling, reductions and Resize."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UserError
from .registry import OPS, Call, Tensor, axes_of, op, torch_pad_order, window_pads

@op("GlobalAveragePool")
def global_average_pool(call: Call, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(call: Call, x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@op("AveragePool")
def average_pool(call: Call, x):
    kernel = call.attrs["kernel_shape"]
    nd = len(kernel)
    if nd not in AVG_POOL or any(d != 1 for d in call.attrs.get("dilations", [1] * nd)):
        raise call.fail("only 2-D and 3-D undilated average pooling is supported")
    strides = call.attrs.get("strides", [1] * nd)
    pads = window_pads(call, x, kernel, strides)
    ceil_mode = bool(call.attrs.get("ceil_mode", 0))
    include_pad = bool(call.attrs.get("count_include_pad", 0))
    if pads[:nd] == pads[nd:] and all(2 * p <= k for p, k in zip(pads[:nd], kernel)):
        return AVG_POOL[nd](x, kernel, strides, pads[:nd], ceil_mode, include_pad)
    # Asymmetric pads: pool sums, then divide by the number of counted elements per window.
    padded = F.pad(x, torch_pad_order(pads[:nd], pads[nd:]))
    counted = F.pad(torch.ones_like(x[:1, :1]), torch_pad_order(pads[:nd], pads[nd:]), value=float(include_pad))
    sums = AVG_POOL[nd](padded, kernel, strides, 0, ceil_mode, True, divisor_override=1)
    counts = AVG_POOL[nd](counted, kernel, strides, 0, ceil_mode, True, divisor_override=1)
    return sums / counts


@op("MaxPool")
def max_pool(call: Call, x):
    if call.num_outputs > 1:
        raise call.fail("the Indices output of MaxPool is not supported")
    kernel = call.attrs["kernel_shape"]
    nd = len(kernel)
    strides = call.attrs.get("strides", [1] * nd)
    dilations = call.attrs.get("dilations", [1] * nd)
    effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    pads = window_pads(call, x, effective, strides)
    ceil_mode = bool(call.attrs.get("ceil_mode", 0))
    if pads[:nd] == pads[nd:] and all(2 * p <= k for p, k in zip(pads[:nd], kernel)):
        return MAX_POOL[nd](x, kernel, strides, pads[:nd], dilations, ceil_mode)
    padded = F.pad(x, torch_pad_order(pads[:nd], pads[nd:]), value=-math.inf)
    return MAX_POOL[nd](padded, kernel, strides, 0, dilations, ceil_mode)


def reduction(reduce: Callable, axes_input_since: int):
    def run(call: Call, x, axes=None):
        dims = axes_of(call, axes, axes_input_since)
        if not dims:
            if call.attrs.get("noop_with_empty_axes", 0):
                return x
            dims = list(range(x.dim()))
        return reduce(x, dim=tuple(d % x.dim() for d in dims), keepdim=bool(call.attrs.get("keepdims", 1)))

    return run


OPS["ReduceMean"] = reduction(torch.mean, 18)
OPS["ReduceSum"] = reduction(torch.sum, 13)
OPS["ReduceMax"] = reduction(torch.amax, 18)


NEAREST_ROUNDING = {
    "round_prefer_floor": lambda c: torch.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
    "floor": torch.floor,
    "ceil": torch.ceil,
}


@op("Resize")
def resize(call: Call, x, roi=None, scales=None, sizes=None):
    if call.opset < 11:
        scales, sizes = roi, None
    mode = call.attrs.get("mode", "nearest")
    transform = call.attrs.get("coordinate_transformation_mode", "half_pixel" if call.opset >= 11 else "asymmetric")
    if mode not in ("nearest", "linear") or transform == "tf_crop_and_resize" or call.attrs.get("antialias", 0):
        raise call.fail(f"mode {mode!r} with coordinate transformation {transform!r} is not supported")
    axes = call.attrs.get("axes", list(range(x.dim())))
    for i, axis in enumerate(axes):
        in_size = x.shape[axis]
        if sizes is not None and sizes.numel():
            out_size = int(sizes[i])
            scale = torch.tensor(out_size / in_size, dtype=torch.float32)
        else:
            scale = scales[i].to(torch.float32)
            out_size = int(math.floor(in_size * float(scale)))
        if out_size == in_size and float(scale) == 1.0:
            continue
        coords = source_coordinates(transform, in_size, out_size, scale, x.device)
        if mode == "nearest":
            rounding = NEAREST_ROUNDING[call.attrs.get("nearest_mode", "round_prefer_floor")]
            index = rounding(coords).clamp(0, in_size - 1).long()
            x = x.index_select(axis, index)
        else:
            x = linear_along(x, axis, coords.clamp(0, in_size - 1))
    return x


def source_coordinates(transform: str, in_size: int, out_size: int, scale: Tensor, device) -> Tensor:
    out = torch.arange(out_size, dtype=torch.float32, device=device)
    if transform == "half_pixel":
        return (out + 0.5) / scale - 0.5
    if transform == "pytorch_half_pixel":
        return (out + 0.5) / scale - 0.5 if out_size > 1 else torch.zeros_like(out)
    if transform == "align_corners":
        return out * ((in_size - 1) / (out_size - 1)) if out_size > 1 else torch.zeros_like(out)
    if transform == "asymmetric":
        return out / scale
    raise UserError(f"Resize coordinate_transformation_mode {transform!r} is not supported")


def linear_along(x: Tensor, axis: int, coords: Tensor) -> Tensor:
    low = torch.floor(coords)
    frac = (coords - low).to(x.dtype)
    low = low.long()
    high = (low + 1).clamp(max=x.shape[axis] - 1)
    shape = [1] * x.dim()
    shape[axis] = -1
    frac = frac.reshape(shape)
    return x.index_select(axis, low) * (1 - frac) + x.index_select(axis, high) * frac
