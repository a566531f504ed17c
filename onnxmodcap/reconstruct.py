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

PD-Quant's additions (the prediction difference and distribution correction) are in pdquant.py;
the settings in recipes.py; the cached tensors in tensor_cache.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpointer, set_device_rng_state
from .losses import measure_loss, output_error, prediction_difference
from .mirror import NetworkMirror, UnitMirror, as_tuple, switched
from .pdquant import FloatPredictions, FloatRest, Prediction, float_predictions, prediction_data
from .progress import predicted_seconds_bar, progress_bar
from .quantizers import KeepMask, Quantizer, QuantizerSet, keep_mask, mixed
from .recipes import ReconstructionSettings, drop_probability, rounding_beta
from .tensor_cache import DEFAULT_CACHE_BYTES, CachedTensor, TensorCache, TensorStream, UnitData, image_layout


@dataclass
class UnitResult:
    """One unit's reconstruction: its output error on the loss images before and after training."""

    name: str
    loss_before: float
    loss_after: float
    iterations: int
    seconds: float
    distribution_correction: str = ""  # pdquant: what the correction did for this unit
    correction_seconds: float = 0.0  # pdquant: time of the correction, not included in `seconds`
    estimated_seconds: float = 0.0  # iterations x the step time `step_costs` measured before the first unit


def reconstruct(mirror: NetworkMirror, quantizers: QuantizerSet, inputs: np.ndarray,
                settings: ReconstructionSettings, device: torch.device, seed: int, cache_folder: Path,
                cache_budget: int = DEFAULT_CACHE_BYTES, checkpointer: Checkpointer | None = None,
                resume: bool = False, prediction: Prediction | None = None) -> list[UnitResult]:
    """Reconstruct every unit in order; after each, save a checkpoint when a checkpointer is given.
    With `resume`, the quantizers of finished units come from the checkpoint and the run continues
    from the next unit with the random state it would have had. pdquant needs `prediction`."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    resumed = checkpointer.load(quantizers) if checkpointer and resume else None
    results = [UnitResult(**r) for r in resumed.results] if resumed else []
    with TensorCache(cache_budget, cache_folder) as cache:
        graph_inputs = cache.store_graph_inputs({mirror.input_names[0]: torch.from_numpy(inputs)})
        float_stream = TensorStream(mirror, cache, graph_inputs, settings.batch_size)
        quantized_stream = TensorStream(mirror, cache, graph_inputs, settings.batch_size)
        predicted = None
        if settings.method == "pdquant":
            predicted = float_predictions(prediction, inputs, cache, device, settings.batch_size)
        steps = step_costs(mirror, inputs[:settings.batch_size], settings, device, prediction, predicted)
        with predicted_seconds_bar(settings.iters * sum(steps), settings.iters * sum(steps[:len(results)]),
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
                    result = reconstruct_unit(unit, data, settings, device, generator,
                                              lambda: overall.update(steps[index]))
                    results.append(replace(result, estimated_seconds=round(settings.iters * steps[index], 2)))
                    for cached in data.temporary:
                        cache.release(cached)
                    if checkpointer:
                        checkpointer.save(index + 1, quantizers, [asdict(result) for result in results], generator, device)
                    overall.set_postfix(done=f"{index + 1}/{len(mirror.units)} units", loss=f"{results[-1].loss_after:.4g}")
                quantized_stream.advance(index, unit, quantized=True, device=device)
    return results


# The overall bar measures work in predicted seconds (`step_costs`), so its share and time left
# weigh each unit by its cost: on EfficientNet-Lite1 at 240x240 block2's step costs 15 times the head's.
# Its time left comes from the whole run's rate, held towards the prediction (`progress.held_rate`).
OVERALL_BAR = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"


def step_costs(mirror: NetworkMirror, inputs: np.ndarray, settings: ReconstructionSettings, device: torch.device,
               prediction: Prediction | None = None, predicted: FloatPredictions | None = None) -> list[float]:
    """Seconds of one reconstruction step of each unit, measured by running its real training steps
    (`trial_step_seconds`) on `inputs` carried through the float network; for PD-Quant
    (`prediction`, and `predicted` whose first rows are `inputs`') with its float rest. Quantizers,
    weights and the random state are left as they were."""
    env = {mirror.input_names[0]: image_layout(torch.from_numpy(inputs).to(device))}
    costs = []
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for index, unit in enumerate(mirror.units):
            batch = [env[name] for name in unit.unit.inputs]
            with unit.quantization(False), torch.no_grad():
                outputs = as_tuple(unit(*batch))
            env.update(zip(unit.unit.outputs, outputs))
            env = mirror.live_after(index, env)
            held_inputs, held_outputs = [CachedTensor(t) for t in batch], [CachedTensor(t) for t in outputs]
            float_inputs = float_counterparts(mirror, unit, held_inputs)
            rest = None
            if prediction is not None:
                held = {name: CachedTensor(tensor) for name, tensor in env.items()}
                rest = FloatRest(prediction.float_mirror, index, held, predicted, device)
            data = UnitData(quantized_inputs=held_inputs, float_inputs=float_inputs, targets=held_outputs,
                            reference_outputs=held_outputs, rest=rest)
            costs.append(trial_step_seconds(unit, data, settings, device, generator))
    return costs


def float_counterparts(mirror: NetworkMirror, unit: UnitMirror, inputs: list[CachedTensor]) -> list[CachedTensor]:
    """Float inputs for a step run on one batch that stands in for both of a unit's inputs (the
    probe, tools/bench_reconstruct.py): a graph input stays the same CachedTensor, as in a run, and
    any other gets a CachedTensor of its own, so that the step mixes it as a run does. (Where
    PD-Quant's distribution correction changes the first unit's float input, a run mixes that
    input too; the probe does not count that mix.)"""
    return [held if name in mirror.input_names else CachedTensor(held.data)
            for name, held in zip(unit.unit.inputs, inputs)]


def trial_step_seconds(unit: UnitMirror, data: UnitData, settings: ReconstructionSettings, device: torch.device,
                       generator: torch.Generator) -> float:
    """Seconds of a reconstruction step as `reconstruct_unit` runs them (batch, QDrop masks, loss
    with the rounding term, backward, optimizer steps): the faster of steps 2 and 3, the first
    warming up and creating Adam's state. The faster, not the mean: one step slowed by something
    else (another process, the kernel finding memory) would otherwise set the unit's estimate for
    the whole run (measured: 3.2 times the real time of the PP-OCRv5 recogniser's last unit).
    With PD-Quant's float rest (`data.rest`) two more steps carry images on to the outputs, the
    faster of them joins every pd_interval-th step. Every quantizer of the unit is put back as it was."""
    carries = [False, False, False] if data.rest is None else [False, False, False, True, True]
    with quantizers_restored(unit):
        training = start_training(unit, settings)
        beta = rounding_beta(settings.iters - 1, settings) if training.weights else None
        seconds = []
        for predicts in carries:
            started = time.perf_counter()
            training.step(training_loss(unit, data, settings, device, generator, training.weights, beta, predicts))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - started)
    plain = min(seconds[1:3])
    if data.rest is None:
        return plain
    return ((settings.pd_interval - 1) * plain + min(seconds[3:])) / settings.pd_interval


@contextmanager
def quantizers_restored(unit: UnitMirror):
    """Put the unit's quantizers back as they were on leaving: rounding variables, step sizes
    (their values, gradients and whether they learn) and the reconstruction switches."""
    weights = [quantizer for _, quantizer in unit.quantized_weights()]
    activations = list(unit.activation_quantizers.values())
    saved_weights = [(q.alpha, q.soft_rounding) for q in weights]
    saved_activations = [(q.scale.detach().clone(), q.scale.requires_grad, q.straight_through, q.drop_prob)
                         for q in activations]
    try:
        yield
    finally:
        for quantizer, (alpha, soft_rounding) in zip(weights, saved_weights):
            quantizer.alpha, quantizer.soft_rounding = alpha, soft_rounding
        for quantizer, (scale, learns, straight_through, drop_prob) in zip(activations, saved_activations):
            with torch.no_grad():
                quantizer.scale.copy_(scale)
            quantizer.scale.requires_grad_(learns)
            quantizer.scale.grad = None
            quantizer.straight_through, quantizer.drop_prob = straight_through, drop_prob


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
        quantizer.drop_prob = drop_probability(settings, unit.unit.group_size)
    for scale in learned_scales:
        scale.requires_grad_(True)
    optimizers = [torch.optim.Adam([q.alpha for q in weights], lr=settings.weight_lr, fused=True)] if weights else []
    schedulers = []
    if learned_scales:
        act_optimizer = torch.optim.Adam(learned_scales, lr=settings.act_lr, fused=True)
        optimizers.append(act_optimizer)
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(act_optimizer, T_max=settings.iters, eta_min=0.0))
    return UnitTraining(weights, activations, optimizers, schedulers)


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


def training_loss(unit: UnitMirror, data: UnitData, settings: ReconstructionSettings, device: torch.device,
                  generator: torch.Generator, weights: list, beta: float | None, predicts: bool) -> torch.Tensor:
    count = len(data.quantized_inputs[0])
    picks = torch.randint(0, count, (min(settings.batch_size, count),), generator=generator)
    # PD-Quant: the first images of the batch once more, without drop, to carry on to the logits
    carried = picks[:settings.pd_batch_size or len(picks)] if predicts else picks[:0]
    batch, keeps, quantized_already = step_inputs(unit, data, settings, device, picks, len(carried))
    with input_drop_masks(unit, keeps), switched(quantized_already, "enabled", False):
        outputs = as_tuple(unit(*batch))
    # cut only where rows were carried: a slice's backward fills a zero tensor and copies into it
    trained = tuple(o[:len(picks)] for o in outputs) if len(carried) else outputs
    loss = output_error(trained, [t[picks].to(device) for t in data.targets])
    if len(carried):
        predicted = data.rest.predicted
        reached = data.rest(tuple(o[len(picks):] for o in outputs), carried)
        difference = prediction_difference(reached, {name: predicted.outputs[name][carried].to(device) for name in reached},
                                           predicted, settings.pd_temperature)
        loss = loss + difference * settings.pd_interval / settings.pd_lambda
    if beta is not None:
        loss = loss + settings.round_lambda * sum(q.rounding_loss(beta) for q in weights)
    return loss


def step_inputs(unit: UnitMirror, data: UnitData, settings: ReconstructionSettings, device: torch.device,
                picks: torch.Tensor, carried: int
                ) -> tuple[list[torch.Tensor], list[KeepMask | None], list[Quantizer]]:
    """The unit's inputs for one step (rows `picks`, then `carried` rows of the quantized input
    again, unmixed), QDrop's mask of each (None: no drop), and the input quantizers whose work is
    already done in them. On CPU at real resolution, picking, mixing and quantizing an input is one
    compiled loop (`Quantizer.mixed_input`), which gives what the unit's input quantizer computes on
    the mix under the shared mask, without writing the picked rows, the mix or the mask."""
    if not settings.drops:
        quantized = [t[picks].to(device) for t in data.quantized_inputs]
        return [torch.cat((q, q[:carried])) for q in quantized] if carried else quantized, [None] * len(quantized), []
    keep_prob = 1.0 - drop_probability(settings, unit.unit.group_size)
    batch, keeps, quantized_already = [], [], []
    inputs = zip(unit.unit.inputs, data.quantized_inputs, data.float_inputs, unit.input_quantizers())
    for name, quantized_cache, float_cache, quantizer in inputs:
        if (not carried and quantizer is not None and device.type == "cpu" and not unit.reads_float_value(name)
                and isinstance(quantized_cache.data, torch.Tensor)
                and isinstance(float_cache.data, torch.Tensor)):
            value = quantizer.mixed_input(quantized_cache.data, float_cache.data, picks)
            if value is not None:
                batch.append(value)
                keeps.append(None)
                quantized_already.append(quantizer)
                continue
        quantized = quantized_cache[picks].to(device)
        keep = keep_mask(quantized, keep_prob)
        value = quantized if float_cache is quantized_cache else mixed(float_cache[picks].to(device), quantized, keep)
        if carried:
            value, keep = torch.cat((value, quantized[:carried])), keep.keeping_all_of(carried)
        batch.append(value)
        keeps.append(keep)
    return batch, keeps, quantized_already


@contextmanager
def input_drop_masks(unit: UnitMirror, keeps: list[KeepMask | None]):
    """QDrop at the unit's input, as published: an element is either the quantized value of the
    quantized model's input or the float model's input. The input arrives already mixed (`keeps` keeps
    the elements that took the quantized model's value), so each input's quantizer must quantize exactly
    those elements; with a mask of its own it would also pass unquantized quantized-model values and
    quantize float-model ones. An input that `step_inputs` quantized already has no mask (None)."""
    shared = [(quantizer, keep) for quantizer, keep in zip(unit.input_quantizers(), keeps) if quantizer is not None]
    for quantizer, keep in shared:
        quantizer.shared_keep = keep
    try:
        yield
    finally:
        for quantizer, _ in shared:
            quantizer.shared_keep = None
