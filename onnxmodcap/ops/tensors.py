"""Shape and layout ops: Shape, Reshape, Transpose, Concat, Slice, Gather, Pad and the like."""

from __future__ import annotations

import math

import onnx
import torch
import torch.nn.functional as F

from .registry import Call, Tensor, as_ints, axes_of, op, torch_pad_order

@op("Shape")
def shape(call: Call, x):
    dims = list(x.shape)[call.attrs.get("start", 0):call.attrs.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)  # shape arithmetic meets constants there


@op("Reshape")
def reshape(call: Call, x, target):
    dims = as_ints(target)
    if not call.attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@op("Flatten")
def flatten(call: Call, x):
    axis = call.attrs.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Transpose")
def transpose(call: Call, x):
    return x.permute(call.attrs.get("perm", list(range(x.dim()))[::-1]))


@op("Squeeze")
def squeeze(call: Call, x, axes=None):
    dims = axes_of(call, axes, 13)
    if dims is None:
        return x.squeeze()
    return x.squeeze(tuple(d % x.dim() for d in dims))


@op("Unsqueeze")
def unsqueeze(call: Call, x, axes=None):
    dims = axes_of(call, axes, 13)
    rank = x.dim() + len(dims)
    for d in sorted(d % rank for d in dims):
        x = x.unsqueeze(d)
    return x


@op("Concat")
def concat(call: Call, *tensors):
    return torch.cat([t for t in tensors if t is not None], call.attrs["axis"])


@op("Split")
def split(call: Call, x, sizes=None):
    axis = call.attrs.get("axis", 0) % x.dim()
    parts = call.attrs.get("split") if call.opset < 13 else as_ints(sizes)
    if parts is None:
        count = call.attrs.get("num_outputs", call.num_outputs)
        chunk = math.ceil(x.shape[axis] / count)
        parts = [chunk] * (count - 1) + [x.shape[axis] - chunk * (count - 1)]
    return tuple(torch.split(x, list(parts), axis))


@op("Slice")
def slice_(call: Call, x, starts=None, ends=None, axes=None, steps=None):
    if call.opset < 10:
        starts, ends, axes = call.attrs["starts"], call.attrs["ends"], call.attrs.get("axes")
        steps = None
    else:
        starts, ends, axes, steps = as_ints(starts), as_ints(ends), as_ints(axes), as_ints(steps)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        x = slice_axis(x, axis % x.dim(), start, end, step)
    return x


def slice_axis(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    size = x.shape[axis]
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), size), min(max(end, 0), size)
    else:
        start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
    index = torch.arange(start, end, step, device=x.device)
    return x.index_select(axis, index)


@op("Gather")
def gather(call: Call, x, indices):
    axis = call.attrs.get("axis", 0) % x.dim()
    flat = indices.reshape(-1).long()
    flat = torch.where(flat < 0, flat + x.shape[axis], flat)
    picked = x.index_select(axis, flat)
    return picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]))


@op("Expand")
def expand(call: Call, x, target):
    return x.expand(torch.broadcast_shapes(x.shape, tuple(as_ints(target))))


@op("Range")
def range_(call: Call, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@op("ConstantOfShape")
def constant_of_shape(call: Call, target):
    value = call.attrs.get("value")
    array = onnx.numpy_helper.to_array(value) if value is not None else None
    fill = torch.from_numpy(array.copy()) if array is not None else torch.zeros(1)
    return fill.to(target.device).reshape(()).expand(as_ints(target)).clone()


@op("Pad")
def pad(call: Call, x, pads=None, constant_value=None, axes=None):
    if call.opset < 11:
        pads, value = call.attrs["pads"], call.attrs.get("value", 0.0)
    else:
        pads = as_ints(pads)
        value = 0.0 if constant_value is None else float(constant_value.reshape(-1)[0])
    axes = as_ints(axes) if axes is not None else list(range(x.dim()))
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for i, axis in enumerate(axes):
        begins[axis % x.dim()], ends[axis % x.dim()] = pads[i], pads[i + len(axes)]
    mode = call.attrs.get("mode", "constant")
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    if mode not in modes:
        raise call.fail(f"pad mode {mode!r} is not supported")
    if mode == "constant":
        return F.pad(x, torch_pad_order(begins, ends), value=value)
    if any(begins[:2]) or any(ends[:2]):
        raise call.fail(f"{mode} padding of the batch or channel axis is not supported")
    return F.pad(x, torch_pad_order(begins[2:], ends[2:]), mode=modes[mode])
