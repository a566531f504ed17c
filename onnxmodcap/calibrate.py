"""Stage 5, calibrate: read calibration data, run the float mirror once, initialise every quantizer.

Calibration data is an image folder (JPEG/PNG of any size, through the shared preprocessing), a
.npz of uint8 images like the repo's test set, or a .npy/.npz of ready model inputs (N, C, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import DEFAULT_NUM_CALIB
from .datasets import Skipped, open_images, prepared_batches
from .errors import UserError, first_line
from .mirror import NetworkMirror
from .plan import QuantPlan, WeightPlan, activation_grid, weight_grid
from .preprocess import Preprocessing
from .progress import progress_bar
from .quantizers import BiasQuantizer, Quantizer, QuantizerSet

SAMPLES_PER_TENSOR = 1 << 16
PARITY_IMAGES = 64


@dataclass
class CalibrationData:
    """Model inputs for calibration, and a separate parity batch (held out when the folder allows)."""

    inputs: np.ndarray
    parity: np.ndarray
    parity_held_out: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)


def load_calibration(path: str | Path, preprocessing: Preprocessing, input_shape: tuple[int, ...],
                     num_calib: int | None) -> CalibrationData:
    """`num_calib` None takes every image up to DEFAULT_NUM_CALIB; a number must be available."""
    path = Path(path)
    wanted = (num_calib or DEFAULT_NUM_CALIB) + PARITY_IMAGES
    if is_tensor_file(path):
        arrays, skipped = read_tensor_file(path)[:wanted], Skipped()
    else:
        arrays, skipped = read_images(path, preprocessing, wanted)
    check_input_shape(arrays, input_shape, path)
    available = len(arrays)
    if num_calib is not None and available < num_calib:
        raise UserError(f"{path} has {available} usable calibration inputs, fewer than --num-calib {num_calib}")
    count = min(num_calib or DEFAULT_NUM_CALIB, available)
    held_out = available - count >= 1
    parity = arrays[count:count + PARITY_IMAGES] if held_out else arrays[:PARITY_IMAGES]
    return CalibrationData(arrays[:count], parity, held_out, skipped.entries)


def is_tensor_file(path: Path) -> bool:
    if path.suffix.lower() == ".npy":
        return True
    if path.suffix.lower() == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as archive:
            return "images" not in archive.files
    return False


def read_tensor_file(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as archive:
                if len(archive.files) != 1:
                    raise UserError(f"{path} must hold exactly one array of model inputs, found {len(archive.files)}")
                array = archive[archive.files[0]]
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read calibration tensors {path}: {first_line(err)}") from None
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"calibration tensors {path} must be floating point, got {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def read_images(path: Path, preprocessing: Preprocessing, wanted: int) -> tuple[np.ndarray, Skipped]:
    images = open_images(path).spread(wanted)
    skipped = Skipped()
    batches = [b.inputs for b in prepared_batches(images, preprocessing, 64, skipped)]
    if not batches:
        raise UserError(f"{path} has no usable calibration images ({len(skipped)} could not be read)")
    return np.concatenate(batches), skipped


def check_input_shape(arrays: np.ndarray, input_shape: tuple[int, ...], path: Path) -> None:
    expected = tuple(d if isinstance(d, int) and d > 0 else None for d in input_shape[1:])
    actual = arrays.shape[1:]
    if len(actual) != len(expected) or any(e is not None and e != a for e, a in zip(expected, actual)):
        shown = "x".join("?" if e is None else str(e) for e in expected)
        raise UserError(f"calibration inputs from {path} have shape {'x'.join(map(str, actual))}, "
                        f"the model expects {shown}")


class ActivationStats:
    """Exact min/max and an evenly spread sample of one tensor's values over the calibration run."""

    def __init__(self, generator: torch.Generator, per_batch: int):
        self.low = float("inf")
        self.high = float("-inf")
        self.samples: list[torch.Tensor] = []
        self.generator = generator
        self.per_batch = per_batch
        self.elements_per_image = 0

    def add(self, value: torch.Tensor) -> None:
        self.elements_per_image = value[0].numel() if value.dim() else 1
        flat = value.detach().reshape(-1).float()
        self.low = min(self.low, float(flat.min()))
        self.high = max(self.high, float(flat.max()))
        picks = torch.randint(0, flat.numel(), (min(self.per_batch, flat.numel()),), generator=self.generator)
        self.samples.append(flat[picks.to(flat.device)].cpu())

    def values(self) -> torch.Tensor:
        """The sample with the exact extremes included, so every method sees the full range."""
        return torch.cat([*self.samples, torch.tensor([self.low, self.high])])


def collect_activation_stats(mirror: NetworkMirror, plan: QuantPlan, inputs: np.ndarray, batch_size: int,
                             device: torch.device, seed: int) -> dict[str, ActivationStats]:
    generator = torch.Generator().manual_seed(seed)
    batches = range(0, len(inputs), batch_size)
    per_batch = max(1, SAMPLES_PER_TENSOR // len(batches))
    stats = {a.tensor: ActivationStats(generator, per_batch) for a in plan.activations}

    def observe(name: str, value: torch.Tensor) -> None:
        if name in stats:
            stats[name].add(value)

    with mirror.observing(observe), torch.no_grad():
        for start in progress_bar(batches, desc="calibrating", unit="batch", leave=False):
            mirror(torch.from_numpy(inputs[start:start + batch_size]).to(device))
    return stats


def weight_quantizer(weight: torch.Tensor, spec: WeightPlan, bits: int, plan: QuantPlan, method: str) -> Quantizer:
    """The quantizer of one layer's weights on a `bits` grid, initialised by `method`."""
    weight = weight.detach()
    axis = spec.axis if spec.axis is not None else 0
    rows = weight.movedim(axis, 0).reshape(weight.shape[axis], -1) if spec.axis is not None else weight.reshape(1, -1)
    quantizer = Quantizer(weight_grid(plan.target, bits, spec.depthwise, plan.reduce_range), rows.shape[0],
                          spec.axis).to(weight.device)
    quantizer.initialise(rows, method)
    return quantizer


def activation_quantizer(observed: ActivationStats, target: str, bits: int, method: str) -> Quantizer:
    """The per-tensor quantizer of one activation on a `bits` grid, initialised by `method` from its statistics."""
    quantizer = Quantizer(activation_grid(target, bits, nonnegative=observed.low >= 0))
    quantizer.initialise(observed.values()[None, :], method)
    return quantizer


def build_quantizers(mirror: NetworkMirror, plan: QuantPlan, stats: dict[str, ActivationStats],
                     method: str) -> QuantizerSet:
    """Quantizers with scales and zero points initialised by `method` (lp, minmax or percentile)."""
    weights_by_name = mirror.constants()
    weights = {spec.tensor: weight_quantizer(weights_by_name[spec.tensor], spec, spec.bits, plan, method)
               for spec in progress_bar(plan.weights, desc=f"initialising weight quantizers ({method})", unit="layer",
                                        leave=False)}
    activations = {spec.tensor: activation_quantizer(stats[spec.tensor], plan.target, spec.bits, method)
                   for spec in plan.activations}
    biases = {spec.bias: BiasQuantizer(activations[spec.input], weights[spec.tensor])
              for spec in plan.weights if spec.bias is not None}
    return QuantizerSet(weights, activations, biases)
