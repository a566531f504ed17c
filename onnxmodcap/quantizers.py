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

from . import fused

LP_NORM = 2.4
SEARCH_STEPS = 100
PERCENTILE = 99.99
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


# The functions below build their 0/1 masks with arithmetic (abs, sign, clamp) rather than with
# comparisons: on CPU, torch's comparisons are 6-10x slower than float arithmetic
# (tools/bench_ops.py), and they were the largest cost of a reconstruction iteration after the convolutions.


def equal_mask(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1.0 where a == b, else 0.0."""
    return torch.sub(a, b).abs_().sign_().neg_().add_(1)


def rectified_sigmoid_with_slope(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaRound's h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1) and dh/dalpha."""
    sigmoid = torch.sigmoid(alpha)
    stretched = sigmoid * (ZETA - GAMMA) + GAMMA
    soft = stretched.clamp(0.0, 1.0)
    return soft, sigmoid.mul_(1 - sigmoid).mul_(ZETA - GAMMA).mul_(equal_mask(soft, stretched))


@dataclass
class SoftRounding:
    """What AdaRound's soft rounding of one weight reads in every iteration: `floor` (floor(w / s) + z)
    and `grid_slope`, fixed while the layer is reconstructed, and h(alpha) with its slope, which
    whoever changes alpha must `update` (the unit's forward pass and the rounding loss both read
    them, so they are computed once per optimizer step)."""

    floor: torch.Tensor
    grid_slope: torch.Tensor  # s where the grid does not clamp floor + h, else 0
    soft: torch.Tensor
    slope: torch.Tensor

    def update(self, alpha: torch.Tensor) -> None:
        with torch.no_grad():
            self.soft, self.slope = rectified_sigmoid_with_slope(alpha)


class AdaRoundWeight(torch.autograd.Function):
    """AdaRound's soft-quantized weight, (clamp(floor(w / s) + h(alpha) + z) - z) * s, as one autograd
    node whose gradient to alpha is s * h'(alpha) where the grid does not clamp."""

    @staticmethod
    def forward(ctx, alpha, state: SoftRounding, scale, zero_point, grid: Grid):
        ctx.save_for_backward(state.slope * state.grid_slope)
        return torch.add(state.floor, state.soft).clamp_(grid.qmin, grid.qmax).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        [slope] = ctx.saved_tensors
        return grad * slope, None, None, None, None


class RoundingLoss(torch.autograd.Function):
    """AdaRound's regulariser sum(1 - |2 h(alpha) - 1|^beta), with its gradient computed in the
    forward pass. The power is exp(log(.) * exponent): torch's pow with a fractional exponent is
    not vectorised on CPU."""

    @staticmethod
    def forward(ctx, alpha, state: SoftRounding, beta: float):
        centred = state.soft * 2 - 1
        distance = centred.abs()
        power = torch.log(distance).mul_(beta - 1).exp_()  # distance ** (beta - 1); beta > 1
        ctx.save_for_backward(power.mul(state.slope).mul_(centred.sign_()).mul_(-2 * beta))
        return (1 - power.mul_(distance)).sum()

    @staticmethod
    def backward(ctx, grad):
        [slope] = ctx.saved_tensors
        return grad * slope, None, None


@dataclass(frozen=True)
class KeepMask:
    """QDrop's choice of the elements that stay quantized: one random byte per element, kept where
    the byte is below `threshold`. The compiled kernels (fused.py) compare each byte as they read
    it, so on real-resolution tensors no boolean or float mask is written (at 224x224 such a pass
    costs about 70 % of drawing the bytes); the op-by-op path uses `boolean()`."""

    draws: torch.Tensor  # uint8, with the shape and strides of the tensor it masks
    threshold: int  # 1-255: the keep probability in 256ths

    def boolean(self) -> torch.Tensor:
        """True where the element is kept."""
        return self.draws < self.threshold

    def keeping_all_of(self, rows: int) -> KeepMask:
        """This mask followed by `rows` rows (along the batch) that keep every element."""
        return KeepMask(torch.cat((self.draws, torch.zeros_like(self.draws[:rows]))), self.threshold)


def keep_seeds(device: torch.device) -> torch.Tensor:
    """The two int32 seeds of one mask's random bytes, drawn from torch's generator on `device`."""
    return torch.randint(-(2**31), 2**31, (2,), dtype=torch.int32, device=device)


def keep_threshold(keep_prob: float) -> int:
    """The byte threshold below which an element is kept: keep_prob in 256ths, 1 to 255."""
    return min(255, max(1, round(keep_prob * 256)))


def keep_mask(like: torch.Tensor, keep_prob: float) -> KeepMask:
    """Each element of `like` kept with probability `keep_prob` (in steps of 1/256). The random bytes
    come from a counter-based hash (`fused.random_bytes`) seeded by two draws of torch's generator
    on `like`'s device: torch's own generator fills bytes on one thread, and at 240x240 that was a
    sixth of a QDrop iteration (docs/benchmarks/reconstruct.md, "QDrop's masks")."""
    count = like.numel()
    seeds = keep_seeds(like.device)
    threshold = keep_threshold(keep_prob)
    random_bytes = fused.random_bytes(count, seeds)
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        # in the layout of `like`: an elementwise op over tensors of two layouts is several times slower
        n, c, h, w = like.shape
        return KeepMask(random_bytes.view(n, h, w, c).permute(0, 3, 1, 2), threshold)
    return KeepMask(random_bytes.view(like.shape), threshold)


def mixed(dropped: torch.Tensor, kept: torch.Tensor, keep: KeepMask) -> torch.Tensor:
    """QDrop's mix of two tensors of one shape: `kept`'s value where `keep` keeps the element,
    `dropped`'s elsewhere."""
    if fused.applies(kept, keep) and (dropped.dtype, dropped.stride()) == (kept.dtype, kept.stride()):
        return fused.mixed(dropped, kept, keep)
    return torch.lerp(dropped, kept, keep.boolean().to(kept.dtype))


class StraightThroughQuantize(torch.autograd.Function):
    """Fake quantization of a per-tensor activation during reconstruction, with QDrop's random mix
    folded in, as one autograd node. Straight-through rounding: d out/d x is 1 inside the grid and 0
    where clamped. When the scale is learned (LSQ), d out/d scale is round(v) - v inside and
    x_int - z where clamped (v = x / scale), times `gradient_scale`; a fixed scale costs no gradient
    work. Where `keep` (a boolean tensor shaped like x, or None: keep all) is False the element is
    dropped and passes x through.

    At real resolution these tensors are tens of MB and every pass over them is memory-bound, so
    the forward pass makes five float passes (divide, round, clamp, scale, blend) and keeps its
    masks as booleans, a quarter of the memory of a float mask. (torch.lerp with a weight exactly 0
    or 1 returns one of its ends exactly, and is the fastest blend: torch.where with a boolean
    condition takes three times as long on CPU.)"""

    @staticmethod
    def forward(ctx, x, scale, zero_point, grid: Grid, gradient_scale: float, keep: torch.Tensor | None):
        scaled = x / scale
        rounded = torch.round(scaled)
        centred = rounded.clamp(grid.qmin - zero_point, grid.qmax - zero_point)  # x_int - z
        passes = centred == rounded  # inside the grid
        scale_slope = None
        if ctx.needs_input_grad[1]:
            scale_slope = centred - scaled.mul_(passes)  # inside the grid: round(v) - v
        quantized = centred.mul_(scale)
        if keep is not None:
            keep_weight = keep.to(x.dtype)
            quantized = torch.lerp(x, quantized, keep_weight)
            passes.logical_or_(keep.logical_not())
            if scale_slope is not None:
                scale_slope.mul_(keep_weight)
        ctx.save_for_backward(passes, scale_slope)
        ctx.gradient_scale = gradient_scale
        return quantized

    @staticmethod
    def backward(ctx, grad):
        passes, scale_slope = ctx.saved_tensors
        grad_scale = None
        if scale_slope is not None:
            grad_scale = grad.reshape(-1).dot(scale_slope.reshape(-1)) * ctx.gradient_scale  # one pass, no product tensor
        # A unit's input quantizer reads cached data, which needs no gradient.
        grad_x = grad * passes if ctx.needs_input_grad[0] else None
        return grad_x, grad_scale, None, None, None, None


class Quantizer(nn.Module):
    """Per-tensor (axis None) or per-channel fake quantizer.

    States used by reconstruction, all off after calibration:
    - `straight_through` (activations): rounding passes the gradient straight through to x, so that
      the weights before the quantizer learn; `scale` gets LSQ's scaled gradient where it requires one;
    - `alpha` (weights): AdaRound's rounding variables; soft (`soft_rounding`) until `harden()`;
    - `drop_prob` (with `straight_through`): QDrop, each element takes its float value with this probability;
      `shared_keep`, when set, is the KeepMask to use instead of a fresh random one (see
      `reconstruct.input_drop_masks`);
    - `enabled` False: the identity (the float model).
    """

    def __init__(self, grid: Grid, channels: int = 1, axis: int | None = None):
        super().__init__()
        self.grid = grid
        self.axis = axis
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(channels))
        self.alpha: nn.Parameter | None = None
        self.soft_rounding: SoftRounding | None = None
        self.straight_through = False
        self.drop_prob = 0.0
        self.shared_keep: KeepMask | None = None
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
        if self.straight_through and self.alpha is None:
            gradient_scale = self.step_gradient_scale(x[0].numel())
            keep = self.kept_elements(x)
            if self.axis is None and fused.applies(x, keep):
                return fused.FusedStraightThroughQuantize.apply(x, scale, zero_point, *self.grid_bounds(),
                                                                gradient_scale, keep)
            return StraightThroughQuantize.apply(x, scale, zero_point, self.grid, gradient_scale,
                                                 None if keep is None else keep.boolean())
        if self.soft_rounding is not None:  # x is the weight start_adaround was given
            return AdaRoundWeight.apply(self.alpha, self.soft_rounding, scale, zero_point, self.grid)
        return (self.integer_values(x, scale, zero_point) - zero_point) * scale

    def mixed_input(self, quantized: torch.Tensor, floats: torch.Tensor, picks: torch.Tensor) -> torch.Tensor | None:
        """The QDrop step's input of a unit that this quantizer's tensor enters, in one compiled loop
        (fused.FusedMixedInputQuantize): rows `picks` of the cached quantized and float inputs, mixed
        under a fresh mask and the kept elements quantized, as the unit's forward would quantize the
        mix under that shared mask. None where the kernel does not take these tensors (nothing drawn
        then): the caller mixes and the unit quantizes."""
        if not (self.enabled and self.straight_through and self.drop_prob and self.alpha is None and self.axis is None
                and fused.applies_to_rows(quantized, floats, len(picks))):
            return None
        threshold = torch.tensor(float(keep_threshold(1.0 - self.drop_prob)))
        return fused.FusedMixedInputQuantize.apply(quantized, floats, picks, self.scale.reshape(()),
                                                   self.zero_point.reshape(()), *self.grid_bounds(),
                                                   self.step_gradient_scale(quantized[0].numel()),
                                                   keep_seeds(quantized.device), threshold)

    def grid_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """qmin and qmax as the compiled kernels take them."""
        return torch.tensor(float(self.grid.qmin)), torch.tensor(float(self.grid.qmax))

    def step_gradient_scale(self, values_per_image: int) -> float:
        """LSQ's scale of the step size's gradient, 1 / sqrt(values per image x qmax)."""
        return 1.0 / math.sqrt(values_per_image * self.grid.qmax)

    def kept_elements(self, x: torch.Tensor) -> KeepMask | None:
        """QDrop's mask of the elements that stay quantized in this forward, None without drop."""
        if not self.drop_prob:
            return None
        return self.shared_keep if self.shared_keep is not None else keep_mask(x, 1.0 - self.drop_prob)

    def integer_values(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        if self.alpha is None:
            return integers(x, scale, zero_point, self.grid)
        rounding = (self.alpha >= 0).to(x.dtype)  # hardened AdaRound
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
        scale = self.broadcast(self.scale, weight).detach()
        scaled = weight.detach() / scale
        floor = torch.floor(scaled)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (scaled - floor - GAMMA) - 1))
        # floor + h, h in [0, 1], is clamped only where floor is outside [qmin, qmax - 1] (or where h
        # is exactly 0 or 1, and there dh/dalpha is 0 anyway).
        shifted = floor + self.broadcast(self.zero_point, weight)
        inside = equal_mask(torch.clamp(shifted, self.grid.qmin, self.grid.qmax - 1), shifted)
        self.soft_rounding = SoftRounding(shifted, inside.mul_(scale), *rectified_sigmoid_with_slope(self.alpha.detach()))

    def harden(self) -> None:
        """End AdaRound: from now on each weight rounds up where alpha >= 0."""
        self.alpha.requires_grad_(False)
        self.soft_rounding = None

    def rounding_loss(self, beta: float) -> torch.Tensor:
        return RoundingLoss.apply(self.alpha, self.soft_rounding, beta)


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
