"""What reconstruction minimises and measures: a unit's output error, PD-Quant's prediction
difference and the statistics error of its distribution correction, and the per-unit losses that
the report and ModCap's data-dependent capacities are built from."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .mirror import NetworkMirror, UnitMirror, as_tuple

if TYPE_CHECKING:
    from .pdquant import FloatPredictions

LOSS_IMAGES = 256  # images on which the loss before and after each unit is measured


def output_error(outputs, targets) -> torch.Tensor:
    """Squared error summed over channels, averaged over batch and positions, summed over outputs."""
    total = 0.0
    for output, target in zip(as_tuple(outputs), targets):
        if output.dim() > 1:
            total = total + ChannelSquaredError.apply(output, target).mean()
        else:
            total = total + ((output - target) ** 2).mean()
    return total


class ChannelSquaredError(torch.autograd.Function):
    """((output - target) ** 2).sum(1), the same values both ways, with the gradient to the output
    in one full-size pass, (output - target) * 2 * grad. Autograd through that expression takes three
    (a copy of the difference and two products), which on a reconstruction unit's 32 x 32 x 120 x 120
    output is a tenth of an iteration."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        difference = output - target
        ctx.save_for_backward(difference)
        return (difference * difference).sum(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (difference,) = ctx.saved_tensors
        to_output = difference * (2 * grad).unsqueeze(1)
        return to_output, -to_output if ctx.needs_input_grad[1] else None


def unit_errors(mirror: NetworkMirror, inputs: np.ndarray, device: torch.device,
                batch_size: int = 32) -> list[float]:
    """Every unit's output error over `inputs`: the float unit on the float input against the
    quantized unit on the quantized input (the loss reconstruction lowers, seen whole-network).
    Batched, and each tensor is dropped once no later unit reads it, so that a large model's
    intermediate tensors are held for one batch and only while needed."""
    totals = [0.0] * len(mirror.units)
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = torch.from_numpy(inputs[start:start + batch_size]).to(device)
            float_env = {mirror.input_names[0]: batch}
            quantized_env = dict(float_env)
            for index, unit in enumerate(mirror.units):
                with unit.quantization(False):
                    float_outputs = as_tuple(unit(*(float_env[name] for name in unit.unit.inputs)))
                quantized_outputs = as_tuple(unit(*(quantized_env[name] for name in unit.unit.inputs)))
                totals[index] += float(output_error(quantized_outputs, float_outputs)) * len(batch)
                float_env.update(zip(unit.unit.outputs, float_outputs))
                quantized_env.update(zip(unit.unit.outputs, quantized_outputs))
                float_env, quantized_env = mirror.live_after(index, float_env), mirror.live_after(index, quantized_env)
    return [total / len(inputs) for total in totals]


def measure_loss(unit: UnitMirror, inputs, targets, device, batch_size: int = 32) -> float:
    """The unit's output error on the first LOSS_IMAGES images, a batch at a time: a unit holds
    every intermediate tensor until it returns, which for 256 images of a 224x224 model is several GB."""
    count = min(LOSS_IMAGES, len(inputs[0]))
    total = 0.0
    with torch.no_grad():
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            outputs = unit(*(t[start:stop].to(device) for t in inputs))
            total += float(output_error(outputs, [t[start:stop].to(device) for t in targets])) * (stop - start)
    return total / count


def statistics_error(values: dict[str, torch.Tensor], targets: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Squared distance of each image's per-channel mean and std to the BN statistics, summed over
    channels and tensors, averaged over images."""
    total = 0.0
    for name, value in values.items():
        if value.dim() < 3:
            continue
        mean, variance = ChannelMoments.apply(value.flatten(2))
        std = torch.sqrt(variance + 1e-6)
        target_mean, target_std = targets[name]
        total = total + ((mean - target_mean) ** 2).sum() / len(value) + ((std - target_std) ** 2).sum() / len(value)
    return total


class ChannelMoments(torch.autograd.Function):
    """Mean and unbiased variance over the last axis of an images x channels x positions tensor:
    two reductions forward, one fused pass backward. torch's own var and its backward were the
    largest item of distribution correction's time (docs/benchmarks/modcap.md,
    "torch's var was the largest cost of distribution correction")."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor):
        length = flat.shape[2]
        total = flat.sum(2)
        mean = total / length
        variance = ((torch.linalg.vector_norm(flat, dim=2).square() - total * mean) / (length - 1)).clamp_min(0)
        ctx.save_for_backward(flat, mean)
        return mean, variance

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_variance: torch.Tensor):
        flat, mean = ctx.saved_tensors
        length = flat.shape[2]
        # d mean/dx = 1/L, d variance/dx = 2 (x - mean)/(L - 1)
        slope = 2 * grad_variance / (length - 1)
        offset = grad_mean / length - slope * mean
        return torch.addcmul(offset.unsqueeze(2), flat, slope.unsqueeze(2))


def prediction_difference(outputs: dict[str, torch.Tensor], float_outputs: dict[str, torch.Tensor],
                          predicted: FloatPredictions, temperature: float) -> torch.Tensor:
    """`kl`: KL(softmax(float / T) || softmax(quantized / T)) of each output's class scores, averaged
    over images. `mse`: each output's mean squared error over its float variance. Summed over outputs."""
    total = 0.0
    for name, output in outputs.items():
        target, variance = float_outputs[name], predicted.variances[name]
        if predicted.objective == "kl":
            total = total + F.kl_div(F.log_softmax(output.flatten(1) / temperature, 1),
                                     F.softmax(target.flatten(1) / temperature, 1), reduction="batchmean")
        else:
            total = total + F.mse_loss(output, target) / variance
    return total
