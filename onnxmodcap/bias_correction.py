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

Quantized Conv, ConvTranspose and Gemm layers with a bias input are corrected. A MatMul keeps its
shift: correcting the 1-D constant of the Add after it, on PP-OCRv5's recogniser at W8A8, left 79.7 %
of the strings identical against 82.0 % without (docs/benchmarks/real_models.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .mirror import NetworkMirror, UnitMirror
from .plan import QuantPlan
from .progress import progress_bar
from .tensor_cache import CachedTensor, TensorCache, TensorStream

CORRECTION_IMAGES = 128  # calibration images whose channel means are compared


@dataclass(frozen=True)
class BiasedLayer:
    """A quantized layer with a bias input."""

    node: str
    output: str  # the tensor whose channel means (axis 1) are corrected
    bias: str


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
    """Running per-channel sums (channels on axis 1) of chosen tensors, for their means and spreads."""

    def __init__(self, tensors: set[str]):
        self.tensors = tensors
        self.count: dict[str, int] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.squares: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        if name not in self.tensors:
            return
        rows = value.detach().movedim(1, -1).reshape(-1, value.shape[1]).double()
        self.count[name] = self.count.get(name, 0) + len(rows)
        self.sums[name] = self.sums.get(name, 0) + rows.sum(0)
        self.squares[name] = self.squares.get(name, 0) + (rows * rows).sum(0)

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / self.count[name]

    def std(self, name: str) -> torch.Tensor:
        return (self.squares[name] / self.count[name] - self.mean(name) ** 2).clamp(min=0).sqrt()


def biased_layers(unit: UnitMirror, plan: QuantPlan) -> list[BiasedLayer]:
    """The unit's quantized layers that have a bias, in graph order."""
    biases = {spec.node: spec.bias for spec in plan.weights if spec.bias is not None}
    return [BiasedLayer(call.name, outputs[0], biases[call.name]) for call, _, outputs in unit.calls
            if call.name in biases]


def correct_biases(mirror: NetworkMirror, plan: QuantPlan, images: np.ndarray, batch_size: int,
                   device: torch.device, cache: TensorCache) -> BiasCorrection:
    """Correct, in the mirror, the bias of every quantized layer that has one (see the module docstring)."""
    images = images[:CORRECTION_IMAGES]
    graph_inputs = cache.store_graph_inputs({mirror.input_names[0]: torch.from_numpy(images)})
    float_stream = TensorStream(mirror, cache, graph_inputs, batch_size)
    quantized_stream = TensorStream(mirror, cache, graph_inputs, batch_size)
    corrected = []
    for index, unit in enumerate(progress_bar(mirror.units, desc="bias correction", unit="unit", leave=False)):
        layers = biased_layers(unit, plan)
        reference = ChannelStatistics({layer.output for layer in layers})
        with unit.observing(reference.add):  # before this unit's biases change: still the float network
            float_stream.advance(index, unit, False, device)
        for layer in layers:
            quantized = quantized_statistics(unit, layer, quantized_stream.inputs_of(unit), device, batch_size)
            shift = quantized.mean(layer.output) - reference.mean(layer.output)
            with unit.quantization(True), torch.no_grad():
                measured = unit.read_constant(layer.bias)  # the bias as the quantized layer read it
            # a new tensor, not an in-place write: the mirrored constant shares the prepared model's memory
            unit.constant(layer.bias).data = measured - shift.to(measured.dtype)
            spread = float(reference.std(layer.output).square().mean().sqrt())
            corrected.append(CorrectedLayer(layer.node, layer.bias,
                                            round(float(shift.abs().max()) / max(spread, 1e-12), 4)))
        quantized_stream.advance(index, unit, True, device)
    return BiasCorrection(len(images), corrected)


def quantized_statistics(unit: UnitMirror, layer: BiasedLayer, inputs: list[CachedTensor], device: torch.device,
                         batch_size: int) -> ChannelStatistics:
    """The channel statistics of the layer's output in the quantized unit run on `inputs`."""
    statistics = ChannelStatistics({layer.output})
    with unit.observing(statistics.add), unit.quantization(True), torch.no_grad():
        for start in range(0, len(inputs[0]), batch_size):
            unit(*(t[start:start + batch_size].to(device) for t in inputs))  # only what it observes counts
    return statistics
