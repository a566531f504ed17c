"""Costs of the torch operations that shaped the reconstruction step (one thread, mean of 300 calls
after 5 warm-up calls, unless said below):

    OMP_NUM_THREADS=1 python tools/bench_ops.py           # 28x28 sizes: docs/benchmarks/shipped_models.md, "Reconstruction iteration cost"
    OMP_NUM_THREADS=1 python tools/bench_ops.py --real    # 224x224 sizes: docs/benchmarks/reconstruct.md
    python tools/bench_ops.py --fused                     # compiled quantizer kernels, 2 threads: the same document
    python tools/bench_ops.py --masks                     # QDrop's random bytes, 2 threads: the same document

--fused times each operation once per round, the operations taking turns, and prints the median
of 15 rounds: on a shared machine the memory bandwidth these passes need changes from minute to
minute, and taking turns lets every operation see the same changes.

--real times forward + backward at the sizes of EfficientNet-Lite1's first blocks (batch 32, 240x240
input): convolutions in NCHW against channels-last, and the ways to write a ReLU6 Clip, with freed
memory kept in the process (`onnxmodcap.allocator.retained_memory`) and without.
"""

import sys
import time
from contextlib import nullcontext

import torch

from onnxmodcap import fused
from onnxmodcap.allocator import retained_memory
from onnxmodcap.quantizers import Grid, StraightThroughQuantize, keep_mask

torch.set_num_threads(1)


def ms(action, calls=300):
    """Mean milliseconds per call of `action`."""
    for _ in range(5):
        action()
    started = time.perf_counter()
    for _ in range(calls):
        action()
    return (time.perf_counter() - started) / calls * 1e3


def medians_in_turn(actions: dict, rounds: int = 15) -> dict:
    """Median milliseconds per call of each action, timed once per round in turn after 2 warm-up calls."""
    for action in actions.values():
        action()
        action()
    seconds = {name: [] for name in actions}
    for _ in range(rounds):
        for name, action in actions.items():
            started = time.perf_counter()
            action()
            seconds[name].append(time.perf_counter() - started)
    return {name: sorted(times)[rounds // 2] * 1e3 for name, times in seconds.items()}


def real_resolution() -> None:
    layouts = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}
    convolutions = {"depthwise 3x3, 32 channels at 120x120": (32, 120, torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)),
                    "pointwise 32 -> 16 at 120x120": (32, 120, torch.nn.Conv2d(32, 16, 1))}
    for kept in (False, True):
        with retained_memory() if kept else nullcontext():
            print(f"freed memory {'kept' if kept else 'returned to the kernel (glibc as it is)'}:")
            for name, (channels, size, conv) in convolutions.items():
                for layout_name, layout in layouts.items():
                    x = torch.randn(32, channels, size, size).contiguous(memory_format=layout).requires_grad_(True)
                    layer = conv.to(memory_format=layout)
                    print(f"  {name}, {layout_name}: {ms(lambda: layer(x).sum().backward(), 5):.1f} ms forward + backward")
            x = torch.randn(32, 96, 60, 60, requires_grad=True)
            grad = torch.randn_like(x)
            low, high = torch.tensor(0.0), torch.tensor(6.0)
            clips = {"maximum + minimum": lambda: torch.minimum(torch.maximum(x, low), high).backward(grad),
                     "clamp": lambda: torch.clamp(x, low, high).backward(grad),
                     "hardtanh": lambda: torch.nn.functional.hardtanh(x, 0.0, 6.0).backward(grad)}
            for name, clip in clips.items():
                print(f"  ReLU6 at 32x96x60x60 as {name}: {ms(clip, 5):.1f} ms forward + backward")


def compared_masks(x, scale, zero_point, low, high, keep):
    """fused.quantized_values with its masks written as comparisons and where."""
    rounded = torch.round(x / scale)
    centred = torch.clamp(rounded, low - zero_point, high - zero_point)
    return torch.where(keep, centred * scale, x), (centred == rounded) | ~keep


def byte_weight(draws, threshold, like):
    """QDrop's bytes as a lerp weight by arithmetic: 1.0 below the threshold, else 0.0."""
    return torch.clamp(threshold - draws.to(like.dtype), 0, 1)


def weighted_masks(x, scale, zero_point, low, high, draws, threshold):
    """fused.quantized_values with QDrop's bytes turned into a 0/1 lerp weight."""
    centred = torch.clamp(torch.round(x / scale), low - zero_point, high - zero_point)
    return torch.lerp(x, centred * scale, byte_weight(draws, threshold, x))


def compiled_kernels() -> None:
    torch.set_num_threads(2)
    x = (torch.randn(32, 96, 120, 120) * 0.4).contiguous(memory_format=torch.channels_last)
    keep = keep_mask(x, 0.5)
    boolean = keep.boolean()
    values, keep_flat, (draws, threshold) = fused.flat(x), fused.flat(boolean), fused.mask_operands(keep)
    other = torch.randn_like(x)
    scale, zero_point, low, high = torch.tensor(0.05), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(255.0)
    grad, grid = torch.randn_like(values), Grid.unsigned(8)
    by_comparisons = torch.compile(compared_masks, dynamic=True)
    by_weights = torch.compile(weighted_masks, dynamic=True)
    mixed_by_weight = torch.compile(lambda a, b, d, t: torch.lerp(a, b, byte_weight(d, t, a)), dynamic=True)
    below_one = torch.compile(lambda t: (t < 1).to(torch.uint8), dynamic=True)
    inductor_mask = torch.compile(lambda t: torch.ceil(torch.clamp(0.5 - torch.rand_like(t), 0, 1)).to(torch.uint8),
                                  dynamic=True)
    passes = (torch.rand_like(values) < 0.9)
    timings = {
        "forward, op by op (StraightThroughQuantize)":
            lambda: StraightThroughQuantize.apply(x, scale, zero_point, grid, 1.0, boolean),
        "forward, compiled, masks from comparisons": lambda: by_comparisons(values, scale, zero_point, low, high, keep_flat),
        "forward, compiled (fused.py)":
            lambda: fused.compiled(fused.quantized_values)(values, scale, zero_point, low, high, draws, threshold),
        "forward, compiled, QDrop's bytes as a 0/1 lerp weight":
            lambda: by_weights(values, scale, zero_point, low, high, draws, threshold),
        "backward to x, op by op (grad * boolean mask)": lambda: grad * passes,
        "backward to x, compiled (fused.py)":
            lambda: fused.compiled(fused.input_gradient)(grad, values, scale, zero_point, low, high, draws, threshold),
        "(x < 1) as uint8, op by op": lambda: (values < 1).to(torch.uint8),
        "(x < 1) as uint8, compiled": lambda: below_one(values),
        "keep mask (keep_mask: random bytes from fused.random_bytes)": lambda: keep_mask(x, 0.5),
        "keep mask as booleans (KeepMask.boolean)": keep.boolean,
        "QDrop's mix, op by op (lerp with the mask as floats)": lambda: torch.lerp(other, x, boolean.to(x.dtype)),
        "QDrop's mix, compiled (fused.mixed)": lambda: fused.mixed(other, x, keep),
        "QDrop's mix, compiled, the bytes as a 0/1 lerp weight":
            lambda: mixed_by_weight(fused.flat(other), values, draws, threshold),
        "keep mask from inductor's rand, compiled": lambda: inductor_mask(values),
    }
    with retained_memory(), torch.no_grad():
        for name, median in medians_in_turn(timings).items():
            print(f"  {name}: {median:.1f} ms")


def mask_bytes() -> None:
    """QDrop's random bytes from torch's generator (keep_mask before 1853faf) against the hash of
    fused.random_words, compiled and op by op, medians of 51 rounds in turn."""
    torch.set_num_threads(2)
    seeds = torch.tensor([12345, -678], dtype=torch.int32)
    fused.available()
    for count in (1 << 16, 1 << 18, 1 << 20, 32 * 32 * 120 * 120):
        words = (count + 3) // 4
        timings = {
            "torch's generator": lambda: torch.randint(-(2**63), 2**63 - 1, ((count + 7) // 8,), dtype=torch.int64),
            "hash, compiled": lambda: fused.compiled(fused.random_words)(words, seeds),
            "hash, op by op": lambda: fused.random_words(words, seeds),
        }
        with retained_memory():
            medians = medians_in_turn(timings, rounds=51)
        print(f"  {count} bytes: " + ", ".join(f"{name} {median:.3f} ms" for name, median in medians.items()))


if "--masks" in sys.argv:
    mask_bytes()
    sys.exit()

if "--fused" in sys.argv:
    compiled_kernels()
    sys.exit()

if "--real" in sys.argv:
    real_resolution()
    sys.exit()

small = torch.randn(32, 16, 14, 14)  # 100k values
large = torch.randn(32, 32, 14, 14)  # 200k values
weight = torch.rand(64, 64, 3, 3)  # 37k values
print(f"compare {ms(lambda: small >= 0.1):.3f} ms, multiply {ms(lambda: small * small):.3f} ms (100k)")
print(f"rand_like {ms(lambda: torch.rand_like(large)):.3f} ms (200k)")
print(f"pow {ms(lambda: weight.pow(6.3)):.3f} ms, exp(log) {ms(lambda: torch.log(weight).mul_(6.3).exp_()):.3f} ms (37k)")
for fused_adam in (False, True):
    weights = torch.nn.Parameter(torch.randn(128, 128, 3, 3))
    weights.grad = torch.randn_like(weights)
    optimizer = torch.optim.Adam([weights], lr=1e-3, fused=fused_adam)
    print(f"Adam fused={fused_adam} {ms(optimizer.step, 200):.3f} ms (147k)")
