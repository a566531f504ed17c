"""The fused autograd nodes of reconstruction (LSQ with QDrop, AdaRound's soft weight and rounding
loss) compute the same values and gradients as the plain torch formulas they replace."""

from __future__ import annotations

import math

import pytest
import torch

from onnxmodcap.quantizers import Grid, Quantizer, keep_mask
from onnxmodcap.reconstruct import UnitTraining

GRIDS = [Grid.asymmetric(4), Grid.signed(4), Grid.unsigned(2), Grid.asymmetric(8)]


def learning_activation_quantizer(grid: Grid, scale: float, zero_point: float, drop_prob: float = 0.0) -> Quantizer:
    quantizer = Quantizer(grid)
    with torch.no_grad():
        quantizer.scale.fill_(scale)
        quantizer.zero_point.fill_(zero_point)
    quantizer.scale.requires_grad_(True)
    quantizer.straight_through = True
    quantizer.drop_prob = drop_prob
    return quantizer


def reference_lsq(x: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
    """LSQ as autograd composes it: straight-through rounding, clamp, step-size gradient scaled by
    1/sqrt(numel * qmax)."""
    grid = quantizer.grid
    factor = 1.0 / math.sqrt(x[0].numel() * grid.qmax)
    scale = quantizer.scale.reshape(())
    scale = (scale - scale * factor).detach() + scale * factor
    scaled = x / scale
    rounded = scaled + (torch.round(scaled) - scaled).detach()
    zero_point = quantizer.zero_point.reshape(())
    return (torch.clamp(rounded + zero_point, grid.qmin, grid.qmax) - zero_point) * scale


def gradients(output: torch.Tensor, upstream: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((output * upstream).sum(), tensors))


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_lsq_node_matches_the_autograd_formula(grid):
    torch.manual_seed(0)
    zero_point = 0.0 if grid.fixed_zero else 3.0
    quantizer = learning_activation_quantizer(grid, 0.3, zero_point)
    x = torch.randn(4, 3, 5, 5) * 2  # about a third of the values clamp
    x[0, 0, 0, :2] = torch.tensor([1e7, -1e7])  # far outside: d out/d scale is exactly x_int - z
    x.requires_grad_(True)
    upstream = torch.randn_like(x)

    expected = reference_lsq(x, quantizer)
    actual = quantizer(x)

    assert torch.equal(actual, expected)
    for got, want in zip(gradients(actual, upstream, x, quantizer.scale),
                         gradients(expected, upstream, x, quantizer.scale)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_lsq_node_on_an_input_without_gradient_still_learns_its_step_size():
    """A unit's input quantizer reads cached data: only its step size gets a gradient."""
    torch.manual_seed(0)
    grid = Grid.asymmetric(4)
    x = torch.randn(4, 3, 5, 5) * 2
    upstream = torch.randn_like(x)
    quantizer, reference = (learning_activation_quantizer(grid, 0.3, 3.0) for _ in range(2))
    [got] = gradients(quantizer(x), upstream, quantizer.scale)
    [want] = gradients(reference_lsq(x, reference), upstream, reference.scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_qdrop_inside_the_lsq_node_mixes_float_and_quantized_values():
    torch.manual_seed(0)
    grid = Grid.asymmetric(4)
    x = (torch.randn(8, 16, 10, 10) * 2).requires_grad_(True)
    upstream = torch.randn_like(x)
    quantized = reference_lsq(x, learning_activation_quantizer(grid, 0.3, 3.0))
    dropping = learning_activation_quantizer(grid, 0.3, 3.0, drop_prob=0.5)

    mixed = dropping(x)
    [grad_x] = gradients(mixed, upstream, x)

    dropped = (mixed == x) & (mixed != quantized)
    kept = (mixed == quantized) & (mixed != x)
    assert torch.all(dropped | kept | (x == quantized))
    assert 0.48 < dropped.sum() / (dropped | kept).sum() < 0.52
    # dropped elements are the identity; kept ones pass the gradient only inside the grid
    assert torch.equal(grad_x[dropped], upstream[dropped])
    [plain_grad_x] = gradients(quantized, upstream, x)
    torch.testing.assert_close(grad_x[kept], plain_grad_x[kept])


@pytest.mark.parametrize("grid", [Grid.signed(4), Grid.asymmetric(2), Grid.signed(8)], ids=str)
def test_adaround_nodes_match_the_autograd_formulas_and_follow_optimizer_steps(grid):
    torch.manual_seed(0)
    weight = torch.randn(8, 4, 3, 3)
    quantizer = Quantizer(grid, channels=8, axis=0)
    quantizer.initialise(weight.flatten(1), "minmax")
    # 0.8x the min-max scale: some weights fall outside the grid, and no w / s is an integer. There
    # (frac 0 at the grid's end) both one-sided derivatives are 0, and the fused node says 0, while
    # autograd's inclusive clamp gives a subgradient.
    with torch.no_grad():
        quantizer.scale.mul_(0.8)
    quantizer.start_adaround(weight)
    optimizer = torch.optim.Adam([quantizer.alpha], lr=0.5, fused=True)
    training = UnitTraining([quantizer], [], [optimizer], [])
    upstream = torch.randn_like(weight)

    def reference(beta):
        soft = torch.clamp(torch.sigmoid(quantizer.alpha) * 1.2 - 0.1, 0, 1)
        scale, zero_point = quantizer.broadcast(quantizer.scale, weight), quantizer.broadcast(quantizer.zero_point, weight)
        integers = torch.clamp(torch.floor(weight / scale) + soft + zero_point, grid.qmin, grid.qmax)
        return (integers - zero_point) * scale, (1 - (2 * soft - 1).abs().pow(beta)).sum()

    for step in range(4):  # the optimizer moves alpha in place; the soft rounding must follow
        expected_weight, expected_loss = reference(beta=7.0)
        actual_weight, actual_loss = quantizer(weight), quantizer.rounding_loss(7.0)
        torch.testing.assert_close(actual_weight, expected_weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(actual_loss, expected_loss, rtol=1e-5, atol=1e-4)
        [got] = torch.autograd.grad((actual_weight * upstream).sum() + actual_loss, quantizer.alpha)
        [want] = torch.autograd.grad((expected_weight * upstream).sum() + expected_loss, quantizer.alpha)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        training.step((quantizer(weight) * upstream).sum() + quantizer.rounding_loss(7.0))


def test_hardened_adaround_rounds_up_where_alpha_is_not_negative():
    weight = torch.tensor([[0.26, 0.74, -0.26, -0.74]])
    quantizer = Quantizer(Grid.signed(4), channels=1, axis=0)
    with torch.no_grad():
        quantizer.scale.fill_(0.5)
        quantizer.start_adaround(weight)
        quantizer.alpha.copy_(torch.tensor([[1.0, -1.0, 0.0, -0.5]]))
    quantizer.harden()
    assert quantizer.quantized_integers(weight).tolist() == [[1.0, 1.0, 0.0, -2.0]]
    assert torch.equal(quantizer(weight), torch.tensor([[0.5, 0.5, 0.0, -1.0]]))


@pytest.mark.parametrize("keep_prob", [0.5, 0.25, 0.9])
def test_keep_mask_keeps_elements_with_the_asked_probability(keep_prob):
    torch.manual_seed(0)
    mask = keep_mask(torch.empty(400, 1000), keep_prob).boolean()
    assert mask.shape == (400, 1000) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - keep_prob) < 0.005


@pytest.mark.parametrize("drop_prob", [0.0, 0.5])
def test_a_fixed_step_size_still_passes_a_straight_through_gradient(drop_prob):
    """8-bit step sizes are not learned during reconstruction, but their rounding must pass the
    gradient on to x (1 inside the grid, 0 where it clamps, 1 where QDrop dropped the element), or
    every weight before it is frozen."""
    torch.manual_seed(0)
    grid = Grid.asymmetric(8)
    quantizer = learning_activation_quantizer(grid, 0.02, 100.0, drop_prob=drop_prob)
    quantizer.scale.requires_grad_(False)
    x = (torch.randn(4, 3, 5, 5) * 2).requires_grad_(True)  # about a fifth of the values clamp
    upstream = torch.randn_like(x)

    quantized = quantizer(x)
    (quantized * upstream).sum().backward()

    fixed = quantized.detach() == reference_lsq(x, quantizer).detach()
    dropped = ~fixed & (quantized.detach() == x.detach())
    assert torch.all(fixed | dropped)
    assert dropped.float().mean() == pytest.approx(drop_prob, abs=0.1)
    inside = ((torch.round(x / 0.02) + 100 >= 0) & (torch.round(x / 0.02) + 100 <= 255)).float()
    assert 0.7 < inside.mean() < 0.9
    assert torch.equal(x.grad, upstream * torch.where(dropped, 1.0, inside))
    assert quantizer.scale.grad is None
