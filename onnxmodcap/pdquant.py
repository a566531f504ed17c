"""PD-Quant adds, on top of QDrop, the prediction difference: the unit's output on the quantized input
(no drop at the unit's input; the quantizers inside the unit drop as in the rest of the batch) is
carried through the rest of the network in float to the outputs, and the prediction difference
divided by lambda_r joins the objective. Where every graph output holds class scores (a classifier)
that is KL(softmax(z_float / T) || softmax(z / T)), as published; for any other outputs (a
detector's maps, a text recogniser's sequence) it is the squared error between float and quantized
outputs, each divided by the variance of the float output over the calibration images, summed over
outputs (`PREDICTION_OBJECTIVES`). Before a unit is trained,
its float input is corrected (distribution correction): Adam moves it so that, image by image, the
per-channel mean and std of every BatchNormalization inside the unit match that BN's running
statistics, with a penalty ||X_c - X||^2 / lambda_c; X_c then replaces the float input, and the float
unit's output on X_c becomes the target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from .losses import output_error, statistics_error
from .metrics import output_kind
from .mirror import NetworkMirror, UnitMirror, as_tuple
from .prepare import PreparedModel
from .recipes import ReconstructionSettings
from .tensor_cache import CachedTensor, TensorCache, TensorStream, UnitData, image_layout, run_in_batches

CORRECTION_BATCH = 256  # images whose inputs distribution correction optimises at once (each on its own)


PREDICTION_OBJECTIVES = {
    "kl": "KL divergence of the class scores (every output holds class scores)",
    "mse": "squared error of every output, each divided by its float variance",
}


@dataclass
class Prediction:
    """What PD-Quant needs beyond the quantized mirror: the float network (the same units, no
    quantizers), the target statistics of each folded BatchNormalization output, and the
    prediction difference's objective (a key of PREDICTION_OBJECTIVES)."""

    float_mirror: NetworkMirror
    bn_targets: dict[str, tuple[torch.Tensor, torch.Tensor]]
    objective: str


def prediction_objective(float_mirror: NetworkMirror, inputs: np.ndarray, device: torch.device) -> str:
    """`kl` where the float network's every output holds class scores on `inputs`, else `mse`."""
    with torch.no_grad():
        outputs = float_mirror(torch.from_numpy(inputs).to(device))
    return "kl" if all(output_kind(o.float().cpu().numpy()) == "classes" for o in outputs) else "mse"


def batchnorm_targets(stats: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, std) the folded Conv output should have. Matching the BN input to the
    running mean and sqrt(var + eps), as PD-Quant does, is the same as matching the folded output
    (x - mean) * scale / sqrt(var + eps) + bias to mean `bias` and std |scale|."""
    return {name: (torch.from_numpy(np.asarray(s.bias, np.float32)), torch.from_numpy(np.abs(s.scale).astype(np.float32)))
            for name, s in stats.items()}


@dataclass
class FloatPredictions:
    """The float network's outputs on every calibration image (the targets of the prediction
    difference) and each output's variance over them, by output name, and the objective."""

    outputs: dict[str, CachedTensor]
    variances: dict[str, float]
    objective: str


def float_predictions(prediction: Prediction, inputs: np.ndarray, cache: TensorCache, device: torch.device,
                      batch_size: int) -> FloatPredictions:
    float_mirror = prediction.float_mirror
    batches = run_in_batches(float_mirror, [CachedTensor(torch.from_numpy(inputs))], device, batch_size)
    outputs = cache.store(batches, len(inputs))
    variances = [float(torch.as_tensor(np.asarray(o.data), dtype=torch.float64).var()) or 1.0 for o in outputs]
    return FloatPredictions(dict(zip(float_mirror.output_names, outputs)),
                            dict(zip(float_mirror.output_names, variances)), prediction.objective)


class FloatRest:
    """The float network after one unit: carries that unit's outputs on to the graph outputs."""

    def __init__(self, float_mirror: NetworkMirror, index: int, tensors: dict[str, CachedTensor],
                 predicted: FloatPredictions, device: torch.device):
        """`tensors`: what the float network holds after unit `index` (its outputs and every tensor a
        later unit reads), rows aligned with `predicted`."""
        self.network, self.index = float_mirror, index
        self.units = list(float_mirror.units[index + 1:])
        self.outputs = float_mirror.units[index].unit.outputs
        self.others = {name: t for name, t in tensors.items() if name not in self.outputs}
        produced = {name for unit in float_mirror.units[index:] for name in unit.unit.outputs}
        self.reached = [name for name in float_mirror.output_names if name in produced]  # what the unit can change
        self.predicted = predicted
        self.device = device

    def __call__(self, outputs: tuple[torch.Tensor, ...], picks: torch.Tensor) -> dict[str, torch.Tensor]:
        """The graph outputs that the unit's outputs reach, by name."""
        env = {name: image_layout(t[picks].to(self.device)) for name, t in self.others.items()}
        env.update(zip(self.outputs, map(image_layout, outputs)))
        for later, unit in enumerate(self.units, self.index + 1):
            env.update(zip(unit.unit.outputs, as_tuple(unit(*(env[name] for name in unit.unit.inputs)))))
            env = self.network.live_after(later, env)
        return {name: env[name] for name in self.reached}


def prediction_data(data: UnitData, prediction: Prediction, index: int, stream: TensorStream,
                    predicted: FloatPredictions, settings: ReconstructionSettings, device: torch.device,
                    cache: TensorCache) -> UnitData:
    started = time.monotonic()
    float_unit = prediction.float_mirror.units[index]
    rest = FloatRest(prediction.float_mirror, index, stream.tensors, predicted, device)
    if not settings.dc:
        return replace(data, rest=rest, correction="off (--no-dc)")
    corrected, correction = correct_distribution(float_unit, data.float_inputs, prediction.bn_targets, settings,
                                                 device, cache)
    if corrected is None:
        return replace(data, rest=rest, correction=correction)
    targets = cache.store(run_in_batches(float_unit, corrected, device, settings.batch_size),
                          len(corrected[0]))
    return replace(data, float_inputs=corrected, targets=targets, rest=rest, correction=correction,
                   correction_seconds=round(time.monotonic() - started, 2), temporary=[*corrected, *targets])


def correct_distribution(float_unit: UnitMirror, float_inputs: list[CachedTensor],
                         bn_targets: dict[str, tuple[torch.Tensor, torch.Tensor]], settings: ReconstructionSettings,
                         device: torch.device, cache: TensorCache) -> tuple[list[CachedTensor] | None, str]:
    """PD-Quant's distribution correction of the unit's float input, image by image. A ModCap group
    is left as it is: pulling one input toward the BN statistics of two or three units at once
    moved it far enough to cost the shipped RegNetX 0.8 to 1.2 points (docs/benchmarks/modcap.md,
    "Distribution correction on ModCap groups hurts RegNetX")."""
    if float_unit.unit.group_size > 1:
        return None, "skipped: a ModCap group"
    produced = {name for _, _, outputs in float_unit.calls for name in outputs}
    watched = {name: (mean.to(device), std.to(device)) for name, (mean, std) in bn_targets.items() if name in produced}
    if len(float_inputs) != 1:
        return None, "skipped: the unit has several inputs"
    if not watched:
        return None, "skipped: no BatchNormalization statistics inside the unit"
    seen: dict[str, torch.Tensor] = {}

    def corrected_batches():
        with float_unit.observing(lambda name, value: seen.__setitem__(name, value) if name in watched else None):
            for start in range(0, len(float_inputs[0]), CORRECTION_BATCH):
                original = float_inputs[0][start:start + CORRECTION_BATCH].to(device)
                corrected = original.clone().requires_grad_(True)
                optimizer = torch.optim.Adam([corrected], lr=settings.correction_lr, fused=True)
                plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=100, min_lr=1e-5)
                for _ in range(settings.correction_steps):
                    seen.clear()
                    float_unit(corrected)
                    loss = statistics_error(seen, watched) + output_error(corrected, [original]) / settings.dc_lambda
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    plateau.step(loss.item())
                yield (corrected.detach().cpu(),)

    corrected = cache.store(corrected_batches(), len(float_inputs[0]))
    return corrected, f"applied ({len(watched)} BatchNormalization statistics)"


def prediction_inputs(prepared: PreparedModel, mirror: NetworkMirror, device: torch.device,
                      objective: str) -> Prediction:
    """The float counterpart of `mirror`'s units (ModCap groups included) and the BN targets."""
    float_mirror = NetworkMirror(prepared, [unit.unit for unit in mirror.units]).eval().to(device)
    return Prediction(float_mirror, batchnorm_targets(prepared.bn_stats), objective)


def distribution_correction(prepared: PreparedModel, settings: ReconstructionSettings) -> str:
    """What distribution correction will do in this run, for the report."""
    if not settings.dc:
        return "off (--no-dc)"
    if not prepared.bn_stats:
        return ("skipped: the graph has no BatchNormalization statistics (BN was folded before export), "
                "so PD-Quant runs without it")
    return f"on: {len(prepared.bn_stats)} BatchNormalization statistics recorded by prepare"
