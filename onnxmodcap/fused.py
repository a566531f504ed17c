"""The straight-through activation quantizer, QDrop's mix, a unit's QDrop input and QDrop's random
bytes as compiled CPU kernels, for real-resolution tensors.

Run op by op, `quantizers.StraightThroughQuantize` makes five float passes and four boolean ones
over its tensor in the forward pass and converts its boolean mask in the backward pass. At 224x224
a unit's activation holds tens of millions of values, every pass is memory-bound, and these passes
cost more than the unit's convolutions (docs/benchmarks/reconstruct.md, "Fused quantizer kernels").
torch.compile turns each direction into one loop: the forward pass reads x and QDrop's random
bytes and writes the output; the backward pass reads the incoming gradient, x and the bytes and
writes the gradient to x, or sums the step size's gradient. A unit's input in a QDrop step is one
loop too: it reads the picked rows of the cached quantized and float inputs and writes the mix with
the kept elements quantized (`FusedMixedInputQuantize`; where the unit's input quantizer cannot take
part, `mixed` writes the mix alone). Each loop compares QDrop's random byte with the mask's
threshold as it reads it (`quantizers.KeepMask`). The random bytes are a hash of each word's index
(`random_words`), so one loop writes them on every thread, and the input loop computes each byte
where it needs it instead of reading a mask.

The kernels compute what the op-by-op quantizer computes, with the same float32 operations (divide,
round half to even, clamp, multiply; where QDrop drops an element, x itself), so for finite values
the output and the gradient to x are identical; the step size's gradient is the same sum in another
order. The grid's mask is built with arithmetic (clamp, abs, sign), which vectorised better than
comparisons in inductor's CPU code; QDrop's bytes are compared inside torch.where, which measured
faster than arithmetic on them (docs/benchmarks/reconstruct.md, "QDrop's masks").

Compiled kernels need a C++ compiler. `available()` tries once per process; without one, or on
other devices, or below FUSED_MIN_ELEMENTS values (RANDOM_BYTES_MIN bytes for the random bytes),
where compiling would not pay, the quantizer, the mix and the hash run op by op.
"""

from __future__ import annotations

import functools
import logging

import torch

from .errors import first_line

log = logging.getLogger(__name__)

FUSED_MIN_ELEMENTS = 1 << 20
RANDOM_BYTES_MIN = 1 << 16  # from here the compiled hash is faster than the op-by-op one


def quantized_values(x, scale, zero_point, low, high, draws, threshold):
    """x fake-quantized on [low, high] (the grid's qmin, qmax); x itself where QDrop drops it (its
    random byte is not below the threshold)."""
    centred = torch.clamp(torch.round(x / scale), low - zero_point, high - zero_point)  # x_int - z
    if draws is None:
        return centred * scale
    return torch.where(draws < threshold, centred * scale, x)


def inside_grid(x, scale, zero_point, low, high):
    """(1.0 where round(x / s) is not clamped else 0.0, x / s, round(x / s) clamped)."""
    scaled = x / scale
    rounded = torch.round(scaled)
    centred = torch.clamp(rounded, low - zero_point, high - zero_point)
    return 1 - torch.abs(centred - rounded).sign(), scaled, centred


def input_gradient(grad, x, scale, zero_point, low, high, draws, threshold):
    """Straight-through: grad where x is inside the grid or dropped, 0 where the grid clamps."""
    inside, _, _ = inside_grid(x, scale, zero_point, low, high)
    if draws is None:
        return grad * inside
    return torch.where(draws < threshold, grad * inside, grad)


def step_size_gradient(grad, x, scale, zero_point, low, high, draws, threshold):
    """LSQ: the sum of grad * (round(v) - v inside the grid, x_int - z where clamped), v = x / s,
    over the kept elements."""
    inside, scaled, centred = inside_grid(x, scale, zero_point, low, high)
    slope = centred - scaled * inside
    if draws is None:
        return torch.sum(grad * slope)
    return torch.sum(torch.where(draws < threshold, grad * slope, 0.0))


def random_bytes_at(index, seeds):
    """Byte `index` of random_bytes(count, seeds): byte index % 4, little-endian, of word index // 4."""
    words = lowbias32(lowbias32((index >> 2).to(torch.int32) + seeds[0]) ^ seeds[1])
    return (words >> ((index & 3).to(torch.int32) * 8)) & 255  # the sign bits shifted in are masked off


def batch_draws(picks, row_length, seeds):
    """The random byte of each element of a batch of len(picks) rows of `row_length` values:
    random_bytes_at its index in the batch's memory order."""
    positions = (torch.arange(picks.shape[0], device=picks.device)[:, None] * row_length
                 + torch.arange(row_length, device=picks.device)[None, :])
    return random_bytes_at(positions, seeds)


def mixed_input_values(quantized_rows, float_rows, picks, scale, zero_point, low, high, seeds, threshold):
    """A unit's input for one QDrop step from the cached inputs (one image per row, in memory order):
    rows `picks`, each element quantized_values of the quantized model's input where its random
    byte (`batch_draws`) is below the threshold, the float model's input elsewhere."""
    draws = batch_draws(picks, quantized_rows.shape[1], seeds)
    quantized = quantized_values(quantized_rows[picks], scale, zero_point, low, high, None, None)
    return torch.where(draws < threshold, quantized, float_rows[picks])


def mixed_input_step_gradient(grad, quantized_rows, picks, scale, zero_point, low, high, seeds, threshold):
    """step_size_gradient of mixed_input_values: the float model's elements do not depend on the step size."""
    draws = batch_draws(picks, quantized_rows.shape[1], seeds)
    return step_size_gradient(grad, quantized_rows[picks], scale, zero_point, low, high, draws, threshold)


def mixed_values(dropped, kept, draws, threshold):
    """kept where QDrop keeps the element, dropped elsewhere."""
    return torch.where(draws < threshold, kept, dropped)


def shifted_right(words, bits):
    """The logical (unsigned) right shift of int32 words: `>>` on signed integers copies the sign."""
    return (words >> bits) & ((1 << (32 - bits)) - 1)


def lowbias32(words):
    """Chris Wellons' lowbias32 integer hash on int32 words (products wrap modulo 2**32)."""
    words = (words ^ shifted_right(words, 16)) * 0x7FEB352D
    words = (words ^ shifted_right(words, 15)) * (0x846CA68B - (1 << 32))
    return words ^ shifted_right(words, 16)


def random_words(count, seeds):
    """`count` pseudo-random int32 words: word i is lowbias32(lowbias32(i + seeds[0]) ^ seeds[1]).
    Each word depends only on its index and the two seeds, so any number of threads, on any
    device, compiled or op by op, writes the same words. Two masks whose first seeds lie less
    than `count` apart would share shifted words after the first hash; the second seed sets them
    apart again."""
    return lowbias32(lowbias32(torch.arange(count, dtype=torch.int32, device=seeds.device) + seeds[0]) ^ seeds[1])


@functools.cache
def compiled(kernel):
    # dynamic shapes: one compilation serves every unit's sizes
    return torch.compile(kernel, dynamic=True)


@functools.cache
def available() -> bool:
    """Whether torch.compile can build the CPU kernels here (it needs a C++ compiler): every kernel
    is compiled once on a small tensor and checked against its op-by-op result."""
    x = torch.linspace(-2, 2, 64)
    grid = (torch.tensor(0.1), torch.tensor(0.0), torch.tensor(-8.0), torch.tensor(7.0))
    mask = ((torch.arange(64) * 37) % 256).to(torch.uint8), torch.tensor(128.0)
    cases = [(quantized_values, (x, *grid, *drops)) for drops in ((None, None), mask)]
    cases += [(kernel, (x, x, *grid, *drops)) for kernel in (input_gradient, step_size_gradient)
              for drops in ((None, None), mask)]
    cases.append((mixed_values, (x, -x, *mask)))
    seeds = torch.tensor([12345, -678], dtype=torch.int32)
    cached, picks = x.view(4, 16), torch.tensor([3, 0, 3])
    cases += [(mixed_input_values, (cached, -cached, picks, *grid, seeds, mask[1])),
              (mixed_input_step_gradient, (x[:48].view(3, 16), cached, picks, *grid, seeds, mask[1]))]
    try:
        works = all(torch.allclose(compiled(kernel)(*inputs), kernel(*inputs), rtol=1e-5, atol=0)
                    for kernel, inputs in cases)
        works = works and torch.equal(compiled(random_words)(64, seeds), random_words(64, seeds))
        # the bytes of a mixed input are those of random_bytes (little-endian words)
        works = works and torch.equal(random_bytes_at(torch.arange(64), seeds).to(torch.uint8),
                                      random_bytes(64, seeds))
    except Exception as err:  # noqa: BLE001 - whatever stops compilation, the op-by-op quantizer runs
        works, reason = False, f"{type(err).__name__}: {first_line(err)}"
    else:
        reason = "the compiled kernel disagreed with the op-by-op one"
    if not works:
        log.warning("torch.compile cannot build CPU kernels here (%s); the activation quantizers and QDrop's "
                    "random bytes run op by op, which makes reconstruction at real resolution slower", reason)
    return works


def flat(t: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of t's memory in order, for contiguous and channels-last tensors; else None."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return None


def applies(x: torch.Tensor, keep) -> bool:
    """Whether the kernels take x and its quantizers.KeepMask (or None)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() >= FUSED_MIN_ELEMENTS
            and flat(x) is not None
            and (keep is None or (keep.draws.shape, keep.draws.stride()) == (x.shape, x.stride()))
            and available())


def applies_to_rows(quantized: torch.Tensor, floats: torch.Tensor, picked: int) -> bool:
    """Whether FusedMixedInputQuantize takes `picked` rows of these cached inputs: `applies`'s rule
    for the batch it writes, both caches in one layout."""
    return (quantized.device.type == floats.device.type == "cpu" and quantized.dtype == floats.dtype == torch.float32
            and quantized.stride() == floats.stride() and picked * quantized[0].numel() >= FUSED_MIN_ELEMENTS
            and rows(quantized) is not None and available())


def mask_operands(keep) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A KeepMask (or None) as the kernels read it: its bytes in memory order and its threshold."""
    if keep is None:
        return None, None
    return flat(keep.draws), torch.tensor(float(keep.threshold))


def shaped(values: torch.Tensor, shape: torch.Size, channels_last: bool) -> torch.Tensor:
    """The 1-D `values` seen with `shape`, in the layout `flat` read them from."""
    if not channels_last:
        return values.view(shape)
    n, c, h, w = shape
    return values.view(n, h, w, c).permute(0, 3, 1, 2)


class FusedStraightThroughQuantize(torch.autograd.Function):
    """quantizers.StraightThroughQuantize in compiled kernels, for tensors `applies` accepts. The
    backward pass recomputes the grid's mask from x instead of storing it, and reads QDrop's bytes
    again."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, low, high, gradient_scale: float, keep):
        draws, threshold = mask_operands(keep)
        values = flat(x)
        ctx.save_for_backward(values, scale, zero_point, low, high, draws, threshold)
        ctx.shape, ctx.stride, ctx.gradient_scale = x.shape, x.stride(), gradient_scale
        ctx.channels_last = not x.is_contiguous()
        return shaped(compiled(quantized_values)(values, scale, zero_point, low, high, draws, threshold), x.shape,
                      ctx.channels_last)

    @staticmethod
    def backward(ctx, grad):
        values, scale, zero_point, low, high, draws, threshold = ctx.saved_tensors
        if grad.stride() != ctx.stride:
            grad = grad.contiguous(memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)
        operands = (flat(grad), values, scale, zero_point, low, high, draws, threshold)
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_x = shaped(compiled(input_gradient)(*operands), ctx.shape, ctx.channels_last)
        if ctx.needs_input_grad[1]:
            grad_scale = compiled(step_size_gradient)(*operands) * ctx.gradient_scale
        return grad_x, grad_scale, None, None, None, None, None


def random_bytes(count: int, seeds: torch.Tensor) -> torch.Tensor:
    """`count` random bytes (uint8) from `random_words` on the seeds' device: compiled on CPU from
    RANDOM_BYTES_MIN bytes on, op by op elsewhere, the same bytes either way."""
    words = (count + 3) // 4
    fast = seeds.device.type == "cpu" and count >= RANDOM_BYTES_MIN and available()
    return (compiled(random_words) if fast else random_words)(words, seeds).view(torch.uint8)[:count]


def mixed(dropped: torch.Tensor, kept: torch.Tensor, keep) -> torch.Tensor:
    """quantizers.mixed in one compiled loop, for tensors `applies` accepts (both in one layout)."""
    return shaped(compiled(mixed_values)(flat(dropped), flat(kept), *mask_operands(keep)), kept.shape,
                  not kept.is_contiguous())


def rows(t: torch.Tensor) -> torch.Tensor | None:
    """t's memory as one row per image (first dimension), for contiguous and channels-last tensors."""
    values = flat(t)
    return None if values is None else values.view(len(t), -1)


class FusedMixedInputQuantize(torch.autograd.Function):
    """A unit's QDrop input in one compiled loop: the rows a step picks from the cached quantized
    and float inputs, mixed and quantized as `reconstruct` would mix them and the unit's input
    quantizer would then quantize the kept elements, without writing the picked rows, the mix or
    the random bytes. The cached inputs need no gradient; a learned step size gets LSQ's."""

    @staticmethod
    def forward(ctx, quantized, floats, picks, scale, zero_point, low, high, gradient_scale: float, seeds,
                threshold):
        quantized_rows, float_rows = rows(quantized), rows(floats)
        ctx.save_for_backward(quantized_rows, picks, scale, zero_point, low, high, seeds, threshold)
        ctx.gradient_scale, ctx.channels_last = gradient_scale, not quantized.is_contiguous()
        ctx.shape = (len(picks), *quantized.shape[1:])
        values = compiled(mixed_input_values)(quantized_rows, float_rows, picks, scale, zero_point, low, high, seeds,
                                              threshold)
        return shaped(values, ctx.shape, ctx.channels_last)

    @staticmethod
    def backward(ctx, grad):
        quantized_rows, picks, scale, zero_point, low, high, seeds, threshold = ctx.saved_tensors
        grad_scale = None
        if ctx.needs_input_grad[3]:
            layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
            grad_rows = rows(grad.contiguous(memory_format=layout))
            grad_scale = compiled(mixed_input_step_gradient)(grad_rows, quantized_rows, picks, scale, zero_point, low,
                                                             high, seeds, threshold) * ctx.gradient_scale
        return None, None, None, grad_scale, None, None, None, None, None, None
