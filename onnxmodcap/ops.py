"""ONNX operators as torch functions: the op table that the mirror executes.

Each entry takes the node's call facts (attributes, opset, output count) and its input tensors
(None for an omitted optional input) and returns one tensor or a tuple of tensors. Semantics follow
the ONNX specification, including the defaults that differ between opsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import onnx
import torch
import torch.nn.functional as F

from .errors import UserError

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


# ---------------------------------------------------------------- weighted layers

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


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


# ---------------------------------------------------------------- normalisation and activations


@op("BatchNormalization")
def batch_norm(call: Call, x, scale, bias, mean, var):
    if call.attrs.get("training_mode", 0):
        raise call.fail("training_mode=1 is not an inference graph")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, call.attrs.get("epsilon", 1e-5))


@op("LayerNormalization")
def layer_norm(call: Call, x, scale, bias=None):
    axis = call.attrs.get("axis", -1) % x.dim()
    shape = x.shape[axis:]
    return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape),
                        call.attrs.get("epsilon", 1e-5))


@op("Relu")
def relu(call: Call, x):
    return torch.relu(x)


@op("LeakyRelu")
def leaky_relu(call: Call, x):
    return F.leaky_relu(x, call.attrs.get("alpha", 0.01))


@op("PRelu")
def prelu(call: Call, x, slope):
    return torch.where(x < 0, x * slope, x)


@op("Clip")
def clip(call: Call, x, low=None, high=None):
    """On CPU, a two-sided Clip (ReLU6) runs as hardtanh, whose backward is one pass: forward and
    backward at 32x96x60x60 on one thread took 49 ms, against 110 ms as clamp and 251 ms as maximum
    + minimum (benchmarks_reconstruct.md). On CUDA the bounds stay tensors, so that reading them
    never waits for the device."""
    if call.opset < 11:
        low = torch.tensor(call.attrs.get("min", -math.inf), dtype=x.dtype)
        high = torch.tensor(call.attrs.get("max", math.inf), dtype=x.dtype)
    if low is not None and high is not None and x.device.type == "cpu" and float(low) <= float(high):
        return F.hardtanh(x, float(low), float(high))
    return torch.clamp(x, low, high)


@op("HardSigmoid")
def hard_sigmoid(call: Call, x):
    return torch.clamp(call.attrs.get("alpha", 0.2) * x + call.attrs.get("beta", 0.5), 0.0, 1.0)


@op("HardSwish")
def hard_swish(call: Call, x):
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


@op("Gelu")
def gelu(call: Call, x):
    return F.gelu(x, approximate=call.attrs.get("approximate", "none"))


@op("Softmax")
def softmax(call: Call, x):
    if call.opset >= 13:
        return torch.softmax(x, call.attrs.get("axis", -1))
    axis = call.attrs.get("axis", 1) % x.dim()
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    return torch.softmax(flat, 1).reshape(x.shape)


UNARY = {
    "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Sqrt": torch.sqrt,
    "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil,
}
for _op_type, _fn in UNARY.items():
    OPS[_op_type] = lambda call, x, _fn=_fn: _fn(x)


@op("Identity", "Dropout")
def identity(call: Call, x, *ignored):
    if call.num_outputs > 1:
        raise call.fail("the Dropout mask output is not supported")
    return x


# ---------------------------------------------------------------- arithmetic


@op("Add")
def add(call: Call, a, b):
    return a + b


@op("Sub")
def sub(call: Call, a, b):
    return a - b


@op("Mul")
def mul(call: Call, a, b):
    return a * b


@op("Div")
def div(call: Call, a, b):
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@op("Pow")
def power(call: Call, a, b):
    return torch.pow(a, b.to(a.dtype) if a.is_floating_point() else b)


@op("Max", "Min", "Sum", "Mean")
def variadic(call: Call, *tensors):
    combine = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}
    result = tensors[0]
    for tensor in tensors[1:]:
        result = combine[call.op_type](result, tensor)
    return result / len(tensors) if call.op_type == "Mean" else result


TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}


@op("Cast")
def cast(call: Call, x):
    to = call.attrs["to"]
    if to not in TORCH_DTYPES:
        raise call.fail(f"cast to {onnx.TensorProto.DataType.Name(to)} is not supported")
    return x.to(TORCH_DTYPES[to])


# ---------------------------------------------------------------- shape and layout


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


def axes_of(call: Call, axes_input: Tensor | None, since_opset: int) -> list[int] | None:
    """Axes come from an attribute before `since_opset` and from an input from then on."""
    return call.attrs.get("axes") if call.opset < since_opset else as_ints(axes_input)


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


# ---------------------------------------------------------------- pooling and reductions


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


# ---------------------------------------------------------------- Resize

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
