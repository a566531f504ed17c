"""`onnxmodcap analyze`: where quantization hurts, layer by layer and unit by unit.

The model is calibrated as `quantize` would (round to nearest on the initialised grids, no
reconstruction). Then, on up to ANALYSIS_IMAGES calibration images, the network's outputs are
compared with the float network's, output by output with the metrics validation reports, twice
for each part of the network:
- `only`: only that part's quantizers on, every other tensor in float (what the part costs alone);
- `all but`: every quantizer on except that part's (what keeping the part in float would recover).
A part is a weighted layer's weights (with its bias), one quantized activation (named by the
layers that read it), or a reconstruction unit (every quantizer inside it). Layers and units are ranked apart, each by the
SQNR of the first output with only that part quantized, lowest (most sensitive) first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import QuantizeConfig, check_options
from .files import check_writable_folder, write_atomically
from .metrics import OutputFidelity, fidelity
from .mirror import switched
from .pipeline import Simulation, plain, simulate
from .plot import plot_sensitivity
from .progress import progress_bar
from .run_state import isolated_run

ANALYSIS_IMAGES = 256
ANALYSIS_BATCH = 64  # images per forward pass: the mirror's per-node overhead dominates small inputs


@dataclass
class Part:
    """Quantizers that are switched together: a layer's weights or input activation, or a unit."""

    scope: str  # "layer" or "unit"
    name: str  # the layer (for an activation: the layers that read it) or the unit
    quantized: str  # "weights", "activations" or "weights and activations"
    bits: int | None  # the layer's weight or activation bits (None for a unit)
    quantizers: list[torch.nn.Module]


@dataclass
class Sensitivity:
    part: Part
    only: list[OutputFidelity]  # only this part quantized
    all_but: list[OutputFidelity]  # everything quantized except this part

    def to_dict(self) -> dict:
        return {"scope": self.part.scope, "name": self.part.name, "quantized": self.part.quantized,
                "bits": self.part.bits, "only": [o.to_dict() for o in self.only],
                "all_but": [o.to_dict() for o in self.all_but]}


@dataclass
class Analysis:
    model: str
    wbits: int
    abits: int
    images: int
    whole: list[OutputFidelity]  # every quantizer on: the round-to-nearest model
    parts: list[Sensitivity]

    def ranked(self, scope: str) -> list[Sensitivity]:
        """The layer or unit parts, most sensitive first: lowest SQNR of the first output with only
        the part quantized."""
        return sorted((s for s in self.parts if s.part.scope == scope), key=lambda s: s.only[0].sqnr_db)

    def to_dict(self) -> dict:
        return {"model": self.model, "wbits": self.wbits, "abits": self.abits, "images": self.images,
                "whole": [o.to_dict() for o in self.whole],
                "layers": [s.to_dict() for s in self.ranked("layer")],
                "units": [s.to_dict() for s in self.ranked("unit")]}

    def table(self, limit: int | None = None) -> str:
        """The rankings as text: SQNR of the first output, and top-1 agreement where it holds classes."""
        first = self.whole[0]
        classes = first.top1_agreement is not None
        lines = [f"{self.model}: W{self.wbits}A{self.abits}, round to nearest, {self.images} calibration images",
                 f"everything quantized: {first.text()}"]
        width = min(60, max(len(s.part.name) for s in self.parts))
        for scope, title in (("layer", "layers"), ("unit", "reconstruction units")):
            lines += ["", f"{title}, most sensitive first (only: only this part quantized; all but: everything "
                          "else quantized)",
                      f"{'rank':>4}  {'part':{width}}  {'quantized':11}  {'bits':>4}  {'only':>8}  {'all but':>8}"
                      + (f"  {'only':>7}  {'all but':>7}" if classes else "")]
            for rank, s in enumerate(self.ranked(scope)[:limit], 1):
                quantized = "both" if s.part.scope == "unit" else s.part.quantized
                name = s.part.name if len(s.part.name) <= width else s.part.name[:width - 1] + "…"
                line = (f"{rank:>4}  {name:{width}}  {quantized:11}  "
                        f"{'' if s.part.bits is None else s.part.bits:>4}  {s.only[0].sqnr_db:>5.1f} dB  "
                        f"{s.all_but[0].sqnr_db:>5.1f} dB")
                if classes:
                    line += f"  {s.only[0].top1_agreement:>7.1%}  {s.all_but[0].top1_agreement:>7.1%}"
                lines.append(line)
        if classes:
            lines.append("(SQNR of the first output; the last two columns: top-1 agreement with the float model)")
        else:
            lines.append("(SQNR of the first output)")
        return "\n".join(lines)


def analyze(model: str | os.PathLike, calib: str | os.PathLike, **options) -> Analysis:
    """Sensitivity of `model` to quantization; keyword options as in QuantizeConfig (the method is
    always round to nearest)."""
    config = QuantizeConfig(**{name: plain(name, value) for name, value in options.items()})
    config = replace(config, method="rtn", modcap=None)
    check_options(config)
    if config.report:
        check_writable_folder(Path(config.report), "report")
    device = torch.device(config.device)
    with isolated_run(config.seed, device):
        sim = simulate(Path(model), Path(calib), config, device)
        images = torch.from_numpy(sim.data.inputs[:ANALYSIS_IMAGES])
        with sim.mirror.quantization(False):
            reference = sim.mirror.outputs(images, device, ANALYSIS_BATCH)
        names = sim.mirror.output_names
        whole = fidelity(names, reference, sim.mirror.outputs(images, device, ANALYSIS_BATCH))
        results = []
        for part in progress_bar(parts_of(sim), desc="analyzing", unit="part", leave=False):
            with sim.mirror.quantization(False), switched(part.quantizers, "enabled", True):
                only = fidelity(names, reference, sim.mirror.outputs(images, device, ANALYSIS_BATCH))
            with switched(part.quantizers, "enabled", False):
                all_but = fidelity(names, reference, sim.mirror.outputs(images, device, ANALYSIS_BATCH))
            results.append(Sensitivity(part, only, all_but))
    analysis = Analysis(Path(model).name, config.weight_bits, config.activation_bits, len(images), whole, results)
    if config.report:
        write_report(analysis, Path(config.report))
    return analysis


def parts_of(sim: Simulation) -> list[Part]:
    """Each weighted layer's weights (with its bias), each quantized activation (named by the
    layers that read it), then each unit."""
    quantizers, parts = sim.quantizers, []
    for layer in sim.plan.weights:
        weights = [quantizers.weights[layer.tensor]]
        if layer.bias in quantizers.biases:
            weights.append(quantizers.biases[layer.bias])
        parts.append(Part("layer", layer.node, "weights", layer.bits, weights))
    for activation in sim.plan.activations:
        parts.append(Part("layer", ", ".join(activation.consumers), "activations", activation.bits,
                          [quantizers.activations[activation.tensor]]))
    for unit in sim.mirror.units:
        parts.append(Part("unit", unit.unit.name, "weights and activations", None, unit.quantizer_modules()))
    return parts


def write_report(analysis: Analysis, path: Path) -> None:
    """The JSON analysis at `path`, and beside it a PNG of the most sensitive layer parts."""
    write_atomically(path, json.dumps(analysis.to_dict(), indent=2).encode())
    plot_sensitivity(analysis, path.with_suffix(".png"))
