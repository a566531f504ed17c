"""`quantize --mixed-precision BUDGET`: per-layer widths that meet a budget with the least predicted
loss of fidelity.

Three kinds of budget:
- average weight bits over the quantized layers (`4.5`), or a size of the quantized weights with
  its unit (`3MB`, `2.5MiB`, `800kB`): each free layer gets a weight width from WIDTHS, and
  activations keep --abits;
- bit operations per image (`20GBOPs`): the sum over quantized layers of multiply-accumulates x
  weight bits x input activation bits, at the calibration input size. Weight widths and, with the
  ONNX Runtime target, the widths of the activation tensors that only free layers read are chosen
  together, from WIDTHS (the TensorRT target keeps --abits: its int8 kernels take 8-bit inputs).

Layers whose widths come from --overrides, and the first and last layers kept at 8 bits, keep them;
so does every activation tensor that one of them reads.

The prediction is measured, as `analyze` measures a layer: on SEARCH_IMAGES calibration images,
with only one layer's weights (or one activation tensor) quantized at one width (round to nearest
on a freshly initialised grid) and everything else in float, the quantization noise of the
network's outputs relative to their power (10^(-SQNR/10), averaged over outputs). Noise of
different choices is taken to add up. Starting from every free width at 8 bits, a greedy search
lowers, step by step, the width whose next narrower step adds the least noise per unit of budget
saved, until the budget is met.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch

from .calibrate import ActivationStats, activation_quantizer, weight_quantizer
from .config import MIXED_PRECISION_WIDTHS as WIDTHS
from .config import Budget
from .errors import UserError
from .graph import initializer_sizes
from .metrics import fidelity
from .mirror import NetworkMirror, switched
from .plan import LayerBits, QuantPlan, WeightPlan
from .progress import progress_bar
from .quantizers import BiasQuantizer, Quantizer, QuantizerSet

log = logging.getLogger(__name__)

SEARCH_IMAGES = 32


@dataclass
class MixedPrecision:
    """The search's choice, for the report: each free width and what it predicted."""

    budget: str
    budget_value: float  # in the budget's own measure: weight bits, or bit operations per image
    weight_bits: float  # of the chosen plan, every quantized layer
    average_bits: float
    bit_operations: float  # per image, every quantized layer: MACs x weight bits x input activation bits
    widths: dict[str, int]  # free layers' weights, by node
    activation_widths: dict[str, int]  # free activation tensors (bit-operation budgets only), by tensor
    pinned: dict[str, int]  # layers whose widths were given
    predicted_noise: float  # relative output noise, summed over the choices

    def to_dict(self) -> dict:
        return asdict(self)

    def overrides(self, plan: QuantPlan) -> dict[str, LayerBits]:
        """--overrides entries that give every free layer its widths (node names matched exactly)."""
        inputs = {w.node: w.input for w in plan.weights}
        activation_bits = {a.tensor: a.bits for a in plan.activations}
        return {re.escape(node): LayerBits(bits, self.activation_widths.get(inputs[node], activation_bits[inputs[node]]))
                for node, bits in self.widths.items()}


@dataclass
class Choice:
    """One width the search sets: a free layer's weights (`layer`) or a free activation tensor."""

    name: str  # the layer's node, or the activation tensor
    layer: WeightPlan | None
    noise: list[float]  # relative output noise at each of WIDTHS, with only this quantized
    index: int = len(WIDTHS) - 1  # into WIDTHS


@dataclass
class Costs:
    """What budgets count: weight bits, or bit operations per image."""

    parameters: dict[str, int]  # weight elements, by weight tensor
    macs: dict[str, float]  # multiply-accumulates per image, by layer node

    def layer(self, layer: WeightPlan, wbits: int, abits: int, operations: bool) -> float:
        if operations:
            return self.macs[layer.node] * wbits * abits
        return self.parameters[layer.tensor] * wbits

    def total(self, plan: QuantPlan, wbits: dict[str, int], abits: dict[str, int], operations: bool) -> float:
        return sum(self.layer(w, wbits[w.node], abits[w.input], operations) for w in plan.weights)


def choose_widths(budget: Budget, plan: QuantPlan, mirror: NetworkMirror, quantizers: QuantizerSet,
                  stats: dict[str, ActivationStats], images: np.ndarray, model: onnx.ModelProto, method: str,
                  device: torch.device) -> MixedPrecision:
    """The widths of the free layers (and activations) of `plan`, calibrated as `quantizers`, that meet `budget`."""
    free_layers = [w for w in plan.weights if not w.pinned]
    if not free_layers:
        raise UserError("--mixed-precision: every quantized layer's width is given (--overrides, first and last "
                        "layers): nothing to choose")
    operations = budget.bit_operations is not None
    costs = Costs(initializer_sizes(model), layer_macs(model, plan, mirror, images[:1], device))
    readers = layer_readers(plan)
    free_names = {w.node for w in free_layers}
    # an activation width is free where every reader of the tensor is a free layer (not the output
    # quantizer ONNX Runtime needs after an 8-bit Conv, which plan.py lists with the Conv as consumer)
    free_activations = [a.tensor for a in plan.activations if operations and plan.target == "ort"
                        and a.tensor in readers and set(a.consumers) <= free_names]
    wbits = {w.node: w.bits for w in plan.weights}
    abits = {a.tensor: a.bits for a in plan.activations}
    parameters = sum(costs.parameters[w.tensor] for w in plan.weights)
    allowed = budget.value(parameters)

    def everywhere(width: int) -> float:
        return costs.total(plan, {**wbits, **dict.fromkeys(free_names, width)},
                           {**abits, **dict.fromkeys(free_activations, width)}, operations)

    what = "widths" if free_activations else "weights"
    lowest, highest = everywhere(WIDTHS[0]), everywhere(WIDTHS[-1])
    if allowed < lowest:
        raise UserError(f"--mixed-precision {budget.text} is below what {WIDTHS[0]}-bit {what} everywhere give "
                        f"({describe(lowest, operations, parameters)})")
    if allowed >= highest:
        raise UserError(f"--mixed-precision {budget.text} is at or above what {WIDTHS[-1]}-bit {what} everywhere "
                        f"give ({describe(highest, operations, parameters)}): use "
                        f"{'--bits 8' if free_activations else '--wbits 8'}")
    choices = measure_noise(free_layers, free_activations, plan, mirror, quantizers, stats, images, method, device)
    for choice in choices:
        (abits if choice.layer is None else wbits)[choice.name] = WIDTHS[-1]
    lower_widths(choices, plan, readers, costs, operations, wbits, abits, allowed)
    weight_bits = costs.total(plan, wbits, abits, operations=False)
    mixed = MixedPrecision(
        budget.text, allowed, weight_bits, round(weight_bits / parameters, 3),
        costs.total(plan, wbits, abits, operations=True),
        {c.name: WIDTHS[c.index] for c in choices if c.layer is not None},
        {c.name: WIDTHS[c.index] for c in choices if c.layer is None},
        {w.node: w.bits for w in plan.weights if w.pinned}, float(sum(c.noise[c.index] for c in choices)))
    log.info("--mixed-precision %s: %s", budget.text, describe(mixed.bit_operations, True, parameters, weight_bits)
             if operations else describe(weight_bits, False, parameters))
    return mixed


def layer_readers(plan: QuantPlan) -> dict[str, list[WeightPlan]]:
    """The quantized layers that read each activation tensor."""
    readers = {}
    for layer in plan.weights:
        readers.setdefault(layer.input, []).append(layer)
    return readers


def lower_widths(choices: list[Choice], plan: QuantPlan, readers: dict[str, list[WeightPlan]], costs: Costs,
                 operations: bool, wbits: dict[str, int], abits: dict[str, int], allowed: float) -> None:
    """The greedy search: narrow the cheapest width (noise added per unit of budget saved) until the
    budget holds."""
    def saving(choice: Choice) -> float:
        narrower = WIDTHS[choice.index - 1]
        if choice.layer is not None:
            layer = choice.layer
            return (costs.layer(layer, wbits[layer.node], abits[layer.input], operations)
                    - costs.layer(layer, narrower, abits[layer.input], operations))
        return sum(costs.layer(layer, wbits[layer.node], abits[choice.name], operations)
                   - costs.layer(layer, wbits[layer.node], narrower, operations) for layer in readers[choice.name])

    def cost(choice: Choice) -> float:
        added = choice.noise[choice.index - 1] - choice.noise[choice.index]
        return added / max(saving(choice), 1e-30)

    narrowable = [c for c in choices if c.index > 0]
    while narrowable and costs.total(plan, wbits, abits, operations) > allowed:
        choice = min(narrowable, key=cost)
        choice.index -= 1
        (abits if choice.layer is None else wbits)[choice.name] = WIDTHS[choice.index]
        narrowable = [c for c in choices if c.index > 0]


def describe(value: float, operations: bool, parameters: int, weight_bits: float | None = None) -> str:
    """A budget's measure in words (and the weight size, for bit operations)."""
    if not operations:
        return f"{value / 8 / 1e6:.3f} MB of weights, {value / parameters:.2f} bits on average"
    text = f"{value / 1e9:.3f} GBOPs per image" if value >= 1e9 else f"{value / 1e6:.3f} MBOPs per image"
    if weight_bits is not None:
        text += f", {weight_bits / 8 / 1e6:.3f} MB of weights, {weight_bits / parameters:.2f} bits on average"
    return text


def layer_macs(model: onnx.ModelProto, plan: QuantPlan, mirror: NetworkMirror, image: np.ndarray,
               device: torch.device) -> dict[str, float]:
    """Multiply-accumulates per image of every quantized layer, running `image` (one image) through the mirror."""
    nodes = {n.name: n for n in model.graph.node}
    elements = {mirror.input_names[0]: image.size}

    def observe(name: str, value: torch.Tensor) -> None:
        elements[name] = value.numel()

    with mirror.observing(observe), mirror.quantization(False), torch.no_grad():
        mirror(torch.from_numpy(image).to(device))
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    macs = {}
    for layer in plan.weights:
        node, shape = nodes[layer.node], shapes[layer.tensor]
        size = int(np.prod(shape))
        if node.op_type == "ConvTranspose":  # every input element meets (C_out / group) x kernel weights
            macs[layer.node] = elements[node.input[0]] * size / shape[0]
        elif node.op_type in ("Conv", "Gemm"):  # each output element sums over one output channel's weights
            macs[layer.node] = elements[node.output[0]] * size / shape[layer.axis]
        elif layer.axis is None:  # MatMul, constant on the left (..., M, K): sums over its last axis
            macs[layer.node] = elements[node.output[0]] * shape[-1]
        else:  # MatMul, constant on the right (..., K, N) or (K,): sums over K
            macs[layer.node] = elements[node.output[0]] * (shape[-2] if len(shape) > 1 else shape[0])
    return macs


def measure_noise(layers: list[WeightPlan], activations: list[str], plan: QuantPlan, mirror: NetworkMirror,
                  quantizers: QuantizerSet, stats: dict[str, ActivationStats], images: np.ndarray, method: str,
                  device: torch.device) -> list[Choice]:
    """For each free layer's weights and each free activation tensor, the relative output noise at
    each of WIDTHS with only it quantized."""
    weights = mirror.constants()
    batch = torch.from_numpy(images)
    with mirror.quantization(False):
        reference = mirror.outputs(batch, device)

    def noise(variant: QuantizerSet, switched_on: list) -> float:
        mirror.attach(variant)
        with mirror.quantization(False), switched(switched_on, "enabled", True):
            outputs = mirror.outputs(batch, device)
        return float(np.mean([10 ** (-o.sqnr_db / 10) for o in fidelity(mirror.output_names, reference, outputs)]))

    def layer_noise(layer: WeightPlan, bits: int) -> float:
        trial = weight_quantizer(weights[layer.tensor], layer, bits, plan, method)
        variant = QuantizerSet({**quantizers.weights, layer.tensor: trial}, quantizers.activations, dict(quantizers.biases))
        switched_on: list = [trial]
        if layer.bias is not None:
            variant.biases[layer.bias] = BiasQuantizer(quantizers.activations[layer.input], trial)
            switched_on.append(variant.biases[layer.bias])
        return noise(variant, switched_on)

    def activation_noise(tensor: str, bits: int) -> float:
        trial: Quantizer = activation_quantizer(stats[tensor], plan.target, bits, method).to(device)
        return noise(QuantizerSet(quantizers.weights, {**quantizers.activations, tensor: trial}, quantizers.biases),
                     [trial])

    choices = []
    try:
        for layer in progress_bar(layers, desc="measuring layer sensitivity", unit="layer", leave=False):
            choices.append(Choice(layer.node, layer, [layer_noise(layer, bits) for bits in WIDTHS]))
        for tensor in progress_bar(activations, desc="measuring activation sensitivity", unit="tensor", leave=False):
            choices.append(Choice(tensor, None, [activation_noise(tensor, bits) for bits in WIDTHS]))
    finally:
        mirror.attach(quantizers)
    return choices
