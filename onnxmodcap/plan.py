"""Stage 3, plan: decide every quantizer before anything runs.

Weights of Conv/ConvTranspose/Gemm/MatMul are quantized per output channel; activations per tensor
at the inputs of those layers, one quantizer per tensor however many consumers it has. With
`target="tensorrt"` the residual input of an Add that follows a Conv is quantized too, so that
TensorRT can fuse Conv+Add; with `target="ort"` the output of an 8-bit Conv that feeds no quantized
tensor is quantized, so that ONNX Runtime can run it as an int8 kernel. The first and last weighted
layers stay at 8 bits unless told otherwise.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import yaml

from .config import END_BITS, MAX_BITS, check_bits
from .errors import UserError, first_line
from .graph import depthwise_weights, is_weighted, node_attributes, weight_input_index
from .quantizers import Grid

REDUCED_RANGE_BITS = 7


@dataclass(frozen=True)
class LayerBits:
    wbits: int
    abits: int


@dataclass(frozen=True)
class PlanOptions:
    wbits: int = 4
    abits: int = 4
    target: str = "ort"
    reduce_range: bool = False  # ORT target: 8-bit weights on 7 bits' range outside depthwise Convs (weight_grid)
    keep_ends: bool = True
    exclude: tuple[str, ...] = ()  # node-name regexes kept in float
    exclude_op_types: tuple[str, ...] = ()  # op types kept in float
    overrides: dict[str, LayerBits | None] = field(default_factory=dict)  # regex -> bits (None: float)


@dataclass(frozen=True)
class WeightPlan:
    node: str
    tensor: str
    axis: int | None  # the output-channel axis of the weight; None: one scale for the tensor
    bits: int
    input: str  # the activation tensor the layer multiplies with the weight
    bias: str | None  # a bias initializer simulated on the int32 grid of input scale x weight scale
    depthwise: bool  # a Conv whose every group holds one input and one output channel
    pinned: bool = False  # widths from --overrides or the kept ends, not --wbits: mixed precision keeps them


@dataclass(frozen=True)
class ActivationPlan:
    tensor: str
    bits: int
    consumers: tuple[str, ...]


@dataclass
class QuantPlan:
    target: str
    reduce_range: bool
    weights: list[WeightPlan]
    activations: list[ActivationPlan]

    def to_dict(self) -> dict:
        return {"target": self.target, "reduce_range": self.reduce_range, "weights": [asdict(w) for w in self.weights],
                "activations": [asdict(a) for a in self.activations]}


def weight_grid(target: str, bits: int, depthwise: bool = False, reduce_range: bool = False) -> Grid:
    """TensorRT: symmetric. ORT: symmetric at 8 bits, because ONNX Runtime's int8 Conv takes one
    zero point for all its filters; below that the more accurate asymmetric grid (export.py stores
    its integers as q - z). With `reduce_range`, 7- and 8-bit weights outside depthwise Convs are
    symmetric on [-64, 63], so that export.py can store them in int8 for ONNX Runtime's faster
    u8 x s8 kernels (ONNX Runtime's own `reduce_range`)."""
    if target == "ort" and reduce_range and not depthwise and bits >= REDUCED_RANGE_BITS:
        return Grid.signed(REDUCED_RANGE_BITS)
    if target == "tensorrt" or bits == MAX_BITS:
        return Grid.signed(bits)
    return Grid.asymmetric(bits)


def activation_grid(target: str, bits: int, nonnegative: bool) -> Grid:
    """ORT: asymmetric. TensorRT: zero point 0, unsigned for non-negative tensors below 8 bits."""
    if target == "ort":
        return Grid.asymmetric(bits)
    return Grid.unsigned(bits) if nonnegative and bits < 8 else Grid.signed(bits)


def make_plan(model: onnx.ModelProto, options: PlanOptions) -> QuantPlan:
    constants = {t.name for t in model.graph.initializer}
    layers = [n for n in model.graph.node if is_weighted(n, constants)]
    if not layers:
        raise UserError("the model has no weighted layers (Conv, ConvTranspose, Gemm, MatMul with constant weights)")
    sources = {n.name: layer_bits(n, i, len(layers), options) for i, n in enumerate(layers)}
    chosen = {name: bits for name, (bits, _) in sources.items()}
    depthwise = depthwise_weights(model)
    weights, activation_bits, consumers = [], {}, {}
    for node in layers:
        bits = chosen[node.name]
        if bits is None:
            continue
        weight_index = weight_input_index(node, constants)
        data = node.input[1 - weight_index] if node.op_type == "MatMul" else node.input[0]
        weights.append(WeightPlan(
            node=node.name, tensor=node.input[weight_index],
            axis=output_channel_axis(node, model, weight_index), bits=bits.wbits, input=data,
            bias=bias_input(node, constants), depthwise=node.input[weight_index] in depthwise,
            pinned=sources[node.name][1] != "default",
        ))
        activation_bits[data] = max(activation_bits.get(data, 0), bits.abits)
        consumers.setdefault(data, []).append(node.name)
    extra = residual_inputs(model, chosen) if options.target == "tensorrt" else \
        unfused_outputs(model, chosen, set(activation_bits))
    for tensor, consumer, bits in list(extra):
        activation_bits[tensor] = max(activation_bits.get(tensor, 0), bits)
        consumers.setdefault(tensor, []).append(consumer)
    activations = [ActivationPlan(t, activation_bits[t], tuple(consumers[t])) for t in activation_bits]
    return QuantPlan(options.target, options.reduce_range, weights, activations)


def layer_bits(node: onnx.NodeProto, index: int, count: int, options: PlanOptions) -> tuple[LayerBits | None, str]:
    """The widths of the index-th of `count` weighted layers (None keeps it in float) and where they
    come from: "excluded", "override", "end" or "default" (--wbits and --abits)."""
    if node.op_type in options.exclude_op_types or any(re.fullmatch(p, node.name) for p in options.exclude):
        return None, "excluded"
    for pattern, bits in options.overrides.items():
        if re.fullmatch(pattern, node.name):
            return bits, "override"
    if options.keep_ends and index in (0, count - 1):
        return LayerBits(END_BITS, END_BITS), "end"
    return LayerBits(options.wbits, options.abits), "default"


def output_channel_axis(node: onnx.NodeProto, model: onnx.ModelProto, weight_index: int) -> int | None:
    attrs = node_attributes(node)
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    rank = next(len(t.dims) for t in model.graph.initializer if t.name == node.input[weight_index])
    return rank - 1 if weight_index == 1 else None


def bias_input(node: onnx.NodeProto, constants: set[str]) -> str | None:
    if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2] in constants:
        return node.input[2]
    return None


def residual_inputs(model: onnx.ModelProto, chosen: dict[str, LayerBits | None]):
    """(tensor, Add node, bits) for the non-Conv input of every Add fed by a quantized Conv."""
    producer = {out: n for n in model.graph.node for out in n.output}
    constants = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Add" or any(i in constants for i in node.input):
            continue
        convs = [producer.get(i) for i in node.input]
        for k, conv in enumerate(convs):
            other = node.input[1 - k]
            if conv is not None and conv.op_type == "Conv" and chosen.get(conv.name):
                yield other, node.name, chosen[conv.name].abits
                break


def unfused_outputs(model: onnx.ModelProto, chosen: dict[str, LayerBits | None], planned: set[str]):
    """(tensor, Conv node, 8) for the output of every 8-bit-activation Conv that no QuantizeLinear
    would follow (it feeds an Add, a pooling, ...): ONNX Runtime builds its int8 QLinearConv only
    from DequantizeLinear -> Conv [-> Relu/Clip] -> QuantizeLinear. Graph outputs stay float, and so
    does a Conv [-> Relu/Clip] read only by layers kept in float: they read float values (export's
    `read_float_inputs`), so a quantizer there would only add its error to what they read."""
    users = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        bits = chosen.get(node.name)
        if node.op_type != "Conv" or bits is None or bits.abits != 8 or node.output[0] in graph_outputs:
            continue
        output = node.output[0]
        after = users.get(output, [])
        read = after[0].output[0] if len(after) == 1 and after[0].op_type in ("Relu", "Clip") else output
        readers = users.get(read, [])
        read_in_float = bool(readers) and all(r.name in chosen and chosen[r.name] is None for r in readers)
        if read not in planned and not read_in_float:
            yield output, node.name, 8


def read_overrides(path: str | Path) -> dict[str, LayerBits | None]:
    """A JSON or YAML file: {"layers": {"<node name or regex>": {"wbits": 8, "abits": 8} | "float"}}."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"cannot read overrides file {path}: {err.strerror}") from None
    try:
        content = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError) as err:
        raise UserError(f"overrides file {path} is not valid: {first_line(err)}") from None
    layers = content.get("layers") if isinstance(content, dict) else None
    if not isinstance(layers, dict):
        raise UserError(f"overrides file {path} must hold an object with a `layers` mapping")
    return {pattern: parse_override(path, pattern, value) for pattern, value in layers.items()}


def parse_override(path: Path, pattern: str, value) -> LayerBits | None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise UserError(f"overrides file {path}: {pattern!r} is not a valid regex ({err})") from None
    if value == "float":
        return None
    if not isinstance(value, dict) or set(value) - {"wbits", "abits"} or not all(isinstance(v, int) for v in value.values()):
        raise UserError(f"overrides file {path}: {pattern!r} must map to \"float\" or {{\"wbits\": N, \"abits\": N}}")
    bits = LayerBits(value.get("wbits", END_BITS), value.get("abits", END_BITS))
    check_bits(bits.wbits, f"overrides file {path}: {pattern!r} wbits")
    check_bits(bits.abits, f"overrides file {path}: {pattern!r} abits")
    return bits
