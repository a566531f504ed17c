"""Stage 7, export: write Q/DQ into the prepared float graph from the quantizers' integers and scales.

`qdq` format (default; what TensorRT and ONNX Runtime's int8 kernels take): weights are int8
initializers holding x_int - z behind a per-channel DequantizeLinear with zero point 0; an activation
becomes
Clip -> QuantizeLinear(int8, zero point 0) -> DequantizeLinear, the Clip carrying a b-bit grid
exactly, and left out where the grid is the container's full range (8-bit grids use uint8 with their
zero point when they do not fit int8).

`native` format: weights in the smallest ONNX integer type that holds their grid (INT4/UINT4 from
opset 21, else 8-bit) and activations in the 8-bit type that holds theirs (UINT8 for unsigned grids),
each with the grid's own zero point: smaller files. ONNX Runtime 1.31's QDQ optimizers dictate
these choices: each alternative below made models that do not load in a default session.
- sub-byte activation Q/DQ: they move a UINT4 QuantizeLinear in front of MaxPool, and their Clip
  fusion rejects a UINT4 zero point;
- INT2/UINT2 weights (opset 25): they fuse them into QLinearConv and QGemm, which reject them, so
  2-bit grids take 4-bit types (the zoo's ConvNeXt, MobileNetV3 and segmentation head failed);
- int8 activations at opset 21 and later: propagating a DequantizeLinear through MaxPool and then
  turning int8 Q/DQ into uint8 leaves a QuantizeLinear whose output_dtype (an opset-21 attribute)
  contradicts its zero point (the zoo's GoogLeNet failed). So does a `qdq` model whose source
  graph is at opset 21 or later: for the ORT target its activations take the native encoding too.

ORT-target weights whose stored integers exceed 64 in magnitude (8-bit grids, 7-bit asymmetric
ones) are stored as uint8 holding x_int - z + 128 with zero point 128, except in depthwise Convs.
ONNX Runtime's u8 x s8 kernels on x86 CPUs without VNNI (MLAS's AVX2 and AVX512BW paths) add
pairs of products in int16, which saturates above 64 x 255 x 2: a fused Conv then lands up to a
hundred output steps away from the simulation (docs/benchmarks/reliability.md). With uint8 weights ONNX
Runtime takes its u8 x u8 kernels, which widen every product to 32 bits, as its depthwise kernels
do for int8 weights. The arithmetic is the same integers either way.

Every quantized tensor keeps its name: its producer writes `<name>_float` and DequantizeLinear
writes `<name>`, so consumers and graph outputs need no rewiring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter

from . import __version__
from .batch import set_batch_dim
from .errors import UserError, first_line
from .mirror import NetworkMirror
from .graph import depthwise_weights, model_opset
from .partition import float_layers
from .prepare import PreparedModel
from .quantizers import Grid, Quantizer, QuantizerSet
from .runtime import QUANTIZATION_METADATA_KEY
from .weights import Weights, detach_large, used_weights

QDQ_OPSET = 13
OUTPUT_DTYPE_OPSET = 21  # QuantizeLinear's output_dtype, which ONNX Runtime's int8 rewrite leaves wrong


@dataclass(frozen=True)
class Container:
    """An ONNX integer type with its value range, and the opset that introduced it."""

    elem_type: int
    low: int
    high: int
    opset: int


INT8 = Container(TensorProto.INT8, -128, 127, 13)
UINT8 = Container(TensorProto.UINT8, 0, 255, 13)
NATIVE_WEIGHTS = [Container(TensorProto.UINT4, 0, 15, 21), Container(TensorProto.INT4, -8, 7, 21), UINT8, INT8]
NATIVE_ACTIVATIONS = [UINT8, INT8]
NUMPY_TYPES = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}
ORT_PAIR_LIMIT = 64  # the largest weight integer ONNX Runtime's u8 x s8 kernels take without saturating
UINT8_WEIGHT_ZERO = 128  # the zero point of ORT-target weights stored in uint8


@dataclass(frozen=True)
class Encoding:
    """How one quantizer's integers are stored: in `container`, either shifted (x_int - z +
    `shifted_zero`, written with zero point `shifted_zero`) or as x_int with the grid's own zero point."""

    container: Container
    shifted: bool
    shifted_zero: int = 0

    def stored_range(self, grid: Grid, zero_point: float) -> tuple[int, int]:
        offset = int(zero_point) - self.shifted_zero if self.shifted else 0
        return grid.qmin - offset, grid.qmax - offset

    def clip_needed(self, grid: Grid, zero_point: float) -> bool:
        return self.stored_range(grid, zero_point) != (self.container.low, self.container.high)


def qdq_encoding(grid: Grid, zero_points: torch.Tensor) -> Encoding:
    shifted_low = grid.qmin - int(zero_points.max())
    shifted_high = grid.qmax - int(zero_points.min())
    if shifted_low >= INT8.low and shifted_high <= INT8.high:
        return Encoding(INT8, shifted=True)
    if grid.qmin >= UINT8.low and grid.qmax <= UINT8.high:
        return Encoding(UINT8, shifted=False)
    raise UserError(f"a {grid.bits}-bit grid [{grid.qmin}, {grid.qmax}] does not fit an 8-bit container")


def native_encoding(grid: Grid, containers: list[Container]) -> Encoding:
    fitting = next(c for c in containers if c.low <= grid.qmin and grid.qmax <= c.high)
    return Encoding(fitting, shifted=False)


def weight_encoding(fmt: str, target: str, quantizer: Quantizer, depthwise: bool) -> Encoding:
    grid, zero_point = quantizer.grid, quantizer.zero_point
    widest = max(abs(grid.qmin - int(zero_point.max())), abs(grid.qmax - int(zero_point.min())))
    if target == "ort" and not depthwise and widest > ORT_PAIR_LIMIT:
        return Encoding(UINT8, shifted=True, shifted_zero=UINT8_WEIGHT_ZERO)
    if fmt == "native":
        return native_encoding(quantizer.grid, NATIVE_WEIGHTS)
    return qdq_encoding(quantizer.grid, quantizer.zero_point)


def activation_encoding(fmt: str, target: str, opset: int, quantizer: Quantizer) -> Encoding:
    """TensorRT needs int8 with zero point 0. ONNX Runtime's optimizers fail on int8 activations
    from opset 21 on (see above), so there an ORT-target model takes the native encoding."""
    if fmt == "native" or (target == "ort" and opset >= OUTPUT_DTYPE_OPSET):
        return native_encoding(quantizer.grid, NATIVE_ACTIVATIONS)
    return qdq_encoding(quantizer.grid, quantizer.zero_point)


def export_qdq(prepared: PreparedModel, mirror: NetworkMirror, quantizers: QuantizerSet, fmt: str,
               target: str, metadata: dict, dynamic_batch: bool = False) -> tuple[onnx.ModelProto, Weights]:
    """The quantized model, its large initializers as stubs with their values in the Weights. It
    keeps the batch size the source model fixes, unless `dynamic_batch`.

    Biases hold values on the int32 grid of input scale x weight scale. They stay float (TensorRT
    takes them so; ONNX Runtime quantizes the bias of every Conv it fuses into an int8 kernel and
    recovers exactly the simulated integers), except Gemm biases of the ORT target, which are
    written as int32 behind a DequantizeLinear because ORT forms QGemm only from those."""
    depthwise = depthwise_weights(prepared.model)
    weight_encodings = {tensor: weight_encoding(fmt, target, quantizer, tensor in depthwise)
                        for tensor, quantizer in quantizers.weights.items()}
    opset = max([QDQ_OPSET, model_opset(prepared.model), *(e.container.opset for e in weight_encodings.values())])
    # raised before the Q/DQ nodes go in: the converter has no adapters for them below opset 13
    model = with_opset(onnx.ModelProto.FromString(prepared.model.SerializeToString()), opset)
    constants = mirror.constants()
    writer = GraphWriter(model)
    with torch.no_grad():
        for tensor, quantizer in quantizers.weights.items():
            writer.dequantized_constant(tensor, constants[tensor], quantizer, weight_encodings[tensor])
        gemm_biases = {n.input[2] for n in model.graph.node if n.op_type == "Gemm" and len(n.input) > 2}
        for tensor, bias in quantizers.biases.items():
            if target == "ort" and tensor in gemm_biases:
                writer.dequantized_bias(tensor, bias.integers(constants[tensor]), bias.scale())
            else:
                writer.replace_constant(tensor, bias(constants[tensor]))
        for tensor, quantizer in quantizers.activations.items():
            writer.quantized_activation(tensor, quantizer, activation_encoding(fmt, target, opset, quantizer))
    writer.read_float_inputs(float_layers(model, quantizers.weights))
    writer.finish()
    if prepared.batch and not dynamic_batch:
        set_batch_dim(model, prepared.batch, prepared.batch.size)
    weights = dict(prepared.weights)
    detach_large(model, weights)
    entries = {p.key: p.value for p in model.metadata_props}
    entries[QUANTIZATION_METADATA_KEY] = json.dumps({"tool": f"onnxmodcap {__version__}", "format": fmt,
                                                     "target": target, **metadata})
    del model.metadata_props[:]
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    return model, used_weights(model, weights)


def with_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    current = model_opset(model)
    if current >= opset:
        return model
    try:
        converted = version_converter.convert_version(model, opset)
    except Exception as err:  # the converter raises plain RuntimeErrors for missing adapters
        raise UserError(f"cannot raise the model from opset {current} to {opset}: {first_line(err)}") from None
    return converted


class GraphWriter:
    """Collects new initializers and nodes; each activation's Q/DQ group goes right after its producer."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.leading: list[onnx.NodeProto] = []  # weight/bias DequantizeLinear and graph-input groups
        self.after: dict[str, list[onnx.NodeProto]] = {}  # producer output -> nodes that follow it
        self.initializers: list[onnx.TensorProto] = []
        self.dropped: set[str] = set()
        self.float_sources: dict[str, str] = {}  # dequantized tensor -> its float value

    def add_initializer(self, tensor: onnx.TensorProto) -> str:
        self.initializers.append(tensor)
        return tensor.name

    def scale_and_zero_point(self, name: str, quantizer: Quantizer, encoding: Encoding, per_channel: bool):
        scale = quantizer.scale.detach().cpu().numpy().astype(np.float32)
        zero_point = quantizer.zero_point.detach().cpu().numpy().astype(np.int64)
        zero_point = np.full_like(zero_point, encoding.shifted_zero) if encoding.shifted else zero_point
        if not per_channel:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return (self.add_initializer(numpy_helper.from_array(scale, f"{name}_scale")),
                self.add_initializer(integer_tensor(f"{name}_zero_point", zero_point, encoding.container)))

    def dequantized_constant(self, name: str, value: torch.Tensor, quantizer: Quantizer, encoding: Encoding):
        stored = quantizer.quantized_integers(value) + encoding.shifted_zero
        if not encoding.shifted:
            stored = stored + quantizer.broadcast(quantizer.zero_point, value)
        per_channel = quantizer.axis is not None
        values = self.add_initializer(integer_tensor(f"{name}_quantized", stored.cpu().numpy(), encoding.container))
        scale, zero = self.scale_and_zero_point(name, quantizer, encoding, per_channel)
        attrs = {"axis": quantizer.axis % value.dim()} if per_channel else {}
        self.leading.append(helper.make_node("DequantizeLinear", [values, scale, zero], [name],
                                             name=f"{name}_DequantizeLinear", **attrs))
        self.dropped.add(name)

    def dequantized_bias(self, name: str, integers: torch.Tensor, scale: torch.Tensor):
        values = self.add_initializer(numpy_helper.from_array(integers.cpu().numpy().astype(np.int32),
                                                              f"{name}_quantized"))
        scales = self.add_initializer(numpy_helper.from_array(scale.detach().cpu().numpy().astype(np.float32),
                                                              f"{name}_scale"))
        self.leading.append(helper.make_node("DequantizeLinear", [values, scales], [name],
                                             name=f"{name}_DequantizeLinear", axis=0))
        self.dropped.add(name)

    def replace_constant(self, name: str, value: torch.Tensor):
        """A float initializer that now holds its dequantized (simulated) value."""
        self.add_initializer(numpy_helper.from_array(value.detach().cpu().numpy().astype(np.float32), name))
        self.dropped.add(name)

    def quantized_activation(self, name: str, quantizer: Quantizer, encoding: Encoding):
        float_source, result = self.detach_tensor(name)
        self.float_sources[result] = float_source
        source = float_source
        scale, zero = self.scale_and_zero_point(name, quantizer, encoding, per_channel=False)
        zero_point = float(quantizer.zero_point)
        nodes = []
        if encoding.clip_needed(quantizer.grid, zero_point):
            step = quantizer.scale.reshape(()).float().cpu()
            low, high = ((torch.tensor(float(q - zero_point)) * step).numpy().astype(np.float32)
                         for q in (quantizer.grid.qmin, quantizer.grid.qmax))
            bounds = [self.add_initializer(numpy_helper.from_array(low, f"{name}_clip_min")),
                      self.add_initializer(numpy_helper.from_array(high, f"{name}_clip_max"))]
            nodes.append(helper.make_node("Clip", [source, *bounds], [f"{name}_clipped"], name=f"{name}_Clip"))
            source = f"{name}_clipped"
        nodes.append(helper.make_node("QuantizeLinear", [source, scale, zero], [f"{name}_quantized"],
                                      name=f"{name}_QuantizeLinear"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_quantized", scale, zero], [result],
                                      name=f"{name}_DequantizeLinear"))
        if float_source == name:  # a graph input
            self.leading.extend(nodes)
        else:
            self.after.setdefault(float_source, []).extend(nodes)

    def detach_tensor(self, name: str) -> tuple[str, str]:
        """(the float source, the name the dequantized value takes). A produced tensor's producer now
        writes `<name>_float`; a graph input keeps its name and its consumers read `<name>_dequantized`."""
        for node in self.graph.node:
            for i, output in enumerate(node.output):
                if output == name:
                    node.output[i] = f"{name}_float"
                    return f"{name}_float", name
        for node in self.graph.node:
            for i, tensor in enumerate(node.input):
                if tensor == name:
                    node.input[i] = f"{name}_dequantized"
        return name, f"{name}_dequantized"

    def read_float_inputs(self, layers: set[str]) -> None:
        """Layers kept in float read their inputs before quantization, as in the simulation. (Fed from
        a DequantizeLinear, ONNX Runtime would quantize their weights itself.)"""
        for node in self.graph.node:
            if node.name in layers:
                for i, tensor in enumerate(node.input):
                    node.input[i] = self.float_sources.get(tensor, tensor)

    def finish(self) -> None:
        """Splice the new nodes in and replace the float initializers that are now dequantized."""
        ordered = list(self.leading)
        for node in self.graph.node:
            ordered.append(node)
            for output in node.output:
                ordered += self.after.pop(output, [])
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        kept = [t for t in self.graph.initializer if t.name not in self.dropped]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept + self.initializers)
        value_infos = [v for v in self.graph.value_info if v.name not in self.dropped]
        del self.graph.value_info[:]
        self.graph.value_info.extend(value_infos)


def integer_tensor(name: str, values: np.ndarray, container: Container) -> onnx.TensorProto:
    if container.elem_type in NUMPY_TYPES:
        return numpy_helper.from_array(values.astype(NUMPY_TYPES[container.elem_type]), name)
    return helper.make_tensor(name, container.elem_type, values.shape, values.reshape(-1).astype(np.int64).tolist())
