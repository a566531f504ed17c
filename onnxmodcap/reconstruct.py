"""Stage 6, reconstruct: per unit, learn AdaRound weight rounding and LSQ activation scales so the
quantized unit reproduces the float unit's output.

Units are reconstructed in order. Unit k's target is the float model's output of unit k on the float
input; its input is the output of the already quantized units before it. The objective is the output
error (summed over channels, averaged over batch and positions) plus AdaRound's rounding loss, which
is off for the first 20 % of iterations and then anneals beta from 20 to 2 (BRECQ). QDrop also mixes,
element by element with probability 0.5, the quantized and the float unit input, and inside the unit
the quantized and float value of every activation quantizer.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import UserError
from .checkpoint import Checkpointer
from .mirror import NetworkMirror, UnitMirror
from .quantizers import QuantizerSet, drop_mix

METHODS = ("brecq", "qdrop")
LOSS_BATCHES = 256  # images on which the loss before and after each unit is measured
DEFAULT_CACHE_BYTES = 4 << 30


@dataclass(frozen=True)
class ReconstructionSettings:
    """Published defaults (BRECQ/QDrop): 20k iterations of batch 32 per unit, AdaRound with lambda
    0.01 and beta 20 -> 2 after a 20 % warm-up, Adam 1e-3 on the rounding variables and 4e-5 with
    cosine decay on the activation step sizes, QDrop probability 0.5."""

    method: str = "qdrop"
    iters: int = 20000
    batch_size: int = 32
    weight_lr: float = 1e-3
    act_lr: float = 4e-5
    round_lambda: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    drop_prob: float = 0.5


PRESETS = {
    "paper": {},
    # Measured on the shipped models: see BENCHMARKS.md for the accuracy it keeps.
    "fast": {"iters": 1000},
}


@dataclass
class UnitResult:
    name: str
    loss_before: float
    loss_after: float
    iterations: int
    seconds: float


def reconstruct(mirror: NetworkMirror, quantizers: QuantizerSet, inputs: np.ndarray,
                settings: ReconstructionSettings, device: torch.device, seed: int, cache_folder: Path,
                cache_budget: int = DEFAULT_CACHE_BYTES, checkpointer: Checkpointer | None = None,
                resume: bool = False) -> list[UnitResult]:
    """Reconstruct every unit in order; after each, save a checkpoint when a checkpointer is given.
    With `resume`, the quantizers of finished units come from the checkpoint and the run continues
    from the next unit with the random state it would have had."""
    if settings.method not in METHODS:
        raise UserError(f"unknown reconstruction method {settings.method!r}: choose {', '.join(METHODS)}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    resumed = checkpointer.load(quantizers) if checkpointer and resume else None
    results = [UnitResult(**r) for r in resumed.results] if resumed else []
    cache = TensorCache(cache_budget, cache_folder)
    float_stream = TensorStream(mirror, cache, {mirror.input_names[0]: torch.from_numpy(inputs)})
    quantized_stream = TensorStream(mirror, cache, {mirror.input_names[0]: torch.from_numpy(inputs)})
    with tqdm(total=len(mirror.units), initial=len(results), desc="reconstructing", unit="unit") as overall:
        for index, unit in enumerate(mirror.units):
            float_inputs = float_stream.inputs_of(unit)
            float_outputs = float_stream.advance(index, unit, quantized=False, device=device)
            if index >= len(results):
                if resumed and index == resumed.completed:
                    generator.set_state(resumed.generator_state)
                    torch.set_rng_state(resumed.torch_state)
                results.append(reconstruct_unit(unit, quantized_stream.inputs_of(unit), float_inputs,
                                                float_outputs, settings, device, generator))
                if checkpointer:
                    checkpointer.save(index + 1, quantizers, results_to_dicts(results), generator)
                overall.update(1)
                overall.set_postfix(unit=unit.unit.name, loss=f"{results[-1].loss_after:.4g}")
            quantized_stream.advance(index, unit, quantized=True, device=device)
    return results


class CachedTensor:
    """A tensor of all calibration images, in memory or memory-mapped from a .npy file; indexing
    with a slice or an index tensor gives a torch tensor."""

    def __init__(self, data: torch.Tensor | np.ndarray, path: Path | None = None):
        self.data = data
        self.path = path

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(self.data, torch.Tensor):
            return self.data[index]
        rows = index.numpy() if isinstance(index, torch.Tensor) else index
        return torch.from_numpy(np.array(self.data[rows]))  # a writable copy of the mapped rows


class TensorCache:
    """Keeps cached unit inputs and outputs in memory up to `budget` bytes and spills the rest to
    .npy files in `folder`, so large models with many calibration images fit in RAM."""

    def __init__(self, budget: int, folder: Path):
        self.budget = budget
        self.folder = folder
        self.used = 0
        self.files = 0

    def store(self, chunks: list[torch.Tensor]) -> CachedTensor:
        size = sum(chunk.numel() * chunk.element_size() for chunk in chunks)
        if self.used + size <= self.budget:
            self.used += size
            return CachedTensor(torch.cat(chunks))
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.files}.npy"
        self.files += 1
        shape = (sum(len(chunk) for chunk in chunks), *chunks[0].shape[1:])
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        start = 0
        for chunk in chunks:
            array[start:start + len(chunk)] = chunk.numpy()
            start += len(chunk)
        array.flush()
        del array
        return CachedTensor(np.load(path, mmap_mode="r"), path)

    def release(self, cached: CachedTensor) -> None:
        if cached.path is None:
            self.used -= cached.data.numel() * cached.data.element_size()
        else:
            cached.data = None
            cached.path.unlink(missing_ok=True)


class TensorStream:
    """The tensors between units for all calibration images, as the float or the quantized model
    computes them; tensors no later unit reads are released."""

    def __init__(self, mirror: NetworkMirror, cache: TensorCache, graph_inputs: dict[str, torch.Tensor]):
        self.mirror = mirror
        self.cache = cache
        self.tensors = {name: cache.store([value]) for name, value in graph_inputs.items()}
        self.retired: list[CachedTensor] = []  # no longer needed, but the caller may read them until the next step

    def inputs_of(self, unit: UnitMirror) -> list[CachedTensor]:
        return [self.tensors[name] for name in unit.unit.inputs]

    def advance(self, index: int, unit: UnitMirror, quantized: bool, device: torch.device) -> list[CachedTensor]:
        for cached in self.retired:
            self.cache.release(cached)
        unit.set_quantization(quantized)
        outputs = [self.cache.store(chunks) for chunks in run_in_batches(unit, self.inputs_of(unit), device)]
        unit.set_quantization(True)
        self.tensors.update(zip(unit.unit.outputs, outputs))
        later = {name for mirror in self.mirror.units[index + 1:] for name in mirror.unit.inputs}
        self.retired = [self.tensors.pop(name) for name in list(self.tensors) if name not in later]
        return outputs


def run_in_batches(unit: UnitMirror, inputs: list[CachedTensor], device: torch.device,
                   batch_size: int = 64) -> list[list[torch.Tensor]]:
    """The unit's outputs over all images, as one list of batch chunks per output."""
    chunks = []
    with torch.no_grad():
        for start in range(0, len(inputs[0]), batch_size):
            result = unit(*(t[start:start + batch_size].to(device) for t in inputs))
            chunks.append([r.cpu() for r in (result if isinstance(result, tuple) else (result,))])
    return [list(parts) for parts in zip(*chunks)]


def output_error(outputs, targets) -> torch.Tensor:
    """Squared error summed over channels, averaged over batch and positions, summed over outputs."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    total = 0.0
    for output, target in zip(outputs, targets):
        squared = (output - target) ** 2
        total = total + (squared.sum(1).mean() if squared.dim() > 1 else squared.mean())
    return total


def measure_loss(unit: UnitMirror, inputs, targets, device) -> float:
    with torch.no_grad():
        batch = [t[:LOSS_BATCHES].to(device) for t in inputs]
        return float(output_error(unit(*batch), [t[:LOSS_BATCHES].to(device) for t in targets]))


@dataclass
class UnitTraining:
    """What one unit's reconstruction optimises: AdaRound variables and LSQ step sizes."""

    weights: list
    activations: list
    optimizers: list
    schedulers: list

    def step(self, loss: torch.Tensor) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        for scheduler in self.schedulers:
            scheduler.step()

    def finish(self) -> None:
        """Harden the rounding and return every quantizer to plain (exportable) quantization."""
        for quantizer in self.weights:
            quantizer.hard_rounding = True
            quantizer.alpha.requires_grad_(False)
        for quantizer in self.activations:
            quantizer.learning = False
            quantizer.drop_prob = 0.0
            quantizer.scale.requires_grad_(False)


def start_training(unit: UnitMirror, settings: ReconstructionSettings) -> UnitTraining:
    weights = [quantizer for _, quantizer in unit.quantized_weights()]
    # 8-bit step sizes stay at their initialisation: they are small next to Adam's absolute step
    # (lr 4e-5), and learning them collapsed the input grid of the stem (measured on the shipped
    # MobileNetV2: stem loss 3.5e-4 -> 10.7).
    activations = [q for q in unit.activation_quantizers.values() if q.grid.bits < 8]
    for weight, quantizer in unit.quantized_weights():
        quantizer.start_adaround(weight)
    for quantizer in activations:
        quantizer.learning = True
        quantizer.scale.requires_grad_(True)
        quantizer.drop_prob = settings.drop_prob if settings.method == "qdrop" else 0.0
    optimizers = [torch.optim.Adam([q.alpha for q in weights], lr=settings.weight_lr)] if weights else []
    schedulers = []
    if activations:
        act_optimizer = torch.optim.Adam([q.scale for q in activations], lr=settings.act_lr)
        optimizers.append(act_optimizer)
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(act_optimizer, T_max=settings.iters, eta_min=0.0))
    return UnitTraining(weights, activations, optimizers, schedulers)


def reconstruct_unit(unit: UnitMirror, quantized_inputs, float_inputs, float_outputs,
                     settings: ReconstructionSettings, device: torch.device, generator: torch.Generator) -> UnitResult:
    started = time.monotonic()
    loss_before = measure_loss(unit, quantized_inputs, float_outputs, device)
    training = start_training(unit, settings)
    with tqdm(range(settings.iters), desc=f"  {unit.unit.name}", unit="it", leave=False) as progress:
        for step in progress:
            beta = rounding_beta(step, settings) if training.weights else None
            loss = training_loss(unit, quantized_inputs, float_inputs, float_outputs, settings, device, generator,
                                 training.weights, beta)
            training.step(loss)
            if step % 50 == 0:
                progress.set_postfix(loss=f"{loss.item():.4g}")
    training.finish()
    loss_after = measure_loss(unit, quantized_inputs, float_outputs, device)
    return UnitResult(unit.unit.name, loss_before, loss_after, settings.iters, round(time.monotonic() - started, 2))


def rounding_beta(step: int, settings: ReconstructionSettings) -> float | None:
    """None during the warm-up (no rounding loss), then beta annealed from beta_start to beta_end."""
    warmup = int(settings.warmup * settings.iters)
    if step < warmup:
        return None
    fraction = (step - warmup) / max(1, settings.iters - warmup)
    return settings.beta_end + 0.5 * (settings.beta_start - settings.beta_end) * (1 + math.cos(math.pi * fraction))


def training_loss(unit, quantized_inputs, float_inputs, float_outputs, settings, device, generator, weights,
                  beta: float | None) -> torch.Tensor:
    count = len(quantized_inputs[0])
    picks = torch.randint(0, count, (min(settings.batch_size, count),), generator=generator)
    batch = [t[picks].to(device) for t in quantized_inputs]
    if settings.method == "qdrop":
        float_batch = [t[picks].to(device) for t in float_inputs]
        batch = [drop_mix(q, f, settings.drop_prob) for q, f in zip(batch, float_batch)]
    loss = output_error(unit(*batch), [t[picks].to(device) for t in float_outputs])
    if beta is not None:
        loss = loss + settings.round_lambda * sum(q.rounding_loss(beta) for q in weights)
    return loss


def results_to_dicts(results: list[UnitResult]) -> list[dict]:
    return [asdict(r) for r in results]
