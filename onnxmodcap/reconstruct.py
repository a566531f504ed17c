"""Stage 6, reconstruct: per unit, learn AdaRound weight rounding and LSQ activation scales so the
quantized unit reproduces the float unit's output.

Units are reconstructed in order. Unit k's target is the float model's output of unit k on the float
input; its input is the output of the already quantized units before it. The objective is the output
error (summed over channels, averaged over batch and positions) plus AdaRound's rounding loss, which
is off for the first 20 % of iterations and then anneals beta from 20 to 2 (BRECQ). QDrop also mixes,
element by element with probability 0.5, the quantized and the float value of every activation
quantizer inside the unit. The unit's input is mixed the same way: each element is either the
quantized value of the quantized model's input or the float model's input (the quantizer of a unit
input drops exactly the elements the mix took from the float input; see `input_drop_masks`).

PD-Quant adds, on top of QDrop, the prediction difference: the unit's output on the quantized input
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

import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .checkpoint import Checkpointer, set_device_rng_state
from .metrics import output_kind
from .mirror import NetworkMirror, UnitMirror, as_tuple
from .progress import progress_bar
from .quantizers import QuantizerSet, keep_mask

METHODS = ("brecq", "qdrop", "pdquant")
LOSS_IMAGES = 256  # images on which the loss before and after each unit is measured
DEFAULT_CACHE_BYTES = 4 << 30
CORRECTION_BATCH = 256  # images whose inputs distribution correction optimises at once (each on its own)
PAPER_ITERS, PAPER_WEIGHT_LR, PAPER_CORRECTION_STEPS, PAPER_CORRECTION_LR = 20000, 1e-3, 500, 1e-3
FAST_ITERS = 1000
QUICK_ITERS = 200
# Part of every checkpoint's fingerprint: a checkpoint written by reconstruction code that trains
# differently (another version) is discarded instead of resumed. Raise it with such a change.
RECONSTRUCTION_VERSION = "2"


@dataclass(frozen=True)
class ReconstructionSettings:
    """Published defaults (BRECQ/QDrop): 20k iterations of batch 32 per unit, AdaRound with lambda
    by network (0.01 for ResNet/RegNet, 0.1 for MobileNet-like, see `network_defaults`) and beta
    20 -> 2 after a 20 % warm-up, Adam 1e-3 on the rounding variables (PD-Quant's code: 3e-3, see
    `method_defaults`) and 4e-5 with cosine decay on the activation step sizes, QDrop probability
    0.5 (per unit; lower inside ModCap groups, see `drop_probability`). PD-Quant: lambda_r 0.1,
    temperature and lambda_c by network (T 4, lambda_c 0.02 for ResNet/RegNet; T 1, lambda_c
    0.005 for MobileNet-like), distribution correction with Adam 1e-3 for 500 steps
    (`correction_steps`)."""

    method: str = "qdrop"
    iters: int = PAPER_ITERS
    batch_size: int = 32
    weight_lr: float = PAPER_WEIGHT_LR
    act_lr: float = 4e-5
    round_lambda: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    drop_prob: float = 0.5
    pd_temperature: float = 4.0
    pd_lambda: float = 0.1
    pd_batch_size: int | None = None  # images of each batch carried to the logits (None: all)
    pd_interval: int = 1  # the prediction difference joins every pd_interval-th iteration, weighted x pd_interval
    dc_lambda: float = 0.02
    dc: bool = True

    @property
    def drops(self) -> bool:
        return self.method in ("qdrop", "pdquant")

    @property
    def correction_steps(self) -> int:
        """Distribution correction takes the published 500 steps for 20 000 iterations, and the same
        share of fewer iterations: a fixed 500 (or 50) steps would cost more than the reconstruction
        itself at the fast preset's 1 000 iterations."""
        return max(1, round(self.iters * PAPER_CORRECTION_STEPS / PAPER_ITERS))

    @property
    def correction_lr(self) -> float:
        """Scaled so that steps x learning rate, the farthest Adam can move an input, stays as published."""
        return PAPER_CORRECTION_LR * PAPER_CORRECTION_STEPS / self.correction_steps


PRESETS = {
    "paper": {},
    # Measured on the shipped models: see benchmarks_methods.md for the accuracy it keeps,
    # benchmarks_modcap.md round 6 for PD-Quant's pd_batch_size and pd_interval, and round 7 for
    # the rounding variables' learning rate, raised so that iterations x rate stays as published
    # (20 000 x 1e-3): at 1e-3, 1 000 iterations leave the rounding far from settled.
    "fast": {"iters": FAST_ITERS, "weight_lr": PAPER_WEIGHT_LR * PAPER_ITERS / FAST_ITERS, "pd_batch_size": 8, "pd_interval": 4},
    # For a CPU and real resolution, where the fast preset takes about an hour for a 224x224
    # network on 2 cores: benchmarks_reconstruct.md for the time and the fidelity it keeps.
    "quick": {"iters": QUICK_ITERS, "weight_lr": PAPER_WEIGHT_LR * PAPER_ITERS / QUICK_ITERS, "pd_batch_size": 8,
              "pd_interval": 4},
}


def method_defaults(method: str) -> dict:
    """PD-Quant's published code trains the rounding variables with Adam at 3e-3; BRECQ's and QDrop's at 1e-3."""
    return {"weight_lr": 3e-3} if method == "pdquant" else {}


def network_defaults(depthwise: bool) -> dict:
    """The published settings that depend on the network. MobileNet-like networks (depthwise
    convolutions) weight AdaRound's rounding loss 0.1 (QDrop's MobileNetV2 recipe; its MNASNet one
    uses 0.2) and use PD-Quant's T = 1 and lambda_c = 0.005; ResNet/RegNet keep the
    ReconstructionSettings defaults: rounding loss 0.01, T = 4 and lambda_c = 0.02."""
    return {"round_lambda": 0.1, "pd_temperature": 1.0, "dc_lambda": 0.005} if depthwise else {}


@dataclass
class UnitResult:
    name: str
    loss_before: float
    loss_after: float
    iterations: int
    seconds: float
    distribution_correction: str = ""  # pdquant: what the correction did for this unit
    correction_seconds: float = 0.0  # pdquant: time of the correction, not included in `seconds`


def reconstruct(mirror: NetworkMirror, quantizers: QuantizerSet, inputs: np.ndarray,
                settings: ReconstructionSettings, device: torch.device, seed: int, cache_folder: Path,
                cache_budget: int = DEFAULT_CACHE_BYTES, checkpointer: Checkpointer | None = None,
                resume: bool = False, prediction: Prediction | None = None) -> list[UnitResult]:
    """Reconstruct every unit in order; after each, save a checkpoint when a checkpointer is given.
    With `resume`, the quantizers of finished units come from the checkpoint and the run continues
    from the next unit with the random state it would have had. pdquant needs `prediction`."""
    if settings.method not in METHODS:
        raise UserError(f"unknown reconstruction method {settings.method!r}: choose {', '.join(METHODS)}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    resumed = checkpointer.load(quantizers) if checkpointer and resume else None
    results = [UnitResult(**r) for r in resumed.results] if resumed else []
    with TensorCache(cache_budget, cache_folder) as cache:
        float_stream = TensorStream(mirror, cache, {mirror.input_names[0]: torch.from_numpy(inputs)})
        quantized_stream = TensorStream(mirror, cache, {mirror.input_names[0]: torch.from_numpy(inputs)})
        predicted = None
        if settings.method == "pdquant":
            predicted = float_predictions(prediction, inputs, cache, device)
        steps = step_costs(mirror, inputs[:settings.batch_size], settings, device)
        with progress_bar(total=settings.iters * sum(steps), initial=settings.iters * sum(steps[:len(results)]),
                  desc="reconstructing", bar_format=OVERALL_BAR) as overall:
            for index, unit in enumerate(mirror.units):
                float_inputs = float_stream.inputs_of(unit)
                float_outputs = float_stream.advance(index, unit, quantized=False, device=device)
                if index >= len(results):
                    if resumed and index == resumed.completed:
                        generator.set_state(resumed.generator_state)
                        set_device_rng_state(resumed.device_state, device)
                    data = UnitData(quantized_stream.inputs_of(unit), float_inputs, float_outputs, float_outputs)
                    if predicted is not None:
                        data = prediction_data(data, prediction, index, float_stream, predicted, settings, device,
                                               cache)
                    results.append(reconstruct_unit(unit, data, settings, device, generator,
                                                    lambda: overall.update(steps[index])))
                    for cached in data.temporary:
                        cache.release(cached)
                    if checkpointer:
                        checkpointer.save(index + 1, quantizers, results_to_dicts(results), generator, device)
                    overall.set_postfix(done=f"{index + 1}/{len(mirror.units)} units", loss=f"{results[-1].loss_after:.4g}")
                quantized_stream.advance(index, unit, quantized=True, device=device)
    return results


# The overall bar measures work in predicted seconds (`step_costs`), so its share and time left
# weigh each unit by its cost: on EfficientNet-Lite1 at 240x240 block2's step costs 15 times the head's.
OVERALL_BAR = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"


def step_costs(mirror: NetworkMirror, inputs: np.ndarray, settings: ReconstructionSettings,
               device: torch.device) -> list[float]:
    """Seconds of one training step of each unit: forward and backward on `inputs` carried through the
    float network, with every activation quantizer rounding straight-through and dropping as in
    reconstruction (the second of two steps, the first warms up). The random state is left as it was."""
    env = {mirror.input_names[0]: image_layout(torch.from_numpy(inputs).to(device))}
    costs = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for index, unit in enumerate(mirror.units):
            batch = [env[name] for name in unit.unit.inputs]
            costs.append(training_step_seconds(unit, batch, drop_probability(settings, unit), device))
            unit.set_quantization(False)
            with torch.no_grad():
                env.update(zip(unit.unit.outputs, as_tuple(unit(*batch))))
            unit.set_quantization(True)
            later = read_after(mirror, index)
            env = {name: tensor for name, tensor in env.items() if name in later}
    return costs


def training_step_seconds(unit: UnitMirror, batch: list[torch.Tensor], drop_prob: float, device: torch.device) -> float:
    activations = list(unit.activation_quantizers.values())
    weights = [weight for weight, _ in unit.quantized_weights()]
    for quantizer in activations:
        quantizer.straight_through, quantizer.drop_prob = True, drop_prob
    for weight in weights:
        weight.requires_grad_(True)
    try:
        for _ in range(2):
            started = time.perf_counter()
            sum(output.square().mean() for output in as_tuple(unit(*batch))).backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
    finally:
        for quantizer in activations:
            quantizer.straight_through, quantizer.drop_prob = False, 0.0
        for weight in weights:
            weight.requires_grad_(False)
            weight.grad = None
    return seconds


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
class UnitData:
    """The tensors one unit trains on, rows aligned with the calibration images: its quantized
    input, the float counterpart QDrop mixes in, the training target, and the float output the
    reported loss is measured against. pdquant adds the float rest of the network."""

    quantized_inputs: list[CachedTensor]
    float_inputs: list[CachedTensor]
    targets: list[CachedTensor]
    reference_outputs: list[CachedTensor]
    rest: FloatRest | None = None
    correction: str = ""
    correction_seconds: float = 0.0
    temporary: list[CachedTensor] = field(default_factory=list)  # released after the unit


@dataclass
class FloatPredictions:
    """The float network's outputs on every calibration image (the targets of the prediction
    difference) and each output's variance over them, by output name, and the objective."""

    outputs: dict[str, CachedTensor]
    variances: dict[str, float]
    objective: str


def float_predictions(prediction: Prediction, inputs: np.ndarray, cache: TensorCache,
                      device: torch.device) -> FloatPredictions:
    float_mirror = prediction.float_mirror
    outputs = cache.store(run_in_batches(float_mirror, [CachedTensor(torch.from_numpy(inputs))], device), len(inputs))
    variances = [float(torch.as_tensor(np.asarray(o.data), dtype=torch.float64).var()) or 1.0 for o in outputs]
    return FloatPredictions(dict(zip(float_mirror.output_names, outputs)),
                            dict(zip(float_mirror.output_names, variances)), prediction.objective)


class FloatRest:
    """The float network after one unit: carries that unit's outputs on to the graph outputs."""

    def __init__(self, float_mirror: NetworkMirror, index: int, stream: TensorStream, predicted: FloatPredictions,
                 device: torch.device):
        self.units = list(float_mirror.units[index + 1:])
        self.outputs = float_mirror.units[index].unit.outputs
        self.others = {name: t for name, t in stream.tensors.items() if name not in self.outputs}
        produced = {name for unit in float_mirror.units[index:] for name in unit.unit.outputs}
        self.reached = [name for name in float_mirror.output_names if name in produced]  # what the unit can change
        self.predicted = predicted
        self.device = device

    def __call__(self, outputs: tuple[torch.Tensor, ...], picks: torch.Tensor) -> dict[str, torch.Tensor]:
        """The graph outputs that the unit's outputs reach, by name."""
        env = {name: image_layout(t[picks].to(self.device)) for name, t in self.others.items()}
        env.update(zip(self.outputs, map(image_layout, outputs)))
        for unit in self.units:
            env.update(zip(unit.unit.outputs, as_tuple(unit(*(env[name] for name in unit.unit.inputs)))))
        return {name: env[name] for name in self.reached}


def prediction_data(data: UnitData, prediction: Prediction, index: int, stream: TensorStream,
                    predicted: FloatPredictions, settings: ReconstructionSettings, device: torch.device,
                    cache: TensorCache) -> UnitData:
    started = time.monotonic()
    float_unit = prediction.float_mirror.units[index]
    rest = FloatRest(prediction.float_mirror, index, stream, predicted, device)
    if not settings.dc:
        return replace(data, rest=rest, correction="off (--no-dc)")
    corrected, correction = correct_distribution(float_unit, data.float_inputs, prediction.bn_targets, settings,
                                                 device, cache)
    if corrected is None:
        return replace(data, rest=rest, correction=correction)
    targets = cache.store(run_in_batches(float_unit, corrected, device), len(corrected[0]))
    return replace(data, float_inputs=corrected, targets=targets, rest=rest, correction=correction,
                   correction_seconds=round(time.monotonic() - started, 2), temporary=[*corrected, *targets])


def correct_distribution(float_unit: UnitMirror, float_inputs: list[CachedTensor],
                         bn_targets: dict[str, tuple[torch.Tensor, torch.Tensor]], settings: ReconstructionSettings,
                         device: torch.device, cache: TensorCache) -> tuple[list[CachedTensor] | None, str]:
    """PD-Quant's distribution correction of the unit's float input, image by image. A ModCap group
    is left as it is: pulling one input toward the BN statistics of two or three units at once
    moved it far enough to cost the shipped RegNetX 0.8 to 1.2 points (benchmarks_modcap.md, round 13)."""
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
        float_unit.observer = lambda name, value: seen.__setitem__(name, value) if name in watched else None
        try:
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
        finally:
            float_unit.observer = None

    corrected = cache.store(corrected_batches(), len(float_inputs[0]))
    return corrected, f"applied ({len(watched)} BatchNormalization statistics)"


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
    largest item of distribution correction's time (benchmarks_modcap.md, round 4)."""

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


class CachedTensor:
    """A tensor of all calibration images, in memory or memory-mapped from a .npy file; indexing
    with a slice or an index tensor gives a torch tensor, channels-last where it is image-shaped
    (see `image_layout`)."""

    def __init__(self, data: torch.Tensor | np.ndarray, path: Path | None = None):
        self.data = data
        self.path = path

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(self.data, torch.Tensor):
            return gather_rows(self.data, index) if isinstance(index, torch.Tensor) else self.data[index]
        rows = index.numpy() if isinstance(index, torch.Tensor) else index
        return image_layout(torch.from_numpy(np.array(self.data[rows])))  # a writable copy of the mapped rows


def image_layout(tensor: torch.Tensor) -> torch.Tensor:
    """Image-shaped (4-D) tensors in channels-last memory layout, the same values. At real
    resolution oneDNN runs a convolution's forward and backward faster in it: on 32 images of 32
    channels at 120x120, one thread, a depthwise 3x3 in 49 ms against 86 ms, a pointwise one in 38
    against 70 (benchmarks_reconstruct.md). On 14x14 and 7x7 maps of a ResNet-50 it is 5-36 %
    slower; one layout for every unit keeps the data path simple."""
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


def gather_rows(data: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of `data`, keeping a channels-last layout (index_select itself returns a
    contiguous tensor, transposing every row). index_select takes a third of the time of advanced
    indexing for a batch of rows (2.8 against 7.4 µs on 1024x512, 10.3 against 30.0 µs on
    1024x64x7x7, one thread)."""
    if data.dim() == 4 and data.is_contiguous(memory_format=torch.channels_last):
        return torch.index_select(data.permute(0, 2, 3, 1), 0, index).permute(0, 3, 1, 2)
    return torch.index_select(data, 0, index)


class TensorCache:
    """Keeps cached unit inputs and outputs in memory up to `budget` bytes and spills the rest to
    .npy files in `folder`, so large models with many calibration images fit in RAM."""

    def __init__(self, budget: int, folder: Path):
        self.budget = budget
        self.folder = folder
        self.used = 0
        self.files = 0

    def __enter__(self) -> TensorCache:
        shutil.rmtree(self.folder, ignore_errors=True)  # left behind by a killed run
        return self

    def __exit__(self, *exc) -> None:
        """Remove every spilled file, also after an interrupted or failed run."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def store(self, batches: Iterable[Sequence[torch.Tensor]], count: int) -> list[CachedTensor]:
        """Gather consecutive row batches of one or more float tensors of `count` rows each. Every
        batch is written into place as it arrives, so no tensor is ever held twice."""
        stored: list[CachedTensor] = []
        start = 0
        for batch in batches:
            if not stored:
                stored = [self.allocate((count, *tensor.shape[1:])) for tensor in batch]
            for cached, tensor in zip(stored, batch):
                cached.data[start:start + len(tensor)] = tensor if cached.path is None else tensor.numpy()
            start += len(batch[0])
        for cached in stored:
            if cached.path is not None:
                cached.data.flush()
                cached.data = np.load(cached.path, mmap_mode="r")
        return stored

    def allocate(self, shape: tuple[int, ...]) -> CachedTensor:
        size = math.prod(shape) * 4  # float32
        if self.used + size <= self.budget:
            self.used += size
            memory_format = torch.channels_last if len(shape) == 4 else torch.contiguous_format
            return CachedTensor(torch.empty(shape, memory_format=memory_format))
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.folder / f"{self.files}.npy"
        self.files += 1
        return CachedTensor(np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape), path)

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
        self.tensors = {name: cache.store([(value,)], len(value))[0] for name, value in graph_inputs.items()}
        self.retired: list[CachedTensor] = []  # no longer needed, but the caller may read them until the next step

    def inputs_of(self, unit: UnitMirror) -> list[CachedTensor]:
        return [self.tensors[name] for name in unit.unit.inputs]

    def advance(self, index: int, unit: UnitMirror, quantized: bool, device: torch.device) -> list[CachedTensor]:
        for cached in self.retired:
            self.cache.release(cached)
        unit.set_quantization(quantized)
        inputs = self.inputs_of(unit)
        outputs = self.cache.store(run_in_batches(unit, inputs, device), len(inputs[0]))
        unit.set_quantization(True)
        self.tensors.update(zip(unit.unit.outputs, outputs))
        later = read_after(self.mirror, index)
        self.retired = [self.tensors.pop(name) for name in list(self.tensors) if name not in later]
        return outputs


def read_after(mirror: NetworkMirror, index: int) -> set[str]:
    """The tensors that the units after unit `index` read."""
    return {name for unit in mirror.units[index + 1:] for name in unit.unit.inputs}


def run_in_batches(unit: UnitMirror, inputs: list[CachedTensor], device: torch.device,
                   batch_size: int = 64) -> Iterator[tuple[torch.Tensor, ...]]:
    """The unit's outputs over all images, one batch at a time."""
    with torch.no_grad():
        for start in range(0, len(inputs[0]), batch_size):
            result = unit(*(t[start:start + batch_size].to(device) for t in inputs))
            yield tuple(r.cpu() for r in as_tuple(result))


def output_error(outputs, targets) -> torch.Tensor:
    """Squared error summed over channels, averaged over batch and positions, summed over outputs."""
    total = 0.0
    for output, target in zip(as_tuple(outputs), targets):
        squared = (output - target) ** 2
        total = total + (squared.sum(1).mean() if squared.dim() > 1 else squared.mean())
    return total


def unit_errors(mirror: NetworkMirror, inputs: np.ndarray, device: torch.device,
                batch_size: int = 32) -> list[float]:
    """Every unit's output error over `inputs`: the float unit on the float input against the
    quantized unit on the quantized input (the loss reconstruction lowers, seen whole-network).
    Batched, so that a large model's intermediate tensors are held for one batch only."""
    totals = [0.0] * len(mirror.units)
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = torch.from_numpy(inputs[start:start + batch_size]).to(device)
            float_env = {mirror.input_names[0]: batch}
            quantized_env = dict(float_env)
            for index, unit in enumerate(mirror.units):
                unit.set_quantization(False)
                float_outputs = as_tuple(unit(*(float_env[name] for name in unit.unit.inputs)))
                unit.set_quantization(True)
                quantized_outputs = as_tuple(unit(*(quantized_env[name] for name in unit.unit.inputs)))
                float_env.update(zip(unit.unit.outputs, float_outputs))
                quantized_env.update(zip(unit.unit.outputs, quantized_outputs))
                totals[index] += float(output_error(quantized_outputs, float_outputs)) * len(batch)
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


@dataclass
class UnitTraining:
    """One unit's reconstruction: its weight quantizers (AdaRound variables), its activation
    quantizers (straight-through; the step sizes below 8 bits learned), and their optimizers."""

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
        for quantizer in self.weights:
            quantizer.soft_rounding.update(quantizer.alpha)
        for scheduler in self.schedulers:
            scheduler.step()

    def finish(self) -> None:
        """Harden the rounding and return every quantizer to plain (exportable) quantization."""
        for quantizer in self.weights:
            quantizer.harden()
        for quantizer in self.activations:
            quantizer.straight_through = False
            quantizer.drop_prob = 0.0
            quantizer.scale.requires_grad_(False)


def start_training(unit: UnitMirror, settings: ReconstructionSettings) -> UnitTraining:
    """Every activation quantizer of the unit rounds with a straight-through gradient and drops
    (QDrop), whatever its width: a plain round has zero gradient and would freeze every weight
    before it. Only step sizes below 8 bits are learned: 8-bit ones are small next to Adam's
    absolute step (lr 4e-5), and learning them collapsed the input grid of the stem (measured on
    the shipped MobileNetV2: stem loss 3.5e-4 -> 10.7)."""
    weights = [quantizer for _, quantizer in unit.quantized_weights()]
    activations = list(unit.activation_quantizers.values())
    learned_scales = [q.scale for q in activations if q.grid.bits < 8]
    for weight, quantizer in unit.quantized_weights():
        quantizer.start_adaround(weight)
    for quantizer in activations:
        quantizer.straight_through = True
        quantizer.drop_prob = drop_probability(settings, unit)
    for scale in learned_scales:
        scale.requires_grad_(True)
    optimizers = [torch.optim.Adam([q.alpha for q in weights], lr=settings.weight_lr, fused=True)] if weights else []
    schedulers = []
    if learned_scales:
        act_optimizer = torch.optim.Adam(learned_scales, lr=settings.act_lr, fused=True)
        optimizers.append(act_optimizer)
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(act_optimizer, T_max=settings.iters, eta_min=0.0))
    return UnitTraining(weights, activations, optimizers, schedulers)


def drop_probability(settings: ReconstructionSettings, unit: UnitMirror) -> float:
    """QDrop's probability for one unit. A ModCap group of n units drops with 1 - (1 - p)^(1/n) at
    each site, so that an element stays quantized across the whole group as often as across one
    unit (p = 0.5: 0.29 in a group of two, 0.21 in a group of three). With p itself at every site
    of a three-unit group, the group's output error at 2-bit activations ended well above
    unit-by-unit reconstruction, and far apart from seed to seed (benchmarks_modcap.md, rounds 9 and 11)."""
    if not settings.drops:
        return 0.0
    return 1.0 - (1.0 - settings.drop_prob) ** (1.0 / unit.unit.group_size)


def reconstruct_unit(unit: UnitMirror, data: UnitData, settings: ReconstructionSettings, device: torch.device,
                     generator: torch.Generator, stepped: Callable[[], None] = lambda: None) -> UnitResult:
    """Train the unit for settings.iters steps, calling `stepped` after each."""
    started = time.monotonic()
    loss_before = measure_loss(unit, data.quantized_inputs, data.reference_outputs, device)
    training = start_training(unit, settings)
    with progress_bar(range(settings.iters), desc=f"  {unit.unit.name}", unit="it", leave=False) as progress:
        for step in progress:
            beta = rounding_beta(step, settings) if training.weights else None
            predicts = data.rest is not None and step % settings.pd_interval == 0
            loss = training_loss(unit, data, settings, device, generator, training.weights, beta, predicts)
            training.step(loss)
            stepped()
            if step % 50 == 0:
                progress.set_postfix(loss=f"{loss.item():.4g}")
    training.finish()
    loss_after = measure_loss(unit, data.quantized_inputs, data.reference_outputs, device)
    return UnitResult(unit.unit.name, loss_before, loss_after, settings.iters, round(time.monotonic() - started, 2),
                      data.correction, data.correction_seconds)


def rounding_beta(step: int, settings: ReconstructionSettings) -> float | None:
    """None during the warm-up (no rounding loss), then beta annealed from beta_start to beta_end."""
    warmup = int(settings.warmup * settings.iters)
    if step < warmup:
        return None
    fraction = (step - warmup) / max(1, settings.iters - warmup)
    return settings.beta_end + 0.5 * (settings.beta_start - settings.beta_end) * (1 + math.cos(math.pi * fraction))


def training_loss(unit: UnitMirror, data: UnitData, settings: ReconstructionSettings, device: torch.device,
                  generator: torch.Generator, weights: list, beta: float | None, predicts: bool) -> torch.Tensor:
    count = len(data.quantized_inputs[0])
    picks = torch.randint(0, count, (min(settings.batch_size, count),), generator=generator)
    quantized = [t[picks].to(device) for t in data.quantized_inputs]
    batch, keeps = quantized, [None] * len(quantized)
    if settings.drops:
        keeps = [keep_mask(q, 1.0 - drop_probability(settings, unit)) for q in quantized]
        batch = [torch.lerp(t[picks].to(device), q, keep.to(q.dtype))
                 for q, t, keep in zip(quantized, data.float_inputs, keeps)]
    # PD-Quant: the first images of the batch once more, without drop, to carry on to the logits
    carried = picks[:settings.pd_batch_size or len(picks)] if predicts else picks[:0]
    if len(carried):
        batch = [torch.cat((b, q[:len(carried)])) for b, q in zip(batch, quantized)]
        keeps = [None if k is None else torch.cat((k, torch.ones_like(k[:len(carried)]))) for k in keeps]
    with input_drop_masks(unit, keeps):
        outputs = as_tuple(unit(*batch))
    loss = output_error(tuple(o[:len(picks)] for o in outputs), [t[picks].to(device) for t in data.targets])
    if len(carried):
        predicted = data.rest.predicted
        reached = data.rest(tuple(o[len(picks):] for o in outputs), carried)
        difference = prediction_difference(reached, {name: predicted.outputs[name][carried].to(device) for name in reached},
                                           predicted, settings.pd_temperature)
        loss = loss + difference * settings.pd_interval / settings.pd_lambda
    if beta is not None:
        loss = loss + settings.round_lambda * sum(q.rounding_loss(beta) for q in weights)
    return loss


@contextmanager
def input_drop_masks(unit: UnitMirror, keeps: list[torch.Tensor | None]):
    """QDrop at the unit's input, as published: an element is either the quantized value of the
    quantized model's input or the float model's input. The input arrives already mixed (`keeps` is
    True where it took the quantized model's value), so each input's quantizer must quantize exactly
    those elements; with a mask of its own it would also pass unquantized quantized-model values and
    quantize float-model ones."""
    shared = [(quantizer, keep) for quantizer, keep in zip(unit.input_quantizers(), keeps) if quantizer is not None]
    for quantizer, keep in shared:
        quantizer.shared_keep = keep
    try:
        yield
    finally:
        for quantizer, _ in shared:
            quantizer.shared_keep = None


def results_to_dicts(results: list[UnitResult]) -> list[dict]:
    return [asdict(r) for r in results]
