"""Normalisation, activations, arithmetic and casts: ops that map each element (or each row) on its own."""

from __future__ import annotations

import math

import onnx
import torch
import torch.nn.functional as F

from .registry import OPS, Call, op

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
    """On CPU, a two-sided Clip (ReLU6) runs as hardtanh, whose backward is one pass: 15 ms against
    63 ms as clamp and 124 ms as maximum + minimum (docs/benchmarks/reconstruct.md, "Fewer passes").
    On CUDA the bounds stay tensors, so that reading them never waits for the device."""
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
