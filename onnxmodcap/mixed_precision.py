"""`quantize --mixed-precision BUDGET`: per-layer weight widths that meet a size budget with the
least predicted loss of fidelity.

The budget is an average number of weight bits over the quantized layers (`4.5`) or a size of
the quantized weights with its unit (`3MB`, `2.5MiB`, `800kB`). Layers whose widths come from
--overrides, and the first and last layers kept at 8 bits, keep them; every other layer gets one of
WIDTHS. Activations keep --abits.

The prediction is measured, as `analyze` measures a layer: on SEARCH_IMAGES calibration images,
with only one layer's weights quantized at one width (round to nearest on a freshly initialised
grid) and everything else in float, the quantization noise of the network's outputs relative to
their power (10^(-SQNR/10), averaged over outputs). Noise of different layers is taken to add up.
Starting from every free layer at the widest width, a greedy search lowers, step by step, the
layer whose next narrower width adds the least noise per bit saved, until the budget is met.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .calibrate import weight_quantizer
from .config import MIXED_PRECISION_WIDTHS as WIDTHS
from .config import Budget
from .errors import UserError
from .metrics import fidelity
from .mirror import NetworkMirror, switched
from .plan import LayerBits, QuantPlan, WeightPlan
from .progress import progress_bar
from .quantizers import BiasQuantizer, QuantizerSet

log = logging.getLogger(__name__)

SEARCH_IMAGES = 32


@dataclass
class MixedPrecision:
    """The search's choice, for the report: each free layer's width and what it predicted."""

    budget: str
    budget_bits: float
    weight_bits: float  # of the chosen plan, every quantized layer
    average_bits: float
    widths: dict[str, int]  # free layers only
    pinned: dict[str, int]  # layers whose widths were given
    predicted_noise: float  # relative output noise, summed over layers

    def to_dict(self) -> dict:
        return asdict(self)

    def overrides(self, abits: int) -> dict[str, LayerBits]:
        """--overrides entries that give every free layer its width (node names matched exactly)."""
        return {re.escape(node): LayerBits(bits, abits) for node, bits in self.widths.items()}


def choose_widths(budget: Budget, plan: QuantPlan, mirror: NetworkMirror, quantizers: QuantizerSet,
                  images: np.ndarray, parameters: dict[str, int], method: str, device: torch.device) -> MixedPrecision:
    """The widths of the free layers of `plan` (calibrated as `quantizers`) that meet `budget`."""
    free = [w for w in plan.weights if not w.pinned]
    pinned_bits = sum(parameters[w.tensor] * w.bits for w in plan.weights if w.pinned)
    total = sum(parameters[w.tensor] for w in plan.weights)
    allowed = budget.bits(total) - pinned_bits
    lowest = sum(parameters[w.tensor] * WIDTHS[0] for w in free)
    highest = sum(parameters[w.tensor] * WIDTHS[-1] for w in free)
    if not free:
        raise UserError("--mixed-precision: every quantized layer's width is given (--overrides, first and last "
                        "layers): nothing to choose")
    if allowed < lowest:
        raise UserError(f"--mixed-precision {budget.text} is below what {WIDTHS[0]}-bit weights everywhere give "
                        f"({describe(lowest + pinned_bits, total)})")
    if allowed >= highest:
        raise UserError(f"--mixed-precision {budget.text} is at or above what {WIDTHS[-1]}-bit weights everywhere "
                        f"give ({describe(highest + pinned_bits, total)}): use --wbits 8")
    noise = layer_noise(free, plan, mirror, quantizers, images, method, device)
    widths = {w.node: len(WIDTHS) - 1 for w in free}  # indices into WIDTHS
    size = highest
    while size > allowed:
        def cost(layer: WeightPlan) -> float:
            index = widths[layer.node]
            saved = parameters[layer.tensor] * (WIDTHS[index] - WIDTHS[index - 1])
            return (noise[layer.node][index - 1] - noise[layer.node][index]) / saved

        layer = min((w for w in free if widths[w.node] > 0), key=cost)
        size -= parameters[layer.tensor] * (WIDTHS[widths[layer.node]] - WIDTHS[widths[layer.node] - 1])
        widths[layer.node] -= 1
    chosen = {node: WIDTHS[index] for node, index in widths.items()}
    weight_bits = size + pinned_bits
    log.info("--mixed-precision %s: %s, average %.2f weight bits", budget.text, describe(weight_bits, total),
             weight_bits / total)
    return MixedPrecision(budget.text, budget.bits(total), weight_bits, round(weight_bits / total, 3), chosen,
                          {w.node: w.bits for w in plan.weights if w.pinned},
                          float(sum(noise[node][index] for node, index in widths.items())))


def describe(weight_bits: float, parameters: int) -> str:
    return f"{weight_bits / 8 / 1e6:.3f} MB of weights, {weight_bits / parameters:.2f} bits on average"


def layer_noise(free: list[WeightPlan], plan: QuantPlan, mirror: NetworkMirror, quantizers: QuantizerSet,
                images: np.ndarray, method: str, device: torch.device) -> dict[str, list[float]]:
    """For each free layer and each of WIDTHS, the relative output noise with only that layer's
    weights quantized at that width."""
    weights = mirror.constants()
    batch = torch.from_numpy(images)
    with mirror.quantization(False):
        reference = mirror.outputs(batch, device)
    noise = {w.node: [0.0] * len(WIDTHS) for w in free}
    try:
        for layer in progress_bar(free, desc="measuring layer sensitivity", unit="layer", leave=False):
            for index, bits in enumerate(WIDTHS):
                trial = weight_quantizer(weights[layer.tensor], layer, bits, plan, method)
                variant = QuantizerSet({**quantizers.weights, layer.tensor: trial}, quantizers.activations,
                                       dict(quantizers.biases))
                switched_on = [trial]
                if layer.bias is not None:
                    variant.biases[layer.bias] = BiasQuantizer(quantizers.activations[layer.input], trial)
                    switched_on.append(variant.biases[layer.bias])
                mirror.attach(variant)
                with mirror.quantization(False), switched(switched_on, "enabled", True):
                    outputs = mirror.outputs(batch, device)
                names = mirror.output_names
                noise[layer.node][index] = float(np.mean([10 ** (-o.sqnr_db / 10)
                                                          for o in fidelity(names, reference, outputs)]))
    finally:
        mirror.attach(quantizers)
    return noise
