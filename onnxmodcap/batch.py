"""Part of stage 1, prepare: a graph exported with a fixed batch size runs at any batch size.

torch's dynamo exporter writes the batch of its example input into the graph (input `[1, 3, 224,
224]`) and folds it into constants, such as the `[1, 512]` shape of the Reshape before the
classifier. The tool feeds its own batch sizes (calibration, reconstruction, validation), so the
prepared graph gets a symbolic batch:

- the image input and every graph output whose first dimension is the fixed batch get the symbolic
  dimension `BATCH_SYMBOL`;
- a Reshape, Expand or Resize whose constant shape (or sizes) starts with the fixed batch, while the
  tensor it acts on depends on the image, stops fixing it: a Reshape without a -1 entry infers that
  dimension (-1), the others read it from their data (`Concat(Gather(Shape(data), [0]), constant[1:])`).
  Rewriting one can free the next, so the rewrite repeats until shape inference finds no more.

ONNX Runtime then proves the rewrite: the rewritten graph on 2 x B random images must give, image by
image, the outputs of the original graph on two batches of B. A graph where that fails (an op that
mixes images, a constant that holds the batch some other way) is refused with the node that fixes
the batch. The writer restores the fixed batch on the exported file's inputs and outputs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from .errors import UserError, first_line
from .files import save_with_external_data
from .preprocess import guess_layout, missing_input_size
from .runtime import session_options
from .graph import dims, dynamic_image_axes, image_inputs, tensor_shapes
from .weights import Weights, fits_in_protobuf, tensor_value, with_values

BATCH_SYMBOL = "batch"
# input index of the constant that holds a shape starting with the batch, per op type
SHAPE_INPUTS = {"Reshape": 1, "Expand": 1, "Resize": 3}
PROOF_TOLERANCE = 1e-4  # max |rewritten - original| relative to each output's range


@dataclass(frozen=True)
class FixedBatch:
    """A graph input whose batch dimension the exporter fixed, with the example shape that proves
    the rewrite (the input's shape with its dynamic height and width filled in)."""

    input_name: str
    size: int
    example_shape: tuple[int, ...]


def fixed_batch(model: onnx.ModelProto, input_size: tuple[int, int] | None) -> FixedBatch | None:
    """The model's single graph input, if its batch dimension is a number; None otherwise.
    `input_size` (height, width) fills a dynamic image size."""
    inputs = image_inputs(model)
    if len(inputs) != 1:
        return None  # several inputs: the pipeline refuses the model with its own error
    shape = dims(inputs[0])
    if not shape or not isinstance(shape[0], int) or shape[0] < 1:
        return None
    open_axes = dynamic_image_axes(shape)
    if open_axes:
        spatial = (1, 2) if len(shape) == 4 and guess_layout(shape) == "nhwc" else (2, 3)
        if input_size is None or not set(open_axes) <= set(spatial):
            raise missing_input_size(shape)
        for axis, size in zip(spatial, input_size):
            shape[axis] = size
    return FixedBatch(inputs[0].name, shape[0], tuple(shape))


def free_batch(model: onnx.ModelProto, weights: Weights, batch: FixedBatch) -> onnx.ModelProto:
    """A copy of `model` with a symbolic batch, proven equal to `model` image by image in ONNX
    Runtime; raises UserError naming the node where the batch cannot be freed."""
    freed = onnx.ModelProto()
    freed.CopyFrom(model)
    set_batch_dim(freed, batch, BATCH_SYMBOL)
    rewrites = 0
    while pinned := pinned_shapes(freed, infer(freed), weights, batch):
        for node, constant in pinned:
            stop_fixing_batch(freed, node, constant, f"{BATCH_SYMBOL}_read_{rewrites}")
            rewrites += 1
    prove(model, freed, weights, batch)
    return freed


def set_batch_dim(model: onnx.ModelProto, batch: FixedBatch, dim: str | int) -> None:
    """Set dim 0 of the image input, and of every graph output whose dim 0 is the fixed batch or the
    symbol, to `dim`; drop the inferred shapes, which named the old one."""
    infos = [i for i in model.graph.input if i.name == batch.input_name] + list(model.graph.output)
    for info in infos:
        dims = info.type.tensor_type.shape.dim
        if dims and (dims[0].dim_value == batch.size or dims[0].dim_param == BATCH_SYMBOL):
            if isinstance(dim, str):
                dims[0].dim_param = dim
            else:
                dims[0].dim_value = dim
    del model.graph.value_info[:]


def infer(model: onnx.ModelProto) -> dict[str, list]:
    """The shape of every tensor that shape inference reaches."""
    try:
        return tensor_shapes(onnx.shape_inference.infer_shapes(model, data_prop=True))
    except Exception as err:  # onnx raises several unrelated types for inconsistent graphs
        raise UserError(f"the fixed batch size cannot be freed: shape inference fails ({first_line(err)})") from None


def pinned_shapes(model: onnx.ModelProto, shapes: dict[str, list], weights: Weights,
                  batch: FixedBatch) -> list[tuple[onnx.NodeProto, np.ndarray]]:
    """The nodes whose constant shape starts with the fixed batch while their data depends on the
    image (its shape is not fully known), each with that constant."""
    constants = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        index = SHAPE_INPUTS.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in constants:
            continue
        constant = tensor_value(constants[node.input[index]], weights)
        if constant.ndim == 1 and constant.size and constant[0] == batch.size and varies(shapes.get(node.input[0])):
            found.append((node, constant))
    return found


def stop_fixing_batch(model: onnx.ModelProto, node: onnx.NodeProto, constant: np.ndarray, prefix: str) -> None:
    """Replace the constant shape input of `node` by one whose first entry follows the batch."""
    index = SHAPE_INPUTS[node.op_type]
    if node.op_type == "Reshape" and -1 not in constant:
        inferred = np.concatenate([[-1], constant[1:]]).astype(np.int64)
        model.graph.initializer.append(numpy_helper.from_array(inferred, f"{prefix}_shape"))
        node.input[index] = f"{prefix}_shape"
        return
    data_shape, first, data_batch = f"{prefix}_data_shape", f"{prefix}_first", f"{prefix}_batch"
    rest, shape = f"{prefix}_rest", f"{prefix}_shape"
    model.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), first))
    model.graph.initializer.append(numpy_helper.from_array(constant[1:].astype(np.int64), rest))
    position = list(model.graph.node).index(node)
    model.graph.node.insert(position, helper.make_node("Shape", [node.input[0]], [data_shape]))
    # Gather, not Shape's start/end attributes: those need opset 15
    model.graph.node.insert(position + 1, helper.make_node("Gather", [data_shape, first], [data_batch], axis=0))
    model.graph.node.insert(position + 2, helper.make_node("Concat", [data_batch, rest], [shape], axis=0))
    node.input[index] = shape


def prove(original: onnx.ModelProto, freed: onnx.ModelProto, weights: Weights, batch: FixedBatch) -> None:
    """ONNX Runtime: `freed` on 2 x B images equals `original` on each half, output by output."""
    info = next(i for i in original.graph.input if i.name == batch.input_name)
    dtype = helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
    images = np.random.default_rng(0).standard_normal((2 * batch.size, *batch.example_shape[1:])).astype(dtype)
    halves = [images[:batch.size], images[batch.size:]]
    try:
        expected = [np.concatenate(parts) for parts in zip(*(run(original, weights, batch, half) for half in halves))]
    except UserError as err:
        raise UserError(f"the model does not run on input {list(batch.example_shape)}: {err}") from None
    try:
        actual = run(freed, weights, batch, images)
        problem = mismatch(original, expected, actual)
    except UserError as err:
        problem = str(err)
    if problem:
        holder = batch_holder(freed, infer(freed))
        where = f"node {holder.name!r} ({holder.op_type}) fixes it" if holder else problem
        raise UserError(f"the model's batch size is fixed at {batch.size} and cannot be freed: {where}; "
                        "export the model with a dynamic batch dimension")


def run(model: onnx.ModelProto, weights: Weights, batch: FixedBatch, images: np.ndarray) -> list[np.ndarray]:
    """All outputs of `model` on `images` in ONNX Runtime's CPU provider, which logs nothing: a
    failure here is an answer, reported by the caller."""
    options = session_options(log_severity=4)
    with tempfile.TemporaryDirectory(prefix="onnxmodcap-batch-") as folder:
        if fits_in_protobuf(model, weights):
            source: str | bytes = with_values(model, weights).SerializeToString()
        else:
            source = str(Path(folder) / "model.onnx")
            save_with_external_data(model, weights, Path(source), "model.onnx.data")
        try:
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
            return session.run(None, {batch.input_name: images})
        except Exception as err:  # onnxruntime raises its own exception types per failure kind
            raise UserError(f"ONNX Runtime fails on batch {len(images)}: {first_line(err)}") from None


def mismatch(original: onnx.ModelProto, expected: list[np.ndarray], actual: list[np.ndarray]) -> str | None:
    """What differs between the outputs, or None."""
    for info, want, got in zip(original.graph.output, expected, actual):
        if want.shape != got.shape:
            return f"output {info.name!r} has shape {list(got.shape)} instead of {list(want.shape)}"
        scale = float(np.abs(want).max()) or 1.0
        error = float(np.abs(want.astype(np.float64) - got).max()) / scale
        if error > PROOF_TOLERANCE:
            return f"output {info.name!r} changes by {error:.2e} of its range"
    return None


def batch_holder(model: onnx.ModelProto, shapes: dict[str, list]) -> onnx.NodeProto | None:
    """The first node that takes a tensor whose shape follows the batch and puts out one whose shape
    is fixed (shape computations aside)."""
    constants = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        takes = any(varies(shapes.get(name)) for name in node.input if name and name not in constants)
        fixes = any(name in shapes and not varies(shapes[name]) for name in node.output)
        if takes and fixes:
            return node
    return None


def varies(shape: list | None) -> bool:
    """Whether an inferred shape may change with the batch: not known, or not all numbers."""
    return shape is None or not all(isinstance(dim, int) and dim > 0 for dim in shape)
