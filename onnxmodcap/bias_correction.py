"""Stage 6b, bias correction: take out the mean shift that quantization adds to each layer's output.

The error of a quantized layer, W_q·x_q - W·x, does not average out over an output channel: its mean
moves the channel as a constant. Where a large gain follows, as when BatchNorm was folded into a
depthwise Conv, that shift travels through the rest of the network.

Empirical bias correction: on calibration images, each output channel's mean in the quantized
network minus its mean in the float network is subtracted from the layer's bias. Layers are
corrected in graph order, each measured with every layer before it already corrected, so that a
layer also takes out the mean of the error carried in from earlier layers. Measuring each unit on
its float input instead (correcting only the shift a unit makes itself) measured worse at W8A8 on
the PP-OCRv5 orientation classifier and recogniser (docs/benchmarks/real_models.md, "Bias correction").

The bias of a quantized Conv, ConvTranspose or Gemm is its third input; a quantized MatMul's is the
1-D constant of the Add that takes its output (a transformer's linear layer). A layer with neither
keeps its shift.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .mirror import NetworkMirror, UnitMirror
from .plan import QuantPlan
from .progress import progress_bar
from .tensor_cache import CachedTensor, TensorCache, TensorStream, run_in_batches

CORRECTION_IMAGES = 128  # calibration images whose channel means are compared


@dataclass(frozen=True)
class BiasedLayer:
    """A quantized layer whose output channels can be moved by a constant."""

    node: str
    output: str  # the tensor whose channel means are corrected (a MatMul's: its Add's output)
    bias: str  # the constant added per channel
    axis: int  # the channel axis of `output`


@dataclass
class CorrectedLayer:
    node: str
    bias: str
    largest_shift: float  # removed from a channel, in units of the layer's float output spread


@dataclass
class BiasCorrection:
    """What the correction did: the images it measured on, and each corrected layer with the largest
    shift it removed from a channel, in units of the layer's float output spread (the root mean
    square of its channels' standard deviations)."""

    images: int
    layers: list[CorrectedLayer]

    def to_dict(self) -> dict:
        return {"images": self.images, "layers": [asdict(layer) for layer in self.layers]}


class ChannelStatistics:
    """Running per-channel sums of chosen tensors (name -> channel axis), for their means and spreads."""

    def __init__(self, axes: dict[str, int]):
        self.axes = axes
        self.count: dict[str, int] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.squares: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        if name not in self.axes:
            return
        axis = self.axes[name]
        rows = value.detach().movedim(axis, -1).reshape(-1, value.shape[axis]).double()
        self.count[name] = self.count.get(name, 0) + len(rows)
        self.sums[name] = self.sums.get(name, 0) + rows.sum(0)
        self.squares[name] = self.squares.get(name, 0) + (rows * rows).sum(0)

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / self.count[name]

    def std(self, name: str) -> torch.Tensor:
        return (self.squares[name] / self.count[name] - self.mean(name) ** 2).clamp(min=0).sqrt()


def biased_layers(mirror: NetworkMirror, plan: QuantPlan) -> list[list[BiasedLayer]]:
    """Per unit, its quantized layers that have a bias, in graph order. A MatMul's bias Add may sit
    in a later unit than the MatMul: it is corrected in the Add's unit."""
    quantized = {spec.node: spec for spec in plan.weights}
    matmul_outputs = {outputs[0]: call.name for unit in mirror.units for call, inputs, outputs in unit.calls
                      if call.op_type == "MatMul" and call.name in quantized and inputs[1] == quantized[call.name].tensor}
    per_unit = []
    for unit in mirror.units:
        layers = []
        for call, inputs, outputs in unit.calls:
            spec = quantized.get(call.name)
            if spec is not None and spec.bias is not None:
                layers.append(BiasedLayer(call.name, outputs[0], spec.bias, 1))
            elif call.op_type == "Add" and len(inputs) == 2 and any(name in matmul_outputs for name in inputs):
                product, bias = inputs if inputs[0] in matmul_outputs else inputs[::-1]
                if bias in unit.keys and unit.constant(bias).dim() == 1 and unit.constant(bias).numel() > 1:
                    layers.append(BiasedLayer(matmul_outputs[product], outputs[0], bias, -1))
        per_unit.append(layers)
    return per_unit


def correct_biases(mirror: NetworkMirror, plan: QuantPlan, images: np.ndarray, batch_size: int,
                   device: torch.device, cache: TensorCache) -> BiasCorrection:
    """Correct, in the mirror, the bias of every quantized layer that has one (see the module docstring)."""
    images = images[:CORRECTION_IMAGES]
    graph_inputs = {mirror.input_names[0]: torch.from_numpy(images)}
    float_stream = TensorStream(mirror, cache, graph_inputs, batch_size)
    quantized_stream = TensorStream(mirror, cache, graph_inputs, batch_size)
    corrected = []
    units = zip(mirror.units, biased_layers(mirror, plan))
    for index, (unit, layers) in enumerate(progress_bar(units, total=len(mirror.units), desc="bias correction",
                                                         unit="unit", leave=False)):
        reference = ChannelStatistics({layer.output: layer.axis for layer in layers})
        with unit.observing(reference.add):  # before this unit's biases change: still the float network
            float_stream.advance(index, unit, False, device)
        for layer in layers:
            quantized = quantized_statistics(unit, layer, quantized_stream.inputs_of(unit), device, batch_size)
            shift = quantized.mean(layer.output) - reference.mean(layer.output)
            with unit.quantization(True), torch.no_grad():
                measured = unit.read_constant(layer.bias)  # the bias as the quantized layer read it
            unit.set_constant(layer.bias, measured - shift.to(measured.dtype).reshape(measured.shape))
            spread = float(reference.std(layer.output).square().mean().sqrt())
            corrected.append(CorrectedLayer(layer.node, layer.bias,
                                            round(float(shift.abs().max()) / max(spread, 1e-12), 4)))
        quantized_stream.advance(index, unit, True, device)
    return BiasCorrection(len(images), corrected)


def quantized_statistics(unit: UnitMirror, layer: BiasedLayer, inputs: list[CachedTensor], device: torch.device,
                         batch_size: int) -> ChannelStatistics:
    """The channel statistics of the layer's output in the quantized unit run on `inputs`."""
    statistics = ChannelStatistics({layer.output: layer.axis})
    with unit.observing(statistics.add), unit.quantization(True):
        for _ in run_in_batches(unit, inputs, device, batch_size):
            pass
    return statistics
