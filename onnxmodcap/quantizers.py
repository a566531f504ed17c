"""Fake quantizers and their scale initialisers (min-max, percentile, Lp grid search).

x_int = clamp(round(x / s) + z, qmin, qmax); x_hat = (x_int - z) * s, with round half to even as
torch.round and ONNX QuantizeLinear both do. Weights carry one (s, z) per output channel along
`axis`; activations one per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

LP_NORM = 2.4
SEARCH_STEPS = 100
PERCENTILE = 99.99
INIT_METHODS = ("lp", "minmax", "percentile")
MIN_SCALE = 1e-8  # the scale of an all-zero channel or a constant-zero activation


@dataclass(frozen=True)
class Grid:
    """An integer grid. `fixed_zero` grids (symmetric or unsigned) keep the zero point at 0."""

    bits: int
    qmin: int
    qmax: int
    fixed_zero: bool

    @classmethod
    def asymmetric(cls, bits: int) -> Grid:
        return cls(bits, 0, 2**bits - 1, False)

    @classmethod
    def signed(cls, bits: int) -> Grid:
        return cls(bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, True)

    @classmethod
    def unsigned(cls, bits: int) -> Grid:
        return cls(bits, 0, 2**bits - 1, True)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid) -> torch.Tensor:
    return (integers(x, scale, zero_point, grid) - zero_point) * scale


def integers(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale) + zero_point, grid.qmin, grid.qmax)


ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x in the forward pass; its gradient multiplied by `factor` (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


def drop_mix(quantized: torch.Tensor, float_value: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """QDrop: each element keeps its quantized value with probability `keep_prob`, else its float value.
    (Arithmetic blend rather than torch.where: the same values and gradients, about half the cost.)"""
    keep = (torch.rand_like(quantized) < keep_prob).to(quantized.dtype)
    return float_value + (quantized - float_value) * keep


class Quantizer(nn.Module):
    """Per-tensor (axis None) or per-channel fake quantizer.

    States used by reconstruction, all off after calibration:
    - `learning`: straight-through rounding and an LSQ-scaled gradient for `scale`;
    - `alpha` (weights): AdaRound's rounding variables; soft until `hard_rounding` is set;
    - `drop_prob`: QDrop, each element keeps its quantized value with this probability, else its float value;
    - `enabled` False: the identity (the float model).
    """

    def __init__(self, grid: Grid, channels: int = 1, axis: int | None = None):
        super().__init__()
        self.grid = grid
        self.axis = axis
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(channels))
        self.alpha: nn.Parameter | None = None
        self.hard_rounding = False
        self.learning = False
        self.drop_prob = 0.0
        self.enabled = True

    def broadcast(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return values.reshape(())
        shape = [1] * like.dim()
        shape[self.axis % like.dim()] = -1
        return values.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        scale, zero_point = self.broadcast(self.scale, x), self.broadcast(self.zero_point, x)
        if self.learning and self.alpha is None:
            scale = scale_gradient(scale, 1.0 / math.sqrt(x[0].numel() * self.grid.qmax))
            x_int = torch.clamp(round_ste(x / scale) + zero_point, self.grid.qmin, self.grid.qmax)
        else:
            x_int = self.integer_values(x, scale, zero_point)
        quantized = (x_int - zero_point) * scale
        return drop_mix(quantized, x, self.drop_prob) if self.drop_prob else quantized

    def integer_values(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        if self.alpha is None:
            return integers(x, scale, zero_point, self.grid)
        rounding = (self.alpha >= 0).to(x.dtype) if self.hard_rounding else rectified_sigmoid(self.alpha)
        return torch.clamp(torch.floor(x / scale) + rounding + zero_point, self.grid.qmin, self.grid.qmax)

    def quantized_integers(self, x: torch.Tensor) -> torch.Tensor:
        """x_int - z: the values the exported int8/uint8 container holds when its zero point is 0."""
        scale, zero_point = self.broadcast(self.scale, x), self.broadcast(self.zero_point, x)
        return self.integer_values(x, scale, zero_point) - zero_point

    def initialise(self, samples: torch.Tensor, method: str) -> None:
        """Set scale and zero point from `samples` shaped (channels, values)."""
        scale, zero_point = choose_range(samples.float(), self.grid, method)
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)

    def start_adaround(self, weight: torch.Tensor) -> None:
        """AdaRound variables that start where the soft rounding equals frac(weight / scale)."""
        scaled = weight.detach() / self.broadcast(self.scale, weight).detach()
        fraction = scaled - torch.floor(scaled)
        alpha = -torch.log((ZETA - GAMMA) / (fraction - GAMMA) - 1)
        self.alpha = nn.Parameter(alpha)
        self.hard_rounding = False

    def rounding_loss(self, beta: float) -> torch.Tensor:
        return (1 - (2 * rectified_sigmoid(self.alpha) - 1).abs().pow(beta)).sum()


def choose_range(samples: torch.Tensor, grid: Grid, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) per row of `samples`."""
    if method == "percentile":
        low = torch.quantile(samples, 1 - PERCENTILE / 100, dim=1)
        high = torch.quantile(samples, PERCENTILE / 100, dim=1)
        return range_to_grid(low, high, grid)
    low, high = samples.amin(dim=1), samples.amax(dim=1)
    if method == "minmax":
        return range_to_grid(low, high, grid)
    if method != "lp":
        raise ValueError(f"unknown initialisation {method!r}")
    return lp_search(samples, low, high, grid)


def range_to_grid(low: torch.Tensor, high: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and integer zero point that cover [low, high] (always including 0)."""
    low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
    if grid.fixed_zero and grid.qmin < 0:
        scale = torch.maximum(-low / -grid.qmin, high / grid.qmax)
    elif grid.fixed_zero:
        scale = high / grid.qmax
    else:
        scale = (high - low) / (grid.qmax - grid.qmin)
    scale = torch.clamp(scale, min=MIN_SCALE)
    if grid.fixed_zero:
        return scale, torch.zeros_like(scale)
    zero_point = torch.clamp(torch.round(grid.qmin - low / scale), grid.qmin, grid.qmax)
    return scale, zero_point


def lp_search(samples, low, high, grid, p: float = LP_NORM) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink the min-max range in SEARCH_STEPS steps; keep, per row, the one with the least Lp error."""
    best_scale, best_zero = range_to_grid(low, high, grid)
    best_error = torch.full_like(low, float("inf"))
    for step in range(SEARCH_STEPS):
        ratio = 1.0 - step / SEARCH_STEPS
        scale, zero_point = range_to_grid(low * ratio, high * ratio, grid)
        error = (fake_quantize(samples, scale[:, None], zero_point[:, None], grid) - samples).abs().pow(p).mean(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero_point, best_zero)
    return best_scale, best_zero


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class BiasQuantizer(nn.Module):
    """int32 bias on the grid of input scale x weight scale, as ONNX Runtime's int8 kernels take it.

    The two source quantizers are held in a tuple so that they stay owned by their own layers."""

    def __init__(self, activation: Quantizer, weight: Quantizer):
        super().__init__()
        self.sources = (activation, weight)
        self.enabled = True

    def scale(self) -> torch.Tensor:
        activation, weight = self.sources
        return activation.scale.reshape(()) * weight.scale

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return bias
        return self.integers(bias) * self.scale()

    def integers(self, bias: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(bias / self.scale()), INT32_MIN, INT32_MAX)


@dataclass
class QuantizerSet:
    """Every quantizer of a plan, keyed by the ONNX tensor it quantizes."""

    weights: dict[str, Quantizer]
    activations: dict[str, Quantizer]
    biases: dict[str, BiasQuantizer]
