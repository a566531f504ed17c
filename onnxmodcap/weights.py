"""Initializer values kept outside the ModelProto.

A protobuf message cannot exceed 2 GB: a graph whose weights are larger cannot be held, copied,
shape-inferred or serialized as one ModelProto. Every stage therefore works on a graph whose
initializers of at least DETACHED_BYTES are stubs (name, type and shape, marked as external data
at STUB_LOCATION) and reads their values from a `Weights` dict keyed by initializer name. The
writer (`files.stage_model`) puts the values back, into the external-data file or inline.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

DETACHED_BYTES = 1024
STUB_LOCATION = "onnxmodcap:weights"  # not a file: the value is in the Weights dict
PROTOBUF_LIMIT = 2**31 - 1

Weights = dict[str, np.ndarray]  # writable arrays: the mirror shares their memory


def is_stub(tensor: onnx.TensorProto) -> bool:
    return any(e.key == "location" and e.value == STUB_LOCATION for e in tensor.external_data)


def stub(name: str, array: np.ndarray, data_type: int | None = None) -> onnx.TensorProto:
    if data_type is None:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor = onnx.TensorProto(name=name, dims=array.shape, data_type=data_type)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=STUB_LOCATION)
    return tensor


def tensor_value(tensor: onnx.TensorProto, weights: Weights) -> np.ndarray:
    """The initializer's value, whether it is a stub or holds its data."""
    return weights[tensor.name] if is_stub(tensor) else numpy_helper.to_array(tensor)


def detached(weights: Weights, name: str, array: np.ndarray, data_type: int | None = None) -> onnx.TensorProto:
    """Keep `array` in `weights`, writable so that the mirror can share it, and return its stub."""
    weights[name] = np.require(array, requirements="W")
    return stub(name, array, data_type)


def add_initializer(model: onnx.ModelProto, weights: Weights, name: str, array: np.ndarray) -> None:
    """A new initializer: a stub with its value in `weights` when large, else inline."""
    if array.nbytes >= DETACHED_BYTES:
        model.graph.initializer.append(detached(weights, name, array))
    else:
        model.graph.initializer.append(numpy_helper.from_array(array, name))


def detach_large(model: onnx.ModelProto, weights: Weights,
                 decode: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array) -> None:
    """Move the value of every large initializer that holds its data into `weights`, in place."""
    for tensor in model.graph.initializer:
        if is_stub(tensor):
            continue
        array = decode(tensor)
        if array.nbytes >= DETACHED_BYTES and tensor.data_type != onnx.TensorProto.STRING:
            tensor.CopyFrom(detached(weights, tensor.name, array, tensor.data_type))


def with_values(model: onnx.ModelProto, weights: Weights) -> onnx.ModelProto:
    """A copy of `model` whose stubs hold their values (only for models under the protobuf limit)."""
    attached = onnx.ModelProto()
    attached.CopyFrom(model)
    for tensor in attached.graph.initializer:
        if is_stub(tensor):
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
    return attached


def fits_in_protobuf(model: onnx.ModelProto, weights: Weights) -> bool:
    """Whether `with_values(model, weights)` can be serialized (with room for protobuf framing)."""
    return model.ByteSize() + sum(array.nbytes for array in weights.values()) < PROTOBUF_LIMIT * 0.99


def used_weights(model: onnx.ModelProto, weights: Weights) -> Weights:
    """The entries of `weights` that the graph still has a stub for."""
    return {t.name: weights[t.name] for t in model.graph.initializer if is_stub(t)}
